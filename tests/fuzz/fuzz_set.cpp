/* `--set key.path=value` overrides: each non-empty input line is one override, applied in order to a
   valid MoE config (as `moe train configs/x.yaml --set ...` does). Same round-trip invariant
   as fuzz_config. */
#include "common.h"
#include "config.h"
#include "fuzz_util.h"

namespace {
const char* kBase = R"(model:
  vocab_size: 256
  seq_len: 64
  n_layer: 2
  n_head: 4
  d_model: 64
  d_ff: 256
  moe: {experts: 8, top_k: 2, expert_ff: 128, shared_experts: 1, shared_ff: 128}
router: {type: topk, score: softmax, capacity_factor: 1.25, noise: gaussian}
balance: {aux_loss: 0.01, z_loss: 0.001, load_loss: 0.1}
train: {batch_size: 4, steps: 100, lr: 1.0e-3, out_dir: runs/fuzz}
data: {train: data/synth/train_*.bin, val: data/synth/val_*.bin}
)";
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string text((const char*)data, size);
    std::vector<std::string> sets;
    for (size_t begin = 0; begin <= text.size();) {
        size_t end = text.find('\n', begin);
        if (end == std::string::npos) end = text.size();
        // empty lines are separators (else every input ending in a newline would stop at a
        // malformed empty override and never reach validation)
        if (end > begin) sets.push_back(text.substr(begin, end - begin));
        begin = end + 1;
    }
    moe::Config cfg;
    try {
        cfg = moe::parse_config(kBase, "base.yaml", sets);
    } catch (const moe::Error&) {
        return 0;
    }
    moe_fuzz::check_config_round_trip(cfg);
    return 0;
}
