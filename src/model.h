/* The GPT model: parameters as one flat buffer with named views (DESIGN.md's checkpoint names),
   forward to the mean next-token loss, backward into a flat gradient buffer. The graph is written
   once over the Backend interface; which backend runs it is the caller's choice. */
#pragma once
#include "backend.h"
#include "config.h"
#include "moe.h"

#include <memory>

#include <cstdint>
#include <string>
#include <vector>

namespace moe {

struct ParamTensor {
    std::string name;             // checkpoint name, e.g. "h.0.attn.c_attn.weight"
    std::vector<int64_t> shape;
    size_t offset = 0;            // into GPT::weights / grads (floats)
    size_t numel = 0;
    bool decay = false;           // AdamW weight decay: matrices (>= 2 dims, not biases)
    // expert parallel: routed-expert tensors (E, ...) are split along E; this rank computes,
    // reduces and updates only [owned_offset, owned_offset + owned_numel) of the flat buffer
    bool sharded = false;
    size_t owned_offset = 0, owned_numel = 0;
};

class GPT {
public:
    GPT(const Config& cfg, Backend& be);
    ~GPT();
    GPT(const GPT&) = delete;
    GPT& operator=(const GPT&) = delete;

    // GPT-2 init: N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)), biases 0, LN weights 1;
    // MoE tensors as docs/moe.md says (noise weight 0, random hash tables).
    void init_weights(uint64_t seed);
    // Training mode: router noise, training capacity, Sinkhorn, balancing terms (default on).
    void set_training(bool on) { training_ = on; }
    bool training() const { return training_; }

    // inputs/targets are host arrays (B, T) with B <= max_batch set by ensure_batch() and
    // T <= seq_len. Returns the mean cross-entropy over the B*T tokens (targets required).
    float forward(const int* inputs, const int* targets, int B, int T);
    // Accumulates gradients of (dloss_scale * mean loss) into grads(); call zero_grad() first
    // per optimizer step; several forward/backward pairs accumulate (gradient accumulation).
    void backward(float dloss_scale = 1.0f);
    void zero_grad();

    const ModelConfig& config() const { return cfg_.model; }
    const Config& full_config() const { return cfg_; }
    // MoE layers in layer order (empty for a dense model), their stats of the last forward.
    std::vector<MoeLayer*> moe_layers();
    // Balancing terms of the last forward summed over MoE layers (coefficients included).
    MoeStats balance_totals() const;
    // Non-trained tensors saved with the model (expert_bias F32, hash_table I32), host memory.
    struct Buffer { std::string name, dtype; std::vector<int64_t> shape; void* data; };
    std::vector<Buffer> buffers();
    Rng& rng() { return rng_; }
    const std::vector<ParamTensor>& params() const { return params_; }
    const ParamTensor& param(const std::string& name) const;
    size_t num_params() const { return num_params_; }
    float* weights() { return weights_; }   // backend memory, (num_params)
    float* grads() { return grads_; }       // backend memory, (num_params)
    const float* logits() const { return acts_.logits; }  // backend memory, (B, T, V) of the last forward
    Backend& backend() { return be_; }

    // Distributed runs: gradients summed over the ranks that share each tensor and divided by
    // the world size (replicated tensors over all ranks, owned expert slices over the DP group).
    void reduce_grads();
    // A host buffer laid out like the weights whose sharded tensors are valid only in the owned
    // slices becomes complete on every rank (other slices zeroed, summed over the EP group).
    void gather_sharded(std::vector<float>& host) const;

    // host copies (for checkpoints and tests)
    std::vector<float> get_weights() const;
    void set_weights(const std::vector<float>& w);
    std::vector<float> get_grads() const;

private:
    void add_param(const std::string& name, std::vector<int64_t> shape);
    void ensure_activations(int B, int T);
    void free_activations();
    float* w(size_t idx) { return weights_ + params_[idx].offset; }
    float* g(size_t idx) { return grads_ + params_[idx].offset; }

    Config cfg_;
    Backend& be_;
    bool training_ = true;
    Rng rng_;
    std::vector<std::unique_ptr<MoeLayer>> moe_;   // (n_layer), nullptr for dense layers
    std::vector<int> host_inputs_;                 // (B*T) token ids of the last forward
    std::vector<ParamTensor> params_;
    size_t num_params_ = 0;
    float* weights_ = nullptr;
    float* grads_ = nullptr;

    // indices into params_ per layer, so the graph reads as names rather than offsets
    struct LayerParams {
        size_t ln1w, ln1b, qkvw, qkvb, attprojw, attprojb, ln2w, ln2b, fcw, fcb, fcprojw, fcprojb;
    };
    size_t wte_, wpe_, lnfw_, lnfb_;
    std::vector<LayerParams> layers_;

    // activations of the last forward, sized for (B, T); N = B*T
    struct Activations {
        int B = 0, T = 0;
        float* encoded = nullptr;                  // (N, C)
        std::vector<float*> ln1, ln1_mean, ln1_rstd;   // (N, C), (N), (N) per layer
        std::vector<float*> qkv, atty, preatt, att;    // (N, 3C), (N, C), Backend::attention_buffer_floats x2
        std::vector<float*> residual2;                 // (N, C) after attention
        std::vector<float*> ln2, ln2_mean, ln2_rstd;
        std::vector<float*> fch, fch_gelu;             // (N, F) dense FFN hidden (dense layers)
        std::vector<float*> residual3;                 // (N, C) block output
        float* lnf = nullptr; float* lnf_mean = nullptr; float* lnf_rstd = nullptr;
        float* logits = nullptr;                   // (N, V)
        float* probs = nullptr;                    // (N, V)
        float* losses = nullptr;                   // (N)
        int* inputs = nullptr; int* targets = nullptr;  // (N) backend copies
        // backward scratch, shared by all layers
        float* dresidual = nullptr;                // (N, C)
        float* dln = nullptr;                      // (N, C)
        float* dproj_in = nullptr;                 // (N, max(F, C)) gradient into a projection's input
        float* dhidden = nullptr;                  // (N, max(F, 3C))
        float* dpreatt = nullptr; float* datt = nullptr;  // Backend::attention_buffer_floats each
        float* dlogits = nullptr;                  // (N, V)
    } acts_;
    std::vector<void*> act_allocs_;
    std::vector<float> host_losses_;
};

}  // namespace moe
