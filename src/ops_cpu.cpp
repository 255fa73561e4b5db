/* CPU twins of the model ops (contract in ops_cpu.h), written like llm.c's train_gpt2.c: plain
   loops, OpenMP across independent rows, exactly GPT-2's math. Two things go beyond llm.c
   because they dominate CPU time:
   - the three matmuls (forward, dinp, dweight) share one cache-blocked GEMM with a register-
     tiled micro-kernel written with GCC vector extensions, so it compiles to FMA on whatever
     -march gives (AVX-512, AVX2, or plain SSE as a fallback);
   - exp is a branch-free polynomial (exp_fast) with a vector form; glibc's expf/tanhf do not
     vectorise without -ffast-math, and GELU, softmax and cross-entropy call it once per element.
   Every parallel loop splits work so that each output element is written by exactly one
   thread in a fixed order: results are bitwise independent of the number of threads. */
#include "ops_cpu.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace moe {
namespace {

constexpr float kLayerNormEps = 1e-5f;
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;

// exp(x) to ~2 ulp (Cephes expf): x = n*ln2 + r with |r| <= ln2/2, exp(r) by a degree-6
// polynomial, 2^n put straight into the exponent bits. Arguments are clamped to [-87, 88] so
// 2^n stays a normal float; below -87 the result is 0 (what expf gives to float precision, and
// what a masked softmax entry needs). NaN propagates through the polynomial.
inline float exp_fast(float x) {
    const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x/ln2)
    float r = xc - n * 0.693359375f;  // ln2 split in two so n*ln2 is exact enough
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

// ----------------------------------------------------------------------------------------
// GEMM: C[m, n] (= or +=) bias[n] + alpha * sum_k A(m, k) B(k, n), with A and B given by
// strides, so one routine serves out = inp W^T, dinp = dout W, dweight = dout^T inp and the
// per-head products of attention without transposes. Called inside a parallel region (as
// attention does, one (batch, head) per thread) its own parallel loops run on one thread.
// Blocking as in BLIS: B is packed once into column panels of NR (zero padded, so no column
// tails in the kernel), which also keeps power-of-two row strides from thrashing L1 sets. Each
// task owns an (MC rows x some panels) block of C and walks K in KC slices; a KC x NR slice of
// B stays in L1 while the MR-row tiles of the block stream past it. A is not packed: both of
// its uses have a contiguous direction (rows of inp/dout, or columns of dout^T in dweight)
// that the kernel reads in place; packing it would cost about as much as the FMAs when Nc is
// small (C = 128). Only a last tile of fewer than MR rows is copied, zero padded.

// One native vector of VL floats (GCC vector extension: the kernel below is plain C++ that
// compiles to broadcast + FMA on any x86-64 level). C tile: MR rows x NV vectors.
#if defined(__AVX512F__)
constexpr int VL = 16, MR = 8, NV = 2;  // 8 x 32: 16 of the 32 zmm registers accumulate
#elif defined(__AVX__)
constexpr int VL = 8, MR = 6, NV = 2;   // 6 x 16: 12 of the 16 ymm registers accumulate
#else
constexpr int VL = 4, MR = 4, NV = 2;   // 4 x 8: 8 of the 16 xmm registers accumulate
#endif
typedef float vec __attribute__((vector_size(VL * 4)));
typedef float vecu __attribute__((vector_size(VL * 4), aligned(4), may_alias));  // unaligned
constexpr int NR = VL * NV;
// ----------------------------------------------------------------------------------------
// Vector forms of exp_fast: GCC does not vectorise the scalar one (its clamps and bit tricks
// become branches), and GELU, softmax and cross-entropy spend their time in it. Each lane does
// exactly the scalar operations; callers walk arrays in VL-wide chunks from the start with the
// scalar function on the tail, so a result never depends on the thread count.
typedef int32_t ivec __attribute__((vector_size(VL * 4)));

inline vec vload(const float* p) { return *(const vecu*)p; }
inline void vstore(float* p, vec v) { *(vecu*)p = v; }
inline vec vsplat(float x) { return vec{} + x; }
inline float hsum(vec v) {
    float s = 0.0f;
    for (int i = 0; i < VL; i++) s += v[i];
    return s;
}

inline vec exp_fast(vec x) {
    const vec lo = vsplat(-87.0f), hi = vsplat(88.0f);
    const vec xc = x < lo ? lo : (x > hi ? hi : x);
    const vec n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    vec r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vec p = vsplat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
    return x < lo ? vec{} : p * (vec)bits;
}

// out[i] = exp(in[i] - shift) for i < n; returns their sum (lane sums, then the tail)
inline float exp_shift_sum(float* out, const float* in, float shift, int n) {
    vec acc{};
    int i = 0;
    for (; i + VL <= n; i += VL) {
        const vec e = exp_fast(vload(in + i) - shift);
        if (out) vstore(out + i, e);
        acc += e;
    }
    float sum = hsum(acc);
    for (; i < n; i++) {
        const float e = exp_fast(in[i] - shift);
        if (out) out[i] = e;
        sum += e;
    }
    return sum;
}

constexpr int KC = 256;            // K slice: KC*NR floats of B (32 KB with AVX-512) fit L1
constexpr int kMaxTiles = 16;      // at most 16*MR rows of A per task (stays in L2)
constexpr int kPanelsPerTask = 8;  // at most 8*NR columns of C per task

// How the micro-kernel finds A(i, k) of its MR x kc tile: a packed micro-panel a[k*MR + i],
// rows of A in place a[i*lda + k], or columns of A in place a[k*lda + i].
enum ALayout { kPacked, kRows, kCols };

// C tile (mr x nr valid of MR x NR) (+)= bias + alpha * A tile (MR x kc) . b-panel (kc x NR).
// load_c: add to what C holds (else overwrite); bias (nr floats) or nullptr.
template <ALayout L>
void micro_kernel(int kc, const float* __restrict a, size_t lda, const float* __restrict b,
                  float* c, size_t ldc, int mr, int nr, bool load_c, const float* bias,
                  float alpha) {
    vec acc[MR][NV];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = vec{};
    for (int k = 0; k < kc; k++) {
        // columns in place: rows of A are lda apart, too far for the hardware prefetcher
        if (L == kCols && k + 16 < kc) __builtin_prefetch(a + (k + 16) * lda);
        vec bv[NV];
        for (int v = 0; v < NV; v++) bv[v] = *(const vecu*)(b + (size_t)k * NR + VL * v);
        for (int i = 0; i < MR; i++) {
            const float ai = L == kPacked ? a[(size_t)k * MR + i]  // broadcast
                             : L == kRows ? a[i * lda + k] : a[k * lda + i];
            for (int v = 0; v < NV; v++) acc[i][v] += ai * bv[v];
        }
    }
    if (mr == MR && nr == NR) {
        for (int i = 0; i < MR; i++)
            for (int v = 0; v < NV; v++) {
                vecu* cp = (vecu*)(c + (size_t)i * ldc + VL * v);
                const vec cv = load_c ? *cp : vec{};
                const vec bb = bias ? *(const vecu*)(bias + VL * v) : vec{};
                *cp = cv + (bb + alpha * acc[i][v]);
            }
    } else {  // edge tile of C: only the valid part is touched
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++) {
                float* cp = c + (size_t)i * ldc + j;
                *cp = (load_c ? *cp : 0.0f) + ((bias ? bias[j] : 0.0f) + alpha * acc[i][j / VL][j % VL]);
            }
    }
}

