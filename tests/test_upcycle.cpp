/* `moe upcycle` (src/upcycle.h, src/llmc_import.h): copy and granular upcycling reproduce the
   dense model's eval loss where README.md says they are exact, drop re-initialises exactly the
   promised units, llm.c GPT-2 files (fp32, bf16, padded vocab) load like our own checkpoints,
   `moe train` continues from the result via train.init_from, and bad input leaves no file. */
#include <doctest/doctest.h>

#include "config.h"
#include "fileio.h"
#include "llmc_import.h"
#include "model_io.h"
#include "trainer.h"
#include "upcycle.h"
#include "test_util.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <set>

using namespace moe;
using namespace moe_test;

namespace {

// V 64, T 16, L 2, NH 2, C 16, d_ff 64 = 4C (so llm.c's d_ff matches)
std::string yaml(const TempDir& dir, const std::string& moe_block, const std::string& router = "",
                 const std::string& model_extra = "") {
    return fmt::format(R"(model: {{vocab_size: 64, seq_len: 16, n_layer: 2, n_head: 2, d_model: 16, d_ff: 64{}{}}}
router: {{{}}}
train: {{batch_size: 4, steps: 30, lr: 1.0e-2, min_lr: 1.0e-3, warmup: 2, eval_every: 10, eval_batches: 4,
        ckpt_every: 0, out_dir: {}, threads: 2}}
data: {{train: {}/train_*.bin, val: {}/val_*.bin}}
)", model_extra, moe_block.empty() ? "" : ", moe: {" + moe_block + "}", router, dir / "run", dir.path, dir.path);
}
Config cfg_of(const TempDir& dir, const std::string& moe_block, const std::string& router = "",
              const std::string& model_extra = "") {
    return parse_config(yaml(dir, moe_block, router, model_extra), "test config");
}
void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

// A dense model with every weight random and O(0.1-1), so each FFN visibly matters to the loss.
void randomize(GPT& m, uint64_t seed) {
    Rng rng(seed);
    std::vector<float> w = m.get_weights();
    for (const ParamTensor& p : m.params()) {
        const bool ln_w = p.name.find("ln_") != std::string::npos && p.name.find(".weight") != std::string::npos;
        for (size_t i = 0; i < p.numel; i++) w[p.offset + i] = (ln_w ? 1.0f : 0.0f) + 0.25f * rng.normal();
    }
    m.set_weights(w);
}

struct Fixture {
    TempDir dir;
    std::unique_ptr<Backend> be = make_cpu_backend(2);
    Config dense_cfg;
    std::unique_ptr<GPT> dense;
    std::string dense_path;
    Fixture() {
        write_tiny_corpus(dir.path, 64, 20000, 4000);
        dense_cfg = cfg_of(dir, "");
        dense = std::make_unique<GPT>(dense_cfg, *be);
        randomize(*dense, 7);
        dense_path = dir / "dense.safetensors";
        save_model(dense_path, *dense, dense_cfg, 5);
    }
    float loss(GPT& m) {
        DataLoader val(dense_cfg.data.val, 4, 16, 64);
        return evaluate(m, val, 4);
    }
    UpcycleResult up(const Config& cfg, const UpcycleOptions& o = {}) {
        return upcycle(read_dense_weights(dense_path), cfg, o, *be, "test config");
    }
};

double rel(double a, double b) { return std::fabs(a - b) / std::fabs(b); }

double eval_json_loss(const std::string& ckpt) {
    RunResult r = run(moe_bin() + " eval --json --batches 4 --ckpt " + ckpt);
    INFO(r.output);
    REQUIRE(r.status == 0);
    return nlohmann::json::parse(r.output)["loss"].get<double>();
}

uint16_t bf16_of(float f) {   // round to nearest even, as llm.c writes bf16
    uint32_t b;
    std::memcpy(&b, &f, 4);
    return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
float f32_of(uint16_t h) {
    uint32_t b = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}

// Writes `m` in llm.c's layout (train_gpt2.c): header, then each tensor stacked over layers.
// wte gets Vp - V padding rows and wpe maxT - T extra rows, both random (they must be ignored).
void write_llmc(const std::string& path, const GPT& m, int Vp, int maxT, bool bf16) {
    const ModelConfig& mc = m.config();
    const int V = mc.vocab_size, T = mc.seq_len, C = mc.d_model, L = mc.n_layer;
    std::vector<float> w = m.get_weights();
    auto t = [&](const std::string& n) {
        const ParamTensor& p = m.param(n);
        return std::vector<float>(w.begin() + p.offset, w.begin() + p.offset + p.numel);
    };
    std::vector<float> all;
    Rng rng(99);
    auto junk = [&](size_t n) { for (size_t i = 0; i < n; i++) all.push_back(rng.normal()); };
    auto put = [&](const std::vector<float>& v) { all.insert(all.end(), v.begin(), v.end()); };
    put(t("wte")); junk((size_t)(Vp - V) * C);
    put(t("wpe")); junk((size_t)(maxT - T) * C);
    for (const char* s : {"ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                          "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                          "mlp.c_proj.weight", "mlp.c_proj.bias"})
        for (int l = 0; l < L; l++) put(t("h." + std::to_string(l) + "." + s));
    put(t("ln_f.weight")); put(t("ln_f.bias"));
    int32_t h[256] = {kLlmcMagic, bf16 ? 5 : 3, maxT, V, L, mc.n_head, C, Vp};
    std::ofstream f(path, std::ios::binary);
    f.write((const char*)h, sizeof h);
    if (!bf16) { f.write((const char*)all.data(), all.size() * 4); return; }
    std::vector<uint16_t> b(all.size());
    for (size_t i = 0; i < all.size(); i++) b[i] = bf16_of(all[i]);
    f.write((const char*)b.data(), b.size() * 2);
}

std::vector<float> logits_of(GPT& m, const std::vector<int>& inp, const std::vector<int>& tgt) {
    m.set_training(false);
    m.forward(inp.data(), tgt.data(), 2, 16);
    std::vector<float> out((size_t)2 * 16 * m.config().vocab_size);
    m.backend().download(out.data(), m.logits(), out.size() * sizeof(float));
    return out;
}

std::vector<float> tensor(GPT& m, const std::string& name) {
    std::vector<float> w = m.get_weights();
    const ParamTensor& p = m.param(name);
    return std::vector<float>(w.begin() + p.offset, w.begin() + p.offset + p.numel);
}

}  // namespace

TEST_CASE("upcycle: copy reproduces the dense model where it says so") {
    Fixture fx;
    const float dense_loss = fx.loss(*fx.dense);
    // layer 0 MoE, layer 1 stays dense (every: 2)
    const std::string base = "experts: 4, top_k: 2, expert_ff: 64, every: 2";
    struct Case { const char* name; std::string moe, router; bool exact; };
    const Case cases[] = {
        {"softmax top-2, normalised", base, "", true},
        {"sigmoid top-2, normalised", base, "score: sigmoid", true},
        {"softmax top-4 = E, raw gates", "experts: 4, top_k: 4, expert_ff: 64", "normalize_topk: false", true},
        {"hash top-1", "experts: 4, top_k: 1, expert_ff: 64", "type: hash", true},
        {"raw top-2 gates", base, "normalize_topk: false", false},
        {"scale 2", base, "scale: 2.0", false},
        {"shared expert", base + ", shared_experts: 1, shared_ff: 64", "", false},
        {"eval capacity", base, "eval_capacity_factor: 1.0", false},
    };
    for (const Case& c : cases) {
        INFO(c.name);
        UpcycleResult r = fx.up(cfg_of(fx.dir, c.moe, c.router));
        CHECK(r.exact == c.exact);
        const bool every2 = c.moe.find("every: 2") != std::string::npos;
        CHECK(r.moe_layers == (every2 ? std::vector<int>{0} : std::vector<int>{0, 1}));
        const float l = fx.loss(*r.model);
        INFO(r.exact_why << " | dense " << dense_loss << " upcycled " << l);
        if (c.exact) CHECK(rel(l, dense_loss) < 1e-5);
        else if (std::string(c.name) != "eval capacity") CHECK(rel(l, dense_loss) > 1e-4);
    }
    // the dense layer 1 FFN and attention are the dense tensors, bit for bit
    UpcycleResult r = fx.up(cfg_of(fx.dir, base));
    for (const char* n : {"h.1.mlp.c_fc.weight", "h.1.mlp.c_proj.bias", "h.0.attn.c_attn.weight", "wte", "ln_f.bias"})
        CHECK(tensor(*r.model, n) == tensor(*fx.dense, n));
    CHECK(r.params_moe > r.params_dense);
    CHECK(r.experts_per_token == 2);
    // noise breaks the copies apart, and the model stops being exact
    UpcycleOptions noisy;
    noisy.noise = 0.05;
    UpcycleResult rn = fx.up(cfg_of(fx.dir, base), noisy);
    CHECK_FALSE(rn.exact);
    std::vector<float> w = tensor(*rn.model, "h.0.moe.experts.c_fc.weight");   // (E, F, C)
    const size_t per_expert = 64 * 16;
    CHECK(std::vector<float>(w.begin(), w.begin() + per_expert) !=
          std::vector<float>(w.begin() + per_expert, w.begin() + 2 * per_expert));

    // the real binary: upcycle, then `moe eval --json` of both files agree
    write_text(fx.dir / "moe.yaml", yaml(fx.dir, base));
    std::string out = fx.dir / "up.safetensors";
    RunResult u = run(moe_bin() + " upcycle --in " + fx.dense_path + " --config " + (fx.dir / "moe.yaml") +
                      " --out " + out);
    INFO(u.output);
    REQUIRE(u.status == 0);
    CHECK(u.output.find("function-preserving: yes") != std::string::npos);
    CHECK(u.output.find("MoE layers: 0 (") != std::string::npos);
    CHECK(u.output.find("active per token") != std::string::npos);
    CHECK(rel(eval_json_loss(out), eval_json_loss(fx.dense_path)) < 1e-5);
}

TEST_CASE("upcycle: granular splits the FFN and is exact with top_k = experts and unit gates") {
    Fixture fx;
    const float dense_loss = fx.loss(*fx.dense);
    struct Case { const char* name; std::string moe, router; bool exact; const char* why; };
    const std::string all4 = "experts: 4, top_k: 4, expert_ff: 16";
    const Case cases[] = {
        {"softmax, raw gates, scale E", all4, "normalize_topk: false, scale: 4.0", true, ""},
        {"sigmoid, raw gates, scale 2", all4, "score: sigmoid, normalize_topk: false, scale: 2.0", true, ""},
        {"8 experts = 2 x 4 slices, gates 1/2", "experts: 8, top_k: 8, expert_ff: 16", "scale: 4.0", true, ""},
        {"scale 1", all4, "", false, "router.scale: 4"},
        {"top-2 of 4", "experts: 4, top_k: 2, expert_ff: 16", "scale: 4.0", false, "top_k"},
    };
    UpcycleOptions o;
    o.method = "granular";
    for (const Case& c : cases) {
        INFO(c.name);
        UpcycleResult r = fx.up(cfg_of(fx.dir, c.moe, c.router), o);
        INFO(r.exact_why);
        CHECK(r.groups == 4);
        CHECK(r.exact == c.exact);
        CHECK(r.exact_why.find(c.why) != std::string::npos);
        const float l = fx.loss(*r.model);
        if (c.exact) CHECK(rel(l, dense_loss) < 1e-5);
        else CHECK(rel(l, dense_loss) > 1e-4);
    }
    // the layout: expert e = hidden units [(e % G) * 16, +16) of c_fc rows and c_proj columns, bias / G
    UpcycleResult r = fx.up(cfg_of(fx.dir, "experts: 8, top_k: 8, expert_ff: 16", "scale: 4.0"), o);
    CHECK(r.zero_router);
    for (float v : tensor(*r.model, "h.1.moe.router.weight")) REQUIRE(v == 0.0f);
    const int C = 16, F = 64, Fe = 16;
    std::vector<float> fcw = tensor(*fx.dense, "h.1.mlp.c_fc.weight");            // (F, C)
    std::vector<float> projw = tensor(*fx.dense, "h.1.mlp.c_proj.weight");        // (C, F)
    std::vector<float> projb = tensor(*fx.dense, "h.1.mlp.c_proj.bias");          // (C)
    std::vector<float> efc = tensor(*r.model, "h.1.moe.experts.c_fc.weight");     // (E, Fe, C)
    std::vector<float> eproj = tensor(*r.model, "h.1.moe.experts.c_proj.weight"); // (E, C, Fe)
    std::vector<float> eprojb = tensor(*r.model, "h.1.moe.experts.c_proj.bias");  // (E, C)
    for (int e = 0; e < 8; e++)
        for (int u = 0; u < Fe; u++)
            for (int c = 0; c < C; c++) {
                REQUIRE(efc[((size_t)e * Fe + u) * C + c] == fcw[((size_t)(e % 4) * Fe + u) * C + c]);
                REQUIRE(eproj[((size_t)e * C + c) * Fe + u] == projw[(size_t)c * F + (e % 4) * Fe + u]);
                REQUIRE(eprojb[(size_t)e * C + c] == projb[c] / 4);
            }
}

TEST_CASE("upcycle: drop re-initialises round(r * expert_ff) units of each expert, different per expert") {
    Fixture fx;
    Config cfg = cfg_of(fx.dir, "experts: 4, top_k: 2, expert_ff: 64");
    const int C = 16, F = 64, E = 4;
    for (double ratio : {0.0, 0.3, 1.0}) {
        UpcycleOptions o;
        o.method = "drop";
        o.drop_ratio = ratio;
        o.seed = 11;
        UpcycleResult r = fx.up(cfg, o);
        const int n = (int)std::lround(ratio * F);
        CHECK(r.units_dropped == n);
        CHECK(r.exact == (n == 0));
        for (int l = 0; l < 2; l++) {
            const std::string p = "h." + std::to_string(l) + ".";
            std::vector<float> fcw = tensor(*fx.dense, p + "mlp.c_fc.weight");        // (F, C)
            std::vector<float> fcb = tensor(*fx.dense, p + "mlp.c_fc.bias");          // (F)
            std::vector<float> projw = tensor(*fx.dense, p + "mlp.c_proj.weight");    // (C, F)
            std::vector<float> efc = tensor(*r.model, p + "moe.experts.c_fc.weight"); // (E, F, C)
            std::vector<float> efb = tensor(*r.model, p + "moe.experts.c_fc.bias");   // (E, F)
            std::vector<float> eproj = tensor(*r.model, p + "moe.experts.c_proj.weight");  // (E, C, F)
            std::set<std::set<int>> sets;
            for (int e = 0; e < E; e++) {
                std::set<int> rows, cols;
                for (int u = 0; u < F; u++) {
                    bool row_same = efb[(size_t)e * F + u] == fcb[u], col_same = true;
                    for (int c = 0; c < C; c++) {
                        row_same &= efc[((size_t)e * F + u) * C + c] == fcw[(size_t)u * C + c];
                        col_same &= eproj[((size_t)e * C + c) * F + u] == projw[(size_t)c * F + u];
                    }
                    if (!row_same) { rows.insert(u); CHECK(efb[(size_t)e * F + u] == 0.0f); }
                    if (!col_same) cols.insert(u);
                }
                CHECK(rows.size() == (size_t)n);
                CHECK(rows == cols);
                sets.insert(rows);
            }
            if (n > 0 && n < F) CHECK(sets.size() == (size_t)E);   // every expert its own units
        }
    }
    // seeded: the same seed gives the same model, another seed another one
    UpcycleOptions a;
    a.method = "drop";
    a.seed = 5;
    UpcycleOptions b = a;
    b.seed = 6;
    CHECK(fx.up(cfg, a).model->get_weights() == fx.up(cfg, a).model->get_weights());
    CHECK(fx.up(cfg, a).model->get_weights() != fx.up(cfg, b).model->get_weights());
}

TEST_CASE("upcycle: llm.c GPT-2 checkpoints (fp32, bf16, padded vocab) load like our dense checkpoint") {
    Fixture fx;
    std::vector<int> inp(32), tgt(32);
    for (int i = 0; i < 32; i++) inp[i] = (i * 7 + 3) % 64, tgt[i] = (i * 5 + 1) % 64;
    for (bool bf16 : {false, true}) {
        INFO((bf16 ? "bf16" : "fp32"));
        // the reference: our dense checkpoint with the weights llm.c's file will hold
        GPT ref(fx.dense_cfg, *fx.be);
        std::vector<float> w = fx.dense->get_weights();
        if (bf16) for (float& v : w) v = f32_of(bf16_of(v));
        ref.set_weights(w);
        save_model(fx.dir / "ref.safetensors", ref, fx.dense_cfg, 0);
        const std::string bin = fx.dir / (bf16 ? "gpt2_bf16.bin" : "gpt2.bin");
        write_llmc(bin, *fx.dense, 80, 32, bf16);   // padded vocab 80 > 64, maxT 32 > seq_len 16

        DenseWeights d = read_dense_weights(bin);
        CHECK(d.format.find(bf16 ? "bf16" : "fp32") != std::string::npos);
        CHECK(d.padded_vocab == 80);
        CHECK(d.dims.vocab_size == 64);
        CHECK(d.dims.seq_len == 32);
        CHECK(d.dims.d_ff == 64);
        // a dense config converts; the logits match the safetensors model's exactly
        UpcycleResult conv = upcycle(d, fx.dense_cfg, {}, *fx.be, "test config");
        CHECK(conv.exact);
        CHECK(logits_of(*conv.model, inp, tgt) == logits_of(ref, inp, tgt));
        LoadedModel lm = load_model(fx.dir / "ref.safetensors", *fx.be);
        CHECK(logits_of(*conv.model, inp, tgt) == logits_of(*lm.model, inp, tgt));
    }
    // through the binary: llm.c -> MoE copy, same eval loss as the dense safetensors model
    write_text(fx.dir / "moe.yaml", yaml(fx.dir, "experts: 4, top_k: 2, expert_ff: 64"));
    std::string out = fx.dir / "from_llmc.safetensors";
    RunResult u = run(moe_bin() + " upcycle --in " + (fx.dir / "gpt2.bin") + " --config " + (fx.dir / "moe.yaml") +
                      " --out " + out);
    INFO(u.output);
    REQUIRE(u.status == 0);
    CHECK(u.output.find("llm.c GPT-2 fp32") != std::string::npos);
    CHECK(u.output.find("padding rows 64..79") != std::string::npos);
    CHECK(u.output.find("kept the first 16 position rows") != std::string::npos);
    CHECK(rel(eval_json_loss(out), eval_json_loss(fx.dense_path)) < 1e-5);
}

TEST_CASE("upcycle: moe train continues from an upcycled checkpoint (train.init_from)") {
    Fixture fx;
    // a briefly trained dense model, upcycled by the binary, trained on by the binary
    Config dense = fx.dense_cfg;
    dense.train.out_dir = fx.dir / "dense_run";
    dense.train.steps = 20;
    TrainOptions quiet;
    quiet.quiet = true;
    TrainSummary ds = run_training(dense, quiet);
    write_text(fx.dir / "moe.yaml", yaml(fx.dir, "experts: 4, top_k: 2, expert_ff: 64"));
    const std::string up = fx.dir / "up.safetensors";
    RunResult u = run(moe_bin() + " upcycle --method drop --drop-ratio 0.25 --in " + ds.final_checkpoint +
                      " --config " + (fx.dir / "moe.yaml") + " --out " + up);
    INFO(u.output);
    REQUIRE(u.status == 0);
    CHECK(u.output.find("function-preserving: no") != std::string::npos);

    // --resume cannot start from it (no training state) and says what to do instead
    RunResult rs = run(moe_bin() + " train " + (fx.dir / "moe.yaml") + " --resume " + up);
    CHECK(rs.status == 1);
    CHECK(rs.output.find("train.init_from") != std::string::npos);

    RunResult t = run(moe_bin() + " train " + (fx.dir / "moe.yaml") + " --set train.init_from=" + up);
    INFO(t.output);
    REQUIRE(t.status == 0);
    CHECK(t.output.find("init: weights from " + up) != std::string::npos);
    std::vector<double> losses, val;
    std::ifstream metrics(fx.dir / "run/metrics.jsonl");
    for (std::string line; std::getline(metrics, line);) {
        nlohmann::json j = nlohmann::json::parse(line);
        if (j.contains("loss")) losses.push_back(j["loss"].get<double>());
        if (j.contains("val_loss")) val.push_back(j["val_loss"].get<double>());
    }
    REQUIRE(losses.size() == 30);
    REQUIRE(val.size() >= 2);
    // step 0's val loss is the upcycled model's (the weights were loaded), and training lowers it
    CHECK(rel(val.front(), eval_json_loss(up)) < 1e-5);
    CHECK(val.back() < val.front());
    double first = 0, last = 0;
    for (int i = 0; i < 5; i++) first += losses[i], last += losses[25 + i];
    CHECK(last < first);

    // init_from with a checkpoint of another shape: one error naming the key
    RunResult bad = run(moe_bin() + " train " + (fx.dir / "moe.yaml") + " --set train.init_from=" + fx.dense_path);
    CHECK(bad.status == 1);
    CHECK(bad.output.find("error: train.init_from: ") != std::string::npos);
}

TEST_CASE("upcycle: bad input is one error line, exit 1, and no output file") {
    Fixture fx;
    const std::string out = fx.dir / "out.safetensors";
    auto expect_error = [&](const std::string& args, const std::vector<std::string>& parts, int status = 1) {
        RunResult r = run(moe_bin() + " upcycle " + args + " --out " + out);
        INFO(args << "\n" << r.output);
        CHECK(r.status == status);
        CHECK(r.output.rfind("error: ", 0) == 0);
        CHECK(std::count(r.output.begin(), r.output.end(), '\n') == 1);
        for (const std::string& p : parts) CHECK(r.output.find(p) != std::string::npos);
        CHECK_FALSE(file_exists(out));
    };
    auto with = [&](const std::string& name, const std::string& text) {
        write_text(fx.dir / name, text);
        return " --in " + fx.dense_path + " --config " + (fx.dir / name);
    };
    const std::string ok = "experts: 4, top_k: 2, expert_ff: 64";
    expect_error(with("c1.yaml", yaml(fx.dir, ok).replace(yaml(fx.dir, ok).find("d_model: 16"), 11, "d_model: 32")),
                 {"model.d_model", "32", "16", "c1.yaml"});
    expect_error(with("c2.yaml", yaml(fx.dir, ok).replace(yaml(fx.dir, ok).find("seq_len: 16"), 11, "seq_len: 17")),
                 {"model.seq_len", "17", "16"});
    expect_error(with("c3.yaml", yaml(fx.dir, "experts: 4, top_k: 4, expert_ff: 24")) + " --method granular",
                 {"model.moe.expert_ff", "24", "64"});
    expect_error(with("c4.yaml", yaml(fx.dir, "experts: 6, top_k: 2, expert_ff: 16")) + " --method granular",
                 {"model.moe.experts", "multiple of 4"});
    expect_error(with("c5.yaml", yaml(fx.dir, "experts: 4, top_k: 2, expert_ff: 32")),
                 {"model.moe.expert_ff", "d_ff = 64"});
    expect_error(with("c6.yaml", yaml(fx.dir, "experts: 4, top_k: 2, expert_ff: 64, activation: swiglu")),
                 {"model.moe.activation", "swiglu"});
    const std::string good = with("good.yaml", yaml(fx.dir, ok));
    expect_error(good + " --method drop --drop-ratio 1.5", {"--drop-ratio", "1.5"});
    expect_error(good + " --method drop --drop-ratio -0.1", {"--drop-ratio"});
    expect_error(good + " --drop-ratio 0.5", {"--method drop"});
    expect_error(good + " --noise -1", {"--noise"});
    expect_error(good + " --method bogus", {"--method"}, 2);

    auto in = [&](const std::string& file) { return " --in " + file + " --config " + (fx.dir / "good.yaml"); };
    write_text(fx.dir / "junk.bin", "this is neither a safetensors file nor an llm.c checkpoint");
    expect_error(in(fx.dir / "junk.bin"), {"neither", "junk.bin"});
    expect_error(in(fx.dir / "missing.bin"), {"missing.bin"});
    write_llmc(fx.dir / "gpt2.bin", *fx.dense, 64, 16, false);
    std::string bytes = file_bytes(fx.dir / "gpt2.bin");
    { std::ofstream(fx.dir / "trunc.bin", std::ios::binary) << bytes.substr(0, bytes.size() - 10); }
    expect_error(in(fx.dir / "trunc.bin"), {"truncated", "trunc.bin"});
    { std::ofstream(fx.dir / "short.bin", std::ios::binary) << bytes.substr(0, 100); }
    expect_error(in(fx.dir / "short.bin"), {"truncated"});
    std::string v4 = bytes;
    v4[4] = 4;   // version 4 does not exist
    { std::ofstream(fx.dir / "v4.bin", std::ios::binary) << v4; }
    expect_error(in(fx.dir / "v4.bin"), {"version 4"});
    std::string dense_bytes = file_bytes(fx.dense_path);
    { std::ofstream(fx.dir / "trunc.safetensors", std::ios::binary) << dense_bytes.substr(0, dense_bytes.size() / 2); }
    expect_error(in(fx.dir / "trunc.safetensors"), {"trunc.safetensors"});
    // an MoE checkpoint is not a dense one
    REQUIRE(run(moe_bin() + " upcycle" + good + " --out " + (fx.dir / "moe.safetensors")).status == 0);
    expect_error(in(fx.dir / "moe.safetensors"), {"already an MoE checkpoint"});

    RunResult h = run(moe_bin() + " upcycle --help");
    CHECK(h.status == 0);
    CHECK(h.output.find("--drop-ratio") != std::string::npos);
}
