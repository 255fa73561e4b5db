/* The MoE layer against its contract (docs/moe.md):
   1. finite-difference gradient checks of the whole layer (forward + backward, parameters and
      the input) for every router, expert and balancing option, plus one through a GPT;
   2. exact behaviour: capacity dropping, expert-choice capacity, hash tables, dropless,
      group-limited selection, the balancing terms' values, the aux-loss-free bias;
   3. dispatch-plan invariants on random routings for every router type. */
#include <doctest/doctest.h>

#include "config.h"
#include "data.h"
#include "model.h"
#include "model_io.h"
#include "moe.h"
#include "moe_router.h"
#include "optim.h"
#include "stats.h"
#include "trainer.h"
#include "test_util.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <tuple>

using namespace moe;
using namespace moe_test;

namespace {

// A tiny MoE config; `sets` are --set style overrides (so every config is a validated one).
Config moe_cfg(const std::vector<std::string>& sets) {
    const std::string yaml = R"(
model: {vocab_size: 32, seq_len: 16, n_layer: 1, n_head: 2, d_model: 8, d_ff: 16,
        moe: {experts: 4, top_k: 2, expert_ff: 6}}
train: {batch_size: 2, threads: 1, seed: 5}
)";
    return parse_config(yaml, "test_moe", sets);
}

bool ends_with(const std::string& s, const std::string& suf) {
    return s.size() >= suf.size() && s.compare(s.size() - suf.size(), suf.size(), suf) == 0;
}

double gelu_ref(double x) { return 0.5 * x * (1.0 + std::tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))); }
double silu_ref(double x) { return x / (1.0 + std::exp(-x)); }
double phi_cdf(double u) { return 0.5 * std::erfc(-u / std::sqrt(2.0)); }

double cv2_ref(const std::vector<double>& v) {
    double mean = std::accumulate(v.begin(), v.end(), 0.0) / v.size(), var = 0.0;
    for (double a : v) var += (a - mean) * (a - mean);
    var /= v.size();
    return var / (mean * mean);
}

// One MoeLayer on its own: a flat parameter vector, an input x (N, C), the objective
// f = sum(out * R) + aux + z + imp + load, so backward(dout = R) must give df/dparams and df/dx.
struct Rig {
    Config cfg;
    std::unique_ptr<Backend> be;
    std::vector<ParamTensor> params;
    size_t total = 0;
    std::unique_ptr<MoeLayer> layer;
    int B, T, N, C, E, k;
    std::vector<float> w, x, R, out;
    std::vector<int> tok;
    Rng rng{1};
    uint64_t noise_seed = 0x1234567ull;   // rng state before every forward: same noise each time
    bool training = true;
    std::vector<double> frozen_thr;       // (N, E) load-loss thresholds held fixed (see below)

    Rig(const Config& c, int B_, int T_, uint64_t seed = 1)
        : cfg(c), be(make_cpu_backend(1)), B(B_), T(T_) {
        N = B * T;
        C = cfg.model.d_model;
        E = cfg.model.moe.experts;
        k = cfg.model.moe.top_k;
        auto add = [this](const std::string& name, std::vector<int64_t> shape) {
            ParamTensor p;
            p.name = name;
            p.shape = shape;
            p.numel = 1;
            for (int64_t d : shape) p.numel *= (size_t)d;
            p.offset = total;
            p.decay = shape.size() >= 2;
            total += p.numel;
            params.push_back(p);
            return params.size() - 1;
        };
        layer = std::make_unique<MoeLayer>(cfg, 0, *be, params, add);
        // Weights larger than the GPT init, so logits are O(1) (few near-ties) and every
        // gradient is well above float noise; nonzero biases so their gradients are exercised.
        Rng r(seed);
        w.assign(total, 0.0f);
        for (const ParamTensor& p : params) {
            double sd = ends_with(p.name, ".bias") ? 0.1
                      : ends_with(p.name, "noise_weight") ? 0.3
                      : ends_with(p.name, "router.weight") || ends_with(p.name, "slots") ? 0.5 : 0.4;
            for (size_t i = 0; i < p.numel; i++) w[p.offset + i] = (float)(sd * r.normal());
        }
        layer->init(w.data(), r);  // random hash table
        x.resize((size_t)N * C);
        for (float& v : x) v = r.normal();
        R.resize((size_t)N * C);
        for (float& v : R) v = r.normal();
        tok.resize(N);
        for (int& t : tok) t = (int)(r.next_u32() % cfg.model.vocab_size);
        out.assign((size_t)N * C, 0.0f);
    }

