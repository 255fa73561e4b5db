/* Tests of the CPU ops (src/ops_cpu.h): forward against naive double-precision references
   written here from the math, every backward against central finite differences of those
   references, and the backward contract (accumulate with +=, nullptr gradients skipped).

   Gradient check: L(x) = sum(f(x) .* R) with a fixed random R, so dL/dout = R is what we feed
   the backward op. The numeric gradient is a central difference of the DOUBLE reference with
   h = 1e-3 on O(1) inputs: truncation error ~h^2/6 * f''' ~ 1e-7 relative and round-off
   ~1e-16/h ~ 1e-13, so it is the true gradient to ~1e-7. The analytic gradient is float: sums of
   a few dozen terms carry ~1e-6 relative error, more where terms cancel, hence the tolerance
   (see grad_close): 1e-4 relative, with entries near zero judged against 1% of the gradient's
   largest entry. Observed worst cases are 1e-8..2e-5, and a 1% error is 100x over the limit:
   the test "the gradient comparison catches a 1% error" shows it is detected. */
#include <doctest/doctest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <vector>

#include "ops_cpu.h"
#include "ops_moe_cpu.h"

using namespace moe;
using vecf = std::vector<float>;
using vecd = std::vector<double>;

namespace {

vecf rand_vec(size_t n, unsigned seed, float lo = -1.0f, float hi = 1.0f) {
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> u(lo, hi);
    vecf v(n);
    for (auto& x : v) x = u(g);
    return v;
}
vecd to_d(const vecf& v) { return vecd(v.begin(), v.end()); }
double dot(const vecd& a, const vecf& b) {
    double s = 0;
    for (size_t i = 0; i < a.size(); i++) s += a[i] * b[i];
    return s;
}
double max_abs(const double* v, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) m = std::max(m, std::fabs(v[i]));
    return m;
}

// |a - n| <= rtol * (|n| + 1e-2 * max|n|) for every entry (see the header comment).
bool grad_close(const float* a, const double* n, size_t len, const char* what,
                double rtol = 1e-4, bool quiet = false) {
    const double floor = 1e-2 * max_abs(n, len) + 1e-30;
    double worst = 0;
    size_t at = 0;
    for (size_t i = 0; i < len; i++) {
        const double e = std::fabs(a[i] - n[i]) / (std::fabs(n[i]) + floor);
        if (!(e <= worst)) worst = e, at = i;  // NaN counts as worst
    }
    const bool ok = worst <= rtol;
    if (!ok && !quiet)
        std::printf("  %s: entry %zu analytic %.8g expected %.8g (rel err %.3g > %.1g)\n", what, at,
                    (double)a[at], n[at], worst, rtol);
    return ok;
}
bool grad_close(const vecf& a, const vecd& n, const char* what, double rtol = 1e-4) {
    REQUIRE(a.size() == n.size());
    return grad_close(a.data(), n.data(), a.size(), what, rtol);
}

// dL/dx of L = loss(x) by central differences in double.
vecd numeric_grad(vecd x, const std::function<double(const vecd&)>& loss, double h = 1e-3) {
    vecd g(x.size());
    for (size_t i = 0; i < x.size(); i++) {
        const double xi = x[i];
        x[i] = xi + h;
        const double lp = loss(x);
        x[i] = xi - h;
        const double lm = loss(x);
        x[i] = xi;
        g[i] = (lp - lm) / (2 * h);
    }
    return g;
}

