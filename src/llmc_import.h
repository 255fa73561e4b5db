/* Reading a dense GPT's weights for `moe upcycle`, from either of two formats, told apart by the
   file's first bytes:
   - our own dense checkpoint (safetensors, metadata format "moe-ckpt-1", no model.moe block);
   - an llm.c GPT-2 checkpoint (gpt2_124M.bin: 256 x int32 header, magic 20240326, version 3 =
     fp32 or 5 = bf16, then the parameters stacked per tensor across layers; DESIGN.md "Dense
     import"). bf16 is widened to fp32, the padded vocabulary rows beyond V are dropped, d_ff = 4C.
   Either way the result is host fp32 tensors under DESIGN.md's checkpoint names. */
#pragma once
#include "config.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace moe {

struct DenseWeights {
    std::string path;
    std::string format;           // "moe safetensors, step N" | "llm.c GPT-2 fp32 (version 3)" | "... bf16 (5)"
    ModelConfig dims;             // vocab_size, seq_len (= rows of wpe), n_layer, n_head, d_model, d_ff; moe off
    int padded_vocab = 0;         // llm.c: rows of wte in the file (>= vocab_size); ours: vocab_size
    std::map<std::string, std::vector<float>> tensors;  // DESIGN.md names of a dense model with `dims`
    const std::vector<float>& get(const std::string& name) const;  // throws if absent
    size_t num_params() const;    // as loaded (V rows of wte, seq_len rows of wpe)
};

// Names and shapes of every tensor of a dense GPT with these dims, in DESIGN.md's order.
std::vector<std::pair<std::string, std::vector<int64_t>>> dense_tensor_shapes(const ModelConfig& m);

constexpr int32_t kLlmcMagic = 20240326;
// Detects the format from the first bytes and reads the whole model; a file that is neither,
// a truncated one, or an MoE checkpoint is a moe::Error naming the file.
DenseWeights read_dense_weights(const std::string& path);
DenseWeights read_llmc_checkpoint(const std::string& path);

}  // namespace moe
