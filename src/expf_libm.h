/* expf exactly as glibc >= 2.27 computes it on an x86-64 CPU with FMA (the `__expf_fma` variant
   that glibc's ifunc picks on every CPU of the last decade): exp(x) = 2^(k/32) * p(r) in double,
   a 32-entry table of 2^(i/32), a cubic, one rounding to float. The router's scores use it on
   both backends, so both compute the same score bits and therefore the same top-k choices: the
   CUDA router kernels call expf_libm (device side, explicit __fma_rn / _rn operations: nvcc must
   not contract or reorder anything), the host's score_row (moe_router.cpp) calls expf_libm16, 16
   lanes at a time, under AVX-512 and std::exp elsewhere. tests/test_router_ops.cpp checks both
   forms bit for bit against std::exp on the host. Constants and the operation order read from
   glibc's sysdeps/ieee754/flt-32/e_expf.c and the disassembly of its FMA build. */
#pragma once
#include <cstdint>
#include <cstring>

#include <cmath>
#if defined(__AVX512F__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif
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

#if defined(__AVX512F__) && !defined(__CUDACC__)
// 16 lanes of expf_libm with the same double operations (explicit FMAs, the table by two
// two-source permutes): the router's softmax/sigmoid on the host, where the scalar call was most
// of the routing's time with 64 experts. Lanes outside the main range (|x| >= 88, inf, nan) are
// finished by the scalar function.
// GCC 12's AVX-512 intrinsics start from an "undefined" register that -Wmaybe-uninitialized
// reports (GCC bug 105593, fixed in 13)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline __m512 expf_libm16(__m512 x) {
    const __m512d InvLn2N = _mm512_set1_pd(0x1.71547652b82fep+0 * 32), Shift = _mm512_set1_pd(0x1.8p+52);
    const __m512d C0 = _mm512_set1_pd(0x1.c6af84b912394p-5 / 32768), C1 = _mm512_set1_pd(0x1.ebfce50fac4f3p-3 / 1024);
    const __m512d C2 = _mm512_set1_pd(0x1.62e42ff0c52d6p-1 / 32), One = _mm512_set1_pd(1.0);
    const __m512i tab[4] = {_mm512_loadu_si512(kExpfTable), _mm512_loadu_si512(kExpfTable + 8),
                            _mm512_loadu_si512(kExpfTable + 16), _mm512_loadu_si512(kExpfTable + 24)};
    __m256 half[2];
    for (int h = 0; h < 2; h++) {
        const __m512d xd = _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(x, 1) : _mm512_castps512_ps256(x));
        __m512d kd = _mm512_fmadd_pd(InvLn2N, xd, Shift);
        const __m512i ki = _mm512_castpd_si512(kd);
        kd = _mm512_sub_pd(kd, Shift);
        const __m512d r = _mm512_fmadd_pd(InvLn2N, xd, _mm512_sub_pd(_mm512_setzero_pd(), kd));
        const __m512i idx = _mm512_and_si512(ki, _mm512_set1_epi64(31));   // ki % 32
        const __m512i lo = _mm512_permutex2var_epi64(tab[0], idx, tab[1]); // entries 0..15 (bit 3 picks the source)
        const __m512i hi = _mm512_permutex2var_epi64(tab[2], idx, tab[3]); // entries 16..31
        const __mmask8 upper = _mm512_test_epi64_mask(idx, _mm512_set1_epi64(16));
        const __m512i t = _mm512_add_epi64(_mm512_mask_blend_epi64(upper, lo, hi), _mm512_slli_epi64(ki, 47));
        const __m512d z = _mm512_fmadd_pd(C0, r, C1);
        const __m512d r2 = _mm512_mul_pd(r, r);
        __m512d y = _mm512_fmadd_pd(C2, r, One);
        y = _mm512_fmadd_pd(z, r2, y);
        half[h] = _mm512_cvtpd_ps(_mm512_mul_pd(y, _mm512_castsi512_pd(t)));
    }
    __m512 out = _mm512_insertf32x8(_mm512_castps256_ps512(half[0]), half[1], 1);
    // abstop > 0x42a: the scalar function's special cases
    const __m512i abstop = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(x), 20), _mm512_set1_epi32(0x7ff));
    const __mmask16 special = _mm512_cmpgt_epi32_mask(abstop, _mm512_set1_epi32(0x42a));
    if (special) {
        alignas(64) float xs[16], os[16];
        _mm512_store_ps(xs, x);
        _mm512_store_ps(os, out);
        for (int i = 0; i < 16; i++)
            if (special >> i & 1) os[i] = expf_libm(xs[i]);
        out = _mm512_load_ps(os);
    }
    return out;
}
#pragma GCC diagnostic pop
#endif

}  // namespace moe

#undef MOE_HD
