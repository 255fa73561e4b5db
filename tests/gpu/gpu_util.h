/* Helpers of the GPU tests (build/test_gpu, docs/gpu-testing.md): the two backends side by side,
   tensors that live on both (host memory for the CPU twin, device memory for CUDA), and the
   comparison the tests use, max |cuda - cpu| / max |cpu| per tensor, with tolerances that are
   fixed here once and justified below.

   Tolerances (relative to the tensor's largest reference magnitude; an element-wise relative error
   means nothing for outputs or gradients that are ~0):
   - fp32: max(1e-5, 1e-6 * sqrt(K)), K = the length of the longest reduction behind an output
     element (C for a matmul output, N rows for a weight gradient, T for attention, V for the
     softmax). Two correct fp32 implementations differ only in summation order: each partial sum
     rounds with relative error u = 6e-8, and over K random-signed terms the two results drift
     apart like a random walk, ~u * sqrt(K) of the result's scale (max over 1e5+ elements: a few
     times that). 1e-6 * sqrt(K) is ~15x that estimate; the 1e-5 floor covers element-wise ops
     (K = 1): the CUDA backend uses the CPU's exp polynomial (exp_fast, docs/cuda.md), but SwiGLU
     compares CUDA expf (2 ulp) with std::exp, and FMA contraction differs between the compilers:
     a few ulp, amplified by at most a few in GELU/SiLU/softmax derivatives. A TF32 matmul
     (10-bit mantissa, error ~1e-3) or --use_fast_math's __expf fails it by design: fp32 mode
     means fp32 arithmetic.
   - bf16: 1e-2, flat. bf16 rounds each GEMM input to 8 mantissa bits (relative 2^-9 = 2e-3
     per operand, ~1.6e-3 rms per product); with fp32 accumulation the error of a K-term sum is
     ~1.6e-3 * sqrt(K) * rms(term) against a result of ~sqrt(K) * rms(term), i.e. K-independent,
     and the worst element relative to the tensor's largest is a few 1e-3. Rounding the output to
     bf16 adds 2e-3 at most. 1e-2 leaves 3-5x headroom; it is loose by nature, not to pass. */
#pragma once
#include "backend.h"
#include "gpu_common.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

