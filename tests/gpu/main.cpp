/* Entry point of build/test_gpu (`make test-gpu`, docs/gpu-testing.md): the doctest runner of
   the tests/gpu sources. `test_gpu --probe` only says whether the GPU tests can run: exit 0 with the
   GPU's name when this build has CUDA and a GPU is visible, else exit 3 with the reason (the
   Makefile prints it as "test-gpu: skipped (...)"). */
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "device.h"

#include <cstdio>
#include <cstring>

int main(int argc, char** argv) {
    if (argc == 2 && std::strcmp(argv[1], "--probe") == 0) {
        if (!moe::cuda_built()) {
            std::printf("this build has no CUDA: nvcc not found\n");
            return 3;
        }
        const int n = moe::cuda_device_count();
        if (n == 0) {
            std::printf("no CUDA GPU visible\n");
            return 3;
        }
        std::printf("%d GPU(s), running on GPU 0: %s\n", n, moe::cuda_device_name(0).c_str());
        return 0;
    }
    doctest::Context ctx(argc, argv);
    return ctx.run();
}
