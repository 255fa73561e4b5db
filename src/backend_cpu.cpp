/* The CPU backend: host memory and the ops of ops_cpu.cpp / ops_moe_cpu.cpp behind the Backend
   table. Every op gives the same bits for any thread count (resume depends on it). */
#include "backend.h"
#include "ops_cpu.h"
#include "ops_moe_cpu.h"
#include "router_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>
#include <omp.h>

namespace moe {

namespace {

struct CpuBackend final : Backend {
    explicit CpuBackend(int threads) { if (threads > 0) omp_set_num_threads(threads); }
    std::string name() const override { return "cpu"; }

    void* alloc_bytes(size_t nbytes) override {
        size_t padded = (nbytes + 63) / 64 * 64;
        void* p = std::aligned_alloc(64, padded ? padded : 64);
        if (!p) throw std::bad_alloc();
        std::memset(p, 0, padded);
        return p;
    }
    void free_bytes(void* p) override { std::free(p); }
    void zero(void* p, size_t nbytes) override {
        // big buffers (the gradients: every step) in parallel chunks; one thread's memset does
        // not reach the memory bandwidth
        const size_t chunk = (size_t)1 << 20;
        if (nbytes < 4 * chunk) { std::memset(p, 0, nbytes); return; }
        const size_t nchunks = (nbytes + chunk - 1) / chunk;
        #pragma omp parallel for schedule(static)
        for (size_t c = 0; c < nchunks; c++)
            std::memset((char*)p + c * chunk, 0, std::min(chunk, nbytes - c * chunk));
    }
    void upload(void* dst, const void* src, size_t nbytes) override { std::memcpy(dst, src, nbytes); }
    void download(void* dst, const void* src, size_t nbytes) override { std::memcpy(dst, src, nbytes); }
    void copy(void* dst, const void* src, size_t nbytes) override { std::memmove(dst, src, nbytes); }

