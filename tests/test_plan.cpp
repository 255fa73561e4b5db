/* `moe plan` (src/plan.h, docs/plan.md): parameter counts equal the real GPT's for every layout
   the model builds, per-rank counts add up over the EP group (and equal the slices a GPT of that EP
   rank owns), dense FLOPs are 6 x params x tokens plus attention, all-to-all bytes grow as
   (EP-1)/EP, memory falls with EP, and the CLI prints one row per valid EP and rejects bad input. */
#include <doctest/doctest.h>

#include "backend.h"
#include "config.h"
#include "dist.h"
#include "model.h"
#include "plan.h"
#include "upcycle.h"
#include "test_util.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <regex>
#include <sstream>

using namespace moe;
using namespace moe_test;

namespace {

Config cfg_of(const std::string& model, const std::string& router = "", const std::string& train = "") {
    return parse_config(fmt::format("model: {{{}}}\nrouter: {{{}}}\ntrain: {{{}}}\n", model, router, train),
                        "test_plan");
}

const char* kBase = "vocab_size: 64, seq_len: 16, n_layer: 3, n_head: 2, d_model: 16, d_ff: 48";

// small configs covering every tensor layout of src/model.cpp and src/moe_layer.cpp
std::vector<std::pair<std::string, Config>> layouts() {
    auto moe = [](const std::string& m, const std::string& router = "") {
        return cfg_of(fmt::format("{}, moe: {{{}}}", kBase, m), router);
    };
    return {
        {"dense", cfg_of(kBase)},
        {"gelu + shared", moe("experts: 8, top_k: 2, expert_ff: 24, shared_experts: 1, shared_ff: 20")},
        {"swiglu + 2 shared", moe("experts: 4, top_k: 2, expert_ff: 12, activation: swiglu, shared_experts: 2, shared_ff: 8")},
        {"every 2 after 1 dense", moe("experts: 8, top_k: 1, expert_ff: 8, every: 2, first_dense: 1")},
        {"gaussian noise", moe("experts: 8, top_k: 2, expert_ff: 8", "noise: gaussian")},
        {"soft", moe("experts: 4, top_k: 1, expert_ff: 8", "type: soft, soft_slots: 3")},
        {"hash", moe("experts: 4, top_k: 1, expert_ff: 8", "type: hash")},
        {"expert choice", moe("experts: 8, top_k: 1, expert_ff: 8", "type: expert_choice, expert_choice_capacity: 2.0")},
    };
}

// Dist's EP fields as the GPT constructor reads them, restored on scope exit.
struct EpRankScope {
    int ep, ep_rank;
    EpRankScope(int e, int r) : ep(Dist::get().ep), ep_rank(Dist::get().ep_rank) {
        Dist::get().ep = e;
        Dist::get().ep_rank = r;
    }
    ~EpRankScope() {
        Dist::get().ep = ep;
        Dist::get().ep_rank = ep_rank;
    }
};

PlanOptions opts(int gpus, const std::string& gpu = "h100") {
    PlanOptions o;
    o.gpus = gpus;
    o.gpu = *find_gpu(gpu);
    return o;
}

}  // namespace

TEST_CASE("plan: parameter counts equal GPT::num_params and its tensors") {
    auto be = make_cpu_backend(1);
    for (const auto& [name, cfg] : layouts()) {
        INFO(name);
        GPT model(cfg, *be);
        const ParamCounts pc = count_params(cfg);
        CHECK(pc.total == (int64_t)model.num_params());
        int64_t routed = 0, shared = 0, router = 0;
        for (const ParamTensor& p : model.params()) {
            if (p.name.find(".moe.experts.") != std::string::npos) routed += (int64_t)p.numel;
            if (p.name.find(".moe.shared.") != std::string::npos) shared += (int64_t)p.numel;
            if (p.name.find(".moe.router.") != std::string::npos) router += (int64_t)p.numel;
        }
        CHECK(pc.routed == routed);
        CHECK(pc.shared == shared);
        CHECK(pc.router == router);
        CHECK(pc.replicated == pc.total - pc.routed);
        CHECK(pc.moe_layers == (int)model.moe_layers().size());
        double k = 0;
        CHECK(pc.active == doctest::Approx(active_params_per_token(model, &k)));
        CHECK(pc.experts_per_token == doctest::Approx(k));
    }
}

