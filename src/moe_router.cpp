/* Routing math of the MoE layer; see moe_router.h and docs/moe.md for the exact definitions. */
#include "moe_router.h"
#include "simd_cpu.h"
#include "expf_libm.h"

#if defined(__AVX512F__)
// GCC 12's AVX-512 intrinsics start from an "undefined" register that -Wmaybe-uninitialized
// reports (GCC bug 105593, fixed in 13)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moe {

#if defined(__AVX512F__)
static __m512 neg(__m512 x) { return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN))); }
#endif

void score_row(float* s, const float* z, int E, bool sigmoid) {
    // glibc's expf (std::exp), 16 lanes at a time where the CPU has AVX-512: expf_libm16 is the
    // same function bit for bit (tests/test_router_ops.cpp), and so is the CUDA router's expf_libm
    const float mx = sigmoid ? 0.0f : simd::max_of(z, E);
    int e = 0;
#if defined(__AVX512F__)
    for (; e + 16 <= E; e += 16) {
        const __m512 x = _mm512_loadu_ps(z + e);
        if (sigmoid)
            _mm512_storeu_ps(s + e, _mm512_div_ps(_mm512_set1_ps(1.0f),
                                                  _mm512_add_ps(_mm512_set1_ps(1.0f), expf_libm16(neg(x)))));
        else
            _mm512_storeu_ps(s + e, expf_libm16(_mm512_sub_ps(x, _mm512_set1_ps(mx))));
    }
#endif
    for (; e < E; e++) s[e] = sigmoid ? 1.0f / (1.0f + std::exp(-z[e])) : std::exp(z[e] - mx);
    if (sigmoid) return;
    float sum = 0.0f;
    for (int i = 0; i < E; i++) sum += s[i];
    for (int i = 0; i < E; i++) s[i] /= sum;
}

void router_scores(std::vector<float>& s, const std::vector<float>& z, int N, int E, bool sigmoid) {
    s.resize((size_t)N * E);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) score_row(&s[(size_t)n * E], &z[(size_t)n * E], E, sigmoid);
}

void scores_backward_row(float* dz, const float* ds, const float* s, int E, bool sigmoid) {
    if (sigmoid) {
        for (int e = 0; e < E; e++) dz[e] += ds[e] * s[e] * (1.0f - s[e]);
        return;
    }
    float dot = 0.0f;
    for (int e = 0; e < E; e++) dot += ds[e] * s[e];
    for (int e = 0; e < E; e++) dz[e] += s[e] * (ds[e] - dot);
}

void router_scores_backward(std::vector<float>& dz, const std::vector<float>& ds, const std::vector<float>& s,
                            int N, int E, bool sigmoid) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) scores_backward_row(&dz[(size_t)n * E], &ds[(size_t)n * E], &s[(size_t)n * E], E, sigmoid);
}

// Index of the largest allowed value; ties go to the lower index (strict >).
static int argmax_allowed(const float* v, const uint8_t* allowed, int E) {
    int best = -1;
    for (int e = 0; e < E; e++)
        if (allowed[e] && (best < 0 || v[e] > v[best])) best = e;
    return best;
}

void topk_row(int* expert, const float* v, int E, int k, int groups, int topk_groups, TopkScratch& w) {
#if defined(__AVX512F__)
    if (groups == 1) {
        // k rounds of a 16-lane arg-max: the largest allowed value, then the first allowed expert
        // holding it (ties: lower index, as argmax_allowed); `left` has a bit per allowed expert
        const int nc = (E + 15) / 16;
        w.left.resize(nc);
        for (int c = 0; c < nc; c++) w.left[c] = (__mmask16)(E - 16 * c >= 16 ? 0xffff : (1u << (E - 16 * c)) - 1);
        const __m512 ninf = _mm512_set1_ps(-INFINITY);
        int j = 0;
        for (; j < k; j++) {
            __m512 best = ninf;
            for (int c = 0; c < nc; c++) best = _mm512_max_ps(best, _mm512_mask_loadu_ps(ninf, w.left[c], v + 16 * c));
            const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(best));
            int c = 0;
            for (; c < nc; c++) {
                const __mmask16 hit = _mm512_mask_cmp_ps_mask(w.left[c], _mm512_mask_loadu_ps(ninf, w.left[c], v + 16 * c), m, _CMP_EQ_OQ);
                if (hit) {
                    const int b = __builtin_ctz(hit);
                    expert[j] = 16 * c + b;
                    w.left[c] &= (__mmask16)~(1u << b);
                    break;
                }
            }
            if (c == nc) break;   // a NaN maximum equals nothing: the rounds below decide the row
        }
        if (j == k) return;
    }
