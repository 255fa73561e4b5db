/* The MoE FFN layer: router -> dispatch plan -> grouped expert FFN -> combine, forward and
   backward (docs/moe.md). Routing (moe_route.cpp) produces the dispatch plan, by backend ops or
   host code; every tensor op goes through the Backend. Experts of one layer are stored stacked, (E, Fh, C) and (E, C, F),
   and run as one GEMM pair per expert over its contiguous slice of the dispatched rows. */
#include "moe.h"
#include "model.h"
#include "moe_router.h"
#include "dist.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moe {

void MoeStats::add(const MoeStats& o) {
    aux += o.aux; z += o.z; imp += o.imp; load += o.load;
    if (routed.size() < o.routed.size()) routed.resize(o.routed.size(), 0.0);
    if (kept.size() < o.kept.size()) kept.resize(o.kept.size(), 0.0);
    for (size_t i = 0; i < o.routed.size(); i++) routed[i] += o.routed[i];
    for (size_t i = 0; i < o.kept.size(); i++) kept[i] += o.kept[i];
    dropped += o.dropped; assignments += o.assignments;
    top1_gate_sum += o.top1_gate_sum; z_mean_sum += o.z_mean_sum; tokens += o.tokens;
}

MoeLayer::MoeLayer(const Config& cfg, int layer, Backend& be, const std::vector<ParamTensor>& params,
                   const AddParam& add)
    : rc_(cfg.router), bal_(cfg.balance), layer_(layer), C_(cfg.model.d_model), E_(cfg.model.moe.experts),
      k_(cfg.model.moe.top_k), V_(cfg.model.vocab_size), seed_((int)cfg.train.seed),
      swiglu_(cfg.model.moe.activation == "swiglu"), ops_routing_(routes_with_ops(cfg)), be_(be), params_(params) {
    const int64_t C = C_, E = E_, Fe = cfg.model.moe.expert_ff, S = cfg.model.moe.shared_experts,
                  Fs = cfg.model.moe.shared_ff, hw = swiglu_ ? 2 : 1;
    const std::string p = "h." + std::to_string(layer) + ".moe.";
    if (rc_.type == "soft") p_slots_ = add(p + "router.slots", {C, E * rc_.soft_slots});
    else if (rc_.type != "hash") p_router_ = add(p + "router.weight", {E, C});
    if (rc_.noise == "gaussian") p_noise_ = add(p + "router.noise_weight", {E, C});
    routed_ = {add(p + "experts.c_fc.weight", {E, hw * Fe, C}), add(p + "experts.c_fc.bias", {E, hw * Fe}),
               add(p + "experts.c_proj.weight", {E, C, Fe}), add(p + "experts.c_proj.bias", {E, C}), (int)E, (int)Fe};
    if (S > 0)
        shared_ = {add(p + "shared.c_fc.weight", {S, hw * Fs, C}), add(p + "shared.c_fc.bias", {S, hw * Fs}),
                   add(p + "shared.c_proj.weight", {S, C, Fs}), add(p + "shared.c_proj.bias", {S, C}), (int)S, (int)Fs};
    if (has_bias()) bias_.assign(E_, 0.0f);
    if (has_hash()) table_.assign(V_, 0);
    begin_step();
}

MoeLayer::~MoeLayer() {
    for (void* p : allocs_) be_.free_bytes(p);
    for (void* p : remote_allocs_) be_.free_bytes(p);
}

float* MoeLayer::P(float* base, size_t idx) const { return base + params_[idx].offset; }

void MoeLayer::init(float* w, Rng& rng) {
    (void)w;  // the model's name-based init covers every tensor of this layer (docs/moe.md)
    if (has_hash()) for (int v = 0; v < V_; v++) table_[v] = (int32_t)(rng.next_u32() % E_);
}

