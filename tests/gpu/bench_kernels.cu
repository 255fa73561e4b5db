/* Kernel micro-benchmark of `make bench-gpu` (docs/gpu-testing.md): the CUDA backend's MoE kernels
   against what the hardware can do, on the shapes of configs/bench/gpu_gpt2s_8e.yaml and
   gpu_fine_64e.yaml (8 x 1024 tokens, d_model 768).
   - Grouped expert GEMM (Backend::grouped_matmul_forward/backward) in TFLOPS, beside cuBLAS
     (cublasGemmEx) at equal FLOPs: one dense GEMM over all routed rows (the ceiling: no grouping
     at all), and one cuBLAS GEMM per block (what a naive per-expert loop gets). fp32 mode compares
     with fp32 cuBLAS (CUBLAS_COMPUTE_32F, no TF32); bf16 mode with bf16 inputs, fp32 accumulation.
     Routing: balanced (every expert the same rows) and Zipf-skewed (hot experts, long tail).
   - Dispatch/combine (the permute/unpermute of the plan) in GB/s of bytes that must move, beside
     a cudaMemcpy device-to-device copy (read + write) of the dispatched rows.
   Host timing of N launches between device synchronisations (stream-agnostic), after warm-up.
   Prints markdown tables; scripts/bench_gpu.sh adds date, GPU and command.

     build/bench_kernels [--dtype fp32|bf16] [--iters N]     (--probe: exit 3 when no GPU) */
#include "backend.h"
#include "gpu_common.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

using moe::Backend;
using moe::GroupBlock;

namespace {

void check_cuda(cudaError_t e, const char* what) {
    if (e != cudaSuccess) {
        std::fprintf(stderr, "error: %s: %s\n", what, cudaGetErrorString(e));
        std::exit(1);
    }
}
void check_cublas(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS) {
        std::fprintf(stderr, "error: %s: cuBLAS status %d\n", what, (int)s);
        std::exit(1);
    }
}

// milliseconds per call of f, median of 5 batches of `iters` calls after `iters` warm-up calls
double time_ms(int iters, const std::function<void()>& f, Backend& be) {
    for (int i = 0; i < iters; i++) f();
    be.synchronize();
    check_cuda(cudaDeviceSynchronize(), "warm-up");
    std::vector<double> t;
    for (int r = 0; r < 5; r++) {
        auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; i++) f();
        be.synchronize();
        check_cuda(cudaDeviceSynchronize(), "timed run");
        t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / iters);
    }
    std::sort(t.begin(), t.end());
    return t[2];
}

float* dev_random(size_t n, unsigned seed) {
    std::vector<float> h(n);
    std::mt19937 g(seed);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (float& x : h) x = u(g);
    float* d = nullptr;
    check_cuda(cudaMalloc(&d, n * sizeof(float)), "cudaMalloc");
    check_cuda(cudaMemcpy(d, h.data(), n * sizeof(float), cudaMemcpyHostToDevice), "upload");
    return d;
}
void* dev_alloc(size_t bytes) {
    void* d = nullptr;
    check_cuda(cudaMalloc(&d, std::max<size_t>(bytes, 4)), "cudaMalloc");
    check_cuda(cudaMemset(d, 0, std::max<size_t>(bytes, 4)), "cudaMemset");
    return d;
}
template <class T>
T* dev_copy(const std::vector<T>& h) {
    T* d = (T*)dev_alloc(h.size() * sizeof(T));
    if (!h.empty()) check_cuda(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
    return d;
}

__global__ void to_bf16(__nv_bfloat16* out, const float* in, size_t n) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2bfloat16(in[i]);
}
void* bf16_copy(const float* src, size_t n) {
    __nv_bfloat16* d = (__nv_bfloat16*)dev_alloc(n * 2);
    to_bf16<<<(unsigned)((n + 255) / 256), 256>>>(d, src, n);
    check_cuda(cudaGetLastError(), "to_bf16");
    return d;
}

// Row-major out (M, OC) (+)= in (M, K) . W^T, W (OC, K) row-major: llm.c's cuBLAS call.
// Column-major view: out^T (OC x M) = W^T(col) ... (see matmul_forward in llm.c).
struct Gemm {
    cublasHandle_t h;
    bool bf16;
    cudaDataType_t ab() const { return bf16 ? CUDA_R_16BF : CUDA_R_32F; }
    size_t es() const { return bf16 ? 2 : 4; }
    // forward: out (M, OC) = in (M, K) W^T
    void fwd(float* out, const void* in, const void* W, int M, int K, int OC) {
        const float one = 1.0f, zero = 0.0f;
        check_cublas(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, OC, M, K, &one, W, ab(), K, in, ab(), K, &zero, out,
                                  CUDA_R_32F, OC, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "cublasGemmEx fwd");
    }
    // backward: dinp (M, K) += dout (M, OC) W ; dW (OC, K) += dout^T in
    void bwd(float* dinp, float* dW, const void* dout, const void* in, const void* W, int M, int K, int OC) {
        const float one = 1.0f;
        check_cublas(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, K, M, OC, &one, W, ab(), K, dout, ab(), OC, &one, dinp,
                                  CUDA_R_32F, K, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "cublasGemmEx dinp");
        check_cublas(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, K, OC, M, &one, in, ab(), K, dout, ab(), OC, &one, dW,
                                  CUDA_R_32F, K, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT), "cublasGemmEx dW");
    }
};

