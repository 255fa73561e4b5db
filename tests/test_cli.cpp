/* The `moe` binary as a user meets it: --help/--version, and bad input of every kind gives one
   "error: ..." line, exit status 1 (2 for usage), no crash, and leaves existing files alone. */
#include <doctest/doctest.h>

#include "data.h"
#include "model_io.h"
#include "test_util.h"

#include <fmt/format.h>

#include <fstream>

using namespace moe;
using namespace moe_test;

namespace {

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

std::string tiny_yaml(const TempDir& dir, const std::string& extra = "") {
    return fmt::format(R"(model:
  vocab_size: 64
  seq_len: 16
  n_layer: 1
  n_head: 2
  d_model: 16
  d_ff: 32
train: {{batch_size: 2, steps: 4, warmup: 1, eval_every: 2, eval_batches: 1, ckpt_every: 2, out_dir: {}, threads: 1}}
data: {{train: {}/train_*.bin, val: {}/val_*.bin}}
{})", dir / "run", dir.path, dir.path, extra);
}

}  // namespace

TEST_CASE("cli: help and version") {
    RunResult r = run(moe_bin() + " --help");
    CHECK(r.status == 0);
    CHECK(r.output.find("train") != std::string::npos);
    for (const char* sub : {"train", "eval", "data synth", "data text"}) {
        RunResult h = run(moe_bin() + " " + sub + " --help");
        INFO(sub);
        CHECK(h.status == 0);
    }
    r = run(moe_bin() + " --version");
    CHECK(r.status == 0);
    CHECK(r.output.find("moe 0.1.0") != std::string::npos);
    expect_cli_error(moe_bin() + " frobnicate", 2);
    expect_cli_error(moe_bin() + " train", 2);
}

TEST_CASE("cli: a tiny run trains, evaluates, and resumes") {
    TempDir dir;
    write_tiny_corpus(dir.path, 64, 4000, 1000);
    write_text(dir / "c.yaml", tiny_yaml(dir));
    RunResult r = run(moe_bin() + " train " + (dir / "c.yaml"));
    INFO(r.output);
    REQUIRE(r.status == 0);
    CHECK(r.output.find("step 4/4 | loss") != std::string::npos);
    CHECK(r.output.find("val loss") != std::string::npos);
    CHECK(r.output.find("done: ") != std::string::npos);
    r = run(moe_bin() + " eval --ckpt " + (dir / "run"));
    CHECK(r.status == 0);
    CHECK(r.output.find("val loss") != std::string::npos);
    r = run(moe_bin() + " eval --json --ckpt " + checkpoint_path(dir / "run", 2));
    CHECK(r.status == 0);
    CHECK(r.output.find("\"loss\":") != std::string::npos);
    r = run(moe_bin() + " train " + (dir / "c.yaml") + " --set train.steps=6 --resume latest");
    INFO(r.output);
    CHECK(r.status == 0);
    CHECK(r.output.find("resuming from") != std::string::npos);
    CHECK(r.output.find("step 6/6") != std::string::npos);
}

TEST_CASE("cli: bad configs") {
    TempDir dir;
    write_tiny_corpus(dir.path, 64, 4000, 1000);
    write_text(dir / "malformed.yaml", "model:\n  vocab_size: [1, 2\n");
    expect_cli_error(moe_bin() + " train " + (dir / "malformed.yaml"));
    write_text(dir / "unknown.yaml", tiny_yaml(dir, "balance: {aux_los: 0.1}"));
    std::string out = expect_cli_error(moe_bin() + " train " + (dir / "unknown.yaml"));
    CHECK(out.find("aux_los") != std::string::npos);
    CHECK(out.find("unknown.yaml:10") != std::string::npos);
    expect_cli_error(moe_bin() + " train " + (dir / "missing.yaml"));
    write_text(dir / "c.yaml", tiny_yaml(dir));
    out = expect_cli_error(moe_bin() + " train " + (dir / "c.yaml") + " --set model.n_head=3");
    CHECK(out.find("n_head") != std::string::npos);
    expect_cli_error(moe_bin() + " train " + (dir / "c.yaml") + " --set nonsense");
}

TEST_CASE("cli: bad data") {
    TempDir dir;
    write_text(dir / "c.yaml", tiny_yaml(dir));
    std::string out = expect_cli_error(moe_bin() + " train " + (dir / "c.yaml"));  // no shards at all
    CHECK(out.find("data.train") != std::string::npos);

    write_tiny_corpus(dir.path, 64, 4000, 1000);
    std::string good = file_bytes(dir / "train_000.bin");
    std::string bad = good;
    bad[0] = 0x11;  // magic
    { std::ofstream(dir / "train_000.bin", std::ios::binary) << bad; }
    out = expect_cli_error(moe_bin() + " train " + (dir / "c.yaml"));
    CHECK(out.find("magic") != std::string::npos);
    { std::ofstream(dir / "train_000.bin", std::ios::binary) << good.substr(0, good.size() - 100); }
    out = expect_cli_error(moe_bin() + " train " + (dir / "c.yaml"));
    CHECK(out.find("train_000.bin") != std::string::npos);
    // a token id >= vocab_size
    write_shard(dir / "train_000.bin", std::vector<uint16_t>(4000, 64));
    out = expect_cli_error(moe_bin() + " train " + (dir / "c.yaml"));
    CHECK(out.find("vocab") != std::string::npos);
}

TEST_CASE("cli: bad checkpoints and eval arguments leave files alone") {
    TempDir dir;
    write_tiny_corpus(dir.path, 64, 4000, 1000);
    write_text(dir / "c.yaml", tiny_yaml(dir));
    REQUIRE(run(moe_bin() + " train " + (dir / "c.yaml")).status == 0);
    std::string ckpt = checkpoint_path(dir / "run", 4);
    std::string bytes = file_bytes(ckpt);
    { std::ofstream(dir / "trunc.safetensors", std::ios::binary) << bytes.substr(0, bytes.size() / 2); }
    std::string out = expect_cli_error(moe_bin() + " eval --ckpt " + (dir / "trunc.safetensors"));
    CHECK(out.find("trunc.safetensors") != std::string::npos);
    expect_cli_error(moe_bin() + " eval --ckpt " + (dir / "nope.safetensors"));
    expect_cli_error(moe_bin() + " eval --ckpt " + ckpt + " --batches 0");
    write_text(dir / "notckpt.safetensors", "hello, this is not a checkpoint at all");
    expect_cli_error(moe_bin() + " eval --ckpt " + (dir / "notckpt.safetensors"));

    // resuming from a truncated checkpoint fails and overwrites nothing
    std::string state = file_bytes(state_path_for(ckpt));
    { std::ofstream(ckpt, std::ios::binary) << bytes.substr(0, 1000); }
    std::string truncated = file_bytes(ckpt);
    expect_cli_error(moe_bin() + " train " + (dir / "c.yaml") + " --set train.steps=8 --resume " + ckpt);
    CHECK(file_bytes(ckpt) == truncated);
    CHECK(file_bytes(state_path_for(ckpt)) == state);
    CHECK(file_bytes(checkpoint_path(dir / "run", 2)) != "<missing>");
}
