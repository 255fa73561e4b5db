/* CPU twins of the MoE-specific ops: dispatch (gather rows by the plan), combine (gated sum
   back per token), SwiGLU, and an elementwise multiply-accumulate. Same conventions as
   ops_cpu.h: outputs first, backward accumulates where it says so. Combine and the gather
   backward run over tokens through the plan's token CSR, so no two threads write one row. */
#pragma once
#include <cstddef>
#include "backend.h"

namespace moe {

// out[a, :] = x[token[a], :]
void moe_dispatch_forward(float* out,                  // (A, C)
                          const float* x,              // (N, C)
                          const int* token, int A, int C);
// dx[n, :] += sum over assignments a of token n of dout[a, :]
void moe_dispatch_backward(float* dx,                  // (N, C)
                           const float* dout,          // (A, C)
                           const int* tok_offsets, const int* tok_assign, int N, int C);
// out[n, :] = sum over assignments a of token n of gate[a] * y[a, :]  (overwrites out)
void moe_combine_forward(float* out,                   // (N, C)
                         const float* y,               // (A, C)
                         const float* gate,            // (A)
                         const int* tok_offsets, const int* tok_assign, int N, int C);
// dy[a, :] = gate[a] * dout[token[a], :],  dgate[a] = <dout[token[a], :], y[a, :]>  (overwrite)
void moe_combine_backward(float* dy, float* dgate,     // (A, C), (A)
                          const float* dout, const float* y, const float* gate, const int* token,
                          int A, int C);

// SwiGLU on rows of inp = [gate | up] (2F wide): out = silu(gate) * up.
void swiglu_forward(float* out,                        // (N, F)
                    const float* inp,                  // (N, 2F)
                    size_t N, int F);
void swiglu_backward(float* dinp,                      // (N, 2F), accumulated
                     const float* inp, const float* dout, size_t N, int F);

void mul_accumulate(float* out, const float* a, const float* b, size_t n);  // out += a * b
// Grouped expert GEMM (contract in backend.h): out rows of each block = inp rows . W_e^T + b_e.
void grouped_matmul_forward(float* out,                 // (rows, OC)
                            const float* inp,           // (rows, C)
                            const float* weight,        // (E, OC, C)
                            const float* bias,          // (E, OC) or null
                            const GroupBlock* blocks, int nblocks, int C, int OC);
void grouped_matmul_backward(float* dinp, float* dweight, float* dbias,  // (rows, C) (E, OC, C) (E, OC), +=
                             const float* dout, const float* inp, const float* weight,
                             const GroupBlock* blocks, int nblocks, int C, int OC);

}  // namespace moe
