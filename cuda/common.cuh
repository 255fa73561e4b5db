/* Shared helpers of the CUDA kernels: error checking in the repo's convention (one line
   `error: CUDA <call>: <msg> (file:line)`, exit status 1), CEIL_DIV, warp and block reductions
   with a fixed combination order (so every reduction is bit-reproducible run to run), bf16
   conversion, and exp_fast on exp_poly (src/exp_poly.h), the polynomial the CPU uses too, so
   that GELU, softmax and attention see the same exponentials on both backends. */
#pragma once
#include <cuda_runtime.h>
#include <cuda_bf16.h>

#include "exp_poly.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define CEIL_DIV(a, b) (((a) + (b) - 1) / (b))

inline void cuda_check(cudaError_t err, const char* call, const char* file, int line) {
    if (err != cudaSuccess) {
        std::fprintf(stderr, "error: CUDA %s: %s (%s:%d)\n", call, cudaGetErrorString(err), file, line);
        std::exit(1);
    }
}
#define cudaCheck(call) cuda_check((call), #call, __FILE__, __LINE__)

namespace moe {
namespace cuda {

constexpr int kWarp = 32;

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `shared` holds 32 values. The order of additions depends only on blockDim: deterministic.
template <typename T>
__device__ T block_sum(T v, T* shared) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
    v = warp_sum(v);
    __syncthreads();  // `shared` may still be read by a previous call
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < nwarps ? shared[lane] : T(0);
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* shared) {
    const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, nwarps = blockDim.x / kWarp;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < nwarps ? shared[lane] : -INFINITY;
    return warp_max(v);
}

// exp(x) as src/simd_cpu.h's exp_fast: ~2 ulp, 0 below -87, NaN propagates.
__device__ __forceinline__ float exp_fast(float x) {
    const float xc = fminf(fmaxf(x, -87.0f), 88.0f);
    float n;
    const float p = exp_poly(xc, n);
    const float scale = __uint_as_float((uint32_t)((int32_t)n + 127) << 23);
    return x < -87.0f ? 0.0f : (x != x ? x : p * scale);
}

// bf16 helpers: round to nearest even, two values packed in one 32-bit register (low = first).
__device__ __forceinline__ __nv_bfloat16 to_bf16(float x) { return __float2bfloat16_rn(x); }
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// Tensor-core fragments (mma.sync m16n8k16, bf16 operands, fp32 accumulators), shared by the bf16
// GEMM (matmul.cu) and the tensor-core attention (attention_tc.cu). Layouts, g = lane / 4,
// q = lane % 4: A (16x16) a[0] = (g, 2q..2q+1), a[1] = (g+8, 2q..), a[2] = (g, 2q+8..),
// a[3] = (g+8, 2q+8..); B (16x8, k x n) b0 = (k 2q..2q+1, n g), b1 = (k 2q+8.., n g);
// C (16x8) c[0..1] = (g, 2q..2q+1), c[2..3] = (g+8, 2q..2q+1).
// Four 8x8 bf16 matrices from shared memory, lanes 8i..8i+7 giving the row addresses of matrix i;
// each lane receives (row lane/4, cols 2*(lane%4), +1) of each.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const __nv_bfloat16* smem) {
    const unsigned addr = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// The same, transposed: each lane receives (rows 2*(lane%4), +1, col lane/4) of each matrix, i.e.
// the B fragment of a (k, n) matrix stored k-major (rows = k).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const __nv_bfloat16* smem) {
    const unsigned addr = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}
// c (16x8, fp32) += a (16x16, bf16, row) . b (16x8, bf16, col)
__device__ __forceinline__ void mma_bf16_16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Grid-stride loop over i in [0, n) for elementwise kernels.
#define GRID_STRIDE(i, n) \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// Grid size for elementwise kernels (grid-stride loops cover the rest).
constexpr int kBlock = 256;
inline int grid_for(size_t n, int block = kBlock) {
    size_t g = CEIL_DIV(n, (size_t)block);
    return (int)(g < 65535 * 16 ? (g ? g : 1) : 65535 * 16);
}

}  // namespace cuda
}  // namespace moe
