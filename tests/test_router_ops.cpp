/* The Backend routing ops on the CPU backend (src/router_ops.cpp) give exactly the bits of the
   host routing calls the MoE layer made inline before they existed (router_scores, select_topk,
   choice_gates, apply_capacity, build_plan, balance_forward/backward, choice_gates_backward,
   router_scores_backward); the layer's own results through them are covered by
   test_oracle_moe.cpp and test_moe.cpp. Also: src/expf_libm.h (the CUDA router's exponential)
   is glibc's expf bit for bit, which is what lets the CUDA scores equal the host's. */
#include <doctest/doctest.h>

#include "backend.h"
#include "config.h"
#include "expf_libm.h"
#include "moe.h"
#include "moe_router.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

using namespace moe;

namespace {

template <class T>
bool same(const std::vector<T>& a, const T* b, size_t n) {
    return a.size() == n && (n == 0 || std::memcmp(a.data(), b, n * sizeof(T)) == 0);
}

struct Case {
    int N, E, k, groups = 1, topk_groups = 1, cap = 0, T = 0;
    bool sigmoid = false, normalize = true, by_probs = true, bias = false, global = false;
    float scale = 1.0f;
};

void check_case(const Case& c, uint32_t seed) {
    CAPTURE(c.N); CAPTURE(c.E); CAPTURE(c.k); CAPTURE(c.groups); CAPTURE(c.cap); CAPTURE(c.sigmoid); CAPTURE(c.T);
    const int N = c.N, E = c.E, k = c.k, M = N * k;
    const size_t NE = (size_t)N * E;
    std::mt19937 g(seed);
    std::normal_distribution<float> nd(0.0f, 1.5f);
    std::vector<float> z(NE), bias(E), dgate_all(M);
    for (float& v : z) v = nd(g);
    for (size_t i = 0; i < NE / 7; i++) z[i * 7] = std::round(z[i * 7]);   // some exact ties
    for (float& v : bias) v = 0.05f * nd(g);
    for (float& v : dgate_all) v = nd(g);
    std::vector<double> global(E);
    for (int e = 0; e < E; e++) global[e] = (double)(e * 13 % 29);
    BalanceConfig bal;
    bal.aux_loss = 0.01;
    bal.z_loss = 0.001;
    bal.aux_scope = c.T > 0 ? "sequence" : c.global ? "global" : "micro_batch";
    const int T = c.T > 0 ? c.T : N;

    // the inline host calls, as MoeLayer::route / backward made them
    Routing r;
    r.N = N; r.E = E;
    r.z = z;
    router_scores(r.s, r.z, N, E, c.sigmoid);
    std::vector<float> sel = r.s;
    if (c.bias) for (int n = 0; n < N; n++) for (int e = 0; e < E; e++) sel[(size_t)n * E + e] += bias[e];
    select_topk(r, sel, k, c.groups, c.topk_groups);
    choice_gates(r, k, c.normalize, c.scale, true);
    apply_capacity(r, c.cap, c.by_probs);
    build_plan(r);
    MoeStats st;
    balance_forward(st, r, bal, k, T, c.global ? global : std::vector<double>{});
    const int A = r.plan.kept();
    std::vector<float> dgate_a(dgate_all.begin(), dgate_all.begin() + A), dchoice(M, 0.0f);
    for (int a = 0; a < A; a++) dchoice[r.plan.choice[a]] = dgate_a[a];
    BalanceGrads bg;
    bg.ds.assign(NE, 0.0f); bg.dz.assign(NE, 0.0f); bg.dzc.assign(NE, 0.0f); bg.dstd.assign(NE, 0.0f);
    choice_gates_backward(bg.ds, r, dchoice, k, c.normalize, c.scale, true);
    balance_backward(bg, r, bal, k, T, c.global ? global : std::vector<double>{}, 0.75f);
    router_scores_backward(bg.dz, bg.ds, r.s, N, E, c.sigmoid);
    for (size_t i = 0; i < NE; i++) bg.dz[i] += bg.dzc[i];

    // the same through the CPU backend's ops
    std::unique_ptr<Backend> be = make_cpu_backend(0);
    TopkRouterArgs a;
    a.N = N; a.E = E; a.k = k; a.sigmoid = c.sigmoid; a.groups = c.groups; a.topk_groups = c.topk_groups;
    a.normalize = c.normalize; a.scale = c.scale; a.capacity = c.cap; a.drop_by_probs = c.by_probs;
    RouterLossArgs l;
    l.aux_loss = bal.aux_loss;
    l.z_loss = bal.z_loss;
    l.aux_seq_len = c.T;
    l.aux_counts = c.global ? global.data() : nullptr;
    std::vector<float> s(NE), cgate(M), gate(M), dz(NE, 7.0f);
    std::vector<int> cexp(M), offsets(E + 1), routed(E), token(M), choice(M), tok_off(N + 1), tok_assign(M);
    be->router_topk_forward(s.data(), cexp.data(), cgate.data(), z.data(), c.bias ? bias.data() : nullptr, a);
    be->router_plan_build(offsets.data(), routed.data(), token.data(), gate.data(), choice.data(), tok_off.data(),
                          tok_assign.data(), cexp.data(), cgate.data(), a);
    const RouterLosses L = be->router_balance_forward(z.data(), s.data(), cexp.data(), cgate.data(), a, l);
    be->router_topk_backward(dz.data(), dgate_a.data(), choice.data(), offsets[E], z.data(), s.data(), cexp.data(), a,
                             l, 0.75f);

    CHECK(same(r.s, s.data(), NE));
    CHECK(same(r.choice_expert, cexp.data(), M));
    CHECK(same(r.choice_gate, cgate.data(), M));
    CHECK(same(r.plan.offsets, offsets.data(), E + 1));
    for (int e = 0; e < E; e++) CHECK(r.routed[e] == routed[e]);
    CHECK(same(r.plan.token, token.data(), A));
    CHECK(same(r.plan.gate, gate.data(), A));
    CHECK(same(r.plan.choice, choice.data(), A));
    CHECK(same(r.plan.tok_offsets, tok_off.data(), N + 1));
    CHECK(same(r.plan.tok_assign, tok_assign.data(), A));
    CHECK(L.aux == st.aux);
    CHECK(L.z == st.z);
    CHECK(L.z_sum == st.z_mean_sum);
    CHECK(same(bg.dz, dz.data(), NE));
    if (c.cap > 0) for (int e = 0; e < E; e++) CHECK(offsets[e + 1] - offsets[e] <= c.cap);
}

}  // namespace

