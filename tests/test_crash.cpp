/* Crash safety of `moe train`, through the real binary (docs/hardening.md "Crash safety"):
   - SIGKILL at random moments of a run that checkpoints every step: every file under a final
     name is complete, `--resume latest` always finds the newest complete pair and continues,
     and no temp file is ever taken for a checkpoint;
   - a checkpoint write cut short by `ulimit -f` (RLIMIT_FSIZE): one `error:` line, exit 1, the
     previous checkpoint byte for byte intact and loadable, no temp file left behind. */
#include <doctest/doctest.h>

#include "checkpoint.h"
#include "fileio.h"
#include "model_io.h"
#include "test_proc.h"
#include "test_util.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <fstream>
#include <random>
#include <thread>

using namespace moe;
using namespace moe_test;

namespace {

using Clock = std::chrono::steady_clock;

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

// A run whose checkpoints are big enough (~0.5 MB model, ~1 MB state) that a random kill often
// lands inside a write, and whose steps are short enough for many trials.
std::string crash_yaml(const TempDir& dir, int steps) {
    return fmt::format(R"(model: {{vocab_size: 256, seq_len: 32, n_layer: 2, n_head: 2, d_model: 64, d_ff: 256}}
train: {{batch_size: 2, steps: {}, warmup: 1, eval_every: 0, eval_batches: 1, ckpt_every: 1, out_dir: {}, threads: 1}}
data: {{train: {}/train_*.bin, val: {}/val_*.bin}}
)", steps, dir / "run", dir.path, dir.path);
}

bool is_final_name(const std::string& n) {  // model_<8 digits>.safetensors / .state.safetensors
    if (n.size() < 14 || n.rfind("model_", 0) != 0) return false;
    if (!std::all_of(n.begin() + 6, n.begin() + 14, ::isdigit)) return false;
    std::string rest = n.substr(14);
    return rest == ".safetensors" || rest == ".state.safetensors";
}

bool is_temp_name(const std::string& n) { return n.find(".safetensors.tmp.") != std::string::npos; }

}  // namespace

TEST_CASE("crash: SIGKILL at random moments; --resume latest always continues from a complete pair") {
    TempDir dir;
    write_tiny_corpus(dir.path, 256, 20000, 4000);
    const int steps = 12;
    write_text(dir / "c.yaml", crash_yaml(dir, steps));
    const std::string train = moe_bin() + " train " + (dir / "c.yaml");

    // how long an undisturbed run takes, so that kills spread over its whole life
    auto t0 = Clock::now();
    RunResult full = run(train);
    const double full_s = std::chrono::duration<double>(Clock::now() - t0).count();
    {
        INFO(full.output);
        REQUIRE(full.status == 0);
    }

    std::mt19937 rng(20240520);
    const auto deadline = Clock::now() + std::chrono::seconds(120);
    int trials = 0, resumed = 0, none_yet = 0, with_temp = 0;
    for (; trials < 30 && (trials < 10 || Clock::now() < deadline); trials++) {
        REQUIRE(run("rm -rf '" + (dir / "run") + "'").status == 0);
        const double delay = std::uniform_real_distribution<double>(0.0, full_s)(rng);
        pid_t pid = spawn_shell(train + " > '" + (dir / "killed.log") + "' 2>&1");
        std::this_thread::sleep_for(std::chrono::duration<double>(delay));
        kill(pid, SIGKILL);
        const int status = wait_status(pid);
        INFO("trial " << trials << ": SIGKILL after " << delay << " s of " << full_s << " s, status " << status);

        // every file under a final name is complete; anything else is a temp file or the metrics
        bool temp = false;
        for (const std::string& n : list_dir(dir / "run")) {
            INFO("file " << n);
            if (is_final_name(n)) {
                CHECK_NOTHROW(load_safetensors(dir / "run" + "/" + n));
            } else {
                CHECK((is_temp_name(n) || n == "metrics.jsonl"));
                temp |= is_temp_name(n);
            }
        }
        with_temp += temp;

        const std::string latest = find_latest_checkpoint(dir / "run", true);
        RunResult r = run(train + fmt::format(" --set train.steps={} --resume latest", steps + 2));
        INFO(r.output);
        if (latest.empty()) {  // killed before its first checkpoint: a clean error, nothing to resume
            none_yet++;
            CHECK(r.status == 1);
            CHECK((r.output.find("error: no complete (model + state) checkpoint") != std::string::npos ||
                   r.output.find("error: checkpoint not found") != std::string::npos));  // no out_dir yet
            continue;
        }
        resumed++;
        CHECK(r.status == 0);
        CHECK(r.output.find("resuming from " + latest) != std::string::npos);
        CHECK(r.output.find(fmt::format("step {}/{}", steps + 2, steps + 2)) != std::string::npos);
        // the resumed run cleared what the killed one left half-written
        for (const std::string& n : list_dir(dir / "run")) CHECK_MESSAGE(!is_temp_name(n), n);
    }
    MESSAGE(fmt::format("{} SIGKILL trials over a {:.2f} s run: {} resumed, {} before the first checkpoint, "
                        "{} left a temp file", trials, full_s, resumed, none_yet, with_temp));
    CHECK(trials >= 10);
    CHECK(resumed > 0);
}

