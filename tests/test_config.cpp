/* Tests for src/config.cpp: defaults, a full file, every class of error (each must name the
   key and the line, or the override, that caused it), `--set` overrides, and the
   config_to_yaml round trip that checkpoints rely on. */
#include <doctest/doctest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "config.h"

using moe::Config;
using Strings = std::vector<std::string>;

namespace {

// A fresh directory under /tmp, removed with everything in it at scope exit.
struct TempDir {
    std::string path;
    TempDir() {
        char tmpl[] = "/tmp/moe_test_config_XXXXXX";
        REQUIRE(mkdtemp(tmpl) != nullptr);
        path = tmpl;
    }
    ~TempDir() { std::filesystem::remove_all(path); }
    std::string write(const std::string& name, const std::string& text) const {
        std::string p = path + "/" + name;
        std::ofstream(p) << text;
        return p;
    }
};

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// The message of the moe::Error that parsing throws, or "" when it parses.
std::string error_of(const std::string& yaml, const Strings& overrides = {}) {
    try {
        moe::parse_config(yaml, "x.yaml", overrides);
    } catch (const moe::Error& e) {
        return e.what();
    }
    return "";
}

// Parsing must fail with a message that holds every part (key names, "x.yaml:LINE)", ...).
void expect_error(const std::string& yaml, const Strings& overrides, const Strings& parts) {
    std::string msg = error_of(yaml, overrides);
    CAPTURE(yaml);
    CAPTURE(msg);
    CHECK_FALSE(msg.empty());
    for (const std::string& p : parts) {
        CAPTURE(p);
        CHECK(has(msg, p));
    }
}
void expect_error(const std::string& yaml, const Strings& parts) { expect_error(yaml, {}, parts); }

auto tie_all(const Config& c) {
    const auto& m = c.model;
    const auto& e = m.moe;
    const auto& r = c.router;
    const auto& b = c.balance;
    const auto& t = c.train;
    return std::make_tuple(
        std::tie(m.vocab_size, m.seq_len, m.n_layer, m.n_head, m.d_model, m.d_ff),
        std::tie(e.enabled, e.every, e.first_dense, e.experts, e.top_k, e.expert_ff, e.activation,
                 e.shared_experts, e.shared_ff),
        std::tie(r.type, r.score, r.normalize_topk, r.scale, r.noise, r.jitter_eps, r.groups,
                 r.topk_groups, r.capacity_factor, r.eval_capacity_factor, r.drop_policy,
                 r.expert_choice_capacity, r.soft_slots, r.hash),
        std::tie(b.aux_loss, b.aux_scope, b.z_loss, b.importance_loss, b.load_loss, b.bias_rate,
                 b.bias_center),
        std::tie(t.batch_size, t.grad_accum, t.steps, t.lr, t.min_lr, t.warmup, t.weight_decay,
                 t.beta1, t.beta2, t.grad_clip, t.seed, t.eval_every, t.eval_batches,
                 t.ckpt_every, t.out_dir, t.device, t.dtype, t.threads),
        std::tie(c.data.train, c.data.val, c.dist.expert_parallel));
}
bool same(const Config& a, const Config& b) { return tie_all(a) == tie_all(b); }

// Every key set away from its default.
const char* kFull = R"(# every key, none at its default
model:
  vocab_size: 50257
  seq_len: 64
  n_layer: 6
  n_head: 6
  d_model: 192
  d_ff: 768
  moe:
    every: 2
    first_dense: 1
    experts: 16
    top_k: 4
    expert_ff: 96
    activation: swiglu
    shared_experts: 2
    shared_ff: 128
router:
  type: topk
  score: sigmoid
  normalize_topk: false
  scale: 2.5
  noise: gaussian
  jitter_eps: 0.02
  groups: 4
  topk_groups: 2
  capacity_factor: 1.25
  eval_capacity_factor: 2
  drop_policy: position
  expert_choice_capacity: 2.0
  soft_slots: 3
  hash: balanced
balance:
  aux_loss: 0.01
  aux_scope: global
  z_loss: 1e-3
  importance_loss: 0.1
  load_loss: 0.2
  bias_rate: 0.001
  bias_center: true
train:
  batch_size: 4
  grad_accum: 2
  steps: 10
  lr: 6e-4
  min_lr: 0
  warmup: 0
  weight_decay: 0.0
  beta1: 0.8
  beta2: 0.99
  grad_clip: 0
  seed: -42
  eval_every: 0
  eval_batches: 2
  ckpt_every: 0
  out_dir: "runs/full: test #1"
  device: cuda
  dtype: bf16
  threads: 3
data:
  train: data/fineweb/train_*.bin
  val: '/abs/val_[0-9]*.bin'
dist:
  expert_parallel: 4
)";

}  // namespace

