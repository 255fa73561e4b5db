/* Config loading: YAML file -> Config, `--set key.path=value` overrides, validation, and the
   way back (config_to_yaml, stored in checkpoints). One table below lists every key in
   DESIGN.md's order with its kind and its field; parsing, overrides and printing all walk it,
   so adding a key is one line here plus its checks in validate(). Every error names the key
   and where it was written: "(file:line)" or "(--set key=value)". */
#include "config.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <yaml-cpp/yaml.h>

#include "common.h"

namespace moe {

bool ModelConfig::is_moe_layer(int l) const {
    return moe.enabled && l >= moe.first_dense && (l - moe.first_dense) % moe.every == 0;
}

namespace {

enum class Kind { Int, Int64, Real, Bool, Text, Choice };

struct Field {
    const char* path;
    Kind kind;
    void* ptr;
    const char* choices = nullptr;  // Choice: "a|b|c"
    Field(const char* p, int* v) : path(p), kind(Kind::Int), ptr(v) {}
    Field(const char* p, long long* v) : path(p), kind(Kind::Int64), ptr(v) {}
    Field(const char* p, double* v) : path(p), kind(Kind::Real), ptr(v) {}
    Field(const char* p, bool* v) : path(p), kind(Kind::Bool), ptr(v) {}
    Field(const char* p, std::string* v, const char* ch = nullptr)
        : path(p), kind(ch ? Kind::Choice : Kind::Text), ptr(v), choices(ch) {}
};

// Every key, in DESIGN.md's order (config_to_yaml prints in this order).
std::vector<Field> fields_of(Config& c) {
    ModelConfig& m = c.model;
    MoeConfig& e = c.model.moe;
    RouterConfig& r = c.router;
    BalanceConfig& b = c.balance;
    TrainConfig& t = c.train;
    return {
        {"model.vocab_size", &m.vocab_size}, {"model.seq_len", &m.seq_len},
        {"model.n_layer", &m.n_layer}, {"model.n_head", &m.n_head},
        {"model.d_model", &m.d_model}, {"model.d_ff", &m.d_ff},
        {"model.moe.every", &e.every}, {"model.moe.first_dense", &e.first_dense},
        {"model.moe.experts", &e.experts}, {"model.moe.top_k", &e.top_k},
        {"model.moe.expert_ff", &e.expert_ff},
        {"model.moe.activation", &e.activation, "gelu|swiglu"},
        {"model.moe.shared_experts", &e.shared_experts}, {"model.moe.shared_ff", &e.shared_ff},
        {"router.type", &r.type, "topk|expert_choice|hash|soft|sinkhorn"},
        {"router.score", &r.score, "softmax|sigmoid"},
        {"router.normalize_topk", &r.normalize_topk}, {"router.scale", &r.scale},
        {"router.noise", &r.noise, "none|gaussian|jitter"}, {"router.jitter_eps", &r.jitter_eps},
        {"router.groups", &r.groups}, {"router.topk_groups", &r.topk_groups},
        {"router.capacity_factor", &r.capacity_factor},
        {"router.eval_capacity_factor", &r.eval_capacity_factor},
        {"router.drop_policy", &r.drop_policy, "probs|position"},
        {"router.expert_choice_capacity", &r.expert_choice_capacity},
        {"router.soft_slots", &r.soft_slots}, {"router.hash", &r.hash, "random|balanced"},
        {"balance.aux_loss", &b.aux_loss},
        {"balance.aux_scope", &b.aux_scope, "micro_batch|sequence|global"},
        {"balance.z_loss", &b.z_loss}, {"balance.importance_loss", &b.importance_loss},
        {"balance.load_loss", &b.load_loss}, {"balance.bias_rate", &b.bias_rate},
        {"balance.bias_center", &b.bias_center},
        {"train.batch_size", &t.batch_size}, {"train.grad_accum", &t.grad_accum},
        {"train.steps", &t.steps}, {"train.lr", &t.lr}, {"train.min_lr", &t.min_lr},
        {"train.warmup", &t.warmup}, {"train.weight_decay", &t.weight_decay},
        {"train.beta1", &t.beta1}, {"train.beta2", &t.beta2}, {"train.grad_clip", &t.grad_clip},
        {"train.seed", &t.seed}, {"train.eval_every", &t.eval_every},
        {"train.eval_batches", &t.eval_batches}, {"train.ckpt_every", &t.ckpt_every},
        {"train.out_dir", &t.out_dir}, {"train.device", &t.device, "auto|cpu|cuda"},
        {"train.dtype", &t.dtype, "fp32|bf16"}, {"train.threads", &t.threads},
        {"train.init_from", &t.init_from}, {"train.nonfinite", &t.nonfinite, "stop|skip"},
        {"data.train", &c.data.train}, {"data.val", &c.data.val},
        {"dist.expert_parallel", &c.dist.expert_parallel},
    };
}

const std::set<std::string> kBlocks = {"model", "model.moe", "router", "balance",
                                       "train", "data", "dist"};

std::string parent_of(const std::string& path) {
    size_t dot = path.rfind('.');
    return dot == std::string::npos ? "" : path.substr(0, dot);
}
std::string leaf_of(const std::string& path) { return path.substr(path.rfind('.') + 1); }
std::string indent_of(const std::string& path) {
    return std::string(2 * std::count(path.begin(), path.end(), '.'), ' ');
}

size_t edit_distance(const std::string& a, const std::string& b) {
    std::vector<size_t> row(b.size() + 1);
    for (size_t j = 0; j <= b.size(); j++) row[j] = j;
    for (size_t i = 1; i <= a.size(); i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= b.size(); j++) {
            size_t up = row[j];
            row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] != b[j - 1])});
            diag = up;
        }
    }
    return row[b.size()];
}

