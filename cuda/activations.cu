/* Elementwise ops: GELU (tanh approximation, computed as ops_cpu.cpp does: x / (1 + exp(-2u)),
   with the same exp_fast), SwiGLU (silu(gate) * up on rows [gate | up], expf as ops_moe_cpu.cpp's
   std::exp), residual add, multiply-accumulate and in-place scale. Grid-stride loops; backward
   ops accumulate into dinp. */
#include "kernels.cuh"

namespace moe {
namespace cuda {

constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;

__global__ void gelu_forward_kernel(float* out, const float* inp, size_t N) {
    GRID_STRIDE(i, N) {
        const float x = inp[i];
        const float u = kGeluScale * (x + kGeluCubic * x * x * x);
        out[i] = x / (1.0f + exp_fast(-2.0f * u));
    }
}

__global__ void gelu_backward_kernel(float* dinp, const float* inp, const float* dout, size_t N) {
    GRID_STRIDE(i, N) {
        const float x = inp[i];
        const float u = kGeluScale * (x + kGeluCubic * x * x * x);
        const float e = exp_fast(-2.0f * u);
        const float s = 1.0f / (1.0f + e);
        const float du = kGeluScale * (1.0f + 3.0f * kGeluCubic * x * x);
        const float ds = 2.0f * (e * s) * s;
        dinp[i] += (s + x * ds * du) * dout[i];
    }
}

__global__ void swiglu_forward_kernel(float* out, const float* inp, size_t N, int F) {
    GRID_STRIDE(i, N * F) {
        const size_t n = i / F, f = i % F;
        const float g = inp[n * 2 * F + f], u = inp[n * 2 * F + F + f];
        out[i] = g / (1.0f + expf(-g)) * u;
    }
}

__global__ void swiglu_backward_kernel(float* dinp, const float* inp, const float* dout, size_t N, int F) {
    GRID_STRIDE(i, N * F) {
        const size_t n = i / F, f = i % F;
        const float g = inp[n * 2 * F + f], u = inp[n * 2 * F + F + f], d = dout[i];
        const float sig = 1.0f / (1.0f + expf(-g));
        dinp[n * 2 * F + f] += d * u * sig * (1.0f + g * (1.0f - sig));
        dinp[n * 2 * F + F + f] += d * (g * sig);
    }
}

__global__ void residual_forward_kernel(float* out, const float* a, const float* b, size_t N) {
    GRID_STRIDE(i, N) out[i] = a[i] + b[i];
}
__global__ void mul_accumulate_kernel(float* out, const float* a, const float* b, size_t N) {
    GRID_STRIDE(i, N) out[i] += a[i] * b[i];
}
__global__ void scale_kernel(float* x, float s, size_t N) {
    GRID_STRIDE(i, N) x[i] *= s;
}

void gelu_forward(float* out, const float* inp, size_t N, cudaStream_t stream) {   // (N), (N)
    gelu_forward_kernel<<<grid_for(N), kBlock, 0, stream>>>(out, inp, N);
    cudaCheck(cudaGetLastError());
}
void gelu_backward(float* dinp, const float* inp, const float* dout, size_t N, cudaStream_t stream) {  // (N) x3
    gelu_backward_kernel<<<grid_for(N), kBlock, 0, stream>>>(dinp, inp, dout, N);
    cudaCheck(cudaGetLastError());
}
void swiglu_forward(float* out,        // (N, F)
                    const float* inp,  // (N, 2F)
                    size_t N, int F, cudaStream_t stream) {
    swiglu_forward_kernel<<<grid_for(N * F), kBlock, 0, stream>>>(out, inp, N, F);
    cudaCheck(cudaGetLastError());
}
void swiglu_backward(float* dinp,       // (N, 2F), +=
                     const float* inp,  // (N, 2F)
                     const float* dout, // (N, F)
                     size_t N, int F, cudaStream_t stream) {
    swiglu_backward_kernel<<<grid_for(N * F), kBlock, 0, stream>>>(dinp, inp, dout, N, F);
    cudaCheck(cudaGetLastError());
}
void residual_forward(float* out, const float* a, const float* b, size_t N, cudaStream_t stream) {  // (N) x3
    residual_forward_kernel<<<grid_for(N), kBlock, 0, stream>>>(out, a, b, N);
    cudaCheck(cudaGetLastError());
}
void mul_accumulate(float* out, const float* a, const float* b, size_t N, cudaStream_t stream) {  // (N) x3
    mul_accumulate_kernel<<<grid_for(N), kBlock, 0, stream>>>(out, a, b, N);
    cudaCheck(cudaGetLastError());
}
void scale(float* x, float s, size_t N, cudaStream_t stream) {  // (N)
    scale_kernel<<<grid_for(N), kBlock, 0, stream>>>(x, s, N);
    cudaCheck(cudaGetLastError());
}

}  // namespace cuda
}  // namespace moe
