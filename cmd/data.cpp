/* `moe data synth` and `moe data text`: make token shards (src/data.cpp does the work).
     moe data synth --out DIR [--tokens N] [--seed S] [--val-frac F]   synthetic multi-domain corpus
     moe data text  --in FILE --out DIR [--val-frac F]                 any file as bytes (vocab 256)
   Progress goes to stderr (one updating line on a terminal, two plain lines otherwise), the
   summary to stdout. */
#include "commands.h"
#include "common.h"
#include "data.h"
#include "fileio.h"

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <unistd.h>

namespace moe {
namespace {

std::string with_commas(uint64_t v) {
    std::string s = std::to_string(v);
    for (int i = (int)s.size() - 3; i > 0; i -= 3) s.insert((size_t)i, ",");
    return s;
}

// "4000000", "4,000,000", "4_000_000", "4M", "500k", "1G": token counts are easier to type with
// a suffix. Anything else is an error that shows the accepted forms.
uint64_t parse_count(const std::string& s, const std::string& flag, const std::string& cmd) {
    auto bad = [&]() -> uint64_t {
        fail("{} must be a positive whole number such as 4000000, 4,000,000 or 4M; got '{}' ({})", flag, s, cmd);
    };
    uint64_t v = 0, mult = 1;
    bool digits = false;
    for (size_t i = 0; i < s.size(); i++) {
        char c = s[i];
        if (c >= '0' && c <= '9') {
            if (v > (UINT64_MAX - 9) / 10) return bad();
            v = v * 10 + uint64_t(c - '0');
            digits = true;
        } else if ((c == ',' || c == '_') && digits) {
            continue;
        } else if (i + 1 == s.size() && digits) {
            switch (c) {
                case 'k': case 'K': mult = 1000; break;
                case 'm': case 'M': mult = 1000000; break;
                case 'g': case 'G': case 'b': case 'B': mult = 1000000000; break;
                default: return bad();
            }
        } else {
            return bad();
        }
    }
    if (!digits || v > UINT64_MAX / mult) return bad();
    v *= mult;
    if (v == 0) fail("{} must be > 0, got {} ({})", flag, s, cmd);
    return v;
}

void check_val_frac(double f, const std::string& cmd) {
    if (!(f > 0.0 && f < 1.0)) fail("--val-frac must be between 0 and 1 (exclusive), got {} ({})", f, cmd);
}

// Progress on stderr: a carriage-return-updated percentage on a terminal; in a log file, one
// line when work starts and one when it ends, instead of a hundred updates.
class Progress {
public:
    Progress(std::string label, const std::string& start_line)
        : label_(std::move(label)), tty_(isatty(STDERR_FILENO)), t0_(std::chrono::steady_clock::now()) {
        if (!tty_) std::fprintf(stderr, "%s: %s\n", label_.c_str(), start_line.c_str());
    }
    void update(double frac) {
        int pct = (int)(frac * 100.0);
        if (!tty_ || pct == last_) return;
        last_ = pct;
        std::fprintf(stderr, "\r%s: %3d%%", label_.c_str(), pct);
        std::fflush(stderr);
    }
    void done() {
        double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
        std::fprintf(stderr, "%s%s: done in %.2f s\n", tty_ ? "\r" : "", label_.c_str(), s);
        last_ = -1;
    }
    // On an error, end the half-drawn line so that main's "error: ..." starts on its own.
    void abort() {
        if (tty_ && last_ >= 0) std::fputc('\n', stderr);
    }
private:
    std::string label_;
    bool tty_;
    int last_ = -1;
    std::chrono::steady_clock::time_point t0_;
};

std::string shards_word(int n) { return n == 1 ? "1 shard" : fmt::format("{} shards", n); }

struct SynthArgs {
    std::string out, tokens = "4000000";
    uint64_t seed = 1337;
    double val_frac = 0.05;
};

void run_synth(const SynthArgs& a) {
    uint64_t tokens = parse_count(a.tokens, "--tokens", "moe data synth");
    check_val_frac(a.val_frac, "moe data synth");
    // synth_corpus checks the sizes, then creates --out: a rejected run leaves nothing behind.
    Progress prog("synth", fmt::format("generating {} tokens (seed {}) into {}", with_commas(tokens), a.seed, a.out));
    SynthStats st;
    try {
        st = synth_corpus(a.out, tokens, a.seed, a.val_frac, [&](double f) { prog.update(f); });
    } catch (...) {
        prog.abort();
        throw;
    }
    prog.done();
    std::string names;
    for (const auto& n : synth_domain_names()) names += (names.empty() ? "" : ", ") + n;
    std::printf("wrote %s train tokens in %s and %s val tokens to %s (%zu domains: %s)\n",
                with_commas(st.train_tokens).c_str(), shards_word(st.train_shards).c_str(),
                with_commas(st.val_tokens).c_str(), a.out.c_str(), synth_domain_names().size(), names.c_str());
}

struct TextArgs {
    std::string in, out;
    double val_frac = 0.1;
};

void run_text(const TextArgs& a) {
    check_val_frac(a.val_frac, "moe data text");
    if (!file_exists(a.in)) fail("input file does not exist ({})", a.in);
    Progress prog("text", fmt::format("tokenising {} as bytes into {}", a.in, a.out));
    SynthStats st;
    try {
        st = text_corpus(a.in, a.out, a.val_frac, [&](double f) { prog.update(f); });
    } catch (...) {
        prog.abort();
        throw;
    }
    prog.done();
    std::printf("wrote %s train tokens in %s and %s val tokens to %s (bytes of %s, vocab 256)\n",
                with_commas(st.train_tokens).c_str(), shards_word(st.train_shards).c_str(),
                with_commas(st.val_tokens).c_str(), a.out.c_str(), a.in.c_str());
}

}  // namespace

void register_data_commands(CLI::App& app) {
    CLI::App* data = app.add_subcommand("data", "make token shards: a synthetic corpus or a text file as bytes");
    data->require_subcommand(1);

    // Options live in shared_ptrs: CLI11 writes into them while parsing, the callback reads them.
    auto sa = std::make_shared<SynthArgs>();
    CLI::App* synth = data->add_subcommand(
        "synth", "deterministic multi-domain synthetic corpus (vocab 256): train_*.bin + val_000.bin");
    synth->add_option("--out", sa->out, "output directory (created if missing)")->required();
    synth->add_option("--tokens", sa->tokens, "total tokens, train + val (4000000, 4M, 500k)")->capture_default_str();
    synth->add_option("--seed", sa->seed, "generator seed")->capture_default_str();
    synth->add_option("--val-frac", sa->val_frac, "fraction of tokens for val_000.bin (at least 16,385)")
        ->capture_default_str();
    synth->callback([sa] { run_synth(*sa); });

    auto ta = std::make_shared<TextArgs>();
    CLI::App* text = data->add_subcommand(
        "text", "any file as byte tokens (vocab 256): its last --val-frac to val_000.bin, the rest to train_*.bin");
    text->add_option("--in", ta->in, "input file (any bytes)")->required();
    text->add_option("--out", ta->out, "output directory (created if missing)")->required();
    text->add_option("--val-frac", ta->val_frac, "fraction of the file (its tail) for val_000.bin")
        ->capture_default_str();
    text->callback([ta] { run_text(*ta); });
}

}  // namespace moe
