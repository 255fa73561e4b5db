/* The launchers of every CUDA op (one .cu file per op family), called by backend_cuda.cu.
   llm.c conventions: output pointers first, sizes, then `cudaStream_t stream` last; shapes in
   the comments of each definition. Contracts are the CPU twins' (src/ops_cpu.h,
   src/ops_moe_cpu.h): backward ops accumulate (+=) into gradients unless said otherwise. */
#pragma once
#include "common.cuh"
#include "backend.h"

#include <cstddef>

namespace moe {
namespace cuda {

// A device buffer that grows on demand (cudaFree synchronises the device, so a buffer in use by
// an earlier launch on the stream is never freed under it).
struct DeviceScratch {
    void* ptr = nullptr;
    size_t bytes = 0;
    void* ensure(size_t n) {
        if (n > bytes) {
            if (ptr) cudaCheck(cudaFree(ptr));
            ptr = nullptr;
            cudaCheck(cudaMalloc(&ptr, n));
            bytes = n;
        }
        return ptr;
    }
    void release() {
        if (ptr) cudaFree(ptr);
        ptr = nullptr;
        bytes = 0;
    }
};

// Row chunks of the deterministic two-stage column sums (dbias, LayerNorm dweight/dbias).
constexpr int kColumnChunks = 64;
void add_chunk_sums(float* out, const float* partial, int chunks, int C, cudaStream_t stream);

// encoder.cu
void encoder_forward(float* out, const int* inp, const float* wte, const float* wpe, int B, int T, int C,
                     cudaStream_t stream);
void encoder_backward(float* dwte, float* dwpe, const float* dout, const int* bucket_token, const int* bucket_offsets,
                      const int* positions, int nbuckets, int B, int T, int C, cudaStream_t stream);

// layernorm.cu
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight, const float* bias,
                       int N, int C, cudaStream_t stream);
int layernorm_backward_scratch(int N, int C);   // floats
void layernorm_backward(float* dinp, float* dweight, float* dbias, float* scratch, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int N, int C, cudaStream_t stream);

// matmul.cu
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, int N, int C, int OC,
                    bool bf16, cudaStream_t stream);
int matmul_backward_scratch(int N, int OC);     // floats
void matmul_backward(float* dinp, float* dweight, float* dbias, float* scratch, const float* dout, const float* inp,
                     const float* weight, int N, int C, int OC, bool bf16, cudaStream_t stream);
void grouped_matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                            const GroupBlock* blocks, int nblocks, int C, int OC, bool bf16, DeviceScratch& table,
                            cudaStream_t stream);
void grouped_matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                             const float* weight, const GroupBlock* blocks, int nblocks, int C, int OC, bool bf16,
                             DeviceScratch& table, cudaStream_t stream);

// attention.cu (flash-style: no (T, T) matrix; lse (B, NH, T) saved for the backward). With bf16
// set and a head size attention_tc_supported, they run attention_tc.cu's tensor-core kernels.
constexpr int kAttentionMaxHeadSize = 128;
void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int C, int NH, bool bf16,
                       cudaStream_t stream);
void attention_backward(float* dqkv, float* delta, const float* dout, const float* qkv, const float* lse, int B,
                        int T, int C, int NH, bool bf16, cudaStream_t stream);

// attention_tc.cu (FlashAttention-2 on mma.sync bf16 tensor cores; same buffers and contract)
bool attention_tc_supported(int hs);   // hs 32, 64, 128
void attention_tc_forward(float* out, float* lse, const float* qkv, int B, int T, int C, int NH, cudaStream_t stream);
void attention_tc_backward(float* dqkv, float* delta, const float* dout, const float* qkv, const float* lse, int B,
                           int T, int C, int NH, cudaStream_t stream);

// activations.cu
void gelu_forward(float* out, const float* inp, size_t N, cudaStream_t stream);
void gelu_backward(float* dinp, const float* inp, const float* dout, size_t N, cudaStream_t stream);
void swiglu_forward(float* out, const float* inp, size_t N, int F, cudaStream_t stream);
void swiglu_backward(float* dinp, const float* inp, const float* dout, size_t N, int F, cudaStream_t stream);
void residual_forward(float* out, const float* a, const float* b, size_t N, cudaStream_t stream);
void mul_accumulate(float* out, const float* a, const float* b, size_t N, cudaStream_t stream);
void scale(float* x, float s, size_t N, cudaStream_t stream);

// crossentropy.cu
void crossentropy_softmax_forward(float* losses, float* probs, const float* logits, const int* targets, int N, int V,
                                  cudaStream_t stream);
void crossentropy_softmax_backward(float* dlogits, const float* probs, const int* targets, float dloss, int N, int V,
                                   cudaStream_t stream);

// moe_permute.cu
void moe_dispatch_forward(float* out, const float* x, const int* token, int A, int C, cudaStream_t stream);
void moe_dispatch_backward(float* dx, const float* dout, const int* tok_offsets, const int* tok_assign, int N, int C,
                           cudaStream_t stream);
void moe_combine_forward(float* out, const float* y, const float* gate, const int* tok_offsets, const int* tok_assign,
                         int N, int C, cudaStream_t stream);
void moe_combine_backward(float* dy, float* dgate, const float* dout, const float* y, const float* gate,
                          const int* token, int A, int C, cudaStream_t stream);

// adamw.cu
void adamw_update(float* param, float* grad, float* m, float* v, size_t n, float lr, float beta1, float beta2,
                  float bc1, float bc2, float eps, float weight_decay, float grad_scale, cudaStream_t stream);
constexpr int kSumSquaresBlocks = 1024;
// partial (kSumSquaresBlocks + 1) doubles of scratch; the total ends in partial[kSumSquaresBlocks]
void sum_squares(double* partial, const float* g, size_t n, cudaStream_t stream);

// router.cu: token-choice top-k routing (the Backend routing ops)
constexpr int kRouterMaxE = kRouterOpsMaxE;   // experts a layer may have for routing on the device
constexpr int kRouterMaxK = kRouterOpsMaxK;   // choices per token
void router_topk_forward(float* s, int* choice_expert, float* choice_gate, const float* z, const float* bias,
                         const TopkRouterArgs& a, cudaStream_t stream);
size_t router_plan_scratch_bytes(int N, int E, int k);
void router_plan_build(int* offsets, int* routed, int* token, float* gate, int* choice, int* tok_offsets,
                       int* tok_assign, void* scratch, const int* choice_expert, const float* choice_gate,
                       const TopkRouterArgs& a, cudaStream_t stream);
size_t router_balance_scratch_doubles(const TopkRouterArgs& a, const RouterLossArgs& l);
void router_balance_forward(double* out, double* scratch, const float* z, const float* s, const int* choice_expert,
                            const float* choice_gate, const TopkRouterArgs& a, const RouterLossArgs& l,
                            cudaStream_t stream);
size_t router_backward_scratch_floats(const TopkRouterArgs& a, const RouterLossArgs& l);
void router_topk_backward(float* dz, float* scratch, double* balance_scratch, const float* dgate, const int* choice,
                          int A, const float* z, const float* s, const int* choice_expert, const TopkRouterArgs& a,
                          const RouterLossArgs& l, float dloss_scale, cudaStream_t stream);

}  // namespace cuda
}  // namespace moe
