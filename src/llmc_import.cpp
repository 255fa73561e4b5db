/* Dense weights from our safetensors checkpoints or llm.c's GPT-2 .bin files; see llmc_import.h.
   The llm.c layout (train_gpt2.c, gpt2_build_from_checkpoint): header int32[256] with
   [0]=20240326 [1]=version [2]=maxT [3]=V [4]=L [5]=NH [6]=C [7]=Vp, then 16 tensors, each stacked
   over the L layers, every weight (out, in) like ours, so a layer's slice copies straight over. */
#include "llmc_import.h"
#include "checkpoint.h"
#include "common.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <sys/stat.h>

namespace moe {

const std::vector<float>& DenseWeights::get(const std::string& name) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) fail("dense model has no tensor {} ({})", name, path);
    return it->second;
}

size_t DenseWeights::num_params() const {
    size_t n = 0;
    for (const auto& kv : tensors) n += kv.second.size();
    return n;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> dense_tensor_shapes(const ModelConfig& m) {
    const int64_t V = m.vocab_size, T = m.seq_len, C = m.d_model, F = m.d_ff;
    std::vector<std::pair<std::string, std::vector<int64_t>>> out = {{"wte", {V, C}}, {"wpe", {T, C}}};
    for (int l = 0; l < m.n_layer; l++) {
        const std::string p = "h." + std::to_string(l) + ".";
        out.push_back({p + "ln_1.weight", {C}});
        out.push_back({p + "ln_1.bias", {C}});
        out.push_back({p + "attn.c_attn.weight", {3 * C, C}});
        out.push_back({p + "attn.c_attn.bias", {3 * C}});
        out.push_back({p + "attn.c_proj.weight", {C, C}});
        out.push_back({p + "attn.c_proj.bias", {C}});
        out.push_back({p + "ln_2.weight", {C}});
        out.push_back({p + "ln_2.bias", {C}});
        out.push_back({p + "mlp.c_fc.weight", {F, C}});
        out.push_back({p + "mlp.c_fc.bias", {F}});
        out.push_back({p + "mlp.c_proj.weight", {C, F}});
        out.push_back({p + "mlp.c_proj.bias", {C}});
    }
    out.push_back({"ln_f.weight", {C}});
    out.push_back({"ln_f.bias", {C}});
    return out;
}

namespace {

struct FileCloser { void operator()(FILE* f) const { std::fclose(f); } };
using File = std::unique_ptr<FILE, FileCloser>;

File open_or_fail(const std::string& path) {
    File f(std::fopen(path.c_str(), "rb"));
    if (!f) fail("cannot read dense checkpoint ({}: {})", path, std::strerror(errno));
    struct stat sb;
    if (fstat(fileno(f.get()), &sb) == 0 && S_ISDIR(sb.st_mode))
        fail("dense checkpoint is a directory; give a model file ({})", path);
    return f;
}

uint64_t file_size(FILE* f) {
    struct stat sb;
    return fstat(fileno(f), &sb) == 0 ? (uint64_t)sb.st_size : 0;
}

DenseWeights read_moe_dense(const std::string& path) {
    SafeTensors st = load_safetensors(path);
    if (!st.metadata.count("format") || st.metadata.at("format") != "moe-ckpt-1")
        fail("safetensors file is not a moe checkpoint (metadata format '{}', expected 'moe-ckpt-1') ({})",
             st.metadata.count("format") ? st.metadata.at("format") : "", path);
    Config cfg = parse_config(st.meta("config"), path + " metadata");
    if (cfg.model.moe.enabled)
        fail("{} is already an MoE checkpoint (it has a model.moe block); upcycle starts from a dense model",
             path);
    DenseWeights d;
    d.path = path;
    d.format = "moe safetensors, step " + st.meta("step");
    d.dims = cfg.model;
    d.padded_vocab = cfg.model.vocab_size;
    for (const auto& [name, shape] : dense_tensor_shapes(d.dims)) d.tensors[name] = st.get(name, shape).f32();
    for (const auto& kv : st.tensors)
        if (!d.tensors.count(kv.first)) fail("unexpected tensor {} in a dense checkpoint ({})", kv.first, path);
    return d;
}

}  // namespace

DenseWeights read_llmc_checkpoint(const std::string& path) {
    File f = open_or_fail(path);
    const uint64_t size = file_size(f.get());
    int32_t h[256];
    if (size < sizeof h || std::fread(h, sizeof(int32_t), 256, f.get()) != 256)
        fail("llm.c checkpoint truncated: {} bytes, shorter than its 1024-byte header ({})", size, path);
    if (h[0] != kLlmcMagic) fail("bad llm.c checkpoint magic {}, expected {} ({})", h[0], kLlmcMagic, path);
    if (h[1] != 3 && h[1] != 5)
        fail("llm.c checkpoint version {} is not supported: 3 (fp32) or 5 (bf16) ({})", h[1], path);
    const bool bf16 = h[1] == 5;
    const int maxT = h[2], V = h[3], L = h[4], NH = h[5], C = h[6], Vp = h[7];
    // sane ranges first, so that the sizes below cannot overflow
    auto in = [](int v, int lo, int hi) { return v >= lo && v <= hi; };
    if (!in(maxT, 1, 1 << 20) || !in(V, 2, 65536) || !in(L, 1, 4096) || !in(NH, 1, 1 << 16) ||
        !in(C, 1, 1 << 16) || !in(Vp, V, 1 << 20) || C % NH != 0)
        fail("llm.c checkpoint header is inconsistent: maxT {} V {} L {} n_head {} C {} padded V {} ({})", maxT, V,
             L, NH, C, Vp, path);

    DenseWeights d;
    d.path = path;
    d.format = bf16 ? "llm.c GPT-2 bf16 (version 5)" : "llm.c GPT-2 fp32 (version 3)";
    d.dims.vocab_size = V;
    d.dims.seq_len = maxT;
    d.dims.n_layer = L;
    d.dims.n_head = NH;
    d.dims.d_model = C;
    d.dims.d_ff = 4 * C;     // GPT-2's MLP; llm.c has no key for it
    d.padded_vocab = Vp;

    // the 16 stacked tensors in file order: (llm.c name, our name suffix, per-layer numel)
    const uint64_t c = C, L64 = L;
    struct Stacked { const char* name; const char* ours; uint64_t per_layer; };
    const Stacked layered[] = {
        {"ln1w", "ln_1.weight", c}, {"ln1b", "ln_1.bias", c},
        {"qkvw", "attn.c_attn.weight", 3 * c * c}, {"qkvb", "attn.c_attn.bias", 3 * c},
        {"attprojw", "attn.c_proj.weight", c * c}, {"attprojb", "attn.c_proj.bias", c},
        {"ln2w", "ln_2.weight", c}, {"ln2b", "ln_2.bias", c},
        {"fcw", "mlp.c_fc.weight", 4 * c * c}, {"fcb", "mlp.c_fc.bias", 4 * c},
        {"fcprojw", "mlp.c_proj.weight", 4 * c * c}, {"fcprojb", "mlp.c_proj.bias", c},
    };
    uint64_t total = (uint64_t)Vp * c + (uint64_t)maxT * c + 2 * c;
    for (const Stacked& s : layered) total += L64 * s.per_layer;
    const uint64_t elem = bf16 ? 2 : 4, want = 1024 + total * elem;
    if (size < want)
        fail("llm.c checkpoint truncated: {} bytes, the header (L {}, C {}, padded V {}, maxT {}) needs {} ({})",
             size, L, C, Vp, maxT, want, path);
    if (size > want) fail("llm.c checkpoint has {} bytes after its parameters; expected {} bytes in all ({})",
                          size - want, want, path);

    // one tensor at a time, so the peak is one stacked tensor beyond the result
    std::vector<uint16_t> raw16;
    auto read = [&](uint64_t n, const char* what) {
        std::vector<float> out(n);
        size_t got;
        if (bf16) {
            raw16.resize(n);
            got = std::fread(raw16.data(), 2, n, f.get());
            for (uint64_t i = 0; i < n; i++) {
                uint32_t bits = (uint32_t)raw16[i] << 16;   // bf16 is the top half of an fp32
                std::memcpy(&out[i], &bits, 4);
            }
        } else {
            got = std::fread(out.data(), 4, n, f.get());
        }
        if (got != n) fail("llm.c checkpoint: short read in {} ({})", what, path);
        return out;
    };
    std::vector<float> wte = read((uint64_t)Vp * c, "wte");
    wte.resize((size_t)V * C);     // rows [V, Vp) are llm.c's padding, never a real token
    d.tensors["wte"] = std::move(wte);
    d.tensors["wpe"] = read((uint64_t)maxT * c, "wpe");   // (maxT, C)
    for (const Stacked& s : layered) {
        std::vector<float> all = read(L64 * s.per_layer, s.name);   // (L, per_layer)
        for (int l = 0; l < L; l++)
            d.tensors["h." + std::to_string(l) + "." + s.ours] =
                std::vector<float>(all.begin() + l * s.per_layer, all.begin() + (l + 1) * s.per_layer);
    }
    d.tensors["ln_f.weight"] = read(c, "lnfw");
    d.tensors["ln_f.bias"] = read(c, "lnfb");
    return d;
}

DenseWeights read_dense_weights(const std::string& path) {
    uint8_t head[9] = {0};
    size_t n;
    {
        File f = open_or_fail(path);
        n = std::fread(head, 1, sizeof head, f.get());
    }
    int32_t magic;
    std::memcpy(&magic, head, 4);
    if (n >= 4 && magic == kLlmcMagic) return read_llmc_checkpoint(path);
    // safetensors: u64 LE header length, then the JSON header, which opens with '{' (a truncated
    // one is still recognised here, and load_safetensors says what is wrong with it)
    if (n == sizeof head && head[8] == '{') return read_moe_dense(path);
    fail("not a dense checkpoint: neither safetensors (8-byte header length, then '{{') nor llm.c GPT-2 "
         "(magic {}) ({})", kLlmcMagic, path);
}

}  // namespace moe
