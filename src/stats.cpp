/* Routing-health statistics; see stats.h. */
#include "stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace moe {

LoadStats load_stats(const std::vector<double>& load) {
    LoadStats s;
    const int E = (int)load.size();
    if (E == 0) return s;
    const double total = std::accumulate(load.begin(), load.end(), 0.0), mean = total / E;
    for (double l : load) s.dead += l == 0.0;
    if (total <= 0) { s.maxvio = 0; return s; }
    s.maxvio = *std::max_element(load.begin(), load.end()) / mean - 1.0;
    double var = 0.0, h = 0.0;
    for (double l : load) {
        var += (l - mean) * (l - mean);
        if (l > 0) h -= (l / total) * std::log(l / total);
    }
    s.cv = std::sqrt(var / E) / mean;
    s.entropy = E > 1 ? h / std::log((double)E) : 1.0;
    return s;
}

}  // namespace moe
