/* GPT forward/backward over the Backend ops. Parameters live in one flat buffer (AdamW and
   checkpoints walk the named views); activations are kept for backward. Backward uses a single
   running residual gradient: every op accumulates into it, which is exactly the chain rule for
   x + f(LN(x)) blocks, so no per-layer gradient activations are needed. */
#include "model.h"
#include "common.h"
#include "dist.h"

#include <cmath>

namespace moe {

GPT::GPT(const Config& full, Backend& be) : cfg_(full), be_(be), rng_((uint64_t)full.train.seed ^ 0x5DEECE66Dull) {
    const ModelConfig& cfg = full.model;
    const int64_t V = cfg.vocab_size, T = cfg.seq_len, C = cfg.d_model, F = cfg.d_ff;
    auto add = [this](const std::string& name, std::vector<int64_t> shape) {
        add_param(name, std::move(shape));
        return params_.size() - 1;
    };
    moe_.resize(cfg.n_layer);
    wte_ = params_.size(); add_param("wte", {V, C});
    wpe_ = params_.size(); add_param("wpe", {T, C});
    for (int l = 0; l < cfg.n_layer; l++) {
        std::string p = "h." + std::to_string(l) + ".";
        LayerParams lp;
        lp.ln1w = params_.size(); add_param(p + "ln_1.weight", {C});
        lp.ln1b = params_.size(); add_param(p + "ln_1.bias", {C});
        lp.qkvw = params_.size(); add_param(p + "attn.c_attn.weight", {3 * C, C});
        lp.qkvb = params_.size(); add_param(p + "attn.c_attn.bias", {3 * C});
        lp.attprojw = params_.size(); add_param(p + "attn.c_proj.weight", {C, C});
        lp.attprojb = params_.size(); add_param(p + "attn.c_proj.bias", {C});
        lp.ln2w = params_.size(); add_param(p + "ln_2.weight", {C});
        lp.ln2b = params_.size(); add_param(p + "ln_2.bias", {C});
        if (cfg.is_moe_layer(l)) {
            moe_[l] = std::make_unique<MoeLayer>(full, l, be, params_, add);
            lp.fcw = lp.fcb = lp.fcprojw = lp.fcprojb = SIZE_MAX;
        } else {
            lp.fcw = add(p + "mlp.c_fc.weight", {F, C});
            lp.fcb = add(p + "mlp.c_fc.bias", {F});
            lp.fcprojw = add(p + "mlp.c_proj.weight", {C, F});
            lp.fcprojb = add(p + "mlp.c_proj.bias", {C});
        }
        layers_.push_back(lp);
    }
    lnfw_ = params_.size(); add_param("ln_f.weight", {C});
    lnfb_ = params_.size(); add_param("ln_f.bias", {C});
    const Dist& d = Dist::get();
    for (ParamTensor& p : params_) {
        p.owned_offset = p.offset;
        p.owned_numel = p.numel;
        if (d.ep > 1 && p.name.find(".moe.experts.") != std::string::npos) {
            const size_t per_expert = p.numel / p.shape[0], local = p.shape[0] / d.ep;
            p.sharded = true;
            p.owned_offset = p.offset + d.ep_rank * local * per_expert;
            p.owned_numel = local * per_expert;
        }
    }
    weights_ = be_.alloc(num_params_);
    grads_ = be_.alloc(num_params_);
}

GPT::~GPT() {
    free_activations();
    be_.free_bytes(weights_);
    be_.free_bytes(grads_);
}

void GPT::add_param(const std::string& name, std::vector<int64_t> shape) {
    ParamTensor p;
    p.name = name;
    p.shape = std::move(shape);
    p.numel = 1;
    for (int64_t d : p.shape) p.numel *= (size_t)d;
    p.offset = num_params_;
    // matrices decay; biases do not, also the stacked (E, F) expert biases
    p.decay = p.shape.size() >= 2 && !(name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0);
    num_params_ += p.numel;
    params_.push_back(std::move(p));
}

const ParamTensor& GPT::param(const std::string& name) const {
    for (const auto& p : params_) if (p.name == name) return p;
    fail("no parameter named {}", name);
}

void GPT::init_weights(uint64_t seed) {
    Rng rng(seed);
    std::vector<float> host(num_params_, 0.0f);
    const float std_resid = 0.02f / std::sqrt(2.0f * cfg_.model.n_layer);
    auto ends_with = [](const std::string& s, const std::string& suf) {
        return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
    };
    for (const auto& p : params_) {
        float* dst = host.data() + p.offset;
        bool is_ln_weight = p.name.find("ln_") != std::string::npos && ends_with(p.name, ".weight");
        bool is_zero = ends_with(p.name, ".bias") || ends_with(p.name, "noise_weight");
        bool is_resid_proj = ends_with(p.name, "c_proj.weight");
        for (size_t i = 0; i < p.numel; i++) {
            if (is_ln_weight) dst[i] = 1.0f;
            else if (is_zero) dst[i] = 0.0f;
            else dst[i] = rng.normal() * (is_resid_proj ? std_resid : 0.02f);
        }
    }
    for (auto& m : moe_) if (m) m->init(host.data(), rng);
    set_weights(host);
}

std::vector<float> GPT::get_weights() const {
    std::vector<float> h(num_params_);
    be_.download(h.data(), weights_, num_params_ * sizeof(float));
    return h;
}
void GPT::set_weights(const std::vector<float>& h) {
    if (h.size() != num_params_) fail("weights: expected {} floats, got {}", num_params_, h.size());
    be_.upload(weights_, h.data(), num_params_ * sizeof(float));
}
std::vector<float> GPT::get_grads() const {
    std::vector<float> h(num_params_);
    be_.download(h.data(), grads_, num_params_ * sizeof(float));
    return h;
}
void GPT::zero_grad() { be_.zero(grads_, num_params_ * sizeof(float)); }

void GPT::free_activations() {
    for (void* p : act_allocs_) be_.free_bytes(p);
    act_allocs_.clear();
    acts_ = Activations{};
}

void GPT::ensure_activations(int B, int T) {
    if (acts_.B == B && acts_.T == T) return;
    free_activations();
    const size_t N = (size_t)B * T, C = cfg_.model.d_model, F = cfg_.model.d_ff, V = cfg_.model.vocab_size;
    const size_t NH = cfg_.model.n_head, L = cfg_.model.n_layer, att = be_.attention_buffer_floats(B, T, (int)NH);
    auto f = [&](size_t n) { float* p = be_.alloc(n); act_allocs_.push_back(p); return p; };
    auto per_layer = [&](std::vector<float*>& v, size_t n) { v.clear(); for (size_t l = 0; l < L; l++) v.push_back(f(n)); };
    Activations& a = acts_;
    a.B = B; a.T = T;
    a.encoded = f(N * C);
    per_layer(a.ln1, N * C); per_layer(a.ln1_mean, N); per_layer(a.ln1_rstd, N);
    per_layer(a.qkv, N * 3 * C); per_layer(a.atty, N * C); per_layer(a.preatt, att); per_layer(a.att, att);
    per_layer(a.residual2, N * C);
    per_layer(a.ln2, N * C); per_layer(a.ln2_mean, N); per_layer(a.ln2_rstd, N);
    a.fch.assign(L, nullptr); a.fch_gelu.assign(L, nullptr);
    for (size_t l = 0; l < L; l++)
        if (!moe_[l]) { a.fch[l] = f(N * F); a.fch_gelu[l] = f(N * F); }
    per_layer(a.residual3, N * C);
    a.lnf = f(N * C); a.lnf_mean = f(N); a.lnf_rstd = f(N);
    a.logits = f(N * V); a.probs = f(N * V); a.losses = f(N);
    a.inputs = be_.alloc_int(N); act_allocs_.push_back(a.inputs);
    a.targets = be_.alloc_int(N); act_allocs_.push_back(a.targets);
    a.dresidual = f(N * C); a.dln = f(N * C);
    a.dproj_in = f(N * std::max(F, C)); a.dhidden = f(N * std::max(F, 3 * C));
    a.dpreatt = f(att); a.datt = f(att);
    a.dlogits = f(N * V);
    host_losses_.assign(N, 0.0f);
}

float GPT::forward(const int* inputs, const int* targets, int B, int T) {
    const ModelConfig& mc = cfg_.model;
    if (T > mc.seq_len) fail("sequence length {} exceeds model.seq_len {}", T, mc.seq_len);
    const int C = mc.d_model, F = mc.d_ff, V = mc.vocab_size, NH = mc.n_head, N = B * T;
    for (int i = 0; i < N; i++) {
        if (inputs[i] < 0 || inputs[i] >= V || targets[i] < 0 || targets[i] >= V)
            fail("token id {} out of range for vocab_size {}", inputs[i] < 0 || inputs[i] >= V ? inputs[i] : targets[i], V);
    }
    ensure_activations(B, T);
    Activations& a = acts_;
    be_.upload(a.inputs, inputs, (size_t)N * sizeof(int));
    be_.upload(a.targets, targets, (size_t)N * sizeof(int));
    host_inputs_.assign(inputs, inputs + N);

    be_.encoder_forward(a.encoded, a.inputs, w(wte_), w(wpe_), B, T, C);  // (N, C)
    const float* residual = a.encoded;
    for (int l = 0; l < mc.n_layer; l++) {
        const LayerParams& p = layers_[l];
        be_.layernorm_forward(a.ln1[l], a.ln1_mean[l], a.ln1_rstd[l], residual, w(p.ln1w), w(p.ln1b), N, C);
        be_.matmul_forward(a.qkv[l], a.ln1[l], w(p.qkvw), w(p.qkvb), N, C, 3 * C);          // (N, 3C)
        be_.attention_forward(a.atty[l], a.preatt[l], a.att[l], a.qkv[l], B, T, C, NH);     // (N, C)
        be_.matmul_forward(a.residual2[l], a.atty[l], w(p.attprojw), w(p.attprojb), N, C, C);
        be_.residual_forward(a.residual2[l], a.residual2[l], residual, (size_t)N * C);      // x + attn
        be_.layernorm_forward(a.ln2[l], a.ln2_mean[l], a.ln2_rstd[l], a.residual2[l], w(p.ln2w), w(p.ln2b), N, C);
        if (moe_[l]) {
            moe_[l]->forward(a.residual3[l], a.ln2[l], host_inputs_.data(), B, T, training_, weights_, rng_);
        } else {
            be_.matmul_forward(a.fch[l], a.ln2[l], w(p.fcw), w(p.fcb), N, C, F);            // (N, F)
            be_.gelu_forward(a.fch_gelu[l], a.fch[l], (size_t)N * F);
            be_.matmul_forward(a.residual3[l], a.fch_gelu[l], w(p.fcprojw), w(p.fcprojb), N, F, C);
        }
        be_.residual_forward(a.residual3[l], a.residual3[l], a.residual2[l], (size_t)N * C);  // x + ffn
        residual = a.residual3[l];
    }
    be_.layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, residual, w(lnfw_), w(lnfb_), N, C);
    be_.matmul_forward(a.logits, a.lnf, w(wte_), nullptr, N, C, V);                         // (N, V), tied head
    be_.crossentropy_softmax_forward(a.losses, a.probs, a.logits, a.targets, N, V);
    be_.download(host_losses_.data(), a.losses, (size_t)N * sizeof(float));
    double sum = 0.0;
    for (int i = 0; i < N; i++) sum += host_losses_[i];
    return (float)(sum / N);
}