// A(m, k) for m < mc, k < kc (zero for m >= mc) as MR-row micro-panels ap[tile][k][i].
void pack_a(float* ap, const float* a0, size_t sam, size_t sak, int mc, int kc) {
    for (int t = 0; t * MR < mc; t++) {
        float* dst = ap + (size_t)t * kc * MR;
        const int rows = std::min(MR, mc - t * MR);
        for (int k = 0; k < kc; k++)
            for (int i = 0; i < MR; i++)
                dst[(size_t)k * MR + i] = i < rows ? a0[(size_t)(t * MR + i) * sam + (size_t)k * sak] : 0.0f;
    }
}

void gemm(float* c, size_t ldc,                          // (M, Nc), row stride ldc
          const float* A, size_t sam, size_t sak,        // A(m, k) = A[m*sam + k*sak]
          const float* B, size_t sbk, size_t sbn,        // B(k, n) = B[k*sbk + n*sbn]
          const float* bias, bool accumulate, float alpha, int M, int Nc, int K) {
    if (M <= 0 || Nc <= 0) return;
    if (K <= 0) {  // empty sum: C = bias (or unchanged when accumulating)
        if (!accumulate)
            for (int m = 0; m < M; m++)
                for (int n = 0; n < Nc; n++) c[(size_t)m * ldc + n] = bias ? bias[n] : 0.0f;
        return;
    }
    // pack B: panel p holds columns p*NR.. as K rows of NR floats, zero padded past Nc
    const int np = (Nc + NR - 1) / NR;
    static thread_local std::vector<float> bpack;
    bpack.resize((size_t)np * K * NR);
    float* bp = bpack.data();
    if (sbn == 1) {
        // rows of B contiguous (W in dinp, inp in dweight): walk them in memory order, each
        // row cut into NR-wide pieces, one per panel
#pragma omp parallel for schedule(static)
        for (int k = 0; k < K; k++) {
            const float* src = B + (size_t)k * sbk;
            for (int p = 0; p < np; p++) {
                float* dst = bp + ((size_t)p * K + k) * NR;
                const int w = std::min(NR, Nc - p * NR);
                if (w == NR)
                    for (int j = 0; j < NR; j++) dst[j] = src[p * NR + j];
                else
                    for (int j = 0; j < NR; j++) dst[j] = j < w ? src[p * NR + j] : 0.0f;
            }
        }
    } else {
        // columns of B contiguous (B = W^T in the forward): read down each column
#pragma omp parallel for schedule(static)
        for (int p = 0; p < np; p++) {
            float* dst = bp + (size_t)p * K * NR;
            const int w = std::min(NR, Nc - p * NR);
            const float* src = B + (size_t)p * NR * sbn;
            for (int j = 0; j < NR; j++)
                for (int k = 0; k < K; k++)
                    dst[(size_t)k * NR + j] = j < w ? src[(size_t)k * sbk + (size_t)j * sbn] : 0.0f;
        }
    }
    // task grid of (row block, panel group) tasks, ~4 per thread. Each task streams its rows
    // of A once per panel group and its panels of B once per row block, so the split goes
    // along the dimension of the bigger operand: rows (inp, dout) unless B is the bigger one
    // (inp in dweight when C > OC), then panels with row blocks as tall as allowed.
    const int want = 4 * omp_get_max_threads(), mtiles = (M + MR - 1) / MR;
    int ppt, mc_max;
    if ((size_t)M >= (size_t)Nc) {
        ppt = std::min(np, kPanelsPerTask);
        const int want_mb = std::max(1, want / ((np + ppt - 1) / ppt));
        mc_max = MR * std::clamp((mtiles + want_mb - 1) / want_mb, 1, kMaxTiles);
    } else {
        mc_max = MR * std::min(mtiles, kMaxTiles);
        const int want_nb = std::max(1, want / ((M + mc_max - 1) / mc_max));
        ppt = std::clamp((np + want_nb - 1) / want_nb, 1, kPanelsPerTask);
    }
    const int mb = (M + mc_max - 1) / mc_max, nb = (np + ppt - 1) / ppt;
    mc_max = MR * ((mtiles + mb - 1) / mb);  // same number of blocks, evened out
    // full MR-row tiles read A in place when either of its directions is contiguous
    const bool in_place = sak == 1 || sam == 1;
    // dynamic: tasks differ in size at the edges, and which thread runs a task does not
    // change its result
#pragma omp parallel for collapse(2) schedule(dynamic)
    for (int ib = 0; ib < mb; ib++) {
        for (int jb = 0; jb < nb; jb++) {
            static thread_local std::vector<float> apack;
            apack.resize((size_t)mc_max * KC);
            float* ap = apack.data();
            const int m0 = ib * mc_max, mc = std::min(mc_max, M - m0);
            const int full = in_place ? mc / MR * MR : 0;  // rows read in place; the rest packed
            const int p0 = jb * ppt, p1 = std::min(np, p0 + ppt);
            for (int k0 = 0; k0 < K; k0 += KC) {
                const int kc = std::min(KC, K - k0);
                const float* a0 = A + (size_t)m0 * sam + (size_t)k0 * sak;
                if (full < mc) pack_a(ap, a0 + (size_t)full * sam, sam, sak, mc - full, kc);
                const bool first = k0 == 0;
                for (int p = p0; p < p1; p++) {
                    const int n0 = p * NR, nr = std::min(NR, Nc - n0);
                    const float* bpanel = bp + (size_t)p * K * NR + (size_t)k0 * NR;
                    const float* bb = first && bias ? bias + n0 : nullptr;
                    const bool load_c = accumulate || !first;
                    for (int r = 0; r < mc; r += MR) {
                        float* ct = c + (size_t)(m0 + r) * ldc + n0;
                        const int mr = std::min(MR, mc - r);
                        if (r >= full)
                            micro_kernel<kPacked>(kc, ap + (size_t)(r - full) * kc, 0, bpanel, ct, ldc, mr, nr, load_c, bb, alpha);
                        else if (sak == 1)
                            micro_kernel<kRows>(kc, a0 + (size_t)r * sam, sam, bpanel, ct, ldc, mr, nr, load_c, bb, alpha);
                        else
                            micro_kernel<kCols>(kc, a0 + r, sak, bpanel, ct, ldc, mr, nr, load_c, bb, alpha);
                    }
                }
            }
        }
    }
}

}  // namespace

