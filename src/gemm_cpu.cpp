/* The CPU GEMM engine (one cache-blocked, register-tiled GEMM behind every matmul of the CPU
   path) and the ops built on it: matmul forward/backward and the grouped expert GEMM.
   Every output element is written by exactly one thread, summing over K in a fixed order:
   results are bitwise independent of the number of threads. */
#include "gemm_cpu.h"
#include "ops_cpu.h"
#include "ops_moe_cpu.h"
#include "simd_cpu.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace moe {
using namespace simd;
namespace {

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

// C tile: MR rows x NV vectors.
#if defined(__AVX512F__)
constexpr int MR = 8, NV = 2;  // 8 x 32: 16 of the 32 zmm registers accumulate
#elif defined(__AVX__)
constexpr int MR = 6, NV = 2;  // 6 x 16: 12 of the 16 ymm registers accumulate
#else
constexpr int MR = 4, NV = 2;  // 4 x 8: 8 of the 16 xmm registers accumulate
#endif
constexpr int NR = VL * NV;
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

#if defined(__AVX512F__)
// GCC 12's shuffle intrinsics start from an "undefined" register that -Wmaybe-uninitialized
// reports (GCC bug 105593, fixed in 13)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// r[c] = column c of the 16 x 16 block whose rows are r[0..15]: four rounds of shuffles
inline void transpose_16x16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int q = 0; q < 4; q++) {  // 128-bit lanes: 0x88 takes lanes 0 and 2 of each, 0xdd 1 and 3
        t[q] = _mm512_shuffle_f32x4(r[q], r[4 + q], 0x88);
        t[q + 4] = _mm512_shuffle_f32x4(r[q], r[4 + q], 0xdd);
        t[q + 8] = _mm512_shuffle_f32x4(r[8 + q], r[12 + q], 0x88);
        t[q + 12] = _mm512_shuffle_f32x4(r[8 + q], r[12 + q], 0xdd);
    }
    for (int q = 0; q < 4; q++) {
        r[q] = _mm512_shuffle_f32x4(t[q], t[q + 8], 0x88);
        r[q + 8] = _mm512_shuffle_f32x4(t[q], t[q + 8], 0xdd);
        r[q + 4] = _mm512_shuffle_f32x4(t[q + 4], t[q + 12], 0x88);
        r[q + 12] = _mm512_shuffle_f32x4(t[q + 4], t[q + 12], 0xdd);
    }
}

// One B panel (K x NR, zero padded past w columns) from columns that are contiguous in k
// (column j at src + j*sbn): 16 x 16 blocks transposed in registers, since the scalar loop's
// stores, NR floats apart, made this pack cost a third of a 64-row expert GEMM. Returns the k
// where the blocks stopped (K rounded down to 16); the caller packs the rest.
int pack_transposed_16(float* dst, const float* src, size_t sbn, int w, int K) {
    static_assert(NR == 32, "two 16-column halves per panel");
    const int kend = K / 16 * 16;
    for (int h = 0; h < NR; h += 16)
        for (int k0 = 0; k0 < kend; k0 += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; i++)
                r[i] = h + i < w ? _mm512_loadu_ps(src + (size_t)(h + i) * sbn + k0) : _mm512_setzero_ps();
            transpose_16x16(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_ps(dst + (size_t)(k0 + i) * NR + h, r[i]);
        }
    return kend;
}
#pragma GCC diagnostic pop
#endif

}  // namespace

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
            int k0 = 0;
#if defined(__AVX512F__)
            if (sbk == 1) k0 = pack_transposed_16(dst, src, sbn, w, K);
#endif
            for (int j = 0; j < NR; j++)
                for (int k = k0; k < K; k++)
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

// ----------------------------------------------------------------------------------------
// matmul (weights (OC, C) as in PyTorch)

namespace {

constexpr int kBiasCols = 64;  // dbias columns summed together (one accumulator row)

// out[j] += sum over rows r (in order) of d[r*ld + j], for j < w <= kBiasCols: the column sums
// behind every dbias, one thread, accumulated apart and then added (the same bits wherever used)
void add_column_sums(float* out, const float* d, int rows, int ld, int w) {
    float acc[kBiasCols] = {};
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < w; j++) acc[j] += d[(size_t)r * ld + j];
    for (int j = 0; j < w; j++) out[j] += acc[j];
}

}  // namespace

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
        const int nblk = (OC + kBiasCols - 1) / kBiasCols;
#pragma omp parallel for schedule(static)
        for (int blk = 0; blk < nblk; blk++) {
            const int o0 = blk * kBiasCols;
            add_column_sums(dbias + o0, dout + o0, N, OC, std::min(OC - o0, kBiasCols));
        }
    }
}

// ----------------------------------------------------------------------------------------
// grouped expert GEMM (contract in backend.h): all experts of a layer in one parallel region.
// A loop of per-expert matmuls would open a parallel region per expert and GEMM (six per expert
// and step) for blocks of a few dozen rows each: with 64 experts that overhead and the idle
// threads at each region's end cost more than the FLOPs. Here the work is cut into tasks that
// each run the GEMM on one thread: row chunks of a block for the forward and dinp (rows are
// independent), and (expert, OC chunk) for dweight and dbias, each task walking that expert's
// blocks in the given order (so the sum over rows has one fixed order).