    const ParamTensor& param(const std::string& suffix) const {
        for (const ParamTensor& p : params) if (ends_with(p.name, suffix)) return p;
        FAIL("no parameter " << suffix);
        return params[0];
    }
    const Routing& routing() const { return layer->routing(); }
    const MoeStats& stats() const { return layer->stats(); }

    void forward() {
        rng.state = noise_seed;
        layer->forward(out.data(), x.data(), tok.data(), B, T, training, w.data(), rng);
    }

    // Shazeer's load loss with the thresholds of the base point held fixed: docs/moe.md makes
    // thr a constant (no gradient), so the finite difference must not see it move either.
    double load_frozen() const {
        const Routing& r = routing();
        std::vector<double> load(E, 0.0);
        for (int n = 0; n < N; n++)
            for (int i = 0; i < E; i++) {
                size_t idx = (size_t)n * E + i;
                load[i] += phi_cdf((r.z_clean[idx] - frozen_thr[idx]) / r.noise_std[idx]);
            }
        return cfg.balance.load_loss * cv2_ref(load);
    }
    // thr[n, i]: the k-th largest noisy logit of token n among the experts other than i.
    void freeze_thresholds() {
        const Routing& r = routing();
        frozen_thr.assign((size_t)N * E, 0.0);
        for (int n = 0; n < N; n++)
            for (int i = 0; i < E; i++) {
                std::vector<double> others;
                for (int j = 0; j < E; j++) if (j != i) others.push_back(r.z[(size_t)n * E + j]);
                std::sort(others.rbegin(), others.rend());
                frozen_thr[(size_t)n * E + i] = k <= (int)others.size() ? others[k - 1] : -INFINITY;
            }
    }

    double objective() {
        forward();
        double f = 0.0;
        for (size_t i = 0; i < out.size(); i++) f += (double)out[i] * R[i];
        const MoeStats& st = stats();
        return f + st.aux + st.z + st.imp + (frozen_thr.empty() ? st.load : load_frozen());
    }

    void gradients(std::vector<float>& g, std::vector<float>& dx) {
        forward();
        g.assign(total, 0.0f);
        dx.assign((size_t)N * C, 0.0f);
        layer->backward(dx.data(), R.data(), w.data(), g.data(), 1.0f);
    }
};

// Every routing decision: which (token, expert) choices exist and which are kept, and the plan.
std::vector<int> routing_signature(const Routing& r) {
    std::vector<std::tuple<int, int, int>> ch;
    for (int m = 0; m < r.M; m++) ch.emplace_back(r.choice_token[m], r.choice_expert[m], r.kept.empty() ? 1 : r.kept[m]);
    std::sort(ch.begin(), ch.end());
    std::vector<int> s(r.plan.offsets.begin(), r.plan.offsets.end());
    s.insert(s.end(), r.plan.token.begin(), r.plan.token.end());
    for (auto [t, e, kp] : ch) { s.push_back(t); s.push_back(e); s.push_back(kp); }
    return s;
}

struct FdStats {
    int checked = 0, skipped = 0, bad = 0;
    double worst = 0.0;       // largest err / tol
    std::string worst_at;
};

