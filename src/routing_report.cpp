/* Routing-health report; see routing_report.h. */
#include "routing_report.h"
#include "common.h"
#include "fileio.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moe {

double LayerRouting::specialisation() const {
    const size_t D = domain_expert.size();
    if (D == 0) return 0.0;
    const size_t E = domain_expert[0].size();
    double total = 0.0;
    std::vector<double> pd(D, 0.0), pe(E, 0.0);
    for (size_t d = 0; d < D; d++)
        for (size_t e = 0; e < E; e++) { pd[d] += domain_expert[d][e]; pe[e] += domain_expert[d][e]; total += domain_expert[d][e]; }
    if (total <= 0) return 0.0;
    auto H = [&](const std::vector<double>& p) {
        double h = 0.0;
        for (double v : p) if (v > 0) h -= v / total * std::log(v / total);
        return h;
    };
    double mi = 0.0;
    for (size_t d = 0; d < D; d++)
        for (size_t e = 0; e < E; e++) {
            double p = domain_expert[d][e] / total;
            if (p > 0) mi += p * std::log(p / (pd[d] / total * pe[e] / total));
        }
    double denom = std::min(H(pd), H(pe));
    return denom > 0 ? mi / denom : 0.0;
}

bool looks_domain_tagged(const std::vector<int>& tokens, int vocab_size, int num_domains) {
    if (vocab_size != 256 || tokens.empty()) return false;
    size_t tags = 0;
    for (int t : tokens) {
        if (t >= 1 && t <= num_domains) tags++;
        else if (t < 32 && t != '\n') return false;
    }
    return tags > 0;
}

RoutingReport::RoutingReport(GPT& model, std::vector<std::string> domains)
    : model_(model), domains_(std::move(domains)) {
    has_domains_ = !domains_.empty();
    for (MoeLayer* m : model_.moe_layers()) {
        LayerRouting l;
        l.layer = m->layer();
        l.load.assign(m->experts(), 0.0);
        l.kept.assign(m->experts(), 0.0);
        if (has_domains_) l.domain_expert.assign(domains_.size(), std::vector<double>(m->experts(), 0.0));
        layers_.push_back(l);
    }
}

void RoutingReport::add_batch(const int* inputs, int N) {
    std::vector<int> domain(N, -1);
    const int D = (int)domains_.size();
    for (int n = 0; n < N; n++) {
        if (inputs[n] >= 1 && inputs[n] <= D) current_domain_ = inputs[n] - 1;
        domain[n] = current_domain_;
    }
    std::vector<MoeLayer*> moe = model_.moe_layers();
    for (size_t i = 0; i < moe.size(); i++) {
        const MoeStats& st = moe[i]->stats();
        LayerRouting& l = layers_[i];
        for (size_t e = 0; e < l.load.size(); e++) { l.load[e] += st.routed[e]; l.kept[e] += st.kept[e]; }
        l.dropped += st.dropped;
        l.assignments += st.assignments;
        l.top1_sum += st.top1_gate_sum;
        l.z_sum += st.z_mean_sum;
        l.tokens += st.tokens;
        if (!has_domains_) continue;
        const Routing& r = moe[i]->routing();
        for (int m = 0; m < r.M; m++) {
            int d = domain[r.choice_token[m]];
            if (d >= 0) l.domain_expert[d][r.choice_expert[m]] += 1.0;
        }
    }
}

nlohmann::json RoutingReport::to_json() const {
    nlohmann::json arr = nlohmann::json::array();
    for (const LayerRouting& l : layers_) {
        LoadStats s = l.stats();
        nlohmann::json j{{"layer", l.layer}, {"load", l.load}, {"kept", l.kept}, {"maxvio", s.maxvio}, {"cv", s.cv},
                         {"entropy", s.entropy}, {"dead", s.dead}, {"drop_rate", l.drop_rate()},
                         {"top1_gate", l.tokens > 0 ? l.top1_sum / l.tokens : 0.0},
                         {"z", l.tokens > 0 ? l.z_sum / l.tokens : 0.0}};
        if (has_domains_) {
            j["domain_expert"] = l.domain_expert;
            j["specialisation"] = l.specialisation();
        }
        arr.push_back(j);
    }
    return arr;
}

// A horizontal bar of `width` cells for a value in [0, 1], in eighths of a cell.
static std::string bar(double frac, int width) {
    static const char* eighths[] = {"", "▏", "▎", "▍", "▌", "▋", "▊", "▉"};
    int units = (int)std::lround(std::clamp(frac, 0.0, 1.0) * width * 8);
    std::string s;
    for (int i = 0; i < units / 8; i++) s += "█";
    s += eighths[units % 8];
    return s;
}

