/* The training loop; see trainer.h. */
#include "trainer.h"
#include "common.h"
#include "fileio.h"
#include "model_io.h"
#include "moe_router.h"
#include "optim.h"
#include "device.h"
#include "dist.h"
#include "plan.h"
#include "routing_report.h"
#include "stats.h"

#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <fstream>
#include <limits>
#include <signal.h>
#include <nlohmann/json.hpp>
#include <omp.h>

namespace moe {

using Clock = std::chrono::steady_clock;

// The GPU of this process: its local rank on the node mod the node's GPU count (one rank per GPU).
static int gpu_index() { return Dist::get().device_for_rank(cuda_device_count()); }

std::unique_ptr<Backend> make_backend(const TrainConfig& tc) {
    const int gpus = cuda_device_count();
    if (tc.device == "cuda" && gpus == 0)
        fail("train.device is cuda, but no CUDA GPU is visible ({})",
             cuda_built() ? "the CUDA runtime reports no device" : "this build has no CUDA: nvcc was not found when it was built");
    if (tc.device == "cuda" || (tc.device == "auto" && gpus > 0)) return make_cuda_backend(gpu_index(), tc.dtype == "bf16");
    if (tc.dtype == "bf16")
        fail("train.dtype is bf16, which needs the CUDA backend, but no CUDA GPU is visible (train.device is {})", tc.device);
    return make_cpu_backend(tc.threads);
}

std::unique_ptr<Backend> make_backend_for_inference(const TrainConfig& tc) {
    TrainConfig t = tc;
    if (t.device == "auto" && cuda_device_count() == 0) t.dtype = "fp32";
    return make_backend(t);
}

// Model FLOPs utilisation of a step on the CUDA backend: the step's FLOPs (6N + attention, as
// `moe plan` counts them: src/plan.cpp) over the GPU's peak for train.dtype (0 = unknown GPU).
static double gpu_peak_flops(const Backend& be, const TrainConfig& tc) {
    if (be.name() != "cuda") return 0.0;
    const GpuSpec* g = find_gpu_by_device_name(cuda_device_name(gpu_index()));
    if (!g) return 0.0;
    return (tc.dtype == "bf16" ? g->peak_tflops : g->fp32_tflops) * 1e12;
}

float evaluate(GPT& model, DataLoader& val, int batches, const std::function<void(const int*, int)>& on_batch) {
    const bool was_training = model.training();
    model.set_training(false);
    val.reset();
    std::vector<int> inp((size_t)val.batch_size() * val.seq_len()), tgt(inp.size());
    double sum = 0.0;
    for (int b = 0; b < batches; b++) {
        val.next_batch(inp.data(), tgt.data());
        sum += model.forward(inp.data(), tgt.data(), val.batch_size(), val.seq_len());
        if (on_batch) on_batch(inp.data(), (int)inp.size());
    }
    model.set_training(was_training);
    return (float)(sum / batches);
}

static std::string human(double x) {
    if (x >= 1e9) return fmt::format("{:.2f}B", x / 1e9);
    if (x >= 1e6) return fmt::format("{:.2f}M", x / 1e6);
    if (x >= 1e3) return fmt::format("{:.1f}k", x / 1e3);
    return fmt::format("{:.0f}", x);
}

namespace {

struct StepResult {
    double loss = 0, aux = 0, z = 0, imp = 0, load = 0, maxvio = 0, drop_rate = 0;
    float lr = 0, norm = 0;
    bool nonfinite = false;   // loss or gradient norm inf/NaN: no update was made (train.nonfinite)
};

// Test hook, not a feature: MOE_INJECT_INF_STEP=N (read once per run, in train_loop) makes
// step N (1-based, as in the step line) non-finite by setting its loss to inf and multiplying
// every gradient by inf, so that tests can drive train.nonfinite. 0 = off.
int g_inject_inf_step = 0;

// SIGINT / SIGTERM during training: the handler only records the signal; the loop finishes
// the step it is in, writes a checkpoint and returns (TrainSummary::interrupted). SA_RESETHAND:
// a second Ctrl-C kills at once (checkpoints are atomic, so that is safe too). SA_RESTART:
// file writes in progress are not cut short with EINTR.
volatile std::sig_atomic_t g_signal = 0;
extern "C" void on_stop_signal(int sig) { g_signal = sig; }

class SignalGuard {
public:
    SignalGuard() {
        g_signal = 0;
        struct sigaction sa {};
        sa.sa_handler = on_stop_signal;
        sigemptyset(&sa.sa_mask);
        sa.sa_flags = SA_RESTART | SA_RESETHAND;
        for (int i = 0; i < 2; i++) {
            sigaction(kSignals[i], nullptr, &old_[i]);
            // a signal ignored by whoever started us (nohup, `cmd &` in a script) stays ignored
            if (old_[i].sa_handler != SIG_IGN) sigaction(kSignals[i], &sa, nullptr);
        }
        // a file-size limit (ulimit -f) makes a write fail with EFBIG, an error we report,
        // instead of killing the process with SIGXFSZ (AtomicFile does the same)
        old_xfsz_ = std::signal(SIGXFSZ, SIG_IGN);
    }
    ~SignalGuard() {
        for (int i = 0; i < 2; i++) sigaction(kSignals[i], &old_[i], nullptr);
        std::signal(SIGXFSZ, old_xfsz_);
    }
    SignalGuard(const SignalGuard&) = delete;
    SignalGuard& operator=(const SignalGuard&) = delete;
private:
    static constexpr int kSignals[2] = {SIGINT, SIGTERM};
    struct sigaction old_[2];
    void (*old_xfsz_)(int) = SIG_DFL;
};

// A run killed mid-write (SIGKILL, power loss) leaves "<file>.tmp.<pid>" beside its checkpoints.
// They are never read (--resume picks model_<8 digits>.safetensors names only), but they can be
// as large as a checkpoint: remove those whose process is gone.
void remove_stale_temp_files(const std::string& dir, bool quiet) {
    DIR* d = opendir(dir.c_str());
    if (!d) return;
    std::vector<std::string> stale;
    while (dirent* e = readdir(d)) {
        const std::string n = e->d_name;
        // exactly "<name>.safetensors.tmp.<pid>", as AtomicFile names them
        const size_t at = n.rfind(".tmp."), ext = n.rfind(".safetensors", at);
        if (at == std::string::npos || at + 5 == n.size() || ext == std::string::npos || ext + 12 != at) continue;
        if (n.find_first_not_of("0123456789", at + 5) != std::string::npos || n.size() - at - 5 > 9) continue;
        const long pid = std::atol(n.c_str() + at + 5);
        if (pid > 0 && kill((pid_t)pid, 0) != 0 && errno == ESRCH) stale.push_back(dir + "/" + n);
    }
    closedir(d);
    for (const std::string& p : stale)
        if (std::remove(p.c_str()) == 0 && !quiet) fmt::print("removed {} (a write cut short by a killed run)\n", p);
}

// One optimizer step: grad_accum micro-batches of forward/backward, AdamW, then the
// aux-loss-free bias update from the step's routing counts.
StepResult train_step(GPT& model, AdamW& adamw, DataLoader& train, const Config& cfg, int step,
                      std::vector<int>& inp, std::vector<int>& tgt) {
    const TrainConfig& tc = cfg.train;
    const int B = tc.batch_size, T = cfg.model.seq_len;
    std::vector<MoeLayer*> moe = model.moe_layers();
    for (MoeLayer* m : moe) m->begin_step();
    if (cfg.balance.aux_scope == "global" && cfg.balance.aux_loss > 0 && !moe.empty() &&
        (tc.grad_accum > 1 || Dist::get().world > 1)) {
        // f_i must count the whole step (every micro-batch of every rank) before any backward: a
        // counting pass over the same micro-batches with the same noise (data position and RNG
        // restored after).
        DataLoader::Position pos = train.position();
        uint64_t rng_state = model.rng().state;
        for (MoeLayer* m : moe) { m->set_counting(true); m->set_global_counts({}); }
        std::vector<std::vector<double>> counts(moe.size(), std::vector<double>(cfg.model.moe.experts, 0.0));
        for (int micro = 0; micro < tc.grad_accum; micro++) {
            train.next_batch(inp.data(), tgt.data());
            model.forward(inp.data(), tgt.data(), B, T);
            for (size_t i = 0; i < moe.size(); i++)
                for (size_t e = 0; e < counts[i].size(); e++) counts[i][e] += moe[i]->stats().routed[e];
        }
        for (size_t i = 0; i < moe.size(); i++) {
            Dist::get().allreduce(counts[i].data(), counts[i].size(), Dist::WORLD);  // all ranks' micro-batches
            moe[i]->set_counting(false);
            moe[i]->set_global_counts(counts[i]);
        }
        train.set_position(pos);
        model.rng().state = rng_state;
    }
    StepResult r;   // the gradients are zero here: AdamW (or the skip below) left them so
    MoeStats totals;
    for (int micro = 0; micro < tc.grad_accum; micro++) {
        train.next_batch(inp.data(), tgt.data());
        r.loss += model.forward(inp.data(), tgt.data(), B, T) / tc.grad_accum;
        model.backward(1.0f / tc.grad_accum);
        totals.add(model.balance_totals());
    }
    // distributed: gradients averaged over ranks, the reported numbers too
    const Dist& d = Dist::get();
    model.reduce_grads();
    double sums[7] = {r.loss, totals.aux, totals.z, totals.imp, totals.load, totals.dropped, totals.assignments};
    d.allreduce(sums, 7, Dist::WORLD);
    r.loss = sums[0] / d.world;
    totals.aux = sums[1] / d.world; totals.z = sums[2] / d.world; totals.imp = sums[3] / d.world;
    totals.load = sums[4] / d.world; totals.dropped = sums[5]; totals.assignments = sums[6];
    // the log shows each term per MoE layer (mean over layers), so balanced routing reads alpha
    const double per = tc.grad_accum * std::max<size_t>(1, moe.size());
    r.aux = totals.aux / per;
    r.z = totals.z / per;
    r.imp = totals.imp / per;
    r.load = totals.load / per;
    r.drop_rate = totals.assignments > 0 ? totals.dropped / totals.assignments : 0.0;
    r.lr = (float)lr_at(tc, step);
    if (g_inject_inf_step == step + 1) {
        r.loss = std::numeric_limits<double>::infinity();
        model.backend().scale(model.grads(), std::numeric_limits<float>::infinity(), model.num_params());
    }
    // train.nonfinite: an inf/NaN loss or gradient must not reach AdamW, which would spread it
    // into every weight and both moments. The flag is summed over ranks, so that all of them
    // skip or stop at the same step.
    r.norm = adamw.grad_norm();
    double bad = std::isfinite(r.loss) && std::isfinite(r.norm) ? 0.0 : 1.0;
    d.allreduce(&bad, 1, Dist::WORLD);
    if (bad > 0) {
        r.nonfinite = true;
        model.zero_grad();
        return r;   // no update, no bias update: the weights stay those before this step
    }
    adamw.step(r.lr, r.norm);
    for (MoeLayer* m : moe) {
        std::vector<double> routed = m->step_routed();   // the global batch: every rank's micro-batches
        d.allreduce(routed.data(), routed.size(), Dist::WORLD);
        r.maxvio += load_stats(routed).maxvio / moe.size();
        m->update_bias(routed);
    }
    return r;
}

// Frequency-balanced hash tables need token counts over the training shards (first 256M tokens).
void build_balanced_hash_tables(GPT& model, const DataLoader& train) {
    std::vector<double> counts(model.config().vocab_size, 0.0);
    uint64_t seen = 0;
    for (const std::string& f : train.files()) {
        if (seen >= (1ull << 28)) break;
        std::vector<uint16_t> tokens = read_shard(f);
        for (uint16_t t : tokens) if (t < counts.size()) counts[t] += 1.0;
        seen += tokens.size();
    }
    for (MoeLayer* m : model.moe_layers()) m->hash_table() = balanced_hash_table(counts, m->experts());
}

// Everything after the model, optimizer and loaders exist: init_from / resume, the step loop,
// evals, checkpoints, the summary.
TrainSummary train_loop(const Config& cfg, const TrainOptions& opt, Backend& backend, GPT& model, AdamW& adamw,
                        DataLoader& train, DataLoader& val);

}  // namespace

TrainSummary run_training(const Config& cfg, const TrainOptions& opt) {
    const TrainConfig& tc = cfg.train;
    const ModelConfig& mc = cfg.model;
    const int B = tc.batch_size, T = mc.seq_len;
    Dist& dist = Dist::get();
    dist.setup_groups(cfg.dist.expert_parallel);
    if (dist.ep > 1 && cfg.router.type == "soft")
        fail("router.type soft mixes every token of a sequence into every slot; it has no expert-parallel form "
             "(dist.expert_parallel = {})", dist.ep);
    const bool lead = dist.rank == 0;           // rank 0 alone prints and writes files
    // test hook (tests/test_dist.cpp): this rank fails at start-up, the others must not hang
    if (const char* r = std::getenv("MOE_INJECT_FAIL_RANK"); r && std::atoi(r) == dist.rank)
        fail("injected start-up failure (MOE_INJECT_FAIL_RANK={})", r);
    TrainOptions o = opt;
    o.quiet = opt.quiet || !lead;
    std::unique_ptr<Backend> be = make_backend(tc);
    DistAttach attached(*be);                   // device buffers: NCCL communicators (docs/nccl.md)

    // each rank reads its own B*T slice of every world*B*T global batch
    DataLoader train(cfg.data.train, B, T, mc.vocab_size, dist.rank, dist.world, "data.train");
    DataLoader val(cfg.data.val, B, T, mc.vocab_size, 0, 1, "data.val");
    GPT model(cfg, *be);
    model.init_weights((uint64_t)tc.seed);
    model.rng().state ^= 0x9E3779B97F4A7C15ull * (uint64_t)dist.rank;  // router noise: a stream per rank
    AdamW adamw(model, tc);
    return train_loop(cfg, o, *be, model, adamw, train, val);
}

namespace {

TrainSummary train_loop(const Config& cfg, const TrainOptions& opt, Backend& backend, GPT& model, AdamW& adamw,
                        DataLoader& train, DataLoader& val) {
    const TrainConfig& tc = cfg.train;
    const ModelConfig& mc = cfg.model;
    const int B = tc.batch_size, T = mc.seq_len;
    Backend* be = &backend;
    Dist& dist = Dist::get();
    const bool lead = dist.rank == 0;
    SignalGuard signals;
    const char* inject = std::getenv("MOE_INJECT_INF_STEP");   // test hook, see g_inject_inf_step
    g_inject_inf_step = inject ? std::atoi(inject) : 0;

    // train.init_from: a fresh run (step 0, zero AdamW moments) that starts from another
    // checkpoint's weights, e.g. an upcycled model, which has no training state to --resume.
    // Before the balanced hash tables: those are rebuilt from this run's training shards.
    if (!tc.init_from.empty() && opt.resume.empty()) {
        int from_step;
        try {
            from_step = load_weights_into(tc.init_from, model);
        } catch (const Error& e) {
            fail("train.init_from: {}", e.what());
        }
        if (!opt.quiet)
            fmt::print("init: weights from {} (its step {}); starting at step 0 with fresh optimizer state\n",
                       tc.init_from, from_step);
    }

    if (cfg.model.moe.enabled && cfg.router.type == "hash" && cfg.router.hash == "balanced")
        build_balanced_hash_tables(model, train);

    TrainSummary sum;
    int start = 0;
    if (!opt.resume.empty()) {
        std::string path = resolve_checkpoint(opt.resume == "latest" ? tc.out_dir : opt.resume, true);
        if (!file_exists(state_path_for(path)))   // e.g. `moe upcycle` output: weights only
            fail("{} has no training state beside it, so it cannot be resumed; start a new run from its weights "
                 "with --set train.init_from={} ({})", path, path, state_path_for(path));
        int ckpt_step = load_weights_into(path, model);
        TrainState st = load_train_state(state_path_for(path), model);
        if (st.step != ckpt_step) fail("training state is for step {}, model for step {} ({})", st.step, ckpt_step, path);
        if (st.step >= tc.steps) fail("checkpoint is at step {}, train.steps is {}: nothing to do ({})", st.step, tc.steps, path);
        adamw.set_state(st.m, st.v, st.adam_t);
        train.set_position(st.data);
        model.rng().state = st.rng;
        start = st.step;
        if (!opt.quiet) fmt::print("resuming from {} (step {})\n", path, start);
    }
    sum.first_step = start;
    std::ofstream metrics;
    if (lead) {
        make_dirs(tc.out_dir);
        remove_stale_temp_files(tc.out_dir, opt.quiet);
        metrics.open(tc.out_dir + "/metrics.jsonl", start ? std::ios::app : std::ios::trunc);
        if (!metrics) fail("cannot write metrics ({}/metrics.jsonl)", tc.out_dir);
    }

    const long long tokens_per_step = (long long)B * T * tc.grad_accum * dist.world;  // the global batch
    if (!opt.quiet) {
        fmt::print("model: {} GPT, {} layers, d_model {}, {} heads, seq {}, vocab {} | {} parameters\n",
                   mc.moe.enabled ? "MoE" : "dense", mc.n_layer, mc.d_model, mc.n_head, mc.seq_len, mc.vocab_size,
                   human((double)model.num_params()));
        fmt::print("data: {} train shard(s), {} tokens | {} val tokens | batch {} x {} x accum {}{} = {} tokens/step\n",
                   train.files().size(), human((double)train.total_tokens()), human((double)val.total_tokens()),
                   B, T, tc.grad_accum, dist.active() ? fmt::format(" x {} ranks", dist.world) : "", tokens_per_step);
        const std::string dev = be->name() == "cuda" ? fmt::format("cuda ({}, {})", cuda_device_name(gpu_index()), tc.dtype)
                                                     : fmt::format("{}, {} threads", be->name(), omp_get_max_threads());
        fmt::print("device: {} | steps {} | out {}\n", dev, tc.steps, tc.out_dir);
        if (dist.active())
            fmt::print("dist: {} ranks = {} data-parallel x {} expert-parallel ({} experts per rank){}\n", dist.world,
                       dist.dp, dist.ep, mc.moe.enabled ? mc.moe.experts / dist.ep : 0,
                       dist.transport() == "MPI" ? "" : " over " + dist.transport());
    }
    const int width = (int)std::to_string(tc.steps).size();
    auto run_val = [&](int done) {
        RoutingReport report(model, {});
        float vl = evaluate(model, val, tc.eval_batches, [&](const int* inp, int N) { report.add_batch(inp, N); });
        sum.val_losses.push_back({done, vl});
        if (!opt.quiet) {
            fmt::print("step {:>{}}/{} | val loss {:.4f}\n", done, width, tc.steps, vl);
            if (mc.moe.enabled) fmt::print("{}\n", report.summary_line());
        }
        nlohmann::json j{{"step", done}, {"val_loss", vl}};
        if (mc.moe.enabled) j["val_routing"] = report.to_json();
        if (lead) {
            metrics << j.dump() << "\n";
            metrics.flush();
            // a full disk or a file-size limit: say so now, not at the next checkpoint
            if (!metrics) fail("cannot write metrics ({}/metrics.jsonl: {})", tc.out_dir, std::strerror(errno));
        }
    };
    // an expert that gets no token for this many consecutive steps is reported, once
    constexpr int kDeadSteps = 50;
    std::vector<std::vector<int>> dead_run;
    for (MoeLayer* m : model.moe_layers()) dead_run.emplace_back(m->experts(), 0);
    if (start == 0 && tc.eval_every > 0) run_val(0);

    // A checkpoint of the model as it is now, which has completed `done` steps; `data` and `rng`
    // are where step done+1 starts.
    auto save_checkpoint = [&](int done, const DataLoader::Position& data, uint64_t rng) {
        std::string path = checkpoint_path(tc.out_dir, done);
        TrainState st;
        st.step = done;
        st.adam_t = adamw.t();
        st.rng = rng;
        st.data = data;
        st.m = adamw.get_m();
        st.v = adamw.get_v();
        std::vector<float> w = model.get_weights();
        // expert parallel: every rank holds its own experts; complete the tensors first
        model.gather_sharded(w);
        model.gather_sharded(st.m);
        model.gather_sharded(st.v);
        if (lead) {
            // state first: a model file without its state is never picked by --resume latest
            save_train_state(state_path_for(path), model, st);
            save_model(path, model, cfg, done, &w);
        }
        sum.final_checkpoint = path;
    };

    std::vector<int> inp((size_t)B * T), tgt((size_t)B * T);
    const double peak_flops = gpu_peak_flops(*be, tc), step_flops = flops_per_rank_step(cfg);
    auto t_begin = Clock::now();
    double train_ms = 0.0;  // optimizer steps only: eval and checkpoint time is reported apart
    for (int step = start; step < tc.steps; step++) {
        auto t0 = Clock::now();
        const double a2a_s0 = dist.comm_seconds, a2a_b0 = dist.comm_bytes;
        const DataLoader::Position data_before = train.position();   // for train.nonfinite: stop
        const uint64_t rng_before = model.rng().state;
        StepResult r = train_step(model, adamw, train, cfg, step, inp, tgt);
        be->synchronize();
        double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        const int done = step + 1;
        if (r.nonfinite && tc.nonfinite == "stop") {
            // the weights are still those after `step` steps: keep them, then stop
            if (sum.final_checkpoint != checkpoint_path(tc.out_dir, step))   // unless just written
                save_checkpoint(step, data_before, rng_before);
            fail("non-finite {} at step {} (loss {}, gradient norm {}); wrote {} with the weights before it; "
                 "train.nonfinite: skip would skip such steps instead",
                 std::isfinite(r.loss) ? "gradient norm" : "loss", done, r.loss, r.norm, sum.final_checkpoint);
        }
        if (r.nonfinite) sum.skipped++;
        train_ms += ms;
        sum.losses.push_back((float)r.loss);
        nlohmann::json j{{"step", done}, {"loss", r.loss}};
        std::string line = fmt::format("step {:>{}}/{} | loss {:.6f}", done, width, tc.steps, r.loss);
        const BalanceConfig& bal = cfg.balance;
        for (auto [name, coef, value] : {std::tuple{"aux", bal.aux_loss, r.aux}, {"z", bal.z_loss, r.z},
                                         {"imp", bal.importance_loss, r.imp}, {"load", bal.load_loss, r.load}})
            if (mc.moe.enabled && coef > 0) { line += fmt::format(" | {} {:.4f}", name, value); j[name] = value; }
        line += fmt::format(" | lr {:.1e} | norm {:.2f}", r.lr, r.norm);
        if (mc.moe.enabled) {
            line += fmt::format(" | maxvio {:.2f} | drop {:.1f}%", r.maxvio, 100.0 * r.drop_rate);
            j["maxvio"] = r.maxvio;
            j["drop_rate"] = r.drop_rate;
        }
        if (dist.ep > 1) {
            const double a2a_ms = 1000.0 * (dist.comm_seconds - a2a_s0), a2a_mb = (dist.comm_bytes - a2a_b0) / 1e6;
            line += fmt::format(" | a2a {:.1f} ms {:.2f} MB", a2a_ms, a2a_mb);
            j["a2a_ms"] = a2a_ms;
            j["a2a_mb"] = a2a_mb;
        }
        line += fmt::format(" | {:.1f} ms | {} tok/s", ms, human(tokens_per_step / (ms / 1000.0)));
        if (peak_flops > 0) {
            const double mfu = step_flops / (ms / 1000.0) / peak_flops;
            line += fmt::format(" | mfu {:.1f}%", 100.0 * mfu);
            j["mfu"] = mfu;
        }
        j["lr"] = r.lr; j["norm"] = r.norm; j["ms"] = ms; j["tok_s"] = tokens_per_step / (ms / 1000.0);
        if (sum.skipped > 0) {   // train.nonfinite: skip; the count is of this run (not kept across --resume)
            line += fmt::format(" | skipped {}", sum.skipped);
            j["skipped"] = sum.skipped;
            if (r.nonfinite) j["nonfinite"] = true;
        }
        if (!opt.quiet) {
            fmt::print("{}\n", line);
            std::fflush(stdout);
        }
        if (lead) {
            metrics << j.dump() << "\n";
            metrics.flush();
            // a full disk or a file-size limit: say so now, not at the next checkpoint
            if (!metrics) fail("cannot write metrics ({}/metrics.jsonl: {})", tc.out_dir, std::strerror(errno));
        }
        std::vector<MoeLayer*> moe = model.moe_layers();
        for (size_t i = 0; i < moe.size(); i++)
            for (int e = 0; e < moe[i]->experts(); e++) {
                int& run = dead_run[i][e];
                run = moe[i]->step_routed()[e] > 0 ? 0 : run + 1;
                if (run == kDeadSteps && !opt.quiet)
                    fmt::print("warning: layer {} expert {} has received no token for {} steps\n", moe[i]->layer(), e,
                               kDeadSteps);
            }
        if ((tc.eval_every > 0 && done % tc.eval_every == 0) || done == tc.steps) run_val(done);
        const bool stopping = opt.stop_after > 0 && done >= opt.stop_after && done < tc.steps;
        if ((tc.ckpt_every > 0 && done % tc.ckpt_every == 0) || done == tc.steps || stopping)
            save_checkpoint(done, train.position(), model.rng().state);
        if (stopping) break;
        // SIGINT/SIGTERM (SignalGuard): stop after this step with a checkpoint; every rank
        // stops at the same step, whichever of them got the signal
        double signalled = g_signal;
        dist.allreduce(&signalled, 1, Dist::WORLD);
        if (signalled > 0 && done < tc.steps) {
            if (sum.final_checkpoint != checkpoint_path(tc.out_dir, done))
                save_checkpoint(done, train.position(), model.rng().state);
            sum.interrupted = g_signal ? (int)g_signal : SIGTERM;
            break;
        }
    }
    if (!opt.quiet && !sum.losses.empty()) {
        double secs = std::chrono::duration<double>(Clock::now() - t_begin).count();
        int ran = (int)sum.losses.size();
        fmt::print("done: {} steps in {:.1f} s ({:.0f} ms/step, {} tok/s; eval and checkpoints {:.1f} s) | final loss {:.4f}",
                   ran, secs, train_ms / ran, human(tokens_per_step * ran / (train_ms / 1000.0)),
                   secs - train_ms / 1000.0, sum.losses.back());
        if (!sum.val_losses.empty()) fmt::print(" | val loss {:.4f}", sum.val_losses.back().second);
        fmt::print("\ncheckpoint: {}\n", sum.final_checkpoint);
    }
    if (sum.interrupted && lead) {
        fmt::print("interrupted at step {}: wrote {} (continue with --resume latest)\n",
                   sum.first_step + (int)sum.losses.size(), sum.final_checkpoint);
        std::fflush(stdout);
    }
    return sum;
}

}  // namespace

}  // namespace moe
