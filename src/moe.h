/* The MoE FFN layer (docs/moe.md is its exact contract): a router turns the layer input into
   an explicit dispatch plan (who goes to which expert with which gate, what is dropped), the
   experts run as one grouped FFN over the plan, combine adds their outputs back per token.
   Routing (moe_route.cpp) runs as Backend routing ops or as host code on (N, E) arrays
   (moe_router.cpp); expert compute goes through the Backend (moe_layer.cpp), so the same layer
   runs on either backend. */
#pragma once
#include "backend.h"
#include "common.h"
#include "config.h"

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace moe {

struct ParamTensor;

// Routing decisions for one micro-batch: the data dispatch/combine consume.
struct DispatchPlan {
    int N = 0, E = 0;
    std::vector<int> offsets;    // (E+1) kept assignments of expert e: [offsets[e], offsets[e+1])
    std::vector<int> token;      // (A) token of each kept assignment, grouped by expert, by token within
    std::vector<float> gate;     // (A) its gate weight
    std::vector<int> choice;     // (A) index of the router choice it came from (for gate gradients)
    std::vector<int> tok_offsets;  // (N+1) CSR by token: assignments of token n are
    std::vector<int> tok_assign;   //   tok_assign[tok_offsets[n] .. tok_offsets[n+1])  (A)
    int kept() const { return offsets.empty() ? 0 : offsets.back(); }   // A
};

// Everything the router decided and saved for backward, for one micro-batch.
struct Routing {
    int N = 0, E = 0, M = 0;          // M router choices (token choice: N*k, m = n*k + j)
    std::vector<float> z;             // (N, E) logits used for routing (noisy in training)
    std::vector<float> z_clean;       // (N, E) before noise
    std::vector<float> noise_std;     // (N, E) softplus(x W_noise^T), gaussian noise only
    std::vector<float> noise_pre;     // (N, E) x W_noise^T
    std::vector<float> eps;           // (N, E) the noise drawn (gaussian)
    std::vector<float> s;             // (N, E) scores
    std::vector<int> choice_token;    // (M)
    std::vector<int> choice_expert;   // (M)
    std::vector<float> choice_gate;   // (M) final gate (normalised, scaled)
    std::vector<uint8_t> kept;        // (M)
    std::vector<double> routed;       // (E) selected assignments before dropping
    DispatchPlan plan;
};

// Balancing terms of one micro-batch (coefficients included) and routing health numbers.
struct MoeStats {
    double aux = 0, z = 0, imp = 0, load = 0;
    std::vector<double> routed, kept;   // (E)
    double dropped = 0, assignments = 0;
    double top1_gate_sum = 0, z_mean_sum = 0;  // sums over tokens
    double tokens = 0;
    void add(const MoeStats& o);
};

class MoeLayer {
public:
    using AddParam = std::function<size_t(const std::string&, std::vector<int64_t>)>;
    // Registers this layer's trainable tensors through add_param (returns the index into params).
    MoeLayer(const Config& cfg, int layer, Backend& be, const std::vector<ParamTensor>& params,
             const AddParam& add_param);
    ~MoeLayer();
    MoeLayer(const MoeLayer&) = delete;
    MoeLayer& operator=(const MoeLayer&) = delete;

    // Initial values (docs/moe.md) into a host copy of the model's weights; random hash table.
    void init(float* host_weights, Rng& rng);

    // out (N, C) = MoE(x (N, C)); tokens (N) are the input ids on the host (hash routing).
    // Training: noise from rng, capacity_factor, Sinkhorn, balancing terms in the objective.
    void forward(float* out, const float* x, const int* tokens, int B, int T, bool training,
                 float* weights, Rng& rng);
    // dx += and parameter gradients += d(dloss_scale * (LM loss + balancing terms)).
    void backward(float* dx, const float* dout, float* weights, float* grads, float dloss_scale);

    const MoeStats& stats() const { return stats_; }
    // Everything the router decided, on the host. With routing ops (routes_with_ops) the layer
    // keeps it in backend memory and this reads it back (N*E floats) on first use after a forward.
    const Routing& routing() const;
    // Whether this configuration routes by Backend routing ops (on the GPU with CUDA) rather
    // than by host code (docs/cuda.md "Routing").
    static bool routes_with_ops(const Config& cfg);
    bool ops_routing() const { return ops_routing_; }
    int layer() const { return layer_; }
    int experts() const { return E_; }

    // Non-trained state saved with the model: aux-loss-free bias (E) and hash table (V).
    std::vector<float>& expert_bias() { return bias_; }
    std::vector<int32_t>& hash_table() { return table_; }
    bool has_bias() const { return bal_.bias_rate > 0; }
    bool has_hash() const { return rc_.type == "hash"; }

    // Aux-loss-free controller: routed counts accumulate over the training forwards of a step.
    void begin_step() { step_routed_.assign(E_, 0.0); }
    const std::vector<double>& step_routed() const { return step_routed_; }
    void update_bias(const std::vector<double>& routed);
    // Global aux scope: f from the whole step's counts (empty = this micro-batch's).
    void set_global_counts(const std::vector<double>& routed) { global_routed_ = routed; }
    void set_counting(bool on) { counting_ = on; }  // counting pre-pass: forwards not accumulated

    // Tests: the noise drawn by the last training forward, to feed the oracle.
    const std::vector<float>& last_eps() const { return r_.eps; }
    const std::vector<float>& last_jitter() const { return jitter_; }

private:
    struct Expert { size_t fc_w, fc_b, proj_w, proj_b; int count, ff; };
    void ensure_buffers(int N, int A_max);
    // routing (moe_route.cpp): by backend ops or on the host
    void route(const float* rin, const int* tokens, int B, int T, bool training, float* weights, Rng& rng);
    void route_ops(const float* rin, int B, int T, bool training, float* weights);
    void route_host(const float* rin, const int* tokens, int B, int T, bool training, float* weights, Rng& rng);
    void route_backward(float* dx, float* weights, float* grads, float dloss_scale);
    void route_backward_host(float dloss_scale);
    void count_plan(bool training);
    TopkRouterArgs topk_args(int N, bool training) const;
    RouterLossArgs loss_args(bool training) const;
    void soft_forward(float* out, const float* x, int B, int T, float* weights);
    void soft_backward(float* dx, const float* dout, float* weights, float* grads);
    // one expert FFN over `rows` rows: x (rows, C) -> y (rows, C), keeping h and act
    void ffn_forward(float* y, float* h, float* act, const float* x, int rows, const float* W1, const float* b1,
                     const float* W2, const float* b2, int F);
    void ffn_backward(float* dx, float* dW1, float* db1, float* dW2, float* db2, float* dh, float* dact,
                      const float* dy, const float* x, const float* h, const float* act, int rows,
                      const float* W1, const float* W2, int F);
    static std::vector<GroupBlock> plan_blocks(const std::vector<int>& offsets, int count);
    void grouped_forward(const Expert& ex, const std::vector<GroupBlock>& blocks, const float* x, float* h, float* act,
                         float* y, float* weights);
    void grouped_backward(const Expert& ex, const std::vector<GroupBlock>& blocks, float* dx, const float* dy,
                          const float* x, const float* h, const float* act, int total_rows, float* weights,
                          float* grads);
    void exchange_forward(float* weights);            // expert parallel: all-to-all around the experts
    void exchange_backward(float* weights, float* grads);
    void ensure_remote(int rows);
    float* P(float* base, size_t idx) const;

    RouterConfig rc_;
    BalanceConfig bal_;
    int layer_, C_, E_, k_, V_, seed_;
    bool swiglu_, ops_routing_;
    Backend& be_;
    const std::vector<ParamTensor>& params_;
    size_t p_router_ = SIZE_MAX, p_noise_ = SIZE_MAX, p_slots_ = SIZE_MAX;
    Expert routed_{}, shared_{};
    std::vector<float> bias_;
    std::vector<int32_t> table_;
    std::vector<double> step_routed_, global_routed_;
    bool counting_ = false, training_ = false;
    int B_ = 0, T_ = 0;
    mutable Routing r_;
    mutable bool host_stale_ = false;   // r_ has only N, E, M, routed, plan.offsets (routing ops)
    MoeStats stats_;
    std::vector<float> jitter_;
    const float* x_ = nullptr;      // the forward's input (model activation, alive until backward)
    const float* rin_ = nullptr;    // router input: x or the jittered copy

    // backend buffers sized for (N, A_max)
    int bufN_ = 0, bufA_ = 0;
    std::vector<void*> allocs_;
    float *xr_ = nullptr, *jit_ = nullptr, *z_ = nullptr, *pre_ = nullptr;   // (N,C) (N,C) (N,E) (N,E)
    float *xg_ = nullptr, *h_ = nullptr, *act_ = nullptr, *y_ = nullptr;     // (A, C) (A, Fh) (A, F) (A, C)
    float *gate_ = nullptr, *dgate_ = nullptr;                                // (A)
    int *token_ = nullptr, *tok_off_ = nullptr, *tok_assign_ = nullptr;       // (A) (N+1) (A)
    // routing ops: scores, choices, the plan's choice per assignment, offsets + routed counts
    float *s_dev_ = nullptr, *cgate_ = nullptr, *bias_dev_ = nullptr;         // (N, E) (M) (E)
    int *cexp_ = nullptr, *choice_dev_ = nullptr, *counts_dev_ = nullptr;     // (M) (A) (E+1 + E)
    float *sh_h_ = nullptr, *sh_act_ = nullptr, *sh_y_ = nullptr;            // (S, N, Fh) (S, N, F) (N, C)
    float *dy_ = nullptr, *dh_ = nullptr, *dact_ = nullptr, *dxg_ = nullptr;  // backward scratch
    float *dz_ = nullptr, *dpre_ = nullptr, *dxr_ = nullptr, *tmp_ = nullptr;
    // expert parallel: rows received from the EP group, their blocks and the exchange counts
    std::vector<int> send_rows_, recv_rows_;
    std::vector<GroupBlock> remote_blocks_;
    int remote_rows_ = 0, remote_cap_ = 0, scratch_rows_ = 0;
    std::vector<void*> remote_allocs_;
    float *rx_ = nullptr, *rh_ = nullptr, *ract_ = nullptr, *ry_ = nullptr, *rdy_ = nullptr, *rdx_ = nullptr;
    // Soft MoE host state, per micro-batch
    std::vector<float> soft_x_, soft_D_, soft_Cw_, soft_Ys_, soft_phi_;
};

}  // namespace moe