// The backward contract, for a backward op given as bw(grads) over k gradient buffers:
// from zero it gives g; twice gives 2g; from G0 it gives G0 + g; each gradient alone
// (others nullptr) gives the same g_j; all of them nullptr is a valid no-op call.
void check_backward_contract(const std::vector<size_t>& sizes,
                             const std::function<void(const std::vector<float*>&)>& bw) {
    const size_t k = sizes.size();
    std::vector<vecf> g(k), twice(k), g0(k), acc(k);
    std::vector<float*> pg(k), ptwice(k), pacc(k);
    for (size_t j = 0; j < k; j++) {
        g[j].assign(sizes[j], 0.0f);
        twice[j].assign(sizes[j], 0.0f);
        g0[j] = rand_vec(sizes[j], 100 + (unsigned)j);
        acc[j] = g0[j];
        pg[j] = g[j].data(), ptwice[j] = twice[j].data(), pacc[j] = acc[j].data();
    }
    bw(pg);
    bw(ptwice);
    bw(ptwice);
    bw(pacc);
    bw(std::vector<float*>(k, nullptr));
    for (size_t j = 0; j < k; j++) {
        vecd want2(sizes[j]), want_acc(sizes[j]);
        for (size_t i = 0; i < sizes[j]; i++) {
            want2[i] = 2.0 * g[j][i];
            want_acc[i] = (double)g0[j][i] + g[j][i];
        }
        CHECK(max_abs(want2.data(), sizes[j]) > 0);  // the op did write something
        // the only differences are the float roundings of adding onto G0 (or g) instead of 0:
        // ~6e-8 of |G0| ~ 1, judged against grad_close's floor (1% of the largest entry), so
        // up to ~1e-5; a missing or doubled accumulation is an O(1) error
        CHECK(grad_close(twice[j], want2, "backward twice = 2 x once", 1e-5));
        CHECK(grad_close(acc[j], want_acc, "backward onto G0 = G0 + g", 1e-5));
        std::vector<float*> only(k, nullptr);
        vecf alone(sizes[j], 0.0f);
        only[j] = alone.data();
        bw(only);
        CHECK(alone == g[j]);  // same arithmetic, whatever else is skipped
    }
}

// --- double-precision references, straight from the definitions --------------------------

vecd ref_matmul(const vecd& x, const vecd& w, const vecd* bias, int N, int C, int OC) {
    vecd out((size_t)N * OC);
    for (int n = 0; n < N; n++)
        for (int o = 0; o < OC; o++) {
            double s = bias ? (*bias)[o] : 0.0;
            for (int c = 0; c < C; c++) s += x[(size_t)n * C + c] * w[(size_t)o * C + c];
            out[(size_t)n * OC + o] = s;
        }
    return out;
}

vecd ref_layernorm(const vecd& x, const vecd& w, const vecd& b, int N, int C) {
    vecd out(x.size());
    for (int n = 0; n < N; n++) {
        const double* r = &x[(size_t)n * C];
        double m = 0, v = 0;
        for (int c = 0; c < C; c++) m += r[c];
        m /= C;
        for (int c = 0; c < C; c++) v += (r[c] - m) * (r[c] - m);
        v /= C;  // biased
        for (int c = 0; c < C; c++)
            out[(size_t)n * C + c] = (r[c] - m) / std::sqrt(v + 1e-5) * w[c] + b[c];
    }
    return out;
}

vecd ref_attention(const vecd& qkv, int B, int T, int C, int NH) {
    const int hs = C / NH;
    vecd out((size_t)B * T * C, 0.0);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < NH; h++)
            for (int t = 0; t < T; t++) {
                auto at = [&](int tt, int part, int i) {
                    return qkv[((size_t)b * T + tt) * 3 * C + part * C + h * hs + i];
                };
                vecd s(t + 1);
                double mx = -1e300, sum = 0;
                for (int t2 = 0; t2 <= t; t2++) {
                    double d = 0;
                    for (int i = 0; i < hs; i++) d += at(t, 0, i) * at(t2, 1, i);
                    s[t2] = d / std::sqrt((double)hs);
                    mx = std::max(mx, s[t2]);
                }
                for (int t2 = 0; t2 <= t; t2++) sum += (s[t2] = std::exp(s[t2] - mx));
                for (int t2 = 0; t2 <= t; t2++)
                    for (int i = 0; i < hs; i++)
                        out[((size_t)b * T + t) * C + h * hs + i] += s[t2] / sum * at(t2, 2, i);
            }
    return out;
}