// ----------------------------------------------------------------------------------------
// encoder: token + position embeddings

void encoder_forward(float* out, const int* inp, const float* wte, const float* wpe,
                     int B, int T, int C) {
#pragma omp parallel for collapse(2)
    for (int b = 0; b < B; b++) {
        for (int t = 0; t < T; t++) {
            float* o = out + ((size_t)b * T + t) * C;                  // (C)
            const float* we = wte + (size_t)inp[(size_t)b * T + t] * C;  // (C)
            const float* pe = wpe + (size_t)t * C;                     // (C)
            for (int c = 0; c < C; c++) o[c] = we[c] + pe[c];
        }
    }
}

void encoder_backward(float* dwte, float* dwpe, const float* dout, const int* inp,
                      int B, int T, int C) {
    // A token can repeat within the batch, so rows of dwte are not owned by one (b, t).
    // Threads split the channels instead; each walks all (b, t) in order: no races, and the
    // summation order is fixed. Blocks of 16 floats = one cache line of dout per (b, t).
    const int nblk = (C + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int blk = 0; blk < nblk; blk++) {
        const int c0 = blk * 16, c1 = std::min(C, c0 + 16);
        for (int b = 0; b < B; b++) {
            for (int t = 0; t < T; t++) {
                const float* d = dout + ((size_t)b * T + t) * C;  // (C)
                if (dwte) {
                    float* g = dwte + (size_t)inp[(size_t)b * T + t] * C;
                    for (int c = c0; c < c1; c++) g[c] += d[c];
                }
                if (dwpe) {
                    float* g = dwpe + (size_t)t * C;
                    for (int c = c0; c < c1; c++) g[c] += d[c];
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// layernorm

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp,
                       const float* weight, const float* bias, int N, int C) {
#pragma omp parallel for
    for (int n = 0; n < N; n++) {
        const float* x = inp + (size_t)n * C;  // (C)
        float* o = out + (size_t)n * C;        // (C)
        float m = 0.0f;
#pragma omp simd reduction(+ : m)
        for (int c = 0; c < C; c++) m += x[c];
        m /= C;
        float v = 0.0f;  // two passes: the variance around the mean does not cancel
#pragma omp simd reduction(+ : v)
        for (int c = 0; c < C; c++) v += (x[c] - m) * (x[c] - m);
        v /= C;  // biased variance, as PyTorch's LayerNorm
        const float s = 1.0f / std::sqrt(v + kLayerNormEps);
        for (int c = 0; c < C; c++) o[c] = (x[c] - m) * s * weight[c] + bias[c];
        if (mean) mean[n] = m;
        if (rstd) rstd[n] = s;
    }
}

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                        const float* inp, const float* weight, const float* mean,
                        const float* rstd, int N, int C) {
    if (dinp) {
#pragma omp parallel for
        for (int n = 0; n < N; n++) {
            const float* x = inp + (size_t)n * C;   // (C)
            const float* d = dout + (size_t)n * C;  // (C)
            float* g = dinp + (size_t)n * C;        // (C)
            const float m = mean[n], s = rstd[n];
            // dnorm = weight * dout; dx = s * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))
            float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
#pragma omp simd reduction(+ : dnorm_mean, dnorm_norm_mean)
            for (int c = 0; c < C; c++) {
                const float dnorm = weight[c] * d[c];
                dnorm_mean += dnorm;
                dnorm_norm_mean += dnorm * (x[c] - m) * s;
            }
            dnorm_mean /= C;
            dnorm_norm_mean /= C;
            for (int c = 0; c < C; c++) {
                const float norm = (x[c] - m) * s;
                g[c] += (weight[c] * d[c] - dnorm_mean - norm * dnorm_norm_mean) * s;
            }
        }
    }
    if (dweight || dbias) {
        // reductions over the rows: threads split the channels (see encoder_backward)
        const int nblk = (C + 15) / 16;
#pragma omp parallel for schedule(static)
        for (int blk = 0; blk < nblk; blk++) {
            const int c0 = blk * 16, w = std::min(C, c0 + 16) - c0;
            float dw[16] = {}, db[16] = {};
            for (int n = 0; n < N; n++) {
                const float* x = inp + (size_t)n * C + c0;
                const float* d = dout + (size_t)n * C + c0;
                const float m = mean[n], s = rstd[n];
                for (int j = 0; j < w; j++) {
                    dw[j] += (x[j] - m) * s * d[j];
                    db[j] += d[j];
                }
            }
            for (int j = 0; j < w; j++) {
                if (dweight) dweight[c0 + j] += dw[j];
                if (dbias) dbias[c0 + j] += db[j];
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// matmul (weights (OC, C) as in PyTorch)

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                    int N, int C, int OC) {
    // out (N, OC) = inp (N, C) . W^T:  A = inp, B(k=c, n=o) = W[o*C + c]
    gemm(out, OC, inp, C, 1, weight, 1, C, bias, false, 1.0f, N, OC, C);
}

void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                     const float* inp, const float* weight, int N, int C, int OC) {
    // dinp (N, C) += dout (N, OC) . W (OC, C)
    if (dinp) gemm(dinp, C, dout, OC, 1, weight, C, 1, nullptr, true, 1.0f, N, C, OC);
    // dweight (OC, C) += dout^T (OC, N) . inp (N, C):  A(m=o, k=n) = dout[n*OC + o]
    if (dweight) gemm(dweight, C, dout, 1, OC, inp, C, 1, nullptr, true, 1.0f, OC, C, N);
    if (dbias) {
        // column sums of dout; threads split the columns, rows are walked in order
        const int nblk = (OC + 63) / 64;
#pragma omp parallel for schedule(static)
        for (int blk = 0; blk < nblk; blk++) {
            const int o0 = blk * 64, w = std::min(OC, o0 + 64) - o0;
            float acc[64] = {};
            for (int n = 0; n < N; n++) {
                const float* d = dout + (size_t)n * OC + o0;
                for (int j = 0; j < w; j++) acc[j] += d[j];
            }
            for (int j = 0; j < w; j++) dbias[o0 + j] += acc[j];
        }
    }
}

// ----------------------------------------------------------------------------------------
// attention: llm.c's algorithm, with the per-head products done by the GEMM. One thread owns
// a (batch, head): it writes only that head's columns of that sequence (dk, dv of a key
// collect from every later query, so finer splits would race). Queries go in blocks of
// kAttBlock rows; a block only multiplies against the keys it can see (0 .. its last row),
// so the causal mask wastes at most one diagonal block of work.

constexpr int kAttBlock = 64;

void attention_forward(float* out, float* preatt, float* att, const float* qkv,
                       int B, int T, int C, int NH) {
    const int C3 = 3 * C, hs = C / NH;
    const float scale = 1.0f / std::sqrt((float)hs);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            const float* q = qkv + (size_t)b * T * C3 + h * hs;  // (T, hs), row stride 3C
            const float* k = q + C;                              // (T, hs), row stride 3C
            const float* v = q + 2 * C;                          // (T, hs), row stride 3C
            float* pre = preatt + ((size_t)b * NH + h) * T * T;  // (T, T)
            float* a = att + ((size_t)b * NH + h) * T * T;       // (T, T)
            float* o = out + (size_t)b * T * C + h * hs;         // (T, hs), row stride C
            for (int m0 = 0; m0 < T; m0 += kAttBlock) {
                const int mr = std::min(kAttBlock, T - m0), n = m0 + mr;  // keys 0..n-1 visible
                // pre[m0.., :n] = scale * q[m0..] k[:n]^T
                gemm(pre + (size_t)m0 * T, T, q + (size_t)m0 * C3, C3, 1, k, 1, C3, nullptr, false,
                     scale, mr, n, hs);
                // causal softmax of each row, max subtracted; masked entries are defined zeros
                for (int t = m0; t < n; t++) {
                    float* pr = pre + (size_t)t * T;  // (T)
                    float* ar = a + (size_t)t * T;    // (T)
                    float maxv = -INFINITY;
#pragma omp simd reduction(max : maxv)
                    for (int t2 = 0; t2 <= t; t2++) maxv = std::max(maxv, pr[t2]);
                    const float sum = exp_shift_sum(ar, pr, maxv, t + 1);
                    const float inv = 1.0f / sum;
                    for (int t2 = 0; t2 <= t; t2++) ar[t2] *= inv;
                    for (int t2 = t + 1; t2 < T; t2++) pr[t2] = ar[t2] = 0.0f;
                }
                // o[m0..] = att[m0.., :n] v[:n]
                gemm(o + (size_t)m0 * C, C, a + (size_t)m0 * T, T, 1, v, C3, 1, nullptr, false,
                     1.0f, mr, hs, n);
            }
        }
    }
}

void attention_backward(float* dqkv, float* dpreatt, float* datt, const float* dout,
                        const float* qkv, const float* att, int B, int T, int C, int NH) {
    if (!dqkv) return;
    const int C3 = 3 * C, hs = C / NH;
    const float scale = 1.0f / std::sqrt((float)hs);
#pragma omp parallel for collapse(2) schedule(static)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < NH; h++) {
            const size_t qoff = (size_t)b * T * C3 + h * hs, aoff = ((size_t)b * NH + h) * T * T;
            const float* q = qkv + qoff;  // (T, hs) each, row stride 3C
            const float* k = q + C;
            const float* v = q + 2 * C;
            float* dq = dqkv + qoff;
            float* dk = dq + C;
            float* dv = dq + 2 * C;
            const float* a = att + aoff;                       // (T, T)
            float* da = datt + aoff;                           // (T, T), written in full
            float* dp = dpreatt + aoff;                        // (T, T), written in full
            const float* d = dout + (size_t)b * T * C + h * hs;  // (T, hs), row stride C
            for (int m0 = 0; m0 < T; m0 += kAttBlock) {
                const int mr = std::min(kAttBlock, T - m0), n = m0 + mr;
                // out = att v  =>  datt[m0.., :n] = dout[m0..] v[:n]^T
                gemm(da + (size_t)m0 * T, T, d + (size_t)m0 * C, C, 1, v, 1, C3, nullptr, false,
                     1.0f, mr, n, hs);
                // softmax: dpre[j] = a[j] (datt[j] - sum_i a[i] datt[i])
                for (int t = m0; t < n; t++) {
                    const float* ar = a + (size_t)t * T;
                    float* dar = da + (size_t)t * T;
                    float* dpr = dp + (size_t)t * T;
                    float ada = 0.0f;
#pragma omp simd reduction(+ : ada)
                    for (int t2 = 0; t2 <= t; t2++) ada += ar[t2] * dar[t2];
                    for (int t2 = 0; t2 <= t; t2++) dpr[t2] = ar[t2] * (dar[t2] - ada);
                    for (int t2 = t + 1; t2 < T; t2++) dar[t2] = dpr[t2] = 0.0f;
                }
                // pre = scale q k^T  =>  dq[m0..] += scale * dpre[m0.., :n] k[:n]
                gemm(dq + (size_t)m0 * C3, C3, dp + (size_t)m0 * T, T, 1, k, C3, 1, nullptr, true,
                     scale, mr, hs, n);
            }
            // keys and values n0.. are seen by queries n0..T-1 only:
            // dk[n0..] += scale * dpre[n0:, n0..]^T q[n0:],  dv[n0..] += att[n0:, n0..]^T dout[n0:]
            for (int n0 = 0; n0 < T; n0 += kAttBlock) {
                const int nr = std::min(kAttBlock, T - n0), kk = T - n0;
                const size_t diag = (size_t)n0 * T + n0;
                gemm(dk + (size_t)n0 * C3, C3, dp + diag, 1, T, q + (size_t)n0 * C3, C3, 1, nullptr,
                     true, scale, nr, hs, kk);
                gemm(dv + (size_t)n0 * C3, C3, a + diag, 1, T, d + (size_t)n0 * C, C, 1, nullptr,
                     true, 1.0f, nr, hs, kk);
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// GELU, tanh approximation: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).
// Since 0.5 (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + e), e = exp(-2u), we compute x / (1 + e):
// same function, one exp, no cancellation near tanh = -1, and d/du sigmoid(2u) = 2 e s^2.

// VL elements at a time (scalar tail), chunks split across threads: the same lanes always
// take the same path, whatever the thread count.
template <class V> inline V gelu_of(V x) {
    const V u = kGeluScale * (x + kGeluCubic * x * x * x);
    return x / (1.0f + exp_fast(-2.0f * u));
}
template <class V> inline V gelu_grad(V x, V dout) {
    const V u = kGeluScale * (x + kGeluCubic * x * x * x);
    const V e = exp_fast(-2.0f * u);
    const V s = 1.0f / (1.0f + e);
    const V du = kGeluScale * (1.0f + 3.0f * kGeluCubic * x * x);
    const V ds = 2.0f * (e * s) * s;  // e*s = 1 - s <= 1: no overflow for huge e
    return (s + x * ds * du) * dout;
}

void gelu_forward(float* out, const float* inp, size_t N) {
    const size_t nv = N / VL;
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < nv; c++) vstore(out + c * VL, gelu_of(vload(inp + c * VL)));
    for (size_t i = nv * VL; i < N; i++) out[i] = gelu_of(inp[i]);
}

void gelu_backward(float* dinp, const float* inp, const float* dout, size_t N) {
    if (!dinp) return;
    const size_t nv = N / VL;
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < nv; c++) {
        const size_t i = c * VL;
        vstore(dinp + i, vload(dinp + i) + gelu_grad(vload(inp + i), vload(dout + i)));
    }
    for (size_t i = nv * VL; i < N; i++) dinp[i] += gelu_grad(inp[i], dout[i]);
}

// ----------------------------------------------------------------------------------------
// residual

void residual_forward(float* out, const float* a, const float* b, size_t N) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < N; i++) out[i] = a[i] + b[i];
}

void residual_backward(float* da, float* db, const float* dout, size_t N) {
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < N; i++) {
        if (da) da[i] += dout[i];
        if (db) db[i] += dout[i];
    }
}