TEST_CASE("config: defaults are DESIGN.md's, and an empty file is all defaults") {
    for (const char* text : {"", "# only a comment\n", "{}\n"}) {
        Config c = moe::parse_config(text, "x.yaml");
        CHECK(same(c, Config{}));
    }
    Config c;
    CHECK_FALSE(c.model.moe.enabled);
    CHECK(c.model.vocab_size == 256);
    CHECK(c.router.type == "topk");
    CHECK(c.router.normalize_topk);
    CHECK(c.balance.aux_scope == "micro_batch");
    CHECK(c.train.lr == 3.0e-3);
    CHECK(c.train.min_lr == 3.0e-4);
    CHECK(c.train.seed == 1337);
    CHECK(c.train.out_dir == "runs/quickstart");
    CHECK(c.data.train == "data/synth/train_*.bin");
    CHECK(c.dist.expert_parallel == 1);
}

TEST_CASE("config: a moe block, even empty, enables MoE with defaults for the rest") {
    Config c = moe::parse_config("model:\n  moe: {}\n", "x.yaml");
    CHECK(c.model.moe.enabled);
    Config d;
    d.model.moe.enabled = true;
    CHECK(same(c, d));
}

TEST_CASE("config: is_moe_layer follows every and first_dense") {
    moe::ModelConfig m;
    m.n_layer = 8;
    CHECK_FALSE(m.is_moe_layer(0));  // dense model
    m.moe.enabled = true;
    for (int l = 0; l < 8; l++) CHECK(m.is_moe_layer(l));
    m.moe.every = 2;
    m.moe.first_dense = 1;
    Strings got;
    for (int l = 0; l < 8; l++) got.push_back(m.is_moe_layer(l) ? "M" : "d");
    CHECK(got == Strings{"d", "M", "d", "M", "d", "M", "d", "M"});
    m.moe.every = 3;
    m.moe.first_dense = 2;
    got.clear();
    for (int l = 0; l < 8; l++) got.push_back(m.is_moe_layer(l) ? "M" : "d");
    CHECK(got == Strings{"d", "d", "M", "d", "d", "M", "d", "d"});
}

TEST_CASE("config: a full file sets every key") {
    TempDir dir;
    Config c = moe::load_config(dir.write("full.yaml", kFull));
    const auto& m = c.model;
    CHECK(m.vocab_size == 50257);
    CHECK(m.seq_len == 64);
    CHECK(m.n_layer == 6);
    CHECK(m.n_head == 6);
    CHECK(m.d_model == 192);
    CHECK(m.d_ff == 768);
    CHECK(m.moe.enabled);
    CHECK(m.moe.every == 2);
    CHECK(m.moe.first_dense == 1);
    CHECK(m.moe.experts == 16);
    CHECK(m.moe.top_k == 4);
    CHECK(m.moe.expert_ff == 96);
    CHECK(m.moe.activation == "swiglu");
    CHECK(m.moe.shared_experts == 2);
    CHECK(m.moe.shared_ff == 128);
    const auto& r = c.router;
    CHECK(r.score == "sigmoid");
    CHECK_FALSE(r.normalize_topk);
    CHECK(r.scale == 2.5);
    CHECK(r.noise == "gaussian");
    CHECK(r.jitter_eps == 0.02);
    CHECK(r.groups == 4);
    CHECK(r.topk_groups == 2);
    CHECK(r.capacity_factor == 1.25);
    CHECK(r.eval_capacity_factor == 2.0);  // an integer is fine for a real key
    CHECK(r.drop_policy == "position");
    CHECK(r.expert_choice_capacity == 2.0);
    CHECK(r.soft_slots == 3);
    CHECK(r.hash == "balanced");
    const auto& b = c.balance;
    CHECK(b.aux_loss == 0.01);
    CHECK(b.aux_scope == "global");
    CHECK(b.z_loss == 1e-3);  // "1e-3" is a number, not a string
    CHECK(b.importance_loss == 0.1);
    CHECK(b.load_loss == 0.2);
    CHECK(b.bias_rate == 0.001);
    CHECK(b.bias_center);
    const auto& t = c.train;
    CHECK(t.batch_size == 4);
    CHECK(t.grad_accum == 2);
    CHECK(t.steps == 10);
    CHECK(t.lr == 6e-4);
    CHECK(t.min_lr == 0.0);
    CHECK(t.warmup == 0);
    CHECK(t.weight_decay == 0.0);
    CHECK(t.beta1 == 0.8);
    CHECK(t.beta2 == 0.99);
    CHECK(t.grad_clip == 0.0);
    CHECK(t.seed == -42);
    CHECK(t.eval_every == 0);
    CHECK(t.eval_batches == 2);
    CHECK(t.ckpt_every == 0);
    CHECK(t.out_dir == "runs/full: test #1");
    CHECK(t.device == "cuda");
    CHECK(t.dtype == "bf16");
    CHECK(t.threads == 3);
    CHECK(c.data.train == "data/fineweb/train_*.bin");
    CHECK(c.data.val == "/abs/val_[0-9]*.bin");
    CHECK(c.dist.expert_parallel == 4);
}