TEST_CASE("plan: per-rank parameters add up over the EP group and match the slices a GPT rank owns") {
    auto be = make_cpu_backend(1);
    for (const auto& [name, cfg] : layouts()) {
        INFO(name);
        const ParamCounts pc = count_params(cfg);
        const std::vector<int> eps = valid_ep(cfg, 8);
        if (!cfg.model.moe.enabled) CHECK(eps == std::vector<int>{1});
        for (int ep : eps) {
            INFO("ep " << ep);
            CHECK(cfg.model.moe.experts % ep == 0);
            const int64_t per_rank = params_per_rank(cfg, ep);
            // EP ranks hold the replicated parameters once each and 1/EP of the experts
            CHECK((per_rank - pc.replicated) * ep == pc.routed);
            CHECK(per_rank <= pc.total);
            for (int r = 0; r < ep; r++) {
                EpRankScope scope(ep, r);
                GPT model(cfg, *be);
                int64_t owned = 0;
                bool any_sharded = false;
                for (const ParamTensor& p : model.params()) {
                    owned += (int64_t)(p.sharded ? p.owned_numel : p.numel);
                    any_sharded |= p.sharded;
                }
                CHECK(any_sharded == (ep > 1));
                CHECK(owned == per_rank);
            }
        }
    }
    // 12 GPUs, 8 experts: EP in {1, 2, 4}
    CHECK(valid_ep(layouts()[1].second, 12) == std::vector<int>{1, 2, 4});
    CHECK(valid_ep(layouts()[1].second, 64) == std::vector<int>{1, 2, 4, 8});
    CHECK(valid_ep(layouts()[1].second, 1) == std::vector<int>{1});
}

TEST_CASE("plan: FLOPs of a dense model are 6 x params x tokens plus attention") {
    // GPT-2 124M
    const Config cfg = cfg_of("vocab_size: 50257, seq_len: 1024, n_layer: 12, n_head: 12, d_model: 768, d_ff: 3072",
                              "", "batch_size: 4, grad_accum: 2");
    const double V = 50257, T = 1024, L = 12, C = 768, F = 3072, tokens = 4 * 1024 * 2;
    const ParamCounts pc = count_params(cfg);
    CHECK(pc.total == 124439808);   // GPT-2 small without llm.c's vocabulary padding
    const double attention = 3 * 2 * T * C * L * tokens;   // forward 2TC per layer (causal half of 4TC), x3
    // exact: the matmul parameters (tied head, no wpe, no biases or norms) twice per token, x3
    const double matmul = V * C + L * (4 * C * C + 2 * F * C);
    CHECK(flops_per_rank_step(cfg) == doctest::Approx(6 * matmul * tokens + attention).epsilon(1e-12));
    // the rule of thumb on all parameters: within 1% (wpe, biases and norms are not matmuls)
    CHECK(flops_per_rank_step(cfg) == doctest::Approx(6 * (double)pc.total * tokens + attention).epsilon(0.01));
    CHECK(forward_flops_per_token(cfg).router == 0);
    CHECK(forward_flops_per_token(cfg).routed == 0);
}

TEST_CASE("plan: MoE FLOPs count only the active experts") {
    const std::string m = fmt::format("{}, moe: {{experts: 8, top_k: 2, expert_ff: 24, shared_experts: 1, shared_ff: 20}}", kBase);
    const Config a = cfg_of(m);
    const Config b = cfg_of(m, "", "batch_size: 4");   // half the default micro-batch of 8
    const Config wide = cfg_of(fmt::format("{}, moe: {{experts: 16, top_k: 2, expert_ff: 24, shared_experts: 1, shared_ff: 20}}", kBase));
    const FlopsPerToken fa = forward_flops_per_token(a), fw = forward_flops_per_token(wide);
    const double C = 16, L = 3;
    CHECK(fa.routed == doctest::Approx(L * 2 * 2 * (24 * C + 24 * C)));
    CHECK(fa.shared == doctest::Approx(L * 2 * (20 * C + 20 * C)));
    CHECK(fa.router == doctest::Approx(L * 2 * 8 * C));
    CHECK(fw.routed == fa.routed);                      // twice the experts, same k: same expert FLOPs
    CHECK(fw.router == doctest::Approx(2 * fa.router));
    CHECK(flops_per_rank_step(a) == doctest::Approx(2 * flops_per_rank_step(b)));
    CHECK(flops_per_rank_step(a) == doctest::Approx(3 * fa.total() * 8 * 16));
}