// Tolerances. f is accumulated in double, but the layer computes in float: each output carries
// a relative rounding error of ~1e-6 (a few ulp through two small GEMMs), so f (N*C ~ 256 terms
// of size ~1) is noisy at ~1e-6 absolute, i.e. ~3e-4 on a central difference over 2*eps = 6e-3
// in the worst case (measured: typically < 1e-4). Truncation error of the central difference is
// eps^2/6 * f''' ~ 1e-6 relative here. So: |fd - analytic| <= ATOL + RTOL * |analytic| with
// RTOL = 2e-3, small enough that a 1% gradient error fails (the negative control shows it).
static double FD_EPS = getenv("FDEPS") ? atof(getenv("FDEPS")) : 3e-3; constexpr double FD_ATOL = 4e-4, FD_RTOL = 2e-3;

// Central differences of rig.objective() for every entry of the named tensors (all tensors if
// empty) and of x, against the analytic gradient times `gain` (1.01 for the negative control).
// Entries whose routing differs between the +eps and -eps evaluations are skipped (counted).
FdStats fd_check(Rig& rig, double gain = 1.0, const std::vector<std::string>& only = {}, bool with_x = true) {
    std::vector<float> g, dx;
    rig.gradients(g, dx);
    FdStats st;
    auto probe = [&](float& v, double analytic, const std::string& where) {
        const float orig = v;
        v = orig + (float)FD_EPS;
        const double hi = v;
        double fp = rig.objective();
        std::vector<int> sp = routing_signature(rig.routing());
        v = orig - (float)FD_EPS;
        const double lo = v;
        double fm = rig.objective();
        std::vector<int> sm = routing_signature(rig.routing());
        v = orig;
        if (sp != sm) { st.skipped++; return; }
        const double fd = (fp - fm) / (hi - lo), an = gain * analytic;
        const double tol = FD_ATOL + FD_RTOL * std::fabs(an), err = std::fabs(fd - an);
        st.checked++;
        if (err > tol) st.bad++;
        if (err / tol > st.worst) {
            st.worst = err / tol;
            st.worst_at = fmt::format("{}: fd {:.6g} analytic {:.6g}", where, fd, an);
        }
    };
    for (const ParamTensor& p : rig.params) {
        if (!only.empty() && std::none_of(only.begin(), only.end(), [&](const std::string& s) { return ends_with(p.name, s); }))
            continue;
        for (size_t i = 0; i < p.numel; i++)
            probe(rig.w[p.offset + i], g[p.offset + i], fmt::format("{}[{}]", p.name, i));
    }
    if (with_x)
        for (size_t i = 0; i < rig.x.size(); i++) probe(rig.x[i], dx[i], fmt::format("x[{}]", i));
    return st;
}

void require_fd_ok(Rig& rig, const std::string& what) {
    rig.forward();
    if (rig.cfg.balance.load_loss > 0) {
        // the layer's load term equals the contract's formula at the base point ...
        rig.freeze_thresholds();
        CHECK(rig.stats().load == doctest::Approx(rig.load_frozen()).epsilon(1e-9));
    }
    FdStats st = fd_check(rig);
    INFO(what << ": checked " << st.checked << ", skipped " << st.skipped << ", bad " << st.bad
              << ", worst " << st.worst << " (" << st.worst_at << ")");
    MESSAGE(what << ": checked " << st.checked << ", skipped " << st.skipped << ", bad " << st.bad
              << ", worst " << st.worst << " (" << st.worst_at << ")");
    CHECK(st.checked > 200);
    CHECK(st.skipped * 10 <= st.checked + st.skipped);   // routing flips are rare at this eps
    CHECK(st.bad == 0);
}

