/* The training loop; see trainer.h. */
#include "trainer.h"
#include "common.h"
#include "fileio.h"
#include "model_io.h"
#include "optim.h"

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

float evaluate(GPT& model, DataLoader& val, int batches) {
    val.reset();
    std::vector<int> inp((size_t)val.batch_size() * val.seq_len()), tgt(inp.size());
    double sum = 0.0;
    for (int b = 0; b < batches; b++) {
        val.next_batch(inp.data(), tgt.data());
        sum += model.forward(inp.data(), tgt.data(), val.batch_size(), val.seq_len());
    }
    return (float)(sum / batches);
}

static std::string human(double x) {
    if (x >= 1e9) return fmt::format("{:.2f}B", x / 1e9);
    if (x >= 1e6) return fmt::format("{:.2f}M", x / 1e6);
    if (x >= 1e3) return fmt::format("{:.1f}k", x / 1e3);
    return fmt::format("{:.0f}", x);
}

TrainSummary run_training(const Config& cfg, const TrainOptions& opt) {
    const TrainConfig& tc = cfg.train;
    const ModelConfig& mc = cfg.model;
    const int B = tc.batch_size, T = mc.seq_len;
    std::unique_ptr<Backend> be = make_backend(tc);

    DataLoader train(cfg.data.train, B, T, mc.vocab_size, 0, 1, "data.train");
    DataLoader val(cfg.data.val, B, T, mc.vocab_size, 0, 1, "data.val");
    GPT model(mc, *be);
    model.init_weights((uint64_t)tc.seed);
    AdamW adamw(model, tc);
    Rng rng((uint64_t)tc.seed ^ 0x5DEECE66Dull);

    TrainSummary sum;
    int start = 0;
    if (!opt.resume.empty()) {
        std::string path = resolve_checkpoint(opt.resume == "latest" ? tc.out_dir : opt.resume, true);
        int ckpt_step = load_weights_into(path, model);
        TrainState st = load_train_state(state_path_for(path), model);
        if (st.step != ckpt_step) fail("training state is for step {}, model for step {} ({})", st.step, ckpt_step, path);
        if (st.step >= tc.steps) fail("checkpoint is at step {}, train.steps is {}: nothing to do ({})", st.step, tc.steps, path);
        adamw.set_state(st.m, st.v, st.adam_t);
        train.set_position(st.data);
        rng.state = st.rng;
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
        float vl = evaluate(model, val, tc.eval_batches);
        sum.val_losses.push_back({done, vl});
        if (!opt.quiet) fmt::print("step {:>{}}/{} | val loss {:.4f}\n", done, width, tc.steps, vl);
        metrics << nlohmann::json{{"step", done}, {"val_loss", vl}}.dump() << "\n";
        metrics.flush();
    };
    if (start == 0 && tc.eval_every > 0) run_val(0);

    std::vector<int> inp((size_t)B * T), tgt((size_t)B * T);
    auto t_begin = Clock::now();
    double train_ms = 0.0;  // optimizer steps only: eval and checkpoint time is reported apart
    for (int step = start; step < tc.steps; step++) {
        auto t0 = Clock::now();
        model.zero_grad();
        double loss = 0.0;
        for (int micro = 0; micro < tc.grad_accum; micro++) {
            train.next_batch(inp.data(), tgt.data());
            loss += model.forward(inp.data(), tgt.data(), B, T) / tc.grad_accum;
            model.backward(1.0f / tc.grad_accum);
        }
        float lr = (float)lr_at(tc, step);
        float norm = adamw.step(lr);
        be->synchronize();
        double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        const int done = step + 1;
        train_ms += ms;
        sum.losses.push_back((float)loss);
        if (!opt.quiet) {
            fmt::print("step {:>{}}/{} | loss {:.6f} | lr {:.1e} | norm {:.2f} | {:.1f} ms | {} tok/s\n", done, width,
                       tc.steps, loss, lr, norm, ms, human(tokens_per_step / (ms / 1000.0)));
            std::fflush(stdout);
        }
        metrics << nlohmann::json{{"step", done}, {"loss", loss}, {"lr", lr}, {"norm", norm}, {"ms", ms},
                                  {"tok_s", tokens_per_step / (ms / 1000.0)}}.dump() << "\n";
        metrics.flush();
        if ((tc.eval_every > 0 && done % tc.eval_every == 0) || done == tc.steps) run_val(done);
        const bool stopping = opt.stop_after > 0 && done >= opt.stop_after && done < tc.steps;
        if ((tc.ckpt_every > 0 && done % tc.ckpt_every == 0) || done == tc.steps || stopping) {
            std::string path = checkpoint_path(tc.out_dir, done);
            TrainState st;
            st.step = done;
            st.adam_t = adamw.t();
            st.rng = rng.state;
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