void GPT::backward(float dloss_scale) {
    Activations& a = acts_;
    if (!a.B) fail("backward() called before forward()");
    const ModelConfig& mc = cfg_.model;
    const int B = a.B, T = a.T, C = mc.d_model, F = mc.d_ff, V = mc.vocab_size, NH = mc.n_head, N = B * T;
    const size_t NC = (size_t)N * C;

    be_.zero(a.dlogits, (size_t)N * V * sizeof(float));
    be_.crossentropy_softmax_backward(a.dlogits, a.probs, a.targets, dloss_scale / N, N, V);
    be_.zero(a.dln, NC * sizeof(float));
    be_.matmul_backward(a.dln, g(wte_), nullptr, a.dlogits, a.lnf, w(wte_), N, C, V);
    be_.zero(a.dresidual, NC * sizeof(float));
    const float* last = mc.n_layer ? a.residual3[mc.n_layer - 1] : a.encoded;
    be_.layernorm_backward(a.dresidual, g(lnfw_), g(lnfb_), a.dln, last, w(lnfw_), a.lnf_mean, a.lnf_rstd, N, C);

    for (int l = mc.n_layer - 1; l >= 0; l--) {
        const LayerParams& p = layers_[l];
        const float* residual = l == 0 ? a.encoded : a.residual3[l - 1];
        // dresidual holds d(residual3[l]); the skip passes it through unchanged to residual2.
        be_.zero(a.dln, NC * sizeof(float));
        if (moe_[l]) {
            moe_[l]->backward(a.dln, a.dresidual, weights_, grads_, dloss_scale);
        } else {
            be_.zero(a.dproj_in, (size_t)N * F * sizeof(float));
            be_.matmul_backward(a.dproj_in, g(p.fcprojw), g(p.fcprojb), a.dresidual, a.fch_gelu[l], w(p.fcprojw), N, F, C);
            be_.zero(a.dhidden, (size_t)N * F * sizeof(float));
            be_.gelu_backward(a.dhidden, a.fch[l], a.dproj_in, (size_t)N * F);
            be_.matmul_backward(a.dln, g(p.fcw), g(p.fcb), a.dhidden, a.ln2[l], w(p.fcw), N, C, F);
        }
        be_.layernorm_backward(a.dresidual, g(p.ln2w), g(p.ln2b), a.dln, a.residual2[l], w(p.ln2w),
                               a.ln2_mean[l], a.ln2_rstd[l], N, C);
        // dresidual now holds d(residual2[l])
        be_.zero(a.dproj_in, NC * sizeof(float));
        be_.matmul_backward(a.dproj_in, g(p.attprojw), g(p.attprojb), a.dresidual, a.atty[l], w(p.attprojw), N, C, C);
        be_.zero(a.dhidden, NC * 3 * sizeof(float));
        be_.attention_backward(a.dhidden, a.dpreatt, a.datt, a.dproj_in, a.qkv[l], a.att[l], B, T, C, NH);
        be_.zero(a.dln, NC * sizeof(float));
        be_.matmul_backward(a.dln, g(p.qkvw), g(p.qkvb), a.dhidden, a.ln1[l], w(p.qkvw), N, C, 3 * C);
        be_.layernorm_backward(a.dresidual, g(p.ln1w), g(p.ln1b), a.dln, residual, w(p.ln1w),
                               a.ln1_mean[l], a.ln1_rstd[l], N, C);
        // dresidual now holds d(residual3[l-1])
    }
    be_.encoder_backward(g(wte_), g(wpe_), a.dresidual, a.inputs, B, T, C);
}

