/* `moe train CONFIG.yaml [--set k=v ...] [--resume DIR|latest] [--device auto|cpu|cuda]`. */
#include "commands.h"
#include "config.h"
#include "dist.h"
#include "trainer.h"

#include <cstdio>
#include <cstdlib>
#include <memory>

namespace moe {

void register_train_command(CLI::App& app) {
    struct Args {
        std::string config, resume, device;
        std::vector<std::string> sets;
    };
    auto a = std::make_shared<Args>();
    CLI::App* sub = app.add_subcommand("train", "Train a model described by a YAML config");
    sub->add_option("config", a->config, "config file (see configs/README.md)")->required();
    sub->add_option("--set", a->sets, "override a config key: --set train.steps=20 (repeatable)")
        ->allow_extra_args(false);
    sub->add_option("--resume", a->resume, "continue from a checkpoint file, a run directory, or 'latest' (train.out_dir)");
    sub->add_option("--device", a->device, "auto | cpu | cuda (same as --set train.device=...)");
    sub->callback([a] {
        std::vector<std::string> sets = a->sets;
        if (!a->device.empty()) sets.push_back("train.device=" + a->device);
        Config cfg = load_config(a->config, sets);
        TrainOptions opt;
        opt.resume = a->resume;
        opt.config_name = a->config;
        TrainSummary sum = run_training(cfg, opt);
        if (sum.interrupted) {
            // SIGINT/SIGTERM: the checkpoint is written (trainer.h); exit as a shell reports a
            // process stopped by that signal (130, 143), so scripts and schedulers see the run
            // did not finish, while `--resume latest` continues it
            std::fflush(stdout);
            Dist::get().finalize();
            std::exit(128 + sum.interrupted);
        }
    });
}

}  // namespace moe
