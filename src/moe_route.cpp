/* Routing of the MoE layer: router logits -> dispatch plan (forward) and the router's gradients
   (backward). Two implementations of the same math (docs/moe.md), chosen per configuration:
   - backend routing ops (Backend::router_*; CPU twins in router_ops.cpp = the host functions
     of moe_router.cpp, CUDA kernels in cuda/router.cu) for token-choice top-k: softmax/sigmoid,
     aux-loss-free bias, groups, normalise/scale, capacity (probs or position), dropless, Switch
     aux loss (any scope), z-loss, jitter. The plan stays in backend memory; the host reads the
     per-expert offsets and counts (2E+1 ints) and four loss/statistics numbers.
   - host routing (moe_router.cpp on downloaded logits, plan uploaded) for the rest: noisy
     top-k, expert choice, hash, Sinkhorn, importance/load losses (docs/cuda.md lists them).
   Either way the result is the same explicit plan, consumed by dispatch/combine. */
#include "moe.h"
#include "model.h"
#include "moe_router.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moe {

bool MoeLayer::routes_with_ops(const Config& cfg) {
    const RouterConfig& rc = cfg.router;
    const BalanceConfig& bal = cfg.balance;
    return rc.type == "topk" && rc.noise != "gaussian" && bal.importance_loss == 0 && bal.load_loss == 0 &&
           cfg.model.moe.top_k <= kRouterOpsMaxK && cfg.model.moe.experts <= kRouterOpsMaxE;
}

void MoeLayer::route(const float* rin, const int* tokens, int B, int T, bool training, float* w, Rng& rng) {
    if (ops_routing_) route_ops(rin, B, T, training, w);
    else route_host(rin, tokens, B, T, training, w, rng);
}

TopkRouterArgs MoeLayer::topk_args(int N, bool training) const {
    TopkRouterArgs a;
    a.N = N;
    a.E = E_;
    a.k = k_;
    a.sigmoid = rc_.score == "sigmoid";
    a.groups = rc_.groups;
    a.topk_groups = rc_.topk_groups;
    a.normalize = rc_.normalize_topk;
    a.scale = (float)rc_.scale;
    const double cf = training ? rc_.capacity_factor : rc_.eval_capacity_factor;
    a.capacity = cf > 0 ? (int)std::ceil(cf * k_ * N / E_) : 0;
    a.drop_by_probs = rc_.drop_policy == "probs";
    return a;
}

RouterLossArgs MoeLayer::loss_args(bool training) const {
    RouterLossArgs l;
    if (!training) return l;                           // statistics only
    l.aux_loss = bal_.aux_loss;
    l.aux_seq_len = bal_.aux_scope == "sequence" ? T_ : 0;
    l.aux_counts = bal_.aux_scope == "global" && !global_routed_.empty() ? global_routed_.data() : nullptr;
    l.z_loss = bal_.z_loss;
    return l;
}

// Routing by backend ops: nothing of size N crosses to the host.
void MoeLayer::route_ops(const float* rin, int B, int T, bool training, float* w) {
    const int N = B * T, E = E_;
    Routing& r = r_;
    r = Routing{};
    r.N = N; r.E = E; r.M = N * k_;
    be_.matmul_forward(z_, rin, P(w, p_router_), nullptr, N, C_, E);      // (N, E)
    if (!bias_.empty()) be_.upload(bias_dev_, bias_.data(), E * sizeof(float));
    const TopkRouterArgs a = topk_args(N, training);
    be_.router_topk_forward(s_dev_, cexp_, cgate_, z_, bias_.empty() ? nullptr : bias_dev_, a);
    be_.router_plan_build(counts_dev_, counts_dev_ + E + 1, token_, gate_, choice_dev_, tok_off_, tok_assign_,
                          cexp_, cgate_, a);
    std::vector<int> counts(2 * E + 1);                 // offsets (E+1), routed (E)
    be_.download(counts.data(), counts_dev_, counts.size() * sizeof(int));
    r.plan.N = N; r.plan.E = E;
    r.plan.offsets.assign(counts.begin(), counts.begin() + E + 1);
    r.routed.assign(counts.begin() + E + 1, counts.end());
    const RouterLosses L = be_.router_balance_forward(z_, s_dev_, cexp_, cgate_, a, loss_args(training));
    host_stale_ = true;

    MoeStats& st = stats_;
    st = MoeStats{};
    st.aux = L.aux;
    st.z = L.z;
    st.z_mean_sum = L.z_sum;
    st.top1_gate_sum = L.top1_gate_sum;
    count_plan(training);
}

