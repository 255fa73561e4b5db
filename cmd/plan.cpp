/* `moe plan CONFIG.yaml --gpus N [--link-gbps B] [--gpu h100|h200|a100] [--mfu F] [--json] [--set k=v ...]`:
   a cluster layout on paper. One row per expert-parallel degree EP dividing N and the expert count:
   parameters and memory per GPU, FLOPs, all-to-all and all-reduce bytes per GPU and step, and the
   estimated step time (compute + communication) with what dominates; the best row is marked.
   Nothing is allocated and no data is read (src/plan.h, docs/plan.md). */
#include "commands.h"
#include "common.h"
#include "config.h"
#include "plan.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <nlohmann/json.hpp>

namespace moe {
namespace {

double parse_number(const std::string& s, const char* flag) {
    errno = 0;
    char* end = nullptr;
    const double v = std::strtod(s.c_str(), &end);
    if (s.empty() || std::isspace((unsigned char)s[0]) || *end != '\0' || errno == ERANGE || !std::isfinite(v))
        fail("{} must be a number, got '{}' ({})", flag, s, flag);
    return v;
}

int parse_gpus(const std::string& s) {
    errno = 0;
    char* end = nullptr;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || std::isspace((unsigned char)s[0]) || *end != '\0' || errno == ERANGE)
        fail("--gpus must be a whole number of GPUs, got '{}' (--gpus)", s);
    if (v < 1 || v > INT_MAX) fail("--gpus must be at least 1, got {} (--gpus)", s);
    return (int)v;
}

// 38.93B, 551.3M, 12.0K, 512
std::string count_str(double x) {
    if (x >= 1e9) return fmt::format("{:.2f}B", x / 1e9);
    if (x >= 1e6) return fmt::format("{:.1f}M", x / 1e6);
    if (x >= 1e3) return fmt::format("{:.1f}K", x / 1e3);
    return fmt::format("{:.0f}", x);
}

// three significant digits without exponents for the usual ranges: 843, 71.2, 6.13, 0.0123
std::string num_str(double x) {
    if (x == 0) return "0";
    if (x >= 100) return fmt::format("{:.0f}", x);
    if (x >= 10) return fmt::format("{:.1f}", x);
    if (x >= 1) return fmt::format("{:.2f}", x);
    return fmt::format("{:.3g}", x);
}

// 6.65 PFLOP, 16.9 GFLOP
std::string flops_str(double x) {
    const char* units[] = {"", "k", "M", "G", "T", "P", "E"};
    int u = 0;
    while (x >= 1000 && u < 6) { x /= 1000; u++; }
    return fmt::format("{} {}FLOP", num_str(x), units[u]);
}

}  // namespace

