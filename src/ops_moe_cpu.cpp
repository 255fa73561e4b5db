/* CPU MoE ops; see ops_moe_cpu.h. */
#include "ops_moe_cpu.h"

#include <cmath>
#include <cstring>

namespace moe {

void moe_dispatch_forward(float* out, const float* x, const int* token, int A, int C) {
    #pragma omp parallel for schedule(static)
    for (int a = 0; a < A; a++) std::memcpy(out + (size_t)a * C, x + (size_t)token[a] * C, C * sizeof(float));
}

void moe_dispatch_backward(float* dx, const float* dout, const int* tok_offsets, const int* tok_assign, int N, int C) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float* d = dx + (size_t)n * C;
        for (int i = tok_offsets[n]; i < tok_offsets[n + 1]; i++) {
            const float* g = dout + (size_t)tok_assign[i] * C;
            for (int c = 0; c < C; c++) d[c] += g[c];
        }
    }
}

void moe_combine_forward(float* out, const float* y, const float* gate, const int* tok_offsets,
                         const int* tok_assign, int N, int C) {
    #pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        float* o = out + (size_t)n * C;
        for (int c = 0; c < C; c++) o[c] = 0.0f;
        for (int i = tok_offsets[n]; i < tok_offsets[n + 1]; i++) {
            int a = tok_assign[i];
            const float* ya = y + (size_t)a * C;
            const float g = gate[a];
            for (int c = 0; c < C; c++) o[c] += g * ya[c];
        }
    }
}

void moe_combine_backward(float* dy, float* dgate, const float* dout, const float* y, const float* gate,
                          const int* token, int A, int C) {
    #pragma omp parallel for schedule(static)
    for (int a = 0; a < A; a++) {
        const float* d = dout + (size_t)token[a] * C;
        const float* ya = y + (size_t)a * C;
        float* dya = dy + (size_t)a * C;
        float dot = 0.0f;
        for (int c = 0; c < C; c++) {
            dya[c] = gate[a] * d[c];
            dot += d[c] * ya[c];
        }
        dgate[a] = dot;
    }
}

void swiglu_forward(float* out, const float* inp, size_t N, int F) {
    #pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++) {
        const float* g = inp + n * 2 * F;
        const float* u = g + F;
        float* o = out + n * F;
        for (int i = 0; i < F; i++) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    }
}

void swiglu_backward(float* dinp, const float* inp, const float* dout, size_t N, int F) {
    #pragma omp parallel for schedule(static)
    for (size_t n = 0; n < N; n++) {
        const float* g = inp + n * 2 * F;
        const float* u = g + F;
        const float* d = dout + n * F;
        float* dg = dinp + n * 2 * F;
        float* du = dg + F;
        for (int i = 0; i < F; i++) {
            float sig = 1.0f / (1.0f + std::exp(-g[i]));
            float silu = g[i] * sig;
            dg[i] += d[i] * u[i] * sig * (1.0f + g[i] * (1.0f - sig));
            du[i] += d[i] * silu;
        }
    }
}

void mul_accumulate(float* out, const float* a, const float* b, size_t n) {
    #pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) out[i] += a[i] * b[i];
}

}  // namespace moe
