/* AdamW, learning-rate schedule and gradient clipping; see optim.h. */
#include "optim.h"
#include "common.h"
#include "dist.h"

#include <algorithm>
#include <cmath>

namespace moe {

double lr_at(const TrainConfig& tc, int s) {
    if (s < tc.warmup) return tc.lr * (s + 1) / tc.warmup;
    double ratio = double(s - tc.warmup) / std::max(1, tc.steps - tc.warmup);
    ratio = std::clamp(ratio, 0.0, 1.0);
    return tc.min_lr + 0.5 * (1.0 + std::cos(M_PI * ratio)) * (tc.lr - tc.min_lr);
}

AdamW::AdamW(GPT& model, const TrainConfig& tc) : model_(model), tc_(tc) {
    m_ = model.backend().alloc(model.num_params());
    v_ = model.backend().alloc(model.num_params());
}

AdamW::~AdamW() {
    model_.backend().free_bytes(m_);
    model_.backend().free_bytes(v_);
}

float AdamW::grad_norm() const {
    Backend& be = model_.backend();
    // replicated tensors are identical on every rank; each owned expert slice lives on one rank
    // of the EP group, so its squares are summed over the group
    double replicated = 0.0, sharded = 0.0;
    for (const ParamTensor& p : model_.params()) {
        double s = be.sum_squares(model_.grads() + p.owned_offset, p.owned_numel);
        (p.sharded ? sharded : replicated) += s;
    }
    Dist::get().allreduce(&sharded, 1, Dist::EP);
    return (float)std::sqrt(replicated + sharded);
}

void AdamW::step(float lr, float norm) {
    Backend& be = model_.backend();
    // torch.nn.utils.clip_grad_norm_: coefficient clip/(norm+1e-6), never above 1; AdamW applies
    // it as it reads each gradient (the same float products as scaling the gradients first)
    float coef = 1.0f;
    if (tc_.grad_clip > 0) coef = std::min(1.0f, (float)(tc_.grad_clip / (norm + 1e-6)));
    t_++;
    for (const ParamTensor& p : model_.params()) {
        const size_t o = p.owned_offset;
        be.adamw_update(model_.weights() + o, model_.grads() + o, m_ + o, v_ + o, p.owned_numel, lr, (float)tc_.beta1, (float)tc_.beta2, 1e-8f,
                        p.decay ? (float)tc_.weight_decay : 0.0f, t_, coef);
    }
}

std::vector<float> AdamW::get_m() const {
    std::vector<float> h(model_.num_params());
    model_.backend().download(h.data(), m_, h.size() * sizeof(float));
    return h;
}
std::vector<float> AdamW::get_v() const {
    std::vector<float> h(model_.num_params());
    model_.backend().download(h.data(), v_, h.size() * sizeof(float));
    return h;
}
void AdamW::set_state(const std::vector<float>& m, const std::vector<float>& v, int t) {
    size_t n = model_.num_params();
    if (m.size() != n || v.size() != n) fail("optimizer state has {} values, model has {} parameters", m.size(), n);
    model_.backend().upload(m_, m.data(), n * sizeof(float));
    model_.backend().upload(v_, v.data(), n * sizeof(float));
    t_ = t;
}

}  // namespace moe
