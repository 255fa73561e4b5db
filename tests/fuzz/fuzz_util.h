/* Shared by the libFuzzer targets (see docs/hardening.md "Fuzzing"). Every target checks one
   invariant: any input either parses or throws moe::Error. Any other exception escapes
   LLVMFuzzerTestOneInput, std::terminate aborts, and libFuzzer records the input as a crash;
   so do ASan/UBSan reports, leaks, and allocations over -malloc_limit_mb. */
#pragma once
#include "common.h"
#include "config.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <sys/mman.h>
#include <unistd.h>

namespace moe_fuzz {

// A path whose file holds exactly `bytes`: an anonymous in-memory file (memfd) reached through
// /proc/self/fd, so the file readers run unchanged without touching the disk.
inline std::string as_file(const std::string& bytes) {
    static int fd = -1;
    if (fd < 0) {
        fd = memfd_create("moe-fuzz", 0);
        if (fd < 0) { std::perror("memfd_create"); std::abort(); }
    }
    if (ftruncate(fd, 0) != 0 || pwrite(fd, bytes.data(), bytes.size(), 0) != (ssize_t)bytes.size()) {
        std::perror("memfd write");
        std::abort();
    }
    return "/proc/self/fd/" + std::to_string(fd);
}

// A broken invariant that is not a crash by itself (two readers disagree, a round trip differs).
[[noreturn]] inline void invariant_failed(const char* what) {
    std::fprintf(stderr, "fuzz invariant failed: %s\n", what);
    std::abort();
}

// The promise checkpoints rely on: a config that loaded survives config_to_yaml -> parse_config
// unchanged (the printed text loads, and printing it again gives the same text).
inline void check_config_round_trip(const moe::Config& cfg) {
    const std::string yaml = moe::config_to_yaml(cfg);
    std::string again;
    try {
        again = moe::config_to_yaml(moe::parse_config(yaml, "round trip"));
    } catch (const moe::Error& e) {
        std::fprintf(stderr, "%s\n--- printed config:\n%s\n", e.what(), yaml.c_str());
        invariant_failed("config_to_yaml output does not load");
    }
    if (again != yaml) {
        std::fprintf(stderr, "--- first:\n%s\n--- second:\n%s\n", yaml.c_str(), again.c_str());
        invariant_failed("config_to_yaml -> parse_config is not a fixed point");
    }
}

}  // namespace moe_fuzz
