/* Routing health over an evaluation: per MoE layer, expert load, MaxVio, CV, entropy, dead
   experts, drop rate, mean top-1 gate, router z, and, when the data carries domain tag bytes
   (the synthetic corpus), the domain x expert matrix and a specialisation score. Printed as text
   with bar charts, as JSON (DESIGN.md's schema, extended), or drawn as an SVG heat-map. */
#pragma once
#include "model.h"
#include "stats.h"

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moe {

struct LayerRouting {
    int layer = 0;
    std::vector<double> load, kept;              // (E) routed / kept assignments
    double dropped = 0, assignments = 0, top1_sum = 0, z_sum = 0, tokens = 0;
    std::vector<std::vector<double>> domain_expert;  // (D, E) routed assignments by token domain
    LoadStats stats() const { return load_stats(load); }
    double drop_rate() const { return assignments > 0 ? dropped / assignments : 0; }
    // Mutual information between domain and expert over the assignments, divided by
    // min(H(domain), H(expert)): 0 = routing ignores the domain, 1 = one determines the other.
    double specialisation() const;
};

class RoutingReport {
public:
    // domains: names of the domain tag bytes 1..D (empty: no domain attribution).
    RoutingReport(GPT& model, std::vector<std::string> domains);
    // After each forward of an evaluation over a sequential token stream: reads the MoE layers'
    // routing of that batch; `inputs` (N) attribute tokens to the latest tag byte seen.
    void add_batch(const int* inputs, int N);
    bool has_domains() const { return has_domains_; }
    const std::vector<LayerRouting>& layers() const { return layers_; }

    nlohmann::json to_json() const;                          // the "layers" array
    std::string to_text(const std::string& router_type) const;  // bars, numbers, matrix, warnings
    std::string summary_line() const;                       // one line for the train log
    void write_svg(const std::string& path) const;          // throws moe::Error if unwritable

    static constexpr double kCollapseMaxVio = 1.0;           // an expert at 2x its fair share

private:
    GPT& model_;
    std::vector<std::string> domains_;
    std::vector<LayerRouting> layers_;
    int current_domain_ = -1;
    bool has_domains_ = false;
};

// True when the stream looks like the synthetic corpus: byte tokens whose control bytes are only
// domain tags 1..D and '\n'.
bool looks_domain_tagged(const std::vector<int>& tokens, int vocab_size, int num_domains);

}  // namespace moe
