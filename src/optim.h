/* AdamW with fp32 state, warmup + cosine learning rate, global-norm gradient clipping.
   Same math as torch.optim.AdamW + clip_grad_norm_ (the oracle checks it step by step). */
#pragma once
#include "config.h"
#include "model.h"

namespace moe {

// Learning rate for 0-based step s: linear warmup to lr over `warmup` steps, then cosine
// decay to min_lr at step `steps`.
double lr_at(const TrainConfig& tc, int s);

class AdamW {
public:
    AdamW(GPT& model, const TrainConfig& tc);
    ~AdamW();
    AdamW(const AdamW&) = delete;
    AdamW& operator=(const AdamW&) = delete;
    // The global gradient norm (all ranks), as clipping sees it.
    float grad_norm() const;
    // Clips the model's gradients to tc.grad_clip (if > 0) given their norm, applies one update
    // with lr and leaves the gradients zero: the next backward accumulates into them without a
    // zero_grad() (callers may still call it; it is then a pass over zeros).
    void step(float lr, float norm);
    // step(lr, grad_norm()); returns the norm
    float step(float lr) { const float norm = grad_norm(); step(lr, norm); return norm; }
    int t() const { return t_; }
    // host copies of the state, for training-state checkpoints
    std::vector<float> get_m() const, get_v() const;
    void set_state(const std::vector<float>& m, const std::vector<float>& v, int t);
private:
    GPT& model_;
    TrainConfig tc_;
    float* m_ = nullptr;  // (num_params)
    float* v_ = nullptr;  // (num_params)
    int t_ = 0;
};

}  // namespace moe