void GPT::reduce_grads() {
    const Dist& d = Dist::get();
    if (d.nccl()) {
        // gradients on the GPU: summed in place by NCCL (also with one rank, which exercises it),
        // adjacent tensors of the same group as one span, then divided as below
        std::vector<Dist::Span> spans;
        for (const ParamTensor& p : params_) {
            Dist::Span s = p.sharded ? Dist::Span{p.owned_offset, p.owned_numel, Dist::DP}
                                     : Dist::Span{p.offset, p.numel, Dist::WORLD};
            if (!spans.empty() && spans.back().g == s.g && spans.back().offset + spans.back().n == s.offset)
                spans.back().n += s.n;
            else
                spans.push_back(s);
        }
        d.allreduce_device(grads_, spans);
        be_.scale(grads_, 1.0f / d.world, num_params_);
        return;
    }
    // host memory (a GPU backend without NCCL: through host copies)
    if (!d.active()) return;
    std::vector<float> g = get_grads();
    for (const ParamTensor& p : params_) {
        if (p.sharded) d.allreduce(g.data() + p.owned_offset, p.owned_numel, Dist::DP);
        else d.allreduce(g.data() + p.offset, p.numel, Dist::WORLD);
    }
    const float inv = 1.0f / d.world;
    for (float& x : g) x *= inv;
    be_.upload(grads_, g.data(), g.size() * sizeof(float));
}