struct Shape {
    const char* config;
    int E, k, F;
};
const int kTokens = 8 * 1024, kC = 768;
const Shape kShapes[] = {{"gpu_gpt2s_8e", 8, 2, 3072}, {"gpu_fine_64e", 64, 8, 384}};

void bench_grouped(Backend& be, Gemm& g, int iters) {
    std::printf("\n### Grouped expert GEMM (%s), %d tokens, d_model %d\n\n", g.bf16 ? "bf16" : "fp32", kTokens, kC);
    std::printf("| config | routing | GEMM | pass | rows x K x N | ours ms | ours TFLOPS | cuBLAS 1 GEMM TFLOPS "
                "| cuBLAS per block TFLOPS | ours / 1 GEMM |\n");
    std::printf("|---|---|---|---|---|---:|---:|---:|---:|---:|\n");
    for (const Shape& s : kShapes) {
        for (const char* routing : {"balanced", "zipf"}) {
            gpu_test::PlanData p = gpu_test::make_plan(kTokens, s.E, s.k, std::string(routing) == "balanced" ? "topk" : "zipf", 1);
            std::vector<GroupBlock> blocks = gpu_test::expert_blocks(p);
            if (std::string(routing) == "balanced") {  // exactly A/E rows each
                const int A = kTokens * s.k, per = A / s.E;
                for (int e = 0; e < s.E; e++) blocks[e] = {e, e * per, per};
            }
            int rows = 0;
            for (const GroupBlock& b : blocks) rows += b.rows;
            for (int dir = 0; dir < 2; dir++) {  // c_fc: C -> F, c_proj: F -> C
                const int K = dir == 0 ? kC : s.F, OC = dir == 0 ? s.F : kC;
                float* inp = dev_random((size_t)rows * K, 1);
                float* W = dev_random((size_t)s.E * OC * K, 2);
                float* b = dev_random((size_t)s.E * OC, 3);
                float* out = (float*)dev_alloc((size_t)rows * OC * 4);
                float* dout = dev_random((size_t)rows * OC, 4);
                float* dinp = (float*)dev_alloc((size_t)rows * K * 4);
                float* dW = (float*)dev_alloc((size_t)s.E * OC * K * 4);
                float* db = (float*)dev_alloc((size_t)s.E * OC * 4);
                // cuBLAS operands in the compared precision
                const void* cin = g.bf16 ? bf16_copy(inp, (size_t)rows * K) : inp;
                const void* cW = g.bf16 ? bf16_copy(W, (size_t)s.E * OC * K) : W;
                const void* cdout = g.bf16 ? bf16_copy(dout, (size_t)rows * OC) : dout;
                const double flops = 2.0 * rows * K * OC;
                const int nb = (int)blocks.size();
                for (int pass = 0; pass < 2; pass++) {
                    const double f = pass == 0 ? flops : 2 * flops;
                    double ours, one, loop;
                    if (pass == 0) {
                        ours = time_ms(iters, [&] { be.grouped_matmul_forward(out, inp, W, b, blocks.data(), nb, K, OC); }, be);
                        one = time_ms(iters, [&] { g.fwd(out, cin, cW, rows, K, OC); }, be);
                        loop = time_ms(iters, [&] {
                            for (const GroupBlock& bl : blocks)
                                if (bl.rows)
                                    g.fwd(out + (size_t)bl.row0 * OC, (const char*)cin + (size_t)bl.row0 * K * g.es(),
                                          (const char*)cW + (size_t)bl.expert * OC * K * g.es(), bl.rows, K, OC);
                        }, be);
                    } else {
                        ours = time_ms(iters, [&] {
                            be.grouped_matmul_backward(dinp, dW, db, dout, inp, W, blocks.data(), nb, K, OC);
                        }, be);
                        one = time_ms(iters, [&] { g.bwd(dinp, dW, cdout, cin, cW, rows, K, OC); }, be);
                        loop = time_ms(iters, [&] {
                            for (const GroupBlock& bl : blocks)
                                if (bl.rows)
                                    g.bwd(dinp + (size_t)bl.row0 * K, dW + (size_t)bl.expert * OC * K,
                                          (const char*)cdout + (size_t)bl.row0 * OC * g.es(),
                                          (const char*)cin + (size_t)bl.row0 * K * g.es(),
                                          (const char*)cW + (size_t)bl.expert * OC * K * g.es(), bl.rows, K, OC);
                        }, be);
                    }
                    auto tf = [&](double ms) { return f / (ms * 1e-3) / 1e12; };
                    std::printf("| %s | %s | %s | %s | %d x %d x %d | %.3f | %.1f | %.1f | %.1f | %.2f |\n", s.config,
                                routing, dir == 0 ? "c_fc" : "c_proj", pass == 0 ? "fwd" : "bwd", rows, K, OC, ours,
                                tf(ours), tf(one), tf(loop), one / ours);
                    std::fflush(stdout);
                }
                for (const void* q : {(const void*)inp, (const void*)W, (const void*)b, (const void*)out,
                                      (const void*)dout, (const void*)dinp, (const void*)dW, (const void*)db})
                    cudaFree((void*)q);
                if (g.bf16) for (const void* q : {cin, cW, cdout}) cudaFree((void*)q);
            }
        }
    }
}