void register_plan_command(CLI::App& app) {
    struct Args {
        std::string config, gpus, link_gbps = "400", gpu = "h100", mfu = "0.4";
        bool json = false;
        std::vector<std::string> sets;
    };
    auto a = std::make_shared<Args>();
    CLI::App* sub = app.add_subcommand(
        "plan", "Plan a cluster on paper: memory, FLOPs, communication and step time per expert-parallel degree");
    sub->add_option("config", a->config, "config file")->required();
    sub->add_option("--gpus", a->gpus, "number of GPUs (ranks)")->required()->type_name("N");
    sub->add_option("--link-gbps", a->link_gbps, "network bandwidth per GPU in Gb/s (default 400, InfiniBand NDR)")
        ->type_name("GBPS");
    sub->add_option("--gpu", a->gpu, "peak bf16 TFLOP/s and memory of: h100 (SXM), h200, a100 (default h100)")
        ->type_name("h100|h200|a100");
    sub->add_option("--mfu", a->mfu, "model FLOPs utilisation in (0, 1] (default 0.4)")->type_name("F");
    sub->add_flag("--json", a->json, "print one JSON object");
    sub->add_option("--set", a->sets, "override a config key (repeatable)")->allow_extra_args(false);
    sub->callback([a] {
        PlanOptions opt;
        opt.gpus = parse_gpus(a->gpus);
        std::string key = a->gpu;
        for (char& c : key) c = (char)std::tolower((unsigned char)c);
        const GpuSpec* gpu = find_gpu(key);
        if (!gpu) fail("unknown GPU '{}': h100, h200 or a100 (--gpu)", a->gpu);
        opt.gpu = *gpu;
        opt.link_gbps = parse_number(a->link_gbps, "--link-gbps");
        if (opt.link_gbps <= 0) fail("--link-gbps must be > 0, got {} (--link-gbps)", a->link_gbps);
        opt.mfu = parse_number(a->mfu, "--mfu");
        if (!(opt.mfu > 0 && opt.mfu <= 1)) fail("--mfu must be in (0, 1], got {} (--mfu)", a->mfu);
        const Config cfg = load_config(a->config, a->sets);

        const ParamCounts pc = count_params(cfg);
        const FlopsPerToken fpt = forward_flops_per_token(cfg);
        const ActivationBytes act = activation_bytes(cfg);
        const std::vector<PlanRow> rows = plan_rows(cfg, opt);
        const int B = cfg.train.batch_size, T = cfg.model.seq_len, A = cfg.train.grad_accum;
        const double global_seqs = (double)B * A * opt.gpus, global_tokens = global_seqs * T;
        const PlanRow* best = nullptr;
        for (const PlanRow& r : rows) if (r.best) best = &r;
        const bool any_fits = std::any_of(rows.begin(), rows.end(), [](const PlanRow& r) { return r.fits; });

        if (a->json) {
            nlohmann::json jr = nlohmann::json::array();
            for (const PlanRow& r : rows)
                jr.push_back({{"ep", r.ep}, {"dp", r.dp}, {"params", r.params}, {"state_bytes", r.state_bytes},
                              {"activation_bytes", r.activation_bytes}, {"memory_bytes", r.memory_bytes},
                              {"fits", r.fits}, {"flops", r.flops}, {"alltoall_bytes", r.alltoall_bytes},
                              {"allreduce_bytes", r.allreduce_bytes}, {"compute_s", r.compute_s},
                              {"comm_s", r.comm_s}, {"step_s", r.step_s},
                              {"bound", r.comm_bound ? "comm" : "compute"}, {"best", r.best}});
            nlohmann::json j = {
                {"config", a->config}, {"gpus", opt.gpus}, {"gpu", opt.gpu.key},
                {"peak_tflops", opt.gpu.peak_tflops}, {"gpu_mem_gb", opt.gpu.mem_gb},
                {"usable_mem_gb", kUsableMemoryFraction * opt.gpu.mem_gb},
                {"link_gbps", opt.link_gbps}, {"mfu", opt.mfu},
                {"params", {{"total", pc.total}, {"routed", pc.routed}, {"replicated", pc.replicated},
                            {"active", pc.active}, {"moe_layers", pc.moe_layers},
                            {"experts_per_token", pc.experts_per_token}}},
                {"global_batch_sequences", global_seqs}, {"global_batch_tokens", global_tokens},
                {"forward_flops_per_token", fpt.total()}, {"activation_bytes", act.total()},
                {"rows", jr}, {"best_ep", best ? best->ep : 0}, {"any_fits", any_fits}};
            fmt::print("{}\n", j.dump());
            return;
        }

        const MoeConfig& e = cfg.model.moe;
        if (pc.moe_layers > 0)
            fmt::print("{}: {} parameters ({} in routed experts: {} MoE layers x {} experts, {:g} per token), "
                       "{} active per token\n",
                       a->config, count_str((double)pc.total), count_str((double)pc.routed), pc.moe_layers,
                       e.experts, pc.experts_per_token, count_str(pc.active));
        else
            fmt::print("{}: {} parameters (dense)\n", a->config, count_str((double)pc.total));
        fmt::print("cluster: {} x {} ({:g} TFLOP/s bf16 dense, {:g} GB of which {:g} usable), MFU {:g}, link {:g} Gb/s "
                   "per GPU\n",
                   opt.gpus, opt.gpu.name, opt.gpu.peak_tflops, opt.gpu.mem_gb, kUsableMemoryFraction * opt.gpu.mem_gb,
                   opt.mfu, opt.link_gbps);
        fmt::print("global batch: {:.0f} sequences x {} = {} tokens per step ({} per micro-batch x {} accum x {} GPUs)\n",
                   global_seqs, T, count_str(global_tokens), B, A, opt.gpus);
        fmt::print("per GPU and step: {} (3 x forward; forward {} per token); activations {} GB per micro-batch "
                   "at every EP\n\n",
                   flops_str(rows.empty() ? 0 : rows[0].flops), flops_str(fpt.total()), num_str(act.total() / 1e9));

        fmt::print("  {:>4} {:>4} {:>10} {:>9} {:>9} {:>4} {:>10} {:>12} {:>9} {:>8} {:>8}  {}\n", "EP", "DP",
                   "params/GPU", "states GB", "memory GB", "fits", "all2all GB", "allreduce GB", "compute s",
                   "comm s", "step s", "bound");
        for (const PlanRow& r : rows)
            fmt::print("{} {:>4} {:>4} {:>10} {:>9} {:>9} {:>4} {:>10} {:>12} {:>9} {:>8} {:>8}  {}\n",
                       r.best ? "*" : " ", r.ep, r.dp, count_str((double)r.params), num_str(r.state_bytes / 1e9),
                       num_str(r.memory_bytes / 1e9), r.fits ? "yes" : "no", num_str(r.alltoall_bytes / 1e9),
                       num_str(r.allreduce_bytes / 1e9), num_str(r.compute_s), num_str(r.comm_s),
                       num_str(r.step_s), r.comm_bound ? "comm" : "compute");
        fmt::print("\n");
        if (best && any_fits)
            fmt::print("* best: EP {} x DP {}, the fastest step that fits in {:g} GB ({} s, {} tokens/s)\n",
                       best->ep, best->dp, kUsableMemoryFraction * opt.gpu.mem_gb, num_str(best->step_s),
                       count_str(global_tokens / best->step_s));
        else if (best) {
            std::string hints;
            if (B > 1) hints += "a smaller train.batch_size (more train.grad_accum), ";
            if (e.enabled && best->ep < e.experts) hints += "more GPUs for a larger EP, ";
            hints += "or a GPU with more memory";
            fmt::print("* no EP fits in {:g} GB per GPU; * marks the closest, EP {}: {} GB of parameter state and "
                       "{} GB of activations. Try {}.\n",
                       kUsableMemoryFraction * opt.gpu.mem_gb, best->ep, num_str(best->state_bytes / 1e9),
                       num_str(best->activation_bytes / 1e9), hints);
        }
        fmt::print("memory = {:g} bytes per parameter of the GPU (bf16 weights, fp32 master, AdamW m and v, fp32 "
                   "gradients) + one micro-batch of activations; step = compute + communication, no overlap "
                   "(docs/plan.md)\n",
                   kStateBytesPerParam);
    });
}

}  // namespace moe
