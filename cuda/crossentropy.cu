/* Softmax over the vocabulary fused with cross-entropy (as ops_cpu.cpp): one block per row loops
   over V (max, then sum of exp_fast, then normalise), loss = log(sum) - (z[target] - max), finite
   even where the target's probability underflows. probs may be null (loss only). Block
   reductions have a fixed order: deterministic. Backward: dlogits += (probs - onehot) * dloss. */
#include "kernels.cuh"

namespace moe {
namespace cuda {

constexpr int kCeBlock = 512;

__global__ void crossentropy_softmax_forward_kernel(float* losses, float* probs, const float* logits,
                                                    const int* targets, int V) {
    __shared__ float shared[kWarp];
    const int n = blockIdx.x;
    const float* z = logits + (size_t)n * V;  // (V)
    float maxv = -INFINITY;
    for (int v = threadIdx.x; v < V; v += blockDim.x) maxv = fmaxf(maxv, z[v]);
    maxv = block_max(maxv, shared);
    float sum = 0.0f;
    float* p = probs ? probs + (size_t)n * V : nullptr;  // (V)
    for (int v = threadIdx.x; v < V; v += blockDim.x) {
        const float e = exp_fast(z[v] - maxv);
        if (p) p[v] = e;
        sum += e;
    }
    sum = block_sum(sum, shared);
    if (p) {
        const float inv = 1.0f / sum;
        for (int v = threadIdx.x; v < V; v += blockDim.x) p[v] *= inv;
    }
    if (threadIdx.x == 0) losses[n] = logf(sum) - (z[targets[n]] - maxv);
}

__global__ void crossentropy_softmax_backward_kernel(float* dlogits, const float* probs, const int* targets,
                                                     float dloss, int N, int V) {
    const size_t total = (size_t)N * V;
    GRID_STRIDE(i, total) {
        const size_t n = i / V;
        const int v = (int)(i % V);
        dlogits[i] += (probs[i] - (v == targets[n] ? 1.0f : 0.0f)) * dloss;
    }
}

void crossentropy_softmax_forward(float* losses,        // (N)
                                  float* probs,         // (N, V) or null
                                  const float* logits,  // (N, V)
                                  const int* targets,   // (N)
                                  int N, int V, cudaStream_t stream) {
    if (N <= 0) return;
    crossentropy_softmax_forward_kernel<<<N, kCeBlock, 0, stream>>>(losses, probs, logits, targets, V);
    cudaCheck(cudaGetLastError());
}

void crossentropy_softmax_backward(float* dlogits,      // (N, V), +=
                                   const float* probs,  // (N, V)
                                   const int* targets,  // (N)
                                   float dloss, int N, int V, cudaStream_t stream) {
    if (!dlogits || N <= 0) return;
    crossentropy_softmax_backward_kernel<<<grid_for((size_t)N * V), kBlock, 0, stream>>>(dlogits, probs, targets,
                                                                                          dloss, N, V);
    cudaCheck(cudaGetLastError());
}

}  // namespace cuda
}  // namespace moe