void bench_permute(Backend& be, int iters) {
    std::printf("\n### Dispatch / combine (permute / unpermute), %d tokens, d_model %d, fp32 rows\n\n", kTokens, kC);
    std::printf("| config | op | bytes moved | ours ms | ours GB/s | cudaMemcpy D2D GB/s | ours / memcpy |\n");
    std::printf("|---|---|---:|---:|---:|---:|---:|\n");
    for (const Shape& s : kShapes) {
        gpu_test::PlanData p = gpu_test::make_plan(kTokens, s.E, s.k, "topk", 2);
        const int N = kTokens, A = p.A(), C = kC;
        float* x = dev_random((size_t)N * C, 1);
        float* xg = (float*)dev_alloc((size_t)A * C * 4);
        float* y = dev_random((size_t)A * C, 2);
        float* out = (float*)dev_alloc((size_t)N * C * 4);
        float* dy = (float*)dev_alloc((size_t)A * C * 4);
        float* dgate = (float*)dev_alloc((size_t)A * 4);
        int* token = dev_copy(p.token);
        int* tok_off = dev_copy(p.tok_offsets);
        int* tok_assign = dev_copy(p.tok_assign);
        float* gate = dev_copy(p.gate);
        const double row = (double)C * 4, AC = A * row, NC = N * row;
        // memcpy of the dispatched rows: A*C floats read + written
        const double mem_ms = time_ms(iters, [&] {
            check_cuda(cudaMemcpyAsync(xg, y, (size_t)A * C * 4, cudaMemcpyDeviceToDevice, 0), "cudaMemcpyAsync");
        }, be);
        const double mem_gbs = 2 * AC / (mem_ms * 1e-3) / 1e9;
        struct Op { const char* name; double bytes; std::function<void()> f; };
        const Op ops[] = {
            {"dispatch fwd (gather x -> rows)", 2 * AC, [&] { be.moe_dispatch_forward(xg, x, token, A, C); }},
            {"dispatch bwd (rows -> dx +=)", AC + 2 * NC,
             [&] { be.moe_dispatch_backward(out, xg, tok_off, tok_assign, N, C); }},
            {"combine fwd (gated sum -> out)", AC + NC,
             [&] { be.moe_combine_forward(out, y, gate, tok_off, tok_assign, N, C); }},
            {"combine bwd (dy, dgate)", 3 * AC, [&] { be.moe_combine_backward(dy, dgate, out, y, gate, token, A, C); }},
        };
        for (const Op& op : ops) {
            const double ms = time_ms(iters, op.f, be);
            const double gbs = op.bytes / (ms * 1e-3) / 1e9;
            std::printf("| %s | %s | %.0f MB | %.3f | %.0f | %.0f | %.2f |\n", s.config, op.name, op.bytes / 1e6, ms, gbs,
                        mem_gbs, gbs / mem_gbs);
            std::fflush(stdout);
        }
        for (void* q : {(void*)x, (void*)xg, (void*)y, (void*)out, (void*)dy, (void*)dgate, (void*)token,
                        (void*)tok_off, (void*)tok_assign, (void*)gate})
            cudaFree(q);
    }
}

}  // namespace

int main(int argc, char** argv) {
    std::string dtype = "fp32";
    int iters = 20;
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        if (a == "--probe") {
            int n = 0;
            if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
                std::printf("no CUDA GPU visible\n");
                return 3;
            }
            cudaDeviceProp prop;
            check_cuda(cudaGetDeviceProperties(&prop, 0), "cudaGetDeviceProperties");
            std::printf("%s\n", prop.name);
            return 0;
        } else if (a == "--dtype" && i + 1 < argc) {
            dtype = argv[++i];
        } else if (a == "--iters" && i + 1 < argc) {
            iters = std::atoi(argv[++i]);
        } else {
            std::fprintf(stderr, "usage: bench_kernels [--dtype fp32|bf16] [--iters N] [--probe]\n");
            return 2;
        }
    }
    if (dtype != "fp32" && dtype != "bf16") {
        std::fprintf(stderr, "error: --dtype must be fp32 or bf16, got %s (--dtype)\n", dtype.c_str());
        return 2;
    }
    if (iters < 1) iters = 1;
    std::unique_ptr<Backend> be;
    try {
        be = gpu_test::gpu_backend(dtype);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    cublasHandle_t h;
    check_cublas(cublasCreate(&h), "cublasCreate");
    Gemm g{h, dtype == "bf16"};
    std::printf("backend: %s, dtype %s, %d timed calls per measurement (median of 5)\n", be->name().c_str(),
                dtype.c_str(), iters);
    bench_grouped(*be, g, iters);
    if (dtype == "fp32") bench_permute(*be, iters);
    cublasDestroy(h);
    return 0;
}
