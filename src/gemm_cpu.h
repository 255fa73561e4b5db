/* The CPU GEMM engine shared by the matmuls (gemm_cpu.cpp), attention (ops_cpu.cpp) and the
   grouped expert GEMM. */
#pragma once
#include <cstddef>

namespace moe {

// C[m, n] (= or +=) bias[n] + alpha * sum_k A(m, k) B(k, n) for m < M, n < Nc, k < K, with A and
// B given by strides. Parallel over tasks of C with OpenMP; called inside a parallel region it
// runs on the calling thread. Each C element sums over k in the same order whatever the split.
void gemm(float* c, size_t ldc,                    // (M, Nc), row stride ldc
          const float* A, size_t sam, size_t sak,  // A(m, k) = A[m*sam + k*sak]
          const float* B, size_t sbk, size_t sbn,  // B(k, n) = B[k*sbk + n*sbn]
          const float* bias, bool accumulate, float alpha, int M, int Nc, int K);

}  // namespace moe
