/* safetensors reader: parse_safetensors (bytes in memory) on any input, every accessor of what
   it returns, and load_safetensors on the same bytes as a file must agree with it. */
#include "checkpoint.h"
#include "common.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string bytes((const char*)data, size);
    std::string mem_error, file_error;
    moe::SafeTensors mem, file;
    try {
        mem = moe::parse_safetensors(bytes, "fuzz.safetensors");
    } catch (const moe::Error& e) {
        mem_error = e.what();
    }
    try {
        file = moe::load_safetensors(moe_fuzz::as_file(bytes));
    } catch (const moe::Error& e) {
        file_error = e.what();
    }
    if (mem_error.empty() != file_error.empty()) moe_fuzz::invariant_failed("file and memory readers disagree");
    if (!mem_error.empty()) return 0;
    if (mem.metadata != file.metadata || mem.tensors.size() != file.tensors.size())
        moe_fuzz::invariant_failed("file and memory readers return different headers");
    for (const auto& [name, t] : mem.tensors) {
        const moe::TensorData& u = file.tensors.at(name);
        if (t.dtype != u.dtype || t.shape != u.shape || t.bytes != u.bytes)
            moe_fuzz::invariant_failed("file and memory readers return different tensors");
        int64_t n = t.numel();
        if (n < 0) moe_fuzz::invariant_failed("negative numel");
        try {
            std::vector<float> f = t.f32();
            if ((int64_t)f.size() != n) moe_fuzz::invariant_failed("f32() size");
        } catch (const moe::Error&) {
        }
        try {
            std::vector<int32_t> i = t.i32();
            if ((int64_t)i.size() != n) moe_fuzz::invariant_failed("i32() size");
        } catch (const moe::Error&) {
        }
        try {
            mem.get(name, t.shape);
            mem.get(name, {1, 2, 3});
        } catch (const moe::Error&) {
        }
    }
    try {
        mem.meta("step");
    } catch (const moe::Error&) {
    }
    return 0;
}
