/* safetensors read/write (see checkpoint.h and DESIGN.md "Checkpoint: safetensors").

   Layout: u64 little-endian N, then N bytes of JSON header, then the data section.
     {"__metadata__": {"k": "v", ...},
      "<name>": {"dtype": "F32", "shape": [d0, d1], "data_offsets": [begin, end]}, ...}
   Offsets are relative to the data section. We write tensors contiguously in the order given
   and pad the header with spaces to a multiple of 8 so the data starts 8-byte aligned, as the
   reference implementation does.

   A checkpoint is untrusted input (truncated by a full disk, copied half-way, hand-edited), so
   loading validates every field before allocating anything sized by it: no header or tensor
   buffer is ever larger than the file itself. The rules match the reference reader: tensors
   must tile the data section exactly (no overlap, no gap, no trailing bytes). */
#include "checkpoint.h"
#include "common.h"
#include "fileio.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <set>
#include <sys/stat.h>

#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

namespace moe {

// Tensor bytes go to and from memory as-is; the format is little-endian.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes a little-endian host");

namespace {

// Same cap as the reference implementation: a real header is a few KB per hundred tensors.
constexpr uint64_t kMaxHeader = 100u * 1000u * 1000u;

int64_t elem_size(const std::string& dtype) {
    if (dtype == "F32" || dtype == "I32") return 4;
    if (dtype == "BF16") return 2;
    return 0;  // unknown
}

std::string shape_str(const std::vector<int64_t>& shape) {
    return fmt::format("[{}]", fmt::join(shape, ", "));
}

// numel * elem_size of a validated (non-negative) shape, or -1 if it does not fit in int64.
int64_t nbytes_of(const std::vector<int64_t>& shape, int64_t esize) {
    for (int64_t d : shape)
        if (d == 0) return 0;  // before multiplying: [2^40, 2^40, 0] is a valid empty tensor
    int64_t n = esize;
    for (int64_t d : shape) {
        if (n > std::numeric_limits<int64_t>::max() / d) return -1;
        n *= d;
    }
    return n;
}

struct FileCloser {
    void operator()(FILE* f) const { std::fclose(f); }
};

// One header entry after validation, before its bytes are read.
struct Entry {
    std::string name;
    uint64_t begin, end;
};

}  // namespace

int64_t TensorData::numel() const {
    // a zero dimension first: [2^40, 2^40, 0] is a valid empty tensor whose running product
    // would overflow (fuzzing found it; the loader bounds every non-empty shape by the file size)
    for (int64_t d : shape)
        if (d == 0) return 0;
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
}

void TensorData::to_f32(float* dst) const {
    int64_t n = numel();
    if (dtype == "F32" && (int64_t)bytes.size() == n * 4) {
        if (n) std::memcpy(dst, bytes.data(), n * 4);
    } else if (dtype == "BF16" && (int64_t)bytes.size() == n * 2) {
        // bf16 is the top half of an f32: widening is exact.
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            std::memcpy(&h, bytes.data() + 2 * i, 2);
            uint32_t u = (uint32_t)h << 16;
            std::memcpy(dst + i, &u, 4);
        }
    } else if (dtype != "F32" && dtype != "BF16") {
        fail("tensor has dtype {}, expected F32 or BF16", dtype);
    } else {
        fail("{} tensor of shape {} holds {} bytes", dtype, shape_str(shape), bytes.size());
    }
}

std::vector<float> TensorData::f32() const {
    std::vector<float> out(numel());
    to_f32(out.data());
    return out;
}

std::vector<int32_t> TensorData::i32() const {
    if (dtype != "I32") fail("tensor has dtype {}, expected I32", dtype);
    int64_t n = numel();
    if ((int64_t)bytes.size() != n * 4)
        fail("I32 tensor of shape {} holds {} bytes", shape_str(shape), bytes.size());
    std::vector<int32_t> out(n);
    if (n) std::memcpy(out.data(), bytes.data(), n * 4);
    return out;
}

const TensorData& SafeTensors::get(const std::string& name, const std::vector<int64_t>& expect_shape) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) fail("missing tensor {} ({})", name, path);
    if (!expect_shape.empty() && it->second.shape != expect_shape)
        fail("tensor {} has shape {}, expected {} ({})", name, shape_str(it->second.shape),
             shape_str(expect_shape), path);
    return it->second;
}

std::string SafeTensors::meta(const std::string& key) const {
    auto it = metadata.find(key);
    if (it == metadata.end()) fail("missing metadata {} ({})", key, path);
    return it->second;
}

