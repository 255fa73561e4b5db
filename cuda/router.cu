/* PENDING, not wired in and never run: router kernels so that top-k routing can stay on the GPU.
   Today the router math and the dispatch plan are host code (src/moe_router.cpp, docs/cuda.md);
   these launchers are the GPU form of its plain top-k path, to be checked against
   src/moe_router.cpp before the MoE layer uses them:
   - router_scores_topk: per token, softmax or sigmoid scores of the logits, the top k of
     scores + bias (ties: lower expert first), gates from the scores, renormalised and scaled;
   - router_plan_counts / router_plan_offsets: assignments per expert and their exclusive prefix
     sum (the plan's offsets);
   - router_plan_fill: each expert's tokens in token order (the plan's token and gate arrays).
   No capacity, groups, noise, Sinkhorn or expert choice: those stay on the host. */
#include "kernels.cuh"

namespace moe {
namespace cuda {

constexpr int kRouterMaxK = 16;

// one warp per token: scores (N, E) from logits (N, E); choice_expert / choice_gate (N, k)
__global__ void router_scores_topk_kernel(float* scores, int* choice_expert, float* choice_gate, const float* logits,
                                          const float* bias, int N, int E, int k, bool sigmoid, bool normalize,
                                          float scale) {
    const int n = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    if (n >= N) return;
    const float* z = logits + (size_t)n * E;
    float* s = scores + (size_t)n * E;
    float mx = -INFINITY;
    for (int e = lane; e < E; e += kWarp) mx = fmaxf(mx, z[e]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int e = lane; e < E; e += kWarp) sum += expf(z[e] - mx);
    sum = warp_sum(sum);
    for (int e = lane; e < E; e += kWarp) s[e] = sigmoid ? 1.0f / (1.0f + expf(-z[e])) : expf(z[e] - mx) / sum;
    __syncwarp();
    // k rounds of a warp arg-max over s + bias, excluding experts already taken
    int taken[kRouterMaxK];
    float gsum = 0.0f;
    for (int j = 0; j < k; j++) {
        float best = -INFINITY;
        int arg = E;
        for (int e = lane; e < E; e += kWarp) {
            bool used = false;
            for (int i = 0; i < j; i++) used |= taken[i] == e;
            const float v = s[e] + (bias ? bias[e] : 0.0f);
            if (!used && (v > best || (v == best && e < arg))) { best = v; arg = e; }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ob = __shfl_xor_sync(0xffffffffu, best, o);
            const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
            if (ob > best || (ob == best && oa < arg)) { best = ob; arg = oa; }
        }
        taken[j] = arg;
        gsum += s[arg];
    }
    if (lane == 0)
        for (int j = 0; j < k; j++) {
            choice_expert[(size_t)n * k + j] = taken[j];
            choice_gate[(size_t)n * k + j] = (normalize ? s[taken[j]] / gsum : s[taken[j]]) * scale;
        }
}

// one thread per expert: counts[e] = number of choices of expert e (walks all M choices: small E*M)
__global__ void router_plan_counts_kernel(int* counts, const int* choice_expert, int M, int E) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= E) return;
    int c = 0;
    for (int m = 0; m < M; m++) c += choice_expert[m] == e;
    counts[e] = c;
}

// one thread: offsets (E+1) = exclusive prefix sum of counts (E is at most a few hundred)
__global__ void router_plan_offsets_kernel(int* offsets, const int* counts, int E) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    int acc = 0;
    for (int e = 0; e < E; e++) { offsets[e] = acc; acc += counts[e]; }
    offsets[E] = acc;
}

// one thread per expert: its assignments in choice (= token) order -> token (A), gate (A)
__global__ void router_plan_fill_kernel(int* token, float* gate, const int* offsets, const int* choice_expert,
                                        const float* choice_gate, int M, int k, int E) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= E) return;
    int a = offsets[e];
    for (int m = 0; m < M; m++)
        if (choice_expert[m] == e) { token[a] = m / k; gate[a] = choice_gate[m]; a++; }
}

void router_scores_topk(float* scores,          // (N, E)
                        int* choice_expert,     // (N, k)
                        float* choice_gate,     // (N, k)
                        const float* logits,    // (N, E)
                        const float* bias,      // (E) aux-loss-free bias or null
                        int N, int E, int k, bool sigmoid, bool normalize, float scale, cudaStream_t stream) {
    if (N <= 0 || k <= 0 || k > kRouterMaxK || k > E) return;
    const int warps = kBlock / kWarp;
    router_scores_topk_kernel<<<CEIL_DIV(N, warps), kBlock, 0, stream>>>(scores, choice_expert, choice_gate, logits,
                                                                         bias, N, E, k, sigmoid, normalize, scale);
    cudaCheck(cudaGetLastError());
}

void router_plan_build(int* counts,             // (E) scratch
                       int* offsets,            // (E + 1)
                       int* token,              // (N*k)
                       float* gate,             // (N*k)
                       const int* choice_expert,// (N, k)
                       const float* choice_gate,// (N, k)
                       int N, int k, int E, cudaStream_t stream) {
    const int M = N * k;
    router_plan_counts_kernel<<<CEIL_DIV(E, 128), 128, 0, stream>>>(counts, choice_expert, M, E);
    cudaCheck(cudaGetLastError());
    router_plan_offsets_kernel<<<1, 1, 0, stream>>>(offsets, counts, E);
    cudaCheck(cudaGetLastError());
    router_plan_fill_kernel<<<CEIL_DIV(E, 128), 128, 0, stream>>>(token, gate, offsets, choice_expert, choice_gate, M,
                                                                  k, E);
    cudaCheck(cudaGetLastError());
}

}  // namespace cuda
}  // namespace moe