std::string describe(const YAML::Node& n) {
    if (n.IsMap()) return "a map";
    if (n.IsSequence()) return "a list";
    if (n.IsScalar()) return fmt::format("'{}'", n.Scalar());
    return "nothing";
}

// Strict scalar parsers: YAML would happily read "2.5" or "0x10" for an int key; we do not.
bool parse_int(const std::string& s, long long lo, long long hi, long long* out) {
    size_t i = (!s.empty() && (s[0] == '-' || s[0] == '+')) ? 1 : 0;
    if (i == s.size() || s.find_first_not_of("0123456789", i) != std::string::npos) return false;
    errno = 0;
    long long v = std::strtoll(s.c_str(), nullptr, 10);
    if (errno == ERANGE || v < lo || v > hi) return false;
    *out = v;
    return true;
}

bool parse_real(const std::string& s, double* out) {
    if (s.empty() || s.find_first_not_of("0123456789+-.eE") != std::string::npos) return false;
    char* end = nullptr;
    double v = std::strtod(s.c_str(), &end);
    if (*end != '\0' || !std::isfinite(v)) return false;
    *out = v;
    return true;
}

// A double that reads back bit-exactly, and as a float in YAML 1.1 readers too (PyYAML wants
// a '.' in the mantissa: "1e-05" would be a string there, "1.0e-05" is a float).
std::string format_real(double v) {
    std::string s = fmt::format("{}", v);
    if (s.find_first_of(".n") == std::string::npos) {  // 'n': inf/nan, left alone
        size_t e = s.find('e');
        s.insert(e == std::string::npos ? s.size() : e, ".0");
    }
    return s;
}

// Double-quoted YAML scalar: paths and globs may hold ':', '#', '*' or look like numbers.
std::string quote(const std::string& s) {
    std::string q = "\"";
    for (unsigned char ch : s) {
        if (ch == '"' || ch == '\\') q += '\\', q += (char)ch;
        else if (ch < 0x20 || ch == 0x7f) q += fmt::format("\\x{:02x}", ch);
        else q += (char)ch;
    }
    return q + "\"";
}

struct Loader {
    Config cfg;
    std::vector<Field> fields = fields_of(cfg);  // points into cfg: Loader is never copied
    std::string source;
    std::map<std::string, std::string> where;  // key or block path -> "file:line" / "--set k=v"

    explicit Loader(std::string src) : source(std::move(src)) {}
    Loader(const Loader&) = delete;

    std::string at(const YAML::Mark& m) const {
        return m.is_null() ? source : fmt::format("{}:{}", source, m.line + 1);
    }

    const Field* field(const std::string& path) const {
        for (const Field& f : fields)
            if (path == f.path) return &f;
        return nullptr;
    }

    std::string first_key_in(const std::string& block) const {
        for (const Field& f : fields)
            if (parent_of(f.path) == block) return f.path;
        return block;
    }