void save_safetensors(const std::string& path, const std::vector<TensorView>& tensors,
                      const std::map<std::string, std::string>& metadata) {
    // ordered_json keeps insertion order, so the header lists tensors in data order.
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata.empty()) header["__metadata__"] = metadata;
    std::set<std::string> seen;
    std::vector<int64_t> sizes;
    uint64_t offset = 0;
    for (const TensorView& t : tensors) {
        int64_t esize = elem_size(t.dtype);
        if (esize == 0) fail("cannot save {}: tensor {} has unknown dtype '{}'", path, t.name, t.dtype);
        if (t.name.empty() || t.name == "__metadata__")
            fail("cannot save {}: invalid tensor name '{}'", path, t.name);
        if (!seen.insert(t.name).second) fail("cannot save {}: duplicate tensor {}", path, t.name);
        for (int64_t d : t.shape)
            if (d < 0) fail("cannot save {}: tensor {} has shape {}", path, t.name, shape_str(t.shape));
        int64_t nb = nbytes_of(t.shape, esize);
        if (nb < 0) fail("cannot save {}: tensor {} of shape {} is too large", path, t.name, shape_str(t.shape));
        if (nb > 0 && !t.data) fail("cannot save {}: tensor {} has no data", path, t.name);
        header[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {offset, offset + nb}}};
        sizes.push_back(nb);
        offset += nb;
    }
    std::string text;
    try {
        text = header.dump();
    } catch (const nlohmann::json::exception& e) {  // e.g. a name that is not valid UTF-8
        fail("cannot save {}: {}", path, e.what());
    }
    text.append((8 - text.size() % 8) % 8, ' ');

    uint8_t len[8];
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)((uint64_t)text.size() >> (8 * i));
    AtomicFile f(path);
    f.write(len, 8);
    f.write(text.data(), text.size());
    for (size_t i = 0; i < tensors.size(); i++) f.write(tensors[i].data, (size_t)sizes[i]);
    f.commit();
}