// Router-weight gradient with the given balancing coefficient vs. without it: the term's own
// gradient must be a sizeable part of the total, or its check would prove little.
void require_term_matters(const std::vector<std::string>& sets, const std::string& coef_key, int B, int T,
                          float lm_scale) {
    std::vector<std::string> off = sets;
    off.push_back(coef_key + "=0");
    Rig with(moe_cfg(sets), B, T), without(moe_cfg(off), B, T);
    for (float& v : with.R) v *= lm_scale;
    for (float& v : without.R) v *= lm_scale;
    std::vector<float> g1, g0, dx;
    with.gradients(g1, dx);
    without.gradients(g0, dx);
    const ParamTensor& p = with.param("router.weight");
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < p.numel; i++) {
        diff += std::pow((double)g1[p.offset + i] - g0[p.offset + i], 2);
        norm += std::pow((double)g1[p.offset + i], 2);
    }
    INFO(coef_key);
    CHECK(std::sqrt(diff) > 0.1 * std::sqrt(norm));
}

}  // namespace

// =========================================================================================
// 1. finite differences

TEST_CASE("moe fd: the comparison catches a 1% gradient error (negative control)") {
    Rig rig(moe_cfg({"balance.aux_loss=0.5", "balance.z_loss=0.1"}), 2, 16);
    FdStats ok = fd_check(rig);
    FdStats off = fd_check(rig, 1.01);
    INFO("exact: bad " << ok.bad << " of " << ok.checked << "; 1% off: bad " << off.bad << " of " << off.checked);
    CHECK(ok.bad == 0);
    CHECK(off.bad * 2 > off.checked);    // most entries fail at 1% ...
    // ... and each tensor kind separately (router, expert weights and biases, input)
    for (const char* t : {"router.weight", "c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"}) {
        FdStats s = fd_check(rig, 1.01, {t}, false);
        INFO(t << ": bad " << s.bad << " of " << s.checked);
        CHECK(s.bad * 2 > s.checked);
    }
}

TEST_CASE("moe fd: topk softmax normalised") {
    Rig rig(moe_cfg({}), 2, 16);
    require_fd_ok(rig, "topk softmax");
}

TEST_CASE("moe fd: topk sigmoid unnormalised, scale 2") {
    Rig rig(moe_cfg({"router.score=sigmoid", "router.normalize_topk=false", "router.scale=2"}), 2, 16);
    require_fd_ok(rig, "topk sigmoid");
}

TEST_CASE("moe fd: group-limited topk") {
    Rig rig(moe_cfg({"model.moe.experts=8", "router.groups=4", "router.topk_groups=2"}), 2, 16);
    require_fd_ok(rig, "group-limited");
}

TEST_CASE("moe fd: gaussian noise (same noise every evaluation)") {
    Rig rig(moe_cfg({"router.noise=gaussian"}), 2, 16);
    require_fd_ok(rig, "gaussian noise");
}

TEST_CASE("moe fd: jitter") {
    Rig rig(moe_cfg({"router.noise=jitter", "router.jitter_eps=0.2"}), 2, 16);
    rig.forward();
    CHECK(rig.layer->last_jitter().size() == rig.x.size());
    require_fd_ok(rig, "jitter");
}

TEST_CASE("moe fd: expert choice") {
    Rig rig(moe_cfg({"router.type=expert_choice", "router.expert_choice_capacity=1.5", "router.scale=1.5",
                     "balance.z_loss=0.1"}), 2, 16);
    require_fd_ok(rig, "expert choice");
}

TEST_CASE("moe fd: hash (expert weights and input)") {
    Rig rig(moe_cfg({"router.type=hash", "model.moe.top_k=1"}), 2, 16);
    require_fd_ok(rig, "hash");
}

TEST_CASE("moe fd: soft moe") {
    Rig rig(moe_cfg({"router.type=soft", "router.soft_slots=2"}), 2, 16);
    require_fd_ok(rig, "soft");
}

TEST_CASE("moe fd: sinkhorn") {
    Rig rig(moe_cfg({"router.type=sinkhorn", "balance.aux_loss=0.5"}), 2, 16);
    require_fd_ok(rig, "sinkhorn");
}

