/* Vector helpers of the CPU ops: one native vector of VL floats as a GCC vector extension (plain
   C++ that compiles to AVX-512, AVX2 or SSE, whatever -march gives) and exp_fast, the branch-free
   exp that GELU, softmax and cross-entropy call once per element, in scalar and vector form.
   glibc's expf/tanhf do not vectorise without -ffast-math. */
#pragma once
#include "exp_poly.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace moe {
namespace simd {

// exp(x) to ~2 ulp: exp_poly (src/exp_poly.h), 2^n put straight into the exponent bits.
// Arguments are clamped to [-87, 88] so 2^n stays a normal float; below -87 the result is 0
// (what expf gives to float precision, and what a masked softmax entry needs). NaN propagates
// through the polynomial.
inline float exp_fast(float x) {
    const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n;
    const float p = exp_poly(xc, n);
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

#if defined(__AVX512F__)
constexpr int VL = 16;  // zmm
#elif defined(__AVX__)
constexpr int VL = 8;   // ymm
#else
constexpr int VL = 4;   // xmm
#endif
typedef float vec __attribute__((vector_size(VL * 4)));
typedef float vecu __attribute__((vector_size(VL * 4), aligned(4), may_alias));  // unaligned
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
    vec n;
    const vec p = exp_poly(xc, n);
    const ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
    return x < lo ? vec{} : p * (vec)bits;
}

// The largest of v[0..n) (n >= 1), lane-wise then across lanes: the value *std::max_element gives
// for values that are not NaN (a zero may come back with the other sign, which no caller can
// tell apart: they subtract it or add it to a logarithm), without its serial compare chain.
inline float max_of(const float* v, int n) {
    if (n < VL) return *std::max_element(v, v + n);
    vec m = vload(v);
    int i = VL;
    for (; i + VL <= n; i += VL) {
        const vec x = vload(v + i);
        m = x > m ? x : m;
    }
    float r = m[0];
    for (int l = 1; l < VL; l++) r = m[l] > r ? m[l] : r;
    for (; i < n; i++) r = v[i] > r ? v[i] : r;
    return r;
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

}  // namespace simd
}  // namespace moe