void MoeLayer::ensure_buffers(int N, int A) {
    if (N <= bufN_ && A <= bufA_) return;
    for (void* p : allocs_) be_.free_bytes(p);
    allocs_.clear();
    bufN_ = std::max(N, bufN_);
    bufA_ = std::max(A, bufA_);
    N = bufN_; A = bufA_;
    const size_t C = C_, E = E_, F = routed_.ff, Fh = swiglu_ ? 2 * F : F;
    const size_t S = shared_.count, Fs = shared_.ff, Fsh = swiglu_ ? 2 * Fs : Fs;
    auto f = [&](size_t n) { float* p = be_.alloc(std::max<size_t>(n, 1)); allocs_.push_back(p); return p; };
    auto i = [&](size_t n) { int* p = be_.alloc_int(std::max<size_t>(n, 1)); allocs_.push_back(p); return p; };
    xr_ = f(N * C); jit_ = f(N * C); z_ = f(N * E); pre_ = f(N * E);
    xg_ = f(A * C); h_ = f(A * Fh); act_ = f(A * F); y_ = f(A * C);
    gate_ = f(A); dgate_ = f(A);
    token_ = i(A); tok_off_ = i(N + 1); tok_assign_ = i(A);
    if (ops_routing_) {   // A = N*k: every choice a row
        s_dev_ = f(N * E); cgate_ = f(A); bias_dev_ = f(E);
        cexp_ = i(A); choice_dev_ = i(A); counts_dev_ = i(2 * E + 1);
    }
    sh_h_ = f(S * N * Fsh); sh_act_ = f(S * N * Fs); sh_y_ = f(N * C);
    const size_t Fmax = std::max(F, Fs), Fhmax = std::max(Fh, Fsh), R = std::max((size_t)A, (size_t)N);
    dy_ = f(A * C); dh_ = f(R * Fhmax); dact_ = f(R * Fmax); dxg_ = f(A * C);
    scratch_rows_ = (int)R;
    dz_ = f(N * E); dpre_ = f(N * E); dxr_ = f(N * C); tmp_ = f(N * C);
}

void MoeLayer::ffn_forward(float* y, float* h, float* act, const float* x, int rows, const float* W1,
                           const float* b1, const float* W2, const float* b2, int F) {
    if (rows == 0) return;
    const int Fh = swiglu_ ? 2 * F : F;
    be_.matmul_forward(h, x, W1, b1, rows, C_, Fh);                     // (rows, Fh)
    if (swiglu_) be_.swiglu_forward(act, h, rows, F);
    else be_.gelu_forward(act, h, (size_t)rows * F);                    // (rows, F)
    be_.matmul_forward(y, act, W2, b2, rows, F, C_);                    // (rows, C)
}

void MoeLayer::ffn_backward(float* dx, float* dW1, float* db1, float* dW2, float* db2, float* dh, float* dact,
                            const float* dy, const float* x, const float* h, const float* act, int rows,
                            const float* W1, const float* W2, int F) {
    if (rows == 0) return;
    const int Fh = swiglu_ ? 2 * F : F;
    be_.zero(dact, (size_t)rows * F * sizeof(float));
    be_.matmul_backward(dact, dW2, db2, dy, act, W2, rows, F, C_);
    be_.zero(dh, (size_t)rows * Fh * sizeof(float));
    if (swiglu_) be_.swiglu_backward(dh, h, dact, rows, F);
    else be_.gelu_backward(dh, h, dact, (size_t)rows * F);
    be_.matmul_backward(dx, dW1, db1, dh, x, W1, rows, C_, Fh);
}

// Blocks of consecutive rows that one expert runs on: the plan's per-expert slices of the
// dispatched rows (one process), or per (source rank, local expert) slices of the rows received
// by all-to-all (expert parallel). Either way the blocks tile rows [0, total) without gaps.
std::vector<GroupBlock> MoeLayer::plan_blocks(const std::vector<int>& off, int count) {
    std::vector<GroupBlock> b;
    for (int e = 0; e < count; e++) b.push_back({e, off[e], off[e + 1] - off[e]});
    return b;
}

