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
    moe_fuzz::check_config_round_trip(cfg);
    return 0;
}
