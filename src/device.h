/* What accelerators this build can use. With MOE_CUDA the answers come from the CUDA runtime
   (cuda/device.cu); a CPU-only build has none. */
#pragma once
#include <string>

namespace moe {
bool cuda_built();
int cuda_device_count();                 // 0 when no driver, no GPU, or a CPU-only build
std::string cuda_device_name(int index);
std::string build_info();                // one line for `moe --version`
}  // namespace moe
