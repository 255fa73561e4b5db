/* The CUDA backend: the Backend op table (src/backend.h) on one GPU with the handwritten kernels
   of cuda/ (one .cu file per op family), all queued on one stream. Memory is cudaMalloc'ed
   (zero-filled); upload is an async copy from pageable host memory (the driver stages it before
   returning, so the caller may free its buffer), download waits for the stream. train.dtype bf16
   runs the GEMMs and attention (head sizes 32, 64, 128) on tensor cores with bf16 operands (fp32
   accumulate, fp32 in memory); every other op is fp32 either way. Nothing here uses float atomics: a run is bit-reproducible on the
   same GPU. */
#include "kernels.cuh"
#include "common.h"
#include "device.h"

#include <cmath>
#include <vector>

namespace moe {
namespace cuda {

struct CudaBackend final : Backend {
    int device_;
    bool bf16_;
    cudaStream_t stream_ = nullptr;
    DeviceScratch table_, columns_, buckets_, sums_, route_plan_, route_bal_, route_bwd_;

    CudaBackend(int device, bool bf16) : device_(device), bf16_(bf16) {
        cudaCheck(cudaSetDevice(device));
        cudaCheck(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    }
    ~CudaBackend() override {
        cudaStreamSynchronize(stream_);
        table_.release();
        columns_.release();
        buckets_.release();
        sums_.release();
        route_plan_.release();
        route_bal_.release();
        route_bwd_.release();
        cudaStreamDestroy(stream_);
    }
    std::string name() const override { return "cuda"; }
    // device memory and the stream, for the NCCL transport of Dist
    bool device_memory() const override { return true; }
    void* stream() const override { return (void*)stream_; }

    void* alloc_bytes(size_t nbytes) override {
        void* p = nullptr;
        const size_t n = nbytes ? (nbytes + 255) / 256 * 256 : 256;
        cudaCheck(cudaMalloc(&p, n));
        cudaCheck(cudaMemsetAsync(p, 0, n, stream_));
        cudaCheck(cudaStreamSynchronize(stream_));
        return p;
    }
    void free_bytes(void* p) override {
        if (!p) return;
        cudaCheck(cudaStreamSynchronize(stream_));
        cudaCheck(cudaFree(p));
    }
    void zero(void* p, size_t nbytes) override {
        if (nbytes) cudaCheck(cudaMemsetAsync(p, 0, nbytes, stream_));
    }
    void upload(void* dst, const void* src, size_t nbytes) override {
        if (nbytes) cudaCheck(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyHostToDevice, stream_));
    }
    void download(void* dst, const void* src, size_t nbytes) override {
        if (nbytes) cudaCheck(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToHost, stream_));
        cudaCheck(cudaStreamSynchronize(stream_));
    }
    void copy(void* dst, const void* src, size_t nbytes) override {   // regions must not overlap
        if (nbytes && dst != src) cudaCheck(cudaMemcpyAsync(dst, src, nbytes, cudaMemcpyDeviceToDevice, stream_));
    }
    void synchronize() override { cudaCheck(cudaStreamSynchronize(stream_)); }
    size_t attention_buffer_floats(int B, int T, int NH) const override { return (size_t)B * NH * T; }

    float* column_scratch(size_t floats) { return (float*)columns_.ensure(floats * sizeof(float)); }