double ref_gelu(double x) {
    return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

// -log softmax(z)[target] per row
vecd ref_ce(const vecd& z, const std::vector<int>& tgt, int N, int V) {
    vecd loss(N);
    for (int n = 0; n < N; n++) {
        const double* r = &z[(size_t)n * V];
        const double mx = *std::max_element(r, r + V);
        double s = 0;
        for (int v = 0; v < V; v++) s += std::exp(r[v] - mx);
        loss[n] = std::log(s) + mx - r[tgt[n]];
    }
    return loss;
}

}  // namespace

// ------------------------------------------------------------------------------------------

TEST_CASE("ops: the gradient comparison catches a 1% error") {
    const int N = 7, C = 5, OC = 3;
    vecf x = rand_vec(N * C, 1), w = rand_vec(OC * C, 2), R = rand_vec(N * OC, 3);
    vecf dw(OC * C, 0.0f);
    matmul_backward(nullptr, dw.data(), nullptr, R.data(), x.data(), w.data(), N, C, OC);
    const vecd xd = to_d(x);
    vecd num = numeric_grad(to_d(w), [&](const vecd& wd) {
        return dot(ref_matmul(xd, wd, nullptr, N, C, OC), R);
    });
    REQUIRE(grad_close(dw, num, "dweight"));
    // 1% off in the largest entry, then 1% off everywhere: both must fail
    vecf bad = dw;
    size_t imax = 0;
    for (size_t i = 0; i < bad.size(); i++)
        if (std::fabs(bad[i]) > std::fabs(bad[imax])) imax = i;
    bad[imax] *= 1.01f;
    CHECK_FALSE(grad_close(bad.data(), num.data(), bad.size(), "", 1e-4, true));
    bad = dw;
    for (auto& v : bad) v *= 1.01f;
    CHECK_FALSE(grad_close(bad.data(), num.data(), bad.size(), "", 1e-4, true));
}

TEST_CASE("ops: encoder forward and gradients") {
    const int B = 2, T = 5, C = 5, V = 7, maxT = 6;
    const std::vector<int> inp = {3, 1, 3, 6, 0, 2, 3, 5, 1, 1};  // repeats: rows of dwte add up
    vecf wte = rand_vec(V * C, 1), wpe = rand_vec(maxT * C, 2), R = rand_vec(B * T * C, 3);
    auto ref = [&](const vecd& te, const vecd& pe) {
        vecd out((size_t)B * T * C);
        for (int i = 0; i < B * T; i++)
            for (int c = 0; c < C; c++)
                out[(size_t)i * C + c] = te[(size_t)inp[i] * C + c] + pe[(size_t)(i % T) * C + c];
        return out;
    };
    vecf out(B * T * C);
    encoder_forward(out.data(), inp.data(), wte.data(), wpe.data(), B, T, C);
    CHECK(grad_close(out, ref(to_d(wte), to_d(wpe)), "encoder out", 1e-6));

    vecf dwte(V * C, 0.0f), dwpe(maxT * C, 0.0f);
    encoder_backward(dwte.data(), dwpe.data(), R.data(), inp.data(), B, T, C);
    const vecd te = to_d(wte), pe = to_d(wpe);
    CHECK(grad_close(dwte, numeric_grad(te, [&](const vecd& x) { return dot(ref(x, pe), R); }),
                     "dwte"));
    CHECK(grad_close(dwpe, numeric_grad(pe, [&](const vecd& x) { return dot(ref(te, x), R); }),
                     "dwpe"));
    check_backward_contract({dwte.size(), dwpe.size()}, [&](const std::vector<float*>& g) {
        encoder_backward(g[0], g[1], R.data(), inp.data(), B, T, C);
    });
}

