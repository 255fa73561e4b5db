/* expf exactly as glibc >= 2.27 computes it on an x86-64 CPU with FMA (the `__expf_fma` variant
   that glibc's ifunc picks on every CPU of the last decade): exp(x) = 2^(k/32) * p(r) in double,
   a 32-entry table of 2^(i/32), a cubic, one rounding to float. The router's host code
   (moe_router.cpp) uses std::exp for its softmax/sigmoid scores; the CUDA router kernels call
   this function (device side, explicit __fma_rn / _rn operations: nvcc must not contract or
   reorder anything) so that both backends compute the same score bits and therefore the same
   top-k choices. tests/test_router_ops.cpp checks it bit for bit against std::exp on the host.
   Constants and the operation order read from glibc's sysdeps/ieee754/flt-32/e_expf.c and the
   disassembly of its FMA build. */
#pragma once
#include <cstdint>
#include <cstring>

#include <cmath>
#ifdef __CUDACC__
#define MOE_HD __device__ __forceinline__   // device only: the table is __constant__ memory
#else
#define MOE_HD inline
#endif

namespace moe {

// tab[i] = bits(2^(i/32)) - (i << 47)
#ifdef __CUDACC__
__constant__
#endif
static const uint64_t kExpfTable[32] = {
    0x3ff0000000000000ull, 0x3fefd9b0d3158574ull, 0x3fefb5586cf9890full, 0x3fef9301d0125b51ull,
    0x3fef72b83c7d517bull, 0x3fef54873168b9aaull, 0x3fef387a6e756238ull, 0x3fef1e9df51fdee1ull,
    0x3fef06fe0a31b715ull, 0x3feef1a7373aa9cbull, 0x3feedea64c123422ull, 0x3feece086061892dull,
    0x3feebfdad5362a27ull, 0x3feeb42b569d4f82ull, 0x3feeab07dd485429ull, 0x3feea47eb03a5585ull,
    0x3feea09e667f3bcdull, 0x3fee9f75e8ec5f74ull, 0x3feea11473eb0187ull, 0x3feea589994cce13ull,
    0x3feeace5422aa0dbull, 0x3feeb737b0cdc5e5ull, 0x3feec49182a3f090ull, 0x3feed503b23e255dull,
    0x3feee89f995ad3adull, 0x3feeff76f2fb5e47ull, 0x3fef199bdd85529cull, 0x3fef3720dcef9069ull,
    0x3fef5818dcfba487ull, 0x3fef7c97337b9b5full, 0x3fefa4afa2a490daull, 0x3fefd0765b6e4540ull,
};

MOE_HD uint64_t expf_libm_bits(double d) { uint64_t u; std::memcpy(&u, &d, 8); return u; }
MOE_HD double expf_libm_double(uint64_t u) { double d; std::memcpy(&d, &u, 8); return d; }
MOE_HD uint32_t expf_libm_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

MOE_HD double expf_libm_fma(double a, double b, double c) {
#ifdef __CUDA_ARCH__
    return __fma_rn(a, b, c);
#else
    return std::fma(a, b, c);
#endif
}
MOE_HD double expf_libm_mul(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dmul_rn(a, b);
#else
    return a * b;
#endif
}
MOE_HD double expf_libm_sub(double a, double b) {
#ifdef __CUDA_ARCH__
    return __dsub_rn(a, b);
#else
    return a - b;
#endif
}

MOE_HD float expf_libm(float x) {
    const uint32_t abstop = (expf_libm_bits(x) >> 20) & 0x7ff;
    if (abstop > 0x42a) {                                   // |x| >= 88 or not finite
        if (expf_libm_bits(x) == 0xff800000u) return 0.0f;  // -inf
        if (abstop > 0x7f7) return x + x;                   // +inf, nan
        if (x > 0x1.62e42ep6f) return INFINITY;             // overflow
        if (x < -0x1.9fe368p6f) return 0.0f;                // underflow
    }
    const double InvLn2N = 0x1.71547652b82fep+0 * 32, Shift = 0x1.8p+52;
    const double C0 = 0x1.c6af84b912394p-5 / 32768, C1 = 0x1.ebfce50fac4f3p-3 / 1024, C2 = 0x1.62e42ff0c52d6p-1 / 32;
    const double xd = (double)x;
    double kd = expf_libm_fma(InvLn2N, xd, Shift);          // round(x * 32 / ln2) + Shift
    const uint64_t ki = expf_libm_bits(kd);
    kd = expf_libm_sub(kd, Shift);
    const double r = expf_libm_fma(InvLn2N, xd, -kd);       // x * 32 / ln2 - k, in [-1/2, 1/2]
    const uint64_t t = kExpfTable[ki % 32] + (ki << 47);
    const double s = expf_libm_double(t);                   // 2^(k/32)
    const double z = expf_libm_fma(C0, r, C1);
    const double r2 = expf_libm_mul(r, r);
    double y = expf_libm_fma(C2, r, 1.0);
    y = expf_libm_fma(z, r2, y);
    return (float)expf_libm_mul(y, s);
}

}  // namespace moe

#undef MOE_HD