TEST_CASE("config: unreadable file") {
    TempDir dir;
    std::string missing = dir.path + "/nope.yaml";
    CHECK_THROWS_WITH_AS(moe::load_config(missing),
                         ("cannot read config (" + missing + ": No such file or directory)").c_str(),
                         moe::Error);
    CHECK_THROWS_WITH_AS(moe::load_config(dir.path),
                         ("cannot read config (" + dir.path + ": Is a directory)").c_str(),
                         moe::Error);
}

TEST_CASE("config: malformed YAML names the file and line") {
    expect_error("model:\n  n_layer: 4\n  d_model: [128\n", {"malformed YAML", "x.yaml:"});
    expect_error("model:\n  n_layer: 4\n\td_model: 3\n", {"malformed YAML", "tab", "x.yaml:3)"});
    TempDir dir;
    std::string p = dir.write("bad.yaml", "train:\n  steps: 3\n  lr: x: y\n");
    std::string msg;
    try {
        moe::load_config(p);
    } catch (const moe::Error& e) {
        msg = e.what();
    }
    CAPTURE(msg);
    CHECK(has(msg, "malformed YAML: "));
    CHECK(has(msg, "(" + p + ":3)"));
}

TEST_CASE("config: the top level and every block must be maps") {
    expect_error("- model\n- train\n", {"top level", "a list", "x.yaml:1)"});
    expect_error("just text\n", {"top level", "x.yaml:1)"});
    expect_error("model: 3\n", {"model: expected a block", "'3'", "x.yaml:1)"});
    expect_error("train:\n", {"train: expected a block", "nothing", "x.yaml:1)"});
    expect_error("router: [topk]\n", {"router: expected a block", "a list"});
    expect_error("model:\n  n_layer: 2\n  moe: true\n", {"model.moe: expected a block", "x.yaml:3)"});
    expect_error("model:\n  n_layer: 2\n  moe:\n", {"model.moe: expected a block", "x.yaml:3)"});
}

TEST_CASE("config: unknown keys at any level") {
    expect_error("trian:\n  steps: 3\n", {"unknown key trian", "did you mean train?", "x.yaml:1)"});
    expect_error("model:\n  n_layer: 2\n  d_modle: 64\n",
                 {"unknown key model.d_modle", "did you mean model.d_model?", "x.yaml:3)"});
    expect_error("model:\n  moe:\n    experts: 4\n    topk: 2\n",
                 {"unknown key model.moe.topk", "model.moe.top_k", "x.yaml:4)"});
    // the right name in the wrong block
    expect_error("train:\n  steps: 3\n  top_k: 2\n",
                 {"unknown key train.top_k", "did you mean model.moe.top_k?", "x.yaml:3)"});
    expect_error("\n\nrouter:\n  flavour: vanilla\n", {"unknown key router.flavour (x.yaml:4)"});
    expect_error("moe:\n  experts: 4\n", {"unknown key moe", "model.moe", "x.yaml:1)"});
    expect_error("data:\n  train: a\n  test: b\n", {"unknown key data.test", "x.yaml:3)"});
    expect_error("model:\n  n_layer: 2\n  n_layer: 3\n", {"duplicate key model.n_layer", "x.yaml:3)"});
    expect_error("model:\n  n_layer: 2\nmodel.n_layer: 3\n", {"unknown key model.n_layer", "x.yaml:3)"});
    expect_error("? [a, b]\n: 3\n", {"top level: keys must be plain names", "x.yaml:1)"});
}

