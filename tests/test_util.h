/* Helpers shared by the tests: temp directories, running the moe binary (and the error contract
   of a failing command), tiny token shards. */
#pragma once
#include "data.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <sys/wait.h>
#include <vector>

namespace moe_test {

struct TempDir {
    std::string path;
    TempDir() {
        char tmpl[] = "/tmp/moe_test_XXXXXX";
        path = mkdtemp(tmpl);
    }
    ~TempDir() { std::system(("rm -rf '" + path + "'").c_str()); }
    std::string operator/(const std::string& name) const { return path + "/" + name; }
};

struct RunResult {
    int status = -1;        // exit status, or -signal if killed by a signal
    std::string output;     // stdout + stderr
};

// Runs a shell command, capturing both streams.
inline RunResult run(const std::string& cmd) {
    RunResult r;
    FILE* p = popen((cmd + " 2>&1").c_str(), "r");
    if (!p) return r;
    std::array<char, 4096> buf;
    size_t n;
    while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.output.append(buf.data(), n);
    int st = pclose(p);
    r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
    return r;
}

// Runs a moe command that must fail as a user error: exit status `status`, an `error: ` line,
// and no crash (no uncaught exception, assertion or sanitizer report). Returns the output.
inline std::string expect_cli_error(const std::string& cmd, int status = 1) {
    RunResult r = run(cmd);
    INFO("command: " << cmd << "\noutput:\n" << r.output);
    CHECK(r.status == status);
    CHECK(r.output.find("error: ") != std::string::npos);
    CHECK(r.output.find("terminate called") == std::string::npos);
    CHECK(r.output.find("Assertion") == std::string::npos);
    CHECK(r.output.find("Sanitizer") == std::string::npos);
    return r.output;
}

inline std::string moe_bin() {
    const char* b = std::getenv("MOE_BIN");
    return b ? b : "build/moe";
}
inline std::string python_bin() {
    const char* p = std::getenv("PYTHON");
    return p ? p : "/usr/bin/python3";
}

// A learnable token stream: repeated short patterns over a small alphabet, so loss falls fast.
inline std::vector<uint16_t> pattern_tokens(size_t n, int vocab, uint64_t seed) {
    std::vector<uint16_t> t(n);
    uint64_t s = seed * 2654435761u + 1;
    for (size_t i = 0; i < n; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        int noise = (int)((s >> 33) % 8);
        t[i] = (uint16_t)(noise == 0 ? (s >> 40) % vocab : (i * 7 + i / 5) % vocab);
    }
    return t;
}

// Writes train_000.bin and val_000.bin into dir.
inline void write_tiny_corpus(const std::string& dir, int vocab, size_t train_tokens, size_t val_tokens) {
    moe::write_shard(dir + "/train_000.bin", pattern_tokens(train_tokens, vocab, 1));
    moe::write_shard(dir + "/val_000.bin", pattern_tokens(val_tokens, vocab, 2));
}

inline std::string file_bytes(const std::string& path) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) return "<missing>";
    std::string s;
    char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
    std::fclose(f);
    return s;
}

// Oracle comparisons: max |ours - ref| relative to the reference tensor's largest magnitude
// (element-wise relative error means nothing for gradients that are ~0).
inline double rel_err(const float* ours, const std::vector<float>& ref) {
    double maxdiff = 0.0, scale = 0.0;
    for (size_t i = 0; i < ref.size(); i++) {
        maxdiff = std::max(maxdiff, (double)std::fabs(ours[i] - ref[i]));
        scale = std::max(scale, (double)std::fabs(ref[i]));
    }
    return scale > 0 ? maxdiff / scale : maxdiff;
}

}  // namespace moe_test
