/* CPU twins of the Backend routing ops: the host routing functions (moe_router.cpp) on arrays. */
#include "router_ops.h"
#include "moe_router.h"

#include <algorithm>
#include <numeric>

namespace moe {

static std::vector<float> copy_of(const float* p, size_t n) { return std::vector<float>(p, p + n); }

// A Routing of token-choice top-k: N, E, M = N*k, choice m of token m / k; with the choices, their
// routed counts (E); logits and scores (N, E) where given.
static Routing topk_routing(const TopkRouterArgs& a, const int* choice_expert, const float* z = nullptr,
                            const float* s = nullptr) {
    Routing r;
    r.N = a.N;
    r.E = a.E;
    r.M = a.N * a.k;
    r.choice_token.resize(r.M);
    for (int m = 0; m < r.M; m++) r.choice_token[m] = m / a.k;
    if (choice_expert) {
        r.choice_expert.assign(choice_expert, choice_expert + r.M);
        r.routed.assign(a.E, 0.0);
        for (int m = 0; m < r.M; m++) r.routed[r.choice_expert[m]] += 1.0;
    }
    if (z) r.z = copy_of(z, (size_t)a.N * a.E);
    if (s) r.s = copy_of(s, (size_t)a.N * a.E);
    return r;
}

// The balancing configuration and global counts the host functions take.
static BalanceConfig balance_config(const RouterLossArgs& l) {
    BalanceConfig b;
    b.aux_loss = l.aux_loss;
    b.aux_scope = l.aux_seq_len > 0 ? "sequence" : l.aux_counts ? "global" : "micro_batch";
    b.z_loss = l.z_loss;
    return b;
}
static std::vector<double> global_counts(const RouterLossArgs& l, int E) {
    return l.aux_counts ? std::vector<double>(l.aux_counts, l.aux_counts + E) : std::vector<double>{};
}

void router_topk_forward_cpu(float* s, int* choice_expert, float* choice_gate, const float* z, const float* bias,
                             const TopkRouterArgs& a) {
    const size_t NE = (size_t)a.N * a.E;
    Routing r = topk_routing(a, nullptr);
    router_scores(r.s, copy_of(z, NE), a.N, a.E, a.sigmoid);
    std::vector<float> sel = r.s;
    if (bias)
        for (int n = 0; n < a.N; n++) for (int e = 0; e < a.E; e++) sel[(size_t)n * a.E + e] += bias[e];
    select_topk(r, sel, a.k, a.groups, a.topk_groups);
    choice_gates(r, a.k, a.normalize, a.scale, true);
    std::copy(r.s.begin(), r.s.end(), s);
    std::copy(r.choice_expert.begin(), r.choice_expert.end(), choice_expert);
    std::copy(r.choice_gate.begin(), r.choice_gate.end(), choice_gate);
}

void router_plan_build_cpu(int* offsets, int* routed, int* token, float* gate, int* choice, int* tok_offsets,
                           int* tok_assign, const int* choice_expert, const float* choice_gate,
                           const TopkRouterArgs& a) {
    Routing r = topk_routing(a, choice_expert);
    r.choice_gate.assign(choice_gate, choice_gate + r.M);
    apply_capacity(r, a.capacity, a.drop_by_probs);
    build_plan(r);
    const DispatchPlan& p = r.plan;
    for (int e = 0; e < a.E; e++) routed[e] = (int)r.routed[e];
    std::copy(p.offsets.begin(), p.offsets.end(), offsets);
    std::copy(p.token.begin(), p.token.end(), token);
    std::copy(p.gate.begin(), p.gate.end(), gate);
    std::copy(p.choice.begin(), p.choice.end(), choice);
    std::copy(p.tok_offsets.begin(), p.tok_offsets.end(), tok_offsets);
    std::copy(p.tok_assign.begin(), p.tok_assign.end(), tok_assign);
}

RouterLosses router_balance_forward_cpu(const float* z, const float* s, const int* choice_expert,
                                        const float* choice_gate, const TopkRouterArgs& a, const RouterLossArgs& l) {
    Routing r = topk_routing(a, choice_expert, z, s);
    MoeStats st;
    balance_forward(st, r, balance_config(l), a.k, l.aux_seq_len, global_counts(l, a.E));
    std::vector<float> top1(a.N, 0.0f);
    for (int m = 0; m < r.M; m++) top1[r.choice_token[m]] = std::max(top1[r.choice_token[m]], choice_gate[m]);
    RouterLosses out;
    out.aux = st.aux;
    out.z = st.z;
    out.z_sum = st.z_mean_sum;
    out.top1_gate_sum = std::accumulate(top1.begin(), top1.end(), 0.0);
    return out;
}

void router_topk_backward_cpu(float* dz, const float* dgate, const int* choice, int A, const float* z,
                              const float* s, const int* choice_expert, const TopkRouterArgs& a,
                              const RouterLossArgs& l, float dloss_scale) {
    const size_t NE = (size_t)a.N * a.E;
    Routing r = topk_routing(a, choice_expert, z, s);
    std::vector<float> dchoice(r.M, 0.0f);
    for (int i = 0; i < A; i++) dchoice[choice[i]] = dgate[i];
    BalanceGrads bg;   // no dzc / dstd: they belong to the load loss, which these ops do not take
    bg.ds.assign(NE, 0.0f);
    bg.dz.assign(NE, 0.0f);
    choice_gates_backward(bg.ds, r, dchoice, a.k, a.normalize, a.scale, true);
    balance_backward(bg, r, balance_config(l), a.k, l.aux_seq_len, global_counts(l, a.E), dloss_scale);
    router_scores_backward(bg.dz, bg.ds, r.s, a.N, a.E, a.sigmoid);
    std::copy(bg.dz.begin(), bg.dz.end(), dz);
}

}  // namespace moe