TEST_CASE("config: values must have the key's type") {
    expect_error("\nmodel:\n  seq_len: 64\n  n_layer: abc\n",
                 {"model.n_layer: expected an integer, got 'abc' (x.yaml:4)"});
    expect_error("model:\n  n_layer: 2.5\n", {"model.n_layer: expected an integer", "'2.5'", "x.yaml:2)"});
    expect_error("model:\n  n_layer: 1e3\n", {"model.n_layer: expected an integer", "x.yaml:2)"});
    expect_error("model:\n  n_layer: \"4\"\n", {"model.n_layer: expected an integer", "quoted"});
    expect_error("model:\n  n_layer: 99999999999\n", {"model.n_layer", "too large", "x.yaml:2)"});
    expect_error("model:\n  n_layer: [1, 2]\n", {"model.n_layer: expected an integer, got a list"});
    expect_error("model:\n  n_layer:\n", {"model.n_layer: expected an integer, got nothing"});
    expect_error("train:\n  lr: fast\n", {"train.lr: expected a number, got 'fast' (x.yaml:2)"});
    expect_error("train:\n  lr: .inf\n", {"train.lr: expected a number", "x.yaml:2)"});
    expect_error("train:\n  lr: {a: 1}\n", {"train.lr: expected a number, got a map"});
    expect_error("train:\n  seed: 1.5\n", {"train.seed: expected an integer"});
    expect_error("router:\n  normalize_topk: yes\n",
                 {"router.normalize_topk: expected true or false, got 'yes' (x.yaml:2)"});
    expect_error("router:\n  normalize_topk: 1\n", {"router.normalize_topk: expected true or false"});
    expect_error("train:\n  out_dir: [a, b]\n", {"train.out_dir: expected a string, got a list"});
    // enum keys list what is allowed
    expect_error("router:\n  type: top_k\n",
                 {"router.type: expected one of topk | expert_choice | hash | soft | sinkhorn, "
                  "got 'top_k' (x.yaml:2)"});
    expect_error("router:\n  score: relu\n", {"router.score", "softmax | sigmoid"});
    expect_error("router:\n  noise: loud\n", {"router.noise", "none | gaussian | jitter"});
    expect_error("router:\n  drop_policy: random\n", {"router.drop_policy", "probs | position"});
    expect_error("router:\n  hash: md5\n", {"router.hash", "random | balanced"});
    expect_error("model:\n  moe:\n    activation: relu\n",
                 {"model.moe.activation", "gelu | swiglu", "x.yaml:3)"});
    expect_error("balance:\n  aux_scope: batch\n", {"balance.aux_scope", "micro_batch | sequence | global"});
    expect_error("train:\n  device: tpu\n", {"train.device", "auto | cpu | cuda"});
    expect_error("train:\n  dtype: fp16\n", {"train.dtype", "fp32 | bf16"});
}