static int total_rows(const std::vector<GroupBlock>& blocks) {
    int n = 0;
    for (const GroupBlock& b : blocks) n += b.rows;
    return n;
}

// All experts at once: one grouped GEMM, one activation over every row, one grouped GEMM.
void MoeLayer::grouped_forward(const Expert& ex, const std::vector<GroupBlock>& blocks, const float* x, float* h,
                               float* act, float* y, float* w) {
    const int rows = total_rows(blocks), F = ex.ff, Fh = swiglu_ ? 2 * F : F;
    if (rows == 0) return;
    be_.grouped_matmul_forward(h, x, P(w, ex.fc_w), P(w, ex.fc_b), blocks.data(), (int)blocks.size(), C_, Fh);
    if (swiglu_) be_.swiglu_forward(act, h, rows, F);                            // (rows, F)
    else be_.gelu_forward(act, h, (size_t)rows * F);
    be_.grouped_matmul_forward(y, act, P(w, ex.proj_w), P(w, ex.proj_b), blocks.data(), (int)blocks.size(), F, C_);
}

// dx (rows of the blocks) is overwritten; expert gradients accumulate.
void MoeLayer::grouped_backward(const Expert& ex, const std::vector<GroupBlock>& blocks, float* dx, const float* dy,
                                const float* x, const float* h, const float* act, int rows, float* w, float* g) {
    const int F = ex.ff, Fh = swiglu_ ? 2 * F : F, nb = (int)blocks.size();
    be_.zero(dx, (size_t)rows * C_ * sizeof(float));
    if (rows == 0) return;
    be_.zero(dact_, (size_t)rows * F * sizeof(float));
    be_.grouped_matmul_backward(dact_, P(g, ex.proj_w), P(g, ex.proj_b), dy, act, P(w, ex.proj_w), blocks.data(), nb,
                                F, C_);                                           // dact (rows, F)
    be_.zero(dh_, (size_t)rows * Fh * sizeof(float));
    if (swiglu_) be_.swiglu_backward(dh_, h, dact_, rows, F);                     // dh (rows, Fh)
    else be_.gelu_backward(dh_, h, dact_, (size_t)rows * F);
    be_.grouped_matmul_backward(dx, P(g, ex.fc_w), P(g, ex.fc_b), dh_, x, P(w, ex.fc_w), blocks.data(), nb, C_, Fh);
}

// Expert parallel: the plan's rows are grouped by expert, so the rows for EP rank r (experts
// [r*El, (r+1)*El)) are contiguous. Counts per (rank, local expert) go first, then the rows;
// received rows are laid out by source rank, then local expert, and run as blocks.
void MoeLayer::exchange_forward(float* w) {
    const Dist& d = Dist::get();
    const int El = E_ / d.ep;
    const std::vector<int>& off = r_.plan.offsets;
    std::vector<int> send(E_), recv;
    for (int e = 0; e < E_; e++) send[e] = off[e + 1] - off[e];
    d.alltoall_counts(send, recv, El);
    send_rows_.assign(d.ep, 0);
    recv_rows_.assign(d.ep, 0);
    remote_blocks_.clear();
    int row = 0;
    for (int r = 0; r < d.ep; r++)
        for (int j = 0; j < El; j++) {
            send_rows_[r] += send[r * El + j];
            recv_rows_[r] += recv[r * El + j];
            remote_blocks_.push_back({d.ep_rank * El + j, row, recv[r * El + j]});
            row += recv[r * El + j];
        }
    remote_rows_ = row;
    ensure_remote(row);
    d.alltoallv(xg_, send_rows_, rx_, recv_rows_, C_);                    // (R, C) rows to run here
    grouped_forward(routed_, remote_blocks_, rx_, rh_, ract_, ry_, w);
    d.alltoallv(ry_, recv_rows_, y_, send_rows_, C_);                     // results back to their tokens
}

