/* LayerNorm over the last dim (eps 1e-5), as ops_cpu.cpp: two-pass mean and biased variance,
   mean and rstd saved (either may be null). Forward and dinp: one warp per row. dweight and
   dbias: column sums over the rows without atomics, in two deterministic stages: fixed chunks
   of rows give per-chunk partial sums (scratch), a second kernel adds the chunks in order. */
#include "kernels.cuh"

namespace moe {
namespace cuda {

constexpr float kLayerNormEps = 1e-5f;

__global__ void layernorm_forward_kernel(float* out, float* mean, float* rstd, const float* inp,
                                         const float* weight, const float* bias, int N, int C) {
    const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    if (row >= N) return;
    const float* x = inp + (size_t)row * C;  // (C)
    float* o = out + (size_t)row * C;        // (C)
    float m = 0.0f;
    for (int c = lane; c < C; c += kWarp) m += x[c];
    m = warp_sum(m) / C;
    float v = 0.0f;
    for (int c = lane; c < C; c += kWarp) v += (x[c] - m) * (x[c] - m);
    v = warp_sum(v) / C;
    const float s = 1.0f / sqrtf(v + kLayerNormEps);
    for (int c = lane; c < C; c += kWarp) o[c] = (x[c] - m) * s * weight[c] + bias[c];
    if (lane == 0) {
        if (mean) mean[row] = m;
        if (rstd) rstd[row] = s;
    }
}

__global__ void layernorm_backward_dinp_kernel(float* dinp, const float* dout, const float* inp, const float* weight,
                                               const float* mean, const float* rstd, int N, int C) {
    const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    if (row >= N) return;
    const float* x = inp + (size_t)row * C;   // (C)
    const float* d = dout + (size_t)row * C;  // (C)
    float* g = dinp + (size_t)row * C;        // (C)
    const float m = mean[row], s = rstd[row];
    float dnorm_mean = 0.0f, dnorm_norm_mean = 0.0f;
    for (int c = lane; c < C; c += kWarp) {
        const float dnorm = weight[c] * d[c];
        dnorm_mean += dnorm;
        dnorm_norm_mean += dnorm * (x[c] - m) * s;
    }
    dnorm_mean = warp_sum(dnorm_mean) / C;
    dnorm_norm_mean = warp_sum(dnorm_norm_mean) / C;
    for (int c = lane; c < C; c += kWarp) {
        const float norm = (x[c] - m) * s;
        g[c] += (weight[c] * d[c] - dnorm_mean - norm * dnorm_norm_mean) * s;
    }
}

// block (32, 8) per (32 columns, chunk of rows): partial[chunk][c] of sum norm*dout and sum dout
__global__ void layernorm_backward_params_partial_kernel(float* partial_w, float* partial_b, const float* dout,
                                                         const float* inp, const float* mean, const float* rstd,
                                                         int N, int C, int rows_per_chunk) {
    __shared__ float sw[8][kWarp + 1], sb[8][kWarp + 1];
    const int c = blockIdx.x * kWarp + threadIdx.x, chunk = blockIdx.y;
    const int r0 = chunk * rows_per_chunk, r1 = min(N, r0 + rows_per_chunk);
    float dw = 0.0f, db = 0.0f;
    if (c < C)
        for (int n = r0 + threadIdx.y; n < r1; n += blockDim.y) {
            const float d = dout[(size_t)n * C + c];
            dw += (inp[(size_t)n * C + c] - mean[n]) * rstd[n] * d;
            db += d;
        }
    sw[threadIdx.y][threadIdx.x] = dw;
    sb[threadIdx.y][threadIdx.x] = db;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        for (int j = 1; j < (int)blockDim.y; j++) { dw += sw[j][threadIdx.x]; db += sb[j][threadIdx.x]; }
        partial_w[(size_t)chunk * C + c] = dw;
        partial_b[(size_t)chunk * C + c] = db;
    }
}

void layernorm_forward(float* out,          // (N, C)
                       float* mean,         // (N) or null
                       float* rstd,         // (N) or null
                       const float* inp,    // (N, C)
                       const float* weight, // (C)
                       const float* bias,   // (C)
                       int N, int C, cudaStream_t stream) {
    if (N <= 0) return;                          // no zero-block launch
    const int rows_per_block = kBlock / kWarp;
    layernorm_forward_kernel<<<CEIL_DIV(N, rows_per_block), kBlock, 0, stream>>>(out, mean, rstd, inp, weight, bias,
                                                                                 N, C);
    cudaCheck(cudaGetLastError());
}

int layernorm_backward_scratch(int N, int C) { return 2 * kColumnChunks * C; }

void layernorm_backward(float* dinp,         // (N, C) or null, +=
                        float* dweight,      // (C) or null, +=
                        float* dbias,        // (C) or null, +=
                        float* scratch,      // (layernorm_backward_scratch(N, C))
                        const float* dout,   // (N, C)
                        const float* inp,    // (N, C)
                        const float* weight, // (C)
                        const float* mean,   // (N)
                        const float* rstd,   // (N)
                        int N, int C, cudaStream_t stream) {
    if (N <= 0) return;
    if (dinp) {
        const int rows_per_block = kBlock / kWarp;
        layernorm_backward_dinp_kernel<<<CEIL_DIV(N, rows_per_block), kBlock, 0, stream>>>(dinp, dout, inp, weight,
                                                                                           mean, rstd, N, C);
        cudaCheck(cudaGetLastError());
    }
    if (dweight || dbias) {
        const int rows_per_chunk = CEIL_DIV(N, kColumnChunks), chunks = CEIL_DIV(N, rows_per_chunk);
        float* pw = scratch;
        float* pb = scratch + (size_t)kColumnChunks * C;
        layernorm_backward_params_partial_kernel<<<dim3(CEIL_DIV(C, kWarp), chunks), dim3(kWarp, 8), 0, stream>>>(
            pw, pb, dout, inp, mean, rstd, N, C, rows_per_chunk);
        cudaCheck(cudaGetLastError());
        if (dweight) add_chunk_sums(dweight, pw, chunks, C, stream);
        if (dbias) add_chunk_sums(dbias, pb, chunks, C, stream);
    }
}

}  // namespace cuda
}  // namespace moe
