/* Checkpoint and training-state files; see model_io.h. Both are plain safetensors: the model
   file loads in any safetensors reader with DESIGN.md's tensor names; the state file holds
   "m.<name>" / "v.<name>" tensors and its scalars as metadata strings. */
#include "model_io.h"
#include "checkpoint.h"
#include "common.h"
#include "fileio.h"

#include <algorithm>
#include <dirent.h>
#include <sys/stat.h>

namespace moe {

std::string checkpoint_path(const std::string& out_dir, int step) {
    return fmt::format("{}/model_{:08d}.safetensors", out_dir, step);
}

std::string state_path_for(const std::string& model_path) {
    const std::string ext = ".safetensors";
    std::string base = model_path;
    if (base.size() > ext.size() && base.compare(base.size() - ext.size(), ext.size(), ext) == 0)
        base.resize(base.size() - ext.size());
    return base + ".state" + ext;
}

void save_model(const std::string& path, GPT& model, const Config& cfg, int step, const std::vector<float>* host) {
    std::vector<float> w = host ? *host : model.get_weights();
    std::vector<TensorView> views;
    for (const ParamTensor& p : model.params()) views.push_back({p.name, "F32", p.shape, w.data() + p.offset});
    for (const GPT::Buffer& b : model.buffers()) views.push_back({b.name, b.dtype, b.shape, b.data});
    save_safetensors(path, views, {{"format", "moe-ckpt-1"}, {"config", config_to_yaml(cfg)},
                                   {"step", std::to_string(step)}});
}

static int parse_int_meta(const SafeTensors& st, const std::string& key) {
    std::string s = st.meta(key);
    try {
        size_t pos = 0;
        long long v = std::stoll(s, &pos);
        if (pos != s.size() || v < 0 || v > 2147483647LL) throw std::invalid_argument(s);
        return (int)v;
    } catch (const std::exception&) {
        fail("bad metadata {}='{}' ({})", key, s, st.path);
    }
}

static void check_format(const SafeTensors& st, const std::string& want) {
    if (!st.metadata.count("format") || st.metadata.at("format") != want)
        fail("not a moe {} file: metadata format is '{}', expected '{}' ({})",
             want == "moe-ckpt-1" ? "checkpoint" : "training-state",
             st.metadata.count("format") ? st.metadata.at("format") : "", want, st.path);
}

static int load_tensors(const SafeTensors& st, GPT& model) {
    check_format(st, "moe-ckpt-1");
    std::vector<float> w(model.num_params());
    for (const ParamTensor& p : model.params()) st.get(p.name, p.shape).to_f32(w.data() + p.offset);
    std::vector<GPT::Buffer> bufs = model.buffers();
    for (const GPT::Buffer& b : bufs) {
        const TensorData& t = st.get(b.name, b.shape);
        if (b.dtype == "F32") { t.to_f32((float*)b.data); continue; }
        std::vector<int32_t> v = t.i32();
        const int E = model.config().moe.experts;
        for (size_t i = 0; i < v.size(); i++)
            if (v[i] < 0 || v[i] >= E) fail("{}[{}] = {} is not an expert index in [0, {}) ({})", b.name, i, v[i], E, st.path);
        std::copy(v.begin(), v.end(), (int32_t*)b.data);
    }
    for (const auto& kv : st.tensors) {
        bool known = false;
        for (const ParamTensor& p : model.params()) known |= p.name == kv.first;
        for (const GPT::Buffer& b : bufs) known |= b.name == kv.first;
        if (!known) fail("unexpected tensor {} for this model config ({})", kv.first, st.path);
    }
    model.set_weights(w);
    return parse_int_meta(st, "step");
}

LoadedModel load_model(const std::string& path, Backend& be) {
    return load_model(path, [&be](const Config&) -> Backend& { return be; });
}

LoadedModel load_model(const std::string& path, const std::function<Backend&(const Config&)>& backend_for) {
    SafeTensors st = load_safetensors(path);
    check_format(st, "moe-ckpt-1");
    LoadedModel out;
    out.cfg = parse_config(st.meta("config"), path + " metadata");
    out.model = std::make_unique<GPT>(out.cfg, backend_for(out.cfg));
    out.step = load_tensors(st, *out.model);
    return out;
}

int load_weights_into(const std::string& path, GPT& model) {
    return load_tensors(load_safetensors(path), model);
}

void save_train_state(const std::string& path, const GPT& model, const TrainState& s) {
    std::vector<TensorView> views;
    for (const ParamTensor& p : model.params()) {
        views.push_back({"m." + p.name, "F32", p.shape, s.m.data() + p.offset});
        views.push_back({"v." + p.name, "F32", p.shape, s.v.data() + p.offset});
    }
    save_safetensors(path, views, {{"format", "moe-state-1"}, {"step", std::to_string(s.step)},
                                   {"adam_t", std::to_string(s.adam_t)}, {"rng", std::to_string(s.rng)},
                                   {"data_shard", std::to_string(s.data.shard)},
                                   {"data_offset", std::to_string(s.data.offset)}});
}

TrainState load_train_state(const std::string& path, const GPT& model) {
    SafeTensors st = load_safetensors(path);
    check_format(st, "moe-state-1");
    TrainState s;
    s.step = parse_int_meta(st, "step");
    s.adam_t = parse_int_meta(st, "adam_t");
    try {
        s.rng = std::stoull(st.meta("rng"));
        s.data.shard = std::stoull(st.meta("data_shard"));
        s.data.offset = std::stoull(st.meta("data_offset"));
    } catch (const std::invalid_argument&) {
        fail("bad metadata in training state ({})", path);
    } catch (const std::out_of_range&) {
        fail("bad metadata in training state ({})", path);
    }
    s.m.resize(model.num_params());
    s.v.resize(model.num_params());
    for (const ParamTensor& p : model.params()) {
        st.get("m." + p.name, p.shape).to_f32(s.m.data() + p.offset);
        st.get("v." + p.name, p.shape).to_f32(s.v.data() + p.offset);
    }
    return s;
}

std::string find_latest_checkpoint(const std::string& dir, bool need_state) {
    DIR* d = opendir(dir.c_str());
    if (!d) return "";
    std::vector<std::string> names;
    while (dirent* e = readdir(d)) {
        std::string n = e->d_name;
        // model_<8 digits>.safetensors exactly: temp files and state files do not qualify
        if (n.size() == 6 + 8 + 12 && n.rfind("model_", 0) == 0 && n.compare(14, 12, ".safetensors") == 0 &&
            std::all_of(n.begin() + 6, n.begin() + 14, ::isdigit))
            names.push_back(n);
    }
    closedir(d);
    std::sort(names.rbegin(), names.rend());
    for (const std::string& n : names) {
        std::string p = dir + "/" + n;
        if (!need_state || file_exists(state_path_for(p))) return p;
    }
    return "";
}

std::string resolve_checkpoint(const std::string& arg, bool need_state) {
    struct stat sb;
    if (stat(arg.c_str(), &sb) != 0) fail("checkpoint not found ({})", arg);
    if (!S_ISDIR(sb.st_mode)) return arg;
    std::string p = find_latest_checkpoint(arg, need_state);
    if (p.empty())
        fail("no {}checkpoint in directory ({})", need_state ? "complete (model + state) " : "", arg);
    return p;
}

}  // namespace moe
