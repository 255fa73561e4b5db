/* safetensors files: standard layout (u64 LE header size, JSON header, raw little-endian data),
   read and written with full validation. Writes are atomic: temp file in the same directory,
   fsync, rename, fsync of the directory, so a crash never leaves a half-written file under the
   final name and never destroys an existing one. */
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace moe {

// One tensor to write; data points at numel*elem_size bytes (F32, I32: 4; BF16: 2).
struct TensorView {
    std::string name;
    std::string dtype;              // "F32" | "I32" | "BF16"
    std::vector<int64_t> shape;
    const void* data;
};

struct TensorData {
    std::string dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
    int64_t numel() const;
    // Copies into dst (numel floats); BF16 is widened. Throws if dtype is not F32/BF16.
    void to_f32(float* dst) const;
    std::vector<float> f32() const;
    std::vector<int32_t> i32() const;  // throws unless I32
};

struct SafeTensors {
    std::string path;
    std::map<std::string, std::string> metadata;
    std::map<std::string, TensorData> tensors;
    bool has(const std::string& name) const { return tensors.count(name) != 0; }
    // Throws "missing tensor <name> (<path>)" / "tensor <name> has shape [..], expected [..] (<path>)".
    const TensorData& get(const std::string& name, const std::vector<int64_t>& expect_shape = {}) const;
    std::string meta(const std::string& key) const;  // throws if missing
};

void save_safetensors(const std::string& path, const std::vector<TensorView>& tensors,
                      const std::map<std::string, std::string>& metadata);
// Validates: file size >= 8, header length sane and within file, JSON parses, every entry
// has dtype/shape/data_offsets consistent with each other and the file size, offsets do not
// overlap or exceed the data section. Any problem -> moe::Error naming the file.
SafeTensors load_safetensors(const std::string& path);
// The same reader over bytes in memory (the whole file); `name` stands in for the path in
// errors. load_safetensors streams the file through the same code (tests/fuzz fuzzes this one).
SafeTensors parse_safetensors(const std::string& bytes, const std::string& name);

}  // namespace moe