    [[noreturn]] void unknown(const std::string& path, const std::string& loc) const {
        // Suggest the same name in another block first (train.top_k -> model.moe.top_k),
        // then a near miss among the siblings (model.d_modle -> model.d_model).
        std::vector<std::string> known(kBlocks.begin(), kBlocks.end());
        for (const Field& f : fields) known.push_back(f.path);
        std::string best;
        size_t best_d = 3;
        for (const std::string& k : known) {
            size_t d = leaf_of(k) == leaf_of(path) ? 0
                     : parent_of(k) == parent_of(path) ? edit_distance(leaf_of(k), leaf_of(path))
                     : 99;
            if (d < best_d && d < leaf_of(path).size()) best = k, best_d = d;
        }
        if (best.empty()) fail("unknown key {} ({})", path, loc);
        fail("unknown key {}, did you mean {}? ({})", path, best, loc);
    }

    void set(const Field& f, const YAML::Node& v, const std::string& loc) {
        static const char* expected[] = {"an integer", "an integer", "a number",
                                         "true or false", "a string", ""};
        bool ok = v.IsScalar(), quoted = ok && v.Tag() == "!";
        std::string s = ok ? v.Scalar() : "";
        long long i = 0;
        switch (f.kind) {
        case Kind::Int:
            ok = ok && !quoted && parse_int(s, INT32_MIN, INT32_MAX, &i);
            if (ok) *(int*)f.ptr = (int)i;
            break;
        case Kind::Int64:
            ok = ok && !quoted && parse_int(s, INT64_MIN, INT64_MAX, &i);
            if (ok) *(long long*)f.ptr = i;
            break;
        case Kind::Real: ok = ok && !quoted && parse_real(s, (double*)f.ptr); break;
        case Kind::Bool:
            ok = ok && !quoted && (s == "true" || s == "false");
            if (ok) *(bool*)f.ptr = s == "true";
            break;
        case Kind::Text:
            if (ok) *(std::string*)f.ptr = s;
            break;
        case Kind::Choice: {
            std::string allowed = std::string("|") + f.choices + "|";
            ok = ok && s.find('|') == std::string::npos &&
                 allowed.find("|" + s + "|") != std::string::npos;
            if (ok) *(std::string*)f.ptr = s;
            break;
        }
        }
        if (ok) return;
        if (f.kind == Kind::Choice) {
            std::string list = f.choices;
            for (size_t p = 0; (p = list.find('|', p)) != std::string::npos; p += 3)
                list.replace(p, 1, " | ");
            fail("{}: expected one of {}, got {} ({})", f.path, list, describe(v), loc);
        }
        if (f.kind == Kind::Int && !quoted && parse_int(s, INT64_MIN, INT64_MAX, &i))
            fail("{}: {} is too large for an integer ({})", f.path, s, loc);
        fail("{}: expected {}, got {}{} ({})", f.path, expected[(int)f.kind], describe(v),
             quoted ? " (quoted)" : "", loc);
    }

    void walk(const YAML::Node& map, const std::string& prefix) {
        std::set<std::string> seen;
        for (const auto& kv : map) {
            YAML::Node k = kv.first, v = kv.second;
            std::string loc = at(k.Mark());
            if (!k.IsScalar())
                fail("{}: keys must be plain names ({})", prefix.empty() ? "top level" : prefix, loc);
            std::string path = prefix.empty() ? k.Scalar() : prefix + "." + k.Scalar();
            if (k.Scalar().find('.') != std::string::npos)  // "model.n_layer: 4" is --set syntax
                fail("unknown key {}: nest it in its block instead of writing dots ({})", path, loc);
            if (!seen.insert(path).second) fail("duplicate key {} ({})", path, loc);
            where[path] = loc;
            if (kBlocks.count(path)) {
                if (!v.IsMap())
                    fail("{}: expected a block of keys, got {} ({})", path, describe(v), loc);
                if (path == "model.moe") cfg.model.moe.enabled = true;
                walk(v, path);
            } else if (const Field* f = field(path)) {
                set(*f, v, loc);
            } else {
                unknown(path, loc);
            }
        }
    }

