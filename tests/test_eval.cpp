/* Routing-health statistics on hand-made loads and plans with known answers, and `moe eval` as a
   user runs it: every router type evaluates, its JSON parses and its loss equals the PyTorch
   oracle's eval-mode loss on the same batches; bad input gives clear errors. */
#include <doctest/doctest.h>

#include "checkpoint.h"
#include "config.h"
#include "data.h"
#include "fileio.h"
#include "model_io.h"
#include "routing_report.h"
#include "stats.h"
#include "test_util.h"
#include "trainer.h"

#include <cmath>
#include <fmt/format.h>
#include <fstream>
#include <nlohmann/json.hpp>

using namespace moe;
using namespace moe_test;

TEST_CASE("load stats: uniform, collapse, half dead") {
    LoadStats u = load_stats(std::vector<double>{10, 10, 10, 10});
    CHECK(u.maxvio == doctest::Approx(0.0));
    CHECK(u.cv == doctest::Approx(0.0));
    CHECK(u.entropy == doctest::Approx(1.0));
    CHECK(u.dead == 0);
    LoadStats c = load_stats(std::vector<double>{40, 0, 0, 0});
    CHECK(c.maxvio == doctest::Approx(3.0));  // E - 1
    CHECK(c.cv == doctest::Approx(std::sqrt(3.0)));
    CHECK(c.entropy == doctest::Approx(0.0));
    CHECK(c.dead == 3);
    LoadStats h = load_stats(std::vector<double>{20, 20, 0, 0});
    CHECK(h.maxvio == doctest::Approx(1.0));
    CHECK(h.cv == doctest::Approx(1.0));
    CHECK(h.entropy == doctest::Approx(0.5));  // log 2 / log 4
    CHECK(h.dead == 2);
    CHECK(load_stats(std::vector<double>{0, 0}).maxvio == 0.0);
}

TEST_CASE("specialisation: independent routing is 0, a domain per expert is 1") {
    LayerRouting l;
    l.domain_expert = {{5, 5}, {5, 5}};
    CHECK(l.specialisation() == doctest::Approx(0.0));
    l.domain_expert = {{10, 0}, {0, 10}};
    CHECK(l.specialisation() == doctest::Approx(1.0));
    l.domain_expert = {{9, 1}, {1, 9}};
    double mid = l.specialisation();
    CHECK(mid > 0.2);
    CHECK(mid < 0.9);
}

namespace {

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

// A tiny model of the given router, trained 2 steps on a tiny synthetic corpus, through the CLI.
std::string train_tiny(const TempDir& dir, const std::string& name, const std::string& router_sets) {
    std::string cfg = fmt::format(R"(model: {{vocab_size: 256, seq_len: 32, n_layer: 2, n_head: 2, d_model: 32, d_ff: 64,
        moe: {{experts: 4, top_k: 2, expert_ff: 16}}}}
train: {{batch_size: 2, steps: 2, eval_every: 0, eval_batches: 2, ckpt_every: 0, out_dir: {}, threads: 1}}
data: {{train: {}/train_*.bin, val: {}/val_*.bin}}
)", dir / name, dir / "data", dir / "data");
    write_text(dir / (name + ".yaml"), cfg);
    RunResult r = run(moe_bin() + " train " + (dir / (name + ".yaml")) + " " + router_sets);
    INFO(r.output);
    REQUIRE(r.status == 0);
    return checkpoint_path(dir / name, 2);
}

}  // namespace

