/* `make bench` part 2: GFLOPS of the CPU GEMM engine (src/gemm_cpu.cpp) on one thread, for the
   three products of a linear layer (forward out = inp W^T, dinp = dout W, dweight = dout^T inp) on
   the shapes of the benchmark models. Best of 30 runs each: the machine's other load only makes
   runs slower, never faster. Compare with one core's FMA peak: 2 x VL lanes x FMA units x GHz. */
#include "ops_cpu.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>

using namespace moe;

int main() {
    omp_set_num_threads(1);
    struct Shape { int N, C, OC; const char* what; };
    const Shape shapes[] = {
        {2048, 128, 384, "quickstart qkv"},        {512, 128, 256, "quickstart expert c_fc (512 rows)"},
        {512, 256, 128, "quickstart expert c_proj"}, {2048, 256, 768, "cpu_large qkv"},
        {256, 256, 512, "cpu_large expert c_fc (256 rows)"}, {256, 512, 256, "cpu_large expert c_proj"},
        {2048, 128, 256, "quickstart lm head (V 256)"},
    };
    std::mt19937 g(1);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    std::printf("| shape (rows N, in C, out OC) | layer | forward GFLOPS | dinp GFLOPS | dweight GFLOPS |\n");
    std::printf("|---|---|---:|---:|---:|\n");
    for (const Shape& s : shapes) {
        std::vector<float> x((size_t)s.N * s.C), w((size_t)s.OC * s.C), out((size_t)s.N * s.OC), dx(x.size()),
            dw(w.size());
        for (auto* v : {&x, &w, &out})
            for (float& f : *v) f = u(g);
        const double flops = 2.0 * s.N * s.C * s.OC;
        double best[3] = {1e30, 1e30, 1e30};
        for (int rep = 0; rep < 30; rep++) {
            using clk = std::chrono::steady_clock;
            const auto t0 = clk::now();
            matmul_forward(out.data(), x.data(), w.data(), nullptr, s.N, s.C, s.OC);
            const auto t1 = clk::now();
            matmul_backward(dx.data(), nullptr, nullptr, out.data(), x.data(), w.data(), s.N, s.C, s.OC);
            const auto t2 = clk::now();
            matmul_backward(nullptr, dw.data(), nullptr, out.data(), x.data(), w.data(), s.N, s.C, s.OC);
            const auto t3 = clk::now();
            const std::chrono::duration<double> d[3] = {t1 - t0, t2 - t1, t3 - t2};
            for (int i = 0; i < 3; i++) best[i] = std::min(best[i], d[i].count());
            std::fill(dx.begin(), dx.end(), 0.0f);  // the backward accumulates: keep values bounded
            std::fill(dw.begin(), dw.end(), 0.0f);
        }
        std::printf("| %d x %d -> %d | %s | %.1f | %.1f | %.1f |\n", s.N, s.C, s.OC, s.what, flops / best[0] * 1e-9,
                    flops / best[1] * 1e-9, flops / best[2] * 1e-9);
    }
    return 0;
}
