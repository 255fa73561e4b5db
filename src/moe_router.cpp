/* Routing math of the MoE layer; see moe_router.h and docs/moe.md for the exact definitions. */
#include "moe_router.h"
#include "simd_cpu.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moe {

void router_scores(std::vector<float>& s, const std::vector<float>& z, int N, int E, bool sigmoid) {
    s.resize((size_t)N * E);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* zr = &z[(size_t)n * E];
        float* sr = &s[(size_t)n * E];
        if (sigmoid) {
            for (int e = 0; e < E; e++) sr[e] = 1.0f / (1.0f + std::exp(-zr[e]));
            continue;
        }
        float mx = *std::max_element(zr, zr + E), sum = 0.0f;
        for (int e = 0; e < E; e++) { sr[e] = std::exp(zr[e] - mx); sum += sr[e]; }
        for (int e = 0; e < E; e++) sr[e] /= sum;
    }
}

void router_scores_backward(std::vector<float>& dz, const std::vector<float>& ds, const std::vector<float>& s,
                            int N, int E, bool sigmoid) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* sr = &s[(size_t)n * E];
        const float* dsr = &ds[(size_t)n * E];
        float* dzr = &dz[(size_t)n * E];
        if (sigmoid) {
            for (int e = 0; e < E; e++) dzr[e] += dsr[e] * sr[e] * (1.0f - sr[e]);
            continue;
        }
        float dot = 0.0f;
        for (int e = 0; e < E; e++) dot += dsr[e] * sr[e];
        for (int e = 0; e < E; e++) dzr[e] += sr[e] * (dsr[e] - dot);
    }
}

// Index of the largest allowed value; ties go to the lower index (strict >).
static int argmax_allowed(const float* v, const uint8_t* allowed, int E) {
    int best = -1;
    for (int e = 0; e < E; e++)
        if (allowed[e] && (best < 0 || v[e] > v[best])) best = e;
    return best;
}