TEST_CASE("config: single-key ranges name the key and its line") {
    struct Row { const char* block; const char* key; const char* value; };
    const Row rows[] = {
        {"model", "vocab_size", "1"}, {"model", "vocab_size", "65537"},
        {"model", "seq_len", "0"}, {"model", "n_layer", "0"}, {"model", "n_head", "0"},
        {"model", "d_model", "0"}, {"model", "d_ff", "-1"},
        {"router", "scale", "0"}, {"router", "jitter_eps", "1.0"}, {"router", "jitter_eps", "-0.1"},
        {"router", "groups", "0"}, {"router", "topk_groups", "0"},
        {"router", "capacity_factor", "-1"}, {"router", "eval_capacity_factor", "-0.5"},
        {"router", "expert_choice_capacity", "0"}, {"router", "soft_slots", "0"},
        {"balance", "aux_loss", "-0.01"}, {"balance", "z_loss", "-1"},
        {"balance", "importance_loss", "-1"}, {"balance", "load_loss", "-1"},
        {"balance", "bias_rate", "-0.001"},
        {"train", "batch_size", "0"}, {"train", "grad_accum", "0"}, {"train", "steps", "0"},
        {"train", "lr", "0"}, {"train", "min_lr", "-1e-5"}, {"train", "warmup", "-1"},
        {"train", "weight_decay", "-0.1"}, {"train", "beta1", "1"}, {"train", "beta2", "1.5"},
        {"train", "beta1", "-0.1"}, {"train", "grad_clip", "-1"}, {"train", "eval_every", "-1"},
        {"train", "eval_batches", "0"}, {"train", "ckpt_every", "-5"}, {"train", "out_dir", "''"},
        {"train", "threads", "-1"}, {"data", "train", "''"}, {"data", "val", "\"\""},
        {"dist", "expert_parallel", "0"},
    };
    for (const Row& r : rows) {
        // a few lines of padding so the line number is not trivially 2
        std::string yaml = fmt::format("# pad\n\n{}:\n  {}: {}\n", r.block, r.key, r.value);
        expect_error(yaml, {fmt::format("{}.{}: ", r.block, r.key), "x.yaml:4)"});
    }
    // the moe block's own ranges
    const Row moe_rows[] = {
        {"moe", "experts", "0"}, {"moe", "top_k", "0"}, {"moe", "expert_ff", "0"},
        {"moe", "every", "0"}, {"moe", "first_dense", "-1"}, {"moe", "shared_experts", "-1"},
        {"moe", "shared_ff", "0"},
    };
    for (const Row& r : moe_rows) {
        std::string yaml = fmt::format("model:\n  moe:\n    {}: {}\n", r.key, r.value);
        expect_error(yaml, {fmt::format("model.moe.{}: ", r.key), "x.yaml:3)"});
    }
    // edges that are allowed
    CHECK(error_of("model:\n  vocab_size: 65536\n") == "");
    CHECK(error_of("model:\n  vocab_size: 2\n") == "");
    CHECK(error_of("router:\n  jitter_eps: 0\n") == "");
    CHECK(error_of("train:\n  beta1: 0\n  beta2: 0.999999\n  min_lr: 3e-3\n") == "");
}

