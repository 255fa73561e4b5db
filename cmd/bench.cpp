/* `moe bench CONFIG.yaml [--steps N] [--warmup W] [--threads T] [--device D] [--dtype T] [--json]
   [--set k=v ...]`: steady-state speed of full training steps (forward, backward, AdamW) on random
   tokens: median ms/step and tokens/s after warm-up, model FLOPs per token (src/plan.h) and the
   achieved model TFLOPS (MFU = that / the device's peak; scripts/bench_gpu.sh), peak resident
   memory (and GPU memory in use on CUDA). No data files are read. */
#include "commands.h"
#include "common.h"
#include "config.h"
#include "device.h"
#include "model.h"
#include "optim.h"
#include "plan.h"
#include "trainer.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <omp.h>
#include <sys/resource.h>
#ifdef MOE_CUDA
#include <cuda_runtime.h>
#endif

namespace moe {

void register_bench_command(CLI::App& app) {
    struct Args {
        std::string config, device, dtype;
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
    sub->add_option("--device", a->device, "auto | cpu | cuda (default: train.device)");
    sub->add_option("--dtype", a->dtype, "fp32 | bf16 (bf16: CUDA; default: train.dtype)");
    sub->add_flag("--json", a->json, "print one JSON object");
    sub->add_option("--set", a->sets, "override a config key (repeatable)")->allow_extra_args(false);
    sub->callback([a] {
        if (a->steps < 1) fail("--steps must be at least 1, got {} (--steps)", a->steps);
        if (a->warmup < 0) fail("--warmup must be >= 0, got {} (--warmup)", a->warmup);
        if (a->threads < 0) fail("--threads must be >= 0, got {} (--threads)", a->threads);
        std::vector<std::string> sets = a->sets;   // validated like any --set (config.cpp)
        if (!a->device.empty()) sets.push_back("train.device=" + a->device);
        if (!a->dtype.empty()) sets.push_back("train.dtype=" + a->dtype);
        Config cfg = load_config(a->config, sets);
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
        double gpu_mb = 0;   // device memory in use at the end (CUDA), all of this process's
#ifdef MOE_CUDA
        size_t free_b = 0, total_b = 0;
        if (be->name() != "cpu" && cudaMemGetInfo(&free_b, &total_b) == cudaSuccess)
            gpu_mb = (double)(total_b - free_b) / (1024.0 * 1024.0);
#endif
        // model FLOPs of one trained token, as `moe plan` and the train log's MFU count them (3x forward),
        // over the GPU's peak for the dtype (src/plan.cpp's table; 0 = CPU or an unknown GPU). One
        // process, so GPU 0, where make_backend put it.
        const double fpt = 3 * forward_flops_per_token(cfg).total();
        const double tps = tokens / (median / 1000.0);
        double peak_tflops = 0;
        if (be->name() == "cuda")
            if (const GpuSpec* g = find_gpu_by_device_name(cuda_device_name(0)))
                peak_tflops = cfg.train.dtype == "bf16" ? g->peak_tflops : g->fp32_tflops;
        const double mfu = peak_tflops > 0 ? fpt * tps / 1e12 / peak_tflops : 0.0;
        if (a->json) {
            fmt::print("{}\n", nlohmann::json{{"config", a->config}, {"threads", omp_get_max_threads()},
                                              {"device", be->name()}, {"dtype", cfg.train.dtype},
                                              {"ms_per_step", median}, {"tokens_per_s", tps},
                                              {"peak_mb", peak_mb}, {"gpu_mb", gpu_mb}, {"params", model.num_params()},
                                              {"flops_per_token", fpt},
                                              {"model_tflops", fpt * tps / 1e12}, {"peak_tflops", peak_tflops},
                                              {"mfu", mfu}, {"steps", a->steps}}.dump());
            return;
        }
        fmt::print("{}: {} parameters, batch {} x {} x accum {}, device {} ({}), {} threads\n",
                   a->config, model.num_params(), B, T, cfg.train.grad_accum, be->name(), cfg.train.dtype,
                   omp_get_max_threads());
        fmt::print("median {:.1f} ms/step (min {:.1f}, max {:.1f}) over {} steps | {:.0f} tok/s | {:.2f} model TFLOPS{} "
                   "| peak memory {:.0f} MB{}\n",
                   median, ms.front(), ms.back(), ms.size(), tps, fpt * tps / 1e12,
                   mfu > 0 ? fmt::format(" (mfu {:.1f}%)", 100 * mfu) : std::string(), peak_mb,
                   gpu_mb > 0 ? fmt::format(", GPU {:.0f} MB in use", gpu_mb) : std::string());
    });
}

}  // namespace moe