namespace {

// Task sizes: as large as keeps every thread busy (about 4 tasks per thread), because each task
// packs its B operand (W_e, or the expert's input rows for dweight) once; but at least
// kGroupRows rows / kGroupOC features, so that a few big experts still spread over the threads.
constexpr int kGroupRows = 128;  // least rows per forward / dinp task
constexpr int kGroupOC = 64;     // least dweight rows (output features) per task

std::vector<GroupBlock> row_tasks(const GroupBlock* blocks, int nblocks) {
    int total = 0;
    for (int i = 0; i < nblocks; i++) total += blocks[i].rows;
    const int want = 4 * omp_get_max_threads();
    const int per = std::max(kGroupRows, (total + want - 1) / want);
    std::vector<GroupBlock> t;
    for (int i = 0; i < nblocks; i++) {
        const int pieces = (blocks[i].rows + per - 1) / per;  // even pieces of at most `per` rows
        for (int j = 0; j < pieces; j++) {
            const int r0 = (int)((int64_t)blocks[i].rows * j / pieces), r1 = (int)((int64_t)blocks[i].rows * (j + 1) / pieces);
            t.push_back({blocks[i].expert, blocks[i].row0 + r0, r1 - r0});
        }
    }
    return t;
}

}  // namespace

void grouped_matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                            const GroupBlock* blocks, int nblocks, int C, int OC) {
    const std::vector<GroupBlock> tasks = row_tasks(blocks, nblocks);
#pragma omp parallel for schedule(dynamic)
    for (size_t i = 0; i < tasks.size(); i++) {
        const GroupBlock& t = tasks[i];
        const size_t r0 = t.row0, e = t.expert;
        // out rows (rows, OC) = inp rows (rows, C) . W_e^T (+ b_e)
        gemm(out + r0 * OC, OC, inp + r0 * C, C, 1, weight + e * OC * C, 1, C, bias ? bias + e * OC : nullptr,
             false, 1.0f, t.rows, OC, C);
    }
}

void grouped_matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                             const float* weight, const GroupBlock* blocks, int nblocks, int C, int OC) {
    if (dinp) {
        const std::vector<GroupBlock> tasks = row_tasks(blocks, nblocks);
#pragma omp parallel for schedule(dynamic)
        for (size_t i = 0; i < tasks.size(); i++) {
            const GroupBlock& t = tasks[i];
            const size_t r0 = t.row0, e = t.expert;
            // dinp rows (rows, C) += dout rows (rows, OC) . W_e (OC, C)
            gemm(dinp + r0 * C, C, dout + r0 * OC, OC, 1, weight + e * OC * C, C, 1, nullptr, true, 1.0f, t.rows,
                 C, OC);
        }
    }
    if (!dweight && !dbias) return;
    // the blocks of each expert, in the given order; one task per (expert, OC chunk)
    int E = 0;
    for (int i = 0; i < nblocks; i++) E = std::max(E, blocks[i].expert + 1);
    std::vector<std::vector<int>> of(E);
    for (int i = 0; i < nblocks; i++)
        if (blocks[i].rows > 0) of[blocks[i].expert].push_back(i);
    int active = 0;
    for (int e = 0; e < E; e++) active += !of[e].empty();
    const int want = 4 * omp_get_max_threads(), per_expert = std::max(1, (want + active - 1) / std::max(active, 1));
    const int chunk = std::max(kGroupOC, (OC + per_expert - 1) / per_expert / kGroupOC * kGroupOC);
    std::vector<std::pair<int, int>> tasks;  // (expert, first output feature)
    for (int e = 0; e < E; e++)
        if (!of[e].empty())
            for (int o = 0; o < OC; o += chunk) tasks.push_back({e, o});
#pragma omp parallel for schedule(dynamic)
    for (size_t i = 0; i < tasks.size(); i++) {
        const size_t e = tasks[i].first, o0 = tasks[i].second;
        const int no = std::min(chunk, OC - (int)o0);
        for (int bi : of[e]) {
            const GroupBlock& b = blocks[bi];
            const float* d = dout + (size_t)b.row0 * OC + o0;  // (rows, no), row stride OC
            // dW_e rows o0.. (no, C) += dout^T (no, rows) . inp rows (rows, C)
            if (dweight)
                gemm(dweight + (e * OC + o0) * C, C, d, 1, OC, inp + (size_t)b.row0 * C, C, 1, nullptr, true, 1.0f,
                     no, C, b.rows);
            if (dbias)  // column sums of the block, as matmul_backward takes them
                for (int j0 = 0; j0 < no; j0 += kBiasCols)
                    add_column_sums(dbias + e * OC + o0 + j0, d + j0, b.rows, OC, std::min(kBiasCols, no - j0));
        }
    }
}

}  // namespace moe
