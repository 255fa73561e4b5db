/* Routing-health statistics of one MoE layer from its per-expert loads (DESIGN.md, "Routing
   statistics"): MaxVio, coefficient of variation, normalised entropy, dead experts. */
#pragma once
#include <vector>

namespace moe {

struct LoadStats {
    double maxvio = 0;    // max_i load_i / mean load - 1
    double cv = 0;        // std / mean (population)
    double entropy = 0;   // entropy of load / total, divided by log E (1 = uniform)
    int dead = 0;         // experts with load 0
};

LoadStats load_stats(const std::vector<double>& load);

}  // namespace moe