TEST_CASE("ops: layernorm forward (eps 1e-5, biased variance) and gradients") {
    const int N = 7, C = 5;
    vecf x = rand_vec(N * C, 1), w = rand_vec(C, 2, 0.5f, 1.5f), b = rand_vec(C, 3),
         R = rand_vec(N * C, 4);
    // two rows with a tiny spread (variance ~1e-5): there eps weighs as much as the variance,
    // so a wrong eps or an unbiased variance shows up in the forward check
    for (int c = 0; c < C; c++) x[2 * C + c] = 0.3f + 0.005f * (float)(c - 2), x[5 * C + c] *= 0.005f;
    vecf out(N * C), mean(N), rstd(N);
    layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C);
    const vecd xd = to_d(x), wd = to_d(w), bd = to_d(b);
    // float forward vs double: a few roundings of O(1) numbers, ~1e-7 relative, except that
    // the tiny-spread rows subtract a mean of ~0.3 from values 0.005 apart (ulp(0.3) / 0.005
    // ~ 1e-5 at worst). A wrong eps moves those rows by ~30%, an unbiased variance all by ~10%.
    CHECK(grad_close(out, ref_layernorm(xd, wd, bd, N, C), "layernorm out", 1e-5));

    vecf dx(N * C, 0.0f), dw(C, 0.0f), db(C, 0.0f);
    layernorm_backward(dx.data(), dw.data(), db.data(), R.data(), x.data(), w.data(), mean.data(),
                       rstd.data(), N, C);
    auto L = [&](const vecd& x_, const vecd& w_, const vecd& b_) {
        return dot(ref_layernorm(x_, w_, b_, N, C), R);
    };
    // the tiny-spread rows have rstd ~300, so their dx is large and h must be small there
    CHECK(grad_close(dx, numeric_grad(xd, [&](const vecd& v) { return L(v, wd, bd); }, 1e-6), "dinp"));
    CHECK(grad_close(dw, numeric_grad(wd, [&](const vecd& v) { return L(xd, v, bd); }), "dweight"));
    CHECK(grad_close(db, numeric_grad(bd, [&](const vecd& v) { return L(xd, wd, v); }), "dbias"));
    check_backward_contract({dx.size(), dw.size(), db.size()}, [&](const std::vector<float*>& g) {
        layernorm_backward(g[0], g[1], g[2], R.data(), x.data(), w.data(), mean.data(), rstd.data(),
                           N, C);
    });
}

TEST_CASE("ops: matmul gradients on a small odd shape") {
    const int N = 7, C = 5, OC = 3;
    vecf x = rand_vec(N * C, 1), w = rand_vec(OC * C, 2), bias = rand_vec(OC, 3),
         R = rand_vec(N * OC, 4);
    const vecd xd = to_d(x), wd = to_d(w), bd = to_d(bias);
    for (bool with_bias : {true, false}) {
        CAPTURE(with_bias);
        vecf out(N * OC, 123.0f);  // forward overwrites
        matmul_forward(out.data(), x.data(), w.data(), with_bias ? bias.data() : nullptr, N, C, OC);
        CHECK(grad_close(out, ref_matmul(xd, wd, with_bias ? &bd : nullptr, N, C, OC), "out", 1e-6));
    }
    vecf dx(N * C, 0.0f), dw(OC * C, 0.0f), db(OC, 0.0f);
    matmul_backward(dx.data(), dw.data(), db.data(), R.data(), x.data(), w.data(), N, C, OC);
    auto L = [&](const vecd& x_, const vecd& w_, const vecd& b_) {
        return dot(ref_matmul(x_, w_, &b_, N, C, OC), R);
    };
    CHECK(grad_close(dx, numeric_grad(xd, [&](const vecd& v) { return L(v, wd, bd); }), "dinp"));
    CHECK(grad_close(dw, numeric_grad(wd, [&](const vecd& v) { return L(xd, v, bd); }), "dweight"));
    CHECK(grad_close(db, numeric_grad(bd, [&](const vecd& v) { return L(xd, wd, v); }), "dbias"));
    check_backward_contract({dx.size(), dw.size(), db.size()}, [&](const std::vector<float*>& g) {
        matmul_backward(g[0], g[1], g[2], R.data(), x.data(), w.data(), N, C, OC);
    });
}

