/* What the GPU tests and the kernel benchmark share: the CUDA backend as `moe train` creates it,
   and dispatch plans and grouped-GEMM block lists built by the model's own plan code
   (moe_router.cpp build_plan) from hand-made routings, so that they have exactly the layout the
   MoE layer hands the backend. Only backend.h and std types here: usable from nvcc translation
   units (bench_kernels.cu) without the rest of the headers. */
#pragma once
#include "backend.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace gpu_test {

// Harness self-check, not a GPU test: MOE_TEST_GPU_FAKE_CPU=1 puts a second CPU backend where
// the CUDA one would be, so that the test code itself can be exercised on a machine without a
// GPU (every comparison is then CPU against CPU and says nothing about CUDA).
bool fake_gpu();
// train.device for the runs that should go to the GPU ("cuda", or "cpu" under the self-check)
std::string gpu_device();
// The CUDA backend through the trainer's own factory (train.device = cuda, train.dtype = dtype),
// exactly as `moe train` creates it, whatever make_cuda_backend's signature.
std::unique_ptr<moe::Backend> gpu_backend(const std::string& dtype);

struct PlanData {
    int N = 0, E = 0;
    std::vector<int> offsets;      // (E+1) assignments of expert e: [offsets[e], offsets[e+1])
    std::vector<int> token;        // (A) token of each assignment, grouped by expert
    std::vector<float> gate;       // (A)
    std::vector<int> tok_offsets;  // (N+1) CSR by token
    std::vector<int> tok_assign;   // (A)
    int A() const { return (int)token.size(); }
};

// Routings:
//   "topk"     k distinct experts per token, uniformly at random (some experts may be empty)
//   "skewed"   k distinct experts per token drawn from the first max(k, E/4) experts only: the
//              other experts are empty
//   "zipf"     k distinct experts per token with probability ~ 1/(e+1): a hot expert and a long tail
//   "one"      every token to expert E/2 (k must be 1)
//   "drops"    topk, then about a third of the assignments dropped (capacity): some tokens
//              have no assignment at all, some one, some k
PlanData make_plan(int N, int E, int k, const std::string& kind, uint64_t seed);

// The MoE layer's blocks for one process: expert e's rows [offsets[e], offsets[e+1]).
std::vector<moe::GroupBlock> expert_blocks(const PlanData& p);

// Blocks as expert parallel produces them: `ranks` source ranks, each a run of blocks for local
// experts 0..E-1, so every expert owns `ranks` blocks that are not adjacent; rows split at random
// (zero-row blocks included); the blocks tile [0, rows). With `shuffle` the experts inside each
// rank's run come in a random order too.
std::vector<moe::GroupBlock> ep_blocks(int rows, int E, int ranks, bool shuffle, uint64_t seed);

}  // namespace gpu_test
