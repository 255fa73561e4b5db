/* The op backend: one model code path (model.cpp) runs on either backend. Every op has the
   contract documented in ops_cpu.h (output first, backward accumulates); pointers are backend
   memory (host for CPU, device for CUDA). The CPU backend forwards to ops_cpu.cpp; a CUDA
   backend implements the same table with handwritten kernels. */
#pragma once
#include <cstddef>
#include <memory>
#include <string>

namespace moe {

// One expert's rows of a grouped GEMM: rows [row0, row0 + rows) of the grouped input go through
// expert `expert`. Blocks come from the dispatch plan (host data) and need not be in expert order
// (expert parallel: by source rank, then local expert); blocks never overlap.
struct GroupBlock { int expert, row0, rows; };

// Token-choice top-k routing of one micro-batch as backend ops (docs/moe.md "Router", docs/cuda.md
// "Routing"): N tokens, E experts, k choices per token (choice m = n*k + j), M = N*k.
struct TopkRouterArgs {
    int N = 0, E = 0, k = 1;
    bool sigmoid = false;              // score: sigmoid, else softmax
    int groups = 1, topk_groups = 1;   // group-limited selection (groups 1 = off)
    bool normalize = true;             // renormalise the k gates of a token to sum 1 ...
    float scale = 1.0f;                // ... then multiply by scale
    int capacity = 0;                  // kept assignments per expert; <= 0: dropless
    bool drop_by_probs = true;         // full expert drops its lowest gates, else its latest tokens
};
// Largest shapes the routing ops take (the CUDA kernels' per-warp shared memory and registers);
// larger layers route on the host.
constexpr int kRouterOpsMaxE = 1024, kRouterOpsMaxK = 16;
// The balancing terms of the routed micro-batch (coefficients included; 0 = off).
struct RouterLossArgs {
    double aux_loss = 0.0;             // Switch aux loss alpha
    int aux_seq_len = 0;               // > 0: sequence scope, sequences of this many tokens
    const double* aux_counts = nullptr;  // global scope: routed counts (E) of the whole step, host memory
    double z_loss = 0.0;               // beta
};
// What the host reads back of the balancing forward.
struct RouterLosses {
    double aux = 0.0, z = 0.0;         // the terms, coefficients included
    double z_sum = 0.0;                // sum over tokens of logsumexp(z)^2 (statistics)
    double top1_gate_sum = 0.0;        // sum over tokens of the largest gate of each token
};

struct Backend {
    virtual ~Backend() = default;
    virtual std::string name() const = 0;

    // memory
    virtual void* alloc_bytes(size_t nbytes) = 0;     // zero-filled
    virtual void free_bytes(void* p) = 0;
    virtual void zero(void* p, size_t nbytes) = 0;
    virtual void upload(void* dst, const void* host_src, size_t nbytes) = 0;
    virtual void download(void* host_dst, const void* src, size_t nbytes) = 0;
    virtual void copy(void* dst, const void* src, size_t nbytes) = 0;
    virtual void synchronize() {}
    // Where alloc_bytes memory lives: host (CPU, the default) or GPU device memory (CUDA). Dist
    // moves host buffers with MPI and device buffers with NCCL (docs/nccl.md).
    virtual bool device_memory() const { return false; }
    // The cudaStream_t (as void*) the ops are queued on; null = the default stream.
    virtual void* stream() const { return nullptr; }
    float* alloc(size_t n) { return (float*)alloc_bytes(n * sizeof(float)); }
    int* alloc_int(size_t n) { return (int*)alloc_bytes(n * sizeof(int)); }