TEST_CASE("ops: matmul on larger odd shapes vs naive double loops") {
    // (67, 129, 65): edge tiles in every direction; (301, 263, 37): K > 256 in the forward
    // (K = C) and in dweight (K = N), so the K-blocked accumulation is exercised.
    const int shapes[][3] = {{67, 129, 65}, {301, 263, 37}, {1, 1, 1}};
    for (auto& s : shapes) {
        const int N = s[0], C = s[1], OC = s[2];
        CAPTURE(N);
        CAPTURE(C);
        CAPTURE(OC);
        vecf x = rand_vec((size_t)N * C, 1), w = rand_vec((size_t)OC * C, 2), b = rand_vec(OC, 3),
             dout = rand_vec((size_t)N * OC, 4);
        const vecd xd = to_d(x), wd = to_d(w), bd = to_d(b);
        vecf out((size_t)N * OC);
        matmul_forward(out.data(), x.data(), w.data(), b.data(), N, C, OC);
        // float dot products of length K ~ 300 with O(1) terms: ~1e-6 relative, cancellation
        // aside; the floor in grad_close takes care of near-zero outputs
        CHECK(grad_close(out, ref_matmul(xd, wd, &bd, N, C, OC), "out", 1e-4));
        vecf dx((size_t)N * C, 0.0f), dw((size_t)OC * C, 0.0f), db(OC, 0.0f);
        matmul_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(), N, C, OC);
        vecd rdx((size_t)N * C, 0.0), rdw((size_t)OC * C, 0.0), rdb(OC, 0.0);
        for (int n = 0; n < N; n++)
            for (int o = 0; o < OC; o++) {
                const double d = dout[(size_t)n * OC + o];
                rdb[o] += d;
                for (int c = 0; c < C; c++) {
                    rdx[(size_t)n * C + c] += d * wd[(size_t)o * C + c];
                    rdw[(size_t)o * C + c] += d * xd[(size_t)n * C + c];
                }
            }
        CHECK(grad_close(dx, rdx, "dinp", 1e-4));
        CHECK(grad_close(dw, rdw, "dweight", 1e-4));
        CHECK(grad_close(db, rdb, "dbias", 1e-4));
    }
}

TEST_CASE("ops: results do not depend on the number of threads") {
    const int N = 301, C = 263, OC = 37, T = 70, NH = 3, B = 2;
    vecf x = rand_vec((size_t)N * C, 1), w = rand_vec((size_t)OC * C, 2), d = rand_vec((size_t)N * OC, 3),
         lw = rand_vec(C, 4), lb = rand_vec(C, 5), dl = rand_vec((size_t)N * C, 6),
         qkv = rand_vec((size_t)B * T * 3 * 21, 7), da = rand_vec((size_t)B * T * 21, 8);
    auto run = [&]() {
        vecf out((size_t)N * OC), dx((size_t)N * C), dw((size_t)OC * C), db(OC), mean(N), rstd(N),
            ln((size_t)N * C), lx((size_t)N * C), ldw(C), ldb(C), ao((size_t)B * T * 21),
            pre((size_t)B * NH * T * T), att(pre.size()), dpre(pre.size()), datt(pre.size()),
            dqkv(qkv.size());
        matmul_forward(out.data(), x.data(), w.data(), nullptr, N, C, OC);
        matmul_backward(dx.data(), dw.data(), db.data(), d.data(), x.data(), w.data(), N, C, OC);
        layernorm_forward(ln.data(), mean.data(), rstd.data(), x.data(), lw.data(), lb.data(), N, C);
        layernorm_backward(lx.data(), ldw.data(), ldb.data(), dl.data(), x.data(), lw.data(),
                           mean.data(), rstd.data(), N, C);
        attention_forward(ao.data(), pre.data(), att.data(), qkv.data(), B, T, 21, NH);
        attention_backward(dqkv.data(), dpre.data(), datt.data(), da.data(), qkv.data(), att.data(),
                           B, T, 21, NH);
        return std::vector<vecf>{out, dx, dw, db, ln, lx, ldw, ldb, ao, dqkv};
    };
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    const auto one = run();
    omp_set_num_threads(std::max(saved, 3));
    const auto many = run();
    omp_set_num_threads(saved);
    for (size_t i = 0; i < one.size(); i++) {
        CAPTURE(i);
        CHECK(one[i] == many[i]);  // bitwise
    }
}

