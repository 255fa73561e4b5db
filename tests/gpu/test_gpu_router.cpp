/* The routing ops (backend.h router_*), CUDA against the CPU twin (src/router_ops.cpp = the host
   routing functions of moe_router.cpp). docs/cuda.md "Routing" states the contract checked here:
   - scores: the same bits (the kernels use glibc's expf, src/expf_libm.h, in the host's order),
     hence the same choices; gates within 1e-5 (in practice the same bits as well);
   - the plan (offsets, routed counts, token, choice, token CSR, gates) bit-identical, checked
     from the same choices on both sides so that a plan bug cannot hide behind a score bug;
   - the balancing terms and statistics, and dz, within 1e-5 relative;
   - a second CUDA run gives the same bits.
   Routing does not depend on train.dtype (no GEMM), so these run in fp32 mode only. */
#include "gpu_util.h"

#include <map>
#include <numeric>
#include <vector>

using namespace gpu_test;

namespace {

struct RouteCase {
    int N, E, k;
    bool sigmoid = false;
    int groups = 1, topk_groups = 1;
    bool normalize = true;
    float scale = 1.0f;
    int capacity = 0;
    bool by_probs = true;
    bool bias = false;
    std::string logits = "random";   // random | ties | flat | one
    int seq_len = 0;                 // aux scope sequence with this T (0: micro-batch)
    bool global = false;             // aux scope global (counts given)
};

std::vector<float> make_logits(const RouteCase& c, uint32_t seed) {
    std::vector<float> z = randu((size_t)c.N * c.E, seed, -3.0f, 3.0f);
    if (c.logits == "ties")   // a few distinct values: exact ties in scores, selection and gates
        for (float& v : z) v = std::round(v);
    else if (c.logits == "flat")
        std::fill(z.begin(), z.end(), 0.0f);
    else if (c.logits == "one")   // every token's best expert is E/3
        for (int n = 0; n < c.N; n++) z[(size_t)n * c.E + c.E / 3] = 20.0f;
    return z;
}

template <class T>
std::vector<T> fetch(Env& e, Side s, const T* p, size_t n) {
    std::vector<T> h(n);
    if (n == 0) return h;
    if (s == CPU) std::memcpy(h.data(), p, n * sizeof(T));
    else { e.gpu->synchronize(); e.gpu->download(h.data(), p, n * sizeof(T)); }
    return h;
}

template <class T>
bool bits_equal(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

double rel(double ref, double got) { return std::fabs(got - ref) / std::max(1e-30, std::fabs(ref)); }

// Every output of the four routing ops for one side, downloaded.
struct RouteResult {
    std::vector<float> s, choice_gate, gate, dz;
    std::vector<int> choice_expert, offsets, routed, token, choice, tok_offsets, tok_assign;
    moe::RouterLosses losses;
};

void route_case(Env& e, const RouteCase& c, uint32_t seed) {
    CAPTURE(c.N); CAPTURE(c.E); CAPTURE(c.k); CAPTURE(c.sigmoid); CAPTURE(c.groups); CAPTURE(c.topk_groups);
    CAPTURE(c.capacity); CAPTURE(c.by_probs); CAPTURE(c.logits); CAPTURE(c.bias); CAPTURE(c.seq_len);
    const int N = c.N, E = c.E, k = c.k, M = N * k;
    moe::TopkRouterArgs a;
    a.N = N; a.E = E; a.k = k; a.sigmoid = c.sigmoid; a.groups = c.groups; a.topk_groups = c.topk_groups;
    a.normalize = c.normalize; a.scale = c.scale; a.capacity = c.capacity; a.drop_by_probs = c.by_probs;
    std::vector<double> global_counts(E);
    for (int i = 0; i < E; i++) global_counts[i] = (double)((i * 7919 + seed) % 97);
    moe::RouterLossArgs l;
    l.aux_loss = 0.01;
    l.z_loss = 0.001;
    l.aux_seq_len = c.seq_len;
    l.aux_counts = c.global ? global_counts.data() : nullptr;

    TwinF z(e, make_logits(c, seed)), bias(e, randu(E, seed + 1, -0.05f, 0.05f));
    TwinF s(e, randu((size_t)N * E, seed + 2)), cgate(e, randu(M, seed + 3)), gate(e, randu(M, seed + 4));
    TwinF dz(e, randu((size_t)N * E, seed + 5)), dgate(e, randu(M, seed + 6, -2.0f, 2.0f));
    TwinI cexp(e, randi(M, seed + 7, 0, E)), offsets(e, std::vector<int>(E + 1, -5)), routed(e, std::vector<int>(E, -5));
    TwinI token(e, std::vector<int>(M, -5)), choice(e, std::vector<int>(M, -5));
    TwinI tok_off(e, std::vector<int>(N + 1, -5)), tok_assign(e, std::vector<int>(M, -5));

    // 1. scores, top-k, gates from the same logits
    auto topk = [&](Side sd) {
        Backend& be = sd == CPU ? *e.cpu : *e.gpu;
        be.router_topk_forward(s[sd], cexp[sd], cgate[sd], z[sd], c.bias ? bias[sd] : nullptr, a);
    };
    topk(CPU);
    topk(GPU);
    const std::vector<float> s_cpu = s.get(CPU), cg_cpu = cgate.get(CPU);
    const std::vector<int> ce_cpu = cexp.get(CPU);
    {
        INFO("scores: the CUDA kernel must give the host's bits (glibc expf, same summation order)");
        CHECK(bits_equal(s_cpu, s.get(GPU)));
    }
    {
        INFO("choices must be identical (ties: lower expert first)");
        CHECK(bits_equal(ce_cpu, cexp.get(GPU)));
    }
    CHECK(agree("choice gates", cg_cpu, cgate.get(GPU), 1e-5));
    const std::vector<float> s_gpu1 = s.get(GPU), cg_gpu1 = cgate.get(GPU);
    const std::vector<int> ce_gpu1 = cexp.get(GPU);

    // 2. the plan, from the CPU's choices on both sides
    e.gpu->upload(cexp[GPU], ce_cpu.data(), M * sizeof(int));
    e.gpu->upload(cgate[GPU], cg_cpu.data(), M * sizeof(float));
    auto plan = [&](Side sd) {
        Backend& be = sd == CPU ? *e.cpu : *e.gpu;
        be.router_plan_build(offsets[sd], routed[sd], token[sd], gate[sd], choice[sd], tok_off[sd], tok_assign[sd],
                             cexp[sd], cgate[sd], a);
    };
    plan(CPU);
    plan(GPU);
    const std::vector<int> off_cpu = offsets.get(CPU);
    const int A = off_cpu[E];
    CHECK(A <= M);
    if (c.capacity > 0) for (int i = 0; i < E; i++) CHECK(off_cpu[i + 1] - off_cpu[i] <= c.capacity);
    RouteResult r[2];
    for (Side sd : {CPU, GPU}) {
        r[sd].offsets = offsets.get(sd);
        r[sd].routed = routed.get(sd);
        r[sd].token = fetch(e, sd, token[sd], A);
        r[sd].choice = fetch(e, sd, choice[sd], A);
        r[sd].gate = fetch(e, sd, gate[sd], A);
        r[sd].tok_offsets = tok_off.get(sd);
        r[sd].tok_assign = fetch(e, sd, tok_assign[sd], A);
    }
    CHECK(bits_equal(r[CPU].offsets, r[GPU].offsets));
    CHECK(bits_equal(r[CPU].routed, r[GPU].routed));
    CHECK(bits_equal(r[CPU].token, r[GPU].token));
    CHECK(bits_equal(r[CPU].choice, r[GPU].choice));
    CHECK(bits_equal(r[CPU].gate, r[GPU].gate));
    CHECK(bits_equal(r[CPU].tok_offsets, r[GPU].tok_offsets));
    CHECK(bits_equal(r[CPU].tok_assign, r[GPU].tok_assign));

    // 3. balancing terms and statistics from the same scores and choices
    e.gpu->upload(s[GPU], s_cpu.data(), s_cpu.size() * sizeof(float));
    for (const moe::RouterLossArgs& la : {l, moe::RouterLossArgs{}}) {
        const moe::RouterLosses lc = e.cpu->router_balance_forward(z[CPU], s[CPU], cexp[CPU], cgate[CPU], a, la);
        const moe::RouterLosses lg = e.gpu->router_balance_forward(z[GPU], s[GPU], cexp[GPU], cgate[GPU], a, la);
        const moe::RouterLosses lg2 = e.gpu->router_balance_forward(z[GPU], s[GPU], cexp[GPU], cgate[GPU], a, la);
        INFO("aux cpu " << lc.aux << " cuda " << lg.aux << " | z " << lc.z << " " << lg.z << " | z_sum " << lc.z_sum
                        << " " << lg.z_sum << " | top1 " << lc.top1_gate_sum << " " << lg.top1_gate_sum);
        CHECK(std::fabs(lg.aux - lc.aux) <= 1e-5 * std::fabs(lc.aux));
        CHECK(std::fabs(lg.z - lc.z) <= 1e-5 * std::fabs(lc.z));
        CHECK(rel(lc.z_sum, lg.z_sum) <= 1e-5);
        CHECK(std::fabs(lg.top1_gate_sum - lc.top1_gate_sum) <= 1e-5 * std::fabs(lc.top1_gate_sum));
        CHECK(std::memcmp(&lg, &lg2, sizeof lg) == 0);   // reproducible
    }

    // 4. the backward down to dz, from the same plan (dz is overwritten: its random start must not matter)
    for (const moe::RouterLossArgs& la : {l, moe::RouterLossArgs{}})
        check_op(e, [&](Backend& be, Side sd) {
            be.router_topk_backward(dz[sd], dgate[sd], choice[sd], A, z[sd], s[sd], cexp[sd], a, la, 0.5f);
        }, {{"router dz", &dz, std::max(1e-5, e.tol(E))}});

    // 5. determinism of the whole forward chain from the logits
    e.gpu->upload(cexp[GPU], cexp.init.data(), M * sizeof(int));
    topk(GPU);
    plan(GPU);
    CHECK(bits_equal(s_gpu1, s.get(GPU)));
    CHECK(bits_equal(ce_gpu1, cexp.get(GPU)));
    CHECK(bits_equal(cg_gpu1, cgate.get(GPU)));
    CHECK(bits_equal(r[GPU].offsets, offsets.get(GPU)));
    CHECK(bits_equal(r[GPU].token, fetch(e, GPU, token[GPU], A)));
    CHECK(bits_equal(r[GPU].tok_assign, fetch(e, GPU, tok_assign[GPU], A)));
}

RouteCase rc(int N, int E, int k) { RouteCase c; c.N = N; c.E = E; c.k = k; return c; }

void router_all(Env& e) {
    uint32_t seed = 100;
    route_case(e, rc(1, 1, 1), seed++);                              // one token, one expert
    route_case(e, rc(37, 8, 2), seed++);                             // N not a multiple of anything
    { RouteCase c = rc(300, 67, 3); c.sigmoid = true; c.bias = true; c.capacity = 9; route_case(e, c, seed++); }
    { RouteCase c = rc(1000, 256, 8); c.capacity = 25; c.by_probs = false; route_case(e, c, seed++); }
    { RouteCase c = rc(257, 64, 6); c.groups = 8; c.topk_groups = 3; c.sigmoid = true; c.bias = true;
      route_case(e, c, seed++); }                                    // group-limited
    { RouteCase c = rc(129, 16, 4); c.logits = "ties"; c.capacity = 20; route_case(e, c, seed++); }
    { RouteCase c = rc(129, 16, 4); c.logits = "ties"; c.sigmoid = true; c.capacity = 20; c.by_probs = false;
      route_case(e, c, seed++); }
    { RouteCase c = rc(64, 8, 2); c.logits = "flat"; c.capacity = 5; route_case(e, c, seed++); }   // all ties
    { RouteCase c = rc(200, 40, 1); c.logits = "one"; c.capacity = 7; route_case(e, c, seed++); }  // one expert, drops
    { RouteCase c = rc(200, 40, 1); c.logits = "one"; route_case(e, c, seed++); }                  // 39 empty experts
    { RouteCase c = rc(4096, 128, 5); c.normalize = false; c.scale = 2.5f; c.seq_len = 512; route_case(e, c, seed++); }
    { RouteCase c = rc(1030, 48, 2); c.seq_len = 103; c.bias = true; route_case(e, c, seed++); }   // 10 sequences
    { RouteCase c = rc(700, 8, 2); c.seq_len = 512; route_case(e, c, seed++); }    // a sequence and a tail
    { RouteCase c = rc(1100, 8, 2); c.seq_len = 512; route_case(e, c, seed++); }   // two sequences and a tail
    { RouteCase c = rc(100, 8, 2); c.seq_len = 512; route_case(e, c, seed++); }    // less than one sequence
    { RouteCase c = rc(640, 24, 3); c.global = true; c.capacity = 70; route_case(e, c, seed++); }
    for (int k = 1; k <= 8; k++) {                                   // every k on E = 33 (not a multiple of 32)
        RouteCase c = rc(515, 33, k);
        c.sigmoid = k % 2 == 0;
        c.capacity = k % 3 == 0 ? (int)std::ceil(1.25 * k * 515 / 33) : 0;
        c.by_probs = k % 2 == 1;
        route_case(e, c, seed++);
    }
    { RouteCase c = rc(8192, 256, 8); c.sigmoid = true; c.bias = true; c.groups = 8; c.topk_groups = 4;
      c.capacity = 300; route_case(e, c, seed++); }                  // DeepSeek-like shape
    { RouteCase c = rc(2048, 1024, 16); route_case(e, c, seed++); }  // the largest shape the ops take
}

}  // namespace

TEST_CASE("gpu ops: routing (scores, top-k, groups, bias, plan, capacity, aux/z losses, dz)") {
    router_all(env("fp32"));
}