TEST_CASE("config: consistency rules name the key and the right line") {
    expect_error("model:\n  n_head: 3\n  d_model: 128\n",
                 {"model.d_model", "not divisible by model.n_head = 3", "x.yaml:3)"});
    // d_model left at its default: point at the n_head line instead
    expect_error("\nmodel:\n  n_head: 3\n", {"model.d_model", "x.yaml:3)"});
    expect_error("model:\n  moe:\n    experts: 4\n    top_k: 5\n", {"model.moe.top_k", "x.yaml:4)"});
    expect_error("model:\n  moe:\n    experts: 1\n", {"model.moe.top_k", "experts = 1", "x.yaml:3)"});
    expect_error("model:\n  n_layer: 2\n  moe:\n    first_dense: 2\n",
                 {"model.moe.first_dense", "model.n_layer = 2", "x.yaml:4)"});
    expect_error("model:\n  moe:\n    experts: 6\nrouter:\n  groups: 4\n",
                 {"router.groups", "not divisible", "x.yaml:5)"});
    expect_error("router:\n  groups: 2\n  topk_groups: 3\n", {"router.topk_groups", "x.yaml:3)"});
    expect_error("model:\n  moe:\n    experts: 8\n    top_k: 4\nrouter:\n  groups: 4\n  topk_groups: 1\n",
                 {"model.moe.top_k", "router.topk_groups = 1", "x.yaml:4)"});
    for (const char* type : {"expert_choice", "hash", "soft"}) {
        expect_error(fmt::format("model:\n  moe: {{}}\nrouter:\n  type: {}\n  noise: jitter\n", type),
                     {"router.noise", "token-choice", type, "x.yaml:5)"});
        expect_error(fmt::format("model:\n  moe: {{}}\nrouter:\n  type: {}\nbalance:\n  bias_rate: 0.01\n",
                                 type),
                     {"balance.bias_rate", "no top-k scores to bias", type, "x.yaml:6)"});
    }
    CHECK(error_of("model:\n  moe: {}\nrouter:\n  type: sinkhorn\n  noise: gaussian\n") == "");
    expect_error("model:\n  moe: {}\nrouter:\n  type: sinkhorn\nbalance:\n  bias_rate: 0.01\n",
                 {"balance.bias_rate", "sinkhorn", "x.yaml:6)"});
    // rules that keep each balancing term to routers it means something for (docs/moe.md)
    expect_error("model:\n  moe: {}\nrouter:\n  type: expert_choice\nbalance:\n  aux_loss: 0.01\n",
                 {"balance.aux_loss", "balanced by construction", "x.yaml:6)"});
    expect_error("model:\n  moe: {}\nrouter:\n  type: soft\nbalance:\n  z_loss: 0.01\n",
                 {"balance.z_loss", "no router logits", "x.yaml:6)"});
    expect_error("model:\n  moe: {}\nbalance:\n  load_loss: 0.01\n",
                 {"balance.load_loss", "router.noise = gaussian", "x.yaml:4)"});
    expect_error("model:\n  moe: {top_k: 2}\nrouter:\n  type: hash\n",
                 {"model.moe.top_k", "top_k must be 1", "x.yaml:2)"});
    expect_error("model:\n  moe: {experts: 8, top_k: 1}\nrouter:\n  groups: 4\n  topk_groups: 2\n",
                 {"router.topk_groups", "x.yaml:5)"});
    expect_error("model:\n  moe: {}\nrouter:\n  type: expert_choice\n  capacity_factor: 1.0\n",
                 {"router.capacity_factor", "x.yaml:5)"});
    expect_error("model:\n  moe: {}\nrouter:\n  type: sinkhorn\n  groups: 2\n",
                 {"router.groups", "needs router.type = topk", "x.yaml:5)"});
    expect_error("train:\n  device: cpu\n  dtype: bf16\n",
                 {"train.dtype: bf16 needs the CUDA backend", "x.yaml:3)"});
    CHECK(error_of("train:\n  device: auto\n  dtype: bf16\n") == "");
    expect_error("model:\n  moe:\n    experts: 6\ndist:\n  expert_parallel: 4\n",
                 {"dist.expert_parallel", "model.moe.experts = 6", "x.yaml:5)"});
    expect_error("train:\n  lr: 1e-4\n  min_lr: 2e-4\n", {"train.min_lr", "x.yaml:3)"});
}

TEST_CASE("config: router and balance settings are ignored without a moe block") {
    const char* yaml =
        "router:\n  type: hash\n  noise: jitter\n  groups: 3\nbalance:\n  bias_rate: 0.5\n"
        "dist:\n  expert_parallel: 3\n";
    CHECK(error_of(yaml) == "");
    // ... until the model has experts
    expect_error(yaml, {"model.moe.experts=6"}, {"router.noise", "x.yaml:3)"});
}

