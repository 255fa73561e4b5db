/* Optimizer ops: AdamW with the formula of ops_cpu.cpp (bias corrections computed on the host
   exactly as there, decoupled weight decay on the pre-update weight, as torch.optim.AdamW), and the
   deterministic sum of squares for the gradient norm: a fixed grid of kSumSquaresBlocks blocks,
   grid-stride partial sums in double per thread, fixed-order block reductions into one double per
   block, then one block adds the partials in a fixed order. Same result on every run. */
#include "kernels.cuh"

namespace moe {
namespace cuda {

__global__ void adamw_kernel(float* p, float* g, float* m, float* v, size_t n, float lr, float beta1,
                             float beta2, float bc1, float bc2, float eps, float wd, float grad_scale) {
    GRID_STRIDE(i, n) {
        const float gi = g[i] * grad_scale;  // clipping folded in, as on the CPU
        g[i] = 0.0f;                         // left zero for the next backward, as on the CPU
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * p[i]);
    }
}

__global__ void sum_squares_partial_kernel(double* partial, const float* g, size_t n) {
    __shared__ double shared[kWarp];
    double s = 0.0;
    GRID_STRIDE(i, n)
        s += (double)g[i] * g[i];
    s = block_sum(s, shared);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

__global__ void sum_partials_kernel(double* partial, int count) {
    __shared__ double shared[kWarp];
    double s = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += partial[i];
    s = block_sum(s, shared);
    if (threadIdx.x == 0) partial[count] = s;
}

void adamw_update(float* param,       // (n)
                  float* grad,        // (n), left zero
                  float* m, float* v, // (n), (n)
                  size_t n, float lr, float beta1, float beta2, float bc1, float bc2, float eps, float weight_decay,
                  float grad_scale, cudaStream_t stream) {
    if (n == 0) return;
    adamw_kernel<<<grid_for(n), kBlock, 0, stream>>>(param, grad, m, v, n, lr, beta1, beta2, bc1, bc2, eps,
                                                     weight_decay, grad_scale);
    cudaCheck(cudaGetLastError());
}

void sum_squares(double* partial,   // (kSumSquaresBlocks + 1) scratch; result in partial[kSumSquaresBlocks]
                 const float* g,    // (n)
                 size_t n, cudaStream_t stream) {
    sum_squares_partial_kernel<<<kSumSquaresBlocks, kBlock, 0, stream>>>(partial, g, n);
    cudaCheck(cudaGetLastError());
    sum_partials_kernel<<<1, kBlock, 0, stream>>>(partial, kSumSquaresBlocks);
    cudaCheck(cudaGetLastError());
}

}  // namespace cuda
}  // namespace moe
