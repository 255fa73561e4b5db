/* `moe bench CONFIG.yaml [--steps N] [--warmup W] [--threads T] [--json] [--set k=v ...]`:
   steady-state speed of full training steps (forward, backward, AdamW) on random tokens: median
   ms/step and tokens/s after warm-up, and peak resident memory. No data files are read. */
#include "commands.h"
#include "common.h"
#include "config.h"
#include "model.h"
#include "optim.h"
#include "trainer.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <omp.h>
#include <sys/resource.h>

namespace moe {

void register_bench_command(CLI::App& app) {
    struct Args {
        std::string config;
        int steps = 20, warmup = 3, threads = 0;
        bool json = false;
        std::vector<std::string> sets;
    };
    auto a = std::make_shared<Args>();
    CLI::App* sub = app.add_subcommand("bench", "Time full training steps of a config (median after warm-up)");
    sub->add_option("config", a->config, "config file")->required();
    sub->add_option("--steps", a->steps, "timed steps (default 20)");
    sub->add_option("--warmup", a->warmup, "untimed steps first (default 3)");
    sub->add_option("--threads", a->threads, "OpenMP threads (default: train.threads, 0 = all cores)");
    sub->add_flag("--json", a->json, "print one JSON object");
    sub->add_option("--set", a->sets, "override a config key (repeatable)")->allow_extra_args(false);
    sub->callback([a] {
        if (a->steps < 1) fail("--steps must be at least 1, got {} (--steps)", a->steps);
        if (a->warmup < 0) fail("--warmup must be >= 0, got {} (--warmup)", a->warmup);
        if (a->threads < 0) fail("--threads must be >= 0, got {} (--threads)", a->threads);
        Config cfg = load_config(a->config, a->sets);
        if (a->threads > 0) cfg.train.threads = a->threads;
        cfg.train.steps = std::max(cfg.train.steps, a->warmup + a->steps);
        auto be = make_backend(cfg.train);
        GPT model(cfg, *be);
        model.init_weights((uint64_t)cfg.train.seed);
        AdamW opt(model, cfg.train);
        const int B = cfg.train.batch_size, T = cfg.model.seq_len, V = cfg.model.vocab_size;
        std::vector<int> inp((size_t)B * T), tgt(inp.size());
        Rng rng(1);
        std::vector<double> ms;
        for (int s = 0; s < a->warmup + a->steps; s++) {
            auto t0 = std::chrono::steady_clock::now();
            for (MoeLayer* m : model.moe_layers()) m->begin_step();
            model.zero_grad();
            for (int micro = 0; micro < cfg.train.grad_accum; micro++) {
                for (size_t i = 0; i < inp.size(); i++) { inp[i] = rng.next_u32() % V; tgt[i] = rng.next_u32() % V; }
                model.forward(inp.data(), tgt.data(), B, T);
                model.backward(1.0f / cfg.train.grad_accum);
            }
            opt.step((float)lr_at(cfg.train, s));
            for (MoeLayer* m : model.moe_layers()) m->update_bias(m->step_routed());
            be->synchronize();
            double dt = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            if (s >= a->warmup) ms.push_back(dt);
        }
        std::sort(ms.begin(), ms.end());
        const double median = ms[ms.size() / 2];
        const double tokens = (double)B * T * cfg.train.grad_accum;
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        const double peak_mb = ru.ru_maxrss / 1024.0;
        if (a->json) {
            fmt::print("{}\n", nlohmann::json{{"config", a->config}, {"threads", omp_get_max_threads()},
                                              {"ms_per_step", median}, {"tokens_per_s", tokens / (median / 1000.0)},
                                              {"peak_mb", peak_mb}, {"params", model.num_params()},
                                              {"steps", a->steps}}.dump());
            return;
        }
        fmt::print("{}: {} parameters, batch {} x {} x accum {}, {} threads\n", a->config, model.num_params(), B, T,
                   cfg.train.grad_accum, omp_get_max_threads());
        fmt::print("median {:.1f} ms/step (min {:.1f}, max {:.1f}) over {} steps | {:.0f} tok/s | peak memory {:.0f} MB\n",
                   median, ms.front(), ms.back(), ms.size(), tokens / (median / 1000.0), peak_mb);
    });
}

}  // namespace moe
