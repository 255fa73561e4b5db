/* The run configuration: DESIGN.md's YAML schema as plain structs, loaded and validated by
   config.cpp. Enum-like options are kept as the strings the user wrote (validated on load). */
#pragma once
#include <string>
#include <vector>

namespace moe {

struct MoeConfig {
    bool enabled = false;        // false when the `model.moe` block is absent (dense model)
    int every = 1;               // MoE FFN in every Nth layer ...
    int first_dense = 0;         // ... after this many leading dense layers
    int experts = 8;
    int top_k = 2;
    int expert_ff = 256;
    std::string activation = "gelu";  // gelu | swiglu
    int shared_experts = 0;
    int shared_ff = 256;
};

struct ModelConfig {
    int vocab_size = 256;
    int seq_len = 256;
    int n_layer = 4;
    int n_head = 4;
    int d_model = 128;
    int d_ff = 512;
    MoeConfig moe;
    // layer l has an MoE FFN: moe.enabled && l >= first_dense && (l - first_dense) % every == 0
    bool is_moe_layer(int l) const;
};

struct RouterConfig {
    std::string type = "topk";          // topk | expert_choice | hash | soft | sinkhorn
    std::string score = "softmax";      // softmax | sigmoid
    bool normalize_topk = true;
    double scale = 1.0;
    std::string noise = "none";         // none | gaussian | jitter
    double jitter_eps = 0.01;
    int groups = 1;
    int topk_groups = 1;
    double capacity_factor = 0.0;       // 0 = dropless
    double eval_capacity_factor = 0.0;
    std::string drop_policy = "probs";  // probs | position
    double expert_choice_capacity = 1.0;
    int soft_slots = 1;
    std::string hash = "random";        // random | balanced
};

struct BalanceConfig {
    double aux_loss = 0.0;
    std::string aux_scope = "micro_batch";  // micro_batch | sequence | global
    double z_loss = 0.0;
    double importance_loss = 0.0;
    double load_loss = 0.0;
    double bias_rate = 0.0;
    bool bias_center = false;
};

struct TrainConfig {
    int batch_size = 8;
    int grad_accum = 1;
    int steps = 300;
    double lr = 3.0e-3;
    double min_lr = 3.0e-4;
    int warmup = 20;
    double weight_decay = 0.1;
    double beta1 = 0.9;
    double beta2 = 0.95;
    double grad_clip = 1.0;             // 0 = no clipping
    long long seed = 1337;
    int eval_every = 50;                // 0 = only at the end
    int eval_batches = 8;
    int ckpt_every = 100;               // 0 = only at the end
    std::string out_dir = "runs/quickstart";
    std::string device = "auto";        // auto | cpu | cuda
    std::string dtype = "fp32";         // fp32 | bf16
    int threads = 0;                    // 0 = all cores
    std::string init_from;              // "" | a model checkpoint whose weights start the run (step 0)
    std::string nonfinite = "stop";     // stop | skip: what a non-finite loss or gradient norm does
};

struct DataConfig {
    std::string train = "data/synth/train_*.bin";
    std::string val = "data/synth/val_*.bin";
};

struct DistConfig {
    int expert_parallel = 1;
};

struct Config {
    ModelConfig model;
    RouterConfig router;
    BalanceConfig balance;
    TrainConfig train;
    DataConfig data;
    DistConfig dist;
};

// Loads a YAML file, applies `--set key.path=value` overrides (in order), validates.
// Throws moe::Error naming the key and "file:line" (or "--set key") on any problem.
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// Same from YAML text; `source` names it in error messages (e.g. a checkpoint path).
Config parse_config(const std::string& yaml_text, const std::string& source,
                    const std::vector<std::string>& overrides = {});
// The full resolved config as YAML (every key, defaults included); parse_config() of it
// gives back an identical Config. Stored in checkpoints.
std::string config_to_yaml(const Config& cfg);

}  // namespace moe