// ----------------------------------------------------------------------------------------
// softmax + cross-entropy

void crossentropy_softmax_forward(float* losses, float* probs, const float* logits,
                                  const int* targets, int N, int V) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const float* z = logits + (size_t)n * V;  // (V)
        float maxv = -INFINITY;
#pragma omp simd reduction(max : maxv)
        for (int v = 0; v < V; v++) maxv = std::max(maxv, z[v]);
        float* p = probs ? probs + (size_t)n * V : nullptr;  // (V); loss only (eval): no write
        const float sum = exp_shift_sum(p, z, maxv, V);
        if (p) {
            const float inv = 1.0f / sum;
            for (int v = 0; v < V; v++) p[v] *= inv;
        }
        // -log softmax[target] = log(sum) - (z[target] - max): finite even where the
        // probability underflows to 0
        losses[n] = std::log(sum) - (z[targets[n]] - maxv);
    }
}

void crossentropy_softmax_backward(float* dlogits, const float* probs, const int* targets,
                                   float dloss, int N, int V) {
    if (!dlogits) return;
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float* g = dlogits + (size_t)n * V;     // (V)
        const float* p = probs + (size_t)n * V;  // (V)
        const int tgt = targets[n];
        for (int v = 0; v < V; v++) g[v] += (p[v] - (v == tgt ? 1.0f : 0.0f)) * dloss;
    }
}