#endif
    w.allowed.assign(E, 1);
    if (groups > 1) {
        const int Eg = E / groups, per_group = std::min(std::max(1, k / topk_groups), Eg);
        w.gscore.resize(groups);
        for (int g = 0; g < groups; g++) {
            w.vals.assign(v + g * Eg, v + (g + 1) * Eg);
            std::partial_sort(w.vals.begin(), w.vals.begin() + per_group, w.vals.end(), std::greater<float>());
            w.gscore[g] = std::accumulate(w.vals.begin(), w.vals.begin() + per_group, 0.0f);
        }
        w.gallowed.assign(groups, 1);
        w.keep.assign(groups, 0);
        for (int t = 0; t < topk_groups; t++) {
            int g = argmax_allowed(w.gscore.data(), w.gallowed.data(), groups);
            w.keep[g] = 1;
            w.gallowed[g] = 0;
        }
        for (int e = 0; e < E; e++) w.allowed[e] = w.keep[e / Eg];
    }
    for (int j = 0; j < k; j++) {
        int e = argmax_allowed(v, w.allowed.data(), E);
        w.allowed[e] = 0;
        expert[j] = e;
    }
}

void select_topk(Routing& r, const std::vector<float>& sel, int k, int groups, int topk_groups) {
    const int N = r.N, E = r.E;
    r.M = N * k;
    r.choice_token.resize(r.M);
    r.choice_expert.resize(r.M);
    #pragma omp parallel
    {
        TopkScratch w;
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) {
            topk_row(&r.choice_expert[(size_t)n * k], &sel[(size_t)n * E], E, k, groups, topk_groups, w);
            for (int j = 0; j < k; j++) r.choice_token[n * k + j] = n;
        }
    }
    r.routed.assign(E, 0.0);
    for (int m = 0; m < r.M; m++) r.routed[r.choice_expert[m]] += 1.0;
}

std::vector<float> sinkhorn_balance(const std::vector<float>& z, int N, int E) {
    std::vector<double> P((size_t)N * E);
    for (int n = 0; n < N; n++) {
        const float* zr = &z[(size_t)n * E];
        float mx = *std::max_element(zr, zr + E);
        for (int e = 0; e < E; e++) P[(size_t)n * E + e] = std::exp((double)zr[e] - mx);
    }
    std::vector<double> col(E);
    for (int it = 0; it < 100; it++) {
        std::fill(col.begin(), col.end(), 0.0);
        for (int n = 0; n < N; n++)
            for (int e = 0; e < E; e++) col[e] += P[(size_t)n * E + e];
        double delta = 0.0;
        for (int e = 0; e < E; e++) delta += std::fabs(col[e] * E / N - 1.0);
        if (delta / E < 1e-4) break;
        for (int n = 0; n < N; n++) {
            double row = 0.0;
            for (int e = 0; e < E; e++) row += (P[(size_t)n * E + e] *= ((double)N / E) / col[e]);
            for (int e = 0; e < E; e++) P[(size_t)n * E + e] /= row;
        }
    }
    return std::vector<float>(P.begin(), P.end());
}

void select_expert_choice(Routing& r, int cap) {
    const int N = r.N, E = r.E;
    r.M = E * cap;
    r.choice_token.resize(r.M);
    r.choice_expert.resize(r.M);
    #pragma omp parallel for schedule(static)
    for (int e = 0; e < E; e++) {
        std::vector<int> order(N);
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(),
                         [&](int a, int b) { return r.s[(size_t)a * E + e] > r.s[(size_t)b * E + e]; });
        for (int i = 0; i < cap; i++) {
            r.choice_token[e * cap + i] = order[i];
            r.choice_expert[e * cap + i] = e;
        }
    }
    r.routed.assign(E, (double)cap);
}

