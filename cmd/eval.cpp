/* `moe eval --ckpt FILE|DIR [--data GLOB] [--batches N] [--json] [--set k=v ...]`: val loss and
   perplexity of a checkpoint on DESIGN.md's fixed val batches. */
#include "commands.h"
#include "common.h"
#include "config.h"
#include "data.h"
#include "model_io.h"
#include "trainer.h"

#include <cmath>
#include <memory>
#include <nlohmann/json.hpp>

namespace moe {

void register_eval_command(CLI::App& app) {
    struct Args {
        std::string ckpt, data;
        int batches = -1;  // -1: not given
        bool json = false;
        std::vector<std::string> sets;
    };
    auto a = std::make_shared<Args>();
    CLI::App* sub = app.add_subcommand("eval", "Evaluate a checkpoint: loss, perplexity");
    sub->add_option("--ckpt", a->ckpt, "checkpoint file, or a run directory (its newest checkpoint)")->required();
    sub->add_option("--data", a->data, "glob of token shards (default: the checkpoint's data.val)");
    sub->add_option("--batches", a->batches, "number of val batches (default: train.eval_batches)");
    sub->add_flag("--json", a->json, "print one JSON object instead of text");
    sub->add_option("--set", a->sets, "override a config key of the checkpoint (repeatable)")->allow_extra_args(false);
    sub->callback([a] {
        std::string path = resolve_checkpoint(a->ckpt, false);
        std::unique_ptr<Backend> be = make_cpu_backend(0);
        LoadedModel lm = load_model(path, *be);
        Config cfg = lm.cfg;
        if (!a->sets.empty()) cfg = parse_config(config_to_yaml(lm.cfg), path + " metadata", a->sets);
        if (a->batches == 0 || a->batches < -1) fail("--batches must be at least 1, got {} (--batches)", a->batches);
        int batches = a->batches > 0 ? a->batches : cfg.train.eval_batches;
        std::string glob = a->data.empty() ? cfg.data.val : a->data;
        DataLoader val(glob, cfg.train.batch_size, cfg.model.seq_len, cfg.model.vocab_size, 0, 1,
                       a->data.empty() ? "data.val of the checkpoint" : "--data");
        float loss = evaluate(*lm.model, val, batches);
        long long tokens = (long long)batches * cfg.train.batch_size * cfg.model.seq_len;
        if (a->json) {
            nlohmann::json j{{"checkpoint", path}, {"step", lm.step}, {"loss", loss}, {"perplexity", std::exp(loss)},
                             {"tokens", tokens}, {"layers", nlohmann::json::array()}};
            fmt::print("{}\n", j.dump());
            return;
        }
        fmt::print("checkpoint: {} (step {}, {} GPT, {} parameters)\n", path, lm.step,
                   cfg.model.moe.enabled ? "MoE" : "dense", lm.model->num_params());
        fmt::print("data: {}, {} batches x {} x {} = {} tokens\n", glob, batches, cfg.train.batch_size,
                   cfg.model.seq_len, tokens);
        fmt::print("val loss {:.4f} | perplexity {:.3f}\n", loss, std::exp(loss));
    });
}

}  // namespace moe
