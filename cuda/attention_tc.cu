/* Causal self-attention on tensor cores for train.dtype bf16 (FlashAttention-2 style): the same op
   as attention.cu (packed qkv (B, T, 3C) fp32 in, out (B, T, C) fp32, lse (B, NH, T) saved, no (T, T)
   matrix in memory), with every product on mma.sync m16n8k16 (bf16 operands, fp32 accumulators).
   Tiles are read as fp32 and rounded to bf16 while they are staged in shared memory, as the bf16
   GEMM does; softmax statistics, P, dS and all accumulators stay fp32 in registers, P and dS are
   rounded to bf16 only as operands of the second product. Head sizes 32, 64 and 128 (a template
   parameter: the accumulators are register arrays); other head sizes use attention.cu's kernels.

   A block is 4 warps; each warp owns 16 rows (queries, or keys in the dK/dV kernel) and keeps
   their accumulators in mma C fragments. The C fragments of S (16 x 8 tiles) are reused as the A
   fragments of P.V without a trip through shared memory (FlashAttention-2's register trick).
   - forward: 64 query rows per block, key tiles of 64; online softmax (running max and sum per
     row in fp32), causal mask and T tail masked with -inf, key tiles after a warp's last row
     skipped. Writes out and lse = max + log(sum).
   - backward, two kernels, no atomics (bit-reproducible):
     1. dq kernel, 64 query rows per block over key tiles of 64, two passes: pass 0 computes
        delta = rowsum(P * dP) (= rowsum(dO * O); the op contract gives the backward no O, so it is
        recomputed from P and dP = dO V^T), stored for kernel 2; pass 1 computes dS = P (dP - delta)
        and dq = scale dS K.
     2. dk/dv kernel, 64 keys per block over query tiles of 32 (from the block's first key on):
        S^T = K Q^T, dP^T = V dO^T, P^T from lse, dv += P^T dO, dk += scale dS^T Q.
     Each kernel owns its outputs (dq rows; dk and dv rows), so every element is summed by one
     thread in a fixed order. FlashAttention-2 proper runs one pass and adds dq with float
     atomics, which makes runs differ in the last bits; this costs two recomputations of S and
     dP instead (9 products per tile pair against 5).
   Exponentials are exp_fast, as in attention.cu and on the CPU. */
#include "kernels.cuh"

