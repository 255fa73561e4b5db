/* Dense weights for `moe upcycle` (src/llmc_import.cpp): read_dense_weights on any file, which
   dispatches on the first bytes to the llm.c GPT-2 reader or our safetensors dense reader. */
#include "common.h"
#include "fuzz_util.h"
#include "llmc_import.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string bytes((const char*)data, size);
    try {
        moe::DenseWeights d = moe::read_dense_weights(moe_fuzz::as_file(bytes));
        // what loaded must be the model its dims describe
        for (const auto& [name, shape] : moe::dense_tensor_shapes(d.dims)) {
            int64_t n = 1;
            for (int64_t s : shape) n *= s;
            if ((int64_t)d.get(name).size() != n) moe_fuzz::invariant_failed("tensor size does not match dims");
        }
    } catch (const moe::Error&) {
    }
    return 0;
}
