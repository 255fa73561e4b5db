/* CPU twins of every model op (OpenMP), llm.c conventions: output pointer(s) first, then
   inputs, then sizes. Each op has a forward and a backward; backward functions ACCUMULATE
   (+=) into every gradient they write, so callers zero the gradient buffers once per step
   and tied or multiply-used tensors just add up. A gradient pointer may be nullptr to skip it.
   These are the reference for the CUDA kernels and are checked by finite differences.
   Further contract points a CUDA twin must keep:
   - attention_forward writes defined zeros into the masked (future) entries of preatt/att, and
     attention_backward overwrites all of its dpreatt/datt scratch (no zeroing needed);
   - crossentropy_softmax_forward accepts probs == nullptr (loss only), layernorm_forward
     accepts nullptr mean/rstd; a backward whose only gradient is nullptr returns at once;
   - token ids are not range-checked here: the data loader and GPT::forward guarantee inp < V. */
#pragma once
#include <cstddef>

namespace moe {

// out[b,t,:] = wte[inp[b,t],:] + wpe[t,:]
void encoder_forward(float* out,                 // (B, T, C)
                     const int* inp,             // (B, T)
                     const float* wte,           // (V, C)
                     const float* wpe,           // (maxT, C)
                     int B, int T, int C);
void encoder_backward(float* dwte, float* dwpe,  // (V, C), (maxT, C)
                      const float* dout,         // (B, T, C)
                      const int* inp, int B, int T, int C);

// LayerNorm over the last dim, eps 1e-5; mean and rstd saved for backward.
void layernorm_forward(float* out, float* mean, float* rstd,  // (N, C), (N), (N)
                       const float* inp, const float* weight, const float* bias, int N, int C);
void layernorm_backward(float* dinp, float* dweight, float* dbias,  // (N, C), (C), (C)
                        const float* dout, const float* inp, const float* weight,
                        const float* mean, const float* rstd, int N, int C);

// out = inp @ weight^T + bias; weight stored (OC, C) as in PyTorch. bias may be nullptr.
void matmul_forward(float* out,                  // (N, OC)
                    const float* inp,            // (N, C)
                    const float* weight,         // (OC, C)
                    const float* bias,           // (OC) or nullptr
                    int N, int C, int OC);
void matmul_backward(float* dinp, float* dweight, float* dbias,  // (N, C), (OC, C), (OC)
                     const float* dout, const float* inp, const float* weight, int N, int C, int OC);

// Causal multi-head self-attention on packed qkv (q, k, v each C wide, NH heads of C/NH),
// scaled by 1/sqrt(C/NH). preatt/att keep the (B, NH, T, T) scores for backward.
void attention_forward(float* out,                          // (B, T, C)
                       float* preatt, float* att,           // (B, NH, T, T)
                       const float* qkv,                    // (B, T, 3C)
                       int B, int T, int C, int NH);
void attention_backward(float* dqkv,                        // (B, T, 3C)
                        float* dpreatt, float* datt,        // (B, NH, T, T) scratch, overwritten
                        const float* dout, const float* qkv, const float* att,
                        int B, int T, int C, int NH);

// GELU, tanh approximation (GPT-2).
void gelu_forward(float* out, const float* inp, size_t N);
void gelu_backward(float* dinp, const float* inp, const float* dout, size_t N);

void residual_forward(float* out, const float* a, const float* b, size_t N);   // out = a + b
void residual_backward(float* da, float* db, const float* dout, size_t N);    // da += dout, db += dout

// Softmax over V then cross-entropy against targets. probs kept for backward.
void crossentropy_softmax_forward(float* losses,            // (N)
                                  float* probs,             // (N, V)
                                  const float* logits,      // (N, V)
                                  const int* targets, int N, int V);
// dlogits += (probs - onehot(target)) * dloss; dloss is d(total loss)/d(losses[i]) (e.g. 1/N).
void crossentropy_softmax_backward(float* dlogits, const float* probs, const int* targets,
                                   float dloss, int N, int V);

// AdamW on one tensor (torch.optim.AdamW) with gradient grad_scale * grad (clipping): m, v
// updated; bias correction with step t (1-based); decoupled weight decay on the pre-update
// weight. grad is left zero, ready for the next backward to accumulate into: zeroing it here,
// while its cache lines are in hand, saves a pass over all gradients per step.
void adamw_update(float* param, float* grad, float* m, float* v, size_t n,  // (n) each
                  float lr, float beta1, float beta2, float eps, float weight_decay, int t, float grad_scale);
// sum of g[i]^2 in double, in a fixed order (fixed chunks, fixed lanes): the same bits for any
// thread count.
double sum_squares(const float* g, size_t n);

}  // namespace moe