void select_hash(Routing& r, const int* tokens, const std::vector<int32_t>& table) {
    r.M = r.N;
    r.choice_token.resize(r.M);
    r.choice_expert.resize(r.M);
    r.choice_gate.assign(r.M, 1.0f);
    r.routed.assign(r.E, 0.0);
    for (int n = 0; n < r.N; n++) {
        r.choice_token[n] = n;
        r.choice_expert[n] = table[tokens[n]];
        r.routed[table[tokens[n]]] += 1.0;
    }
}

void gates_row(float* gate, const float* s, const int* expert, int k, bool normalize, float scale) {
    for (int j = 0; j < k; j++) gate[j] = s[expert[j]];
    if (normalize) {
        float sum = 0.0f;
        for (int j = 0; j < k; j++) sum += gate[j];
        for (int j = 0; j < k; j++) gate[j] /= sum;
    }
    for (int j = 0; j < k; j++) gate[j] *= scale;
}

void choice_gates(Routing& r, int k, bool normalize, float scale, bool token_choice) {
    r.choice_gate.resize(r.M);
    if (token_choice) {   // choice m = n*k + j
        #pragma omp parallel for schedule(static)
        for (int n = 0; n < r.N; n++)
            gates_row(&r.choice_gate[(size_t)n * k], &r.s[(size_t)n * r.E], &r.choice_expert[(size_t)n * k], k,
                      normalize, scale);
        return;
    }
    for (int m = 0; m < r.M; m++)
        r.choice_gate[m] = r.s[(size_t)r.choice_token[m] * r.E + r.choice_expert[m]] * scale;
}

void gates_backward_row(float* ds, const float* s, const int* expert, const float* dgate, int k, bool normalize,
                        float scale) {
    if (!normalize) {
        for (int j = 0; j < k; j++) ds[expert[j]] += scale * dgate[j];
        return;
    }
    // w_j = scale * s_j / S with S = sum of the token's chosen s: dw_j/ds_m = scale (d_jm / S - s_j / S^2)
    float S = 0.0f, dot = 0.0f;
    for (int j = 0; j < k; j++) {
        S += s[expert[j]];
        dot += dgate[j] * s[expert[j]];
    }
    for (int j = 0; j < k; j++) ds[expert[j]] += scale * (dgate[j] / S - dot / (S * S));
}

void choice_gates_backward(std::vector<float>& ds, const Routing& r, const std::vector<float>& dgate,
                           int k, bool normalize, float scale, bool token_choice) {
    const int E = r.E;
    if (token_choice) {
        #pragma omp parallel for schedule(static)
        for (int n = 0; n < r.N; n++)
            gates_backward_row(&ds[(size_t)n * E], &r.s[(size_t)n * E], &r.choice_expert[(size_t)n * k],
                               &dgate[(size_t)n * k], k, normalize, scale);
        return;
    }
    for (int m = 0; m < r.M; m++) ds[(size_t)r.choice_token[m] * E + r.choice_expert[m]] += scale * dgate[m];
}

void apply_capacity(Routing& r, int cap, bool by_probs) {
    r.kept.assign(r.M, 1);
    if (cap <= 0) return;
    std::vector<std::vector<int>> per_expert(r.E);
    for (int m = 0; m < r.M; m++) per_expert[r.choice_expert[m]].push_back(m);
    for (auto& list : per_expert) {
        if ((int)list.size() <= cap) continue;
        if (by_probs)
            std::stable_sort(list.begin(), list.end(), [&](int a, int b) { return r.choice_gate[a] > r.choice_gate[b]; });
        for (size_t i = cap; i < list.size(); i++) r.kept[list[i]] = 0;
    }
}