namespace moe {
namespace cuda {

using bf16 = __nv_bfloat16;

constexpr int kTcWarps = 4, kTcThreads = kTcWarps * kWarp;
constexpr int kTcRows = 16 * kTcWarps;   // rows a block owns (queries, or keys in the dk/dv kernel)
constexpr int kTcKeys = 64;              // key tile of the forward and the dq kernel
constexpr int kTcQueries = 32;           // query tile of the dk/dv kernel (it holds two (16, hs) accumulators)
// Shared rows are hs + 8 bf16 long: 16-byte aligned for ldmatrix, and the 8 rows of an 8x8
// matrix start 4 banks apart, so ldmatrix reads them without bank conflicts.
constexpr int kTcPad = 8;

bool attention_tc_supported(int hs) { return hs == 32 || hs == 64 || hs == 128; }

// Element r (0..3) of n8 tile nt of an m16n8 accumulator sits at (frag_row(r), frag_col(nt, r)).
__device__ __forceinline__ int frag_row(int r) { return (threadIdx.x % kWarp) / 4 + (r / 2) * 8; }
__device__ __forceinline__ int frag_col(int nt, int r) { return nt * 8 + (threadIdx.x % 4) * 2 + r % 2; }
// over the 4 lanes that hold one accumulator row (fixed order: deterministic)
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// rows row0 .. row0+R of a head slice (row t at src + t * stride, D floats) -> dst (R, D + kTcPad)
// bf16, rounded to nearest even; rows past T are zero
template <int D, int R>
__device__ void stage_rows(bf16* dst, const float* src, size_t stride, int row0, int T) {
    for (int i = threadIdx.x; i < R * D / 2; i += blockDim.x) {
        const int r = i / (D / 2), c = (i % (D / 2)) * 2, t = row0 + r;
        uint32_t v = 0u;
        if (t < T) {
            const float* s = src + (size_t)t * stride + c;
            v = pack_bf16x2(s[0], s[1]);
        }
        *reinterpret_cast<uint32_t*>(dst + r * (D + kTcPad) + c) = v;
    }
}

// acc (16, N) += A (16, K) . B (N, K)^T: A's 16 rows and B's N rows in shared memory, k contiguous,
// ld bf16 per row. (Q K^T, dO V^T, K Q^T, V dO^T.)
template <int K, int N>
__device__ __forceinline__ void mma_abt(float (&acc)[N / 8][4], const bf16* A, const bf16* B, int ld) {
    const int lane = threadIdx.x % kWarp;
#pragma unroll
    for (int k = 0; k < K; k += 16) {
        uint32_t a[4];   // lanes 0-15: rows 0-15 at k, lanes 16-31: rows 0-15 at k + 8
        ldmatrix_x4(a, A + (lane % 16) * ld + k + (lane / 16) * 8);
#pragma unroll
        for (int n = 0; n < N; n += 16) {   // two n8 tiles per ldmatrix: (n | n + 8) x (k | k + 8)
            uint32_t b[4];
            ldmatrix_x4(b, B + (n + lane % 8 + (lane / 16) * 8) * ld + k + ((lane / 8) % 2) * 8);
            mma_bf16_16816(acc[n / 8], a, b[0], b[1]);
            mma_bf16_16816(acc[n / 8 + 1], a, b[2], b[3]);
        }
    }
}

// acc (16, N) += P (16, K) . B (K, N): P as fp32 accumulator fragments (n8 tiles), rounded to bf16
// here; B's K rows in shared memory, n contiguous, read transposed by ldmatrix. (P V, dS K, P^T dO,
// dS^T Q.)
template <int K, int N>
__device__ __forceinline__ void mma_pb(float (&acc)[N / 8][4], const float (&p)[K / 8][4], const bf16* B, int ld) {
    const int lane = threadIdx.x % kWarp;
#pragma unroll
    for (int k = 0; k < K; k += 16) {
        // the C fragments of n8 tiles k/8 and k/8 + 1 are, element for element, the A fragment of
        // the k16 chunk (see common.cuh for the layouts)
        const float* p0 = p[k / 8];
        const float* p1 = p[k / 8 + 1];
        const uint32_t a[4] = {pack_bf16x2(p0[0], p0[1]), pack_bf16x2(p0[2], p0[3]), pack_bf16x2(p1[0], p1[1]),
                               pack_bf16x2(p1[2], p1[3])};
#pragma unroll
        for (int n = 0; n < N; n += 16) {   // matrices (k | k + 8) x (n | n + 8), transposed
            uint32_t b[4];
            ldmatrix_x4_trans(b, B + (k + lane % 8 + ((lane / 8) % 2) * 8) * ld + n + (lane / 16) * 8);
            mma_bf16_16816(acc[n / 8], a, b[0], b[1]);
            mma_bf16_16816(acc[n / 8 + 1], a, b[2], b[3]);
        }
    }
}

// dst row (row0 + i) (i < 16, rows < T only), columns 0..D: = or += mul[i / 8] * acc
template <int D>
__device__ void write_rows(float* dst, size_t stride, int row0, int T, const float (&acc)[D / 8][4],
                           const float (&mul)[2], bool accumulate) {
#pragma unroll
    for (int nt = 0; nt < D / 8; nt++)
#pragma unroll
        for (int r = 0; r < 4; r++) {
            const int t = row0 + frag_row(r);
            if (t >= T) continue;
            float* d = dst + (size_t)t * stride + frag_col(nt, r);
            *d = (accumulate ? *d : 0.0f) + mul[r / 2] * acc[nt][r];
        }
}

// The (batch, head) of blockIdx.y = b * NH + h: offset of its row 0 in a (B, T, width) tensor.
__device__ __forceinline__ size_t head_at(int T, int width, int C, int NH) {
    const int b = blockIdx.y / NH, h = blockIdx.y % NH;
    return (size_t)b * T * width + (size_t)h * (C / NH);
}

template <int D>
__global__ void __launch_bounds__(kTcThreads)
attention_tc_forward_kernel(float* out, float* lse, const float* qkv, int T, int C, int NH, float scale) {
    constexpr int LD = D + kTcPad, BC = kTcKeys;
    extern __shared__ __align__(16) bf16 tc_smem[];
    bf16* Qs = tc_smem;                       // (64, LD) this block's queries
    bf16* Ks = Qs + kTcRows * LD;             // (BC, LD)
    bf16* Vs = Ks + BC * LD;                  // (BC, LD)
    const int warp = threadIdx.x / kWarp, C3 = 3 * C;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * kTcRows;   // the longest rows (most key tiles) first
    const int qw = q0 + warp * 16;                           // this warp's first row
    const float* q = qkv + head_at(T, C3, C, NH);            // (T, hs), row stride 3C; k at +C, v at +2C
    stage_rows<D, kTcRows>(Qs, q, C3, q0, T);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};   // rows frag_row 0..7 and 8..15
    float o[D / 8][4] = {};
    const int last = min(T, q0 + kTcRows) - 1;                  // last key any row of the block sees
    for (int k0 = 0; k0 <= last; k0 += BC) {
        __syncthreads();   // the previous tile is no longer read
        stage_rows<D, BC>(Ks, q + C, C3, k0, T);
        stage_rows<D, BC>(Vs, q + 2 * C, C3, k0, T);
        __syncthreads();
        if (k0 > qw + 15) continue;   // every key of the tile is after this warp's rows (warp-uniform)
        float s[BC / 8][4] = {};
        mma_abt<D, BC>(s, Qs + warp * 16 * LD, Ks, LD);
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int nt = 0; nt < BC / 8; nt++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int key = k0 + frag_col(nt, r), row = qw + frag_row(r);
                s[nt][r] = key <= row && key < T ? scale * s[nt][r] : -INFINITY;
                mx[r / 2] = fmaxf(mx[r / 2], s[nt][r]);
            }
        float base[2], corr[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int i = 0; i < 2; i++) {
            mx[i] = quad_max(mx[i]);
            base[i] = mx[i] == -INFINITY ? 0.0f : mx[i];   // a row with no key yet: keep exp(-inf - base) = 0
            corr[i] = exp_fast(m[i] - base[i]);            // 0 on a row's first keys (m = -inf)
            m[i] = mx[i];
        }
#pragma unroll
        for (int nt = 0; nt < BC / 8; nt++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                s[nt][r] = exp_fast(s[nt][r] - base[r / 2]);   // masked: exp(-inf) = 0
                sum[r / 2] += s[nt][r];
            }
#pragma unroll
        for (int i = 0; i < 2; i++) l[i] = l[i] * corr[i] + sum[i];   // lane-partial sums, reduced at the end
#pragma unroll
        for (int nt = 0; nt < D / 8; nt++)
#pragma unroll
            for (int r = 0; r < 4; r++) o[nt][r] *= corr[r / 2];
        mma_pb<BC, D>(o, s, Vs, LD);
    }
    float inv[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] = quad_sum(l[i]);
        inv[i] = 1.0f / l[i];
    }
    write_rows<D>(out + head_at(T, C, C, NH), C, qw, T, o, inv, false);
    if (threadIdx.x % 4 == 0)
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int row = qw + frag_row(2 * i);
            if (row < T) lse[(size_t)blockIdx.y * T + row] = m[i] + logf(l[i]);
        }
}