TEST_CASE("router ops: the CPU backend's routing ops are the inline host routing calls, bit for bit") {
    uint32_t seed = 1;
    check_case({64, 8, 2}, seed++);
    { Case c{300, 67, 3}; c.sigmoid = true; c.bias = true; c.cap = 9; check_case(c, seed++); }
    { Case c{257, 64, 6}; c.groups = 8; c.topk_groups = 3; c.bias = true; check_case(c, seed++); }
    { Case c{512, 16, 4}; c.cap = 100; c.by_probs = false; c.T = 128; check_case(c, seed++); }
    { Case c{200, 24, 1}; c.normalize = false; c.scale = 2.5f; c.global = true; c.cap = 5; check_case(c, seed++); }
    // sequence scope with tokens past the last whole sequence (no aux term for them), and fewer
    // tokens than one sequence (no aux term at all)
    { Case c{300, 16, 2}; c.T = 128; check_case(c, seed++); }
    { Case c{200, 8, 2}; c.T = 128; check_case(c, seed++); }
    { Case c{100, 8, 2}; c.T = 128; check_case(c, seed++); }
    // the quickstart's shape with 64 experts, and sequences: many tokens per thread
    check_case({2048, 64, 2}, seed++);
    { Case c{2048, 64, 2}; c.T = 256; c.bias = true; check_case(c, seed++); }
}

