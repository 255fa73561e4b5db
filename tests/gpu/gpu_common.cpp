/* See gpu_common.h. */
#include "gpu_common.h"
#include "common.h"
#include "moe_router.h"
#include "trainer.h"

#include <algorithm>
#include <cstdlib>
#include <numeric>

namespace gpu_test {

bool fake_gpu() { return std::getenv("MOE_TEST_GPU_FAKE_CPU") != nullptr; }
std::string gpu_device() { return fake_gpu() ? "cpu" : "cuda"; }

std::unique_ptr<moe::Backend> gpu_backend(const std::string& dtype) {
    moe::TrainConfig tc;
    tc.device = gpu_device();
    tc.dtype = fake_gpu() ? "fp32" : dtype;  // the self-check's CPU stand-in has no bf16 mode
    return moe::make_backend(tc);
}

namespace {

// k distinct experts out of the first `range`, each drawn with weight w[e]
std::vector<int> pick(moe::Rng& rng, int k, int range, const std::vector<double>& w) {
    std::vector<int> out;
    while ((int)out.size() < k) {
        double total = 0;
        for (int e = 0; e < range; e++)
            if (std::find(out.begin(), out.end(), e) == out.end()) total += w[e];
        double r = rng.uniform() * total;
        int chosen = -1;
        for (int e = 0; e < range && chosen < 0; e++) {
            if (std::find(out.begin(), out.end(), e) != out.end()) continue;
            if (r < w[e]) chosen = e;
            r -= w[e];
        }
        if (chosen < 0)  // rounding at the end of the range: the last free expert
            for (int e = range - 1; e >= 0 && chosen < 0; e--)
                if (std::find(out.begin(), out.end(), e) == out.end()) chosen = e;
        out.push_back(chosen);
    }
    return out;
}

}  // namespace

PlanData make_plan(int N, int E, int k, const std::string& kind, uint64_t seed) {
    if (kind == "one") k = 1;
    moe::Rng rng(seed);
    moe::Routing r;
    r.N = N; r.E = E; r.M = N * k;
    std::vector<double> w(E, 1.0);
    int range = E;
    if (kind == "skewed") range = std::max(k, E / 4);
    if (kind == "zipf") for (int e = 0; e < E; e++) w[e] = 1.0 / (e + 1);
    r.routed.assign(E, 0.0);
    for (int n = 0; n < N; n++) {
        std::vector<int> ex = kind == "one" ? std::vector<int>{E / 2} : pick(rng, k, range, w);
        float sum = 0;
        std::vector<float> g(k);
        for (float& x : g) sum += (x = 0.05f + rng.uniform());
        for (int j = 0; j < k; j++) {
            r.choice_token.push_back(n);
            r.choice_expert.push_back(ex[j]);
            r.choice_gate.push_back(g[j] / sum);
            r.kept.push_back(kind == "drops" ? (rng.uniform() >= 0.35f) : 1);
            r.routed[ex[j]] += 1;
        }
    }
    moe::build_plan(r);
    const moe::DispatchPlan& p = r.plan;
    PlanData d;
    d.N = N; d.E = E;
    d.offsets = p.offsets; d.token = p.token; d.gate = p.gate;
    d.tok_offsets = p.tok_offsets; d.tok_assign = p.tok_assign;
    return d;
}

std::vector<moe::GroupBlock> expert_blocks(const PlanData& p) {
    std::vector<moe::GroupBlock> b;
    for (int e = 0; e < p.E; e++) b.push_back({e, p.offsets[e], p.offsets[e + 1] - p.offsets[e]});
    return b;
}

std::vector<moe::GroupBlock> ep_blocks(int rows, int E, int ranks, bool shuffle, uint64_t seed) {
    moe::Rng rng(seed);
    const int nb = ranks * E;
    // nb - 1 random cut points in [0, rows]; equal cuts make zero-row blocks
    std::vector<int> cuts(nb - 1);
    for (int& c : cuts) c = (int)(rng.next_u32() % (uint32_t)(rows + 1));
    if (nb > 2) cuts[0] = cuts[1];  // at least one zero-row block
    std::sort(cuts.begin(), cuts.end());
    cuts.insert(cuts.begin(), 0);
    cuts.push_back(rows);
    std::vector<moe::GroupBlock> b;
    for (int r = 0; r < ranks; r++) {
        std::vector<int> order(E);
        std::iota(order.begin(), order.end(), 0);
        if (shuffle)
            for (int i = E - 1; i > 0; i--) std::swap(order[i], order[rng.next_u32() % (uint32_t)(i + 1)]);
        for (int j = 0; j < E; j++) {
            const int i = r * E + j;
            b.push_back({order[j], cuts[i], cuts[i + 1] - cuts[i]});
        }
    }
    return b;
}

}  // namespace gpu_test