void GPT::gather_sharded(std::vector<float>& host) const {
    const Dist& d = Dist::get();
    if (d.ep == 1) return;
    for (const ParamTensor& p : params_) {
        if (!p.sharded) continue;
        float* t = host.data() + p.offset;
        for (size_t i = 0; i < p.numel; i++)
            if (p.offset + i < p.owned_offset || p.offset + i >= p.owned_offset + p.owned_numel) t[i] = 0.0f;
        d.allreduce(t, p.numel, Dist::EP);
    }
}

std::vector<MoeLayer*> GPT::moe_layers() {
    std::vector<MoeLayer*> out;
    for (auto& m : moe_) if (m) out.push_back(m.get());
    return out;
}

MoeStats GPT::balance_totals() const {
    MoeStats t;
    for (const auto& m : moe_) if (m) t.add(m->stats());
    return t;
}

std::vector<GPT::Buffer> GPT::buffers() {
    std::vector<Buffer> out;
    for (auto& m : moe_) {
        if (!m) continue;
        std::string p = "h." + std::to_string(m->layer()) + ".moe.router.";
        if (m->has_bias()) out.push_back({p + "expert_bias", "F32", {(int64_t)m->expert_bias().size()}, m->expert_bias().data()});
        if (m->has_hash()) out.push_back({p + "hash_table", "I32", {(int64_t)m->hash_table().size()}, m->hash_table().data()});
    }
    return out;
}

}  // namespace moe