void MoeLayer::exchange_backward(float* w, float* g) {
    const Dist& d = Dist::get();
    d.alltoallv(dy_, send_rows_, rdy_, recv_rows_, C_);
    grouped_backward(routed_, remote_blocks_, rdx_, rdy_, rx_, rh_, ract_, remote_rows_, w, g);
    d.alltoallv(rdx_, recv_rows_, dxg_, send_rows_, C_);
}

void MoeLayer::ensure_remote(int R) {
    const size_t C = C_, F = routed_.ff, Fh = swiglu_ ? 2 * F : F;
    auto f = [&](size_t k) { float* p = be_.alloc(std::max<size_t>(k, 1)); remote_allocs_.push_back(p); return p; };
    if (R > remote_cap_) {
        for (void* p : remote_allocs_) be_.free_bytes(p);
        remote_allocs_.clear();
        scratch_rows_ = 0;  // a scratch allocated here went with them
        remote_cap_ = std::max(R, remote_cap_ * 2);
        const size_t n = remote_cap_;
        rx_ = f(n * C); rh_ = f(n * Fh); ract_ = f(n * F); ry_ = f(n * C); rdy_ = f(n * C); rdx_ = f(n * C);
    }
    if (R > scratch_rows_) {  // the backward scratch (dh_, dact_) is indexed by these rows too
        const size_t n = remote_cap_, Fs = shared_.ff, Fsh = swiglu_ ? 2 * Fs : Fs;
        dh_ = f(n * std::max(Fh, Fsh));
        dact_ = f(n * std::max(F, Fs));
        scratch_rows_ = (int)n;
    }
}

void MoeLayer::forward(float* out, const float* x, const int* tokens, int B, int T, bool training, float* w,
                       Rng& rng) {
    const int N = B * T, E = E_;
    B_ = B; T_ = T; x_ = x; training_ = training;
    int A_max = rc_.type == "soft" ? B * E * rc_.soft_slots
              : rc_.type == "expert_choice" ? E * std::min(N, (int)std::ceil(rc_.expert_choice_capacity * N / E))
              : rc_.type == "hash" ? N : N * k_;
    ensure_buffers(N, A_max);
    if (rc_.type == "soft") {
        soft_forward(out, x, B, T, w);
    } else {
        rin_ = x;
        jitter_.clear();
        if (rc_.noise == "jitter" && training && rc_.type != "hash") {
            jitter_.resize((size_t)N * C_);
            const float eps = (float)rc_.jitter_eps;
            for (float& m : jitter_) m = 1.0f - eps + 2.0f * eps * rng.uniform();
            be_.upload(jit_, jitter_.data(), jitter_.size() * sizeof(float));
            be_.zero(xr_, jitter_.size() * sizeof(float));
            be_.mul_accumulate(xr_, x, jit_, jitter_.size());                  // x_r = x * m
            rin_ = xr_;
        }
        route(rin_, tokens, B, T, training, w, rng);      // the plan, in backend memory (moe_route.cpp)
        const DispatchPlan& p = r_.plan;
        const int A = p.kept();
        be_.moe_dispatch_forward(xg_, x, token_, A, C_);                     // (A, C)
        if (Dist::get().exchange()) exchange_forward(w);
        else grouped_forward(routed_, plan_blocks(p.offsets, E_), xg_, h_, act_, y_, w);
        be_.moe_combine_forward(out, y_, gate_, tok_off_, tok_assign_, N, C_); // (N, C)
    }
    const size_t Fs = shared_.ff, Fsh = swiglu_ ? 2 * Fs : Fs;
    for (int j = 0; j < shared_.count; j++) {
        ffn_forward(sh_y_, sh_h_ + j * N * Fsh, sh_act_ + j * N * Fs, x, N, P(w, shared_.fc_w) + j * Fsh * C_,
                    P(w, shared_.fc_b) + j * Fsh, P(w, shared_.proj_w) + j * C_ * Fs, P(w, shared_.proj_b) + j * C_,
                    (int)Fs);
        be_.residual_forward(out, out, sh_y_, (size_t)N * C_);
    }
}

