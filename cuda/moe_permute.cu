/* MoE dispatch and combine: gather/scatter of rows through the dispatch plan (src/moe.h) that the
   backend received by upload: token (A) per kept assignment, and the token-side CSR tok_offsets
   (N+1) / tok_assign (A). Sums over a token's assignments walk its CSR slice in order (as
   ops_moe_cpu.cpp), one thread per (row, channel): no atomics, deterministic. dgate is one block
   per assignment with a fixed-order block reduction. */
#include "kernels.cuh"

namespace moe {
namespace cuda {

__global__ void moe_dispatch_forward_kernel(float* out, const float* x, const int* token, int A, int C) {
    GRID_STRIDE(i, (size_t)A * C) {
        const size_t a = i / C, c = i % C;
        out[i] = x[(size_t)token[a] * C + c];
    }
}

__global__ void moe_dispatch_backward_kernel(float* dx, const float* dout, const int* tok_offsets,
                                             const int* tok_assign, int N, int C) {
    GRID_STRIDE(i, (size_t)N * C) {
        const size_t n = i / C, c = i % C;
        float acc = dx[i];
        for (int j = tok_offsets[n]; j < tok_offsets[n + 1]; j++) acc += dout[(size_t)tok_assign[j] * C + c];
        dx[i] = acc;
    }
}

__global__ void moe_combine_forward_kernel(float* out, const float* y, const float* gate, const int* tok_offsets,
                                           const int* tok_assign, int N, int C) {
    GRID_STRIDE(i, (size_t)N * C) {
        const size_t n = i / C, c = i % C;
        float acc = 0.0f;
        for (int j = tok_offsets[n]; j < tok_offsets[n + 1]; j++) {
            const int a = tok_assign[j];
            acc += gate[a] * y[(size_t)a * C + c];
        }
        out[i] = acc;
    }
}

// one block per assignment a: dy[a, :] = gate[a] * dout[token[a], :], dgate[a] = <dout[token[a]], y[a]>
__global__ void moe_combine_backward_kernel(float* dy, float* dgate, const float* dout, const float* y,
                                            const float* gate, const int* token, int C) {
    __shared__ float shared[kWarp];
    const int a = blockIdx.x;
    const float* d = dout + (size_t)token[a] * C;
    const float* ya = y + (size_t)a * C;
    const float g = gate[a];
    float dot = 0.0f;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        dy[(size_t)a * C + c] = g * d[c];
        dot += d[c] * ya[c];
    }
    dot = block_sum(dot, shared);
    if (threadIdx.x == 0) dgate[a] = dot;
}

void moe_dispatch_forward(float* out,        // (A, C)
                          const float* x,    // (N, C)
                          const int* token,  // (A)
                          int A, int C, cudaStream_t stream) {
    if (A <= 0) return;
    moe_dispatch_forward_kernel<<<grid_for((size_t)A * C), kBlock, 0, stream>>>(out, x, token, A, C);
    cudaCheck(cudaGetLastError());
}

void moe_dispatch_backward(float* dx,              // (N, C), +=
                           const float* dout,      // (A, C)
                           const int* tok_offsets, // (N + 1)
                           const int* tok_assign,  // (A)
                           int N, int C, cudaStream_t stream) {
    if (N <= 0) return;
    moe_dispatch_backward_kernel<<<grid_for((size_t)N * C), kBlock, 0, stream>>>(dx, dout, tok_offsets, tok_assign, N,
                                                                                 C);
    cudaCheck(cudaGetLastError());
}

void moe_combine_forward(float* out,             // (N, C), overwritten
                         const float* y,         // (A, C)
                         const float* gate,      // (A)
                         const int* tok_offsets, // (N + 1)
                         const int* tok_assign,  // (A)
                         int N, int C, cudaStream_t stream) {
    if (N <= 0) return;
    moe_combine_forward_kernel<<<grid_for((size_t)N * C), kBlock, 0, stream>>>(out, y, gate, tok_offsets, tok_assign,
                                                                               N, C);
    cudaCheck(cudaGetLastError());
}

void moe_combine_backward(float* dy,          // (A, C), overwritten
                          float* dgate,       // (A), overwritten
                          const float* dout,  // (N, C)
                          const float* y,     // (A, C)
                          const float* gate,  // (A)
                          const int* token,   // (A)
                          int A, int C, cudaStream_t stream) {
    if (A <= 0) return;
    moe_combine_backward_kernel<<<A, 128, 0, stream>>>(dy, dgate, dout, y, gate, token, C);
    cudaCheck(cudaGetLastError());
}

}  // namespace cuda
}  // namespace moe
