/* Basics shared by every file: the user-facing error, a deterministic RNG, small helpers.
   Every problem a user can fix (bad config, data, checkpoint, argument) is thrown as moe::Error
   whose message already says where ("... (file:line)"); main() prints "error: <msg>" and exits 1. */
#pragma once
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <fmt/format.h>

namespace moe {

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

template <typename... Args>
[[noreturn]] inline void fail(fmt::format_string<Args...> f, Args&&... args) {
    throw Error(fmt::format(f, std::forward<Args>(args)...));
}

// xorshift64* with Box-Muller normals: tiny, fully deterministic across compilers (unlike
// std::normal_distribution), and its whole state is one integer, so checkpoints can save it.
struct Rng {
    uint64_t state;
    explicit Rng(uint64_t seed = 1337) : state(seed ? seed : 0x9E3779B97F4A7C15ull) {}
    uint64_t next_u64() {
        state ^= state >> 12; state ^= state << 25; state ^= state >> 27;
        return state * 0x2545F4914F6CDD1Dull;
    }
    uint32_t next_u32() { return (uint32_t)(next_u64() >> 32); }
    float uniform() { return (next_u64() >> 40) * (1.0f / 16777216.0f); }  // [0, 1)
    float normal() {
        float u1 = uniform(), u2 = uniform();
        if (u1 < 1e-7f) u1 = 1e-7f;
        return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.2831853071795864769f * u2);
    }
};

}  // namespace moe