    void apply(const std::string& ov) {
        std::string loc = "--set " + ov;
        size_t eq = ov.find('=');
        std::string path = ov.substr(0, eq);
        while (!path.empty() && path.back() == ' ') path.pop_back();
        while (!path.empty() && path.front() == ' ') path.erase(0, 1);
        if (eq == std::string::npos || path.empty())
            fail("malformed override '{}': expected key.path=value ({})", ov, loc);
        const Field* f = field(path);
        if (!f && kBlocks.count(path))
            fail("{} is a block: set its keys one at a time, e.g. --set {}=... ({})", path,
                 first_key_in(path), loc);
        if (!f) unknown(path, loc);
        std::string text = ov.substr(eq + 1);
        YAML::Node v;
        try {
            v = YAML::Load(text);
        } catch (const YAML::Exception& e) {
            if (f->kind != Kind::Text) fail("{}: malformed value: {} ({})", path, e.msg, loc);
        }
        // Free-text keys (paths, globs) take the raw text when it is not a YAML scalar:
        // `--set data.train=data/[ab]*.bin` should not need shell-and-YAML double quoting.
        if (f->kind == Kind::Text && !v.IsScalar()) v = YAML::Node(text);
        set(*f, v, loc);
        where[path] = loc;
        if (parent_of(path) == "model.moe" && !cfg.model.moe.enabled) {
            cfg.model.moe.enabled = true;
            where["model.moe"] = loc;
        }
    }

    void parse(const std::string& text) {
        YAML::Node root;
        try {
            root = YAML::Load(text);
        } catch (const YAML::Exception& e) {
            fail("malformed YAML: {} ({})", e.msg, at(e.mark));
        }
        if (root.IsNull()) return;  // empty file: all defaults
        if (!root.IsMap())
            fail("expected a map of blocks (model, router, balance, train, data, dist) at the "
                 "top level, got {} ({})", describe(root), at(root.Mark()));
        walk(root, "");
    }

    // Where to point for a rule on `key`: where it was written, else where a related key was,
    // else its enclosing block, else just the file.
    std::string loc(const std::string& key, std::initializer_list<const char*> related = {}) const {
        auto it = where.find(key);
        if (it != where.end()) return it->second;
        for (const char* r : related)
            if ((it = where.find(r)) != where.end()) return it->second;
        for (std::string p = parent_of(key); !p.empty(); p = parent_of(p))
            if ((it = where.find(p)) != where.end()) return it->second;
        return source;
    }

    void need(bool ok, const std::string& key, const std::string& what,
              std::initializer_list<const char*> related = {}) const {
        if (!ok) fail("{}: {} ({})", key, what, loc(key, related));
    }
    template <typename T> void at_least(const char* key, T v, T lo) const {
        need(v >= lo, key, fmt::format("must be >= {}, got {}", lo, v));
    }
    void positive(const char* key, double v) const {
        need(v > 0, key, fmt::format("must be > 0, got {}", v));
    }
    void unit(const char* key, double v) const {  // [0, 1)
        need(v >= 0 && v < 1, key, fmt::format("must be in [0, 1), got {}", v));
    }

