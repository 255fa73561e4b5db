/* Causal multi-head self-attention on packed qkv (B, T, 3C), flash-style in fp32: no (T, T)
   matrix is ever stored. One thread block = 4 warps over a few rows of one (batch, head); K/V (or
   Q/dout) tiles of 32 rows are staged in shared memory, and within a tile lane j handles row j
   for the dot products while lane d owns head dimensions d, d+32, ... of the accumulators.
   - forward: online softmax (running max and sum, as FlashAttention), out = softmax(scale q k^T) v;
     saves lse = max + log(sum) per (b, h, t) for the backward.
   - backward: P is recomputed from lse. Kernel 1, per query row: delta = sum_j P dP (pass 1),
     then dq = scale sum_j P (dP - delta) k_j (pass 2), with dP = dout . v_j; it stores delta.
     Kernel 2, per key row: dv = sum_i P_ij dout_i, dk = scale sum_i P_ij (dP_ij - delta_i) q_i.
   Every output element is summed by one thread in a fixed order: no atomics, bit-reproducible.
   Exponentials are exp_fast (as src/simd_cpu.h). Head size at most kAttentionMaxHeadSize (128).
   In bf16 mode the launchers hand head sizes 32, 64 and 128 to the tensor-core kernels of
   attention_tc.cu; every other head size, and fp32 mode, runs the kernels here. */
#include "kernels.cuh"

