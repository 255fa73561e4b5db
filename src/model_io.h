/* Model checkpoints (DESIGN.md names, config and step in the metadata) and training-state files
   (AdamW m and v, step, RNG, data position) beside them, plus finding the newest complete pair. */
#pragma once
#include "config.h"
#include "data.h"
#include "model.h"

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace moe {

std::string checkpoint_path(const std::string& out_dir, int step);        // <dir>/model_<step:08d>.safetensors
std::string state_path_for(const std::string& model_path);                 // ...model_X.state.safetensors

// host_weights: a host copy to write instead of the model's own (e.g. gathered expert shards)
void save_model(const std::string& path, GPT& model, const Config& cfg, int step,
                const std::vector<float>* host_weights = nullptr);

struct LoadedModel {
    Config cfg;
    int step = 0;
    std::unique_ptr<GPT> model;
};
// Builds the model from the config stored in the checkpoint and loads every tensor (missing,
// extra or misshapen tensors are errors naming the file).
LoadedModel load_model(const std::string& path, Backend& be);
// The same, with the backend chosen from the checkpoint's config: backend_for(cfg) runs once,
// before the model is built, and returns a backend that outlives the model.
LoadedModel load_model(const std::string& path, const std::function<Backend&(const Config&)>& backend_for);
// Loads weights into an existing model whose config must match the checkpoint's shapes.
int load_weights_into(const std::string& path, GPT& model);

struct TrainState {
    int step = 0;                 // optimizer steps completed
    int adam_t = 0;
    uint64_t rng = 0;
    DataLoader::Position data;
    std::vector<float> m, v;      // (num_params) each
};
void save_train_state(const std::string& path, const GPT& model, const TrainState& st);
TrainState load_train_state(const std::string& path, const GPT& model);

// The newest model file in `dir` that has its state file beside it ("" if none).
std::string find_latest_checkpoint(const std::string& dir, bool need_state);
// --ckpt / --resume argument: a model file, or a directory (its newest checkpoint).
std::string resolve_checkpoint(const std::string& file_or_dir, bool need_state);

}  // namespace moe