TEST_CASE("moe eval: every router type; JSON parses; loss equals the oracle's eval-mode loss") {
    TempDir dir;
    make_dirs(dir / "data");
    synth_corpus(dir / "data", 100000, 5, 0.2);
    const std::vector<std::pair<std::string, std::string>> routers = {
        {"topk", "--set balance.aux_loss=0.01 --set router.eval_capacity_factor=1.0"},
        {"noisy", "--set router.noise=gaussian"},
        {"expert_choice", "--set router.type=expert_choice"},
        {"hash", "--set router.type=hash --set model.moe.top_k=1"},
        {"soft", "--set router.type=soft"},
        {"sinkhorn", "--set router.type=sinkhorn"},
        {"groups", "--set router.groups=2 --set router.topk_groups=1 --set model.moe.top_k=1"},
    };
    for (const auto& [name, sets] : routers) {
        CAPTURE(name);
        std::string ckpt = train_tiny(dir, name, sets);
        RunResult r = run(moe_bin() + " eval --json --batches 2 --ckpt " + ckpt);
        INFO(r.output);
        REQUIRE(r.status == 0);
        nlohmann::json j = nlohmann::json::parse(r.output);
        REQUIRE(j["layers"].size() == 2);
        for (const auto& l : j["layers"]) {
            CHECK(l["load"].size() == 4);
            CHECK(l.contains("maxvio"));
            CHECK(l.contains("domain_expert"));  // the synthetic corpus carries domain tags
        }
        CHECK(j["causal"].get<bool>() == !(name == "expert_choice" || name == "soft"));
        double ours = j["loss"].get<double>();

        // the oracle in eval mode on the same two batches: tokens [0, 2*B*T + 1) of the val shard
        std::vector<uint16_t> val = read_shard(dir / "data/val_000.bin");
        const int B = 2, T = 32;
        double sum = 0.0;
        for (int b = 0; b < 2; b++) {
            std::vector<int> inp(B * T), tgt(B * T);
            for (int i = 0; i < B * T; i++) { inp[i] = val[b * B * T + i]; tgt[i] = val[b * B * T + i + 1]; }
            save_safetensors(dir / "batch.safetensors",
                             {{"inputs", "I32", {B, T}, inp.data()}, {"targets", "I32", {B, T}, tgt.data()}}, {});
            RunResult o = run(python_bin() + " tests/reference/oracle.py --eval --ckpt " + ckpt + " --batch " +
                              (dir / "batch.safetensors") + " --out " + (dir / "out.safetensors"));
            INFO(o.output);
            REQUIRE(o.status == 0);
            sum += load_safetensors(dir / "out.safetensors").get("loss").f32()[0];
        }
        CHECK(std::fabs(ours - sum / 2) <= 1e-5 * std::fabs(sum / 2));

        // the text report: bars, numbers, the domain matrix
        r = run(moe_bin() + " eval --batches 2 --ckpt " + ckpt + " --svg " + (dir / (name + ".svg")));
        CHECK(r.status == 0);
        CHECK(r.output.find("maxvio") != std::string::npos);
        CHECK(r.output.find("arithmetic") != std::string::npos);
        std::string svg = file_bytes(dir / (name + ".svg"));
        CHECK(svg.rfind("<svg", 0) == 0);
        CHECK(svg.find("</svg>") != std::string::npos);
        if (name == "expert_choice" || name == "soft") CHECK(r.output.find("not causal") != std::string::npos);
    }
}

TEST_CASE("moe eval: bad input") {
    TempDir dir;
    make_dirs(dir / "data");
    synth_corpus(dir / "data", 100000, 5, 0.2);
    std::string ckpt = train_tiny(dir, "m", "");
    auto expect_error = [](const std::string& cmd, const std::string& needle) {
        RunResult r = run(cmd);
        INFO(cmd << "\n" << r.output);
        CHECK(r.status == 1);
        CHECK(r.output.find("error: ") != std::string::npos);
        CHECK(r.output.find(needle) != std::string::npos);
    };
    expect_error(moe_bin() + " eval --ckpt " + (dir / "missing.safetensors"), "missing.safetensors");
    expect_error(moe_bin() + " eval --ckpt " + ckpt + " --batches 0", "--batches");
    expect_error(moe_bin() + " eval --ckpt " + ckpt + " --svg " + (dir / "no/such/dir/x.svg"), "--svg");
    CHECK(file_bytes(dir / "no/such/dir/x.svg") == "<missing>");
    // data from a bigger vocabulary than the checkpoint's
    write_shard(dir / "big.bin", std::vector<uint16_t>(10000, 300));
    expect_error(moe_bin() + " eval --ckpt " + ckpt + " --data " + (dir / "big.bin"), "vocab");
    expect_error(moe_bin() + " eval --ckpt " + ckpt + " --batches 100000", "--batches");
}
