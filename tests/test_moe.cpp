/* The MoE layer against its contract (docs/moe.md):
   1. finite-difference gradient checks of the whole layer (forward + backward, parameters and
      the input) for every router, expert and balancing option, plus one through a GPT;
   2. exact behaviour: capacity dropping, expert-choice capacity, hash tables, dropless,
      group-limited selection, the balancing terms' values, the aux-loss-free bias;
   3. dispatch-plan invariants on random routings for every router type;
   and the forward values (router, Sinkhorn, Soft MoE, shared experts) recomputed in double. */
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
#include <fmt/ranges.h>
#include <omp.h>

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

// The layers here are tiny: on a loaded 2-core machine OpenMP barriers cost more than the work
// (a 2-thread run can be 20x slower when another process holds a core). Each test runs on one
// thread and puts the process-wide setting back afterwards (results are thread-count
// independent; a test below checks that).
struct OneThread {
    int saved;
    OneThread() : saved(omp_get_max_threads()) { omp_set_num_threads(1); }
    ~OneThread() { omp_set_num_threads(saved); }
};

// One MoeLayer on its own: a flat parameter vector, an input x (N, C), the objective
// f = sum(out * R) + aux + z + imp + load, so backward(dout = R) must give df/dparams and df/dx.
struct Rig {
    OneThread one_thread;
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
        : cfg(c), be(make_cpu_backend(0)), B(B_), T(T_) {
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
// a relative rounding error of ~1e-7..1e-6 (a few ulp through two small GEMMs), so f (N*C = 256
// terms of size ~1) is noisy at ~1e-6 absolute, i.e. up to ~3e-4 on a central difference over
// 2*eps = 6e-3. Truncation error (eps^2/6 * f''') is ~1e-5 relative at eps = 3e-3. Measured:
// the error grows as 1/eps below 3e-3 (rounding) and as eps^2 above 1e-2 (truncation), and is
// at most ~2e-4 at 3e-3. So |fd - analytic| <= ATOL + RTOL * |analytic| with ATOL = 4e-4 (2x the
// worst measured) and RTOL = 2e-3, small enough that a 1% gradient error fails on most entries
// (the negative control shows it).
constexpr double FD_EPS = 3e-3, FD_ATOL = 4e-4, FD_RTOL = 2e-3;

// Central differences of rig.objective() for every entry of the named tensors (all tensors if
// empty) and of x, against the analytic gradient times `gain` (1.01 for the negative control).
// Entries whose routing differs between the +eps and -eps evaluations are skipped (counted).
FdStats fd_check(Rig& rig, double gain = 1.0, const std::vector<std::string>& only = {}, bool with_x = true,
                 double atol = FD_ATOL) {
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
        const double tol = atol + FD_RTOL * std::fabs(an), err = std::fabs(fd - an);
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

void require_fd_ok(Rig& rig, const std::string& what, double atol = FD_ATOL) {
    rig.forward();
    if (rig.cfg.balance.load_loss > 0) {
        // the layer's load term equals the contract's formula at the base point ...
        rig.freeze_thresholds();
        CHECK(rig.stats().load == doctest::Approx(rig.load_frozen()).epsilon(1e-9));
    }
    FdStats st = fd_check(rig, 1.0, {}, true, atol);
    INFO(what << ": checked " << st.checked << ", skipped " << st.skipped << ", bad " << st.bad
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
        {{"router.noise=gaussian", "balance.load_loss=4.0", "model.moe.top_k=3"}, "balance.load_loss"},
    };
    // The LM part is scaled down 100x, so that each term is a large part of the router
    // gradient; its float noise shrinks with it, so the absolute tolerance can shrink too
    // (measured errors ~4e-6): 1% of these gradients (~5e-3..5e-2) is far above 2e-5.
    const float LM_SCALE = 0.01f;
    const double atol = 2e-5;
    for (const Case& c : cases) {
        std::string what = fmt::format("{}", fmt::join(c.sets, " "));
        Rig rig(moe_cfg(c.sets), 2, 16);
        for (float& v : rig.R) v *= LM_SCALE;
        require_fd_ok(rig, what, atol);
        require_term_matters(c.sets, c.coef, 2, 16, LM_SCALE);
        FdStats off = fd_check(rig, 1.01, {"router.weight"}, false, atol);   // negative control
        CHECK(off.bad * 2 > off.checked);
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
    OneThread one_thread;
    Config cfg = parse_config(R"(
model: {vocab_size: 32, seq_len: 8, n_layer: 2, n_head: 2, d_model: 8, d_ff: 16,
        moe: {experts: 4, top_k: 2, expert_ff: 6, shared_experts: 1, shared_ff: 4}}
router: {noise: gaussian, capacity_factor: 0.75}
balance: {aux_loss: 0.2, z_loss: 0.05, importance_loss: 0.2}
train: {batch_size: 2, threads: 1, seed: 3}
)", "gpt fd");
    auto be = make_cpu_backend(0);
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
    // The LM loss is recomputed in double from the float logits (noise ~1e-7 of ~3.5 per
    // token, averaged over 16 tokens), so over 2 * eps = 6e-3 the difference is good to ~1e-5;
    // measured errors are below 1e-5. ATOL 3e-5 and RTOL 2e-3 leave a 3x margin and still
    // fail a 1% error on every gradient above ~4e-3 (the negative control below).
    const double eps = 3e-3, atol = 3e-5, rtol = 2e-3;
    int checked = 0, skipped = 0, bad = 0, bad_1pct = 0, big = 0;
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
            if (std::fabs(an) > 4e-3) {
                big++;
                if (std::fabs(fd - 1.01 * an) > atol + rtol * std::fabs(1.01 * an)) bad_1pct++;
            }
            if (err / tol > worst_ratio) { worst_ratio = err / tol; worst = fmt::format("{}[{}] fd {} an {}", p.name, i, fd, an); }
        }
    }
    model.set_weights(w);
    INFO("checked " << checked << " skipped " << skipped << " bad " << bad << " worst " << worst_ratio << " " << worst
                    << "; 1% off: " << bad_1pct << " of " << big);
    CHECK(checked > 1000);
    CHECK(skipped * 10 <= checked + skipped);
    CHECK(bad == 0);
    CHECK(big > 100);
    CHECK(bad_1pct >= 0.95 * big);   // 1% errors are caught
}

// =========================================================================================
// 2. exact behaviour

namespace {

// FFN_e(v) of the routed experts, in double, from the rig's weights (docs/moe.md layout).
std::vector<double> ffn_ref(const Rig& rig, int e, const float* v) {
    const int C = rig.C, F = rig.cfg.model.moe.expert_ff;
    const bool swiglu = rig.cfg.model.moe.activation == "swiglu";
    const int Fh = swiglu ? 2 * F : F;
    const float* W1 = &rig.w[rig.param("experts.c_fc.weight").offset] + (size_t)e * Fh * C;
    const float* b1 = &rig.w[rig.param("experts.c_fc.bias").offset] + (size_t)e * Fh;
    const float* W2 = &rig.w[rig.param("experts.c_proj.weight").offset] + (size_t)e * C * F;
    const float* b2 = &rig.w[rig.param("experts.c_proj.bias").offset] + (size_t)e * C;
    std::vector<double> h(Fh), a(F), y(C);
    for (int f = 0; f < Fh; f++) {
        h[f] = b1[f];
        for (int c = 0; c < C; c++) h[f] += (double)W1[(size_t)f * C + c] * v[c];
    }
    for (int f = 0; f < F; f++) a[f] = swiglu ? silu_ref(h[f]) * h[F + f] : gelu_ref(h[f]);
    for (int c = 0; c < C; c++) {
        y[c] = b2[c];
        for (int f = 0; f < F; f++) y[c] += (double)W2[(size_t)c * F + f] * a[f];
    }
    return y;
}

// The layer output (no shared experts) recomputed from the kept choices of its routing.
void check_output_matches_kept(const Rig& rig) {
    const Routing& r = rig.routing();
    std::vector<double> want((size_t)rig.N * rig.C, 0.0);
    for (int m = 0; m < r.M; m++) {
        if (!r.kept[m]) continue;
        const int n = r.choice_token[m];
        std::vector<double> y = ffn_ref(rig, r.choice_expert[m], &rig.x[(size_t)n * rig.C]);
        for (int c = 0; c < rig.C; c++) want[(size_t)n * rig.C + c] += r.choice_gate[m] * y[c];
    }
    double worst = 0.0;
    for (size_t i = 0; i < want.size(); i++) worst = std::max(worst, std::fabs(want[i] - rig.out[i]));
    CHECK(worst < 1e-4);
}

// Capacity dropping as docs/moe.md states it, from the choices alone.
std::vector<uint8_t> expected_kept(const Routing& r, int cap, bool by_probs) {
    std::vector<uint8_t> kept(r.M, 1);
    if (cap <= 0) return kept;
    for (int e = 0; e < r.E; e++) {
        std::vector<int> ms;
        for (int m = 0; m < r.M; m++) if (r.choice_expert[m] == e) ms.push_back(m);
        if (by_probs)
            std::sort(ms.begin(), ms.end(), [&](int a, int b) {
                return r.choice_gate[a] != r.choice_gate[b] ? r.choice_gate[a] > r.choice_gate[b] : a < b;
            });
        for (size_t i = cap; i < ms.size(); i++) kept[ms[i]] = 0;
    }
    return kept;
}

Routing hand_routing() {
    // N = 5 tokens, E = 3, k = 2: (expert, gate) per choice m = n*k + j
    Routing r;
    r.N = 5; r.E = 3; r.M = 10;
    const int ex[10] = {0, 1, 0, 2, 0, 1, 1, 0, 0, 1};
    const float gt[10] = {0.6f, 0.4f, 0.5f, 0.5f, 0.7f, 0.3f, 0.6f, 0.4f, 0.5f, 0.5f};
    for (int m = 0; m < 10; m++) {
        r.choice_token.push_back(m / 2);
        r.choice_expert.push_back(ex[m]);
        r.choice_gate.push_back(gt[m]);
    }
    return r;
}

}  // namespace

TEST_CASE("moe capacity: hand-built routing drops exactly the expected assignments") {
    // expert 0 gets m 0 2 4 7 8 (gates .6 .5 .7 .4 .5), expert 1 m 1 5 6 9 (.4 .3 .6 .5), expert 2 m 3
    using K = std::vector<uint8_t>;
    Routing r = hand_routing();
    apply_capacity(r, 3, false);   // position: the 3 earliest per expert
    CHECK(r.kept == K{1, 1, 1, 1, 1, 1, 1, 0, 0, 0});
    apply_capacity(r, 2, false);
    CHECK(r.kept == K{1, 1, 1, 1, 0, 1, 0, 0, 0, 0});
    apply_capacity(r, 3, true);    // probs: largest gates; m 2 and m 8 tie at .5, m 2 is earlier
    CHECK(r.kept == K{1, 1, 1, 1, 1, 0, 1, 0, 0, 1});
    apply_capacity(r, 2, true);
    CHECK(r.kept == K{1, 0, 0, 1, 1, 0, 1, 0, 0, 1});
    apply_capacity(r, 0, true);    // dropless
    CHECK(r.kept == K(10, 1));
    apply_capacity(r, 5, true);    // capacity above every load
    CHECK(r.kept == K(10, 1));

    apply_capacity(r, 3, true);
    build_plan(r);
    const DispatchPlan& p = r.plan;
    CHECK(p.offsets == std::vector<int>{0, 3, 6, 7});
    CHECK(p.token == std::vector<int>{0, 1, 2, 0, 3, 4, 1});     // by expert, by token within
    CHECK(p.choice == std::vector<int>{0, 2, 4, 1, 6, 9, 3});
    CHECK(p.gate == std::vector<float>{0.6f, 0.5f, 0.7f, 0.4f, 0.6f, 0.5f, 0.5f});
    CHECK(p.tok_offsets == std::vector<int>{0, 2, 4, 5, 6, 7});
    CHECK(p.tok_assign == std::vector<int>{0, 3, 1, 6, 2, 4, 5});
}

TEST_CASE("moe capacity: through the layer, Cap = ceil(cf k N / E), both policies, eval factor") {
    for (const char* policy : {"probs", "position"}) {
        // N = 32, k = 2, E = 4: Cap = ceil(0.5 * 2 * 32 / 4) = 8 in training, ceil(0.3 * 16) = 5 at eval
        Rig rig(moe_cfg({"router.capacity_factor=0.5", "router.eval_capacity_factor=0.3",
                         std::string("router.drop_policy=") + policy}), 2, 16);
        for (bool training : {true, false}) {
            rig.training = training;
            rig.forward();
            const int cap = training ? 8 : 5;
            const Routing& r = rig.routing();
            const MoeStats& st = rig.stats();
            INFO(policy << (training ? " training" : " eval"));
            CHECK(r.kept == expected_kept(r, cap, std::string(policy) == "probs"));
            double dropped = 0;
            for (int e = 0; e < 4; e++) {
                CHECK(st.kept[e] == std::min(st.routed[e], (double)cap));
                dropped += std::max(0.0, st.routed[e] - cap);
            }
            CHECK(dropped > 0);
            CHECK(st.dropped == dropped);
            // normalisation happened before dropping: a token's gates still sum to 1
            for (int n = 0; n < r.N; n++) CHECK(r.choice_gate[2 * n] + r.choice_gate[2 * n + 1] == doctest::Approx(1.0));
            check_output_matches_kept(rig);
        }
    }
}

TEST_CASE("moe dropless: capacity_factor 0 keeps every assignment, even when routing is skewed") {
    for (double cf : {0.0, 1.0}) {
        Rig rig(moe_cfg({fmt::format("router.capacity_factor={}", cf)}), 2, 16);
        // every token gets a large component along u, and expert 0's router row is along u
        const ParamTensor& W = rig.param("router.weight");
        for (int c = 0; c < rig.C; c++) rig.w[W.offset + c] = 2.0f;
        for (int n = 0; n < rig.N; n++) for (int c = 0; c < rig.C; c++) rig.x[(size_t)n * rig.C + c] += 1.0f;
        rig.forward();
        const MoeStats& st = rig.stats();
        CHECK(st.routed[0] == rig.N);   // every token picked expert 0
        if (cf == 0.0) {
            CHECK(st.dropped == 0);
            CHECK(rig.routing().plan.kept() == rig.routing().M);
            CHECK(st.kept == st.routed);
            check_output_matches_kept(rig);
        } else {
            CHECK(st.dropped >= rig.N - 16);   // Cap = 16: the same skew drops with cf = 1
        }
    }
}

TEST_CASE("moe expert choice: every expert takes exactly its capacity, top tokens by score") {
    for (double ecc : {0.5, 1.0, 1.5, 3.0, 10.0}) {
        Rig rig(moe_cfg({"router.type=expert_choice", fmt::format("router.expert_choice_capacity={}", ecc),
                         "router.scale=2"}), 2, 16);
        rig.forward();
        const Routing& r = rig.routing();
        const int N = rig.N, E = rig.E, cap = std::min(N, (int)std::ceil(ecc * N / E));
        INFO("capacity " << ecc << " -> " << cap);
        CHECK(r.M == E * cap);
        CHECK(rig.stats().dropped == 0);
        for (int e = 0; e < E; e++) {
            CHECK(r.plan.offsets[e + 1] - r.plan.offsets[e] == cap);
            std::vector<int> order(N);
            std::iota(order.begin(), order.end(), 0);
            std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return r.s[(size_t)a * E + e] > r.s[(size_t)b * E + e]; });
            std::vector<int> want(order.begin(), order.begin() + cap);
            std::sort(want.begin(), want.end());
            std::vector<int> got(r.plan.token.begin() + r.plan.offsets[e], r.plan.token.begin() + r.plan.offsets[e + 1]);
            CHECK(got == want);
            for (int a = r.plan.offsets[e]; a < r.plan.offsets[e + 1]; a++)
                CHECK(r.plan.gate[a] == doctest::Approx(2.0 * r.s[(size_t)r.plan.token[a] * E + e]));
        }
        check_output_matches_kept(rig);
    }
    // ties go to the lower token index
    Routing r;
    r.N = 4; r.E = 2;
    r.s = {0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 0.9f, 0.1f};
    select_expert_choice(r, 2);
    CHECK(r.choice_token == std::vector<int>{3, 0, 0, 1});
}

