/* Our CPU model against the PyTorch oracle (tests/reference/oracle.py), llm.c test_gpt2 style:
   same checkpoint, same batch -> same loss, logits and every parameter gradient, and the same
   losses and weights over 10 AdamW steps (schedule, clipping, decoupled decay included).
   Tolerances are relative to each tensor's scale: max|ours - torch| <= tol * max|torch|
   (element-wise relative error is meaningless for gradients that are ~0). */
#include <doctest/doctest.h>

#include "backend.h"
#include "checkpoint.h"
#include "common.h"
#include "config.h"
#include "model.h"
#include "model_io.h"
#include "optim.h"
#include "test_util.h"

#include <algorithm>
#include <cmath>

using namespace moe;
using namespace moe_test;

namespace {

struct OracleRun {
    SafeTensors out;
};

// Writes checkpoint + batch, runs the oracle, returns its outputs.
SafeTensors run_oracle(const TempDir& dir, GPT& model, const Config& cfg, const std::vector<int>& inp,
                       const std::vector<int>& tgt, int B, int T, int steps) {
    save_model(dir / "model.safetensors", model, cfg, 0);
    save_safetensors(dir / "batch.safetensors",
                     {{"inputs", "I32", {B, T}, inp.data()}, {"targets", "I32", {B, T}, tgt.data()}}, {});
    std::string cmd = python_bin() + " tests/reference/oracle.py --ckpt " + (dir / "model.safetensors") +
                      " --batch " + (dir / "batch.safetensors") + " --out " + (dir / "out.safetensors") +
                      " --steps " + std::to_string(steps);
    RunResult r = run(cmd);
    INFO(r.output);
    REQUIRE(r.status == 0);
    return load_safetensors(dir / "out.safetensors");
}

const char* kDenseConfig = R"(
model: {vocab_size: 64, seq_len: 16, n_layer: 2, n_head: 2, d_model: 32, d_ff: 96}
train: {batch_size: 4, steps: 10, lr: 1.0e-2, min_lr: 1.0e-3, warmup: 3, weight_decay: 0.1,
        beta1: 0.9, beta2: 0.95, grad_clip: 1.0}
)";

}  // namespace

TEST_CASE("dense GPT matches the PyTorch oracle: loss, logits, gradients, 10 AdamW steps") {
    Config cfg = parse_config(kDenseConfig, "test config");
    const int B = 4, T = 16, V = cfg.model.vocab_size;
    auto be = make_cpu_backend(0);
    GPT model(cfg, *be);
    model.init_weights(42);
    // larger-than-GPT-2-init weights would be nicer for gradients, but the real init is what we train
    std::vector<int> inp(B * T), tgt(B * T);
    Rng rng(7);
    for (int i = 0; i < B * T; i++) { inp[i] = rng.next_u32() % V; tgt[i] = rng.next_u32() % V; }

    TempDir dir;
    SafeTensors ref = run_oracle(dir, model, cfg, inp, tgt, B, T, 10);

    float loss = model.forward(inp.data(), tgt.data(), B, T);
    model.zero_grad();
    model.backward();
    CHECK(std::fabs(loss - ref.get("loss").f32()[0]) <= 1e-4 * std::fabs(ref.get("loss").f32()[0]));
    std::vector<float> logits((size_t)B * T * V);
    be->download(logits.data(), model.logits(), logits.size() * sizeof(float));
    CHECK(rel_err(logits.data(), ref.get("logits", {B, T, V}).f32()) <= 1e-4);

    std::vector<float> grads = model.get_grads();
    for (int l = 0; l < cfg.model.n_layer; l++) {  // the key-bias gradient vanishes (see below)
        const ParamTensor& kb = model.param("h." + std::to_string(l) + ".attn.c_attn.bias");
        double maxk = 0.0, maxq = 0.0;
        for (int i = 0; i < cfg.model.d_model; i++) {
            maxq = std::max(maxq, (double)std::fabs(grads[kb.offset + i]));
            maxk = std::max(maxk, (double)std::fabs(grads[kb.offset + cfg.model.d_model + i]));
        }
        CHECK(maxk <= 1e-5 * maxq);
    }
    for (const ParamTensor& p : model.params()) {
        double e = rel_err(grads.data() + p.offset, ref.get("grad." + p.name, p.shape).f32());
        INFO(p.name << " gradient relative error " << e);
        CHECK(e <= 1e-3);
    }

    // 10 steps of training on the same batch, from the same start
    AdamW opt(model, cfg.train);
    std::vector<float> ref_losses = ref.get("losses", {10}).f32();
    // no zero_grad(): AdamW leaves the gradients zero, and a step that accumulated onto stale
    // ones would leave torch's curve
    model.zero_grad();
    for (int s = 0; s < 10; s++) {
        float l = model.forward(inp.data(), tgt.data(), B, T);
        model.backward();
        opt.step((float)lr_at(cfg.train, s));
        INFO("step " << s << ": ours " << l << " torch " << ref_losses[s]);
        CHECK(std::fabs(l - ref_losses[s]) <= 1e-4 * std::fabs(ref_losses[s]));
        std::vector<float> g(model.num_params());
        model.backend().download(g.data(), model.grads(), g.size() * sizeof(float));
        CHECK(std::all_of(g.begin(), g.end(), [](float x) { return x == 0.0f; }));
    }
    CHECK(ref_losses[9] < ref_losses[0] - 0.1f);  // the comparison is over a real descent
    std::vector<float> w = model.get_weights();
    const int C = cfg.model.d_model;
    for (const ParamTensor& p : model.params()) {
        std::vector<float> want = ref.get("final." + p.name, p.shape).f32();
        const float* got = w.data() + p.offset;
        if (p.name.find("attn.c_attn.bias") != std::string::npos) {
            // The key bias adds a constant to a whole row of attention scores, which softmax
            // cancels: its true gradient is exactly 0 and both sides only see roundoff, which
            // Adam's normalisation blows up to lr-sized random steps. Compare q and v only.
            std::vector<float> q(want.begin(), want.begin() + C), v(want.begin() + 2 * C, want.end());
            CHECK(rel_err(got, q) <= 1e-3);
            CHECK(rel_err(got + 2 * C, v) <= 1e-3);
            continue;
        }
        double e = rel_err(got, want);
        INFO(p.name << " weights after 10 steps, relative error " << e);
        CHECK(e <= 1e-3);
    }
}

TEST_CASE("the oracle comparison can fail: a perturbed gradient is caught") {
    std::vector<float> ref = {1.0f, -2.0f, 0.5f, 0.0f};
    std::vector<float> ours = ref;
    CHECK(rel_err(ours.data(), ref) == 0.0);
    ours[1] *= 1.01f;  // 1% off on the largest element
    CHECK(rel_err(ours.data(), ref) > 1e-3);
}