    void encoder_forward(float* out, const int* inp, const float* wte, const float* wpe, int B, int T, int C) override {
        moe::encoder_forward(out, inp, wte, wpe, B, T, C);
    }
    void encoder_backward(float* dwte, float* dwpe, const float* dout, const int* inp, int B, int T, int C) override {
        moe::encoder_backward(dwte, dwpe, dout, inp, B, T, C);
    }
    void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b,
                           int N, int C) override {
        moe::layernorm_forward(out, mean, rstd, inp, w, b, N, C);
    }
    void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                            const float* mean, const float* rstd, int N, int C) override {
        moe::layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, N, C);
    }
    void matmul_forward(float* out, const float* inp, const float* w, const float* b, int N, int C, int OC) override {
        moe::matmul_forward(out, inp, w, b, N, C, OC);
    }
    void matmul_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                         int N, int C, int OC) override {
        moe::matmul_backward(dinp, dw, db, dout, inp, w, N, C, OC);
    }
    void attention_forward(float* out, float* preatt, float* att, const float* qkv, int B, int T, int C, int NH) override {
        moe::attention_forward(out, preatt, att, qkv, B, T, C, NH);
    }
    void attention_backward(float* dqkv, float* dpreatt, float* datt, const float* dout, const float* qkv,
                            const float* att, int B, int T, int C, int NH) override {
        moe::attention_backward(dqkv, dpreatt, datt, dout, qkv, att, B, T, C, NH);
    }
    void gelu_forward(float* out, const float* inp, size_t N) override { moe::gelu_forward(out, inp, N); }
    void gelu_backward(float* dinp, const float* inp, const float* dout, size_t N) override {
        moe::gelu_backward(dinp, inp, dout, N);
    }
    void residual_forward(float* out, const float* a, const float* b, size_t N) override {
        moe::residual_forward(out, a, b, N);
    }
    void crossentropy_softmax_forward(float* losses, float* probs, const float* logits, const int* targets,
                                      int N, int V) override {
        moe::crossentropy_softmax_forward(losses, probs, logits, targets, N, V);
    }
    void crossentropy_softmax_backward(float* dlogits, const float* probs, const int* targets, float dloss,
                                       int N, int V) override {
        moe::crossentropy_softmax_backward(dlogits, probs, targets, dloss, N, V);
    }

    void moe_dispatch_forward(float* out, const float* x, const int* token, int A, int C) override {
        moe::moe_dispatch_forward(out, x, token, A, C);
    }
    void moe_dispatch_backward(float* dx, const float* dout, const int* tok_offsets, const int* tok_assign,
                               int N, int C) override {
        moe::moe_dispatch_backward(dx, dout, tok_offsets, tok_assign, N, C);
    }
    void moe_combine_forward(float* out, const float* y, const float* gate, const int* tok_offsets,
                             const int* tok_assign, int N, int C) override {
        moe::moe_combine_forward(out, y, gate, tok_offsets, tok_assign, N, C);
    }
    void moe_combine_backward(float* dy, float* dgate, const float* dout, const float* y, const float* gate,
                              const int* token, int A, int C) override {
        moe::moe_combine_backward(dy, dgate, dout, y, gate, token, A, C);
    }
    void swiglu_forward(float* out, const float* inp, size_t N, int F) override { moe::swiglu_forward(out, inp, N, F); }
    void swiglu_backward(float* dinp, const float* inp, const float* dout, size_t N, int F) override {
        moe::swiglu_backward(dinp, inp, dout, N, F);
    }
    void mul_accumulate(float* out, const float* a, const float* b, size_t n) override {
        moe::mul_accumulate(out, a, b, n);
    }

    void grouped_matmul_forward(float* out, const float* inp, const float* w, const float* b, const GroupBlock* blocks,
                                int nblocks, int C, int OC) override {
        moe::grouped_matmul_forward(out, inp, w, b, blocks, nblocks, C, OC);
    }
    void grouped_matmul_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                                 const float* w, const GroupBlock* blocks, int nblocks, int C, int OC) override {
        moe::grouped_matmul_backward(dinp, dw, db, dout, inp, w, blocks, nblocks, C, OC);
    }

    void router_topk_forward(float* s, int* choice_expert, float* choice_gate, const float* z, const float* bias,
                             const TopkRouterArgs& a) override {
        router_topk_forward_cpu(s, choice_expert, choice_gate, z, bias, a);
    }
    void router_plan_build(int* offsets, int* routed, int* token, float* gate, int* choice, int* tok_offsets,
                           int* tok_assign, const int* choice_expert, const float* choice_gate,
                           const TopkRouterArgs& a) override {
        router_plan_build_cpu(offsets, routed, token, gate, choice, tok_offsets, tok_assign, choice_expert,
                              choice_gate, a);
    }
    RouterLosses router_balance_forward(const float* z, const float* s, const int* choice_expert,
                                        const float* choice_gate, const TopkRouterArgs& a,
                                        const RouterLossArgs& l) override {
        return router_balance_forward_cpu(z, s, choice_expert, choice_gate, a, l);
    }
    void router_topk_backward(float* dz, const float* dgate, const int* choice, int A, const float* z, const float* s,
                              const int* choice_expert, const TopkRouterArgs& a, const RouterLossArgs& l,
                              float dloss_scale) override {
        router_topk_backward_cpu(dz, dgate, choice, A, z, s, choice_expert, a, l, dloss_scale);
    }

    double sum_squares(const float* g, size_t n) override { return moe::sum_squares(g, n); }
    void scale(float* x, float s, size_t n) override {
        #pragma omp parallel for simd schedule(static)
        for (size_t i = 0; i < n; i++) x[i] *= s;
    }
    void adamw_update(float* p, float* g, float* m, float* v, size_t n, float lr, float beta1, float beta2,
                      float eps, float wd, int t, float grad_scale) override {
        moe::adamw_update(p, g, m, v, n, lr, beta1, beta2, eps, wd, t, grad_scale);
    }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads) { return std::make_unique<CpuBackend>(threads); }

}  // namespace moe