TEST_CASE("moe hash: table lookup, deterministic, seeded random table") {
    OneThread one_thread;
    Config cfg = moe_cfg({"router.type=hash", "model.moe.top_k=1", "model.moe.experts=4"});
    auto be = make_cpu_backend(0);
    GPT a(cfg, *be), b(cfg, *be), c(cfg, *be);
    a.init_weights(7); b.init_weights(7); c.init_weights(8);
    const std::vector<int32_t>& ta = a.moe_layers()[0]->hash_table();
    CHECK(ta.size() == 32);
    CHECK(ta == b.moe_layers()[0]->hash_table());
    CHECK(ta != c.moe_layers()[0]->hash_table());
    std::set<int> used(ta.begin(), ta.end());
    CHECK(used.size() == 4);
    for (int32_t e : ta) CHECK((e >= 0 && e < 4));

    Rig rig(cfg, 2, 16);
    rig.forward();
    std::vector<float> out1 = rig.out;
    std::vector<int> sig1 = routing_signature(rig.routing());
    const Routing& r = rig.routing();
    for (int n = 0; n < rig.N; n++) {
        CHECK(r.choice_expert[n] == rig.layer->hash_table()[rig.tok[n]]);
        CHECK(r.choice_gate[n] == 1.0f);
    }
    rig.forward();
    CHECK(rig.out == out1);
    for (float& v : rig.x) v = -2.0f * v;          // routing ignores the activations
    rig.forward();
    CHECK(routing_signature(rig.routing()) == sig1);
    check_output_matches_kept(rig);
}