template <int D>
__global__ void __launch_bounds__(kTcThreads)
attention_tc_backward_dq_kernel(float* dqkv, float* delta, const float* dout, const float* qkv, const float* lse, int T,
                                int C, int NH, float scale) {
    constexpr int LD = D + kTcPad, BC = kTcKeys;
    extern __shared__ __align__(16) bf16 tc_smem[];
    bf16* Qs = tc_smem;                       // (64, LD) this block's queries
    bf16* dOs = Qs + kTcRows * LD;            // (64, LD) their output gradients
    bf16* Ks = dOs + kTcRows * LD;            // (BC, LD)
    bf16* Vs = Ks + BC * LD;                  // (BC, LD)
    const int warp = threadIdx.x / kWarp, C3 = 3 * C;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * kTcRows, qw = q0 + warp * 16;
    const float* q = qkv + head_at(T, C3, C, NH);   // (T, hs), row stride 3C
    stage_rows<D, kTcRows>(Qs, q, C3, q0, T);
    stage_rows<D, kTcRows>(dOs, dout + head_at(T, C, C, NH), C, q0, T);
    const float* L = lse + (size_t)blockIdx.y * T;   // (T)
    float Lr[2], Dr[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const int row = qw + frag_row(2 * i);
        Lr[i] = row < T ? L[row] : 0.0f;
    }
    float dq[D / 8][4] = {};
    const int last = min(T, q0 + kTcRows) - 1;
    for (int pass = 0; pass < 2; pass++) {   // 0: delta, 1: dq
        for (int k0 = 0; k0 <= last; k0 += BC) {
            __syncthreads();
            stage_rows<D, BC>(Ks, q + C, C3, k0, T);
            stage_rows<D, BC>(Vs, q + 2 * C, C3, k0, T);
            __syncthreads();
            if (k0 > qw + 15) continue;
            float s[BC / 8][4] = {}, dp[BC / 8][4] = {};
            mma_abt<D, BC>(s, Qs + warp * 16 * LD, Ks, LD);     // S = Q K^T
            mma_abt<D, BC>(dp, dOs + warp * 16 * LD, Vs, LD);   // dP = dO V^T
#pragma unroll
            for (int nt = 0; nt < BC / 8; nt++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const int key = k0 + frag_col(nt, r), row = qw + frag_row(r);
                    const float p = key <= row && key < T ? exp_fast(scale * s[nt][r] - Lr[r / 2]) : 0.0f;
                    if (pass == 0) Dr[r / 2] += p * dp[nt][r];   // lane-partial, reduced after the pass
                    else s[nt][r] = p * (dp[nt][r] - Dr[r / 2]);  // dS
                }
            if (pass == 1) mma_pb<BC, D>(dq, s, Ks, LD);   // dq += dS K
        }
        if (pass == 0)
#pragma unroll
            for (int i = 0; i < 2; i++) {
                Dr[i] = quad_sum(Dr[i]);
                const int row = qw + frag_row(2 * i);
                if (threadIdx.x % 4 == 0 && row < T) delta[(size_t)blockIdx.y * T + row] = Dr[i];
            }
    }
    const float mul[2] = {scale, scale};
    write_rows<D>(dqkv + head_at(T, C3, C, NH), C3, qw, T, dq, mul, true);
}