    void validate() const {
        const ModelConfig& m = cfg.model;
        const MoeConfig& e = m.moe;
        const RouterConfig& r = cfg.router;
        const BalanceConfig& b = cfg.balance;
        const TrainConfig& t = cfg.train;

        need(m.vocab_size >= 2 && m.vocab_size <= 65536, "model.vocab_size",
             fmt::format("must be in [2, 65536] (tokens are uint16), got {}", m.vocab_size));
        at_least("model.seq_len", m.seq_len, 1);
        at_least("model.n_layer", m.n_layer, 1);
        at_least("model.n_head", m.n_head, 1);
        at_least("model.d_model", m.d_model, 1);
        at_least("model.d_ff", m.d_ff, 1);
        need(m.d_model % m.n_head == 0, "model.d_model",
             fmt::format("{} is not divisible by model.n_head = {}", m.d_model, m.n_head),
             {"model.n_head"});

        if (e.enabled) {
            at_least("model.moe.experts", e.experts, 1);
            need(e.top_k >= 1 && e.top_k <= e.experts, "model.moe.top_k",
                 fmt::format("must be in [1, model.moe.experts = {}], got {}", e.experts, e.top_k),
                 {"model.moe.experts"});
            at_least("model.moe.expert_ff", e.expert_ff, 1);
            at_least("model.moe.every", e.every, 1);
            need(e.first_dense >= 0 && e.first_dense < m.n_layer, "model.moe.first_dense",
                 fmt::format("must be in [0, model.n_layer = {}) so that some layer is MoE, "
                             "got {}", m.n_layer, e.first_dense), {"model.n_layer"});
            at_least("model.moe.shared_experts", e.shared_experts, 0);
            at_least("model.moe.shared_ff", e.shared_ff, 1);
        }

        // Router and balance keys are checked on their own even for a dense model (a negative
        // scale is a typo either way); the rules that tie them to the experts need MoE.
        positive("router.scale", r.scale);
        unit("router.jitter_eps", r.jitter_eps);
        at_least("router.groups", r.groups, 1);
        need(r.topk_groups >= 1 && r.topk_groups <= r.groups, "router.topk_groups",
             fmt::format("must be in [1, router.groups = {}], got {}", r.groups, r.topk_groups),
             {"router.groups"});
        at_least("router.capacity_factor", r.capacity_factor, 0.0);
        at_least("router.eval_capacity_factor", r.eval_capacity_factor, 0.0);
        positive("router.expert_choice_capacity", r.expert_choice_capacity);
        at_least("router.soft_slots", r.soft_slots, 1);
        at_least("balance.aux_loss", b.aux_loss, 0.0);
        at_least("balance.z_loss", b.z_loss, 0.0);
        at_least("balance.importance_loss", b.importance_loss, 0.0);
        at_least("balance.load_loss", b.load_loss, 0.0);
        at_least("balance.bias_rate", b.bias_rate, 0.0);
        // before the MoE rules below divide by it (fuzzing found `--set dist.expert_parallel=0`
        // on an MoE config dividing by zero: SIGFPE instead of this error)
        at_least("dist.expert_parallel", cfg.dist.expert_parallel, 1);

        if (e.enabled) {
            need(e.experts % r.groups == 0, "router.groups",
                 fmt::format("model.moe.experts = {} is not divisible by {} groups", e.experts,
                             r.groups), {"model.moe.experts"});
            int reachable = r.topk_groups * (e.experts / r.groups);
            need(e.top_k <= reachable, "model.moe.top_k",
                 fmt::format("{} is more than the {} experts in the router.topk_groups = {} "
                             "groups it may pick", e.top_k, reachable, r.topk_groups),
                 {"router.topk_groups", "router.groups"});
            need(r.noise == "none" || r.type == "topk" || r.type == "sinkhorn", "router.noise",
                 fmt::format("{} noise needs a token-choice router (topk or sinkhorn), not "
                             "router.type = {}", r.noise, r.type), {"router.type"});
            need(r.groups == 1 || r.type == "topk", "router.groups",
                 fmt::format("group-limited routing (groups > 1) needs router.type = topk, "
                             "not {}", r.type), {"router.type"});
            need(b.bias_rate == 0 || r.type == "topk", "balance.bias_rate",
                 fmt::format("the aux-loss-free bias steers top-k selection; router.type = {} "
                             "has no top-k scores to bias (set balance.bias_rate to 0)", r.type),
                 {"router.type"});
            const bool no_scores = r.type == "hash" || r.type == "soft";
            for (auto [key, coef] : {std::pair{"balance.aux_loss", b.aux_loss},
                                     {"balance.importance_loss", b.importance_loss},
                                     {"balance.load_loss", b.load_loss}})
                need(coef == 0 || !(no_scores || r.type == "expert_choice"), key,
                     fmt::format("router.type = {} {}; set {} to 0", r.type,
                                 no_scores ? "has no router scores to balance"
                                           : "is balanced by construction", key),
                     {"router.type"});
            need(b.z_loss == 0 || !no_scores, "balance.z_loss",
                 fmt::format("router.type = {} has no router logits; set balance.z_loss to 0", r.type),
                 {"router.type"});
            need(b.load_loss == 0 || r.noise == "gaussian", "balance.load_loss",
                 "the load loss estimates load under router noise: it needs router.noise = gaussian",
                 {"router.noise"});
            need(r.type != "hash" || e.top_k == 1, "model.moe.top_k",
                 fmt::format("hash routing sends each token to one expert: top_k must be 1, got {}",
                             e.top_k), {"router.type"});
            need(r.groups == 1 || r.topk_groups <= e.top_k, "router.topk_groups",
                 fmt::format("{} groups cannot each contribute to top_k = {} experts", r.topk_groups,
                             e.top_k), {"model.moe.top_k"});
            for (auto [key, cf] : {std::pair{"router.capacity_factor", r.capacity_factor},
                                   {"router.eval_capacity_factor", r.eval_capacity_factor}})
                need(cf == 0 || !(r.type == "soft" || r.type == "expert_choice"), key,
                     fmt::format("router.type = {} sets its own capacity; {} must be 0", r.type, key),
                     {"router.type"});
            need(e.experts % cfg.dist.expert_parallel == 0, "dist.expert_parallel",
                 fmt::format("model.moe.experts = {} is not divisible by {}", e.experts,
                             cfg.dist.expert_parallel), {"model.moe.experts"});
        }

        at_least("train.batch_size", t.batch_size, 1);
        at_least("train.grad_accum", t.grad_accum, 1);
        at_least("train.steps", t.steps, 1);
        positive("train.lr", t.lr);
        need(t.min_lr >= 0 && t.min_lr <= t.lr, "train.min_lr",
             fmt::format("must be in [0, train.lr = {}], got {}", t.lr, t.min_lr), {"train.lr"});
        at_least("train.warmup", t.warmup, 0);
        at_least("train.weight_decay", t.weight_decay, 0.0);
        unit("train.beta1", t.beta1);
        unit("train.beta2", t.beta2);
        at_least("train.grad_clip", t.grad_clip, 0.0);
        at_least("train.eval_every", t.eval_every, 0);
        at_least("train.eval_batches", t.eval_batches, 1);
        at_least("train.ckpt_every", t.ckpt_every, 0);
        need(!t.out_dir.empty(), "train.out_dir", "must not be empty");
        need(!(t.dtype == "bf16" && t.device == "cpu"), "train.dtype",
             "bf16 needs the CUDA backend (train.device is cpu)", {"train.device"});
        at_least("train.threads", t.threads, 0);
        need(!cfg.data.train.empty(), "data.train", "must not be empty");
        need(!cfg.data.val.empty(), "data.val", "must not be empty");
    }
};

}  // namespace