TEST_CASE("config: --set overrides") {
    const char* yaml = "model:\n  n_layer: 2\ntrain:\n  steps: 300\n";
    Config c = moe::parse_config(yaml, "x.yaml",
                                 {"train.steps=20", "router.type=hash", "train.lr=1e-3",
                                  "train.steps=30", " train.out_dir = runs/x y",
                                  "data.train=data/[ab]*.bin", "router.normalize_topk=false"});
    CHECK(c.train.steps == 30);  // applied in order: the last one wins
    CHECK(c.router.type == "hash");
    CHECK(c.train.lr == 1e-3);
    CHECK(c.train.out_dir == "runs/x y");  // spaces around the key and value do not matter
    CHECK(c.data.train == "data/[ab]*.bin");  // not YAML, but fine as a path
    CHECK_FALSE(c.router.normalize_topk);
    CHECK(c.model.n_layer == 2);
    CHECK_FALSE(c.model.moe.enabled);

    // a key under model.moe creates the block
    Config m = moe::parse_config(yaml, "x.yaml", {"model.moe.experts=16"});
    CHECK(m.model.moe.enabled);
    CHECK(m.model.moe.experts == 16);
    CHECK(m.model.moe.top_k == 2);

    // load_config applies them too, after the file
    TempDir dir;
    Config f = moe::load_config(dir.write("o.yaml", kFull), {"model.moe.top_k=2"});
    CHECK(f.model.moe.top_k == 2);
    CHECK(f.model.moe.experts == 16);

    // errors name the override
    expect_error(yaml, {"train.steps=20", "train.setps=3"},
                 {"unknown key train.setps", "did you mean train.steps?", "(--set train.setps=3)"});
    expect_error(yaml, {"steps"}, {"malformed override 'steps'", "(--set steps)"});
    expect_error(yaml, {"=3"}, {"malformed override", "(--set =3)"});
    expect_error(yaml, {"model=3"}, {"model is a block", "(--set model=3)"});
    expect_error(yaml, {"model.moe=8"}, {"model.moe is a block", "(--set model.moe=8)"});
    expect_error(yaml, {"train.steps=2.5"}, {"train.steps: expected an integer, got '2.5' (--set train.steps=2.5)"});
    expect_error(yaml, {"train.steps="}, {"train.steps: expected an integer, got nothing"});
    expect_error(yaml, {"train.steps=[1,"}, {"train.steps: malformed value", "(--set train.steps=[1,)"});
    expect_error(yaml, {"router.type=fancy"}, {"router.type", "topk | expert_choice", "(--set router.type=fancy)"});
    // validation blames the override that set the key, even over the file's line
    expect_error(yaml, {"train.steps=0"}, {"train.steps: must be >= 1", "(--set train.steps=0)"});
    expect_error(yaml, {"model.moe.experts=2", "model.moe.top_k=3"},
                 {"model.moe.top_k", "(--set model.moe.top_k=3)"});
    expect_error(yaml, {"model.moe.top_k=9"}, {"model.moe.top_k", "(--set model.moe.top_k=9)"});
}

TEST_CASE("config: config_to_yaml round-trips exactly") {
    auto round_trip = [](const Config& c) {
        std::string yaml = moe::config_to_yaml(c);
        CAPTURE(yaml);
        Config back = moe::parse_config(yaml, "resolved.yaml");
        CHECK(same(back, c));
        CHECK(moe::config_to_yaml(back) == yaml);
        return yaml;
    };
    std::string dense = round_trip(Config{});
    CHECK_FALSE(has(dense, "moe:"));
    CHECK(has(dense, "model:\n  vocab_size: 256\n"));
    CHECK(has(dense, "train:\n  batch_size: 8\n"));
    CHECK(has(dense, "  lr: 0.003\n"));
    CHECK(dense.find("model:") < dense.find("router:"));
    CHECK(dense.find("router:") < dense.find("balance:"));
    CHECK(dense.find("balance:") < dense.find("train:"));
    CHECK(dense.find("train:") < dense.find("data:"));
    CHECK(dense.find("data:") < dense.find("dist:"));

    Config full = moe::parse_config(kFull, "x.yaml");
    std::string text = round_trip(full);
    CHECK(has(text, "  d_ff: 768\n  moe:\n    every: 2\n"));
    CHECK(has(text, "    shared_ff: 128\nrouter:\n"));

    Config o = moe::parse_config("", "x.yaml",
                                 {"model.moe.experts=16", "model.moe.top_k=1", "train.steps=20", "router.type=hash",
                                  "train.out_dir=runs/\"quoted\" \\ #x: y", "data.val=*.bin"});
    round_trip(o);

    // doubles that have no short decimal form, and ones YAML 1.1 readers would misread
    Config d;
    d.train.lr = 1.0 / 3.0;
    d.train.min_lr = 1e-20;
    d.train.weight_decay = 5e-324;  // the smallest denormal
    d.router.scale = 1e300;
    d.train.beta1 = 0.1 + 0.2;
    d.balance.aux_loss = 100000.0;
    d.train.seed = -9223372036854775807LL - 1;
    d.data.train = "tab\there\nnewline";
    std::string dt = round_trip(d);
    CHECK(has(dt, "min_lr: 1.0e-20\n"));     // a '.' so PyYAML reads a float, not a string
    CHECK(has(dt, "aux_loss: 100000.0\n"));
    CHECK(has(dt, "scale: 1.0e+300\n"));
}