void MoeLayer::backward(float* dx, const float* dout, float* w, float* g, float scale) {
    const int N = B_ * T_;
    const size_t Fs = shared_.ff, Fsh = swiglu_ ? 2 * Fs : Fs;
    for (int j = 0; j < shared_.count; j++)
        ffn_backward(dx, P(g, shared_.fc_w) + j * Fsh * C_, P(g, shared_.fc_b) + j * Fsh,
                     P(g, shared_.proj_w) + j * C_ * Fs, P(g, shared_.proj_b) + j * C_, dh_, dact_, dout, x_,
                     sh_h_ + j * N * Fsh, sh_act_ + j * N * Fs, N, P(w, shared_.fc_w) + j * Fsh * C_,
                     P(w, shared_.proj_w) + j * C_ * Fs, (int)Fs);
    if (rc_.type == "soft") { soft_backward(dx, dout, w, g); return; }

    const DispatchPlan& p = r_.plan;
    const int A = p.kept();
    be_.moe_combine_backward(dy_, dgate_, dout, y_, gate_, token_, A, C_);
    if (Dist::get().exchange()) exchange_backward(w, g);
    else grouped_backward(routed_, plan_blocks(p.offsets, E_), dxg_, dy_, xg_, h_, act_, A, w, g);
    be_.moe_dispatch_backward(dx, dxg_, tok_off_, tok_assign_, N, C_);
    if (p_router_ != SIZE_MAX) route_backward(dx, w, g, scale);   // router gradients (moe_route.cpp)
}