// The grouped expert GEMM must be exactly a matmul per block (matmul itself is checked above
// against double loops and finite differences): blocks out of expert order, an expert with two
// blocks (expert parallel), empty blocks, blocks longer than one row task, OC over one dweight
// task, outputs pre-filled (the backward accumulates), and the same bits for 1 and 3 threads.
TEST_CASE("ops: grouped expert GEMM equals one matmul per block, bit for bit, any thread count") {
    const int E = 5, C = 37, OC = 131;
    const std::vector<GroupBlock> blocks = {{3, 0, 300}, {0, 300, 7}, {4, 307, 0}, {1, 307, 129},
                                            {3, 436, 41}, {2, 477, 1}};
    const int R = 478;
    const vecf x = rand_vec((size_t)R * C, 11), w = rand_vec((size_t)E * OC * C, 12), b = rand_vec((size_t)E * OC, 13),
               d = rand_vec((size_t)R * OC, 14), dx0 = rand_vec((size_t)R * C, 15),
               dw0 = rand_vec((size_t)E * OC * C, 16), db0 = rand_vec((size_t)E * OC, 17);
    // reference: per-block matmuls
    vecf out_ref((size_t)R * OC), dx_ref = dx0, dw_ref = dw0, db_ref = db0;
    for (const GroupBlock& g : blocks) {
        const size_t r0 = g.row0, e = g.expert;
        matmul_forward(out_ref.data() + r0 * OC, x.data() + r0 * C, w.data() + e * OC * C, b.data() + e * OC, g.rows,
                       C, OC);
        matmul_backward(dx_ref.data() + r0 * C, dw_ref.data() + e * OC * C, db_ref.data() + e * OC,
                        d.data() + r0 * OC, x.data() + r0 * C, w.data() + e * OC * C, g.rows, C, OC);
    }
    const int saved = omp_get_max_threads();
    for (int threads : {1, 3}) {
        CAPTURE(threads);
        omp_set_num_threads(threads);
        vecf out((size_t)R * OC), dx = dx0, dw = dw0, db = db0;
        grouped_matmul_forward(out.data(), x.data(), w.data(), b.data(), blocks.data(), (int)blocks.size(), C, OC);
        grouped_matmul_backward(dx.data(), dw.data(), db.data(), d.data(), x.data(), w.data(), blocks.data(),
                                (int)blocks.size(), C, OC);
        CHECK(out == out_ref);
        CHECK(dx == dx_ref);
        CHECK(dw == dw_ref);
        CHECK(db == db_ref);
    }
    omp_set_num_threads(saved);
}