std::string RoutingReport::to_text(const std::string& router_type) const {
    std::string out;
    for (const LayerRouting& l : layers_) {
        LoadStats s = l.stats();
        const int E = (int)l.load.size();
        const double total = std::accumulate(l.load.begin(), l.load.end(), 0.0);
        const double mx = *std::max_element(l.load.begin(), l.load.end());
        out += fmt::format("layer {} | maxvio {:.2f} | cv {:.2f} | entropy {:.3f} | dead {} | drop {:.1f}% | "
                           "top1 gate {:.3f} | z {:.2f}\n", l.layer, s.maxvio, s.cv, s.entropy, s.dead,
                           100.0 * l.drop_rate(), l.tokens > 0 ? l.top1_sum / l.tokens : 0.0,
                           l.tokens > 0 ? l.z_sum / l.tokens : 0.0);
        for (int e = 0; e < E; e++) {
            double share = total > 0 ? l.load[e] / total : 0.0;
            out += fmt::format("  e{:<3} {:5.1f}% {}\n", e, 100.0 * share, bar(mx > 0 ? l.load[e] / mx : 0.0, 40));
        }
        if (has_domains_) {
            out += fmt::format("  specialisation {:.3f} (domain/expert mutual information, normalised)\n",
                               l.specialisation());
            out += fmt::format("  {:<11}", "domain");
            for (int e = 0; e < E; e++) out += fmt::format("{:>5}", fmt::format("e{}", e));
            out += "   (% of the domain's assignments)\n";
            for (size_t d = 0; d < l.domain_expert.size(); d++) {
                double row = std::accumulate(l.domain_expert[d].begin(), l.domain_expert[d].end(), 0.0);
                out += fmt::format("  {:<11}", domains_[d]);
                for (int e = 0; e < E; e++) out += fmt::format("{:>5.0f}", row > 0 ? 100.0 * l.domain_expert[d][e] / row : 0.0);
                out += "\n";
            }
        }
        if (s.dead > 0 || s.maxvio > kCollapseMaxVio)
            out += fmt::format("warning: layer {} looks collapsed: {} dead expert(s), MaxVio {:.2f}\n", l.layer,
                               s.dead, s.maxvio);
    }
    if (router_type == "expert_choice" || router_type == "soft")
        out += fmt::format("note: router.type {} is not causal (each token's routing depends on the other tokens of "
                           "its batch), so this loss is not one a causal decoder could reach\n", router_type);
    return out;
}

std::string RoutingReport::summary_line() const {
    std::string s = "routing:";
    for (size_t i = 0; i < layers_.size(); i++) {
        const LayerRouting& l = layers_[i];
        LoadStats st = l.stats();
        s += fmt::format("{} L{} maxvio {:.2f} dead {}", i ? " |" : "", l.layer, st.maxvio, st.dead);
        if (l.dropped > 0) s += fmt::format(" drop {:.1f}%", 100.0 * l.drop_rate());
        if (has_domains_) s += fmt::format(" spec {:.2f}", l.specialisation());
    }
    return s;
}

// Load share relative to uniform: blue below, white at 1, red at 2x and above.
static std::string heat(double rel) {
    double t = std::clamp(rel - 1.0, -1.0, 1.0);
    int r = t < 0 ? (int)(255 * (1 + t)) : 255, b = t > 0 ? (int)(255 * (1 - t)) : 255;
    int g = (int)(255 * (1 - std::fabs(t)));
    return fmt::format("rgb({},{},{})", r, g, b);
}

void RoutingReport::write_svg(const std::string& path) const {
    if (layers_.empty()) fail("no MoE layers to draw (--svg {})", path);
    const int E = (int)layers_[0].load.size(), cell = 28, left = 110, top = 62;
    const int D = has_domains_ ? (int)domains_.size() : 0;
    const int W = std::max(left + E * cell + 160, 640);
    int H = top + (int)layers_.size() * cell + 60 + (D > 0 ? (int)layers_.size() * (D * cell + 50) : 0);
    std::string s = fmt::format("<svg xmlns='http://www.w3.org/2000/svg' width='{}' height='{}' "
                                "font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n", W, H);
    s += "<text x='10' y='20' font-size='15' font-weight='bold'>Expert load per MoE layer (% of assignments)</text>\n"
         "<text x='10' y='36' fill='#555'>colour: share / fair share, blue = under-used, white = even, red = 2x or more</text>\n";
    for (int e = 0; e < E; e++)
        s += fmt::format("<text x='{}' y='{}' text-anchor='middle'>e{}</text>\n", left + e * cell + cell / 2, top - 6, e);
    int y = top;
    for (const LayerRouting& l : layers_) {
        double total = std::accumulate(l.load.begin(), l.load.end(), 0.0);
        s += fmt::format("<text x='10' y='{}'>layer {}</text>\n", y + cell / 2 + 4, l.layer);
        for (int e = 0; e < E; e++) {
            double rel = total > 0 ? l.load[e] / total * E : 0.0;
            s += fmt::format("<rect x='{}' y='{}' width='{}' height='{}' fill='{}' stroke='#888'><title>layer {} "
                             "expert {}: {:.1f}% of assignments</title></rect>\n", left + e * cell, y, cell, cell,
                             heat(rel), l.layer, e, total > 0 ? 100 * l.load[e] / total : 0.0);
            s += fmt::format("<text x='{}' y='{}' text-anchor='middle' font-size='9'>{:.0f}</text>\n",
                             left + e * cell + cell / 2, y + cell / 2 + 3, 100 * rel / E);
        }
        s += fmt::format("<text x='{}' y='{}'>maxvio {:.2f}</text>\n", left + E * cell + 8, y + cell / 2 + 4, l.stats().maxvio);
        y += cell;
    }
    y += 40;
    for (const LayerRouting& l : layers_) {
        if (D == 0) break;
        s += fmt::format("<text x='10' y='{}' font-size='14' font-weight='bold'>layer {}: domain x expert "
                         "(specialisation {:.2f})</text>\n", y - 10, l.layer, l.specialisation());
        for (int d = 0; d < D; d++) {
            double row = std::accumulate(l.domain_expert[d].begin(), l.domain_expert[d].end(), 0.0);
            s += fmt::format("<text x='10' y='{}'>{}</text>\n", y + cell / 2 + 4, domains_[d]);
            for (int e = 0; e < E; e++) {
                double rel = row > 0 ? l.domain_expert[d][e] / row * E : 0.0;
                s += fmt::format("<rect x='{}' y='{}' width='{}' height='{}' fill='{}' stroke='#888'/>\n",
                                 left + e * cell, y, cell, cell, heat(rel));
            }
            y += cell;
        }
        y += 50;
    }
    s += "</svg>\n";
    AtomicFile f(path);
    f.write(s.data(), s.size());
    f.commit();
}

}  // namespace moe
