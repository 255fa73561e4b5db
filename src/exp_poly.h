/* The core of exp_fast, the exponential both backends use (GELU, softmax, cross-entropy,
   attention): one definition for the CPU's scalar and vector forms (src/simd_cpu.h) and the CUDA
   kernels (cuda/common.cuh), so the two backends compute the same exponentials. The callers do
   what differs between them: clamping, putting 2^n into the exponent bits, and the result below
   -87 (0) and for NaN (NaN). */
#pragma once

#ifdef __CUDACC__
#define MOE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOE_HOST_DEVICE inline
#endif

namespace moe {

// Cephes expf, ~2 ulp: for xc in [-87, 88] (float or a GCC float vector), n = round(xc / ln2)
// and the return value p = exp(r), r = xc - n ln2 (|r| <= ln2/2, degree-6 polynomial), so that
// exp(xc) = p * 2^n.
template <class V> MOE_HOST_DEVICE V exp_poly(V xc, V& n) {
    n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
    V r = xc - n * 0.693359375f;  // ln2 split in two so n*ln2 is exact enough
    r = r - n * -2.12194440e-4f;
    V p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    return p * (r * r) + r + 1.0f;
}

}  // namespace moe
