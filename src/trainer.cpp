/* The training loop; see trainer.h. */
#include "trainer.h"
#include "common.h"
#include "fileio.h"
#include "model_io.h"
#include "moe_router.h"
#include "optim.h"
#include "routing_report.h"
#include "stats.h"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <omp.h>

namespace moe {

using Clock = std::chrono::steady_clock;

std::unique_ptr<Backend> make_backend(const TrainConfig& tc) {
    if (tc.device == "cuda")
        fail("train.device is cuda, but the CUDA backend is not part of this build yet (use cpu or auto)");
    return make_cpu_backend(tc.threads);
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
};

// One optimizer step: grad_accum micro-batches of forward/backward, AdamW, then the
// aux-loss-free bias update from the step's routing counts.
StepResult train_step(GPT& model, AdamW& adamw, DataLoader& train, const Config& cfg, int step,
                      std::vector<int>& inp, std::vector<int>& tgt) {
    const TrainConfig& tc = cfg.train;
    const int B = tc.batch_size, T = cfg.model.seq_len;
    std::vector<MoeLayer*> moe = model.moe_layers();
    for (MoeLayer* m : moe) m->begin_step();
    if (cfg.balance.aux_scope == "global" && cfg.balance.aux_loss > 0 && tc.grad_accum > 1 && !moe.empty()) {
        // f_i must count the whole step before any micro-batch's backward: a counting pass over
        // the same micro-batches with the same noise (data position and RNG restored after).
        DataLoader::Position pos = train.position();
        uint64_t rng_state = model.rng().state;
        for (MoeLayer* m : moe) { m->set_counting(true); m->set_global_counts({}); }
        std::vector<std::vector<double>> counts(moe.size(), std::vector<double>(cfg.model.moe.experts, 0.0));
        for (int micro = 0; micro < tc.grad_accum; micro++) {
            train.next_batch(inp.data(), tgt.data());
            model.forward(inp.data(), tgt.data(), B, T);
            for (size_t i = 0; i < moe.size(); i++)
                for (size_t e = 0; e < counts[i].size(); e++) counts[i][e] += moe[i]->routing().routed[e];
        }
        for (size_t i = 0; i < moe.size(); i++) { moe[i]->set_counting(false); moe[i]->set_global_counts(counts[i]); }
        train.set_position(pos);
        model.rng().state = rng_state;
    }
    StepResult r;
    model.zero_grad();
    MoeStats totals;
    for (int micro = 0; micro < tc.grad_accum; micro++) {
        train.next_batch(inp.data(), tgt.data());
        r.loss += model.forward(inp.data(), tgt.data(), B, T) / tc.grad_accum;
        model.backward(1.0f / tc.grad_accum);
        totals.add(model.balance_totals());
    }
    // the log shows each term per MoE layer (mean over layers), so balanced routing reads alpha
    const double per = tc.grad_accum * std::max<size_t>(1, moe.size());
    r.aux = totals.aux / per;
    r.z = totals.z / per;
    r.imp = totals.imp / per;
    r.load = totals.load / per;
    r.drop_rate = totals.assignments > 0 ? totals.dropped / totals.assignments : 0.0;
    r.lr = (float)lr_at(tc, step);
    r.norm = adamw.step(r.lr);
    for (MoeLayer* m : moe) {
        r.maxvio += load_stats(m->step_routed()).maxvio / moe.size();
        m->update_bias(m->step_routed());
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

}  // namespace

TrainSummary run_training(const Config& cfg, const TrainOptions& opt) {
    const TrainConfig& tc = cfg.train;
    const ModelConfig& mc = cfg.model;
    const int B = tc.batch_size, T = mc.seq_len;
    std::unique_ptr<Backend> be = make_backend(tc);

    DataLoader train(cfg.data.train, B, T, mc.vocab_size, 0, 1, "data.train");
    DataLoader val(cfg.data.val, B, T, mc.vocab_size, 0, 1, "data.val");
    GPT model(cfg, *be);
    model.init_weights((uint64_t)tc.seed);
    AdamW adamw(model, tc);

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
    make_dirs(tc.out_dir);
    std::ofstream metrics(tc.out_dir + "/metrics.jsonl", start ? std::ios::app : std::ios::trunc);
    if (!metrics) fail("cannot write metrics ({}/metrics.jsonl)", tc.out_dir);

    const long long tokens_per_step = (long long)B * T * tc.grad_accum;
    if (!opt.quiet) {
        fmt::print("model: {} GPT, {} layers, d_model {}, {} heads, seq {}, vocab {} | {} parameters\n",
                   mc.moe.enabled ? "MoE" : "dense", mc.n_layer, mc.d_model, mc.n_head, mc.seq_len, mc.vocab_size,
                   human((double)model.num_params()));
        fmt::print("data: {} train shard(s), {} tokens | {} val tokens | batch {} x {} x accum {} = {} tokens/step\n",
                   train.files().size(), human((double)train.total_tokens()), human((double)val.total_tokens()),
                   B, T, tc.grad_accum, tokens_per_step);
        fmt::print("device: {}, {} threads | steps {} | out {}\n", be->name(), omp_get_max_threads(), tc.steps,
                   tc.out_dir);
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
        metrics << j.dump() << "\n";
        metrics.flush();
    };
    // an expert that gets no token for this many consecutive steps is reported, once
    constexpr int kDeadSteps = 50;
    std::vector<std::vector<int>> dead_run;
    for (MoeLayer* m : model.moe_layers()) dead_run.emplace_back(m->experts(), 0);
    if (start == 0 && tc.eval_every > 0) run_val(0);

    std::vector<int> inp((size_t)B * T), tgt((size_t)B * T);
    auto t_begin = Clock::now();
    double train_ms = 0.0;  // optimizer steps only: eval and checkpoint time is reported apart
    for (int step = start; step < tc.steps; step++) {
        auto t0 = Clock::now();
        StepResult r = train_step(model, adamw, train, cfg, step, inp, tgt);
        be->synchronize();
        double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        const int done = step + 1;
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
        line += fmt::format(" | {:.1f} ms | {} tok/s", ms, human(tokens_per_step / (ms / 1000.0)));
        j["lr"] = r.lr; j["norm"] = r.norm; j["ms"] = ms; j["tok_s"] = tokens_per_step / (ms / 1000.0);
        if (!opt.quiet) {
            fmt::print("{}\n", line);
            std::fflush(stdout);
        }
        metrics << j.dump() << "\n";
        metrics.flush();
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
        if ((tc.ckpt_every > 0 && done % tc.ckpt_every == 0) || done == tc.steps || stopping) {
            std::string path = checkpoint_path(tc.out_dir, done);
            TrainState st;
            st.step = done;
            st.adam_t = adamw.t();
            st.rng = model.rng().state;
            st.data = train.position();
            st.m = adamw.get_m();
            st.v = adamw.get_v();
            // state first: a model file without its state is never picked by --resume latest
            save_train_state(state_path_for(path), model, st);
            save_model(path, model, cfg, done);
            sum.final_checkpoint = path;
        }
        if (stopping) break;
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
    return sum;
}

}  // namespace moe