TEST_CASE("ops: attention forward and gradients") {
    // (2, 5, 6, 2): head size 3, one query block; (1, 70, 4, 2): T past the 64-row query
    // blocks of the implementation, so later blocks and the key-side split are exercised
    const int shapes[][4] = {{2, 5, 6, 2}, {1, 70, 4, 2}};
    for (auto& sh : shapes) {
        const int B = sh[0], T = sh[1], C = sh[2], NH = sh[3];
        CAPTURE(T);
        vecf qkv = rand_vec((size_t)B * T * 3 * C, 1, -2.0f, 2.0f), R = rand_vec((size_t)B * T * C, 2);
        const size_t natt = (size_t)B * NH * T * T;
        vecf out((size_t)B * T * C, NAN), pre(natt, NAN), att(natt, NAN);  // all overwritten
        attention_forward(out.data(), pre.data(), att.data(), qkv.data(), B, T, C, NH);
        const vecd qd = to_d(qkv);
        // float dot products of a few terms and a softmax: ~1e-7 relative
        CHECK(grad_close(out, ref_attention(qd, B, T, C, NH), "attention out", 1e-5));
        // rows of att are causal distributions; masked entries are 0
        for (size_t r = 0; r < natt / T; r++) {
            const int t = (int)(r % T);
            double s = 0;
            for (int t2 = 0; t2 < T; t2++) {
                if (t2 > t) CHECK(att[r * T + t2] == 0.0f);
                s += att[r * T + t2];
            }
            CHECK(s == doctest::Approx(1.0).epsilon(1e-6));
        }
        // huge scores: the max subtraction keeps the softmax finite
        vecf big = qkv;
        for (auto& v : big) v *= 100.0f;
        vecf out_big(out.size());
        attention_forward(out_big.data(), pre.data(), att.data(), big.data(), B, T, C, NH);
        CHECK(grad_close(out_big, ref_attention(to_d(big), B, T, C, NH), "attention out (large)", 1e-4));
        attention_forward(out.data(), pre.data(), att.data(), qkv.data(), B, T, C, NH);

        // the scratch is written in full (masked entries as 0): NaN garbage must not leak
        vecf dqkv(qkv.size(), 0.0f), dpre(natt, NAN), datt(natt, NAN);
        attention_backward(dqkv.data(), dpre.data(), datt.data(), R.data(), qkv.data(), att.data(),
                           B, T, C, NH);
        CHECK(grad_close(dqkv, numeric_grad(qd, [&](const vecd& v) {
                             return dot(ref_attention(v, B, T, C, NH), R);
                         }),
                         "dqkv"));
        check_backward_contract({dqkv.size()}, [&](const std::vector<float*>& g) {
            attention_backward(g[0], dpre.data(), datt.data(), R.data(), qkv.data(), att.data(), B,
                               T, C, NH);
        });
    }
}

TEST_CASE("ops: gelu (tanh approximation) forward and gradient") {
    // a grid over [-12, 12] (exp's clamped range and both tails) plus random points
    vecf x = rand_vec(37, 1, -4.0f, 4.0f);
    for (int i = -240; i <= 240; i++) x.push_back(0.05f * (float)i);
    for (float v : {-100.0f, -30.0f, 30.0f, 100.0f, 1e-20f, -1e-20f}) x.push_back(v);
    const size_t n = x.size();
    vecf out(n), R = rand_vec(n, 2);
    gelu_forward(out.data(), x.data(), n);
    // relative 1e-6 (the erf GELU differs by up to 1e-3 absolute and a coefficient off in the
    // 4th digit by ~1e-5 relative, so both would fail) plus 1e-9 absolute: in the negative tail
    // gelu ~ x exp(-2u) turns float's rounding of u into a relative error 2|u| * 6e-8, ~1e-6 at
    // x = -4.5 where gelu ~ -5e-6; past that the values themselves drop below 1e-9.
    vecd ref(n);
    for (size_t i = 0; i < n; i++) ref[i] = ref_gelu(x[i]);
    for (size_t i = 0; i < n; i++) {
        CAPTURE(x[i]);
        CHECK(std::fabs(out[i] - ref[i]) <= 1e-6 * std::fabs(ref[i]) + 1e-9);
    }
    vecf dx(n, 0.0f);
    gelu_backward(dx.data(), x.data(), R.data(), n);
    const vecd num = numeric_grad(to_d(x), [&](const vecd& v) {
        double s = 0;
        for (size_t i = 0; i < v.size(); i++) s += ref_gelu(v[i]) * R[i];
        return s;
    }, 1e-5);  // small h: GELU's curvature is large near 0 relative to its gradient
    // elementwise op: each entry is judged on its own scale (the floor is 1% of the largest)
    CHECK(grad_close(dx, num, "gelu dinp", 1e-4));
    for (size_t i = 0; i < n; i++) CHECK(std::isfinite(dx[i]));
    check_backward_contract({n}, [&](const std::vector<float*>& g) {
        gelu_backward(g[0], x.data(), R.data(), n);
    });
}