void build_plan(Routing& r) {
    DispatchPlan& p = r.plan;
    p.N = r.N;
    p.E = r.E;
    p.offsets.assign(r.E + 1, 0);
    for (int m = 0; m < r.M; m++) if (r.kept[m]) p.offsets[r.choice_expert[m] + 1]++;
    for (int e = 0; e < r.E; e++) p.offsets[e + 1] += p.offsets[e];
    const int A = p.offsets[r.E];
    p.token.resize(A);
    p.gate.resize(A);
    p.choice.resize(A);
    std::vector<int> fill(p.offsets.begin(), p.offsets.end() - 1);
    std::vector<int> order(r.M);
    std::iota(order.begin(), order.end(), 0);
    // by token within each expert: gathers walk x forward, and the plan is the same for any M order
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return r.choice_token[a] < r.choice_token[b]; });
    for (int m : order) {
        if (!r.kept[m]) continue;
        int a = fill[r.choice_expert[m]]++;
        p.token[a] = r.choice_token[m];
        p.gate[a] = r.choice_gate[m];
        p.choice[a] = m;
    }
    p.tok_offsets.assign(r.N + 1, 0);
    for (int a = 0; a < A; a++) p.tok_offsets[p.token[a] + 1]++;
    for (int n = 0; n < r.N; n++) p.tok_offsets[n + 1] += p.tok_offsets[n];
    p.tok_assign.resize(A);
    std::vector<int> tfill(p.tok_offsets.begin(), p.tok_offsets.end() - 1);
    for (int a = 0; a < A; a++) p.tok_assign[tfill[p.token[a]]++] = a;
}

// ---------------------------------------------------------------------------------------
// balancing terms

// log-sum-exp of a row for the z-loss, with float exps as torch's float32 logsumexp has (the
// vector exp: N x E scalar double exps were most of the routing's time with 64 experts); e (E)
// gets exp(z - max), *sum their sum (fixed lane order: the same bits for any thread count)
double lse_row(const float* z, int E, float* e, float* sum) {
    const float mx = simd::max_of(z, E);
    *sum = simd::exp_shift_sum(e, z, mx, E);
    return mx + std::log((double)*sum);
}

// CV^2 = var / mean^2 (population variance) and its gradient w.r.t. each entry.
static double cv_squared(const std::vector<double>& x, std::vector<double>* grad) {
    const int E = (int)x.size();
    double mean = std::accumulate(x.begin(), x.end(), 0.0) / E, var = 0.0;
    for (double v : x) var += (v - mean) * (v - mean);
    var /= E;
    if (mean == 0.0) { if (grad) grad->assign(E, 0.0); return 0.0; }
    if (grad) {
        grad->resize(E);
        for (int i = 0; i < E; i++)
            (*grad)[i] = 2.0 * (x[i] - mean) / E / (mean * mean) - 2.0 * var / (mean * mean * mean) / E;
    }
    return var / (mean * mean);
}

// The k-th largest value of a row, optionally the (k+1)-th; -inf when it does not exist.
static float kth_largest(const float* v, int E, int kth) {
    if (kth > E) return -INFINITY;
    std::vector<float> tmp(v, v + E);
    std::nth_element(tmp.begin(), tmp.begin() + (kth - 1), tmp.end(), std::greater<float>());
    return tmp[kth - 1];
}

// Shazeer's load estimator P(n, i) and its derivative factor phi(u)/std.
static void load_probs(const Routing& r, int k, std::vector<double>& P, std::vector<double>* dens) {
    const int N = r.N, E = r.E;
    P.assign((size_t)N * E, 0.0);
    if (dens) dens->assign((size_t)N * E, 0.0);
    for (int n = 0; n < N; n++) {
        const float* z = &r.z[(size_t)n * E];
        float kth = kth_largest(z, E, k), kth1 = kth_largest(z, E, k + 1);
        for (int i = 0; i < E; i++) {
            size_t idx = (size_t)n * E + i;
            float thr = z[i] >= kth ? kth1 : kth;
            if (std::isinf(thr)) { P[idx] = 1.0; continue; }  // k = E: every expert is always in the top k
            double sd = r.noise_std[idx];
            double u = (r.z_clean[idx] - (double)thr) / sd;
            P[idx] = 0.5 * std::erfc(-u / std::sqrt(2.0));
            if (dens) (*dens)[idx] = std::exp(-0.5 * u * u) / std::sqrt(2.0 * M_PI);
        }
    }
}

// f_i (fraction of selected assignments) for the micro-batch or the given global counts.
static std::vector<double> load_fractions(const std::vector<double>& routed) {
    double total = std::accumulate(routed.begin(), routed.end(), 0.0);
    std::vector<double> f(routed.size(), 0.0);
    if (total > 0) for (size_t i = 0; i < f.size(); i++) f[i] = routed[i] / total;
    return f;
}

