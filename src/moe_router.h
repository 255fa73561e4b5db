/* Host-side routing math of the MoE layer (docs/moe.md): scores, top-k / group-limited /
   Sinkhorn / expert-choice / hash selection, gates, capacity dropping, the dispatch plan, the
   balancing terms, and the backward of all of it down to the router logits. Pure functions on
   (N, E) arrays: no backend, no parameters, so they are unit-tested directly. */
#pragma once
#include "moe.h"

namespace moe {

// s = softmax(z) or sigmoid(z), row by row. (N, E)
void router_scores(std::vector<float>& s, const std::vector<float>& z, int N, int E, bool sigmoid);

// Token choice: top-k of sel per token (ties: lower index); with groups > 1 only experts of the
// best topk_groups groups (group score = sum of its top max(1, k/topk_groups) sel values).
// Fills choice_token/choice_expert (M = N*k, m = n*k + j) and r.routed.
void select_topk(Routing& r, const std::vector<float>& sel, int k, int groups, int topk_groups);
// Sinkhorn-balanced assignment matrix from logits (docs/moe.md), used as sel in training.
std::vector<float> sinkhorn_balance(const std::vector<float>& z, int N, int E);
// Expert choice: each expert takes its top `cap` tokens by s[:, e] (M = E*cap, m = e*cap + r).
void select_expert_choice(Routing& r, int cap);
// Hash: expert = table[token] (M = N).
void select_hash(Routing& r, const int* tokens, const std::vector<int32_t>& table);

// Gate of each choice: s[n, e] (normalised over the token's k choices if asked), times scale.
void choice_gates(Routing& r, int k, bool normalize, float scale, bool token_choice);
// Capacity: keep at most `cap` choices per expert (cap <= 0: keep all); by_probs keeps the
// largest gates (ties: earlier choice), else the earliest choices.
void apply_capacity(Routing& r, int cap, bool by_probs);
// The dispatch plan from the kept choices (grouped by expert, by token within) + token CSR.
void build_plan(Routing& r);

// Balancing terms on the routing (values include their coefficients). Gradients accumulate:
// ds (N, E) w.r.t. scores, dz (N, E) w.r.t. routing logits, dzc / dstd (N, E) w.r.t. clean
// logits and noise std (load loss). `global_routed` (E) replaces the micro-batch counts for
// aux scope "global" when non-empty. k is the number of choices per token (top_k).
struct BalanceGrads {
    std::vector<float> ds, dz, dzc, dstd;
};
void balance_forward(MoeStats& st, const Routing& r, const BalanceConfig& bal, int k, int T,
                     const std::vector<double>& global_routed);
void balance_backward(BalanceGrads& g, const Routing& r, const BalanceConfig& bal, int k, int T,
                      const std::vector<double>& global_routed, float dloss_scale);

// d(loss)/d(gate of each choice) (M) -> ds (N, E) accumulated, through normalisation and scale.
void choice_gates_backward(std::vector<float>& ds, const Routing& r, const std::vector<float>& dgate,
                           int k, bool normalize, float scale, bool token_choice);
// ds (N, E) -> dz (N, E) accumulated, through softmax or sigmoid.
void router_scores_backward(std::vector<float>& dz, const std::vector<float>& ds, const std::vector<float>& s,
                            int N, int E, bool sigmoid);

// Per-token pieces of the functions above, which loop over tokens with them; the fused CPU routing
// ops (router_ops.cpp) call the same pieces, so both paths do the same float operations.
struct TopkScratch {                  // per-thread scratch of topk_row
    std::vector<uint8_t> allowed, gallowed, keep;
    std::vector<float> vals, gscore;
    std::vector<uint16_t> left;       // AVX-512 path: a bit per expert still allowed
};
void score_row(float* s, const float* z, int E, bool sigmoid);                          // (E) <- (E)
void topk_row(int* expert, const float* sel, int E, int k, int groups, int topk_groups, TopkScratch& w);  // (k)
void gates_row(float* gate, const float* s, const int* expert, int k, bool normalize, float scale);    // (k)
void gates_backward_row(float* ds, const float* s, const int* expert, const float* dgate, int k, bool normalize,
                        float scale);                                                    // ds (E) +=
void scores_backward_row(float* dz, const float* ds, const float* s, int E, bool sigmoid);  // dz (E) +=
// log-sum-exp of z (E) in double; e (E) gets exp(z - max) and *sum their float sum
double lse_row(const float* z, int E, float* e, float* sum);
// dz (E) += the z-loss gradient of one token: coef * lse * softmax(z) / N, coef = dloss_scale * beta * 2
void z_loss_backward_row(float* dz, const float* z, int E, double coef, int N, float* e /* (E) scratch */);
// The Switch aux loss and z-loss of balance_forward on arrays (st.aux, st.z, st.z_mean_sum): z, s
// (N, E); M choices with choice_expert (M) and choice_token (M, or null: m / k); routed (E).
void aux_z_terms(MoeStats& st, const float* z, const float* s, const int* choice_token, const int* choice_expert,
                 int M, const std::vector<double>& routed, const BalanceConfig& bal, int k, int N, int E, int T,
                 const std::vector<double>& global_routed);
// d(aux)/d(s) per expert, times dloss_scale: one row (E) per sequence (aux scope "sequence": tokens
// [b*T, (b+1)*T)), else one row for every token; empty without an aux loss. choice_token null: m / k.
std::vector<float> aux_score_grads(const BalanceConfig& bal, const int* choice_token, const int* choice_expert, int M,
                                   int k, int N, int E, int T, const std::vector<double>& routed,
                                   const std::vector<double>& global_routed, float scale);
// The row of aux_score_grads' d that token n adds to its ds: the row of its sequence (seq_len > 0,
// sequence scope) or the only row; null for tokens past the last whole sequence (in no term) and
// when d is empty.
const float* aux_grad_row(const std::vector<float>& d, int n, int seq_len, int E);

// Frequency-balanced hash table: tokens by count (desc, ties by id) to the least-loaded expert.
std::vector<int32_t> balanced_hash_table(const std::vector<double>& counts, int E);

}  // namespace moe