// Soft MoE (Puigcerver et al.): per sequence, logits L = x Phi (T, S); dispatch weights D are a
// softmax over tokens (each slot's column), combine weights Cw a softmax over slots (each
// token's row). The slot math is small (S = E*p columns) and runs on the host; the experts run
// on the backend over slot rows laid out expert-major: row(b, e*p + q) = e*(B*p) + b*p + q.
void MoeLayer::soft_forward(float* out, const float* x, int B, int T, float* w) {
    const int N = B * T, C = C_, p = rc_.soft_slots, S = E_ * p;
    soft_x_.resize((size_t)N * C);
    be_.download(soft_x_.data(), x, soft_x_.size() * sizeof(float));
    soft_phi_.resize((size_t)C * S);
    be_.download(soft_phi_.data(), P(w, p_slots_), soft_phi_.size() * sizeof(float));
    soft_D_.assign((size_t)N * S, 0.0f);
    soft_Cw_.assign((size_t)N * S, 0.0f);
    std::vector<float> xs((size_t)B * S * C, 0.0f);
    auto row = [&](int b, int sl) { return (size_t)(sl / p) * B * p + (size_t)b * p + sl % p; };
    #pragma omp parallel for schedule(static)
    for (int b = 0; b < B; b++) {
        std::vector<float> L((size_t)T * S, 0.0f);
        for (int t = 0; t < T; t++)
            for (int c = 0; c < C; c++) {
                float xv = soft_x_[(size_t)(b * T + t) * C + c];
                for (int sl = 0; sl < S; sl++) L[(size_t)t * S + sl] += xv * soft_phi_[(size_t)c * S + sl];
            }
        for (int sl = 0; sl < S; sl++) {  // D: softmax over tokens
            float mx = -INFINITY, sum = 0.0f;
            for (int t = 0; t < T; t++) mx = std::max(mx, L[(size_t)t * S + sl]);
            for (int t = 0; t < T; t++) sum += (soft_D_[(size_t)(b * T + t) * S + sl] = std::exp(L[(size_t)t * S + sl] - mx));
            for (int t = 0; t < T; t++) soft_D_[(size_t)(b * T + t) * S + sl] /= sum;
        }
        for (int t = 0; t < T; t++) {  // Cw: softmax over slots
            float* cw = &soft_Cw_[(size_t)(b * T + t) * S];
            float mx = *std::max_element(&L[(size_t)t * S], &L[(size_t)t * S] + S), sum = 0.0f;
            for (int sl = 0; sl < S; sl++) sum += (cw[sl] = std::exp(L[(size_t)t * S + sl] - mx));
            for (int sl = 0; sl < S; sl++) cw[sl] /= sum;
        }
        for (int sl = 0; sl < S; sl++) {
            float* xr = &xs[row(b, sl) * C];
            for (int t = 0; t < T; t++) {
                float d = soft_D_[(size_t)(b * T + t) * S + sl];
                const float* xt = &soft_x_[(size_t)(b * T + t) * C];
                for (int c = 0; c < C; c++) xr[c] += d * xt[c];
            }
        }
    }
    std::vector<int> offsets(E_ + 1);
    for (int e = 0; e <= E_; e++) offsets[e] = e * B * p;
    be_.upload(xg_, xs.data(), xs.size() * sizeof(float));
    grouped_forward(routed_, plan_blocks(offsets, E_), xg_, h_, act_, y_, w);
    soft_Ys_.resize(xs.size());
    be_.download(soft_Ys_.data(), y_, soft_Ys_.size() * sizeof(float));
    std::vector<float> o((size_t)N * C, 0.0f);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int b = n / T;
        for (int sl = 0; sl < S; sl++) {
            float cw = soft_Cw_[(size_t)n * S + sl];
            const float* ys = &soft_Ys_[row(b, sl) * C];
            for (int c = 0; c < C; c++) o[(size_t)n * C + c] += cw * ys[c];
        }
    }
    be_.upload(out, o.data(), o.size() * sizeof(float));
    MoeStats& st = stats_;
    st = MoeStats{};
    st.routed.assign(E_, (double)B * p);
    st.kept = st.routed;
    st.assignments = (double)B * S;
    st.tokens = N;
    for (int n = 0; n < N; n++)
        st.top1_gate_sum += *std::max_element(&soft_Cw_[(size_t)n * S], &soft_Cw_[(size_t)n * S] + S);
    // for reports, each token counts for the expert of its heaviest combine slot
    r_ = Routing{};
    r_.N = N; r_.E = E_; r_.M = N;
    r_.choice_token.resize(N);
    r_.choice_expert.resize(N);
    for (int n = 0; n < N; n++) {
        const float* cw = &soft_Cw_[(size_t)n * S];
        r_.choice_token[n] = n;
        r_.choice_expert[n] = (int)(std::max_element(cw, cw + S) - cw) / p;
    }
}