TEST_CASE("plan: all-to-all bytes are zero at EP 1 and grow as (EP-1)/EP") {
    const Config cfg = cfg_of(fmt::format("{}, moe: {{experts: 8, top_k: 2, expert_ff: 24}}", kBase), "",
                              "batch_size: 4, grad_accum: 3");
    CHECK(alltoall_bytes_per_step(cfg, 1) == 0);
    // 4 transfers x 3 MoE layers x 3 micro-batches x (4*16 tokens x 2 rows x 1/2) x 16 values x 2 bytes
    CHECK(alltoall_bytes_per_step(cfg, 2) == doctest::Approx(4.0 * 3 * 3 * (64 * 2 * 0.5) * 16 * 2));
    const double half = alltoall_bytes_per_step(cfg, 2);
    for (int ep : {2, 4, 8}) {
        INFO("ep " << ep);
        CHECK(alltoall_bytes_per_step(cfg, ep) == doctest::Approx(half * 2.0 * (ep - 1) / ep));
        CHECK(alltoall_bytes_per_step(cfg, ep) > alltoall_bytes_per_step(cfg, ep / 2));
    }
    CHECK(alltoall_bytes_per_step(layouts()[0].second, 1) == 0);
}

TEST_CASE("plan: gradient all-reduce bytes are ring all-reduces over the right groups") {
    const Config cfg = cfg_of(fmt::format("{}, moe: {{experts: 8, top_k: 2, expert_ff: 24}}", kBase));
    const ParamCounts pc = count_params(cfg);
    const double rep = (double)pc.replicated * 4, exp = (double)pc.routed * 4;
    CHECK(allreduce_bytes_per_step(cfg, 1, 1) == 0);
    CHECK(allreduce_bytes_per_step(cfg, 8, 1) == doctest::Approx(2.0 * 7 / 8 * (rep + exp)));
    CHECK(allreduce_bytes_per_step(cfg, 8, 2) == doctest::Approx(2.0 * 7 / 8 * rep + 2.0 * 3 / 4 * exp / 2));
    CHECK(allreduce_bytes_per_step(cfg, 8, 8) == doctest::Approx(2.0 * 7 / 8 * rep));   // DP 1: experts not reduced
}

TEST_CASE("plan: memory falls with EP for an MoE config; one best row") {
    const Config cfg = cfg_of(fmt::format("{}, moe: {{experts: 8, top_k: 2, expert_ff: 24, shared_experts: 1, shared_ff: 20}}", kBase));
    const std::vector<PlanRow> rows = plan_rows(cfg, opts(16));
    REQUIRE(rows.size() == 4);   // EP 1, 2, 4, 8
    int best = 0;
    for (size_t i = 0; i < rows.size(); i++) {
        CHECK(rows[i].dp * rows[i].ep == 16);
        CHECK(rows[i].memory_bytes == doctest::Approx(kStateBytesPerParam * rows[i].params + rows[i].activation_bytes));
        CHECK(rows[i].activation_bytes == rows[0].activation_bytes);
        CHECK(rows[i].step_s == doctest::Approx(rows[i].compute_s + rows[i].comm_s));
        best += rows[i].best;
        if (i > 0) {
            CHECK(rows[i].memory_bytes < rows[i - 1].memory_bytes);
            CHECK(rows[i].alltoall_bytes > rows[i - 1].alltoall_bytes);
        }
    }
    CHECK(best == 1);

    // the large README config on 64 GPUs: computed without allocating 39B parameters
    const Config large = load_config("configs/plan/gpt_moe_large.yaml");
    const std::vector<PlanRow> big = plan_rows(large, opts(64, "h200"));
    REQUIRE(big.size() == 7);   // EP 1, 2, 4, ..., 64
    for (size_t i = 1; i < big.size(); i++) CHECK(big[i].memory_bytes < big[i - 1].memory_bytes);
    CHECK(count_params(large).total > 30e9);
    // nothing fits 80 GB at batch 4: the row closest to fitting is marked
    const std::vector<PlanRow> h100 = plan_rows(large, opts(64));
    for (const PlanRow& r : h100) CHECK(r.fits == false);
    CHECK(h100.back().best);
}

TEST_CASE("plan: compute and communication time") {
    const Config cfg = cfg_of(fmt::format("{}, moe: {{experts: 8, top_k: 2, expert_ff: 24}}", kBase));
    PlanOptions o = opts(8, "a100");
    o.mfu = 0.5;
    o.link_gbps = 100;
    for (const PlanRow& r : plan_rows(cfg, o)) {
        CHECK(r.compute_s == doctest::Approx(r.flops / (312e12 * 0.5)));
        CHECK(r.comm_s == doctest::Approx((r.alltoall_bytes + r.allreduce_bytes) / 12.5e9));
        CHECK(r.comm_bound == (r.comm_s > r.compute_s));
        CHECK(r.fits == (r.memory_bytes <= 0.9 * 80e9));
    }
    CHECK(find_gpu("h100")->peak_tflops == 989);
    CHECK(find_gpu("h200")->peak_tflops == 989);
    CHECK(find_gpu("a100")->peak_tflops == 312);
    CHECK(find_gpu("v100") == nullptr);
}