namespace {

// Copies the next n bytes of the source into dst; throws "truncated checkpoint" when it ends early.
using ReadExact = std::function<void(void* dst, uint64_t n, const char* what)>;

// The whole reader over a source of `file_size` bytes read front to back: a file
// (load_safetensors, straight into the tensor buffers) or bytes in memory (parse_safetensors,
// the fuzzing entry point). One code path, so the fuzzer checks exactly what loads checkpoints.
SafeTensors parse_source(uint64_t file_size, const ReadExact& read_exact, const std::string& path) {
    // Every load error names the file the same way: "<what> (<path>: <detail>)".
    auto corrupt = [&](const std::string& detail) -> Error {
        return Error(fmt::format("corrupt checkpoint ({}: {})", path, detail));
    };

    if (file_size < 8)
        fail("truncated checkpoint ({}: file is {} bytes, shorter than the 8-byte header length)", path, file_size);
    uint8_t len[8];
    read_exact(len, 8, "header length");
    uint64_t hlen = 0;
    for (int i = 0; i < 8; i++) hlen |= (uint64_t)len[i] << (8 * i);
    if (hlen == 0) throw corrupt("header length is 0");
    if (hlen > kMaxHeader) throw corrupt(fmt::format("header length {} exceeds the {} byte limit", hlen, kMaxHeader));
    if (hlen > file_size - 8)
        fail("truncated checkpoint ({}: header length {} but only {} bytes follow)", path, hlen, file_size - 8);
    std::string text(hlen, '\0');
    read_exact(&text[0], hlen, "header");
    uint64_t data_size = file_size - 8 - hlen;

    nlohmann::json header;
    try {
        header = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
        throw corrupt(fmt::format("header is not valid JSON: {}", e.what()));
    }
    if (!header.is_object()) throw corrupt("header is not a JSON object");

    SafeTensors st_out;
    st_out.path = path;
    std::vector<Entry> entries;
    for (auto& item : header.items()) {
        // plain references, not a structured binding: lambdas below capture `name` (C++17)
        const std::string& name = item.key();
        const nlohmann::json& v = item.value();
        if (name == "__metadata__") {
            if (!v.is_object()) throw corrupt("__metadata__ is not an object");
            for (auto& [k, mv] : v.items()) {
                if (!mv.is_string()) throw corrupt(fmt::format("metadata {} is not a string", k));
                st_out.metadata[k] = mv.get<std::string>();
            }
            continue;
        }
        auto bad = [&](const std::string& why) { return corrupt(fmt::format("tensor {}: {}", name, why)); };
        if (!v.is_object()) throw bad("entry is not an object");
        for (const char* key : {"dtype", "shape", "data_offsets"})
            if (!v.contains(key)) throw bad(fmt::format("missing {}", key));
        const auto& jd = v.at("dtype");
        const auto& js = v.at("shape");
        const auto& jo = v.at("data_offsets");
        if (!jd.is_string()) throw bad("dtype is not a string");
        TensorData td;
        td.dtype = jd.get<std::string>();
        int64_t esize = elem_size(td.dtype);
        if (esize == 0) throw bad(fmt::format("unknown dtype '{}'", td.dtype));
        if (!js.is_array()) throw bad("shape is not an array");
        for (const auto& d : js) {
            // nlohmann stores non-negative integers as unsigned, negative ones as signed.
            if (!d.is_number_integer()) throw bad("shape holds a non-integer");
            if (d.is_number_unsigned() ? d.get<uint64_t>() > (uint64_t)std::numeric_limits<int64_t>::max()
                                       : d.get<int64_t>() < 0)
                throw bad(fmt::format("invalid dimension {}", d.dump()));
            td.shape.push_back(d.get<int64_t>());
        }
        if (!jo.is_array() || jo.size() != 2 || !jo[0].is_number_unsigned() || !jo[1].is_number_unsigned())
            throw bad("data_offsets is not [begin, end] with non-negative integers");
        uint64_t begin = jo[0].get<uint64_t>(), end = jo[1].get<uint64_t>();
        if (begin > end) throw bad(fmt::format("data_offsets [{}, {}] end before they begin", begin, end));
        int64_t nb = nbytes_of(td.shape, esize);
        if (nb < 0) throw bad(fmt::format("shape {} is too large", shape_str(td.shape)));
        if ((uint64_t)nb != end - begin)
            throw bad(fmt::format("{} shape {} needs {} bytes but data_offsets [{}, {}] span {}", td.dtype,
                                  shape_str(td.shape), nb, begin, end, end - begin));
        entries.push_back({name, begin, end});
        st_out.tensors.emplace(name, std::move(td));
    }

    // The data section must be exactly the tensors laid end to end.
    uint64_t max_end = 0;
    for (const Entry& e : entries) max_end = std::max(max_end, e.end);
    if (data_size < max_end)
        fail("truncated checkpoint ({}: data section holds {} bytes, header needs {})", path, data_size, max_end);
    if (data_size > max_end)
        throw corrupt(fmt::format("data section holds {} bytes, header needs {} (trailing bytes)", data_size, max_end));
    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
        return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    uint64_t pos = 0;
    for (const Entry& e : entries) {
        if (e.begin < pos) throw corrupt(fmt::format("tensor {} overlaps the previous tensor", e.name));
        if (e.begin > pos) throw corrupt(fmt::format("gap of {} bytes before tensor {}", e.begin - pos, e.name));
        pos = e.end;
    }

    // Everything checked: one sequential pass straight into each tensor's buffer.
    for (const Entry& e : entries) {
        TensorData& td = st_out.tensors[e.name];
        td.bytes.resize(e.end - e.begin);
        read_exact(td.bytes.data(), td.bytes.size(), e.name.c_str());
    }
    return st_out;
}

}  // namespace

SafeTensors parse_safetensors(const std::string& bytes, const std::string& name) {
    uint64_t pos = 0;
    return parse_source(bytes.size(), [&](void* dst, uint64_t n, const char* what) {
        if (n > bytes.size() - pos) fail("truncated checkpoint ({}: short read of {})", name, what);
        if (n) std::memcpy(dst, bytes.data() + pos, n);
        pos += n;
    }, name);
}

SafeTensors load_safetensors(const std::string& path) {
    std::unique_ptr<FILE, FileCloser> f(std::fopen(path.c_str(), "rb"));
    if (!f) fail("cannot read checkpoint ({}: {})", path, std::strerror(errno));
    struct stat st;
    if (fstat(fileno(f.get()), &st) != 0) fail("cannot read checkpoint ({}: {})", path, std::strerror(errno));
    if (!S_ISREG(st.st_mode)) fail("cannot read checkpoint ({}: not a regular file)", path);
    // Short reads after validation mean the file shrank under us: report it as truncation.
    return parse_source((uint64_t)st.st_size, [&](void* dst, uint64_t n, const char* what) {
        if (n && std::fread(dst, 1, n, f.get()) != n)
            fail("truncated checkpoint ({}: short read of {})", path, what);
    }, path);
}

}  // namespace moe