namespace gpu_test {

using moe::Backend;

// The CPU twin (the oracle) and the CUDA backend in one precision mode. One per mode per process.
struct Env {
    std::string dtype;
    std::unique_ptr<Backend> cpu, gpu;
    bool bf16() const { return dtype == "bf16"; }
    // tolerance for an output whose elements are reductions of K terms (see the header comment)
    double tol(double K = 1) const { return bf16() ? 1e-2 : std::max(1e-5, 1e-6 * std::sqrt(std::max(1.0, K))); }
};

inline Env& env(const std::string& dtype) {
    static std::unique_ptr<Env> fp32, bf16;
    std::unique_ptr<Env>& e = dtype == "bf16" ? bf16 : fp32;
    if (!e) {  // built in full before it is kept: a factory error repeats in every test, no half Env
        auto made = std::make_unique<Env>();
        made->dtype = dtype;
        made->cpu = moe::make_cpu_backend(0);
        made->gpu = gpu_backend(dtype);
        e = std::move(made);
    }
    return *e;
}

enum Side { CPU = 0, GPU = 1 };

// One tensor on both backends, starting from the same host values. `skew` elements of padding
// in front make the view start at a 4-byte but not 16-byte aligned address when skew is odd:
// the model hands ops such views (parameters packed back to back in one flat buffer).
template <class T>
struct Twin {
    Env* e;
    std::vector<T> init;
    size_t skew;
    T* p[2];
    Twin(Env& env, std::vector<T> values, size_t skew_elems = 0) : e(&env), init(std::move(values)), skew(skew_elems) {
        const size_t bytes = (init.size() + skew) * sizeof(T);
        p[CPU] = (T*)e->cpu->alloc_bytes(bytes) + skew;
        p[GPU] = (T*)e->gpu->alloc_bytes(bytes) + skew;
        reset();
    }
    ~Twin() {
        e->cpu->free_bytes(p[CPU] - skew);
        e->gpu->free_bytes(p[GPU] - skew);
    }
    Twin(const Twin&) = delete;
    Twin& operator=(const Twin&) = delete;
    T* operator[](Side s) const { return p[s]; }
    size_t size() const { return init.size(); }
    void reset(Side s) {
        if (init.empty()) return;
        if (s == CPU) std::memcpy(p[CPU], init.data(), init.size() * sizeof(T));
        else e->gpu->upload(p[GPU], init.data(), init.size() * sizeof(T));
    }
    void reset() { reset(CPU); reset(GPU); }
    std::vector<T> get(Side s) const {
        std::vector<T> h(init.size());
        if (h.empty()) return h;
        if (s == CPU) std::memcpy(h.data(), p[CPU], h.size() * sizeof(T));
        else { e->gpu->synchronize(); e->gpu->download(h.data(), p[GPU], h.size() * sizeof(T)); }
        return h;
    }
};
using TwinF = Twin<float>;
using TwinI = Twin<int>;

inline std::vector<float> randu(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> u(lo, hi);
    std::vector<float> v(n);
    for (float& x : v) x = u(g);
    return v;
}
inline std::vector<int> randi(size_t n, uint32_t seed, int lo, int hi) {  // [lo, hi)
    std::mt19937 g(seed);
    std::uniform_int_distribution<int> u(lo, hi - 1);
    std::vector<int> v(n);
    for (int& x : v) x = u(g);
    return v;
}

// max |got - ref| / max |ref| (a non-finite got where ref is finite counts as infinitely wrong);
// on failure prints the worst element.
inline bool agree(const std::string& what, const std::vector<float>& ref, const std::vector<float>& got, double tol) {
    if (ref.size() != got.size()) {
        MESSAGE(what << ": sizes differ (" << ref.size() << " vs " << got.size() << ")");
        return false;
    }
    double scale = 0, worst = 0;
    size_t at = 0;
    for (float r : ref) if (std::isfinite(r)) scale = std::max(scale, (double)std::fabs(r));
    for (size_t i = 0; i < ref.size(); i++) {
        double d = std::fabs((double)got[i] - ref[i]);
        if (!std::isfinite(got[i]) || !std::isfinite(ref[i])) d = (std::isnan(got[i]) == std::isnan(ref[i]) && got[i] == ref[i]) ? 0 : INFINITY;
        if (d > worst) worst = d, at = i;
    }
    const double err = scale > 0 ? worst / scale : worst;
    if (!(err <= tol))
        MESSAGE(what << ": max |cuda - cpu| / max|cpu| = " << err << " > " << tol << " (element " << at << ": cpu "
                     << ref[at] << ", cuda " << got[at] << ", scale " << scale << ")");
    return err <= tol;
}

inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

// One output of an op under test and its tolerance.
struct Out {
    const char* name;
    TwinF* t;
    double tol;
};

// Runs `call(backend, side)` on the CPU twin and on CUDA with every output starting from its
// initial contents (backward ops accumulate: the outputs are pre-filled with random values, so a
// kernel that overwrites instead of adding fails), compares the outputs, then runs CUDA once more
// from the same state and requires the same bits (runs must be reproducible: --resume is
// bit-exact and the determinism test depends on every op).
template <class F>
void check_op(Env& e, F call, std::initializer_list<Out> outs) {
    for (const Out& o : outs) o.t->reset();
    call(*e.cpu, CPU);
    call(*e.gpu, GPU);
    e.gpu->synchronize();
    std::vector<std::vector<float>> first;
    for (const Out& o : outs) {
        first.push_back(o.t->get(GPU));
        CHECK(agree(o.name, o.t->get(CPU), first.back(), o.tol));
    }
    for (const Out& o : outs) o.t->reset(GPU);
    call(*e.gpu, GPU);
    e.gpu->synchronize();
    size_t i = 0;
    for (const Out& o : outs) {
        INFO(o.name << ": a second CUDA run from the same inputs gives different bits");
        CHECK(same_bits(first[i++], o.t->get(GPU)));
    }
}

}  // namespace gpu_test
