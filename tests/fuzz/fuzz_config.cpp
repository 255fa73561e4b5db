/* YAML config loader: parse_config on any text. A config that loads must survive
   config_to_yaml -> parse_config unchanged (the promise checkpoints rely on). */
#include "common.h"
#include "config.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string text((const char*)data, size);
    moe::Config cfg;
    try {
        cfg = moe::parse_config(text, "fuzz.yaml");
    } catch (const moe::Error&) {
        return 0;
    }
    const std::string yaml = moe::config_to_yaml(cfg);
    std::string again;
    try {
        again = moe::config_to_yaml(moe::parse_config(yaml, "round trip"));
    } catch (const moe::Error& e) {
        std::fprintf(stderr, "%s\n--- printed config:\n%s\n", e.what(), yaml.c_str());
        moe_fuzz::invariant_failed("config_to_yaml output does not load");
    }
    if (again != yaml) {
        std::fprintf(stderr, "--- first:\n%s\n--- second:\n%s\n", yaml.c_str(), again.c_str());
        moe_fuzz::invariant_failed("config_to_yaml -> parse_config is not a fixed point");
    }
    return 0;
}
