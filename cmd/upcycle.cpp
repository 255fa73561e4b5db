/* `moe upcycle --in DENSE --config MOE.yaml --out FILE [--method copy|granular|drop]
   [--drop-ratio r] [--noise std] [--seed s] [--set k=v ...]`: turns a dense checkpoint (ours, or llm.c's
   gpt2_124M.bin) into an MoE checkpoint at step 0 (src/upcycle.h), and says what it did and
   whether the result computes the same function. Train on with `--set train.init_from=FILE`. */
#include "commands.h"
#include "common.h"
#include "config.h"
#include "llmc_import.h"
#include "model_io.h"
#include "trainer.h"
#include "upcycle.h"

#include <memory>
#include <unistd.h>

namespace moe {

namespace {

std::string count(double n) {   // 1234567 -> "1,234,567"
    std::string s = fmt::format("{:.0f}", n), out;
    for (size_t i = 0; i < s.size(); i++) {
        if (i > 0 && (s.size() - i) % 3 == 0) out += ',';
        out += s[i];
    }
    return out;
}

std::string join(const std::vector<int>& v) {
    if (v.empty()) return "none";
    std::string s;
    for (int x : v) s += (s.empty() ? "" : ", ") + std::to_string(x);
    return s;
}

void report(const DenseWeights& d, const Config& cfg, const UpcycleOptions& o, const UpcycleResult& r,
            const std::string& config_path) {
    const ModelConfig& m = cfg.model;
    const MoeConfig& e = m.moe;
    const RouterConfig& rc = cfg.router;
    fmt::print("source: {} ({}) | vocab {}, seq_len {}, {} layers, {} heads, d_model {}, d_ff {}\n", d.path, d.format,
               d.dims.vocab_size, d.dims.seq_len, d.dims.n_layer, d.dims.n_head, d.dims.d_model, d.dims.d_ff);
    if (d.padded_vocab > d.dims.vocab_size)
        fmt::print("wte: dropped llm.c's padding rows {}..{} (padded vocab {})\n", d.dims.vocab_size,
                   d.padded_vocab - 1, d.padded_vocab);
    if (m.seq_len < d.dims.seq_len)
        fmt::print("wpe: seq_len {} < the dense model's {}: kept the first {} position rows\n", m.seq_len,
                   d.dims.seq_len, m.seq_len);
    if (!e.enabled) {
        fmt::print("config: {} has no model.moe block: every layer keeps its dense FFN (conversion only)\n",
                   config_path);
    } else {
        std::vector<int> dense_layers;
        for (int l = 0; l < m.n_layer; l++)
            if (!m.is_moe_layer(l)) dense_layers.push_back(l);
        fmt::print("method: {} | seed {} | noise {}\n", o.method, o.seed, o.noise);
        fmt::print("MoE layers: {} ({} experts x {} hidden units, {} router, top-{}); dense layers kept as they "
                   "are: {}\n", join(r.moe_layers), e.experts, e.expert_ff, rc.type, e.top_k, join(dense_layers));
        if (o.method == "granular")
            fmt::print("experts: expert e = hidden units [(e mod {0}) * {1}, (e mod {0}) * {1} + {1}) of the dense "
                       "FFN (G = {0} slices), c_proj bias / {0}\n", r.groups, e.expert_ff);
        else
            fmt::print("experts: every expert = the dense FFN{}\n",
                       o.method == "drop" ? fmt::format("; then {} of its {} hidden units (r = {}) re-initialised, "
                                                        "N(0, 0.02) weights and 0 bias, different units per expert",
                                                        r.units_dropped, e.expert_ff, o.drop_ratio)
                                          : std::string());
        if (o.noise > 0) fmt::print("noise: N(0, {}) added to every expert's c_fc and c_proj weights\n", o.noise);
        if (e.shared_experts > 0)
            fmt::print("shared experts: {} x {} {}\n", e.shared_experts, e.shared_ff,
                       r.shared_copied
                           ? std::string("copied from the dense FFN (shared_ff = d_ff)")
                           : fmt::format("initialised fresh (shared_ff {} != d_ff {})", e.shared_ff, m.d_ff));
        std::string router = rc.type == "hash"   ? "random hash table (seeded)"
                           : rc.type == "soft"   ? "slots N(0, 0.02) (seeded)"
                           : r.zero_router       ? "weight 0 (every token gets every expert with equal gates)"
                                                 : "weight N(0, 0.02) (seeded)";
        fmt::print("router: {}{}{}\n", router, rc.noise == "gaussian" ? ", noise weight 0" : "",
                   rc.type == "hash" && rc.hash == "balanced"
                       ? "; hash: balanced tables are rebuilt from data.train when training starts" : "");
        if (r.zero_router && e.experts > r.groups && o.noise == 0)
            fmt::print("warning: experts e and e + {} start identical and, with top_k = experts and a zero router, "
                       "get identical updates; add --noise to let them diverge\n", r.groups);
    }
    fmt::print("parameters: {} dense -> {} upcycled | active per token {} ({:.3g} routed experts per token)\n",
               count((double)r.params_dense), count((double)r.params_moe), count(r.active_params),
               r.experts_per_token);
    fmt::print("function-preserving: {} -- {}\n", r.exact ? "yes" : "no", r.exact_why);
}

}  // namespace

void register_upcycle_command(CLI::App& app) {
    struct Args {
        std::string in, config, out, method = "copy";
        double drop_ratio = 0.5, noise = 0.0;
        long long seed = 0;
        std::vector<std::string> sets;
    };
    auto a = std::make_shared<Args>();
    CLI::App* sub = app.add_subcommand("upcycle", "Turn a dense checkpoint (ours or llm.c's) into an MoE checkpoint");
    sub->add_option("--in", a->in, "dense checkpoint: ours (file, or run directory: its newest) or an llm.c GPT-2 .bin")
        ->required();
    sub->add_option("--config", a->config, "MoE config; its model dims must match the dense model's")->required();
    sub->add_option("--out", a->out, "output MoE checkpoint (.safetensors, step 0)")->required();
    sub->add_option("--method", a->method, "copy | granular | drop (default copy)")
        ->check(CLI::IsMember({"copy", "granular", "drop"}));
    CLI::Option* drop = sub->add_option("--drop-ratio", a->drop_ratio,
                                         "drop: fraction of each expert's hidden units re-initialised (default 0.5)");
    sub->add_option("--noise", a->noise, "std of Gaussian noise added to expert weights (default 0)");
    CLI::Option* seed = sub->add_option("--seed", a->seed, "seed for router init, drop and noise (default train.seed)");
    sub->add_option("--set", a->sets, "override a key of the MoE config (repeatable); stored in the output")
        ->allow_extra_args(false);
    sub->callback([a, drop, seed] {
        if (drop->count() && a->method != "drop")
            fail("--drop-ratio is only used by --method drop, not {} (--drop-ratio)", a->method);
        // fail before the heavy lifting when the output cannot be written
        std::string out_dir = a->out.find('/') == std::string::npos ? "." : a->out.substr(0, a->out.rfind('/'));
        if (access(out_dir.empty() ? "/" : out_dir.c_str(), W_OK) != 0)
            fail("cannot write the output ({}: directory missing or not writable) (--out)", a->out);
        Config cfg = load_config(a->config, a->sets);
        UpcycleOptions o;
        o.method = a->method;
        o.drop_ratio = a->drop_ratio;
        o.noise = a->noise;
        o.seed = (uint64_t)(seed->count() ? a->seed : cfg.train.seed);
        DenseWeights dense = read_dense_weights(resolve_checkpoint(a->in, false));
        std::unique_ptr<Backend> be = make_backend_for_inference(cfg.train);
        UpcycleResult r = upcycle(dense, cfg, o, *be, a->config);
        report(dense, cfg, o, r, a->config);
        save_model(a->out, *r.model, cfg, 0);
        std::string sets;
        for (const std::string& s : a->sets) sets += " --set " + s;
        fmt::print("wrote {} (step 0); evaluate it with `moe eval --ckpt {}`, train it with `moe train {}{} --set "
                   "train.init_from={}`\n", a->out, a->out, a->config, sets, a->out);
    });
}

}  // namespace moe
