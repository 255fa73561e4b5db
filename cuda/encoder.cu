/* Token + position embedding (llm.c's encoder). Forward is a gather; backward sums dout into
   the rows of wte and wpe. No float atomics: dwpe has one thread per (t, c) walking the batch in
   order, and dwte one thread per (distinct token, c) walking that token's positions in (b, t)
   order, from buckets the backend builds on the host. Both orders are the CPU twin's, so the
   gradients are bit-reproducible (and add up in the same order as ops_cpu.cpp). */
#include "kernels.cuh"

namespace moe {
namespace cuda {

__global__ void encoder_forward_kernel(float* out, const int* inp, const float* wte, const float* wpe,
                                       int B, int T, int C) {
    const size_t n = (size_t)B * T * C;
    GRID_STRIDE(i, n) {
        const size_t bt = i / C;
        const int c = (int)(i % C), t = (int)(bt % T);
        out[i] = wte[(size_t)inp[bt] * C + c] + wpe[(size_t)t * C + c];
    }
}

// one thread per (t, c): dwpe[t, c] += dout[b, t, c] for b = 0..B-1 in order
__global__ void encoder_backward_wpe_kernel(float* dwpe, const float* dout, int B, int T, int C) {
    const size_t n = (size_t)T * C;
    GRID_STRIDE(i, n) {
        float g = dwpe[i];
        for (int b = 0; b < B; b++) g += dout[(size_t)b * n + i];
        dwpe[i] = g;
    }
}

// one thread per (bucket, c): dwte[token, c] += dout[pos, c] over the bucket's positions in order
__global__ void encoder_backward_wte_kernel(float* dwte, const float* dout, const int* bucket_token,
                                            const int* bucket_offsets, const int* positions, int C) {
    const int bucket = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float* g = dwte + (size_t)bucket_token[bucket] * C + c;
    float acc = *g;
    for (int i = bucket_offsets[bucket]; i < bucket_offsets[bucket + 1]; i++) acc += dout[(size_t)positions[i] * C + c];
    *g = acc;
}

void encoder_forward(float* out,             // (B, T, C)
                     const int* inp,         // (B, T)
                     const float* wte,       // (V, C)
                     const float* wpe,       // (maxT, C)
                     int B, int T, int C, cudaStream_t stream) {
    encoder_forward_kernel<<<grid_for((size_t)B * T * C), kBlock, 0, stream>>>(out, inp, wte, wpe, B, T, C);
    cudaCheck(cudaGetLastError());
}

void encoder_backward(float* dwte,               // (V, C) or null
                      float* dwpe,               // (maxT, C) or null
                      const float* dout,         // (B, T, C)
                      const int* bucket_token,   // (nbuckets) distinct token ids
                      const int* bucket_offsets, // (nbuckets + 1)
                      const int* positions,      // (B*T) b*T + t, grouped by bucket, ascending within
                      int nbuckets, int B, int T, int C, cudaStream_t stream) {
    if (dwpe) {
        encoder_backward_wpe_kernel<<<grid_for((size_t)T * C), kBlock, 0, stream>>>(dwpe, dout, B, T, C);
        cudaCheck(cudaGetLastError());
    }
    if (dwte && nbuckets > 0) {
        dim3 grid(nbuckets, CEIL_DIV(C, 128));
        encoder_backward_wte_kernel<<<grid, 128, 0, stream>>>(dwte, dout, bucket_token, bucket_offsets, positions, C);
        cudaCheck(cudaGetLastError());
    }
}

}  // namespace cuda
}  // namespace moe