template <int D>
__global__ void __launch_bounds__(kTcThreads)
attention_tc_backward_dkdv_kernel(float* dqkv, const float* dout, const float* qkv, const float* lse,
                                  const float* delta, int T, int C, int NH, float scale) {
    constexpr int LD = D + kTcPad, BQ = kTcQueries;
    extern __shared__ __align__(16) bf16 tc_smem[];
    bf16* Ks = tc_smem;                       // (64, LD) this block's keys
    bf16* Vs = Ks + kTcRows * LD;             // (64, LD) their values
    bf16* Qs = Vs + kTcRows * LD;             // (BQ, LD)
    bf16* dOs = Qs + BQ * LD;                 // (BQ, LD)
    float* Ls = reinterpret_cast<float*>(dOs + BQ * LD);   // (BQ) lse of the tile's queries
    float* Ds = Ls + BQ;                                    // (BQ) their delta
    const int warp = threadIdx.x / kWarp, C3 = 3 * C;
    const int k0 = blockIdx.x * kTcRows, kw = k0 + warp * 16;   // block 0 has the most queries: first
    const float* q = qkv + head_at(T, C3, C, NH);                // (T, hs), row stride 3C
    const float* d_o = dout + head_at(T, C, C, NH);              // (T, hs), row stride C
    const float* L = lse + (size_t)blockIdx.y * T;               // (T)
    const float* Dl = delta + (size_t)blockIdx.y * T;            // (T)
    stage_rows<D, kTcRows>(Ks, q + C, C3, k0, T);
    stage_rows<D, kTcRows>(Vs, q + 2 * C, C3, k0, T);
    float dk[D / 8][4] = {}, dv[D / 8][4] = {};
    for (int q0 = k0; q0 < T; q0 += BQ) {   // queries before the block's first key see none of its keys
        __syncthreads();
        stage_rows<D, BQ>(Qs, q, C3, q0, T);
        stage_rows<D, BQ>(dOs, d_o, C, q0, T);
        if (threadIdx.x < BQ) {
            const int t = q0 + threadIdx.x;
            Ls[threadIdx.x] = t < T ? L[t] : 0.0f;
            Ds[threadIdx.x] = t < T ? Dl[t] : 0.0f;
        }
        __syncthreads();
        if (q0 + BQ - 1 < kw) continue;   // every query of the tile is before this warp's keys
        float st[BQ / 8][4] = {}, dpt[BQ / 8][4] = {};
        mma_abt<D, BQ>(st, Ks + warp * 16 * LD, Qs, LD);    // S^T = K Q^T
        mma_abt<D, BQ>(dpt, Vs + warp * 16 * LD, dOs, LD);  // dP^T = V dO^T
#pragma unroll
        for (int nt = 0; nt < BQ / 8; nt++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int key = kw + frag_row(r), qi = frag_col(nt, r), t = q0 + qi;
                // t >= key also rules out keys past T (then t >= T)
                const float p = t >= key && t < T ? exp_fast(scale * st[nt][r] - Ls[qi]) : 0.0f;
                st[nt][r] = p;
                dpt[nt][r] = p * (dpt[nt][r] - Ds[qi]);   // dS^T
            }
        mma_pb<BQ, D>(dv, st, dOs, LD);   // dv += P^T dO
        mma_pb<BQ, D>(dk, dpt, Qs, LD);   // dk += dS^T Q
    }
    const float one[2] = {1.0f, 1.0f}, mul[2] = {scale, scale};
    float* g = dqkv + head_at(T, C3, C, NH);
    write_rows<D>(g + C, C3, kw, T, dk, mul, true);
    write_rows<D>(g + 2 * C, C3, kw, T, dv, one, true);
}