TEST_CASE("crash: a checkpoint write cut short by ulimit -f fails cleanly and keeps the previous one") {
    TempDir dir;
    write_tiny_corpus(dir.path, 256, 20000, 4000);
    write_text(dir / "c.yaml", crash_yaml(dir, 2));
    REQUIRE(run(moe_bin() + " train " + (dir / "c.yaml") + " --set train.ckpt_every=2").status == 0);
    const std::string ckpt = checkpoint_path(dir / "run", 2), state = state_path_for(ckpt);
    const std::string model_bytes = file_bytes(ckpt), state_bytes = file_bytes(state);
    REQUIRE(model_bytes.size() > 100000);
    REQUIRE(state_bytes.size() > model_bytes.size());

    // A file-size limit well under one checkpoint (a quarter or half of the model file, as the
    // shell counts 512- or 1024-byte blocks) but far above metrics.jsonl: the state file of
    // step 4, written first, hits it.
    const size_t blocks = model_bytes.size() / 1024 / 2;
    const std::string limited = fmt::format("sh -c 'ulimit -f {}; exec {} train {} --set train.steps=4 "
                                            "--set train.ckpt_every=2 --resume latest'",
                                            blocks, moe_bin(), dir / "c.yaml");
    RunResult r = run(limited);
    INFO(r.output);
    CHECK(r.status == 1);
    CHECK(r.output.find("error: write failed") != std::string::npos);
    CHECK(r.output.find("File too large") != std::string::npos);
    CHECK(r.output.find("terminate called") == std::string::npos);
    // the previous pair is untouched and still the newest complete one; nothing else was left
    CHECK(file_bytes(ckpt) == model_bytes);
    CHECK(file_bytes(state) == state_bytes);
    for (const std::string& n : list_dir(dir / "run")) {
        INFO(n);
        CHECK((n == "metrics.jsonl" || n == "model_00000002.safetensors" || n == "model_00000002.state.safetensors"));
    }
    CHECK(find_latest_checkpoint(dir / "run", true) == ckpt);
    RunResult ev = run(moe_bin() + " eval --ckpt " + (dir / "run"));
    INFO(ev.output);
    CHECK(ev.status == 0);
    RunResult again = run(moe_bin() + " train " + (dir / "c.yaml") +
                          " --set train.steps=4 --set train.ckpt_every=2 --resume latest");
    INFO(again.output);
    CHECK(again.status == 0);
    CHECK(again.output.find("resuming from " + ckpt) != std::string::npos);
    CHECK(file_exists(checkpoint_path(dir / "run", 4)));

    // the very first checkpoint of a run failing: no file under a final name, no temp file
    REQUIRE(run("rm -rf '" + (dir / "run") + "'").status == 0);
    r = run(fmt::format("sh -c 'ulimit -f {}; exec {} train {}'", blocks, moe_bin(), dir / "c.yaml"));
    INFO(r.output);
    CHECK(r.status == 1);
    CHECK(r.output.find("error: write failed") != std::string::npos);
    CHECK(list_dir(dir / "run") == std::vector<std::string>{"metrics.jsonl"});
}