TEST_CASE("moe hash: balanced table (greedy by frequency) on hand-made and real counts") {
    OneThread one_thread;
    // counts 5 3 3 1 0 over 2 experts: 0->e0 (5,0), 1->e1 (5,3), 2->e1 (5,6), 3->e0 (6,6), 4->e0 (tie)
    CHECK(balanced_hash_table({5, 3, 3, 1, 0}, 2) == std::vector<int32_t>{0, 1, 1, 0, 0});
    // ties in count go by id (ids 0 and 1 have count 2, id 0 first), ties in load to the lower expert
    CHECK(balanced_hash_table({2, 2, 1}, 2) == std::vector<int32_t>{0, 1, 0});
    CHECK(balanced_hash_table({1, 3, 3}, 2) == std::vector<int32_t>{0, 0, 1});

    TempDir dir;
    synth_corpus(dir / "data", 60000, 3, 0.3);
    Config cfg = parse_config(fmt::format(R"(
model: {{vocab_size: 256, seq_len: 16, n_layer: 1, n_head: 2, d_model: 8, d_ff: 16,
        moe: {{experts: 4, top_k: 1, expert_ff: 8}}}}
router: {{type: hash, hash: balanced}}
train: {{batch_size: 2, steps: 1, eval_every: 0, eval_batches: 1, ckpt_every: 0, out_dir: {}, threads: 1}}
data: {{train: {}/train_*.bin, val: {}/val_*.bin}}
)", dir / "run", dir / "data", dir / "data"), "hash balanced");
    TrainOptions opt;
    opt.quiet = true;
    run_training(cfg, opt);
    auto be = make_cpu_backend(0);
    LoadedModel lm = load_model(checkpoint_path(dir / "run", 1), *be);
    const std::vector<int32_t> table = lm.model->moe_layers()[0]->hash_table();
    REQUIRE(table.size() == 256);
    std::vector<double> counts(256, 0.0);
    double total = 0;
    for (const std::string& f : expand_glob(dir / "data/train_*.bin", "train"))
        for (uint16_t t : read_shard(f)) { counts[t] += 1; total += 1; }
    std::vector<double> load(4, 0.0);
    for (int v = 0; v < 256; v++) load[table[v]] += counts[v];
    const double ratio = *std::max_element(load.begin(), load.end()) / (total / 4);
    INFO("max/mean expert load " << ratio);
    CHECK(ratio <= 1.05);
    // the same greedy, written again from the contract
    std::vector<int> ids(256);
    std::iota(ids.begin(), ids.end(), 0);
    std::sort(ids.begin(), ids.end(), [&](int a, int b) { return counts[a] != counts[b] ? counts[a] > counts[b] : a < b; });
    std::vector<double> acc(4, 0.0);
    std::vector<int32_t> want(256);
    for (int v : ids) {
        int best = 0;
        for (int e = 1; e < 4; e++) if (acc[e] < acc[best]) best = e;
        want[v] = best;
        acc[best] += counts[v];
    }
    CHECK(table == want);
}

TEST_CASE("moe group-limited: choices never leave the best groups") {
    struct Case { int E, k, G, tg; bool bias; };
    for (Case cs : {Case{8, 4, 4, 2, false}, Case{8, 4, 4, 3, false}, Case{8, 2, 4, 1, false}, Case{12, 4, 3, 2, true}}) {
        std::vector<std::string> sets = {fmt::format("model.moe.experts={}", cs.E), fmt::format("model.moe.top_k={}", cs.k),
                                         fmt::format("router.groups={}", cs.G), fmt::format("router.topk_groups={}", cs.tg)};
        if (cs.bias) sets.push_back("balance.bias_rate=0.01");
        Rig rig(moe_cfg(sets), 8, 32);   // 256 tokens
        if (cs.bias) { Rng br(3); for (float& b : rig.layer->expert_bias()) b = 0.3f * br.normal(); }
        rig.forward();
        const Routing& r = rig.routing();
        const int E = cs.E, k = cs.k, Eg = E / cs.G, per = std::max(1, k / cs.tg);
        int outside_plain = 0;
        for (int n = 0; n < rig.N; n++) {
            std::vector<double> sel(E);
            for (int e = 0; e < E; e++) sel[e] = (double)r.s[(size_t)n * E + e] + (cs.bias ? rig.layer->expert_bias()[e] : 0.0);
            std::vector<std::pair<double, int>> gs;
            for (int g = 0; g < cs.G; g++) {
                std::vector<double> v(sel.begin() + g * Eg, sel.begin() + (g + 1) * Eg);
                std::sort(v.rbegin(), v.rend());
                gs.push_back({-std::accumulate(v.begin(), v.begin() + per, 0.0), g});
            }
            std::sort(gs.begin(), gs.end());
            std::set<int> groups;
            for (int t = 0; t < cs.tg; t++) groups.insert(gs[t].second);
            std::vector<std::pair<double, int>> allowed, all;
            for (int e = 0; e < E; e++) {
                all.push_back({-sel[e], e});
                if (groups.count(e / Eg)) allowed.push_back({-sel[e], e});
            }
            std::sort(allowed.begin(), allowed.end());
            std::sort(all.begin(), all.end());
            std::set<int> want, got, plain;
            for (int j = 0; j < k; j++) {
                want.insert(allowed[j].second);
                plain.insert(all[j].second);
                got.insert(r.choice_expert[(size_t)n * k + j]);
            }
            for (int e : got) CHECK(groups.count(e / Eg) == 1);
            CHECK(got == want);
            outside_plain += plain != want;
        }
        INFO("E " << cs.E << " k " << cs.k << " groups " << cs.G << "/" << cs.tg);
        CHECK(outside_plain > 10);    // the restriction actually changed many tokens' choices
        // gates come from the scores, never the biased selection scores
        for (int m = 0; m < r.M; m++) {
            double S = 0;
            const int n = r.choice_token[m];
            for (int j = 0; j < k; j++) S += r.s[(size_t)n * E + r.choice_expert[(size_t)n * k + j]];
            CHECK(r.choice_gate[m] == doctest::Approx(r.s[(size_t)n * E + r.choice_expert[m]] / S));
        }
    }
}

TEST_CASE("moe balancing terms: values on hand-built routings") {
    BalanceConfig bal;
    bal.aux_loss = 0.01;
    // 8 tokens in 2 sequences of 4, E = 4, k = 1; in each sequence token t prefers expert t
    Routing r;
    r.N = 8; r.E = 4; r.M = 8;
    for (int n = 0; n < 8; n++) {
        for (int e = 0; e < 4; e++) r.s.push_back(e == n % 4 ? 0.7f : 0.1f);
        r.choice_token.push_back(n);
        r.choice_expert.push_back(n % 4);
    }
    r.routed = {2, 2, 2, 2};
    r.z.assign(32, 0.0f);
    MoeStats st;
    balance_forward(st, r, bal, 1, 4, {});
    CHECK(st.aux == doctest::Approx(0.01).epsilon(1e-6));     // perfect balance gives alpha
    bal.aux_scope = "sequence";
    balance_forward(st, r, bal, 1, 4, {});
    CHECK(st.aux == doctest::Approx(0.01).epsilon(1e-6));
    // all to expert 0: f = (1, 0, 0, 0), P_0 = 0.25 -> alpha * E * 0.25 = alpha
    // with k = 2, half of each token's choices on expert 0: the same f as (k N) normalises
    bal.aux_scope = "micro_batch";
    for (int n = 0; n < 8; n++) r.choice_expert[n] = 0;
    r.routed = {8, 0, 0, 0};
    balance_forward(st, r, bal, 1, 4, {});
    CHECK(st.aux == doctest::Approx(0.01 * 4 * 0.25).epsilon(1e-6));
    for (int n = 0; n < 8; n++) for (int e = 0; e < 4; e++) r.s[n * 4 + e] = e == 0 ? 0.7f : 0.1f;
    balance_forward(st, r, bal, 1, 4, {});
    CHECK(st.aux == doctest::Approx(0.01 * 4 * 0.7).epsilon(1e-6));
    // importance CV^2 (population variance): Imp = (5.6, 0.8, 0.8, 0.8), mean 2
    BalanceConfig imp;
    imp.importance_loss = 0.5;
    balance_forward(st, r, imp, 1, 4, {});
    const double var = (3.6 * 3.6 + 3 * 1.2 * 1.2) / 4;
    CHECK(st.imp == doctest::Approx(0.5 * var / 4.0).epsilon(1e-5));
    // z loss: beta * mean lse^2; z rows (0, 0, 0, 0) have lse = log 4
    BalanceConfig zc;
    zc.z_loss = 0.1;
    balance_forward(st, r, zc, 1, 4, {});
    CHECK(st.z == doctest::Approx(0.1 * std::log(4.0) * std::log(4.0)).epsilon(1e-6));
    CHECK(st.aux == 0.0);
}

TEST_CASE("moe bias: centring, sign(0) = 0, not a parameter, no gradient, untouched by AdamW") {
    OneThread one_thread;
    Rig rig(moe_cfg({"balance.bias_rate=0.1"}), 2, 16);
    std::vector<float>& b = rig.layer->expert_bias();
    REQUIRE(b.size() == 4);
    rig.layer->update_bias({10, 3, 3, 0});                 // mean 4: signs - + + +
    CHECK(b == std::vector<float>{-0.1f, 0.1f, 0.1f, 0.1f});
    rig.layer->update_bias({4, 4, 2, 6});                  // sign(0) = 0
    CHECK(b[0] == doctest::Approx(-0.1));
    CHECK(b[1] == doctest::Approx(0.1));
    CHECK(b[2] == doctest::Approx(0.2));
    CHECK(b[3] == doctest::Approx(0.0));

    Rig cen(moe_cfg({"balance.bias_rate=0.1", "balance.bias_center=true"}), 2, 16);
    std::vector<float>& bc = cen.layer->expert_bias();
    cen.layer->update_bias({10, 3, 3, 0});                 // raw (-0.1, .1, .1, .1), mean 0.05
    CHECK(bc[0] == doctest::Approx(-0.15));
    CHECK(bc[1] == doctest::Approx(0.05));
    double sum = std::accumulate(bc.begin(), bc.end(), 0.0);
    CHECK(std::fabs(sum) < 1e-7);
    Rng ur(5);
    for (int it = 0; it < 20; it++) {
        std::vector<double> routed(4);
        for (double& v : routed) v = ur.next_u32() % 7;
        std::vector<float> before = bc;
        cen.layer->update_bias(routed);
        double s = 0;
        for (int e = 0; e < 4; e++) s += (double)bc[e] - before[e];
        CHECK(std::fabs(s) < 1e-6);
    }

    // the bias only selects: shifting every expert equally changes nothing, bit for bit
    std::vector<float> g0, dx0, g1, dx1;
    std::fill(b.begin(), b.end(), 0.0f);
    rig.gradients(g0, dx0);
    std::vector<float> out0 = rig.out;
    std::fill(b.begin(), b.end(), 0.25f);
    rig.gradients(g1, dx1);
    CHECK(rig.out == out0);
    CHECK(g1 == g0);
    CHECK(dx1 == dx0);
    // a bias that forces expert 3 into every token's choice: gates are still the scores
    b = {0.0f, 0.0f, 0.0f, 2.0f};
    rig.forward();
    const Routing& r = rig.routing();
    for (int n = 0; n < rig.N; n++) {
        CHECK(r.choice_expert[2 * n] == 3);
        int other = r.choice_expert[2 * n + 1];
        double s3 = r.s[(size_t)n * 4 + 3], so = r.s[(size_t)n * 4 + other];
        CHECK(r.choice_gate[2 * n] == doctest::Approx(s3 / (s3 + so)));
    }
    // gradients with a random nonzero bias are still those of the unbiased formula
    Rng br(2);
    for (float& v : b) v = 0.2f * br.normal();
    require_fd_ok(rig, "topk with expert bias");

    // in a GPT: a buffer, not a parameter; AdamW leaves it alone
    Config cfg = moe_cfg({"balance.bias_rate=0.1"});
    auto be = make_cpu_backend(0);
    GPT model(cfg, *be);
    model.init_weights(1);
    for (const ParamTensor& p : model.params()) CHECK(p.name.find("expert_bias") == std::string::npos);
    std::vector<GPT::Buffer> bufs = model.buffers();
    REQUIRE(bufs.size() == 1);
    CHECK(bufs[0].name == "h.0.moe.router.expert_bias");
    std::vector<float>& mb = model.moe_layers()[0]->expert_bias();
    mb = {0.3f, -0.1f, 0.05f, 0.0f};
    AdamW adamw(model, cfg.train);
    std::vector<int> inp(32), tgt(32);
    for (int i = 0; i < 32; i++) { inp[i] = i % 32; tgt[i] = (i * 5) % 32; }
    std::vector<float> w0 = model.get_weights();
    model.zero_grad();
    model.forward(inp.data(), tgt.data(), 2, 16);
    model.backward(1.0f);
    adamw.step(1e-2f);
    CHECK(model.get_weights() != w0);
    CHECK(mb == std::vector<float>{0.3f, -0.1f, 0.05f, 0.0f});
}

TEST_CASE("moe bias: the aux-loss-free controller alone pulls MaxVio down") {
    OneThread one_thread;
    TempDir dir;
    write_tiny_corpus(dir.path, 64, 20000, 4000);
    // Router weights 10x the init (std 0.2: token logits differ by O(1), so the bias can move
    // some tokens and not others) and a +3 skew on expert 0's logit for every token.
    const float ROUTER_GAIN = 10.0f, SKEW = 3.0f;
    const double RATE = 0.02;
    auto run = [&](double rate, std::vector<float>* bias_out) {
        Config cfg = parse_config(fmt::format(R"(
model: {{vocab_size: 64, seq_len: 32, n_layer: 1, n_head: 2, d_model: 16, d_ff: 32,
        moe: {{experts: 4, top_k: 1, expert_ff: 16}}}}
balance: {{bias_rate: {}}}
train: {{batch_size: 4, steps: 30, lr: 1.0e-3, min_lr: 1.0e-3, warmup: 0, threads: 1}}
data: {{train: {}/train_*.bin, val: {}/val_*.bin}}
)", rate, dir.path, dir.path), "bias run");
        auto be = make_cpu_backend(0);
        GPT model(cfg, *be);
        model.init_weights(1);
        // Skew: ln_2 output = xhat + 1 (bias 1), and expert 0's router row gets +SKEW/C in every
        // entry, so z_0 += SKEW/C * (sum xhat + C) = SKEW for every token (sum xhat = 0).
        std::vector<float> w = model.get_weights();
        const ParamTensor& lb = model.param("h.0.ln_2.bias");
        for (size_t i = 0; i < lb.numel; i++) w[lb.offset + i] = 1.0f;
        const ParamTensor& rw = model.param("h.0.moe.router.weight");
        for (size_t i = 0; i < rw.numel; i++) w[rw.offset + i] *= ROUTER_GAIN;
        for (int c = 0; c < 16; c++) w[rw.offset + c] += SKEW / 16;
        model.set_weights(w);
        DataLoader train(cfg.data.train, 4, 32, 64, 0, 1, "train");
        AdamW adamw(model, cfg.train);
        std::vector<int> inp(128), tgt(128);
        std::vector<double> maxvio;
        MoeLayer* m = model.moe_layers()[0];
        for (int step = 0; step < 30; step++) {
            m->begin_step();
            train.next_batch(inp.data(), tgt.data());
            model.zero_grad();
            model.forward(inp.data(), tgt.data(), 4, 32);
            model.backward(1.0f);
            adamw.step((float)lr_at(cfg.train, step));
            maxvio.push_back(load_stats(m->step_routed()).maxvio);
            m->update_bias(m->step_routed());
        }
        if (bias_out) *bias_out = m->expert_bias();
        return maxvio;
    };
    std::vector<float> bias;
    std::vector<double> without = run(0.0, nullptr), with = run(RATE, &bias);
    auto tail_mean = [](const std::vector<double>& v) { return std::accumulate(v.end() - 10, v.end(), 0.0) / 10; };
    INFO("maxvio first " << without[0] << " / " << with[0] << ", last-10 mean without " << tail_mean(without)
                         << ", with " << tail_mean(with));
    CHECK(without[0] > 2.0);                          // the skew is real: ~all tokens on expert 0
    CHECK(with[0] == doctest::Approx(without[0]));    // same start
    CHECK(tail_mean(without) > 1.5);                  // training alone does not fix it in 30 steps
    CHECK(tail_mean(with) < 0.25 * tail_mean(without));
    CHECK(bias[0] < *std::min_element(bias.begin() + 1, bias.end()));   // expert 0 pushed down
}

// =========================================================================================
// 3. plan invariants

namespace {

// Everything the dispatch plan promises, checked against the routing's choices.
void check_plan(const Routing& r) {
    const DispatchPlan& p = r.plan;
    const int A = p.kept();
    REQUIRE(p.offsets.size() == (size_t)r.E + 1);
    CHECK(p.offsets[0] == 0);
    for (int e = 0; e < r.E; e++) CHECK(p.offsets[e] <= p.offsets[e + 1]);
    const int kept = std::accumulate(r.kept.begin(), r.kept.end(), 0);
    CHECK(p.offsets[r.E] == kept);
    CHECK(A == kept);
    CHECK((p.gate.size() == (size_t)A && p.choice.size() == (size_t)A && p.tok_assign.size() == (size_t)A));
    std::vector<int> seen(r.M, 0);
    for (int e = 0; e < r.E; e++)
        for (int a = p.offsets[e]; a < p.offsets[e + 1]; a++) {
            const int m = p.choice[a];
            REQUIRE((m >= 0 && m < r.M));
            seen[m]++;
            CHECK(r.kept[m] == 1);
            CHECK(r.choice_expert[m] == e);
            CHECK(r.choice_token[m] == p.token[a]);
            CHECK(p.gate[a] == r.choice_gate[m]);
            if (a > p.offsets[e]) CHECK(p.token[a - 1] <= p.token[a]);   // by token within an expert
        }
    for (int m = 0; m < r.M; m++) CHECK(seen[m] == (int)r.kept[m]);   // each kept choice exactly once
    // token CSR: token n lists exactly its kept assignments
    REQUIRE(p.tok_offsets.size() == (size_t)r.N + 1);
    CHECK(p.tok_offsets[0] == 0);
    CHECK(p.tok_offsets[r.N] == A);
    for (int n = 0; n < r.N; n++) {
        CHECK(p.tok_offsets[n] <= p.tok_offsets[n + 1]);
        std::multiset<int> got, want;
        for (int i = p.tok_offsets[n]; i < p.tok_offsets[n + 1]; i++) {
            got.insert(p.choice[p.tok_assign[i]]);
            CHECK(p.token[p.tok_assign[i]] == n);
        }
        for (int m = 0; m < r.M; m++) if (r.kept[m] && r.choice_token[m] == n) want.insert(m);
        CHECK(got == want);
    }
    // routed counts are the selections before dropping
    std::vector<double> routed(r.E, 0.0);
    for (int m = 0; m < r.M; m++) routed[r.choice_expert[m]] += 1;
    CHECK(r.routed == routed);
}

}  // namespace

TEST_CASE("moe plan invariants: random hand-built routings, both policies") {
    Rng rng(17);
    for (int it = 0; it < 200; it++) {
        Routing r;
        r.N = 1 + rng.next_u32() % 40;
        r.E = 1 + rng.next_u32() % 9;
        const int per = 1 + rng.next_u32() % 3;
        r.M = r.N * per;
        for (int m = 0; m < r.M; m++) {
            r.choice_token.push_back(rng.next_u32() % 3 == 0 ? (int)(rng.next_u32() % r.N) : m / per);  // any order
            r.choice_expert.push_back(rng.next_u32() % r.E);
            r.choice_gate.push_back((rng.next_u32() % 5) * 0.25f);   // many ties
        }
        r.routed.assign(r.E, 0.0);
        for (int e : r.choice_expert) r.routed[e] += 1;
        const int cap = rng.next_u32() % (r.M + 1);
        const bool by_probs = rng.next_u32() % 2;
        apply_capacity(r, cap, by_probs);
        CHECK(r.kept == expected_kept(r, cap, by_probs));
        build_plan(r);
        check_plan(r);
        if (cap > 0)
            for (int e = 0; e < r.E; e++) CHECK(r.plan.offsets[e + 1] - r.plan.offsets[e] <= cap);
    }
}

TEST_CASE("moe plan invariants: every router type through the layer, several batch shapes") {
    const std::vector<std::vector<std::string>> types = {
        {},
        {"router.score=sigmoid", "router.normalize_topk=false", "router.scale=2"},
        {"model.moe.experts=8", "model.moe.top_k=3", "router.groups=4", "router.topk_groups=2"},
        {"router.noise=gaussian", "router.capacity_factor=0.7"},
        {"router.noise=jitter", "router.capacity_factor=0.6", "router.drop_policy=position"},
        {"router.type=sinkhorn"},
        {"router.type=sinkhorn", "router.capacity_factor=0.5"},
        {"router.type=expert_choice", "router.expert_choice_capacity=0.75"},
        {"router.type=expert_choice", "router.expert_choice_capacity=2", "router.score=sigmoid"},
        {"router.type=hash", "model.moe.top_k=1"},
        {"router.type=hash", "model.moe.top_k=1", "router.capacity_factor=1.0"},
        {"balance.bias_rate=0.1", "model.moe.top_k=1", "router.capacity_factor=1.0", "router.drop_policy=position"},
        {"model.moe.top_k=4", "router.capacity_factor=0.4"},
        {"model.moe.experts=1", "model.moe.top_k=1", "router.capacity_factor=0.5", "balance.aux_loss=0.1"},
        {"router.type=soft"},
    };
    for (const auto& sets : types) {
        Config cfg = moe_cfg(sets);
        const std::string what = fmt::format("{}", fmt::join(sets, " "));
        Rig rig(cfg, 4, 16);
        const int k = cfg.model.moe.top_k, E = cfg.model.moe.experts;
        if (rig.layer->has_bias()) { Rng br(4); for (float& b : rig.layer->expert_bias()) b = 0.2f * br.normal(); }
        Rng xr(23);
        // shapes in an order that grows and shrinks the layer's buffers
        for (auto [B, T] : {std::pair{1, 5}, {4, 16}, {2, 3}, {3, 16}, {1, 1}}) {
            rig.B = B; rig.T = T; rig.N = B * T;
            rig.x.resize((size_t)rig.N * rig.C);
            for (float& v : rig.x) v = xr.normal();
            rig.out.assign(rig.x.size(), 0.0f);
            rig.tok.resize(rig.N);
            for (int& t : rig.tok) t = (int)(xr.next_u32() % 32);
            for (bool training : {true, false}) {
                rig.training = training;
                rig.forward();
                INFO(what << " B " << B << " T " << T << (training ? " training" : " eval"));
                const Routing& r = rig.routing();
                const MoeStats& st = rig.stats();
                REQUIRE(r.N == rig.N);
                if (cfg.router.type == "soft") {   // no plan: every expert gets B * slots rows
                    CHECK(st.routed == std::vector<double>(E, (double)B * cfg.router.soft_slots));
                    CHECK(st.dropped == 0);
                    continue;
                }
                check_plan(r);
                CHECK(st.dropped + r.plan.kept() == r.M);
                CHECK(st.assignments == r.M);
                CHECK(st.routed == r.routed);
                for (int e = 0; e < E; e++) CHECK(st.kept[e] == r.plan.offsets[e + 1] - r.plan.offsets[e]);
                if (cfg.router.type == "expert_choice") {
                    const int cap = std::min(rig.N, (int)std::ceil(cfg.router.expert_choice_capacity * rig.N / E));
                    CHECK(r.M == E * cap);
                    for (int m = 0; m < r.M; m++) CHECK(r.choice_expert[m] == m / cap);
                    for (int m = 0; m < r.M; m++)
                        CHECK(r.choice_gate[m] == doctest::Approx(cfg.router.scale * r.s[(size_t)r.choice_token[m] * E + r.choice_expert[m]]));
                } else {
                    const int kk = cfg.router.type == "hash" ? 1 : k;
                    CHECK(r.M == rig.N * kk);
                    for (int n = 0; n < rig.N; n++) {
                        std::set<int> ex;
                        double gsum = 0, ssum = 0;
                        for (int j = 0; j < kk; j++) {
                            CHECK(r.choice_token[n * kk + j] == n);
                            ex.insert(r.choice_expert[n * kk + j]);
                            gsum += r.choice_gate[n * kk + j];
                            if (cfg.router.type != "hash") ssum += r.s[(size_t)n * E + r.choice_expert[n * kk + j]];
                        }
                        CHECK(ex.size() == (size_t)kk);   // k distinct experts
                        if (cfg.router.type == "hash") CHECK(gsum == 1.0);
                        else if (cfg.router.normalize_topk) CHECK(gsum == doctest::Approx(cfg.router.scale));
                        else CHECK(gsum == doctest::Approx(cfg.router.scale * ssum));
                    }
                    const double cf = training ? cfg.router.capacity_factor : cfg.router.eval_capacity_factor;
                    const int cap = cf > 0 ? (int)std::ceil(cf * kk * rig.N / E) : 0;
                    CHECK(r.kept == expected_kept(r, cap, cfg.router.drop_policy == "probs"));
                }
                check_output_matches_kept(rig);
            }
        }
    }
}

TEST_CASE("moe plan: soft moe has a full, even load and no drops") {
    Rig rig(moe_cfg({"router.type=soft", "router.soft_slots=3"}), 2, 16);
    rig.forward();
    const MoeStats& st = rig.stats();
    CHECK(st.routed == std::vector<double>(4, 2 * 3));
    CHECK(st.kept == st.routed);
    CHECK(st.dropped == 0);
    CHECK(st.aux == 0);
    CHECK(st.tokens == 32);
}

// =========================================================================================
// forward values against the contract, computed again here in double

namespace {

// Top-k of v (ties: lower index), as a sorted set.
std::set<int> topk_set(const std::vector<double>& v, int k) {
    std::vector<int> idx(v.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return v[a] > v[b]; });
    return std::set<int>(idx.begin(), idx.begin() + k);
}

// docs/moe.md step 7, in double.
std::vector<double> sinkhorn_ref(const std::vector<float>& z, int N, int E) {
    std::vector<double> P((size_t)N * E);
    for (int n = 0; n < N; n++) {
        double mx = *std::max_element(&z[(size_t)n * E], &z[(size_t)n * E] + E);
        for (int e = 0; e < E; e++) P[(size_t)n * E + e] = std::exp(z[(size_t)n * E + e] - mx);
    }
    for (int it = 0; it < 100; it++) {
        std::vector<double> col(E, 0.0);
        for (int n = 0; n < N; n++) for (int e = 0; e < E; e++) col[e] += P[(size_t)n * E + e];
        double dev = 0.0;
        for (int e = 0; e < E; e++) dev += std::fabs(col[e] * E / N - 1.0) / E;
        if (dev < 1e-4) break;
        for (int n = 0; n < N; n++) for (int e = 0; e < E; e++) P[(size_t)n * E + e] *= ((double)N / E) / col[e];
        for (int n = 0; n < N; n++) {
            double row = 0.0;
            for (int e = 0; e < E; e++) row += P[(size_t)n * E + e];
            for (int e = 0; e < E; e++) P[(size_t)n * E + e] /= row;
        }
    }
    return P;
}

}  // namespace

TEST_CASE("moe router forward: logits, noise, scores, selection, gates and stats follow the contract") {
    const std::vector<std::vector<std::string>> configs = {
        {},
        {"router.score=sigmoid", "router.normalize_topk=false", "router.scale=2"},
        {"router.score=sigmoid", "router.scale=0.5"},
        {"router.noise=gaussian"},
        {"router.noise=jitter", "router.jitter_eps=0.3"},
        {"balance.bias_rate=0.1"},
        {"router.type=sinkhorn"},
        {"model.moe.top_k=1", "model.moe.experts=6"},
    };
    for (const auto& sets : configs) {
        Config cfg = moe_cfg(sets);
        Rig rig(cfg, 2, 16);
        if (rig.layer->has_bias()) { Rng br(8); for (float& b : rig.layer->expert_bias()) b = 0.3f * br.normal(); }
        const int N = rig.N, C = rig.C, E = rig.E, k = rig.k;
        const RouterConfig& rc = cfg.router;
        for (bool training : {true, false}) {
            rig.training = training;
            rig.forward();
            INFO(fmt::format("{}", fmt::join(sets, " ")) << (training ? " training" : " eval"));
            const Routing& r = rig.routing();
            const bool jitter = training && rc.noise == "jitter", noisy = training && rc.noise == "gaussian";
            CHECK(rig.layer->last_jitter().size() == (jitter ? (size_t)N * C : 0));
            CHECK(r.eps.size() == (noisy ? (size_t)N * E : 0));
            for (float m : rig.layer->last_jitter()) CHECK((m >= 1 - rc.jitter_eps && m <= 1 + rc.jitter_eps));
            const float* W = &rig.w[rig.param("router.weight").offset];
            double top1_sum = 0.0, zsq = 0.0;
            std::vector<double> zrow(E), srow(E);
            std::vector<std::vector<double>> s_all(N, std::vector<double>(E));
            for (int n = 0; n < N; n++) {
                for (int e = 0; e < E; e++) {
                    double zc = 0.0, pre = 0.0;
                    for (int c = 0; c < C; c++) {
                        double xv = rig.x[(size_t)n * C + c] * (jitter ? rig.layer->last_jitter()[(size_t)n * C + c] : 1.0f);
                        zc += xv * W[(size_t)e * C + c];
                        if (noisy) pre += xv * rig.w[rig.param("noise_weight").offset + (size_t)e * C + c];
                    }
                    CHECK(r.z_clean[(size_t)n * E + e] == doctest::Approx(zc).epsilon(1e-5));
                    zrow[e] = noisy ? zc + r.eps[(size_t)n * E + e] * std::log1p(std::exp(pre)) : zc;
                    CHECK(r.z[(size_t)n * E + e] == doctest::Approx(zrow[e]).epsilon(1e-5));
                }
                double mx = *std::max_element(zrow.begin(), zrow.end()), sum = 0.0;
                for (int e = 0; e < E; e++) sum += std::exp(zrow[e] - mx);
                zsq += std::pow(mx + std::log(sum), 2);
                for (int e = 0; e < E; e++) {
                    srow[e] = rc.score == "sigmoid" ? 1.0 / (1.0 + std::exp(-zrow[e])) : std::exp(zrow[e] - mx) / sum;
                    CHECK(r.s[(size_t)n * E + e] == doctest::Approx(srow[e]).epsilon(1e-5));
                }
                s_all[n] = srow;
                std::vector<double> sel(E);
                for (int e = 0; e < E; e++) sel[e] = r.s[(size_t)n * E + e] + (rig.layer->has_bias() ? rig.layer->expert_bias()[e] : 0.0f);
                std::set<int> got;
                double S = 0.0;
                for (int j = 0; j < k; j++) { got.insert(r.choice_expert[n * k + j]); S += srow[r.choice_expert[n * k + j]]; }
                if (rc.type == "topk" || !training) CHECK(got == topk_set(sel, k));
                double top1 = 0.0;
                for (int j = 0; j < k; j++) {
                    const int e = r.choice_expert[n * k + j];
                    const double want = rc.scale * (rc.normalize_topk ? srow[e] / S : srow[e]);
                    CHECK(r.choice_gate[n * k + j] == doctest::Approx(want).epsilon(1e-5));
                    top1 = std::max(top1, want);
                }
                top1_sum += top1;
            }
            if (rc.type == "sinkhorn" && training) {
                std::vector<double> P = sinkhorn_ref(r.z, N, E);
                std::vector<float> got = sinkhorn_balance(r.z, N, E);
                for (size_t i = 0; i < P.size(); i++) CHECK(got[i] == doctest::Approx(P[i]).epsilon(1e-5));
                std::vector<double> col(E, 0.0);
                for (int n = 0; n < N; n++) {
                    std::vector<double> row(P.begin() + (size_t)n * E, P.begin() + (size_t)(n + 1) * E);
                    for (int e = 0; e < E; e++) col[e] += row[e];
                    std::set<int> chosen(r.choice_expert.begin() + n * k, r.choice_expert.begin() + (n + 1) * k);
                    CHECK(chosen == topk_set(row, k));
                }
                for (int e = 0; e < E; e++) CHECK(col[e] == doctest::Approx((double)N / E).epsilon(1e-3));
            }
            const MoeStats& st = rig.stats();
            CHECK(st.tokens == N);
            CHECK(st.top1_gate_sum == doctest::Approx(top1_sum).epsilon(1e-5));
            CHECK(st.z_mean_sum == doctest::Approx(zsq).epsilon(1e-5));
            check_output_matches_kept(rig);
        }
    }
}

TEST_CASE("moe forward: soft moe and shared experts match the contract") {
    {
        Rig rig(moe_cfg({"router.type=soft", "router.soft_slots=2"}), 2, 8);
        rig.forward();
        const int B = rig.B, T = rig.T, C = rig.C, E = rig.E, p = 2, S = E * p;
        const float* Phi = &rig.w[rig.param("router.slots").offset];   // (C, S)
        double worst = 0.0;
        for (int b = 0; b < B; b++) {
            std::vector<double> L((size_t)T * S, 0.0);
            for (int t = 0; t < T; t++)
                for (int sl = 0; sl < S; sl++)
                    for (int c = 0; c < C; c++) L[(size_t)t * S + sl] += (double)rig.x[(size_t)(b * T + t) * C + c] * Phi[(size_t)c * S + sl];
            std::vector<std::vector<double>> Ys(S);
            for (int sl = 0; sl < S; sl++) {
                double mx = -1e300, sum = 0.0;
                for (int t = 0; t < T; t++) mx = std::max(mx, L[(size_t)t * S + sl]);
                for (int t = 0; t < T; t++) sum += std::exp(L[(size_t)t * S + sl] - mx);
                std::vector<float> xs(C, 0.0f);
                std::vector<double> xsd(C, 0.0);
                for (int t = 0; t < T; t++)
                    for (int c = 0; c < C; c++) xsd[c] += std::exp(L[(size_t)t * S + sl] - mx) / sum * rig.x[(size_t)(b * T + t) * C + c];
                for (int c = 0; c < C; c++) xs[c] = (float)xsd[c];
                Ys[sl] = ffn_ref(rig, sl / p, xs.data());
            }
            for (int t = 0; t < T; t++) {
                double mx = *std::max_element(&L[(size_t)t * S], &L[(size_t)t * S] + S), sum = 0.0;
                for (int sl = 0; sl < S; sl++) sum += std::exp(L[(size_t)t * S + sl] - mx);
                for (int c = 0; c < C; c++) {
                    double y = 0.0;
                    for (int sl = 0; sl < S; sl++) y += std::exp(L[(size_t)t * S + sl] - mx) / sum * Ys[sl][c];
                    worst = std::max(worst, std::fabs(y - rig.out[(size_t)(b * T + t) * C + c]));
                }
            }
        }
        CHECK(worst < 1e-4);
    }
    for (const char* act : {"gelu", "swiglu"}) {
        // shared experts: out = routed part + sum_j Shared_j(x); checked as the difference to a
        // layer with the same routed weights and no shared experts
        Config with = moe_cfg({"model.moe.shared_experts=2", "model.moe.shared_ff=5", std::string("model.moe.activation=") + act});
        Config without = moe_cfg({std::string("model.moe.activation=") + act});
        Rig a(with, 2, 8), b(without, 2, 8);
        for (const ParamTensor& p : b.params) {
            const ParamTensor& q = a.param(p.name);
            std::copy(&a.w[q.offset], &a.w[q.offset] + q.numel, &b.w[p.offset]);
        }
        b.x = a.x;
        a.forward();
        b.forward();
        const int C = a.C, F = 5, Fh = std::string(act) == "swiglu" ? 10 : 5;
        double worst = 0.0;
        for (int n = 0; n < a.N; n++) {
            std::vector<double> sh(C, 0.0);
            for (int j = 0; j < 2; j++) {
                const float* W1 = &a.w[a.param("shared.c_fc.weight").offset] + (size_t)j * Fh * C;
                const float* b1 = &a.w[a.param("shared.c_fc.bias").offset] + (size_t)j * Fh;
                const float* W2 = &a.w[a.param("shared.c_proj.weight").offset] + (size_t)j * C * F;
                const float* b2 = &a.w[a.param("shared.c_proj.bias").offset] + (size_t)j * C;
                std::vector<double> h(Fh), av(F);
                for (int f = 0; f < Fh; f++) {
                    h[f] = b1[f];
                    for (int c = 0; c < C; c++) h[f] += (double)W1[(size_t)f * C + c] * a.x[(size_t)n * C + c];
                }
                for (int f = 0; f < F; f++) av[f] = Fh == 2 * F ? silu_ref(h[f]) * h[F + f] : gelu_ref(h[f]);
                for (int c = 0; c < C; c++) {
                    double y = b2[c];
                    for (int f = 0; f < F; f++) y += (double)W2[(size_t)c * F + f] * av[f];
                    sh[c] += y;
                }
            }
            for (int c = 0; c < C; c++)
                worst = std::max(worst, std::fabs(a.out[(size_t)n * C + c] - b.out[(size_t)n * C + c] - sh[c]));
        }
        INFO(act);
        CHECK(worst < 1e-4);
        check_output_matches_kept(b);
    }
}

TEST_CASE("moe step counts: training forwards accumulate, eval and counting passes do not") {
    Rig rig(moe_cfg({"balance.bias_rate=0.01"}), 2, 16);
    rig.layer->begin_step();
    CHECK(rig.layer->step_routed() == std::vector<double>(4, 0.0));
    rig.forward();
    std::vector<double> one = rig.routing().routed;
    rig.forward();
    std::vector<double> two = one;
    for (double& v : two) v *= 2;
    CHECK(rig.layer->step_routed() == two);
    rig.training = false;
    rig.forward();
    rig.training = true;
    rig.layer->set_counting(true);
    rig.forward();
    rig.layer->set_counting(false);
    CHECK(rig.layer->step_routed() == two);
    rig.layer->begin_step();
    CHECK(rig.layer->step_routed() == std::vector<double>(4, 0.0));
}

TEST_CASE("moe fd: load loss with k = E (every expert always in the top k) is 0 with finite gradients") {
    Rig rig(moe_cfg({"router.noise=gaussian", "balance.load_loss=1.0", "model.moe.top_k=4"}), 2, 16);
    std::vector<float> g, dx;
    rig.gradients(g, dx);
    CHECK(rig.stats().load == 0.0);
    CHECK(std::all_of(g.begin(), g.end(), [](float v) { return std::isfinite(v); }));
    CHECK(std::all_of(dx.begin(), dx.end(), [](float v) { return std::isfinite(v); }));
    require_fd_ok(rig, "load loss k = E");
}

namespace {
double max_abs(const std::vector<float>& a) {
    double m = 0.0;
    for (float v : a) m = std::max(m, (double)std::fabs(v));
    return m;
}
double max_diff(const std::vector<float>& a, const std::vector<float>& b, double scale_b) {   // max |a - scale_b * b|
    double m = 0.0;
    for (size_t i = 0; i < a.size(); i++) m = std::max(m, std::fabs(a[i] - scale_b * b[i]));
    return m;
}
}  // namespace

TEST_CASE("moe backward: accumulates, scales with dloss_scale, and does not depend on the thread count") {
    const std::vector<std::vector<std::string>> configs = {
        {"balance.aux_loss=0.5", "balance.z_loss=0.1", "router.noise=gaussian", "balance.load_loss=0.5",
         "balance.importance_loss=0.5", "model.moe.shared_experts=1", "router.capacity_factor=0.6"},
        {"router.type=soft", "router.soft_slots=2", "model.moe.shared_experts=1"},
        {"router.type=expert_choice", "router.noise=none", "balance.z_loss=0.1"},
        {"router.type=hash", "model.moe.top_k=1", "model.moe.activation=swiglu"},
        {"router.type=sinkhorn", "router.noise=jitter", "balance.aux_loss=0.5", "balance.aux_scope=sequence"},
    };
    for (const auto& sets : configs) {
        INFO(fmt::format("{}", fmt::join(sets, " ")));
        Rig rig(moe_cfg(sets), 4, 16);
        std::vector<float> g1, dx1;
        rig.gradients(g1, dx1);
        // a second backward of the same forward adds the same again
        std::vector<float> g2 = g1, dx2 = dx1;
        rig.layer->backward(dx2.data(), rig.R.data(), rig.w.data(), g2.data(), 1.0f);
        CHECK(max_diff(g2, g1, 2.0) <= 1e-5 * max_abs(g1));
        CHECK(max_diff(dx2, dx1, 2.0) <= 1e-5 * max_abs(dx1));
        // d(0.25 * objective): dout scaled by the caller, the balancing terms by dloss_scale
        std::vector<float> Rq = rig.R, gq(g1.size(), 0.0f), dxq(dx1.size(), 0.0f);
        for (float& v : Rq) v *= 0.25f;
        rig.layer->backward(dxq.data(), Rq.data(), rig.w.data(), gq.data(), 0.25f);
        CHECK(max_diff(gq, g1, 0.25) <= 1e-5 * max_abs(g1));
        CHECK(max_diff(dxq, dx1, 0.25) <= 1e-5 * max_abs(dx1));
        // bitwise the same on 1 and 2 threads
        std::vector<std::vector<float>> outs, gs, dxs;
        for (int th : {1, 2}) {
            omp_set_num_threads(th);
            std::vector<float> g, dx;
            rig.gradients(g, dx);
            outs.push_back(rig.out); gs.push_back(g); dxs.push_back(dx);
        }
        omp_set_num_threads(1);
        CHECK(outs[0] == outs[1]);
        CHECK(gs[0] == gs[1]);
        CHECK(dxs[0] == dxs[1]);
    }
}