TEST_CASE("router ops: expf_libm (the CUDA router's exp) is glibc's expf bit for bit") {
    long bad = 0;
    float first_bad = 0;
    for (uint64_t u = 0; u <= 0xffffffffull; u += 97) {   // every 97th float: all ranges, specials nearby
        uint32_t b = (uint32_t)u;
        float x;
        std::memcpy(&x, &b, 4);
        const float want = std::exp(x), got = expf_libm(x);
        if (std::memcmp(&want, &got, 4) != 0 && !(std::isnan(want) && std::isnan(got)) && bad++ == 0) first_bad = x;
    }
    for (float x : {0.0f, -0.0f, 1.0f, -1.0f, 88.0f, 88.72f, 89.0f, -87.0f, -103.9f, -104.0f, -200.0f, INFINITY,
                    -INFINITY}) {
        const float want = std::exp(x), got = expf_libm(x);
        if (std::memcmp(&want, &got, 4) != 0 && bad++ == 0) first_bad = x;
    }
    // and router_scores (not only this file's std::exp) uses that expf, in the order the CUDA kernel sums
    std::vector<float> z = {0.3f, -1.7f, 2.9f, 0.0f, -0.4f, 1.1f, -3.3f, 0.8f, 5.5f, -0.05f, 0.61f};
    const int E = (int)z.size();
    for (bool sig : {false, true}) {
        std::vector<float> s;
        router_scores(s, z, 1, E, sig);
        float mx = *std::max_element(z.begin(), z.end()), sum = 0.0f;
        std::vector<float> want(E);
        for (int e = 0; e < E; e++) {
            want[e] = sig ? 1.0f / (1.0f + expf_libm(-z[e])) : expf_libm(z[e] - mx);
            sum += want[e];
        }
        if (!sig) for (float& w : want) w /= sum;
        CHECK(same(want, s.data(), E));
    }
#if defined(__AVX512F__)
    // the 16-lane form the host's router_scores uses: same sweep, 16 arguments at a time
    long bad16 = 0;
    float first_bad16 = 0;
    for (uint64_t u0 = 0; u0 <= 0xffffffffull; u0 += 97 * 16) {
        alignas(64) float x[16], got[16];
        for (int i = 0; i < 16; i++) {
            const uint32_t b = (uint32_t)(u0 + 97 * i);
            std::memcpy(&x[i], &b, 4);
        }
        _mm512_store_ps(got, expf_libm16(_mm512_load_ps(x)));
        for (int i = 0; i < 16; i++) {
            const float want = std::exp(x[i]);
            if (std::memcmp(&want, &got[i], 4) != 0 && !(std::isnan(want) && std::isnan(got[i])) && bad16++ == 0)
                first_bad16 = x[i];
        }
    }
    INFO("expf_libm16 differs from glibc's expf (first at x = " << first_bad16 << ")");
    CHECK(bad16 == 0);
#endif
    // and router_scores on rows long enough for the 16-lane path, with a tail
    for (bool sig : {false, true}) {
        std::mt19937 g(7);
        std::normal_distribution<float> nd(0.0f, 4.0f);
        std::vector<float> zz(37);
        for (float& v : zz) v = nd(g);
        zz[3] = 95.0f;   // a lane for the scalar special cases
        std::vector<float> s2;
        router_scores(s2, zz, 1, 37, sig);
        float mx = *std::max_element(zz.begin(), zz.end()), sum = 0.0f;
        std::vector<float> want(37);
        for (int e = 0; e < 37; e++) {
            want[e] = sig ? 1.0f / (1.0f + std::exp(-zz[e])) : std::exp(zz[e] - mx);
            sum += want[e];
        }
        if (!sig) for (float& w : want) w /= sum;
        CHECK(same(want, s2.data(), 37));
    }
    INFO("glibc's expf differs from expf_libm (first at x = " << first_bad << "): the CUDA router's scores would "
         "not be this host's bits (docs/cuda.md, Routing)");
    CHECK(bad == 0);
}