TEST_CASE("ops: residual forward and gradients") {
    const size_t n = 37;
    vecf a = rand_vec(n, 1), b = rand_vec(n, 2), R = rand_vec(n, 3), out(n);
    residual_forward(out.data(), a.data(), b.data(), n);
    for (size_t i = 0; i < n; i++) CHECK(out[i] == a[i] + b[i]);
    vecf da(n, 0.0f), db(n, 0.0f);
    residual_backward(da.data(), db.data(), R.data(), n);
    const vecd rd = to_d(R);  // d/da sum((a+b) R) = R, exactly
    CHECK(grad_close(da, rd, "da", 0.0));
    CHECK(grad_close(db, rd, "db", 0.0));
    check_backward_contract({n, n}, [&](const std::vector<float*>& g) {
        residual_backward(g[0], g[1], R.data(), n);
    });
}

TEST_CASE("ops: cross-entropy forward vs double log-softmax, dlogits vs FD of the mean loss") {
    const int N = 7, V = 11;
    vecf z = rand_vec((size_t)N * V, 1, -3.0f, 3.0f);
    const std::vector<int> tgt = {0, 10, 3, 3, 7, 1, 5};
    vecf losses(N), probs((size_t)N * V);
    crossentropy_softmax_forward(losses.data(), probs.data(), z.data(), tgt.data(), N, V);
    const vecd zd = to_d(z);
    CHECK(grad_close(losses, ref_ce(zd, tgt, N, V), "losses", 1e-6));
    vecf only_loss(N);  // probs may be skipped (eval)
    crossentropy_softmax_forward(only_loss.data(), nullptr, z.data(), tgt.data(), N, V);
    CHECK(grad_close(only_loss, to_d(losses), "losses without probs", 1e-6));
    for (int n = 0; n < N; n++) {
        double s = 0;
        for (int v = 0; v < V; v++) s += probs[(size_t)n * V + v];
        CHECK(s == doctest::Approx(1.0).epsilon(1e-6));
    }
    // huge logits: the max subtraction keeps exp finite, and a target whose probability
    // underflows to 0 still gets its finite loss (~1e3)
    vecf zb = z;
    for (auto& v : zb) v *= 500.0f;
    vecf lb(N);
    crossentropy_softmax_forward(lb.data(), probs.data(), zb.data(), tgt.data(), N, V);
    CHECK(grad_close(lb, ref_ce(to_d(zb), tgt, N, V), "losses (large logits)", 1e-5));
    crossentropy_softmax_forward(losses.data(), probs.data(), z.data(), tgt.data(), N, V);

    vecf dz((size_t)N * V, 0.0f);
    crossentropy_softmax_backward(dz.data(), probs.data(), tgt.data(), 1.0f / N, N, V);
    const vecd num = numeric_grad(zd, [&](const vecd& v) {
        const vecd l = ref_ce(v, tgt, N, V);
        double s = 0;
        for (double x : l) s += x;
        return s / N;
    });
    CHECK(grad_close(dz, num, "dlogits"));
    check_backward_contract({dz.size()}, [&](const std::vector<float*>& g) {
        crossentropy_softmax_backward(g[0], probs.data(), tgt.data(), 1.0f / N, N, V);
    });
}
