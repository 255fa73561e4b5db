/* The formulas of `moe plan`, one function each, in docs/plan.md's order and notation:
   V vocab, T seq_len, L layers, H heads, C d_model, F d_ff, E experts, k_eff routed rows per token,
   Fe expert_ff, S shared experts, Fs shared_ff, hw = 2 for SwiGLU (gate + up rows) else 1,
   B micro-batch, A grad_accum. */
#include "plan.h"

#include <algorithm>
#include <cctype>

namespace moe {

const std::vector<GpuSpec>& gpu_specs() {
    static const std::vector<GpuSpec> specs = {
        {"h100", "H100 SXM", 989, 80, 67},
        {"h200", "H200", 989, 141, 67},
        {"a100", "A100", 312, 80, 19.5},
    };
    return specs;
}

const GpuSpec* find_gpu(const std::string& key) {
    for (const GpuSpec& g : gpu_specs())
        if (g.key == key) return &g;
    return nullptr;
}

const GpuSpec* find_gpu_by_device_name(const std::string& cuda_name) {
    for (const GpuSpec& g : gpu_specs()) {
        std::string upper = g.key;
        for (char& c : upper) c = (char)std::toupper((unsigned char)c);
        if (cuda_name.find(upper) != std::string::npos) return &g;
    }
    return nullptr;
}

double experts_per_token(const Config& cfg) {
    const MoeConfig& e = cfg.model.moe;
    const RouterConfig& r = cfg.router;
    if (!e.enabled) return 0;
    if (r.type == "hash") return 1;
    if (r.type == "expert_choice") return std::min<double>(e.experts, r.expert_choice_capacity);
    if (r.type == "soft") return (double)e.experts * r.soft_slots / cfg.model.seq_len;
    return e.top_k;
}

ParamCounts count_params(const Config& cfg) {
    const ModelConfig& m = cfg.model;
    const MoeConfig& e = m.moe;
    const RouterConfig& r = cfg.router;
    const int64_t V = m.vocab_size, T = m.seq_len, C = m.d_model, F = m.d_ff;
    const int64_t E = e.experts, Fe = e.expert_ff, S = e.shared_experts, Fs = e.shared_ff;
    const int64_t hw = e.activation == "swiglu" ? 2 : 1;
    // one FFN expert (or the stacked tensors of n of them): c_fc (hw*F, C) + bias, c_proj (C, F) + bias
    auto ffn = [&](int64_t n, int64_t f) { return n * (hw * f * C + hw * f + C * f + C); };

    ParamCounts p;
    p.embedding = V * C + T * C;
    p.final_norm = 2 * C;
    for (int l = 0; l < m.n_layer; l++) {
        p.attention += 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C;
        if (!m.is_moe_layer(l)) {
            p.dense_ffn += F * C + F + C * F + C;
            continue;
        }
        p.moe_layers++;
        if (r.type == "soft") p.router += C * E * r.soft_slots;
        else if (r.type != "hash") p.router += E * C;
        if (r.noise == "gaussian") p.router += E * C;
        p.routed += ffn(E, Fe);
        if (S > 0) p.shared += ffn(S, Fs);
    }
    p.replicated = p.embedding + p.attention + p.dense_ffn + p.router + p.shared + p.final_norm;
    p.total = p.replicated + p.routed;
    p.experts_per_token = experts_per_token(cfg);
    p.active = (double)p.replicated + (e.enabled ? (double)p.routed * p.experts_per_token / E : 0.0);
    return p;
}

std::vector<int> valid_ep(const Config& cfg, int gpus) {
    const int E = cfg.model.moe.enabled ? cfg.model.moe.experts : 1;
    std::vector<int> eps;
    for (int ep = 1; ep <= gpus && ep <= E; ep++)
        if (gpus % ep == 0 && E % ep == 0) eps.push_back(ep);
    return eps;
}

int64_t params_per_rank(const Config& cfg, int ep) {
    const ParamCounts p = count_params(cfg);
    return p.replicated + p.routed / ep;
}

FlopsPerToken forward_flops_per_token(const Config& cfg) {
    const ModelConfig& m = cfg.model;
    const MoeConfig& e = m.moe;
    const RouterConfig& r = cfg.router;
    const double V = m.vocab_size, T = m.seq_len, C = m.d_model, F = m.d_ff;
    const double E = e.experts, Fe = e.expert_ff, S = e.shared_experts, Fs = e.shared_ff;
    const double hw = e.activation == "swiglu" ? 2 : 1, k = experts_per_token(cfg);
    FlopsPerToken f;
    for (int l = 0; l < m.n_layer; l++) {
        f.attn_linear += 2 * (4 * C * C);
        f.attn_scores += 2 * T * C;   // 4TC (QK^T + AV over T keys), halved by the causal mask
        if (!m.is_moe_layer(l)) {
            f.dense_ffn += 2 * (2 * F * C);
            continue;
        }
        if (r.type == "soft") f.router += 3 * 2 * C * E * r.soft_slots;   // logits, dispatch, combine
        else if (r.type != "hash") f.router += 2 * E * C;
        if (r.noise == "gaussian") f.router += 2 * E * C;
        f.routed += 2 * k * (hw * Fe * C + Fe * C);
        f.shared += 2 * S * (hw * Fs * C + Fs * C);
    }
    f.lm_head = 2 * V * C;
    return f;
}

double flops_per_rank_step(const Config& cfg) {
    const double tokens = (double)cfg.train.batch_size * cfg.model.seq_len * cfg.train.grad_accum;
    return 3 * forward_flops_per_token(cfg).total() * tokens;
}

ActivationBytes activation_bytes(const Config& cfg) {
    const ModelConfig& m = cfg.model;
    const MoeConfig& e = m.moe;
    const RouterConfig& r = cfg.router;
    const double V = m.vocab_size, C = m.d_model, F = m.d_ff, H = m.n_head;
    const double E = e.experts, Fe = e.expert_ff, S = e.shared_experts, Fs = e.shared_ff;
    const double hw = e.activation == "swiglu" ? 2 : 1, k = experts_per_token(cfg);
    const double n = (double)cfg.train.batch_size * m.seq_len;   // tokens of one micro-batch
    ActivationBytes a;
    for (int l = 0; l < m.n_layer; l++) {
        // ln_1 out, q k v, attention out, residual after attention, ln_2 out, block output: 8C bf16;
        // mean + rstd of ln_1 and ln_2, and the attention softmax log-sum-exp per head: fp32
        a.attention += n * (8 * C * kBytesBf16 + (4 + H) * kBytesFp32);
        if (!m.is_moe_layer(l)) {
            a.dense_ffn += n * 2 * F * kBytesBf16;   // hidden before and after GELU
            continue;
        }
        if (r.type == "soft") a.router += n * 3 * E * r.soft_slots * kBytesFp32;   // logits, dispatch, combine
        else if (r.type != "hash") a.router += n * 2 * E * kBytesFp32;            // logits, scores
        if (r.noise == "gaussian") a.router += n * 2 * E * kBytesFp32;            // std, noise draw
        // per dispatched row: gathered input C, hidden hw*Fe, activation Fe, expert output C (bf16),
        // gate (fp32) and token index (int32)
        a.dispatch += n * k * ((2 * C + (hw + 1) * Fe) * kBytesBf16 + 2 * kBytesFp32);
        a.shared += n * S * (hw + 1) * Fs * kBytesBf16;   // hidden and activation of each shared expert
    }
    // embedding output and ln_f output (bf16), ln_f mean + rstd, logits (fp32; the fused
    // softmax/cross-entropy writes its gradient in place)
    a.final = n * (2 * C * kBytesBf16 + 2 * kBytesFp32 + V * kBytesFp32);
    return a;
}

double alltoall_bytes_per_step(const Config& cfg, int ep) {
    const ParamCounts p = count_params(cfg);
    if (p.moe_layers == 0 || ep <= 1) return 0;
    const double n = (double)cfg.train.batch_size * cfg.model.seq_len;
    const double rows_out = n * p.experts_per_token * (ep - 1) / ep;
    return 4.0 * p.moe_layers * cfg.train.grad_accum * rows_out * cfg.model.d_model * kBytesBf16;
}

double allreduce_bytes_per_step(const Config& cfg, int gpus, int ep) {
    const ParamCounts p = count_params(cfg);
    auto ring = [](double bytes, int group) { return group > 1 ? 2.0 * (group - 1) / group * bytes : 0.0; };
    const int dp = gpus / ep;
    return ring((double)p.replicated * kBytesFp32, gpus) + ring((double)(p.routed / ep) * kBytesFp32, dp);
}

std::vector<PlanRow> plan_rows(const Config& cfg, const PlanOptions& opt) {
    const double act = activation_bytes(cfg).total();
    const double flops = flops_per_rank_step(cfg);
    const double link_bytes_per_s = opt.link_gbps * 1e9 / 8;
    std::vector<PlanRow> rows;
    for (int ep : valid_ep(cfg, opt.gpus)) {
        PlanRow r;
        r.ep = ep;
        r.dp = opt.gpus / ep;
        r.params = params_per_rank(cfg, ep);
        r.state_bytes = kStateBytesPerParam * (double)r.params;
        r.activation_bytes = act;
        r.memory_bytes = r.state_bytes + act;
        r.fits = r.memory_bytes <= kUsableMemoryFraction * opt.gpu.mem_gb * 1e9;
        r.flops = flops;
        r.alltoall_bytes = alltoall_bytes_per_step(cfg, ep);
        r.allreduce_bytes = allreduce_bytes_per_step(cfg, opt.gpus, ep);
        r.compute_s = flops / (opt.gpu.peak_tflops * 1e12 * opt.mfu);
        r.comm_s = (r.alltoall_bytes + r.allreduce_bytes) / link_bytes_per_s;
        r.step_s = r.compute_s + r.comm_s;
        r.comm_bound = r.comm_s > r.compute_s;
        rows.push_back(r);
    }
    const bool any_fits = std::any_of(rows.begin(), rows.end(), [](const PlanRow& r) { return r.fits; });
    PlanRow* best = nullptr;
    for (PlanRow& r : rows) {
        if (any_fits ? (r.fits && (!best || r.step_s < best->step_s))
                     : (!best || r.memory_bytes < best->memory_bytes))
            best = &r;
    }
    if (best) best->best = true;
    return rows;
}

}  // namespace moe
