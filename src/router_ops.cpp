/* CPU twins of the Backend routing ops. The per-token ops run fused, one pass over the tokens
   with the per-token pieces of moe_router.h (score_row, topk_row, gates_row, ...), reading and
   writing the backend's arrays in place; the plan build and the statistics call the host routing
   functions. Either way the float operations are the host functions' (tests/test_router_ops.cpp
   checks the bits). With 64 experts the old copies of (N, E) arrays into a Routing and the
   serial passes between them cost ~1.5 ms of each layer's ~2 ms routing at 2 threads. */
#include "router_ops.h"
#include "moe_router.h"

#include <algorithm>
#include <numeric>

namespace moe {

// Choices per expert (E), as doubles (Routing::routed)
static std::vector<double> routed_counts(const int* choice_expert, int M, int E) {
    std::vector<double> routed(E, 0.0);
    for (int m = 0; m < M; m++) routed[choice_expert[m]] += 1.0;
    return routed;
}

// A Routing of token-choice top-k for the plan build: N, E, M = N*k, choice m of token m / k, the
// choices and their routed counts (E).
static Routing topk_routing(const TopkRouterArgs& a, const int* choice_expert) {
    Routing r;
    r.N = a.N;
    r.E = a.E;
    r.M = a.N * a.k;
    r.choice_token.resize(r.M);
    for (int m = 0; m < r.M; m++) r.choice_token[m] = m / a.k;
    r.choice_expert.assign(choice_expert, choice_expert + r.M);
    r.routed = routed_counts(choice_expert, r.M, a.E);
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
    const int E = a.E, k = a.k;
    #pragma omp parallel
    {
        TopkScratch w;
        std::vector<float> sel(bias ? E : 0);
        #pragma omp for schedule(static)
        for (int n = 0; n < a.N; n++) {
            float* sr = s + (size_t)n * E;   // (E)
            score_row(sr, z + (size_t)n * E, E, a.sigmoid);
            const float* v = sr;
            if (bias) {
                for (int e = 0; e < E; e++) sel[e] = sr[e] + bias[e];
                v = sel.data();
            }
            topk_row(choice_expert + (size_t)n * k, v, E, k, a.groups, a.topk_groups, w);
            gates_row(choice_gate + (size_t)n * k, sr, choice_expert + (size_t)n * k, k, a.normalize, a.scale);
        }
    }
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
    const int M = a.N * a.k;
    const std::vector<double> routed = routed_counts(choice_expert, M, a.E);
    MoeStats st;
    aux_z_terms(st, z, s, nullptr, choice_expert, M, routed, balance_config(l), a.k, a.N, a.E, l.aux_seq_len,
                global_counts(l, a.E));
    RouterLosses out;
    out.aux = st.aux;
    out.z = st.z;
    out.z_sum = st.z_mean_sum;
    for (int n = 0; n < a.N; n++) {   // the largest gate of each token, summed in token order
        float top1 = 0.0f;
        for (int j = 0; j < a.k; j++) top1 = std::max(top1, choice_gate[(size_t)n * a.k + j]);
        out.top1_gate_sum += top1;
    }
    return out;
}

void router_topk_backward_cpu(float* dz, const float* dgate, const int* choice, int A, const float* z,
                              const float* s, const int* choice_expert, const TopkRouterArgs& a,
                              const RouterLossArgs& l, float dloss_scale) {
    const int N = a.N, E = a.E, k = a.k, M = N * k;
    std::vector<float> dchoice(M, 0.0f);   // the plan's gate gradients by router choice
    for (int i = 0; i < A; i++) dchoice[choice[i]] = dgate[i];
    const BalanceConfig bal = balance_config(l);
    const std::vector<double> routed =
        bal.aux_loss > 0 && bal.aux_scope == "micro_batch" ? routed_counts(choice_expert, M, E) : std::vector<double>{};
    const std::vector<float> daux = aux_score_grads(bal, nullptr, choice_expert, M, k, N, E, l.aux_seq_len, routed,
                                                    global_counts(l, E), dloss_scale);
    const double zcoef = dloss_scale * bal.z_loss * 2.0;
    // per token, as the host functions: ds = gates' gradient + aux term; dz = z-loss term + the
    // scores' backward of ds
    #pragma omp parallel
    {
        std::vector<float> ds(E), e(E);
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            const float* sr = s + (size_t)n * E;
            float* dzr = dz + (size_t)n * E;   // (E)
            std::fill(ds.begin(), ds.end(), 0.0f);
            gates_backward_row(ds.data(), sr, choice_expert + (size_t)n * k, &dchoice[(size_t)n * k], k, a.normalize,
                               a.scale);
            if (const float* d = aux_grad_row(daux, n, l.aux_seq_len, E))
                for (int i = 0; i < E; i++) ds[i] += d[i];
            std::fill(dzr, dzr + E, 0.0f);
            if (bal.z_loss > 0) z_loss_backward_row(dzr, z + (size_t)n * E, E, zcoef, N, e.data());
            scores_backward_row(dzr, ds.data(), sr, E, a.sigmoid);
        }
    }
}

}  // namespace moe