// ----------------------------------------------------------------------------------------
// optimizer: AdamW and the gradient norm. Both must be vector code to be memory-bound: AdamW
// says its pointers do not alias (and the build has -fno-math-errno, so sqrt vectorises); the
// norm keeps VL double lanes per fixed chunk.

void adamw_update(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
                  size_t n, float lr, float beta1, float beta2, float eps, float wd, int t) {
    const float bc1 = 1.0f - std::pow(beta1, (float)t), bc2 = 1.0f - std::pow(beta2, (float)t);
#pragma omp parallel for simd schedule(static)
    for (size_t i = 0; i < n; i++) {
        const float mi = beta1 * m[i] + (1.0f - beta1) * g[i];
        const float vi = beta2 * v[i] + (1.0f - beta2) * g[i] * g[i];
        m[i] = mi;
        v[i] = vi;
        // decoupled weight decay applied to the pre-update weight, as torch.optim.AdamW does
        p[i] -= lr * ((mi / bc1) / (std::sqrt(vi / bc2) + eps) + wd * p[i]);
    }
}

double sum_squares(const float* g, size_t n) {
    typedef double dvec __attribute__((vector_size(VL * 8)));
    const size_t chunk = 1 << 16;  // a multiple of VL
    const size_t nchunks = (n + chunk - 1) / chunk;
    std::vector<double> partial(nchunks, 0.0);
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < nchunks; c++) {
        const size_t begin = c * chunk, end = std::min(n, begin + chunk);
        dvec acc{};
        size_t i = begin;
        for (; i + VL <= end; i += VL) {
            const dvec x = __builtin_convertvector(vload(g + i), dvec);
            acc += x * x;
        }
        double s = 0.0;
        for (int l = 0; l < VL; l++) s += acc[l];
        for (; i < end; i++) s += (double)g[i] * g[i];
        partial[c] = s;
    }
    double total = 0.0;
    for (double s : partial) total += s;
    return total;
}

}  // namespace moe
