/* `moe eval --ckpt FILE|DIR [--data GLOB] [--batches N] [--json] [--svg FILE] [--set k=v ...]`:
   loss and perplexity on DESIGN.md's fixed val batches, then routing health per MoE layer. */
#include "commands.h"
#include "common.h"
#include "config.h"
#include "data.h"
#include "model_io.h"
#include "routing_report.h"
#include "trainer.h"

#include <cmath>
#include <memory>
#include <nlohmann/json.hpp>
#include <unistd.h>

namespace moe {

namespace {

void check_writable_dir(const std::string& path, const std::string& what) {
    std::string dir = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/'));
    if (dir.empty()) dir = "/";
    if (access(dir.c_str(), W_OK) != 0) fail("cannot write {} ({}: directory missing or not writable)", what, path);
}

}  // namespace

void register_eval_command(CLI::App& app) {
    struct Args {
        std::string ckpt, data, svg;
        int batches = -1;  // -1: not given
        bool json = false;
        std::vector<std::string> sets;
    };
    auto a = std::make_shared<Args>();
    CLI::App* sub = app.add_subcommand("eval", "Evaluate a checkpoint: loss, perplexity, routing health");
    sub->add_option("--ckpt", a->ckpt, "checkpoint file, or a run directory (its newest checkpoint)")->required();
    sub->add_option("--data", a->data, "glob of token shards (default: the checkpoint's data.val)");
    sub->add_option("--batches", a->batches, "number of val batches (default: train.eval_batches)");
    sub->add_flag("--json", a->json, "print one JSON object instead of text");
    sub->add_option("--svg", a->svg, "write a layer x expert (and domain x expert) load heat-map here");
    sub->add_option("--set", a->sets, "override a config key of the checkpoint (repeatable)")->allow_extra_args(false);
    sub->callback([a] {
        if (a->batches == 0 || a->batches < -1) fail("--batches must be at least 1, got {} (--batches)", a->batches);
        if (!a->svg.empty()) check_writable_dir(a->svg, "--svg file");
        std::string path = resolve_checkpoint(a->ckpt, false);
        // the backend follows the checkpoint's train.device / train.dtype, after --set
        std::unique_ptr<Backend> be;
        Config cfg;
        LoadedModel lm = load_model(path, [&](const Config& stored) -> Backend& {
            cfg = a->sets.empty() ? stored : parse_config(config_to_yaml(stored), path + " metadata", a->sets);
            be = make_backend_for_inference(cfg.train);
            return *be;
        });
        if (!a->svg.empty() && !cfg.model.moe.enabled) fail("--svg needs an MoE model; {} is dense (--svg)", path);
        int batches = a->batches > 0 ? a->batches : cfg.train.eval_batches;
        std::string glob = a->data.empty() ? cfg.data.val : a->data;
        const int B = cfg.train.batch_size, T = cfg.model.seq_len;
        DataLoader val(glob, B, T, cfg.model.vocab_size, 0, 1, a->data.empty() ? "data.val of the checkpoint" : "--data");
        if (val.total_tokens() < (uint64_t)batches * B * T + 1)
            fail("{} batches of {} x {} need {} tokens; the data holds {} (--batches)", batches, B, T,
                 (uint64_t)batches * B * T + 1, val.total_tokens());

        // domain tags: sniff the first batch (the synthetic corpus starts every document with one)
        std::vector<int> first((size_t)B * T), tgt(first.size());
        val.next_batch(first.data(), tgt.data());
        const auto& names = synth_domain_names();
        bool tagged = cfg.model.moe.enabled && looks_domain_tagged(first, cfg.model.vocab_size, (int)names.size());
        RoutingReport report(*lm.model, tagged ? names : std::vector<std::string>{});
        const bool progress = !a->json && isatty(2) && batches > 1;
        int done = 0;
        float loss = evaluate(*lm.model, val, batches, [&](const int* inp, int N) {
            report.add_batch(inp, N);
            if (progress) fmt::print(stderr, "\reval: batch {}/{}", ++done, batches);
        });
        if (progress) fmt::print(stderr, "\r\033[K");
        long long tokens = (long long)batches * B * T;
        if (!a->svg.empty()) report.write_svg(a->svg);
        if (a->json) {
            nlohmann::json j{{"checkpoint", path}, {"step", lm.step}, {"loss", loss}, {"perplexity", std::exp(loss)},
                             {"tokens", tokens}, {"router", cfg.model.moe.enabled ? cfg.router.type : "dense"},
                             {"causal", !(cfg.model.moe.enabled && (cfg.router.type == "expert_choice" ||
                                                                    cfg.router.type == "soft"))},
                             {"layers", report.to_json()}};
            if (tagged) j["domains"] = names;
            fmt::print("{}\n", j.dump());
            return;
        }
        fmt::print("checkpoint: {} (step {}, {} GPT, {} parameters)\n", path, lm.step,
                   cfg.model.moe.enabled ? "MoE" : "dense", lm.model->num_params());
        fmt::print("data: {}, {} batches x {} x {} = {} tokens\n", glob, batches, B, T, tokens);
        fmt::print("val loss {:.4f} | perplexity {:.3f}\n", loss, std::exp(loss));
        if (cfg.model.moe.enabled) {
            const RouterConfig& rc = cfg.router;
            std::string how = rc.type == "soft" ? fmt::format("{} slots each", rc.soft_slots)
                            : rc.type == "expert_choice" ? fmt::format("capacity {}", rc.expert_choice_capacity)
                            : rc.type == "hash" ? "top-1"
                            : fmt::format("top-{}, {}", cfg.model.moe.top_k,
                                          rc.eval_capacity_factor > 0
                                              ? fmt::format("eval capacity factor {}", rc.eval_capacity_factor)
                                              : "dropless");
            fmt::print("router: {} ({} experts, {}){}\n", rc.type, cfg.model.moe.experts, how,
                       rc.type == "soft" ? "; domain x expert counts each token's heaviest combine slot" : "");
            fmt::print("{}", report.to_text(cfg.router.type));
        }
        if (!a->svg.empty()) fmt::print("wrote {}\n", a->svg);
    });
}

}  // namespace moe