// The plan's counts into the statistics, and the step's routed counts (bias controller).
void MoeLayer::count_plan(bool training) {
    const Routing& r = r_;
    MoeStats& st = stats_;
    st.routed = r.routed;
    st.kept.assign(E_, 0.0);
    for (int e = 0; e < E_; e++) st.kept[e] = r.plan.offsets[e + 1] - r.plan.offsets[e];
    st.assignments = r.M;
    st.dropped = r.M - r.plan.kept();
    st.tokens = r.N;
    if (training && !counting_)
        for (int e = 0; e < E_; e++) step_routed_[e] += r.routed[e];
}

// The whole routing on the host, read back from the backend on demand (tests, eval's domain x
// expert matrix): logits, scores, choices, kept flags, the plan.
const Routing& MoeLayer::routing() const {
    if (!host_stale_) return r_;
    Routing& r = r_;
    const int N = r.N, E = r.E, M = r.M, A = r.plan.kept();
    const size_t NE = (size_t)N * E;
    r.z.resize(NE);
    be_.download(r.z.data(), z_, NE * sizeof(float));
    r.z_clean = r.z;
    r.s.resize(NE);
    be_.download(r.s.data(), s_dev_, NE * sizeof(float));
    r.choice_token.resize(M);
    for (int m = 0; m < M; m++) r.choice_token[m] = m / k_;
    r.choice_expert.resize(M);
    be_.download(r.choice_expert.data(), cexp_, M * sizeof(int));
    r.choice_gate.resize(M);
    be_.download(r.choice_gate.data(), cgate_, M * sizeof(float));
    DispatchPlan& p = r.plan;
    p.token.resize(A); p.gate.resize(A); p.choice.resize(A); p.tok_offsets.resize(N + 1); p.tok_assign.resize(A);
    be_.download(p.token.data(), token_, A * sizeof(int));
    be_.download(p.gate.data(), gate_, A * sizeof(float));
    be_.download(p.choice.data(), choice_dev_, A * sizeof(int));
    be_.download(p.tok_offsets.data(), tok_off_, (N + 1) * sizeof(int));
    be_.download(p.tok_assign.data(), tok_assign_, A * sizeof(int));
    r.kept.assign(M, 0);
    for (int c : p.choice) r.kept[c] = 1;
    host_stale_ = false;
    return r_;
}

void MoeLayer::route_backward(float* dx, float* w, float* g, float scale) {
    const int N = B_ * T_, E = E_;
    if (ops_routing_)
        be_.router_topk_backward(dz_, dgate_, choice_dev_, r_.plan.kept(), z_, s_dev_, cexp_, topk_args(N, training_),
                                 loss_args(training_), scale);                 // dz (N, E)
    else
        route_backward_host(scale);
    float* drin = dx;
    if (rin_ != x_) { be_.zero(dxr_, (size_t)N * C_ * sizeof(float)); drin = dxr_; }
    be_.matmul_backward(drin, P(g, p_router_), nullptr, dz_, rin_, P(w, p_router_), N, C_, E);
    if (!r_.noise_std.empty())
        be_.matmul_backward(drin, P(g, p_noise_), nullptr, dpre_, rin_, P(w, p_noise_), N, C_, E);
    if (rin_ != x_) be_.mul_accumulate(dx, dxr_, jit_, (size_t)N * C_);        // x_r = x * m
}

