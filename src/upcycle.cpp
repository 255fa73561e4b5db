/* Sparse upcycling; see upcycle.h. The MoE model is built from its config and initialised as a
   fresh run would be (so every tensor the dense model has no counterpart for -- router, noise
   weight, soft slots, hash table, fresh shared experts -- gets its documented init), then every
   tensor that has a dense counterpart is overwritten from the dense weights. */
#include "upcycle.h"
#include "common.h"

#include <algorithm>
#include <cmath>
#include <set>

namespace moe {

namespace {

// Independent, reproducible random streams per purpose and layer (splitmix64 of the pieces).
Rng stream(uint64_t seed, uint64_t purpose, uint64_t layer) {
    uint64_t z = seed ^ (purpose * 0x9E3779B97F4A7C15ull) ^ (layer * 0xBF58476D1CE4E5B9ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return Rng(z ^ (z >> 31));
}
enum : uint64_t { kDropStream = 1, kNoiseStream = 2 };

bool token_choice(const RouterConfig& r) { return r.type == "topk" || r.type == "sinkhorn"; }

void check_dims(const DenseWeights& d, const Config& cfg, const std::string& src) {
    const ModelConfig& m = cfg.model;
    auto same = [&](const char* key, int moe_v, int dense_v) {
        if (moe_v != dense_v)
            fail("model.{}: the MoE config has {}, the dense model ({}) has {}; they must be equal ({})", key, moe_v,
                 d.path, dense_v, src);
    };
    same("vocab_size", m.vocab_size, d.dims.vocab_size);
    same("n_layer", m.n_layer, d.dims.n_layer);
    same("n_head", m.n_head, d.dims.n_head);
    same("d_model", m.d_model, d.dims.d_model);
    same("d_ff", m.d_ff, d.dims.d_ff);
    if (m.seq_len > d.dims.seq_len)
        fail("model.seq_len: the MoE config has {}, the dense model ({}) has only {} position embeddings; "
             "it must be <= {} ({})", m.seq_len, d.path, d.dims.seq_len, d.dims.seq_len, src);
}

void check_method(const Config& cfg, const UpcycleOptions& o, const std::string& src) {
    if (o.method != "copy" && o.method != "granular" && o.method != "drop")
        fail("unknown upcycling method '{}': copy, granular or drop (--method)", o.method);
    if (!(o.drop_ratio >= 0.0 && o.drop_ratio <= 1.0))
        fail("drop ratio must be in [0, 1], got {} (--drop-ratio)", o.drop_ratio);
    if (!(o.noise >= 0.0) || !std::isfinite(o.noise)) fail("noise std must be >= 0, got {} (--noise)", o.noise);
    const ModelConfig& m = cfg.model;
    if (!m.moe.enabled) return;   // a dense config: every layer keeps its FFN, the method is moot
    if (m.moe.activation != "gelu")
        fail("model.moe.activation: {} experts cannot be upcycled from a GELU dense FFN (the dense hidden units "
             "have no gate half); use activation: gelu ({})", m.moe.activation, src);
    const int F = m.d_ff, Fe = m.moe.expert_ff, E = m.moe.experts;
    if (o.method != "granular" && Fe != F)
        fail("model.moe.expert_ff: --method {} makes every expert a copy of the dense FFN, so expert_ff must equal "
             "d_ff = {}, got {} (use --method granular to split the FFN into d_ff / expert_ff experts) ({})",
             o.method, F, Fe, src);
    if (o.method == "granular") {
        if (F % Fe != 0)
            fail("model.moe.expert_ff: --method granular splits d_ff = {} into slices of expert_ff hidden units; "
                 "{} does not divide {} ({})", F, Fe, F, src);
        if (E % (F / Fe) != 0)
            fail("model.moe.experts: --method granular makes G = d_ff / expert_ff = {} slices; experts must be a "
                 "multiple of {}, got {} ({})", F / Fe, F / Fe, E, src);
    }
}

struct Exactness { bool exact; std::string why; };

// When does the upcycled MoE layer compute the dense FFN? (README.md "Upcycling a dense model")
Exactness analyse(const Config& cfg, const UpcycleOptions& o, int G, int dropped, bool zero_router) {
    const MoeConfig& e = cfg.model.moe;
    const RouterConfig& r = cfg.router;
    if (!e.enabled) return {true, "no model.moe block: every layer keeps the dense FFN (a format conversion)"};
    const int E = e.experts, k = r.type == "hash" ? 1 : e.top_k;
    if (dropped > 0)
        return {false, fmt::format("drop re-initialised {} of {} hidden units of every expert", dropped, e.expert_ff)};
    if (o.noise > 0) return {false, fmt::format("--noise {} perturbs the expert weights", o.noise)};
    if (e.shared_experts > 0)
        return {false, fmt::format("the {} shared expert(s) add their output to every token's routed output",
                                   e.shared_experts)};
    if (r.type == "expert_choice")
        return {false, "expert_choice gives a token 0..E experts with gates s, which need not sum to 1"};
    if (r.type == "soft") return {false, "soft MoE feeds the experts mixtures of tokens, not tokens"};
    const double cf = r.eval_capacity_factor;
    if (cf > 0 && cf * k < E)
        return {false, fmt::format("router.eval_capacity_factor = {} can drop assignments, which lose their FFN "
                                   "output (exact needs 0 or >= experts / top_k = {})", cf, (double)E / k)};
    const std::string at_eval =
        r.noise == "gaussian" ? " at eval (router.noise gaussian perturbs the gates in training)" : "";
    if (o.method != "granular" || (G == 1 && !zero_router)) {
        // copy, drop with r = 0, or granular with one slice: the layer is (sum of gates) x FFN
        if (r.type == "hash")
            return {true, "each token goes to one expert, a copy of the dense FFN, with gate 1"};
        const bool sums_to_scale = r.normalize_topk || (r.score == "softmax" && k == E);
        if (!sums_to_scale)
            return {false, "with router.normalize_topk false the top-k gates are raw scores that do not sum to 1 "
                           "(set normalize_topk: true)"};
        if (r.scale != 1.0)
            return {false, fmt::format("each token's gates sum to router.scale = {}, not 1 (set scale: 1)", r.scale)};
        return {true, "every expert is the dense FFN and each token's gates sum to 1; exact up to float rounding"};
    }
    // granular: the dense FFN is the sum of its G slices, so every token needs every slice with
    // total weight 1: all E experts (top_k = E), each gate G/E, c_proj bias / G.
    if (!token_choice(r) || k != E)
        return {false, fmt::format("each token gets {} of the {} experts, but only all {} slices together "
                                   "make the dense FFN (exact needs router.type topk and top_k = experts)",
                                   k, E, G)};
    if (!zero_router) return {false, "the router is not zero"};
    const double g0 = (r.normalize_topk || r.score == "softmax") ? 1.0 / E : 0.5;   // gate / scale, zero logits
    const double want = (double)G / E, gate = r.scale * g0;
    if (std::fabs(gate - want) > 1e-6 * want)
        return {false, fmt::format("with the zero router every gate is {:.6g}; it must be G / experts = {:.6g} "
                                   "(set router.scale: {:.6g})", gate, want, want / g0)};
    return {true, fmt::format("every token gets all {} experts with gate {:.6g}, and the {} slices of the dense FFN "
                              "(c_proj bias / {} each) add up to it; exact up to float rounding{}",
                              E, want, G, G, at_eval)};
}

// `n` distinct units of [0, F), in increasing order (partial Fisher-Yates).
std::vector<int> pick_units(int F, int n, Rng& rng) {
    std::vector<int> idx(F);
    for (int i = 0; i < F; i++) idx[i] = i;
    for (int i = 0; i < n; i++) std::swap(idx[i], idx[i + (int)(rng.next_u64() % (uint64_t)(F - i))]);
    idx.resize(n);
    std::sort(idx.begin(), idx.end());
    return idx;
}

}  // namespace

double active_params_per_token(const GPT& model, double* experts_per_token) {
    const Config& cfg = model.full_config();
    const MoeConfig& e = cfg.model.moe;
    const RouterConfig& r = cfg.router;
    double k = 0;
    if (e.enabled) {
        k = r.type == "hash" ? 1.0
          : r.type == "expert_choice" ? std::min<double>(e.experts, r.expert_choice_capacity)
          : r.type == "soft" ? (double)e.experts * r.soft_slots / cfg.model.seq_len   // slots per token
          : e.top_k;
    }
    if (experts_per_token) *experts_per_token = k;
    double n = 0;
    for (const ParamTensor& p : model.params())
        n += p.name.find(".moe.experts.") != std::string::npos ? p.numel * k / e.experts : (double)p.numel;
    return n;
}

UpcycleResult upcycle(const DenseWeights& dense, const Config& cfg, const UpcycleOptions& o, Backend& be,
                      const std::string& src) {
    check_dims(dense, cfg, src);
    check_method(cfg, o, src);
    const ModelConfig& mc = cfg.model;
    const MoeConfig& e = mc.moe;
    const int64_t C = mc.d_model, F = mc.d_ff, T = mc.seq_len, Fe = e.expert_ff, E = e.experts;

    UpcycleResult res;
    res.model = std::make_unique<GPT>(cfg, be);
    GPT& model = *res.model;
    model.init_weights(o.seed);
    std::vector<float> w = model.get_weights();
    auto dst = [&](const std::string& name) { return w.data() + model.param(name).offset; };
    auto copy = [&](const std::string& name, size_t n) {   // the first n floats of a dense tensor
        const std::vector<float>& s = dense.get(name);
        std::copy(s.begin(), s.begin() + n, dst(name));
    };

    copy("wte", model.param("wte").numel);
    copy("wpe", (size_t)T * C);   // (T, C): the first T rows when the dense model has more
    copy("ln_f.weight", C);
    copy("ln_f.bias", C);
    res.groups = o.method == "granular" && e.enabled ? (int)(F / Fe) : 1;
    const int G = res.groups;
    res.units_dropped = o.method == "drop" ? (int)std::lround(o.drop_ratio * Fe) : 0;
    res.shared_copied = e.enabled && e.shared_experts > 0 && e.shared_ff == F;
    res.zero_router = e.enabled && o.method == "granular" && token_choice(cfg.router) && e.top_k == E;

    for (int l = 0; l < mc.n_layer; l++) {
        const std::string p = "h." + std::to_string(l) + ".";
        for (const char* t : {"ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                              "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias"})
            copy(p + t, model.param(p + t).numel);
        const std::vector<float>& fcw = dense.get(p + "mlp.c_fc.weight");     // (F, C)
        const std::vector<float>& fcb = dense.get(p + "mlp.c_fc.bias");       // (F)
        const std::vector<float>& projw = dense.get(p + "mlp.c_proj.weight"); // (C, F)
        const std::vector<float>& projb = dense.get(p + "mlp.c_proj.bias");   // (C)
        if (!mc.is_moe_layer(l)) {
            for (const char* t : {"mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"})
                copy(p + t, model.param(p + t).numel);
            continue;
        }
        res.moe_layers.push_back(l);
        // Expert x of width Fh gets the dense hidden units [u0, u0 + Fh) and 1/div of c_proj's bias.
        auto put = [&](const std::string& pre, int64_t x, int64_t Fh, int64_t u0, float div) {
            float* W1 = dst(pre + "c_fc.weight") + x * Fh * C;     // (Fh, C)
            float* b1 = dst(pre + "c_fc.bias") + x * Fh;           // (Fh)
            float* W2 = dst(pre + "c_proj.weight") + x * C * Fh;   // (C, Fh)
            float* b2 = dst(pre + "c_proj.bias") + x * C;          // (C)
            std::copy(fcw.begin() + u0 * C, fcw.begin() + (u0 + Fh) * C, W1);
            std::copy(fcb.begin() + u0, fcb.begin() + u0 + Fh, b1);
            for (int64_t c = 0; c < C; c++)
                std::copy(projw.begin() + c * F + u0, projw.begin() + c * F + u0 + Fh, W2 + c * Fh);
            for (int64_t c = 0; c < C; c++) b2[c] = projb[c] / div;
        };
        const std::string ex = p + "moe.experts.";
        for (int64_t x = 0; x < E; x++) put(ex, x, Fe, (x % G) * Fe, (float)G);
        if (res.shared_copied)
            for (int64_t s = 0; s < e.shared_experts; s++) put(p + "moe.shared.", s, F, 0, 1.0f);
        if (res.zero_router) std::fill_n(dst(p + "moe.router.weight"), E * C, 0.0f);

        if (res.units_dropped > 0) {
            // Drop-Upcycling: rows of c_fc (and their bias) and the matching columns of c_proj of
            // round(r * Fe) units per expert start afresh; each expert draws its own units (a
            // draw equal to an earlier expert's is redrawn while other subsets exist).
            Rng rng = stream(o.seed, kDropStream, l);
            std::set<std::vector<int>> taken;
            for (int64_t x = 0; x < E; x++) {
                std::vector<int> units = pick_units((int)Fe, res.units_dropped, rng);
                for (int tries = 0; res.units_dropped < Fe && taken.count(units) && tries < 64; tries++)
                    units = pick_units((int)Fe, res.units_dropped, rng);
                taken.insert(units);
                float* W1 = dst(ex + "c_fc.weight") + x * Fe * C;
                float* b1 = dst(ex + "c_fc.bias") + x * Fe;
                float* W2 = dst(ex + "c_proj.weight") + x * C * Fe;
                for (int u : units) {
                    for (int64_t c = 0; c < C; c++) W1[u * C + c] = 0.02f * rng.normal();
                    b1[u] = 0.0f;
                    for (int64_t c = 0; c < C; c++) W2[c * Fe + u] = 0.02f * rng.normal();
                }
            }
        }
        if (o.noise > 0) {   // symmetry breaking between identical experts
            Rng rng = stream(o.seed, kNoiseStream, l);
            for (const char* t : {"c_fc.weight", "c_proj.weight"}) {
                float* v = dst(ex + t);
                for (size_t i = 0; i < model.param(ex + t).numel; i++) v[i] += (float)o.noise * rng.normal();
            }
        }
    }
    model.set_weights(w);

    Exactness verdict = analyse(cfg, o, G, res.units_dropped, res.zero_router);
    res.exact = verdict.exact;
    res.exact_why = verdict.why;
    res.params_dense = dense.num_params();
    res.params_moe = model.num_params();
    res.active_params = active_params_per_token(model, &res.experts_per_token);
    return res;
}

}  // namespace moe