TEST_CASE("plan: CLI prints a row per valid EP and rejects bad input") {
    TempDir dir;
    const std::string cfg = dir / "moe.yaml";
    std::ofstream(cfg) << fmt::format("model: {{{}, moe: {{experts: 8, top_k: 2, expert_ff: 24}}}}\n", kBase);
    auto ep_rows = [](const std::string& out) {
        std::vector<int> eps;
        std::istringstream in(out);
        std::string line;
        std::smatch m;
        static const std::regex row(R"(^[ *]\s+(\d+)\s+(\d+)\s)");
        while (std::getline(in, line))
            if (std::regex_search(line, m, row)) eps.push_back(std::stoi(m[1]));
        return eps;
    };

    RunResult r = run(moe_bin() + " plan " + cfg + " --gpus 12");
    INFO(r.output);
    CHECK(r.status == 0);
    CHECK(ep_rows(r.output) == std::vector<int>{1, 2, 4});
    CHECK(r.output.find("* best: EP") != std::string::npos);

    r = run(moe_bin() + " plan " + cfg + " --gpus 64 --gpu a100 --mfu 0.3 --link-gbps 200 --json");
    CHECK(r.status == 0);
    const nlohmann::json j = nlohmann::json::parse(r.output);
    CHECK(j["rows"].size() == 4);
    CHECK(j["gpu"] == "a100");
    CHECK(j["peak_tflops"] == 312);
    CHECK(j["global_batch_sequences"] == 8 * 64);
    int best = 0;
    for (const auto& row : j["rows"]) best += row["best"].get<bool>();
    CHECK(best == 1);

    r = run(moe_bin() + " plan " + cfg + " --gpus 8 --set model.moe.experts=4 --gpu H200");
    CHECK(r.status == 0);
    CHECK(ep_rows(r.output) == std::vector<int>{1, 2, 4});

    r = run(moe_bin() + " plan configs/plan/gpt_moe_large.yaml --gpus 64");
    CHECK(r.status == 0);
    CHECK(ep_rows(r.output) == std::vector<int>{1, 2, 4, 8, 16, 32, 64});
    CHECK(r.output.find("38.93B parameters") != std::string::npos);

    r = run(moe_bin() + " plan configs/dense.yaml --gpus 4");
    CHECK(r.status == 0);
    CHECK(ep_rows(r.output) == std::vector<int>{1});

    for (auto [args, flag] : std::vector<std::pair<std::string, std::string>>{
             {"--gpus 0", "--gpus"}, {"--gpus -3", "--gpus"}, {"--gpus abc", "--gpus"}, {"--gpus 2.5", "--gpus"},
             {"--gpus 99999999999", "--gpus"}, {"--gpus 8 --gpu v100", "--gpu"}, {"--gpus 8 --mfu 0", "--mfu"},
             {"--gpus 8 --mfu 1.5", "--mfu"}, {"--gpus 8 --mfu x", "--mfu"}, {"--gpus 8 --link-gbps 0", "--link-gbps"},
             {"--gpus 8 --link-gbps nan", "--link-gbps"}, {"--gpus 8 --link-gbps 1e999", "--link-gbps"}}) {
        RunResult e = run(moe_bin() + " plan " + cfg + " " + args);
        INFO(args << "\n" << e.output);
        CHECK(e.status == 1);
        CHECK(e.output.rfind("error: ", 0) == 0);
        CHECK(e.output.find("(" + flag + ")") != std::string::npos);
        CHECK(e.output.find('\n') == e.output.size() - 1);   // one line
    }
    RunResult e = run(moe_bin() + " plan " + cfg);   // --gpus is required: usage error
    CHECK(e.status == 2);
    e = run(moe_bin() + " plan " + dir / "missing.yaml" + " --gpus 8");
    CHECK(e.status == 1);
    CHECK(e.output.find("error: ") != std::string::npos);
    e = run(moe_bin() + " plan " + cfg + " --gpus 8 --set model.moe.top_k=99");
    CHECK(e.status == 1);
    CHECK(e.output.find("model.moe.top_k") != std::string::npos);
}