// Host routing: the logits come down, the plan goes up.
void MoeLayer::route_host(const float* rin, const int* tokens, int B, int T, bool training, float* w, Rng& rng) {
    const int N = B * T, E = E_;
    Routing& r = r_;
    r.N = N; r.E = E;
    r.eps.clear(); r.noise_std.clear(); r.noise_pre.clear();
    if (p_router_ != SIZE_MAX) {
        be_.matmul_forward(z_, rin, P(w, p_router_), nullptr, N, C_, E);   // (N, E)
        r.z_clean.resize((size_t)N * E);
        be_.download(r.z_clean.data(), z_, r.z_clean.size() * sizeof(float));
        r.z = r.z_clean;
        if (p_noise_ != SIZE_MAX && training) {
            be_.matmul_forward(pre_, rin, P(w, p_noise_), nullptr, N, C_, E);
            r.noise_pre.resize((size_t)N * E);
            be_.download(r.noise_pre.data(), pre_, r.noise_pre.size() * sizeof(float));
            r.noise_std.resize(r.noise_pre.size());
            r.eps.resize(r.noise_pre.size());
            for (size_t i = 0; i < r.z.size(); i++) {
                float a = r.noise_pre[i];
                r.noise_std[i] = a > 20.0f ? a : std::log1p(std::exp(a));    // softplus
                r.eps[i] = rng.normal();
                r.z[i] = r.z_clean[i] + r.eps[i] * r.noise_std[i];
            }
        }
        router_scores(r.s, r.z, N, E, rc_.score == "sigmoid");
    }
    const double cf = training ? rc_.capacity_factor : rc_.eval_capacity_factor;
    const bool token_choice = rc_.type == "topk" || rc_.type == "sinkhorn";
    if (token_choice) {
        std::vector<float> sel;
        if (rc_.type == "sinkhorn" && training) {
            sel = sinkhorn_balance(r.z, N, E);
        } else {
            sel = r.s;
            if (!bias_.empty())
                for (int n = 0; n < N; n++) for (int e = 0; e < E; e++) sel[(size_t)n * E + e] += bias_[e];
        }
        select_topk(r, sel, k_, rc_.type == "topk" ? rc_.groups : 1, rc_.type == "topk" ? rc_.topk_groups : 1);
        choice_gates(r, k_, rc_.normalize_topk, (float)rc_.scale, true);
    } else if (rc_.type == "expert_choice") {
        int cap = std::min(N, (int)std::ceil(rc_.expert_choice_capacity * N / E));
        select_expert_choice(r, cap);
        choice_gates(r, k_, false, (float)rc_.scale, false);
    } else {  // hash
        select_hash(r, tokens, table_);
    }
    int cap = (cf > 0 && rc_.type != "expert_choice") ? (int)std::ceil(cf * (rc_.type == "hash" ? 1 : k_) * N / E) : 0;
    apply_capacity(r, cap, rc_.drop_policy == "probs");
    build_plan(r);

    // statistics and balancing terms
    MoeStats& st = stats_;
    st = MoeStats{};
    if (training && p_router_ != SIZE_MAX) balance_forward(st, r, bal_, k_, T, global_routed_);
    else if (!r.z.empty()) {
        BalanceConfig none;
        balance_forward(st, r, none, k_, T, {});
    }
    std::vector<float> top1(N, 0.0f);
    for (int m = 0; m < r.M; m++) top1[r.choice_token[m]] = std::max(top1[r.choice_token[m]], r.choice_gate[m]);
    st.top1_gate_sum = std::accumulate(top1.begin(), top1.end(), 0.0);
    count_plan(training);
    const DispatchPlan& p = r.plan;
    const int A = p.kept();
    be_.upload(token_, p.token.data(), A * sizeof(int));
    be_.upload(gate_, p.gate.data(), A * sizeof(float));
    be_.upload(tok_off_, p.tok_offsets.data(), (N + 1) * sizeof(int));
    be_.upload(tok_assign_, p.tok_assign.data(), A * sizeof(int));
}

// dz_ (and dpre_ with noise) from the host routing functions.
void MoeLayer::route_backward_host(float scale) {
    const int N = B_ * T_, E = E_;
    const DispatchPlan& p = r_.plan;
    const int A = p.kept();
    const Routing& r = r_;
    std::vector<float> dgate_a(A), dchoice(r.M, 0.0f);
    be_.download(dgate_a.data(), dgate_, A * sizeof(float));
    for (int a = 0; a < A; a++) dchoice[p.choice[a]] = dgate_a[a];
    BalanceGrads bg;
    bg.ds.assign((size_t)N * E, 0.0f);
    bg.dz.assign((size_t)N * E, 0.0f);
    bg.dzc.assign((size_t)N * E, 0.0f);
    bg.dstd.assign((size_t)N * E, 0.0f);
    const bool token_choice = rc_.type != "expert_choice";
    choice_gates_backward(bg.ds, r, dchoice, k_, token_choice && rc_.normalize_topk, (float)rc_.scale, token_choice);
    if (training_) balance_backward(bg, r, bal_, k_, T_, global_routed_, scale);
    router_scores_backward(bg.dz, bg.ds, r.s, N, E, rc_.score == "sigmoid");
    const bool noisy = !r.noise_std.empty();
    std::vector<float> dpre;
    if (noisy) {
        dpre.resize((size_t)N * E);
        for (size_t i = 0; i < dpre.size(); i++) {
            float dstd = bg.dz[i] * r.eps[i] + bg.dstd[i];
            dpre[i] = dstd / (1.0f + std::exp(-r.noise_pre[i]));               // softplus' = sigmoid
        }
    }
    for (size_t i = 0; i < bg.dz.size(); i++) bg.dz[i] += bg.dzc[i];          // d z_clean
    be_.upload(dz_, bg.dz.data(), bg.dz.size() * sizeof(float));
    if (noisy) be_.upload(dpre_, dpre.data(), dpre.size() * sizeof(float));
}

}  // namespace moe
