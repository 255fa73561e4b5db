/* Device discovery through the CUDA runtime, compiled when nvcc is present (MOE_CUDA). A machine
   without a driver or GPU reports zero devices instead of failing. */
#include "device.h"

#include <cuda_runtime.h>

namespace moe {

bool cuda_built() { return true; }

int cuda_device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no driver" error
        return 0;
    }
    return n;
}

std::string cuda_device_name(int index) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, index) != cudaSuccess) return "unknown";
    return prop.name;
}

}  // namespace moe