TEST_CASE("moe fd: capacity with drops, both policies") {
    for (const char* policy : {"probs", "position"}) {
        Rig rig(moe_cfg({"router.capacity_factor=0.5", std::string("router.drop_policy=") + policy,
                         "balance.aux_loss=0.3"}), 2, 16);
        rig.forward();
        CHECK(rig.stats().dropped > 0);
        require_fd_ok(rig, std::string("capacity ") + policy);
    }
}

TEST_CASE("moe fd: swiglu experts") {
    Rig rig(moe_cfg({"model.moe.activation=swiglu"}), 2, 16);
    require_fd_ok(rig, "swiglu");
}

TEST_CASE("moe fd: shared experts (gelu and swiglu)") {
    Rig a(moe_cfg({"model.moe.shared_experts=2", "model.moe.shared_ff=5"}), 2, 16);
    require_fd_ok(a, "shared gelu");
    Rig b(moe_cfg({"model.moe.shared_experts=1", "model.moe.shared_ff=5", "model.moe.activation=swiglu",
                   "router.capacity_factor=0.5"}), 2, 16);
    require_fd_ok(b, "shared swiglu with drops");
}

TEST_CASE("moe fd: balancing terms, each on its own") {
    struct Case { std::vector<std::string> sets; std::string coef; };
    const std::vector<Case> cases = {
        {{"balance.aux_loss=1.0"}, "balance.aux_loss"},
        {{"balance.aux_loss=1.0", "balance.aux_scope=sequence"}, "balance.aux_loss"},
        {{"balance.z_loss=0.3"}, "balance.z_loss"},
        {{"balance.importance_loss=1.0"}, "balance.importance_loss"},
        {{"router.noise=gaussian", "balance.load_loss=1.0"}, "balance.load_loss"},
        {{"router.score=sigmoid", "balance.aux_loss=1.0", "balance.importance_loss=1.0"}, "balance.aux_loss"},
    };
    // the LM part scaled down, so that each term is a large part of the router gradient
    const float LM_SCALE = 0.05f;
    for (const Case& c : cases) {
        std::string what = fmt::format("{}", fmt::join(c.sets, " "));
        Rig rig(moe_cfg(c.sets), 2, 16);
        for (float& v : rig.R) v *= LM_SCALE;
        require_fd_ok(rig, what);
        require_term_matters(c.sets, c.coef, 2, 16, LM_SCALE);
    }
}

TEST_CASE("moe fd: global aux scope uses the step's counts") {
    Rig rig(moe_cfg({"balance.aux_loss=1.0", "balance.aux_scope=global"}), 2, 16);
    rig.layer->set_global_counts({40, 10, 5, 9});
    require_fd_ok(rig, "global aux");
    // f comes from the given counts, not the micro-batch's
    rig.forward();
    const Routing& r = rig.routing();
    double want = 0.0;
    const double cnt[4] = {40, 10, 5, 9};
    for (int i = 0; i < 4; i++) {
        double P = 0.0;
        for (int n = 0; n < r.N; n++) P += r.s[(size_t)n * 4 + i] / r.N;
        want += 1.0 * 4 * cnt[i] / 64.0 * P;
    }
    CHECK(rig.stats().aux == doctest::Approx(want).epsilon(1e-9));
}