    void encoder_forward(float* out, const int* inp, const float* wte, const float* wpe, int B, int T, int C) override {
        cuda::encoder_forward(out, inp, wte, wpe, B, T, C, stream_);
    }
    // dwte without atomics: positions bucketed by token on the host (counting sort, stable in
    // b*T + t order), then one thread per (token, channel) adds them in that order
    void encoder_backward(float* dwte, float* dwpe, const float* dout, const int* inp, int B, int T, int C) override {
        const int N = B * T;
        if (N <= 0) return;
        std::vector<int> tokens(N);
        download(tokens.data(), inp, (size_t)N * sizeof(int));
        int V = 0;
        for (int t : tokens) V = std::max(V, t + 1);
        std::vector<int> count(V + 1, 0);
        for (int t : tokens) count[t + 1]++;
        for (int v = 0; v < V; v++) count[v + 1] += count[v];            // count[v] = first slot of token v
        std::vector<int> positions(N), bucket_token, bucket_offsets;
        std::vector<int> next(count.begin(), count.end() - 1);
        for (int i = 0; i < N; i++) positions[next[tokens[i]]++] = i;
        for (int v = 0; v < V; v++)
            if (count[v + 1] > count[v]) { bucket_token.push_back(v); bucket_offsets.push_back(count[v]); }
        bucket_offsets.push_back(N);
        const int nb = (int)bucket_token.size();
        std::vector<int> blob(bucket_token);
        blob.insert(blob.end(), bucket_offsets.begin(), bucket_offsets.end());
        blob.insert(blob.end(), positions.begin(), positions.end());
        int* d = (int*)buckets_.ensure(blob.size() * sizeof(int));
        upload(d, blob.data(), blob.size() * sizeof(int));
        cuda::encoder_backward(dwte, dwpe, dout, d, d + nb, d + 2 * nb + 1, nb, B, T, C, stream_);
    }
    void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w, const float* b,
                           int N, int C) override {
        cuda::layernorm_forward(out, mean, rstd, inp, w, b, N, C, stream_);
    }
    void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                            const float* mean, const float* rstd, int N, int C) override {
        float* scratch = dw || db ? column_scratch(cuda::layernorm_backward_scratch(N, C)) : nullptr;
        cuda::layernorm_backward(dinp, dw, db, scratch, dout, inp, w, mean, rstd, N, C, stream_);
    }
    void matmul_forward(float* out, const float* inp, const float* w, const float* b, int N, int C, int OC) override {
        cuda::matmul_forward(out, inp, w, b, N, C, OC, bf16_, stream_);
    }
    void matmul_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp, const float* w,
                         int N, int C, int OC) override {
        float* scratch = db ? column_scratch(cuda::matmul_backward_scratch(N, OC)) : nullptr;
        cuda::matmul_backward(dinp, dw, db, scratch, dout, inp, w, N, C, OC, bf16_, stream_);
    }
    // flash attention: `att` holds the log-sum-exp (B, NH, T) of each row, `datt` the backward's
    // delta (B, NH, T); preatt and dpreatt are not used (attention_buffer_floats)
    void attention_forward(float* out, float* preatt, float* att, const float* qkv, int B, int T, int C, int NH) override {
        check_heads(C, NH);
        cuda::attention_forward(out, att, qkv, B, T, C, NH, bf16_, stream_);
    }
    void attention_backward(float* dqkv, float* dpreatt, float* datt, const float* dout, const float* qkv,
                            const float* att, int B, int T, int C, int NH) override {
        if (!dqkv) return;
        check_heads(C, NH);
        cuda::attention_backward(dqkv, datt, dout, qkv, att, B, T, C, NH, bf16_, stream_);
    }
    static void check_heads(int C, int NH) {
        if (NH <= 0 || C % NH != 0 || C / NH > cuda::kAttentionMaxHeadSize)
            fail("the CUDA attention kernel needs a head size d_model / n_head of at most {}, got {} / {} "
                 "(model.d_model, model.n_head)", cuda::kAttentionMaxHeadSize, C, NH);
    }
    void gelu_forward(float* out, const float* inp, size_t N) override { cuda::gelu_forward(out, inp, N, stream_); }
    void gelu_backward(float* dinp, const float* inp, const float* dout, size_t N) override {
        if (dinp) cuda::gelu_backward(dinp, inp, dout, N, stream_);
    }
    void residual_forward(float* out, const float* a, const float* b, size_t N) override {
        cuda::residual_forward(out, a, b, N, stream_);
    }
    void crossentropy_softmax_forward(float* losses, float* probs, const float* logits, const int* targets, int N,
                                      int V) override {
        cuda::crossentropy_softmax_forward(losses, probs, logits, targets, N, V, stream_);
    }
    void crossentropy_softmax_backward(float* dlogits, const float* probs, const int* targets, float dloss, int N,
                                       int V) override {
        cuda::crossentropy_softmax_backward(dlogits, probs, targets, dloss, N, V, stream_);
    }

    void moe_dispatch_forward(float* out, const float* x, const int* token, int A, int C) override {
        cuda::moe_dispatch_forward(out, x, token, A, C, stream_);
    }
    void moe_dispatch_backward(float* dx, const float* dout, const int* tok_offsets, const int* tok_assign, int N,
                               int C) override {
        cuda::moe_dispatch_backward(dx, dout, tok_offsets, tok_assign, N, C, stream_);
    }
    void moe_combine_forward(float* out, const float* y, const float* gate, const int* tok_offsets,
                             const int* tok_assign, int N, int C) override {
        cuda::moe_combine_forward(out, y, gate, tok_offsets, tok_assign, N, C, stream_);
    }
    void moe_combine_backward(float* dy, float* dgate, const float* dout, const float* y, const float* gate,
                              const int* token, int A, int C) override {
        cuda::moe_combine_backward(dy, dgate, dout, y, gate, token, A, C, stream_);
    }
    void swiglu_forward(float* out, const float* inp, size_t N, int F) override {
        cuda::swiglu_forward(out, inp, N, F, stream_);
    }
    void swiglu_backward(float* dinp, const float* inp, const float* dout, size_t N, int F) override {
        cuda::swiglu_backward(dinp, inp, dout, N, F, stream_);
    }
    void mul_accumulate(float* out, const float* a, const float* b, size_t n) override {
        cuda::mul_accumulate(out, a, b, n, stream_);
    }
    void grouped_matmul_forward(float* out, const float* inp, const float* w, const float* b, const GroupBlock* blocks,
                                int nblocks, int C, int OC) override {
        cuda::grouped_matmul_forward(out, inp, w, b, blocks, nblocks, C, OC, bf16_, table_, stream_);
    }
    void grouped_matmul_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                                 const float* w, const GroupBlock* blocks, int nblocks, int C, int OC) override {
        cuda::grouped_matmul_backward(dinp, dw, db, dout, inp, w, blocks, nblocks, C, OC, bf16_, table_, stream_);
    }

    void router_topk_forward(float* s, int* choice_expert, float* choice_gate, const float* z, const float* bias,
                             const TopkRouterArgs& a) override {
        check_router(a);
        cuda::router_topk_forward(s, choice_expert, choice_gate, z, bias, a, stream_);
    }
    void router_plan_build(int* offsets, int* routed, int* token, float* gate, int* choice, int* tok_offsets,
                           int* tok_assign, const int* choice_expert, const float* choice_gate,
                           const TopkRouterArgs& a) override {
        check_router(a);
        void* scratch = route_plan_.ensure(cuda::router_plan_scratch_bytes(a.N, a.E, a.k));
        cuda::router_plan_build(offsets, routed, token, gate, choice, tok_offsets, tok_assign, scratch, choice_expert,
                                choice_gate, a, stream_);
    }
    // the balancing scratch holds f and P of the forward; the last 4 doubles take the results
    double* router_balance_scratch(const TopkRouterArgs& a, const RouterLossArgs& l) {
        return (double*)route_bal_.ensure(cuda::router_balance_scratch_doubles(a, l) * sizeof(double));
    }
    RouterLosses router_balance_forward(const float* z, const float* s, const int* choice_expert,
                                        const float* choice_gate, const TopkRouterArgs& a,
                                        const RouterLossArgs& l) override {
        check_router(a);
        double* scratch = router_balance_scratch(a, l);
        double* out = scratch + cuda::router_balance_scratch_doubles(a, l) - 4;
        cuda::router_balance_forward(out, scratch, z, s, choice_expert, choice_gate, a, l, stream_);
        double h[3];
        download(h, out, sizeof(h));
        RouterLosses r;
        r.aux = h[0];
        r.z_sum = h[1];
        r.z = l.z_loss > 0 && a.N > 0 ? l.z_loss * h[1] / a.N : 0.0;
        r.top1_gate_sum = h[2];
        return r;
    }
    void router_topk_backward(float* dz, const float* dgate, const int* choice, int A, const float* z, const float* s,
                              const int* choice_expert, const TopkRouterArgs& a, const RouterLossArgs& l,
                              float dloss_scale) override {
        check_router(a);
        float* scratch = (float*)route_bwd_.ensure(cuda::router_backward_scratch_floats(a, l) * sizeof(float));
        cuda::router_topk_backward(dz, scratch, router_balance_scratch(a, l), dgate, choice, A, z, s, choice_expert, a,
                                   l, dloss_scale, stream_);
    }
    static void check_router(const TopkRouterArgs& a) {
        if (a.E > cuda::kRouterMaxE || a.k > cuda::kRouterMaxK || a.k > a.E || a.groups < 1 || a.E % a.groups != 0)
            fail("the CUDA router kernels take at most {} experts and top_k {}, got {} and {} "
                 "(model.moe.experts, model.moe.top_k)", cuda::kRouterMaxE, cuda::kRouterMaxK, a.E, a.k);
    }

    double sum_squares(const float* g, size_t n) override {
        double* partial = (double*)sums_.ensure((cuda::kSumSquaresBlocks + 1) * sizeof(double));
        cuda::sum_squares(partial, g, n, stream_);
        double total = 0.0;
        download(&total, partial + cuda::kSumSquaresBlocks, sizeof(double));
        return total;
    }
    void scale(float* x, float s, size_t n) override { cuda::scale(x, s, n, stream_); }
    void adamw_update(float* p, float* g, float* m, float* v, size_t n, float lr, float beta1, float beta2,
                      float eps, float wd, int t, float grad_scale) override {
        // the bias corrections exactly as ops_cpu.cpp adamw_update computes them
        const float bc1 = 1.0f - std::pow(beta1, (float)t), bc2 = 1.0f - std::pow(beta2, (float)t);
        cuda::adamw_update(p, g, m, v, n, lr, beta1, beta2, bc1, bc2, eps, wd, grad_scale, stream_);
    }
};

}  // namespace cuda

std::unique_ptr<Backend> make_cuda_backend(int device, bool bf16) {
    const int n = cuda_device_count();
    if (device < 0 || device >= n)
        fail("CUDA device {} does not exist ({} GPU(s) visible)", device, n);
    return std::make_unique<cuda::CudaBackend>(device, bf16);
}

}  // namespace moe