void MoeLayer::soft_backward(float* dx, const float* dout, float* w, float* g) {
    const int B = B_, T = T_, N = B * T, C = C_, p = rc_.soft_slots, S = E_ * p;
    auto row = [&](int b, int sl) { return (size_t)(sl / p) * B * p + (size_t)b * p + sl % p; };
    std::vector<float> d((size_t)N * C), dYs((size_t)B * S * C, 0.0f), dLc((size_t)N * S);
    be_.download(d.data(), dout, d.size() * sizeof(float));
    #pragma omp parallel for schedule(static)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            const size_t n = (size_t)b * T + t;
            std::vector<float> dcw(S);
            float dot = 0.0f;
            for (int sl = 0; sl < S; sl++) {
                const float* ys = &soft_Ys_[row(b, sl) * C];
                float a = 0.0f;
                for (int c = 0; c < C; c++) a += d[n * C + c] * ys[c];
                dcw[sl] = a;
                dot += a * soft_Cw_[n * S + sl];
            }
            for (int sl = 0; sl < S; sl++) dLc[n * S + sl] = soft_Cw_[n * S + sl] * (dcw[sl] - dot);
        }
        for (int sl = 0; sl < S; sl++) {
            float* dy = &dYs[row(b, sl) * C];
            for (int t = 0; t < T; t++) {
                const size_t n = (size_t)b * T + t;
                float cw = soft_Cw_[n * S + sl];
                for (int c = 0; c < C; c++) dy[c] += cw * d[n * C + c];
            }
        }
    }
    std::vector<int> offsets(E_ + 1);
    for (int e = 0; e <= E_; e++) offsets[e] = e * B * p;
    be_.upload(dy_, dYs.data(), dYs.size() * sizeof(float));
    grouped_backward(routed_, plan_blocks(offsets, E_), dxg_, dy_, xg_, h_, act_, offsets[E_], w, g);
    std::vector<float> dXs(dYs.size()), dxh((size_t)N * C, 0.0f), dphi((size_t)C * S, 0.0f);
    be_.download(dXs.data(), dxg_, dXs.size() * sizeof(float));
    std::vector<std::vector<float>> dphi_b(B, std::vector<float>((size_t)C * S, 0.0f));
    #pragma omp parallel for schedule(static)
    for (int b = 0; b < B; b++) {
        std::vector<float> dL((size_t)T * S);
        for (int sl = 0; sl < S; sl++) {
            const float* dxs = &dXs[row(b, sl) * C];
            std::vector<float> dD(T);
            float dot = 0.0f;
            for (int t = 0; t < T; t++) {
                const size_t n = (size_t)b * T + t;
                float a = 0.0f, dval = soft_D_[n * S + sl];
                for (int c = 0; c < C; c++) {
                    a += dxs[c] * soft_x_[n * C + c];
                    dxh[n * C + c] += dval * dxs[c];
                }
                dD[t] = a;
                dot += a * dval;
            }
            for (int t = 0; t < T; t++) {
                const size_t n = (size_t)b * T + t;
                dL[(size_t)t * S + sl] = soft_D_[n * S + sl] * (dD[t] - dot) + dLc[n * S + sl];
            }
        }
        for (int t = 0; t < T; t++) {
            const size_t n = (size_t)b * T + t;
            for (int c = 0; c < C; c++) {
                float xv = soft_x_[n * C + c], acc = 0.0f;
                for (int sl = 0; sl < S; sl++) {
                    dphi_b[b][(size_t)c * S + sl] += xv * dL[(size_t)t * S + sl];
                    acc += dL[(size_t)t * S + sl] * soft_phi_[(size_t)c * S + sl];
                }
                dxh[n * C + c] += acc;
            }
        }
    }
    for (int b = 0; b < B; b++) for (size_t i = 0; i < dphi.size(); i++) dphi[i] += dphi_b[b][i];
    be_.upload(tmp_, dxh.data(), dxh.size() * sizeof(float));
    be_.residual_forward(dx, dx, tmp_, dxh.size());
    std::vector<float> gphi(dphi.size());
    be_.download(gphi.data(), P(g, p_slots_), gphi.size() * sizeof(float));
    for (size_t i = 0; i < gphi.size(); i++) gphi[i] += dphi[i];
    be_.upload(P(g, p_slots_), gphi.data(), gphi.size() * sizeof(float));
}

void MoeLayer::update_bias(const std::vector<double>& routed) {
    if (bias_.empty()) return;
    const double mean = std::accumulate(routed.begin(), routed.end(), 0.0) / E_;
    std::vector<double> upd(E_);
    for (int e = 0; e < E_; e++) {
        double d = mean - routed[e];
        upd[e] = bal_.bias_rate * ((d > 0) - (d < 0));
    }
    if (bal_.bias_center) {
        double m = std::accumulate(upd.begin(), upd.end(), 0.0) / E_;
        for (double& u : upd) u -= m;
    }
    for (int e = 0; e < E_; e++) bias_[e] += (float)upd[e];
}

}  // namespace moe