namespace moe {
namespace cuda {

constexpr int kAttTile = 32;                       // rows of a staged K/V or Q/dout tile (= warp size)
constexpr int kAttWarps = 4;                       // warps per block
constexpr int kDimsPerLane = kAttentionMaxHeadSize / kWarp;
constexpr int kFwdRowsPerWarp = 4, kBwdRowsPerWarp = 2;

// rows row0 .. row0+nrows of a (T, hs) head slice with row stride `stride` -> dst (nrows, ld); zero past T
__device__ void load_rows(float* dst, int ld, const float* src, size_t stride, int row0, int nrows, int T, int hs) {
    for (int idx = threadIdx.x; idx < nrows * hs; idx += blockDim.x) {
        const int r = idx / hs, d = idx % hs, t = row0 + r;
        dst[r * ld + d] = t < T ? src[(size_t)t * stride + d] : 0.0f;
    }
}
// keys/values k0 .. k0+31 of the head whose q row 0 is at `q` -> Ks, Vs (32, hs + 1), between
// barriers (the previous tile is no longer read; the new one is complete)
__device__ void stage_kv_tile(float* Ks, float* Vs, const float* q, int C, int k0, int T, int hs) {
    __syncthreads();
    load_rows(Ks, hs + 1, q + C, 3 * C, k0, kAttTile, T, hs);
    load_rows(Vs, hs + 1, q + 2 * C, 3 * C, k0, kAttTile, T, hs);
    __syncthreads();
}

// The (batch, head) of this block (blockIdx.y = b * NH + h) and this thread's lane and warp.
struct Head {
    int hs, bh, b, h, lane, warp;
    __device__ Head(int C, int NH)
        : hs(C / NH), bh(blockIdx.y), b(blockIdx.y / NH), h(blockIdx.y % NH), lane(threadIdx.x % kWarp),
          warp(threadIdx.x / kWarp) {}
    // offset of row t of this head's columns in a (B, T, width) tensor
    __device__ size_t at(int T, int width, int t) const { return ((size_t)b * T + t) * width + h * hs; }
};

__device__ __forceinline__ float dot(const float* a, const float* b, int n) {
    float acc = 0.0f;
    for (int d = 0; d < n; d++) acc = fmaf(a[d], b[d], acc);
    return acc;
}

// g[d] += s * acc[i] for this lane's dims d = lane + i * 32 < hs: one row of a gradient, added by
// the only warp that owns it (no atomics)
__device__ __forceinline__ void add_lane_dims(float* g, const float* acc, float s, int lane, int hs) {
    for (int i = 0; i < kDimsPerLane; i++) {
        const int d = lane + i * kWarp;
        if (d < hs) g[d] += s * acc[i];
    }
}

__global__ void attention_forward_kernel(float* out, float* lse, const float* qkv, int T, int C, int NH, float scale) {
    extern __shared__ float smem[];
    constexpr int RPW = kFwdRowsPerWarp, QR = RPW * kAttWarps;
    const Head hd(C, NH);
    const int hs = hd.hs, C3 = 3 * C, lane = hd.lane, warp = hd.warp, q0 = blockIdx.x * QR;
    const float* q = qkv + hd.at(T, C3, 0);                // (T, hs), row stride 3C
    float* Qs = smem;                                      // (QR, hs)
    float* Ks = Qs + QR * hs;                              // (32, hs + 1)
    float* Vs = Ks + kAttTile * (hs + 1);                  // (32, hs + 1)
    load_rows(Qs, hs, q, C3, q0, QR, T, hs);
    float m[RPW], l[RPW], o[RPW][kDimsPerLane];
    for (int r = 0; r < RPW; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
        for (int i = 0; i < kDimsPerLane; i++) o[r][i] = 0.0f;
    }
    const int last = min(T, q0 + QR) - 1;   // last key any row of the block sees
    for (int k0 = 0; k0 <= last; k0 += kAttTile) {
        stage_kv_tile(Ks, Vs, q, C, k0, T, hs);
        for (int r = 0; r < RPW; r++) {
            const int row = q0 + warp * RPW + r;
            if (row >= T || k0 > row) continue;   // warp-uniform
            const bool valid = k0 + lane <= row;
            const float s = valid ? scale * dot(Qs + (warp * RPW + r) * hs, Ks + lane * (hs + 1), hs) : -INFINITY;
            const float mnew = fmaxf(m[r], warp_max(s));   // finite: key k0 <= row is valid
            const float p = valid ? exp_fast(s - mnew) : 0.0f;
            const float corr = exp_fast(m[r] - mnew);      // 0 on the first tile (m = -inf)
            l[r] = l[r] * corr + warp_sum(p);
            m[r] = mnew;
            for (int i = 0; i < kDimsPerLane; i++) o[r][i] *= corr;
            for (int j = 0; j < kAttTile && k0 + j <= row; j++) {
                const float pj = __shfl_sync(0xffffffffu, p, j);
                for (int i = 0; i < kDimsPerLane; i++) {
                    const int d = lane + i * kWarp;
                    if (d < hs) o[r][i] = fmaf(pj, Vs[j * (hs + 1) + d], o[r][i]);
                }
            }
        }
    }
    for (int r = 0; r < RPW; r++) {
        const int row = q0 + warp * RPW + r;
        if (row >= T) continue;
        const float inv = 1.0f / l[r];
        float* orow = out + hd.at(T, C, row);
        for (int i = 0; i < kDimsPerLane; i++) {
            const int d = lane + i * kWarp;
            if (d < hs) orow[d] = o[r][i] * inv;
        }
        if (lane == 0) lse[(size_t)hd.bh * T + row] = m[r] + logf(l[r]);
    }
}

__global__ void attention_backward_dq_kernel(float* dqkv, float* delta, const float* dout, const float* qkv,
                                             const float* lse, int T, int C, int NH, float scale) {
    extern __shared__ float smem[];
    constexpr int RPW = kBwdRowsPerWarp, QR = RPW * kAttWarps;
    const Head hd(C, NH);
    const int hs = hd.hs, C3 = 3 * C, bh = hd.bh, lane = hd.lane, warp = hd.warp, q0 = blockIdx.x * QR;
    const float* q = qkv + hd.at(T, C3, 0);                // (T, hs), row stride 3C
    const float* d_o = dout + hd.at(T, C, 0);              // (T, hs), row stride C
    float* Qs = smem;                                      // (QR, hs)
    float* dOs = Qs + QR * hs;                             // (QR, hs)
    float* Ks = dOs + QR * hs;                             // (32, hs + 1)
    float* Vs = Ks + kAttTile * (hs + 1);                  // (32, hs + 1)
    load_rows(Qs, hs, q, C3, q0, QR, T, hs);
    load_rows(dOs, hs, d_o, C, q0, QR, T, hs);
    float L[RPW], D[RPW], dq[RPW][kDimsPerLane];
    for (int r = 0; r < RPW; r++) {
        const int row = q0 + warp * RPW + r;
        L[r] = row < T ? lse[(size_t)bh * T + row] : 0.0f;
        D[r] = 0.0f;
        for (int i = 0; i < kDimsPerLane; i++) dq[r][i] = 0.0f;
    }
    const int last = min(T, q0 + QR) - 1;
    for (int pass = 0; pass < 2; pass++) {   // 0: delta, 1: dq
        for (int k0 = 0; k0 <= last; k0 += kAttTile) {
            stage_kv_tile(Ks, Vs, q, C, k0, T, hs);
            for (int r = 0; r < RPW; r++) {
                const int row = q0 + warp * RPW + r, lr = warp * RPW + r;
                if (row >= T || k0 > row) continue;
                const bool valid = k0 + lane <= row;
                float p = 0.0f, dp = 0.0f;
                if (valid) {
                    p = exp_fast(scale * dot(Qs + lr * hs, Ks + lane * (hs + 1), hs) - L[r]);
                    dp = dot(dOs + lr * hs, Vs + lane * (hs + 1), hs);
                }
                if (pass == 0) {
                    D[r] += p * dp;   // lane-partial, reduced after the pass
                    continue;
                }
                const float ds = p * (dp - D[r]);
                for (int j = 0; j < kAttTile && k0 + j <= row; j++) {
                    const float dsj = __shfl_sync(0xffffffffu, ds, j);
                    for (int i = 0; i < kDimsPerLane; i++) {
                        const int d = lane + i * kWarp;
                        if (d < hs) dq[r][i] = fmaf(dsj, Ks[j * (hs + 1) + d], dq[r][i]);
                    }
                }
            }
        }
        if (pass == 0)
            for (int r = 0; r < RPW; r++) {
                D[r] = warp_sum(D[r]);
                const int row = q0 + warp * RPW + r;
                if (lane == 0 && row < T) delta[(size_t)bh * T + row] = D[r];
            }
    }
    for (int r = 0; r < RPW; r++) {
        const int row = q0 + warp * RPW + r;
        if (row >= T) continue;
        add_lane_dims(dqkv + hd.at(T, C3, row), dq[r], scale, lane, hs);
    }
}

__global__ void attention_backward_dkdv_kernel(float* dqkv, const float* dout, const float* qkv, const float* lse,
                                               const float* delta, int T, int C, int NH, float scale) {
    extern __shared__ float smem[];
    constexpr int RPW = kBwdRowsPerWarp, KR = RPW * kAttWarps;
    const Head hd(C, NH);
    const int hs = hd.hs, C3 = 3 * C, bh = hd.bh, lane = hd.lane, warp = hd.warp, k0 = blockIdx.x * KR;
    const float* q = qkv + hd.at(T, C3, 0);                // (T, hs), row stride 3C, k at +C, v at +2C
    const float* d_o = dout + hd.at(T, C, 0);              // (T, hs), row stride C
    float* Kr = smem;                                      // (KR, hs) this block's keys
    float* Vr = Kr + KR * hs;                              // (KR, hs)
    float* Qs = Vr + KR * hs;                              // (32, hs + 1)
    float* dOs = Qs + kAttTile * (hs + 1);                 // (32, hs + 1)
    float* Ls = dOs + kAttTile * (hs + 1);                 // (32)
    float* Ds = Ls + kAttTile;                             // (32)
    load_rows(Kr, hs, q + C, C3, k0, KR, T, hs);
    load_rows(Vr, hs, q + 2 * C, C3, k0, KR, T, hs);
    float dk[RPW][kDimsPerLane], dv[RPW][kDimsPerLane];
    for (int r = 0; r < RPW; r++)
        for (int i = 0; i < kDimsPerLane; i++) dk[r][i] = dv[r][i] = 0.0f;
    for (int q0 = k0 / kAttTile * kAttTile; q0 < T; q0 += kAttTile) {   // queries >= the first key
        __syncthreads();
        load_rows(Qs, hs + 1, q, C3, q0, kAttTile, T, hs);
        load_rows(dOs, hs + 1, d_o, C, q0, kAttTile, T, hs);
        if (threadIdx.x < kAttTile) {
            const int t = q0 + threadIdx.x;
            Ls[threadIdx.x] = t < T ? lse[(size_t)bh * T + t] : 0.0f;
            Ds[threadIdx.x] = t < T ? delta[(size_t)bh * T + t] : 0.0f;
        }
        __syncthreads();
        for (int r = 0; r < RPW; r++) {
            const int key = k0 + warp * RPW + r, lr = warp * RPW + r;
            if (key >= T || q0 + kAttTile - 1 < key) continue;   // warp-uniform
            const int qi = q0 + lane;
            float p = 0.0f, ds = 0.0f;
            if (qi >= key && qi < T) {
                p = exp_fast(scale * dot(Qs + lane * (hs + 1), Kr + lr * hs, hs) - Ls[lane]);
                ds = p * (dot(dOs + lane * (hs + 1), Vr + lr * hs, hs) - Ds[lane]);
            }
            for (int i = max(0, key - q0); i < kAttTile && q0 + i < T; i++) {
                const float pi = __shfl_sync(0xffffffffu, p, i), dsi = __shfl_sync(0xffffffffu, ds, i);
                for (int j = 0; j < kDimsPerLane; j++) {
                    const int d = lane + j * kWarp;
                    if (d < hs) {
                        dv[r][j] = fmaf(pi, dOs[i * (hs + 1) + d], dv[r][j]);
                        dk[r][j] = fmaf(dsi, Qs[i * (hs + 1) + d], dk[r][j]);
                    }
                }
            }
        }
    }
    for (int r = 0; r < RPW; r++) {
        const int key = k0 + warp * RPW + r;
        if (key >= T) continue;
        float* g = dqkv + hd.at(T, C3, key);
        add_lane_dims(g + C, dk[r], scale, lane, hs);
        add_lane_dims(g + 2 * C, dv[r], 1.0f, lane, hs);
    }
}

namespace {
void check_heads(int C, int NH) {
    if (NH <= 0 || C % NH != 0 || C / NH > kAttentionMaxHeadSize) {
        std::fprintf(stderr, "error: CUDA attention: head size C/NH = %d/%d is not an integer <= %d (%s:%d)\n", C, NH,
                     kAttentionMaxHeadSize, __FILE__, __LINE__);
        std::exit(1);
    }
}
}  // namespace

void attention_forward(float* out,        // (B, T, C)
                       float* lse,        // (B, NH, T) saved for the backward
                       const float* qkv,  // (B, T, 3C)
                       int B, int T, int C, int NH, bool bf16, cudaStream_t stream) {
    check_heads(C, NH);
    if (B <= 0 || T <= 0) return;
    if (bf16 && attention_tc_supported(C / NH)) return attention_tc_forward(out, lse, qkv, B, T, C, NH, stream);
    const int hs = C / NH, QR = kFwdRowsPerWarp * kAttWarps;
    const size_t smem = (size_t)(QR * hs + 2 * kAttTile * (hs + 1)) * sizeof(float);
    const float scale = 1.0f / sqrtf((float)hs);
    attention_forward_kernel<<<dim3(CEIL_DIV(T, QR), B * NH), kAttWarps * kWarp, smem, stream>>>(out, lse, qkv, T, C,
                                                                                                NH, scale);
    cudaCheck(cudaGetLastError());
}

void attention_backward(float* dqkv,        // (B, T, 3C), +=
                        float* delta,       // (B, NH, T) scratch, overwritten
                        const float* dout,  // (B, T, C)
                        const float* qkv,   // (B, T, 3C)
                        const float* lse,   // (B, NH, T) from the forward
                        int B, int T, int C, int NH, bool bf16, cudaStream_t stream) {
    check_heads(C, NH);
    if (B <= 0 || T <= 0) return;
    // the lse of either forward serves either backward (same definition); bf16 picks the same
    // kernels in both directions
    if (bf16 && attention_tc_supported(C / NH))
        return attention_tc_backward(dqkv, delta, dout, qkv, lse, B, T, C, NH, stream);
    const int hs = C / NH, R = kBwdRowsPerWarp * kAttWarps;
    const float scale = 1.0f / sqrtf((float)hs);
    const size_t smem = (size_t)(2 * R * hs + 2 * kAttTile * (hs + 1) + 2 * kAttTile) * sizeof(float);
    const dim3 grid(CEIL_DIV(T, R), B * NH);
    attention_backward_dq_kernel<<<grid, kAttWarps * kWarp, smem, stream>>>(dqkv, delta, dout, qkv, lse, T, C, NH,
                                                                             scale);
    cudaCheck(cudaGetLastError());
    attention_backward_dkdv_kernel<<<grid, kAttWarps * kWarp, smem, stream>>>(dqkv, dout, qkv, lse, delta, T, C, NH,
                                                                               scale);
    cudaCheck(cudaGetLastError());
}

}  // namespace cuda
}  // namespace moe