void select_topk(Routing& r, const std::vector<float>& sel, int k, int groups, int topk_groups) {
    const int N = r.N, E = r.E, Eg = E / groups, per_group = std::max(1, k / topk_groups);
    r.M = N * k;
    r.choice_token.resize(r.M);
    r.choice_expert.resize(r.M);
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* v = &sel[(size_t)n * E];
        std::vector<uint8_t> allowed(E, 1);
        if (groups > 1) {
            std::vector<float> gscore(groups);
            for (int g = 0; g < groups; g++) {
                std::vector<float> vals(v + g * Eg, v + (g + 1) * Eg);
                std::partial_sort(vals.begin(), vals.begin() + std::min(per_group, Eg), vals.end(), std::greater<float>());
                gscore[g] = std::accumulate(vals.begin(), vals.begin() + std::min(per_group, Eg), 0.0f);
            }
            std::vector<uint8_t> gallowed(groups, 1), keep(groups, 0);
            for (int t = 0; t < topk_groups; t++) {
                int g = argmax_allowed(gscore.data(), gallowed.data(), groups);
                keep[g] = 1;
                gallowed[g] = 0;
            }
            for (int e = 0; e < E; e++) allowed[e] = keep[e / Eg];
        }
        for (int j = 0; j < k; j++) {
            int e = argmax_allowed(v, allowed.data(), E);
            allowed[e] = 0;
            r.choice_token[n * k + j] = n;
            r.choice_expert[n * k + j] = e;
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

void choice_gates(Routing& r, int k, bool normalize, float scale, bool token_choice) {
    r.choice_gate.resize(r.M);
    for (int m = 0; m < r.M; m++)
        r.choice_gate[m] = r.s[(size_t)r.choice_token[m] * r.E + r.choice_expert[m]];
    if (token_choice && normalize) {
        for (int n = 0; n < r.N; n++) {
            float sum = 0.0f;
            for (int j = 0; j < k; j++) sum += r.choice_gate[n * k + j];
            for (int j = 0; j < k; j++) r.choice_gate[n * k + j] /= sum;
        }
    }
    for (float& g : r.choice_gate) g *= scale;
}

void choice_gates_backward(std::vector<float>& ds, const Routing& r, const std::vector<float>& dgate,
                           int k, bool normalize, float scale, bool token_choice) {
    const int E = r.E;
    if (!(token_choice && normalize)) {
        for (int m = 0; m < r.M; m++) ds[(size_t)r.choice_token[m] * E + r.choice_expert[m]] += scale * dgate[m];
        return;
    }
    // w_j = scale * s_j / S with S = sum of the token's chosen s: dw_j/ds_m = scale (d_jm / S - s_j / S^2)
    for (int n = 0; n < r.N; n++) {
        float S = 0.0f, dot = 0.0f;
        for (int j = 0; j < k; j++) {
            int m = n * k + j;
            float sj = r.s[(size_t)n * E + r.choice_expert[m]];
            S += sj;
            dot += dgate[m] * sj;
        }
        for (int j = 0; j < k; j++) {
            int m = n * k + j;
            ds[(size_t)n * E + r.choice_expert[m]] += scale * (dgate[m] / S - dot / (S * S));
        }
    }
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
static double lse_row(const float* z, int E, float* e, float* sum) {
    const float mx = *std::max_element(z, z + E);
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

void balance_forward(MoeStats& st, const Routing& r, const BalanceConfig& bal, int k, int T,
                     const std::vector<double>& global_routed) {
    const int N = r.N, E = r.E;
    st.aux = st.z = st.imp = st.load = 0.0;
    if (bal.aux_loss > 0) {
        if (bal.aux_scope == "sequence") {
            const int B = N / T;
            for (int b = 0; b < B; b++) {
                std::vector<double> cnt(E, 0.0), P(E, 0.0);
                for (int m = 0; m < r.M; m++) if (r.choice_token[m] / T == b) cnt[r.choice_expert[m]] += 1.0;
                for (int t = 0; t < T; t++) for (int i = 0; i < E; i++) P[i] += r.s[(size_t)(b * T + t) * E + i] / T;
                std::vector<double> f = load_fractions(cnt);
                for (int i = 0; i < E; i++) st.aux += bal.aux_loss * E * f[i] * P[i] / B;
            }
        } else {
            std::vector<double> f = load_fractions(bal.aux_scope == "global" && !global_routed.empty() ? global_routed : r.routed);
            // column sums, each in token order on one thread (the same bits for any thread count)
            std::vector<double> P(E, 0.0);
            #pragma omp parallel for schedule(static)
            for (int i = 0; i < E; i++)
                for (int n = 0; n < N; n++) P[i] += r.s[(size_t)n * E + i];
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
        for (int n = 0; n < N; n++) lse[n] = lse_row(&r.z[(size_t)n * E], E, e.data(), &sum);
    }
    double zsum = 0.0;
    for (int n = 0; n < N; n++) zsum += lse[n] * lse[n];
    st.z_mean_sum = zsum;
    if (bal.z_loss > 0) st.z = bal.z_loss * zsum / N;
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

void balance_backward(BalanceGrads& g, const Routing& r, const BalanceConfig& bal, int k, int T,
                      const std::vector<double>& global_routed, float scale) {
    const int N = r.N, E = r.E;
    if (bal.aux_loss > 0) {
        if (bal.aux_scope == "sequence") {
            const int B = N / T;
            for (int b = 0; b < B; b++) {
                std::vector<double> cnt(E, 0.0);
                for (int m = 0; m < r.M; m++) if (r.choice_token[m] / T == b) cnt[r.choice_expert[m]] += 1.0;
                std::vector<double> f = load_fractions(cnt);
                for (int t = 0; t < T; t++)
                    for (int i = 0; i < E; i++)
                        g.ds[(size_t)(b * T + t) * E + i] += (float)(scale * bal.aux_loss * E * f[i] / T / B);
            }
        } else {
            std::vector<double> f = load_fractions(bal.aux_scope == "global" && !global_routed.empty() ? global_routed : r.routed);
            std::vector<float> d(E);
            for (int i = 0; i < E; i++) d[i] = (float)(scale * bal.aux_loss * E * f[i] / N);
            #pragma omp parallel for schedule(static)
            for (int n = 0; n < N; n++)
                for (int i = 0; i < E; i++) g.ds[(size_t)n * E + i] += d[i];
        }
    }
    if (bal.z_loss > 0) {
        #pragma omp parallel
        {
            std::vector<float> e(E);
            float sum;
            #pragma omp for schedule(static)
            for (int n = 0; n < N; n++) {
                const double l = lse_row(&r.z[(size_t)n * E], E, e.data(), &sum);
                for (int i = 0; i < E; i++)   // softmax(z)_i = e_i / sum
                    g.dz[(size_t)n * E + i] += (float)(scale * bal.z_loss * 2.0 * l * ((double)e[i] / sum) / N);
            }
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
