/* Every op of the CUDA backend against its CPU twin (the oracle), in fp32 and bf16 mode, on random
   and edge-case shapes: sizes that are not multiples of any tile (1, 17, 33, 129, ...), odd C/OC,
   T = 1 and T not a multiple of 64, several heads, V = 256 and 50257, MoE plans with empty
   experts, everything on one expert, dropped assignments, grouped GEMM blocks of zero rows, out of
   expert order and repeated per expert (as expert parallel lays them out), tensors at addresses
   that are not 16-byte aligned (the model's packed parameter views).

   Every case goes through check_op (gpu_util.h): outputs pre-filled with random values (backward
   ops must accumulate, forward ops must overwrite), compared with the tolerance of gpu_util.h
   (fp32: max(1e-5, 1e-6 sqrt(K)), bf16: 1e-2, relative to the tensor's scale), and a second CUDA
   run from the same state must give the same bits. Backward ops get their saved activations from
   the CPU forward, so each backward is judged on its own. */
#include "gpu_util.h"

#include <algorithm>
#include <cmath>
#include <vector>

using namespace gpu_test;

namespace {

#define BOTH_MODES(fn)                          \
    SUBCASE("fp32") { fn(env("fp32")); }        \
    SUBCASE("bf16") { fn(env("bf16")); }

// --------------------------------------------------------------------------------------------
// memory

void memory_ops(Env& e) {
    Backend& g = *e.gpu;
    const size_t n = 100003;
    float* a = g.alloc(n);
    float* b = g.alloc(n);
    std::vector<float> h(n);
    g.download(h.data(), a, n * sizeof(float));
    CHECK(std::all_of(h.begin(), h.end(), [](float x) { return x == 0.0f; }));  // alloc is zero-filled
    std::vector<float> v = randu(n, 1);
    g.upload(a, v.data(), n * sizeof(float));
    g.copy(b, a, n * sizeof(float));
    g.zero(b + 7, 1000 * sizeof(float));               // a sub-range at an odd offset
    g.download(h.data(), b, n * sizeof(float));
    std::vector<float> want = v;
    std::fill(want.begin() + 7, want.begin() + 1007, 0.0f);
    CHECK(same_bits(h, want));
    int* ib = g.alloc_int(5);
    std::vector<int> iv = {3, -1, 7, 0, 2147483647}, ih(5);
    g.upload(ib, iv.data(), sizeof(int) * 5);
    g.download(ih.data(), ib, sizeof(int) * 5);
    CHECK(ih == iv);
    g.free_bytes(a);
    g.free_bytes(b);
    g.free_bytes(ib);
}

// --------------------------------------------------------------------------------------------
// encoder

void encoder(Env& e, int B, int T, int C, int V, int maxT, uint32_t seed) {
    CAPTURE(B); CAPTURE(T); CAPTURE(C); CAPTURE(V);
    TwinI inp(e, randi((size_t)B * T, seed, 0, V));
    TwinF wte(e, randu((size_t)V * C, seed + 1)), wpe(e, randu((size_t)maxT * C, seed + 2));
    TwinF out(e, randu((size_t)B * T * C, seed + 3, -9, 9));
    check_op(e, [&](Backend& be, Side s) { be.encoder_forward(out[s], inp[s], wte[s], wpe[s], B, T, C); },
             {{"encoder out", &out, e.tol(2)}});
    TwinF dout(e, randu((size_t)B * T * C, seed + 4));
    TwinF dwte(e, randu((size_t)V * C, seed + 5)), dwpe(e, randu((size_t)maxT * C, seed + 6));
    check_op(e, [&](Backend& be, Side s) { be.encoder_backward(dwte[s], dwpe[s], dout[s], inp[s], B, T, C); },
             {{"encoder dwte", &dwte, e.tol(B * T)}, {"encoder dwpe", &dwpe, e.tol(B)}});
}

void encoder_all(Env& e) {
    encoder(e, 1, 1, 1, 5, 1, 10);
    encoder(e, 2, 17, 33, 11, 20, 20);      // few token ids: many rows hit the same dwte row
    encoder(e, 3, 64, 768, 50257, 64, 30);
    encoder(e, 4, 129, 96, 3, 130, 40);     // three ids over 516 positions
}

// --------------------------------------------------------------------------------------------
// layernorm

void layernorm(Env& e, int N, int C, uint32_t seed) {
    CAPTURE(N); CAPTURE(C);
    std::vector<float> x = randu((size_t)N * C, seed, -2, 2);
    for (int c = 0; c < C; c++) x[c] = 0.75f;  // a constant row: variance 0, rstd = 1/sqrt(eps)
    TwinF inp(e, x), w(e, randu(C, seed + 1, 0.5, 1.5), 1), b(e, randu(C, seed + 2), 1);
    TwinF out(e, randu((size_t)N * C, seed + 3, -9, 9)), mean(e, randu(N, seed + 4)), rstd(e, randu(N, seed + 5));
    check_op(e, [&](Backend& be, Side s) { be.layernorm_forward(out[s], mean[s], rstd[s], inp[s], w[s], b[s], N, C); },
             {{"layernorm out", &out, e.tol(C)}, {"layernorm mean", &mean, e.tol(C)}, {"layernorm rstd", &rstd, e.tol(C)}});
    check_op(e, [&](Backend& be, Side s) { be.layernorm_forward(out[s], nullptr, nullptr, inp[s], w[s], b[s], N, C); },
             {{"layernorm out (no mean/rstd)", &out, e.tol(C)}});
    // backward from the CPU forward's statistics
    TwinF m(e, mean.get(CPU)), r(e, rstd.get(CPU)), dout(e, randu((size_t)N * C, seed + 6));
    TwinF dinp(e, randu((size_t)N * C, seed + 7)), dw(e, randu(C, seed + 8)), db(e, randu(C, seed + 9));
    check_op(e, [&](Backend& be, Side s) {
        be.layernorm_backward(dinp[s], dw[s], db[s], dout[s], inp[s], w[s], m[s], r[s], N, C);
    }, {{"layernorm dinp", &dinp, e.tol(C)}, {"layernorm dweight", &dw, e.tol(N)}, {"layernorm dbias", &db, e.tol(N)}});
}

void layernorm_all(Env& e) {
    layernorm(e, 1, 1, 1);
    layernorm(e, 7, 33, 2);
    layernorm(e, 129, 768, 3);
    layernorm(e, 64, 1025, 4);
    layernorm(e, 2048, 768, 5);
}

// --------------------------------------------------------------------------------------------
// matmul

void matmul(Env& e, int N, int C, int OC, bool bias, size_t skew, uint32_t seed) {
    CAPTURE(N); CAPTURE(C); CAPTURE(OC); CAPTURE(bias); CAPTURE(skew);
    TwinF inp(e, randu((size_t)N * C, seed), skew), w(e, randu((size_t)OC * C, seed + 1), skew);
    TwinF b(e, randu(OC, seed + 2), skew), out(e, randu((size_t)N * OC, seed + 3, -9, 9), skew);
    check_op(e, [&](Backend& be, Side s) { be.matmul_forward(out[s], inp[s], w[s], bias ? b[s] : nullptr, N, C, OC); },
             {{"matmul out", &out, e.tol(C)}});
    TwinF dout(e, randu((size_t)N * OC, seed + 4), skew);
    TwinF dinp(e, randu((size_t)N * C, seed + 5), skew), dw(e, randu((size_t)OC * C, seed + 6), skew);
    TwinF db(e, randu(OC, seed + 7), skew);
    check_op(e, [&](Backend& be, Side s) {
        be.matmul_backward(dinp[s], dw[s], bias ? db[s] : nullptr, dout[s], inp[s], w[s], N, C, OC);
    }, {{"matmul dinp", &dinp, e.tol(OC)}, {"matmul dweight", &dw, e.tol(N)}, {"matmul dbias", &db, e.tol(N)}});
    // a null gradient is skipped (the model passes null biases; the contract allows any)
    check_op(e, [&](Backend& be, Side s) { be.matmul_backward(nullptr, dw[s], nullptr, dout[s], inp[s], w[s], N, C, OC); },
             {{"matmul dweight (dinp null)", &dw, e.tol(N)}, {"matmul dinp untouched", &dinp, 0.0}});
    check_op(e, [&](Backend& be, Side s) { be.matmul_backward(dinp[s], nullptr, nullptr, dout[s], inp[s], w[s], N, C, OC); },
             {{"matmul dinp (dweight null)", &dinp, e.tol(OC)}, {"matmul dweight untouched", &dw, 0.0}});
}

void matmul_all(Env& e) {
    matmul(e, 1, 1, 1, true, 0, 1);
    matmul(e, 1, 17, 129, true, 0, 2);
    matmul(e, 17, 33, 1, false, 0, 3);
    matmul(e, 129, 129, 17, true, 1, 4);      // every tensor at a 4-byte-aligned address only
    matmul(e, 127, 65, 257, false, 3, 5);
    matmul(e, 64, 64, 64, true, 0, 6);
    matmul(e, 256, 769, 3073, true, 0, 7);
    matmul(e, 1024, 768, 2304, true, 0, 8);   // GPT-2 small qkv, 1024 tokens
    matmul(e, 512, 768, 8, false, 0, 9);      // a router: OC = E
}

// --------------------------------------------------------------------------------------------
// attention

// Only out and dqkv are comparable: what the saved buffers hold is each backend's own
// (Backend::attention_buffer_floats; the CPU keeps the (B, NH, T, T) scores and probabilities, the
// CUDA flash kernel a log-sum-exp per row), so each backward runs on its own forward's buffers.
void attention(Env& e, int B, int T, int C, int NH, uint32_t seed) {
    CAPTURE(B); CAPTURE(T); CAPTURE(C); CAPTURE(NH);
    const int hs = C / NH;
    const size_t att_n = std::max(e.cpu->attention_buffer_floats(B, T, NH), e.gpu->attention_buffer_floats(B, T, NH));
    TwinF qkv(e, randu((size_t)B * T * 3 * C, seed, -1.5, 1.5));
    TwinF out(e, randu((size_t)B * T * C, seed + 1, -9, 9));
    TwinF preatt(e, randu(att_n, seed + 2, -9, 9)), att(e, randu(att_n, seed + 3, -9, 9));
    const double K = std::max(T, hs);
    check_op(e, [&](Backend& be, Side s) { be.attention_forward(out[s], preatt[s], att[s], qkv[s], B, T, C, NH); },
             {{"attention out", &out, e.tol(K)}});
    if (e.bf16() && (hs == 32 || hs == 64 || hs == 128)) {
        // these head sizes run the tensor-core kernels (attention_tc.cu), whose operands are bf16:
        // an output within fp32 rounding of the CPU's would mean the fp32 kernel ran instead
        const std::vector<float> c = out.get(CPU), g = out.get(GPU);
        double scale = 0, worst = 0;
        for (size_t i = 0; i < c.size(); i++) {
            scale = std::max(scale, (double)std::fabs(c[i]));
            worst = std::max(worst, std::fabs((double)g[i] - c[i]));
        }
        INFO("bf16 attention, head size " << hs << ": max |cuda - cpu| / max |cpu| = " << worst / scale
                                          << ", expected bf16 rounding (> 1e-5) from the tensor-core kernels");
        CHECK(worst > 1e-5 * scale);
    }
    // backward after its forward; the scratch starts as garbage (the op overwrites what it uses)
    TwinF dout(e, randu((size_t)B * T * C, seed + 4)), dqkv(e, randu((size_t)B * T * 3 * C, seed + 5));
    TwinF dpreatt(e, randu(att_n, seed + 6, -9, 9)), datt(e, randu(att_n, seed + 7, -9, 9));
    check_op(e, [&](Backend& be, Side s) {
        be.attention_forward(out[s], preatt[s], att[s], qkv[s], B, T, C, NH);
        be.attention_backward(dqkv[s], dpreatt[s], datt[s], dout[s], qkv[s], att[s], B, T, C, NH);
    }, {{"attention dqkv", &dqkv, e.tol(K)}, {"attention out (before backward)", &out, e.tol(K)}});
}

void attention_all(Env& e) {
    attention(e, 1, 1, 8, 1, 1);         // T = 1
    attention(e, 2, 1, 64, 4, 2);
    attention(e, 2, 17, 32, 4, 3);       // hs 8
    attention(e, 1, 65, 48, 3, 4);       // hs 16, T = 64 + 1
    attention(e, 3, 7, 36, 6, 5);        // hs 6
    attention(e, 2, 64, 128, 2, 6);      // hs 64, T = 64
    attention(e, 1, 130, 192, 3, 7);     // hs 64, T not a multiple of 64
    attention(e, 1, 70, 256, 2, 10);     // hs 128, the CUDA kernel's largest
    attention(e, 2, 256, 768, 12, 8);    // GPT-2 small heads
    attention(e, 1, 1024, 768, 12, 9);   // GPT-2 small, full context
    // head sizes of the tensor-core kernels (bf16 mode): 64-row query/key tiles, 32-row query tiles
    // in the dk/dv kernel; T = 1, inside one tile, one past a tile, not a multiple, and long
    attention(e, 2, 1, 64, 2, 11);       // hs 32, T = 1
    attention(e, 2, 17, 128, 4, 12);     // hs 32
    attention(e, 1, 100, 96, 3, 13);     // hs 32
    attention(e, 2, 257, 128, 4, 14);    // hs 32, T = 4 * 64 + 1
    attention(e, 1, 1024, 128, 4, 15);   // hs 32, full context
    attention(e, 3, 17, 192, 3, 16);     // hs 64
    attention(e, 2, 100, 128, 2, 17);    // hs 64
    attention(e, 2, 257, 256, 4, 18);    // hs 64
    attention(e, 2, 1, 256, 2, 19);      // hs 128, T = 1
    attention(e, 1, 17, 128, 1, 20);     // hs 128, one head
    attention(e, 2, 100, 256, 2, 21);    // hs 128
    attention(e, 1, 257, 384, 3, 22);    // hs 128
    attention(e, 1, 1024, 256, 2, 23);   // hs 128, full context
}

// --------------------------------------------------------------------------------------------
// element-wise

std::vector<float> with_extremes(std::vector<float> v) {
    const float ext[] = {0.0f, -0.0f, 20.0f, -20.0f, 40.0f, -40.0f, 1e-6f, -1e-6f};
    for (size_t i = 0; i < 8 && i < v.size(); i++) v[v.size() - 1 - i] = ext[i];
    return v;
}

void gelu(Env& e, size_t n, uint32_t seed) {
    CAPTURE(n);
    TwinF inp(e, with_extremes(randu(n, seed, -6, 6))), out(e, randu(n, seed + 1, -9, 9));
    check_op(e, [&](Backend& be, Side s) { be.gelu_forward(out[s], inp[s], n); }, {{"gelu out", &out, e.tol()}});
    TwinF dout(e, randu(n, seed + 2)), dinp(e, randu(n, seed + 3));
    check_op(e, [&](Backend& be, Side s) { be.gelu_backward(dinp[s], inp[s], dout[s], n); }, {{"gelu dinp", &dinp, e.tol()}});
}

void swiglu(Env& e, size_t N, int F, uint32_t seed) {
    CAPTURE(N); CAPTURE(F);
    TwinF inp(e, with_extremes(randu(N * 2 * F, seed, -8, 8))), out(e, randu(N * F, seed + 1, -9, 9));
    check_op(e, [&](Backend& be, Side s) { be.swiglu_forward(out[s], inp[s], N, F); }, {{"swiglu out", &out, e.tol()}});
    TwinF dout(e, randu(N * F, seed + 2)), dinp(e, randu(N * 2 * F, seed + 3));
    check_op(e, [&](Backend& be, Side s) { be.swiglu_backward(dinp[s], inp[s], dout[s], N, F); },
             {{"swiglu dinp", &dinp, e.tol()}});
}

void elementwise_all(Env& e) {
    for (size_t n : {(size_t)1, (size_t)17, (size_t)1000003}) {
        CAPTURE(n);
        gelu(e, n, 1);
        TwinF a(e, randu(n, 2), 1), b(e, randu(n, 3), 1), out(e, randu(n, 4, -9, 9), 1);
        check_op(e, [&](Backend& be, Side s) { be.residual_forward(out[s], a[s], b[s], n); },
                 {{"residual out", &out, e.tol()}});
        // in place, as the model calls it: out = out + b
        check_op(e, [&](Backend& be, Side s) { be.residual_forward(out[s], out[s], b[s], n); },
                 {{"residual out (in place)", &out, e.tol()}});
        check_op(e, [&](Backend& be, Side s) { be.mul_accumulate(out[s], a[s], b[s], n); },
                 {{"mul_accumulate out", &out, e.tol()}});
        check_op(e, [&](Backend& be, Side s) { be.scale(out[s], 0.37f, n); }, {{"scale x", &out, e.tol()}});
    }
    swiglu(e, 1, 1, 5);
    swiglu(e, 37, 17, 6);
    swiglu(e, 512, 3072, 7);
}

// --------------------------------------------------------------------------------------------
// cross-entropy

void crossentropy(Env& e, int N, int V, uint32_t seed) {
    CAPTURE(N); CAPTURE(V);
    std::vector<float> logits = randu((size_t)N * V, seed, -5, 5);
    if (N > 1) logits[(size_t)1 * V + V / 2] = 40.0f;                       // a peaked row
    if (N > 2) std::fill(logits.begin() + 2 * V, logits.begin() + 3 * V, 0.5f);  // a flat row
    std::vector<int> targets = randi(N, seed + 1, 0, V);
    if (N > 1) targets[1] = V / 2;
    TwinF lg(e, logits), losses(e, randu(N, seed + 2, -9, 9)), probs(e, randu((size_t)N * V, seed + 3, -9, 9));
    TwinI tg(e, targets);
    check_op(e, [&](Backend& be, Side s) { be.crossentropy_softmax_forward(losses[s], probs[s], lg[s], tg[s], N, V); },
             {{"crossentropy losses", &losses, e.tol(V)}, {"crossentropy probs", &probs, e.tol(V)}});
    check_op(e, [&](Backend& be, Side s) { be.crossentropy_softmax_forward(losses[s], nullptr, lg[s], tg[s], N, V); },
             {{"crossentropy losses (no probs)", &losses, e.tol(V)}});
    TwinF p(e, probs.get(CPU)), dlogits(e, randu((size_t)N * V, seed + 4));
    check_op(e, [&](Backend& be, Side s) { be.crossentropy_softmax_backward(dlogits[s], p[s], tg[s], 1.0f / N, N, V); },
             {{"crossentropy dlogits", &dlogits, e.tol()}});
}

void crossentropy_all(Env& e) {
    crossentropy(e, 1, 256, 1);
    crossentropy(e, 64, 256, 2);
    crossentropy(e, 5, 1, 3);          // V = 1: loss 0, prob 1
    crossentropy(e, 33, 50257, 4);     // GPT-2 vocabulary
    crossentropy(e, 256, 50257, 5);
}

// --------------------------------------------------------------------------------------------
// MoE dispatch / combine

void dispatch_combine(Env& e, int N, int C, int E, int k, const std::string& kind, uint32_t seed) {
    CAPTURE(N); CAPTURE(C); CAPTURE(E); CAPTURE(k); CAPTURE(kind);
    const PlanData p = make_plan(N, E, k, kind, seed);
    const int A = p.A();
    CAPTURE(A);
    REQUIRE(A > 0);
    TwinI token(e, p.token), tok_off(e, p.tok_offsets), tok_assign(e, p.tok_assign);
    TwinF gate(e, p.gate), x(e, randu((size_t)N * C, seed + 1));
    // forward: a gather, exact
    TwinF xg(e, randu((size_t)A * C, seed + 2, -9, 9));
    check_op(e, [&](Backend& be, Side s) { be.moe_dispatch_forward(xg[s], x[s], token[s], A, C); },
             {{"dispatch out", &xg, 0.0}});
    // backward: dx += sum of the token's rows (tokens without an assignment keep their dx)
    TwinF dxg(e, randu((size_t)A * C, seed + 3)), dx(e, randu((size_t)N * C, seed + 4));
    check_op(e, [&](Backend& be, Side s) { be.moe_dispatch_backward(dx[s], dxg[s], tok_off[s], tok_assign[s], N, C); },
             {{"dispatch dx", &dx, e.tol(k)}});
    // combine forward overwrites out: a token without assignments gets zeros
    TwinF y(e, randu((size_t)A * C, seed + 5)), out(e, randu((size_t)N * C, seed + 6, -9, 9));
    check_op(e, [&](Backend& be, Side s) { be.moe_combine_forward(out[s], y[s], gate[s], tok_off[s], tok_assign[s], N, C); },
             {{"combine out", &out, e.tol(k)}});
    // combine backward overwrites dy and dgate
    TwinF dout(e, randu((size_t)N * C, seed + 7)), dy(e, randu((size_t)A * C, seed + 8, -9, 9));
    TwinF dgate(e, randu(A, seed + 9, -9, 9));
    check_op(e, [&](Backend& be, Side s) { be.moe_combine_backward(dy[s], dgate[s], dout[s], y[s], gate[s], token[s], A, C); },
             {{"combine dy", &dy, e.tol()}, {"combine dgate", &dgate, e.tol(C)}});
}

void dispatch_all(Env& e) {
    dispatch_combine(e, 1, 1, 4, 1, "topk", 1);
    dispatch_combine(e, 64, 33, 8, 2, "topk", 2);
    dispatch_combine(e, 64, 33, 8, 2, "skewed", 3);     // 6 of 8 experts empty
    dispatch_combine(e, 100, 17, 8, 1, "one", 4);       // every token to one expert
    dispatch_combine(e, 128, 65, 8, 2, "drops", 5);     // tokens with 0, 1 or 2 assignments
    dispatch_combine(e, 512, 768, 64, 8, "zipf", 6);
    dispatch_combine(e, 2048, 768, 8, 2, "topk", 7);
}

// --------------------------------------------------------------------------------------------
// grouped expert GEMM

// rows of `rows` covered by no block keep their contents (forward) / dinp (backward)
void grouped(Env& e, const std::vector<moe::GroupBlock>& blocks, int rows, int E, int C, int OC, bool bias, size_t skew,
             uint32_t seed) {
    CAPTURE(rows); CAPTURE(E); CAPTURE(C); CAPTURE(OC); CAPTURE(bias); CAPTURE(blocks.size()); CAPTURE(skew);
    const int nb = (int)blocks.size();
    std::vector<int> per_expert(E, 0);
    for (const moe::GroupBlock& b : blocks) per_expert[b.expert] += b.rows;
    const double Kw = std::max(1, *std::max_element(per_expert.begin(), per_expert.end()));
    TwinF inp(e, randu((size_t)rows * C, seed), skew), w(e, randu((size_t)E * OC * C, seed + 1), skew);
    TwinF b(e, randu((size_t)E * OC, seed + 2), skew), out(e, randu((size_t)rows * OC, seed + 3, -9, 9), skew);
    const moe::GroupBlock* bl = blocks.data();
    check_op(e, [&](Backend& be, Side s) { be.grouped_matmul_forward(out[s], inp[s], w[s], bias ? b[s] : nullptr, bl, nb, C, OC); },
             {{"grouped out", &out, e.tol(C)}});
    TwinF dout(e, randu((size_t)rows * OC, seed + 4), skew), dinp(e, randu((size_t)rows * C, seed + 5), skew);
    TwinF dw(e, randu((size_t)E * OC * C, seed + 6), skew), db(e, randu((size_t)E * OC, seed + 7), skew);
    check_op(e, [&](Backend& be, Side s) {
        be.grouped_matmul_backward(dinp[s], dw[s], bias ? db[s] : nullptr, dout[s], inp[s], w[s], bl, nb, C, OC);
    }, {{"grouped dinp", &dinp, e.tol(OC)}, {"grouped dweight", &dw, e.tol(Kw)}, {"grouped dbias", &db, e.tol(Kw)}});
    check_op(e, [&](Backend& be, Side s) {
        be.grouped_matmul_backward(nullptr, dw[s], db[s], dout[s], inp[s], w[s], bl, nb, C, OC);
    }, {{"grouped dweight (dinp null)", &dw, e.tol(Kw)}, {"grouped dbias (dinp null)", &db, e.tol(Kw)},
        {"grouped dinp untouched", &dinp, 0.0}});
    check_op(e, [&](Backend& be, Side s) {
        be.grouped_matmul_backward(dinp[s], nullptr, nullptr, dout[s], inp[s], w[s], bl, nb, C, OC);
    }, {{"grouped dinp (weights null)", &dinp, e.tol(OC)}, {"grouped dweight untouched", &dw, 0.0}});
}

void grouped_all(Env& e) {
    {   // the layer's blocks with empty experts
        PlanData p = make_plan(64, 8, 2, "skewed", 1);
        grouped(e, expert_blocks(p), p.A(), 8, 33, 17, true, 0, 10);
    }
    {   // everything on one expert
        PlanData p = make_plan(300, 8, 1, "one", 2);
        grouped(e, expert_blocks(p), p.A(), 8, 65, 129, true, 1, 20);
    }
    // expert parallel layouts: 3 source ranks x 4 experts, shuffled, zero-row blocks, odd sizes
    grouped(e, ep_blocks(200, 4, 3, true, 3), 200, 4, 65, 129, false, 0, 30);
    grouped(e, ep_blocks(1, 4, 2, false, 4), 1, 4, 17, 3, true, 0, 40);
    {   // a gap: rows of a dropped block must stay as they were
        std::vector<moe::GroupBlock> b = ep_blocks(150, 3, 2, true, 5);
        auto big = std::max_element(b.begin(), b.end(), [](auto& x, auto& y) { return x.rows < y.rows; });
        b.erase(big);
        grouped(e, b, 150, 3, 33, 31, true, 3, 50);
    }
    {   // the benchmark configs' shapes (docs/gpu-testing.md): 8 experts of 3072, 64 of 384
        PlanData p8 = make_plan(2048, 8, 2, "zipf", 6);
        grouped(e, expert_blocks(p8), p8.A(), 8, 768, 3072, true, 0, 60);
        grouped(e, expert_blocks(p8), p8.A(), 8, 3072, 768, true, 0, 70);
        PlanData p64 = make_plan(1024, 64, 8, "topk", 7);
        grouped(e, expert_blocks(p64), p64.A(), 64, 768, 384, true, 0, 80);
        grouped(e, expert_blocks(p64), p64.A(), 64, 384, 768, true, 0, 90);
    }
}

// --------------------------------------------------------------------------------------------
// optimizer

void adamw(Env& e, size_t n, int t, float wd, size_t skew, uint32_t seed, float grad_scale = 1.0f) {
    CAPTURE(n); CAPTURE(t); CAPTURE(wd); CAPTURE(skew); CAPTURE(grad_scale);
    std::vector<float> g = randu(n, seed + 1, -0.1f, 0.1f);
    for (size_t i = 0; i < n; i += 7) g[i] = 0.0f;  // zero gradients (unused rows), v may be 0 too
    TwinF p(e, randu(n, seed), skew), grad(e, g, skew), m(e, randu(n, seed + 2, -0.01f, 0.01f), skew);
    std::vector<float> v0 = randu(n, seed + 3, 0.0f, 1e-4f);
    for (size_t i = 0; i < n; i += 14) v0[i] = 0.0f;
    TwinF v(e, v0, skew);
    check_op(e, [&](Backend& be, Side s) {
        be.adamw_update(p[s], grad[s], m[s], v[s], n, 1e-3f, 0.9f, 0.95f, 1e-8f, wd, t, grad_scale);
    }, {{"adamw param", &p, e.tol()}, {"adamw m", &m, e.tol()}, {"adamw v", &v, e.tol()}, {"adamw grad", &grad, 0.0}});
}

void optimizer_all(Env& e) {
    adamw(e, 1, 1, 0.1f, 0, 1);
    adamw(e, 1000003, 1, 0.1f, 1, 2);
    adamw(e, 4099, 1000, 0.0f, 0, 3);
    adamw(e, 65537, 7, 0.1f, 0, 4, 0.37f);  // a clipping coefficient folded in
    for (size_t n : {(size_t)1, (size_t)17, (size_t)(1 << 16) + 5, (size_t)10000019}) {
        CAPTURE(n);
        TwinF g(e, randu(n, 11 + (uint32_t)n, -3, 3), 1);
        const double c = e.cpu->sum_squares(g[CPU], n);
        const double a = e.gpu->sum_squares(g[GPU], n);
        const double b = e.gpu->sum_squares(g[GPU], n);
        INFO("sum_squares cpu " << c << " cuda " << a);
        CHECK(std::fabs(a - c) <= e.tol() * c);
        CHECK(std::memcmp(&a, &b, sizeof a) == 0);  // reproducible
    }
}

}  // namespace

TEST_CASE("gpu ops: memory (alloc zero-filled, upload, download, copy, zero)") { BOTH_MODES(memory_ops) }
TEST_CASE("gpu ops: encoder forward/backward") { BOTH_MODES(encoder_all) }
TEST_CASE("gpu ops: layernorm forward/backward") { BOTH_MODES(layernorm_all) }
TEST_CASE("gpu ops: matmul forward/backward, odd and tiny shapes, null gradients, unaligned views") { BOTH_MODES(matmul_all) }
TEST_CASE("gpu ops: attention forward/backward") { BOTH_MODES(attention_all) }
TEST_CASE("gpu ops: gelu, swiglu, residual, mul_accumulate, scale") { BOTH_MODES(elementwise_all) }
TEST_CASE("gpu ops: cross-entropy, V = 256 and 50257") { BOTH_MODES(crossentropy_all) }
TEST_CASE("gpu ops: MoE dispatch/combine forward/backward") { BOTH_MODES(dispatch_all) }
TEST_CASE("gpu ops: grouped expert GEMM forward/backward") { BOTH_MODES(grouped_all) }
TEST_CASE("gpu ops: adamw and sum_squares") { BOTH_MODES(optimizer_all) }