TEST_CASE("router ops: topk_row picks the k largest, best first, ties to the lower expert") {
    // against a stable sort by value (descending); rows with many exact ties and -inf entries,
    // expert counts around the 16-lane width; also the generic arg-max rounds of the group path
    std::mt19937 g(11);
    std::uniform_int_distribution<int> level(-3, 3);
    TopkScratch w;
    for (int E : {1, 2, 5, 15, 16, 17, 33, 64, 100}) {
        for (int k = 1; k <= std::min(E, 9); k++) {
            for (int rep = 0; rep < 20; rep++) {
                std::vector<float> v(E);
                for (float& x : v) x = rep % 3 == 0 ? (float)level(g) : (float)level(g) * 0.37f + 0.01f * (float)level(g);
                if (rep % 5 == 1) v[(size_t)rep % E] = -INFINITY;
                if (rep % 7 == 2) std::fill(v.begin(), v.end(), -INFINITY);
                std::vector<int> order(E);
                std::iota(order.begin(), order.end(), 0);
                std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return v[a] > v[b]; });
                std::vector<int> got(k, -1);
                topk_row(got.data(), v.data(), E, k, 1, 1, w);
                CAPTURE(E); CAPTURE(k); CAPTURE(rep);
                CHECK(std::equal(got.begin(), got.end(), order.begin()));
                // every expert its own group and every group kept: the generic arg-max rounds
                std::vector<int> rounds(k, -1);
                topk_row(rounds.data(), v.data(), E, k, E, E, w);
                CHECK(rounds == got);
                // NaN scores (a diverging step, before the nonfinite guard sees its loss): still k
                // distinct experts, never an index out of range
                if (rep % 4 == 3) {
                    v[(size_t)(rep * 7) % E] = NAN;
                    if (rep % 8 == 7) std::fill(v.begin(), v.end(), NAN);
                    std::vector<int> nan_pick(k, -1);
                    topk_row(nan_pick.data(), v.data(), E, k, 1, 1, w);
                    std::vector<int> sorted = nan_pick;
                    std::sort(sorted.begin(), sorted.end());
                    CHECK(sorted.front() >= 0);
                    CHECK(sorted.back() < E);
                    CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end());
                }
            }
        }
    }
}

TEST_CASE("router ops: sequence-scope aux loss has no gradient for tokens past the last whole sequence") {
    // N = 200 tokens, sequences of T = 128: one whole sequence and a tail of 72 tokens that no aux
    // term sees (balance_forward's P and counts cover whole sequences only), so the tail's score
    // gradients must stay zero; the same through the CPU backend's op, whose dz is checked against
    // the host functions' bits in check_case above
    const int N = 200, E = 8, k = 2, T = 128;
    std::mt19937 g(5);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    Routing r;
    r.N = N; r.E = E;
    r.z.resize((size_t)N * E);
    for (float& v : r.z) v = nd(g);
    router_scores(r.s, r.z, N, E, false);
    select_topk(r, r.s, k, 1, 1);
    BalanceConfig bal;
    bal.aux_loss = 0.01;
    bal.aux_scope = "sequence";
    BalanceGrads bg;
    bg.ds.assign((size_t)N * E, 0.0f);
    bg.dz.assign((size_t)N * E, 0.0f);
    balance_backward(bg, r, bal, k, T, {}, 1.0f);
    bool head_nonzero = false, tail_zero = true;
    for (int n = 0; n < N; n++)
        for (int e = 0; e < E; e++) {
            const float d = bg.ds[(size_t)n * E + e];
            if (n < T) head_nonzero |= d != 0.0f;
            else tail_zero &= d == 0.0f;
        }
    CHECK(head_nonzero);
    CHECK(tail_zero);
}
