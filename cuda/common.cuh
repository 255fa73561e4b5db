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
