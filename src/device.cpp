/* Build information and the CPU-only answers of device.h (cuda/device.cu answers with CUDA). */
#include "device.h"
#include "backend.h"
#include "common.h"

#include <fmt/format.h>
#include <omp.h>

namespace moe {

#ifndef MOE_CUDA
bool cuda_built() { return false; }
int cuda_device_count() { return 0; }
std::string cuda_device_name(int) { return ""; }
std::unique_ptr<Backend> make_cuda_backend(int, bool) {
    fail("train.device is cuda, but this build has no CUDA (nvcc was not found when it was built)");
}
#endif

std::string build_info() {
    std::string s = fmt::format("moe 0.1.0 | CPU: OpenMP, {} threads | CUDA: ", omp_get_max_threads());
    if (!cuda_built()) return s + "not built (no nvcc at build time)";
    int n = cuda_device_count();
    s += fmt::format("built for sm_80, sm_90 | {} GPU(s) visible", n);
    for (int i = 0; i < n; i++) s += (i ? ", " : ": ") + cuda_device_name(i);
    return s;
}

}  // namespace moe
