/* The training loop behind `moe train`, as a library function so tests can drive it:
   data -> forward/backward (with gradient accumulation) -> AdamW, step lines, val loss,
   metrics.jsonl, atomic checkpoints, bit-exact resume. */
#pragma once
#include "config.h"
#include "data.h"
#include "model.h"

#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace moe {

struct TrainOptions {
    std::string resume;        // "" | "latest" | a checkpoint file or directory
    bool quiet = false;        // no step lines (tests)
    std::string config_name;   // shown in the header
    int stop_after = 0;        // > 0: stop once this many steps are done, with a checkpoint
                               // (as an interrupted run would); the schedule still spans train.steps
};

struct TrainSummary {
    int first_step = 0;                          // steps completed before this run (resume)
    std::vector<float> losses;                   // train loss of each step run here
    std::vector<std::pair<int, float>> val_losses;
    std::string final_checkpoint;
    int skipped = 0;                             // steps skipped as non-finite (train.nonfinite: skip)
    int interrupted = 0;                         // SIGINT/SIGTERM that stopped the run early, else 0
};

// While it runs, SIGINT and SIGTERM are caught: the step in progress finishes, a checkpoint
// (model + state) is written, and the run returns with `interrupted` set to the signal (`moe
// train` then exits 128 + signal: 130, 143). A second signal kills at once. A non-finite loss or
// gradient norm never reaches the weights: train.nonfinite = skip drops the update and counts it,
// stop writes a checkpoint of the weights before the step and throws moe::Error.
TrainSummary run_training(const Config& cfg, const TrainOptions& opt);

// Mean loss over `batches` val batches read from the start of the loader (DESIGN.md: batch b
// covers tokens [b*B*T, (b+1)*B*T + 1)).
// on_batch, if given, sees each batch's inputs (B*T) right after its forward.
float evaluate(GPT& model, DataLoader& val, int batches,
               const std::function<void(const int* inputs, int N)>& on_batch = nullptr);

// Picks and creates the backend for train.device / train.dtype / train.threads (errors explain
// why not): auto = CUDA when a GPU is visible (rank r of a distributed run takes GPU r mod count),
// else the CPU; cuda without a GPU, or bf16 without CUDA, is an error.
std::unique_ptr<Backend> make_backend(const TrainConfig& tc);
// For commands that only run a model (eval, upcycle): as make_backend, except that a bf16 config
// with device auto runs on the CPU in fp32 where no GPU is visible (weights are fp32 anyway).
std::unique_ptr<Backend> make_backend_for_inference(const TrainConfig& tc);

}  // namespace moe