// f_i of sequence b (tokens [b*T, (b+1)*T)): the fraction of its choices that went to expert i.
// choice_token null: choice m belongs to token m / k.
static std::vector<double> sequence_fractions(const int* choice_token, const int* choice_expert, int M, int k, int E,
                                              int T, int b) {
    std::vector<double> cnt(E, 0.0);
    for (int m = 0; m < M; m++)
        if ((choice_token ? choice_token[m] : m / k) / T == b) cnt[choice_expert[m]] += 1.0;
    return load_fractions(cnt);
}

void aux_z_terms(MoeStats& st, const float* z, const float* s, const int* choice_token, const int* choice_expert,
                 int M, const std::vector<double>& routed, const BalanceConfig& bal, int k, int N, int E, int T,
                 const std::vector<double>& global_routed) {
    st.aux = st.z = 0.0;
    if (bal.aux_loss > 0) {
        if (bal.aux_scope == "sequence") {
            const int B = N / T;
            for (int b = 0; b < B; b++) {
                std::vector<double> P(E, 0.0);
                for (int t = 0; t < T; t++) for (int i = 0; i < E; i++) P[i] += s[(size_t)(b * T + t) * E + i] / T;
                const std::vector<double> f = sequence_fractions(choice_token, choice_expert, M, k, E, T, b);
                for (int i = 0; i < E; i++) st.aux += bal.aux_loss * E * f[i] * P[i] / B;
            }
        } else {
            std::vector<double> f = load_fractions(bal.aux_scope == "global" && !global_routed.empty() ? global_routed : routed);
            // column sums, each in token order (row by row: the same bits, in memory order)
            std::vector<double> P(E, 0.0);
            for (int n = 0; n < N; n++)
                for (int i = 0; i < E; i++) P[i] += s[(size_t)n * E + i];
            for (int i = 0; i < E; i++) st.aux += bal.aux_loss * E * f[i] * P[i] / N;
        }
    }
    // per-token log-sum-exps in parallel (N x E double exps: with 64 experts this was the
    // largest serial part of a step), summed in token order
    std::vector<double> lse(N);
    #pragma omp parallel
    {
        std::vector<float> e(E);
        float sum;
        #pragma omp for schedule(static)
        for (int n = 0; n < N; n++) lse[n] = lse_row(&z[(size_t)n * E], E, e.data(), &sum);
    }
    double zsum = 0.0;
    for (int n = 0; n < N; n++) zsum += lse[n] * lse[n];
    st.z_mean_sum = zsum;
    if (bal.z_loss > 0) st.z = bal.z_loss * zsum / N;
}

void balance_forward(MoeStats& st, const Routing& r, const BalanceConfig& bal, int k, int T,
                     const std::vector<double>& global_routed) {
    const int N = r.N, E = r.E;
    aux_z_terms(st, r.z.data(), r.s.data(), r.choice_token.data(), r.choice_expert.data(), r.M, r.routed, bal, k, N, E,
                T, global_routed);
    st.imp = st.load = 0.0;
    if (bal.importance_loss > 0) {
        std::vector<double> imp(E, 0.0);
        for (int n = 0; n < N; n++) for (int i = 0; i < E; i++) imp[i] += r.s[(size_t)n * E + i];
        st.imp = bal.importance_loss * cv_squared(imp, nullptr);
    }
    if (bal.load_loss > 0 && !r.noise_std.empty()) {
        std::vector<double> P;
        load_probs(r, k, P, nullptr);
        std::vector<double> load(E, 0.0);
        for (int n = 0; n < N; n++) for (int i = 0; i < E; i++) load[i] += P[(size_t)n * E + i];
        st.load = bal.load_loss * cv_squared(load, nullptr);
    }
}

std::vector<float> aux_score_grads(const BalanceConfig& bal, const int* choice_token, const int* choice_expert, int M,
                                   int k, int N, int E, int T, const std::vector<double>& routed,
                                   const std::vector<double>& global_routed, float scale) {
    if (bal.aux_loss <= 0) return {};
    if (bal.aux_scope == "sequence") {
        const int B = N / T;
        std::vector<float> d((size_t)B * E);
        for (int b = 0; b < B; b++) {
            const std::vector<double> f = sequence_fractions(choice_token, choice_expert, M, k, E, T, b);
            for (int i = 0; i < E; i++) d[(size_t)b * E + i] = (float)(scale * bal.aux_loss * E * f[i] / T / B);
        }
        return d;
    }
    std::vector<double> f = load_fractions(bal.aux_scope == "global" && !global_routed.empty() ? global_routed : routed);
    std::vector<float> d(E);
    for (int i = 0; i < E; i++) d[i] = (float)(scale * bal.aux_loss * E * f[i] / N);
    return d;
}