    // model ops (contracts in ops_cpu.h)
    virtual void encoder_forward(float* out, const int* inp, const float* wte, const float* wpe, int B, int T, int C) = 0;
    virtual void encoder_backward(float* dwte, float* dwpe, const float* dout, const int* inp, int B, int T, int C) = 0;
    virtual void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                                   const float* bias, int N, int C) = 0;
    virtual void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                                    const float* weight, const float* mean, const float* rstd, int N, int C) = 0;
    virtual void matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                                int N, int C, int OC) = 0;
    virtual void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                                 const float* weight, int N, int C, int OC) = 0;
    // Floats that each of attention's buffers preatt, att, dpreatt, datt must hold (GPT allocates
    // them): the CPU keeps the (B, NH, T, T) scores and probabilities. The CUDA flash kernel never
    // stores a (T, T) matrix: `att` holds the log-sum-exp of each score row and `datt` the
    // backward's delta (rowsum of P * dP), (B, NH, T) each; preatt and dpreatt are unused there.
    virtual size_t attention_buffer_floats(int B, int T, int NH) const { return (size_t)B * NH * T * T; }
    virtual void attention_forward(float* out, float* preatt, float* att, const float* qkv, int B, int T, int C, int NH) = 0;
    virtual void attention_backward(float* dqkv, float* dpreatt, float* datt, const float* dout, const float* qkv,
                                    const float* att, int B, int T, int C, int NH) = 0;
    virtual void gelu_forward(float* out, const float* inp, size_t N) = 0;
    virtual void gelu_backward(float* dinp, const float* inp, const float* dout, size_t N) = 0;
    virtual void residual_forward(float* out, const float* a, const float* b, size_t N) = 0;
    virtual void crossentropy_softmax_forward(float* losses, float* probs, const float* logits, const int* targets,
                                              int N, int V) = 0;
    virtual void crossentropy_softmax_backward(float* dlogits, const float* probs, const int* targets, float dloss,
                                               int N, int V) = 0;

    // MoE ops (contracts in ops_moe_cpu.h)
    virtual void moe_dispatch_forward(float* out, const float* x, const int* token, int A, int C) = 0;
    virtual void moe_dispatch_backward(float* dx, const float* dout, const int* tok_offsets, const int* tok_assign,
                                       int N, int C) = 0;
    virtual void moe_combine_forward(float* out, const float* y, const float* gate, const int* tok_offsets,
                                     const int* tok_assign, int N, int C) = 0;
    virtual void moe_combine_backward(float* dy, float* dgate, const float* dout, const float* y, const float* gate,
                                      const int* token, int A, int C) = 0;
    virtual void swiglu_forward(float* out, const float* inp, size_t N, int F) = 0;
    virtual void swiglu_backward(float* dinp, const float* inp, const float* dout, size_t N, int F) = 0;
    virtual void mul_accumulate(float* out, const float* a, const float* b, size_t n) = 0;
    // Grouped expert GEMM, one call for all experts of a layer: for each block, its rows of
    // inp (rows, C) times expert e's weight^T, plus its bias: out (rows, OC). weight (E, OC, C),
    // bias (E, OC) or null; blocks is a host array. Rows outside every block are not touched.
    virtual void grouped_matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                                        const GroupBlock* blocks, int nblocks, int C, int OC) = 0;
    // dinp += dout W_e for each block's rows; dweight (E, OC, C) and dbias (E, OC) += per expert
    // (either may be null).
    virtual void grouped_matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout,
                                         const float* inp, const float* weight, const GroupBlock* blocks,
                                         int nblocks, int C, int OC) = 0;

    // Routing ops (token-choice top-k; the CPU twins are the host functions of moe_router.h, which
    // the CPU backend calls: src/router_ops.cpp). All arrays are backend memory unless said.
    // Scores s (N, E) = softmax/sigmoid(z (N, E)); per token the top k of s + bias (bias (E) or
    // null; ties: lower expert), group-limited if groups > 1, in order of selection:
    // choice_expert (M); choice_gate (M) from s, normalised and scaled.
    virtual void router_topk_forward(float* s, int* choice_expert, float* choice_gate, const float* z,
                                     const float* bias, const TopkRouterArgs& a) = 0;
    // The dispatch plan of the choices: routed (E) choices per expert before dropping; capacity
    // drops (by gate, ties: earlier choice; or latest first); offsets (E+1) of the kept
    // assignments per expert; token, gate, choice (A = offsets[E] <= M) grouped by expert, by
    // token within; the token CSR tok_offsets (N+1) / tok_assign (A).
    virtual void router_plan_build(int* offsets, int* routed, int* token, float* gate, int* choice,
                                   int* tok_offsets, int* tok_assign, const int* choice_expert,
                                   const float* choice_gate, const TopkRouterArgs& a) = 0;
    // The balancing terms and routing statistics of the micro-batch (returned to the host).
    virtual RouterLosses router_balance_forward(const float* z, const float* s, const int* choice_expert,
                                                const float* choice_gate, const TopkRouterArgs& a,
                                                const RouterLossArgs& l) = 0;
    // dz (N, E), overwritten: d(loss)/d(logits) from dgate (A) (the combine's gate gradient, A =
    // assignments of the plan, choice (A) their router choice) through gates and scores, plus
    // dloss_scale * the balancing terms of `l` (pass a default RouterLossArgs for none).
    virtual void router_topk_backward(float* dz, const float* dgate, const int* choice, int A, const float* z,
                                      const float* s, const int* choice_expert, const TopkRouterArgs& a,
                                      const RouterLossArgs& l, float dloss_scale) = 0;

    // optimizer ops
    // sum of squares of g (n floats), reduced in a fixed order so that runs are reproducible
    virtual double sum_squares(const float* g, size_t n) = 0;
    virtual void scale(float* x, float s, size_t n) = 0;
    // AdamW on one tensor with gradient grad_scale * grad (the clipping coefficient, folded in so
    // that clipping costs no pass over the gradients): m,v updated; bias correction with step t
    // (1-based); decoupled decay. grad is left zero (no zeroing pass before the next backward).
    virtual void adamw_update(float* param, float* grad, float* m, float* v, size_t n, float lr,
                              float beta1, float beta2, float eps, float weight_decay, int t,
                              float grad_scale) = 0;
};

std::unique_ptr<Backend> make_cpu_backend(int threads);  // threads 0 = all cores
// The CUDA backend on GPU `device` (cuda/backend_cuda.cu): bf16 = tensor-core GEMMs with bf16
// operands (train.dtype bf16), else fp32 everywhere. Builds without CUDA fail with an error.
std::unique_ptr<Backend> make_cuda_backend(int device, bool bf16);

}  // namespace moe
