/* Sparse upcycling (Komatsuzaki et al., 2022, arXiv:2212.05055): an MoE GPT whose attention,
   embeddings and norms are a dense GPT's, and whose experts start from the dense FFN, so that
   MoE training starts where dense training stopped instead of from scratch. Methods:
   - copy: every expert is the dense FFN (expert_ff = d_ff);
   - granular: the dense FFN's d_ff hidden units split into G = d_ff / expert_ff slices, expert e
     gets slice e mod G (experts a multiple of G); with top_k = experts and every gate G/E (zero
     router) the layer is exactly the dense FFN;
   - drop: Drop-Upcycling (Nakamura et al., 2025, arXiv:2502.19261): copy, then re-initialise a
     random fraction r of each expert's hidden units, different units per expert.
   README.md "Upcycling a dense model" says when the result is function-preserving. */
#pragma once
#include "backend.h"
#include "config.h"
#include "llmc_import.h"
#include "model.h"

#include <memory>
#include <string>
#include <vector>

namespace moe {

struct UpcycleOptions {
    std::string method = "copy";   // copy | granular | drop
    double drop_ratio = 0.5;       // drop: fraction r of each expert's hidden units re-initialised
    double noise = 0.0;            // std of Gaussian noise added to routed expert weights (0 = none)
    uint64_t seed = 1337;          // router init, drop choices, noise
};

struct UpcycleResult {
    std::unique_ptr<GPT> model;
    int groups = 1;                // G: slices of the dense FFN (copy/drop: 1)
    int units_dropped = 0;         // drop: round(r * expert_ff) per expert per MoE layer
    std::vector<int> moe_layers;   // layers whose FFN became MoE; the others kept the dense FFN
    bool shared_copied = false;    // shared experts are the dense FFN (shared_ff == d_ff)
    bool zero_router = false;      // granular with top_k = experts: router weight 0, uniform gates
    bool exact = false;            // the upcycled model computes the dense model's function
    std::string exact_why;         // one sentence: why it is, or what breaks it (and the fix)
    size_t params_dense = 0, params_moe = 0;
    double active_params = 0;      // per token: everything but routed experts, plus k_eff of them
    double experts_per_token = 0;  // k_eff: top_k, 1 (hash), capacity (expert_choice), E*p/T (soft)
};

// Checks the MoE config and options against the dense weights (every mismatch is a moe::Error
// naming the key, both values and `config_source`), then builds the upcycled model on `be`.
UpcycleResult upcycle(const DenseWeights& dense, const Config& cfg, const UpcycleOptions& opt, Backend& be,
                      const std::string& config_source);

// Average parameters one token passes through (see UpcycleResult::active_params).
double active_params_per_token(const GPT& model, double* experts_per_token = nullptr);

}  // namespace moe