const float* aux_grad_row(const std::vector<float>& d, int n, int seq_len, int E) {
    const size_t row = seq_len > 0 ? (size_t)(n / seq_len) : 0;
    return (row + 1) * E <= d.size() ? &d[row * E] : nullptr;
}

void z_loss_backward_row(float* dz, const float* z, int E, double coef, int N, float* e) {
    float sum;
    const double l = lse_row(z, E, e, &sum);
    for (int i = 0; i < E; i++)   // softmax(z)_i = e_i / sum
        dz[i] += (float)(coef * l * ((double)e[i] / sum) / N);
}

void balance_backward(BalanceGrads& g, const Routing& r, const BalanceConfig& bal, int k, int T,
                      const std::vector<double>& global_routed, float scale) {
    const int N = r.N, E = r.E;
    const std::vector<float> d = aux_score_grads(bal, r.choice_token.data(), r.choice_expert.data(), r.M, k, N, E, T,
                                                 r.routed, global_routed, scale);
    if (!d.empty()) {
        const int seq_len = bal.aux_scope == "sequence" ? T : 0;
        #pragma omp parallel for schedule(static)
        for (int n = 0; n < N; n++)
            if (const float* dr = aux_grad_row(d, n, seq_len, E))
                for (int i = 0; i < E; i++) g.ds[(size_t)n * E + i] += dr[i];
    }
    if (bal.z_loss > 0) {
        const double coef = scale * bal.z_loss * 2.0;
        #pragma omp parallel
        {
            std::vector<float> e(E);
            #pragma omp for schedule(static)
            for (int n = 0; n < N; n++) z_loss_backward_row(&g.dz[(size_t)n * E], &r.z[(size_t)n * E], E, coef, N, e.data());
        }
    }
    if (bal.importance_loss > 0) {
        std::vector<double> imp(E, 0.0), dimp;
        for (int n = 0; n < N; n++) for (int i = 0; i < E; i++) imp[i] += r.s[(size_t)n * E + i];
        cv_squared(imp, &dimp);
        for (int n = 0; n < N; n++)
            for (int i = 0; i < E; i++) g.ds[(size_t)n * E + i] += (float)(scale * bal.importance_loss * dimp[i]);
    }
    if (bal.load_loss > 0 && !r.noise_std.empty()) {
        std::vector<double> P, dens, dload;
        load_probs(r, k, P, &dens);
        std::vector<double> load(E, 0.0);
        for (int n = 0; n < N; n++) for (int i = 0; i < E; i++) load[i] += P[(size_t)n * E + i];
        cv_squared(load, &dload);
        for (int n = 0; n < N; n++) {
            const float* z = &r.z[(size_t)n * E];
            float kth = kth_largest(z, E, k), kth1 = kth_largest(z, E, k + 1);
            for (int i = 0; i < E; i++) {
                size_t idx = (size_t)n * E + i;
                double sd = r.noise_std[idx];
                double thr = z[i] >= kth ? kth1 : kth;
                if (std::isinf(thr)) continue;                 // P = 1, no gradient
                double u = (r.z_clean[idx] - thr) / sd;
                double d = scale * bal.load_loss * dload[i] * dens[idx];
                g.dzc[idx] += (float)(d / sd);        // threshold is a constant (docs/moe.md)
                g.dstd[idx] += (float)(-d * u / sd);
            }
        }
    }
}

std::vector<int32_t> balanced_hash_table(const std::vector<double>& counts, int E) {
    const int V = (int)counts.size();
    std::vector<int> order(V);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return counts[a] > counts[b]; });
    std::vector<double> load(E, 0.0);
    std::vector<int32_t> table(V, 0);
    for (int v : order) {
        int best = (int)(std::min_element(load.begin(), load.end()) - load.begin());
        table[v] = best;
        load[best] += counts[v];
    }
    return table;
}

}  // namespace moe
