/* `moe plan`: a cluster layout on paper. For a config and N GPUs, every expert-parallel degree EP
   (dividing N and the expert count) gets parameters, memory, FLOPs, all-to-all and all-reduce
   bytes per rank and an estimated step time. Plain functions over a Config: nothing is allocated,
   so a 64-GPU layout of a 40B-parameter model costs microseconds. Every formula is written out in
   docs/plan.md; tests/test_plan.cpp holds the parameter counts to GPT::num_params(). */
#pragma once
#include "config.h"

#include <cstdint>
#include <string>
#include <vector>

namespace moe {

// Mixed-precision training as a GPU cluster runs it (docs/plan.md "Memory").
constexpr double kBytesBf16 = 2, kBytesFp32 = 4;
// bf16 weights + fp32 master + AdamW m + v (fp32) + fp32 gradients, per parameter of the rank
constexpr double kStateBytesPerParam = 2 + 4 + 4 + 4 + 4;
// A layout fits when its counted memory is at most this share of the GPU's: the rest is headroom
// for what the formulas leave out (CUDA context, communication buffers, backward scratch, fragmentation).
constexpr double kUsableMemoryFraction = 0.9;

struct GpuSpec {
    std::string key;      // h100 | h200 | a100
    std::string name;     // "H100 SXM"
    double peak_tflops;   // dense bf16, no sparsity
    double mem_gb;        // HBM per GPU, 1e9 bytes
    double fp32_tflops;   // fp32 without tensor cores (the CUDA backend's fp32 mode)
};
const std::vector<GpuSpec>& gpu_specs();
const GpuSpec* find_gpu(const std::string& key);   // nullptr when unknown
// The spec of a CUDA device name ("NVIDIA H100 80GB HBM3" -> h100), nullptr when unknown.
const GpuSpec* find_gpu_by_device_name(const std::string& cuda_name);

// Parameter counts, exactly GPT::num_params()'s tensors (src/model.cpp, src/moe_layer.cpp).
struct ParamCounts {
    int64_t total = 0;
    int64_t routed = 0;       // routed experts (h.{l}.moe.experts.*) of every MoE layer: split over EP
    int64_t replicated = 0;   // everything else: held by every rank
    int64_t embedding = 0;    // wte + wpe
    int64_t attention = 0;    // per model: ln_1, c_attn, c_proj, ln_2 of every layer
    int64_t dense_ffn = 0;    // mlp.* of the dense layers
    int64_t router = 0;       // router weight / noise weight / soft slots
    int64_t shared = 0;       // shared experts
    int64_t final_norm = 0;   // ln_f
    int moe_layers = 0;
    double experts_per_token = 0;   // k_eff: rows one token sends to routed experts
    double active = 0;              // parameters one token passes through: replicated + routed * k_eff / E
};
ParamCounts count_params(const Config& cfg);

// k_eff: top_k (topk, sinkhorn), 1 (hash), min(E, expert_choice_capacity), E * soft_slots / seq_len
// (soft: slots per token); 0 for a dense model.
double experts_per_token(const Config& cfg);

// EP degrees with ep | gpus and ep | experts, ascending ({1} for a dense model).
std::vector<int> valid_ep(const Config& cfg, int gpus);

// Parameters one rank holds at expert-parallel degree ep: replicated + routed / ep.
int64_t params_per_rank(const Config& cfg, int ep);

// Forward FLOPs of one token (one multiply-add = 2 FLOPs), by part; a step is 3x forward.
struct FlopsPerToken {
    double attn_linear = 0;   // c_attn + c_proj: 2 * 4C^2 per layer
    double attn_scores = 0;   // QK^T and AV, causal: 2 * T * C per layer (half of 4TC)
    double dense_ffn = 0;     // 2 * 2FC per dense layer
    double router = 0;        // 2EC (+2EC noise); soft: 6 C E p
    double routed = 0;        // 2 * k_eff * (hw Fe C + Fe C) per MoE layer
    double shared = 0;        // 2 * S * (hw Fs C + Fs C) per MoE layer
    double lm_head = 0;       // 2VC
    double total() const { return attn_linear + attn_scores + dense_ffn + router + routed + shared + lm_head; }
};
FlopsPerToken forward_flops_per_token(const Config& cfg);
// FLOPs one rank does per optimizer step: 3 * forward per token * B * T * grad_accum.
double flops_per_rank_step(const Config& cfg);

// Activations kept for backward for one micro-batch of B*T tokens on one rank (bytes).
struct ActivationBytes {
    double attention = 0;   // every layer: 8C bf16 + 4 LN statistics + H log-sum-exp (fp32) per token
    double dense_ffn = 0;   // dense layers: 2F bf16 per token
    double router = 0;      // MoE layers: router logits/scores (fp32)
    double dispatch = 0;    // MoE layers: k_eff rows per token of (2C + (hw+1) Fe) bf16 + gate + index
    double shared = 0;      // MoE layers: S * (hw+1) Fs bf16 per token
    double final = 0;       // embedding output, ln_f (C bf16 + 2 fp32), logits V fp32 per token
    double total() const { return attention + dense_ffn + router + dispatch + shared + final; }
};
ActivationBytes activation_bytes(const Config& cfg);

// Per rank, per optimizer step (bytes sent).
// All-to-all: 4 transfers (dispatch + combine, forward + backward) of the B*T*k_eff*(EP-1)/EP rows
// that leave the rank, C bf16 values each, per MoE layer and micro-batch.
double alltoall_bytes_per_step(const Config& cfg, int ep);
// Gradient all-reduce (ring: 2 (G-1)/G x bytes over a group of G): replicated gradients over all
// gpus ranks, the rank's routed-expert gradients over its DP group of gpus/ep ranks; fp32.
double allreduce_bytes_per_step(const Config& cfg, int gpus, int ep);

struct PlanOptions {
    int gpus = 1;
    GpuSpec gpu;              // find_gpu("h100") by default (set by the caller)
    double link_gbps = 400;   // per GPU, Gb/s
    double mfu = 0.4;
};

struct PlanRow {
    int ep = 1, dp = 1;
    int64_t params = 0;          // per rank
    double state_bytes = 0;      // kStateBytesPerParam * params
    double activation_bytes = 0;
    double memory_bytes = 0;     // state + activations
    bool fits = false;           // memory_bytes <= kUsableMemoryFraction * gpu.mem_gb * 1e9
    double flops = 0;            // per rank per step
    double alltoall_bytes = 0, allreduce_bytes = 0;
    double compute_s = 0, comm_s = 0, step_s = 0;
    bool comm_bound = false;     // comm_s > compute_s
    bool best = false;
};

// One row per valid_ep(); exactly one is best: the fastest step among the rows that fit in GPU
// memory, or, when none fits, the one that needs the least memory (ties: the smaller EP).
std::vector<PlanRow> plan_rows(const Config& cfg, const PlanOptions& opt);

}  // namespace moe