// Through a whole GPT: the model's gradients of the MoE tensors and of ln_2 (the only way d/dx
// of the MoE layer reaches a parameter) against central differences of LM loss + balancing.
TEST_CASE("moe fd: through a GPT (LM loss + balancing terms, two MoE layers)") {
    Config cfg = parse_config(R"(
model: {vocab_size: 32, seq_len: 8, n_layer: 2, n_head: 2, d_model: 8, d_ff: 16,
        moe: {experts: 4, top_k: 2, expert_ff: 6, shared_experts: 1, shared_ff: 4}}
router: {noise: gaussian, capacity_factor: 0.75}
balance: {aux_loss: 0.2, z_loss: 0.05, importance_loss: 0.2}
train: {batch_size: 2, threads: 1, seed: 3}
)", "gpt fd");
    auto be = make_cpu_backend(1);
    GPT model(cfg, *be);
    model.init_weights(11);
    // scale the MoE weights up (as in Rig) so their gradients stand well above float noise
    std::vector<float> w = model.get_weights();
    for (const ParamTensor& p : model.params())
        if (p.name.find(".moe.") != std::string::npos)
            for (size_t i = 0; i < p.numel; i++) w[p.offset + i] *= ends_with(p.name, "noise_weight") ? 1.0f : 20.0f;
    model.set_weights(w);
    const int B = 2, T = 8, N = B * T, V = 32;
    std::vector<int> inp(N), tgt(N);
    Rng r(9);
    for (int i = 0; i < N; i++) { inp[i] = (int)(r.next_u32() % V); tgt[i] = (int)(r.next_u32() % V); }
    const uint64_t rng0 = model.rng().state;
    std::vector<float> logits((size_t)N * V);
    auto objective = [&]() {
        model.rng().state = rng0;
        model.forward(inp.data(), tgt.data(), B, T);
        be->download(logits.data(), model.logits(), logits.size() * sizeof(float));
        double lm = 0.0;   // the cross-entropy again, in double
        for (int n = 0; n < N; n++) {
            const float* l = &logits[(size_t)n * V];
            double mx = *std::max_element(l, l + V), s = 0.0;
            for (int v = 0; v < V; v++) s += std::exp((double)l[v] - mx);
            lm += (mx + std::log(s) - l[tgt[n]]) / N;
        }
        MoeStats bt = model.balance_totals();
        return lm + bt.aux + bt.z + bt.imp + bt.load;
    };
    auto signature = [&]() {
        std::vector<int> s;
        for (MoeLayer* m : model.moe_layers()) {
            std::vector<int> one = routing_signature(m->routing());
            s.insert(s.end(), one.begin(), one.end());
        }
        return s;
    };
    objective();
    REQUIRE(model.moe_layers().size() == 2);
    MoeStats bt = model.balance_totals();
    CHECK(bt.aux > 0);
    CHECK(bt.dropped > 0);
    model.zero_grad();
    model.backward(1.0f);
    std::vector<float> g = model.get_grads();
    // The loss is ~3.5, so float logits carry ~1e-6 noise; gradients here are ~1e-3..1e-1.
    const double eps = 3e-3, atol = 2e-4, rtol = 5e-3;
    int checked = 0, skipped = 0, bad = 0;
    std::string worst;
    double worst_ratio = 0;
    for (const ParamTensor& p : model.params()) {
        if (p.name.find(".moe.") == std::string::npos && p.name.find("ln_2") == std::string::npos) continue;
        for (size_t i = 0; i < p.numel; i++) {
            float& v = w[p.offset + i];
            const float orig = v;
            v = orig + (float)eps; const double hi = v;
            model.set_weights(w);
            double fp = objective();
            std::vector<int> sp = signature();
            v = orig - (float)eps; const double lo = v;
            model.set_weights(w);
            double fm = objective();
            std::vector<int> sm = signature();
            v = orig;
            if (sp != sm) { skipped++; continue; }
            double fd = (fp - fm) / (hi - lo), an = g[p.offset + i], err = std::fabs(fd - an);
            double tol = atol + rtol * std::fabs(an);
            checked++;
            if (err > tol) bad++;
            if (err / tol > worst_ratio) { worst_ratio = err / tol; worst = fmt::format("{}[{}] fd {} an {}", p.name, i, fd, an); }
        }
    }
    model.set_weights(w);
    INFO("checked " << checked << " skipped " << skipped << " bad " << bad << " worst " << worst_ratio << " " << worst);
    CHECK(checked > 500);
    CHECK(skipped * 10 <= checked + skipped);
    CHECK(bad == 0);
}
