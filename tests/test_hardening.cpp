/* Hardening (docs/hardening.md): the in-memory parse entry points the fuzzers use agree with the
   file readers, regressions for what fuzzing and the sanitizers found, train.nonfinite, SIGINT /
   SIGTERM during training, and the error paths of the CLI (one `error:` line, exit 1, no file
   left half-written, no temp file left behind). */
#include <doctest/doctest.h>

#include "checkpoint.h"
#include "common.h"
#include "config.h"
#include "data.h"
#include "fileio.h"
#include "model_io.h"
#include "test_proc.h"
#include "test_util.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <sys/stat.h>
#include <thread>
#include <unistd.h>

using namespace moe;
using namespace moe_test;

namespace {

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

std::string tiny_yaml(const TempDir& dir, int steps, int ckpt_every = 0, const std::string& train_extra = "") {
    return fmt::format(R"(model: {{vocab_size: 64, seq_len: 16, n_layer: 1, n_head: 2, d_model: 16, d_ff: 32}}
train: {{batch_size: 2, steps: {}, warmup: 1, eval_every: 0, eval_batches: 1, ckpt_every: {}, out_dir: {},
        threads: 1{}}}
data: {{train: {}/train_*.bin, val: {}/val_*.bin}}
)", steps, ckpt_every, dir / "run", train_extra.empty() ? "" : ", " + train_extra, dir.path, dir.path);
}

// The tensors of two safetensors files are the same (metadata may differ).
bool same_tensors(const std::string& a, const std::string& b) {
    SafeTensors x = load_safetensors(a), y = load_safetensors(b);
    if (x.tensors.size() != y.tensors.size()) return false;
    for (const auto& [name, t] : x.tensors) {
        if (!y.has(name)) return false;
        const TensorData& u = y.tensors.at(name);
        if (t.dtype != u.dtype || t.shape != u.shape || t.bytes != u.bytes) return false;
    }
    return true;
}

bool all_finite(const std::string& ckpt) {
    SafeTensors st = load_safetensors(ckpt);
    for (const auto& [name, t] : st.tensors) {
        if (t.dtype != "F32") continue;
        for (float v : t.f32())
            if (!std::isfinite(v)) return false;
    }
    return true;
}

size_t count_lines(const std::string& text, const std::string& needle) {
    size_t n = 0;
    for (size_t p = 0; (p = text.find(needle, p)) != std::string::npos; p += needle.size()) n++;
    return n;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// parse entry points (what the fuzzers call) and the file readers are one reader

TEST_CASE("hardening: parse_safetensors and load_safetensors agree on every prefix of a file") {
    TempDir dir;
    std::vector<float> a = {1, 2, 3, 4, 5, 6};
    std::vector<int32_t> b = {7, -8};
    save_safetensors(dir / "x.safetensors", {{"a", "F32", {2, 3}, a.data()}, {"b", "I32", {2}, b.data()}},
                     {{"k", "v"}});
    const std::string bytes = file_bytes(dir / "x.safetensors");
    SafeTensors m = parse_safetensors(bytes, "mem");
    CHECK(m.path == "mem");
    CHECK(m.meta("k") == "v");
    CHECK(m.get("a", {2, 3}).f32() == a);
    CHECK(m.get("b", {2}).i32() == b);
    for (size_t n = 0; n < bytes.size(); n++) {
        write_text(dir / "cut.safetensors", bytes.substr(0, n));
        std::string em, ef;
        try { parse_safetensors(bytes.substr(0, n), dir / "cut.safetensors"); } catch (const Error& e) { em = e.what(); }
        try { load_safetensors(dir / "cut.safetensors"); } catch (const Error& e) { ef = e.what(); }
        INFO("length " << n);
        CHECK(!em.empty());
        CHECK(em == ef);
    }
}

TEST_CASE("hardening: parse_shard and read_shard agree") {
    TempDir dir;
    std::vector<uint16_t> tokens = {1, 2, 3, 65535, 0};
    write_shard(dir / "s.bin", tokens);
    const std::string bytes = file_bytes(dir / "s.bin");
    CHECK(parse_shard(bytes, "mem") == tokens);
    for (size_t n : {(size_t)0, (size_t)100, (size_t)1023, (size_t)1024, bytes.size() - 1}) {
        write_text(dir / "cut.bin", bytes.substr(0, n));
        std::string em, ef;
        try { parse_shard(bytes.substr(0, n), dir / "cut.bin"); } catch (const Error& e) { em = e.what(); }
        try { read_shard(dir / "cut.bin"); } catch (const Error& e) { ef = e.what(); }
        INFO("length " << n);
        CHECK(!em.empty());
        CHECK(em == ef);
    }
    CHECK_THROWS_AS(parse_shard(bytes + "x", "mem"), Error);
}

// ------------------------------------------------------------------------------------------------
// train.nonfinite

TEST_CASE("nonfinite: the key defaults to stop, takes stop|skip, and round-trips") {
    CHECK(parse_config("", "t").train.nonfinite == "stop");
    CHECK(parse_config("train: {nonfinite: skip}", "t").train.nonfinite == "skip");
    CHECK(parse_config("", "t", {"train.nonfinite=skip"}).train.nonfinite == "skip");
    CHECK_THROWS_WITH_AS(parse_config("train: {nonfinite: ignore}", "t.yaml"),
                         "train.nonfinite: expected one of stop | skip, got 'ignore' (t.yaml:1)", Error);
    Config c = parse_config("train: {nonfinite: skip}", "t");
    CHECK(config_to_yaml(c).find("nonfinite: skip") != std::string::npos);
    CHECK(parse_config(config_to_yaml(c), "again").train.nonfinite == "skip");
}

TEST_CASE("nonfinite: stop keeps the weights before the bad step, says so, exits 1; resume continues") {
    TempDir dir;
    write_tiny_corpus(dir.path, 64, 4000, 1000);
    write_text(dir / "c.yaml", tiny_yaml(dir, 6));
    // the reference: an undisturbed run, checkpointing every step
    REQUIRE(run(moe_bin() + " train " + (dir / "c.yaml") + " --set train.ckpt_every=1 --set train.out_dir=" +
                (dir / "ref")).status == 0);

    std::string out = expect_cli_error("MOE_INJECT_INF_STEP=4 " + moe_bin() + " train " + (dir / "c.yaml"));
    const std::string before = checkpoint_path(dir / "run", 3);
    CHECK(out.find("error: non-finite loss at step 4 (loss inf") != std::string::npos);
    CHECK(out.find(before) != std::string::npos);
    CHECK(out.find("step 3/6") != std::string::npos);
    CHECK(out.find("step 4/6") == std::string::npos);  // no step line for the bad step
    REQUIRE(file_exists(before));
    REQUIRE(file_exists(state_path_for(before)));
    CHECK(!file_exists(checkpoint_path(dir / "run", 4)));
    // exactly the weights (and optimizer state) after 3 good steps
    CHECK(same_tensors(before, checkpoint_path(dir / "ref", 3)));
    CHECK(same_tensors(state_path_for(before), state_path_for(checkpoint_path(dir / "ref", 3))));
    for (const std::string& n : list_dir(dir / "run")) CHECK_MESSAGE(n.find(".tmp.") == std::string::npos, n);

    RunResult r = run(moe_bin() + " train " + (dir / "c.yaml") + " --resume latest");
    INFO(r.output);
    CHECK(r.status == 0);
    CHECK(r.output.find("resuming from " + before + " (step 3)") != std::string::npos);
    CHECK(r.output.find("step 6/6") != std::string::npos);
    // a resumed run is the undisturbed one: same final weights
    CHECK(same_tensors(checkpoint_path(dir / "run", 6), checkpoint_path(dir / "ref", 6)));

    // a bad first step keeps the initial weights as step 0
    REQUIRE(run("rm -rf '" + (dir / "run") + "'").status == 0);
    out = expect_cli_error("MOE_INJECT_INF_STEP=1 " + moe_bin() + " train " + (dir / "c.yaml"));
    CHECK(out.find("non-finite loss at step 1") != std::string::npos);
    CHECK(file_exists(checkpoint_path(dir / "run", 0)));
    r = run(moe_bin() + " train " + (dir / "c.yaml") + " --resume latest");
    INFO(r.output);
    CHECK(r.status == 0);
    CHECK(same_tensors(checkpoint_path(dir / "run", 6), checkpoint_path(dir / "ref", 6)));
}

TEST_CASE("nonfinite: skip drops the update, counts it in the step line and metrics.jsonl") {
    TempDir dir;
    write_tiny_corpus(dir.path, 64, 4000, 1000);
    write_text(dir / "c.yaml", tiny_yaml(dir, 6, 1, "nonfinite: skip"));
    RunResult r = run("MOE_INJECT_INF_STEP=3 " + moe_bin() + " train " + (dir / "c.yaml"));
    INFO(r.output);
    REQUIRE(r.status == 0);
    CHECK(r.output.find("step 2/6") != std::string::npos);
    CHECK(r.output.find("skipped") != std::string::npos);
    CHECK(count_lines(r.output, "| skipped 1") == 4);  // steps 3..6
    CHECK(r.output.find("step 2/6 | loss") < r.output.find("skipped 1"));
    // the update of step 3 never happened: the weights after it are those after step 2
    CHECK(same_tensors(checkpoint_path(dir / "run", 2), checkpoint_path(dir / "run", 3)));
    CHECK(!same_tensors(checkpoint_path(dir / "run", 3), checkpoint_path(dir / "run", 4)));
    CHECK(all_finite(checkpoint_path(dir / "run", 6)));
    CHECK(all_finite(state_path_for(checkpoint_path(dir / "run", 6))));
    std::string metrics = file_bytes(dir / "run/metrics.jsonl");
    CHECK(metrics.find("\"nonfinite\":true") != std::string::npos);
    CHECK(count_lines(metrics, "\"skipped\":1") == 4);
    CHECK(count_lines(metrics, "\"nonfinite\":true") == 1);
    RunResult ev = run(moe_bin() + " eval --ckpt " + (dir / "run"));
    CHECK(ev.status == 0);
}

// ------------------------------------------------------------------------------------------------
// SIGINT / SIGTERM

namespace {

// Starts a long run, waits until it has done at least `min_steps` steps, sends `sig`, and
// returns (exit status, output).
std::pair<int, std::string> interrupt_run(const TempDir& dir, const std::string& args, int sig, int min_steps) {
    const std::string log = dir / "interrupted.log";
    pid_t pid = spawn_shell(moe_bin() + " train " + args + " > '" + log + "' 2>&1");
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (std::chrono::steady_clock::now() < deadline) {
        std::string m = file_bytes(dir / "run/metrics.jsonl");
        if (m != "<missing>" && count_lines(m, "\"loss\"") >= (size_t)min_steps) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    kill(pid, sig);
    int status = wait_status(pid);
    return {status, file_bytes(log)};
}

int step_of_interrupt(const std::string& out) {
    size_t p = out.find("interrupted at step ");
    return p == std::string::npos ? -1 : std::atoi(out.c_str() + p + 20);
}

}  // namespace

TEST_CASE("signals: SIGTERM finishes the step, checkpoints, exits 143; the resumed run is bit-exact") {
    TempDir dir;
    write_tiny_corpus(dir.path, 64, 4000, 1000);
    const int steps = 3000;   // long enough that the signal lands mid-run, even on a slow machine
    write_text(dir / "c.yaml", tiny_yaml(dir, steps));
    REQUIRE(run(moe_bin() + " train " + (dir / "c.yaml") + " --set train.out_dir=" + (dir / "ref")).status == 0);

    auto [status, out] = interrupt_run(dir, dir / "c.yaml", SIGTERM, 5);
    INFO(out);
    CHECK(status == 143);
    const int n = step_of_interrupt(out);
    REQUIRE(n >= 5);
    REQUIRE(n < steps);
    const std::string ckpt = checkpoint_path(dir / "run", n);
    CHECK(out.find(fmt::format("interrupted at step {}: wrote {}", n, ckpt)) != std::string::npos);
    CHECK(out.find(fmt::format("step {:>4}/{} | loss", n, steps)) != std::string::npos);  // the last step finished
    CHECK(file_exists(ckpt));
    CHECK(file_exists(state_path_for(ckpt)));
    CHECK(out.find("error") == std::string::npos);

    RunResult r = run(moe_bin() + " train " + (dir / "c.yaml") + " --resume latest");
    INFO(r.output);
    CHECK(r.status == 0);
    CHECK(r.output.find(fmt::format("resuming from {} (step {})", ckpt, n)) != std::string::npos);
    CHECK(same_tensors(checkpoint_path(dir / "run", steps), checkpoint_path(dir / "ref", steps)));
}

TEST_CASE("signals: SIGINT exits 130 with a checkpoint; a finished run is not affected") {
    TempDir dir;
    write_tiny_corpus(dir.path, 64, 4000, 1000);
    write_text(dir / "c.yaml", tiny_yaml(dir, 100000));
    auto [status, out] = interrupt_run(dir, dir / "c.yaml", SIGINT, 3);
    INFO(out);
    CHECK(status == 130);
    const int n = step_of_interrupt(out);
    REQUIRE(n >= 3);
    CHECK(file_exists(checkpoint_path(dir / "run", n)));
    CHECK(file_exists(state_path_for(checkpoint_path(dir / "run", n))));
    CHECK(find_latest_checkpoint(dir / "run", true) == checkpoint_path(dir / "run", n));
}

// ------------------------------------------------------------------------------------------------
// regressions: inputs the fuzzers found (tests/fuzz/corpus/<target>/ keeps each one as a seed)

TEST_CASE("fuzz regression: a zero dimension beside huge ones is an empty tensor, not an overflow") {
    // fuzz_safetensors: TensorData::numel() multiplied 2^40 * 2^40 before reaching the 0 (UBSan:
    // signed overflow); the loader itself had already accepted the shape as 0 bytes
    const std::string header = R"({"z":{"dtype":"F32","shape":[1099511627776,1099511627776,0],"data_offsets":[0,0]}})";
    std::string bytes(8, '\0');
    bytes[0] = (char)header.size();
    bytes += header;
    SafeTensors st = parse_safetensors(bytes, "zero.safetensors");
    const TensorData& z = st.get("z", {1099511627776, 1099511627776, 0});
    CHECK(z.numel() == 0);
    CHECK(z.f32().empty());
    CHECK_THROWS_AS(z.i32(), Error);
}

TEST_CASE("fuzz regression: dist.expert_parallel = 0 on an MoE model is an error, not SIGFPE") {
    // fuzz_set: validate() computed model.moe.experts % dist.expert_parallel before checking
    // dist.expert_parallel >= 1 (integer division by zero)
    const std::string moe = "model: {moe: {experts: 4, top_k: 2}}\n";
    CHECK_THROWS_WITH_AS(parse_config(moe, "m.yaml", {"dist.expert_parallel=0"}),
                         "dist.expert_parallel: must be >= 1, got 0 (--set dist.expert_parallel=0)", Error);
    CHECK_THROWS_WITH_AS(parse_config(moe + "dist: {expert_parallel: -2}\n", "m.yaml"),
                         "dist.expert_parallel: must be >= 1, got -2 (m.yaml:2)", Error);
    TempDir dir;
    write_text(dir / "m.yaml", moe);
    std::string out = expect_cli_error(moe_bin() + " train " + (dir / "m.yaml") + " --set dist.expert_parallel=0");
    CHECK(out.find("dist.expert_parallel: must be >= 1") != std::string::npos);
}

// ------------------------------------------------------------------------------------------------
// error paths of the CLI: one `error:` line, exit 1, files left as they were, no temp file

namespace {

// Every regular file under dir (recursively) with its bytes, for before/after comparisons.
std::map<std::string, std::string> snapshot(const std::string& dir) {
    std::map<std::string, std::string> files;
    for (const std::string& n : list_dir(dir)) {
        const std::string p = dir + "/" + n;
        struct stat st;
        if (stat(p.c_str(), &st) != 0) continue;
        if (S_ISDIR(st.st_mode)) {
            for (auto& [k, v] : snapshot(p)) files[n + "/" + k] = v;
        } else {
            files[n] = file_bytes(p);
        }
    }
    return files;
}

}  // namespace

TEST_CASE("errors: every CLI error path exits 1 with one error line and leaves every file as it was") {
    TempDir dir;
    write_tiny_corpus(dir.path, 64, 4000, 1000);
    write_text(dir / "c.yaml", tiny_yaml(dir, 4, 2));
    REQUIRE(run(moe_bin() + " train " + (dir / "c.yaml")).status == 0);
    REQUIRE(run(moe_bin() + " train " + (dir / "c.yaml") + " --set model.moe.experts=4 --set model.moe.expert_ff=16 "
                "--set train.steps=1 --set train.out_dir=" + (dir / "moerun")).status == 0);
    REQUIRE(mkdir((dir / "adir").c_str(), 0755) == 0);
    // a directory where a checkpoint's state file goes: its rename fails after the temp file is written
    REQUIRE(run("mkdir -p '" + (dir / "blocked/model_00000002.state.safetensors") + "'").status == 0);
    const std::string ckpt = checkpoint_path(dir / "run", 2), state = state_path_for(ckpt);
    const std::string train = moe_bin() + " train " + (dir / "c.yaml");

    struct Case { std::string cmd, expect; };
    const std::vector<Case> cases = {
        {moe_bin() + " train " + (dir / "adir"), "cannot read config"},
        {train + " --set train.out_dir=" + (dir / "c.yaml"), "a file of that name is in the way"},
        {train + " --set train.out_dir=" + (dir / "c.yaml/sub"), "a file of that name is in the way"},
        {train + " --resume " + (dir / "nothere"), "checkpoint not found"},
        {train + " --resume " + state, "has no training state beside it"},
        {train + " --resume latest", "nothing to do"},
        {train + " --set train.init_from=" + (dir / "c.yaml"), "train.init_from: corrupt checkpoint"},
        {train + " --set train.out_dir=" + (dir / "blocked"), "cannot rename"},
        {train + " --set train.nonfinite=sometimes", "train.nonfinite: expected one of stop | skip"},
        {moe_bin() + " eval --ckpt " + state, "not a moe checkpoint file"},
        {moe_bin() + " eval --ckpt " + (dir / "adir"), "no checkpoint in directory"},
        {moe_bin() + " eval --ckpt " + ckpt + " --batches 100000", "--batches"},
        {moe_bin() + " eval --ckpt " + ckpt + " --data " + (dir / "nomatch*"), "no files match"},
        {moe_bin() + " eval --ckpt " + (dir / "moerun") + " --svg " + (dir / "nodir/x.svg"), "cannot write --svg file"},
        {moe_bin() + " eval --ckpt " + (dir / "moerun") + " --svg " + (dir / "adir"), "cannot rename"},
        {moe_bin() + " data synth --out " + (dir / "c.yaml"), "is not a directory"},
        {moe_bin() + " data text --in " + (dir / "adir") + " --out " + (dir / "t"), "cannot read"},
    };
    for (const Case& c : cases) {
        const auto before = snapshot(dir.path);
        std::string out = expect_cli_error(c.cmd);
        CHECK_MESSAGE(out.find(c.expect) != std::string::npos, c.cmd << " should say " << c.expect);
        size_t errors = 0;
        for (size_t p = 0; (p = out.find("error: ", p)) != std::string::npos; p++) errors++;
        CHECK_MESSAGE(errors == 1, c.cmd);
        auto after = snapshot(dir.path);
        after.erase("run/metrics.jsonl");   // a log, appended to by a run that got going
        auto expected = before;
        expected.erase("run/metrics.jsonl");
        for (auto it = after.begin(); it != after.end();) {  // what a failed run may create: its metrics log
            if (!expected.count(it->first) && it->first.find("metrics.jsonl") != std::string::npos) it = after.erase(it);
            else ++it;
        }
        CHECK_MESSAGE(after == expected, c.cmd);
        for (const auto& [name, bytes] : after) CHECK_MESSAGE(name.find(".tmp.") == std::string::npos, c.cmd << ": " << name);
    }
}

TEST_CASE("crash: a new run removes the temp files of dead writers only") {
    TempDir dir;
    write_tiny_corpus(dir.path, 64, 4000, 1000);
    write_text(dir / "c.yaml", tiny_yaml(dir, 2));
    REQUIRE(mkdir((dir / "run").c_str(), 0755) == 0);
    pid_t dead = spawn_shell("true");
    REQUIRE(wait_status(dead) == 0);
    const std::string stale = dir / "run" + fmt::format("/model_00000001.safetensors.tmp.{}", dead);
    const std::string live = dir / "run" + fmt::format("/model_00000001.safetensors.tmp.{}", getpid());
    const std::string other = dir / "run/notes.tmp.1";
    for (const std::string& p : {stale, live, other}) write_text(p, "partial");
    RunResult r = run(moe_bin() + " train " + (dir / "c.yaml"));
    INFO(r.output);
    REQUIRE(r.status == 0);
    CHECK(r.output.find("removed " + stale) != std::string::npos);
    CHECK(!file_exists(stale));
    CHECK(file_exists(live));    // its writer (this test process) is alive
    CHECK(file_exists(other));   // not a name AtomicFile gives
}