namespace {

// Dynamic shared memory above 48 KB (hs 128) must be allowed per kernel before the launch.
template <class Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

template <int D>
void forward_hs(float* out, float* lse, const float* qkv, int B, int T, int C, int NH, cudaStream_t stream) {
    const size_t smem = (size_t)(kTcRows + 2 * kTcKeys) * (D + kTcPad) * sizeof(bf16);
    allow_smem(attention_tc_forward_kernel<D>, smem);
    const float scale = 1.0f / sqrtf((float)D);
    attention_tc_forward_kernel<D><<<dim3(CEIL_DIV(T, kTcRows), B * NH), kTcThreads, smem, stream>>>(out, lse, qkv, T,
                                                                                                    C, NH, scale);
    cudaCheck(cudaGetLastError());
}

template <int D>
void backward_hs(float* dqkv, float* delta, const float* dout, const float* qkv, const float* lse, int B, int T, int C,
                 int NH, cudaStream_t stream) {
    const float scale = 1.0f / sqrtf((float)D);
    const dim3 grid(CEIL_DIV(T, kTcRows), B * NH);
    const size_t smem_dq = (size_t)(2 * kTcRows + 2 * kTcKeys) * (D + kTcPad) * sizeof(bf16);
    allow_smem(attention_tc_backward_dq_kernel<D>, smem_dq);
    attention_tc_backward_dq_kernel<D><<<grid, kTcThreads, smem_dq, stream>>>(dqkv, delta, dout, qkv, lse, T, C, NH,
                                                                              scale);
    cudaCheck(cudaGetLastError());
    const size_t smem_kv =
        (size_t)(2 * kTcRows + 2 * kTcQueries) * (D + kTcPad) * sizeof(bf16) + 2 * kTcQueries * sizeof(float);
    allow_smem(attention_tc_backward_dkdv_kernel<D>, smem_kv);
    attention_tc_backward_dkdv_kernel<D><<<grid, kTcThreads, smem_kv, stream>>>(dqkv, dout, qkv, lse, delta, T, C, NH,
                                                                                scale);
    cudaCheck(cudaGetLastError());
}

void unsupported(int hs) {
    std::fprintf(stderr, "error: CUDA tensor-core attention: head size %d is not 32, 64 or 128 (%s:%d)\n", hs,
                 __FILE__, __LINE__);
    std::exit(1);
}

}  // namespace

void attention_tc_forward(float* out,        // (B, T, C)
                          float* lse,        // (B, NH, T) saved for the backward
                          const float* qkv,  // (B, T, 3C)
                          int B, int T, int C, int NH, cudaStream_t stream) {
    if (B <= 0 || T <= 0) return;
    switch (C / NH) {
        case 32: forward_hs<32>(out, lse, qkv, B, T, C, NH, stream); break;
        case 64: forward_hs<64>(out, lse, qkv, B, T, C, NH, stream); break;
        case 128: forward_hs<128>(out, lse, qkv, B, T, C, NH, stream); break;
        default: unsupported(C / NH);
    }
}

void attention_tc_backward(float* dqkv,        // (B, T, 3C), +=
                           float* delta,       // (B, NH, T) scratch, overwritten
                           const float* dout,  // (B, T, C)
                           const float* qkv,   // (B, T, 3C)
                           const float* lse,   // (B, NH, T) from attention_tc_forward
                           int B, int T, int C, int NH, cudaStream_t stream) {
    if (B <= 0 || T <= 0) return;
    switch (C / NH) {
        case 32: backward_hs<32>(dqkv, delta, dout, qkv, lse, B, T, C, NH, stream); break;
        case 64: backward_hs<64>(dqkv, delta, dout, qkv, lse, B, T, C, NH, stream); break;
        case 128: backward_hs<128>(dqkv, delta, dout, qkv, lse, B, T, C, NH, stream); break;
        default: unsupported(C / NH);
    }
}

}  // namespace cuda
}  // namespace moe