Config parse_config(const std::string& yaml_text, const std::string& source,
                    const std::vector<std::string>& overrides) {
    Loader L(source);
    L.parse(yaml_text);
    for (const std::string& ov : overrides) L.apply(ov);
    L.validate();
    return L.cfg;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) fail("cannot read config ({}: {})", path, std::strerror(errno));
    std::string text;
    char buf[1 << 16];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) text.append(buf, n);
    int err = std::ferror(f) ? errno : 0;  // e.g. EISDIR: fopen succeeds on a directory
    std::fclose(f);
    if (err) fail("cannot read config ({}: {})", path, std::strerror(err));
    return parse_config(text, path, overrides);
}

std::string config_to_yaml(const Config& cfg) {
    Config c = cfg;
    std::string out, open;  // `open`: the block path whose keys we are printing
    for (const Field& f : fields_of(c)) {
        std::string path = f.path, block = parent_of(path);
        if (block == "model.moe" && !c.model.moe.enabled) continue;
        if (block != open) {  // open the block levels the previous key was not in
            std::vector<std::string> chain;
            for (std::string b = block; !b.empty(); b = parent_of(b)) chain.push_back(b);
            for (auto b = chain.rbegin(); b != chain.rend(); ++b)
                if (open != *b && open.rfind(*b + ".", 0) != 0)
                    out += indent_of(*b) + leaf_of(*b) + ":\n";
            open = block;
        }
        std::string value;
        switch (f.kind) {
        case Kind::Int: value = std::to_string(*(int*)f.ptr); break;
        case Kind::Int64: value = std::to_string(*(long long*)f.ptr); break;
        case Kind::Real: value = format_real(*(double*)f.ptr); break;
        case Kind::Bool: value = *(bool*)f.ptr ? "true" : "false"; break;
        case Kind::Text: value = quote(*(std::string*)f.ptr); break;
        case Kind::Choice: value = *(std::string*)f.ptr; break;
        }
        out += indent_of(path) + leaf_of(path) + ": " + value + "\n";
    }
    return out;
}

}  // namespace moe
