/* Token data, see data.h. Three parts:
   1. llm.c shards: write (atomically), read and validate (magic, version, count vs file size),
      and glob expansion of a shard pattern.
   2. DataLoader: deterministic sequential batches over a list of shards, for one rank of many.
   3. Corpus makers: the synthetic multi-domain corpus (`moe data synth`) and byte-level text
      (`moe data text`). Both write train shards of equal size (<= 1M tokens) plus val_000.bin. */
#include "data.h"
#include "common.h"
#include "fileio.h"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <dirent.h>
#include <glob.h>
#include <sys/stat.h>
#include <unistd.h>

namespace moe {

// ------------------------------------------------------------------------------------------------
// shards

namespace {

constexpr uint64_t HEADER_BYTES = SHARD_HEADER_INTS * sizeof(int32_t);  // 1024
constexpr uint64_t MAX_SHARD_TOKENS = 1000000;  // train shards are split to at most this many tokens
constexpr uint64_t SYNTH_MIN_SPLIT = 8 * 8 * 256 + 1;  // 8 eval batches of 8 x 256 (+1 target)
constexpr uint64_t TEXT_MIN_SPLIT = 2;                  // one input token and its target

using FilePtr = std::unique_ptr<FILE, int (*)(FILE*)>;

// Validates a shard header against the size of the whole file; returns the token count.
uint64_t check_header(const int32_t* h, uint64_t size, const std::string& path) {
    if (h[0] != SHARD_MAGIC) fail("bad magic {} in shard ({}); expected {}", h[0], path, SHARD_MAGIC);
    if (h[1] != SHARD_VERSION) fail("bad version {} in shard ({}); expected {}", h[1], path, SHARD_VERSION);
    if (h[2] < 0) fail("bad token count {} in the header of shard ({})", h[2], path);
    const uint64_t count = (uint64_t)h[2], holds = (size - HEADER_BYTES) / 2;
    if (size != HEADER_BYTES + 2 * count) {
        if (holds < count)
            fail("truncated shard ({}): header says {} tokens but the file holds {}", path, count, holds);
        fail("shard ({}) is longer than its header says: header says {} tokens but the file holds {} bytes "
             "after the header", path, count, size - HEADER_BYTES);
    }
    return count;
}

// Opens a shard, reads and validates its header against the file size. On return the file is
// positioned at the first token and *ntok holds the token count.
FilePtr open_shard(const std::string& path, uint64_t* ntok) {
    FilePtr f(std::fopen(path.c_str(), "rb"), &std::fclose);
    if (!f) fail("cannot open shard ({}): {}", path, std::strerror(errno));
    struct stat st;
    if (fstat(fileno(f.get()), &st) != 0) fail("cannot stat shard ({}): {}", path, std::strerror(errno));
    if (S_ISDIR(st.st_mode)) fail("shard ({}) is a directory", path);
    const uint64_t size = (uint64_t)st.st_size;
    if (size < HEADER_BYTES)
        fail("truncated shard ({}): the file holds {} bytes, less than the {}-byte header", path, size,
             HEADER_BYTES);
    int32_t h[SHARD_HEADER_INTS];
    if (std::fread(h, sizeof(int32_t), SHARD_HEADER_INTS, f.get()) != (size_t)SHARD_HEADER_INTS)
        fail("cannot read the header of shard ({})", path);
    *ntok = check_header(h, size, path);
    return f;
}

uint64_t shard_token_count(const std::string& path) {
    uint64_t n = 0;
    open_shard(path, &n);
    return n;
}

}  // namespace

void write_shard(const std::string& path, const std::vector<uint16_t>& tokens) {
    if (tokens.size() > (size_t)INT32_MAX)
        fail("shard ({}) would hold {} tokens; the header's int32 count allows at most {}", path,
             tokens.size(), INT32_MAX);
    int32_t h[SHARD_HEADER_INTS] = {};
    h[0] = SHARD_MAGIC;
    h[1] = SHARD_VERSION;
    h[2] = (int32_t)tokens.size();
    AtomicFile f(path);
    f.write(h, sizeof h);
    f.write(tokens.data(), tokens.size() * sizeof(uint16_t));  // little-endian, as llm.c
    f.commit();
}

std::vector<uint16_t> read_shard(const std::string& path) {
    uint64_t n = 0;
    FilePtr f = open_shard(path, &n);
    std::vector<uint16_t> tokens(n);
    if (n && std::fread(tokens.data(), sizeof(uint16_t), n, f.get()) != n)
        fail("cannot read the tokens of shard ({}): {}", path, std::strerror(errno));
    return tokens;
}

std::vector<uint16_t> parse_shard(const std::string& bytes, const std::string& name) {
    const uint64_t size = bytes.size();
    if (size < HEADER_BYTES)
        fail("truncated shard ({}): the file holds {} bytes, less than the {}-byte header", name, size,
             HEADER_BYTES);
    int32_t h[SHARD_HEADER_INTS];
    std::memcpy(h, bytes.data(), HEADER_BYTES);
    std::vector<uint16_t> tokens(check_header(h, size, name));
    if (!tokens.empty()) std::memcpy(tokens.data(), bytes.data() + HEADER_BYTES, tokens.size() * sizeof(uint16_t));
    return tokens;
}

std::vector<std::string> expand_glob(const std::string& pattern, const std::string& what) {
    glob_t g;
    std::memset(&g, 0, sizeof g);
    int rc = glob(pattern.c_str(), 0, nullptr, &g);
    if (rc != 0 && rc != GLOB_NOMATCH) {
        globfree(&g);
        fail("cannot expand {} ({}): read error", pattern, what);
    }
    std::vector<std::string> files;
    for (size_t i = 0; rc == 0 && i < g.gl_pathc; i++) {
        struct stat st;  // a directory that happens to match is not a shard
        if (stat(g.gl_pathv[i], &st) == 0 && !S_ISDIR(st.st_mode)) files.emplace_back(g.gl_pathv[i]);
    }
    globfree(&g);
    if (files.empty()) fail("no files match {} ({})", pattern, what);
    std::sort(files.begin(), files.end());  // byte order, whatever the locale says
    return files;
}

// ------------------------------------------------------------------------------------------------
// DataLoader
//
// Invariant: the current shard holds at least world*B*T + 1 tokens past offset_, so the next
// batch can always be read without checks. After each batch we advance and restore the invariant
// (moving to the next shard if needed), which makes position() exactly where the next batch starts.

namespace {

uint64_t batch_span(int B, int T, int world) { return (uint64_t)world * B * T + 1; }

void check_shard_size(const std::string& path, uint64_t n, int B, int T, int world, const std::string& what) {
    uint64_t need = batch_span(B, T, world);
    if (n < need)
        fail("shard {} holds {} tokens; one batch needs {} (world {} x B {} x T {} + 1) ({})", path, n, need,
             world, B, T, what);
}

}  // namespace

DataLoader::DataLoader(const std::string& pattern, int B, int T, int vocab_size, int rank, int world,
                       const std::string& what)
    : B_(B), T_(T), vocab_(vocab_size), rank_(rank), world_(world), what_(what) {
    if (B <= 0 || T <= 0) fail("batch size and sequence length must be positive, got B={} T={} ({})", B, T, what);
    if (world < 1 || rank < 0 || rank >= world) fail("rank {} is outside world size {} ({})", rank, world, what);
    if (vocab_size < 1 || vocab_size > 65536)
        fail("vocab_size {} does not fit uint16 shards (1..65536) ({})", vocab_size, what);
    files_ = expand_glob(pattern, what);
    // Headers only: a too-small shard anywhere in the list fails now, not hours into a run.
    for (const auto& f : files_) {
        uint64_t n = shard_token_count(f);
        check_shard_size(f, n, B, T, world, what);
        total_ += n;
    }
    load_shard(0);
}

void DataLoader::load_shard(uint64_t idx) {
    if (idx == shard_ && !tokens_.empty()) return;  // one-shard lists wrap without rereading
    std::vector<uint16_t> t = read_shard(files_[idx]);
    check_shard_size(files_[idx], t.size(), B_, T_, world_, what_);
    for (size_t i = 0; i < t.size(); i++)
        if (t[i] >= vocab_)
            fail("token {} at index {} in shard {} is >= vocab_size {} ({})", t[i], i, files_[idx], vocab_,
                 what_);
    tokens_.swap(t);
    shard_ = idx;
}

void DataLoader::next_batch(int* inputs, int* targets) {
    const uint64_t bt = (uint64_t)B_ * T_;
    const uint16_t* p = tokens_.data() + offset_ + (uint64_t)rank_ * bt;
    for (uint64_t i = 0; i < bt; i++) {
        inputs[i] = p[i];
        targets[i] = p[i + 1];
    }
    offset_ += bt * world_;  // every rank advances by the whole global batch
    if (offset_ + batch_span(B_, T_, world_) > tokens_.size()) {
        load_shard((shard_ + 1) % files_.size());
        offset_ = 0;
    }
}

void DataLoader::reset() {
    load_shard(0);
    offset_ = 0;
}

DataLoader::Position DataLoader::position() const { return Position{shard_, offset_}; }

void DataLoader::set_position(const Position& p) {
    if (p.shard >= files_.size())
        fail("data position names shard {}, but {} has {} shard(s) ({})", p.shard, what_, files_.size(), what_);
    const std::string& path = files_[p.shard];
    uint64_t n = shard_token_count(path), need = batch_span(B_, T_, world_);
    if (p.offset > n || n - p.offset < need)
        fail("data position offset {} in shard {} leaves fewer than the {} tokens a batch needs; the shard "
             "holds {} ({})", p.offset, path, need, n, what_);
    load_shard(p.shard);
    offset_ = p.offset;
}

uint64_t DataLoader::total_tokens() const { return total_; }

// ------------------------------------------------------------------------------------------------
// corpus writing, shared by synth and text

namespace {

// Fills dst[0..n) with the next n tokens of a split.
using TokenSource = std::function<void(uint16_t* dst, size_t n)>;

void prepare_out_dir(const std::string& dir) {
    struct stat st;
    if (stat(dir.c_str(), &st) == 0 && !S_ISDIR(st.st_mode)) fail("output path {} exists and is not a directory", dir);
    make_dirs(dir);
}

std::string shard_name(const std::string& dir, const char* prefix, int idx, int count) {
    int width = 3;  // widen past 999 shards so that names still sort in order
    for (int c = count - 1; c >= 1000; c /= 10) width++;
    return fmt::format("{}/{}_{:0{}d}.bin", dir, prefix, idx, width);
}

// Removes <prefix>_<digits>.bin files left in dir by an earlier, larger corpus: a shard glob
// would otherwise silently mix them into this one.
void remove_stale_shards(const std::string& dir, const char* prefix, const std::vector<std::string>& keep) {
    DIR* d = opendir(dir.c_str());
    if (!d) return;
    std::vector<std::string> stale;
    const std::string pre = std::string(prefix) + "_";
    while (dirent* e = readdir(d)) {
        std::string name = e->d_name;
        if (name.size() <= pre.size() + 4 || name.compare(0, pre.size(), pre) != 0 ||
            name.compare(name.size() - 4, 4, ".bin") != 0)
            continue;
        std::string mid = name.substr(pre.size(), name.size() - pre.size() - 4);
        if (!std::all_of(mid.begin(), mid.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
        std::string path = dir + "/" + name;
        if (std::find(keep.begin(), keep.end(), path) == keep.end()) stale.push_back(path);
    }
    closedir(d);
    for (const auto& p : stale)
        if (std::remove(p.c_str()) != 0) fail("cannot remove stale shard {} ({})", p, std::strerror(errno));
}

// Writes n tokens as <prefix>_000.bin, ... : `shards` files of equal size (+-1 token), so that
// the last one is never a tiny remainder a loader would reject. `done` gets the tokens written
// so far, every 64K tokens, for progress reports.
std::vector<std::string> write_split(const std::string& dir, const char* prefix, uint64_t n, int shards,
                                     const TokenSource& source, const std::function<void(uint64_t)>& done) {
    std::vector<std::string> paths;
    std::vector<uint16_t> buf;
    uint64_t written = 0;
    for (int s = 0; s < shards; s++) {
        uint64_t len = n / shards + ((uint64_t)s < n % shards ? 1 : 0);
        buf.resize(len);
        for (uint64_t i = 0; i < len; i += 65536) {
            size_t k = (size_t)std::min<uint64_t>(65536, len - i);
            source(buf.data() + i, k);
            written += k;
            if (done) done(written);
        }
        paths.push_back(shard_name(dir, prefix, s, shards));
        write_shard(paths.back(), buf);
    }
    remove_stale_shards(dir, prefix, paths);
    return paths;
}

int train_shard_count(uint64_t n) { return (int)((n + MAX_SHARD_TOKENS - 1) / MAX_SHARD_TOKENS); }

void check_val_frac(double f) {
    if (!(f > 0.0 && f < 1.0)) fail("val fraction must be between 0 and 1 (exclusive), got {}", f);
}

// ------------------------------------------------------------------------------------------------
// synthetic corpus: one generator per split, documents streamed into shards

// splitmix64: turns small, similar seeds (1337, 1338) into unrelated xorshift states.
uint64_t mix_seed(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

const char* const ADJ[] = {"small", "big", "red", "old", "happy", "green", "quiet", "young", "angry", "blue"};
const char* const NOUN[] = {"cat", "dog", "bird", "ball", "tree", "girl", "boy", "car", "book", "apple", "owl", "hat"};
const char* const VERB[] = {"see", "like", "chase", "find", "want", "hold", "make", "eat", "push", "watch"};
const char* const PREP[] = {"near", "under", "with", "behind", "on"};
const char* const DET_SG[] = {"a", "the", "every", "one", "this"};
const char* const DET_PL[] = {"the", "some", "two", "many", "these"};

template <size_t N>
constexpr int len(const char* const (&)[N]) { return (int)N; }

class SynthGen {
public:
    SynthGen(uint64_t seed, uint64_t stream)
        : rng_(mix_seed(mix_seed(seed) + stream)), share_(synth_domain_names().size(), 0) {}

    void fill(uint16_t* out, size_t n) {
        while (n > 0) {
            if (pos_ == doc_.size()) next_doc();
            size_t k = std::min(n, doc_.size() - pos_);
            for (size_t i = 0; i < k; i++) out[i] = (uint8_t)doc_[pos_ + i];
            out += k, n -= k, pos_ += k;
        }
    }

private:
    Rng rng_;
    std::vector<uint64_t> share_;  // tokens emitted per domain
    uint64_t total_ = 0;
    std::string doc_;
    size_t pos_ = 0;

    int below(int n) { return (int)(rng_.next_u64() % (uint64_t)n); }
    int between(int lo, int hi) { return lo + below(hi - lo + 1); }  // inclusive
    void num(uint64_t v) {
        char b[24];
        int k = 0;
        do { b[k++] = char('0' + v % 10); v /= 10; } while (v);
        while (k) doc_ += b[--k];
    }
    int with_digits(int digits) {  // uniform over the numbers with exactly that many digits (1..3)
        static const int lo[] = {0, 0, 10, 100}, hi[] = {0, 9, 99, 999};
        return between(lo[digits], hi[digits]);
    }

    void next_doc() {
        // A random domain, but never one already a few documents ahead of its fair share: the
        // domains interleave randomly yet each gets ~1/D of the tokens whatever its mean length.
        const int D = (int)share_.size();
        int d;
        do d = below(D); while (share_[d] > total_ / D + 256);
        doc_.clear();
        pos_ = 0;
        doc_ += char(d + 1);  // tag byte
        // Several items per document, up to a random target length, so documents of every
        // domain have comparable sizes (24..120 bytes plus one item).
        size_t target = (size_t)between(24, 120);
        static const char* const sep[] = {" ", "; ", "; ", " ", " ", "; ", "; "};
        do {
            if (doc_.size() > 1) doc_ += sep[d];
            switch (d) {
                case 0: arithmetic(); break;
                case 1: sorting(); break;
                case 2: reversal(); break;
                case 3: brackets(); break;
                case 4: sentence(); break;
                case 5: lookup(); break;
                default: counting(); break;
            }
        } while (doc_.size() < target);
        doc_ += '\n';
        share_[d] += doc_.size();
        total_ += doc_.size();
    }

    // "37+85=122", "402-17=385", "23*7=161"
    void arithmetic() {
        int op = below(3);
        uint64_t a, b, c;
        if (op == 2) {  // two digits times one digit
            a = with_digits(between(1, 2));
            b = below(10);
            c = a * b;
        } else {  // up to three digits each; subtraction never goes negative
            a = with_digits(between(1, 3));
            b = with_digits(between(1, 3));
            if (op == 1 && a < b) std::swap(a, b);
            c = op == 0 ? a + b : a - b;
        }
        num(a);
        doc_ += "+-*"[op];
        num(b);
        doc_ += '=';
        num(c);
    }
    // "sort 5 31 9 > 5 9 31"
    void sorting() {
        int k = between(2, 8), v[8];
        doc_ += "sort";
        for (int i = 0; i < k; i++) {
            v[i] = below(100);
            doc_ += ' ';
            num(v[i]);
        }
        std::sort(v, v + k);
        doc_ += " >";
        for (int i = 0; i < k; i++) {
            doc_ += ' ';
            num(v[i]);
        }
    }
    // "rev kqzt > tzqk"
    void reversal() {
        int k = between(2, 10);
        char s[10];
        doc_ += "rev ";
        for (int i = 0; i < k; i++) {
            s[i] = char('a' + below(26));
            doc_ += s[i];
        }
        doc_ += " > ";
        for (int i = k - 1; i >= 0; i--) doc_ += s[i];
    }
    // "{[()()]}": balanced, nesting depth <= 8; each closer is determined by its opener
    void brackets() {
        static const char open[] = "([{<", close[] = ")]}>";
        int opens = between(1, 10), depth = 0;
        char stack[8];
        while (opens > 0 || depth > 0) {
            if (opens > 0 && depth < 8 && (depth == 0 || below(2))) {
                int t = below(4);
                stack[depth++] = close[t];
                doc_ += open[t];
                opens--;
            } else {
                doc_ += stack[--depth];
            }
        }
    }
    // "the small cat sees an old ball near two dogs ." with number agreement and a/an
    void noun_phrase(bool plural) {
        const char* det = plural ? DET_PL[below(len(DET_PL))] : DET_SG[below(len(DET_SG))];
        const char* adj = below(2) ? ADJ[below(len(ADJ))] : nullptr;
        const char* noun = NOUN[below(len(NOUN))];
        const char* next = adj ? adj : noun;
        bool vowel = std::strchr("aeiou", next[0]) != nullptr;
        doc_ += (std::strcmp(det, "a") == 0 && vowel) ? "an" : det;
        if (adj) (doc_ += ' ') += adj;
        (doc_ += ' ') += noun;
        if (plural) doc_ += 's';
    }
    void sentence() {
        bool plural = below(2);
        noun_phrase(plural);
        const char* verb = VERB[below(len(VERB))];
        (doc_ += ' ') += verb;
        if (!plural) doc_ += (std::strcmp(verb, "push") == 0 || std::strcmp(verb, "watch") == 0) ? "es" : "s";
        doc_ += ' ';
        noun_phrase(below(2));
        if (below(3) == 0) {  // optional prepositional phrase
            ((doc_ += ' ') += PREP[below(len(PREP))]) += ' ';
            noun_phrase(below(2));
        }
        doc_ += " .";
    }
    // "b=4 x=9 m=2 ? x > 9": distinct keys, the answer is copied from the context
    void lookup() {
        int k = between(2, 6), val[26];
        char key[26];
        for (int i = 0; i < 26; i++) key[i] = char('a' + i);
        for (int i = 0; i < k; i++) {  // partial Fisher-Yates: k distinct keys
            std::swap(key[i], key[i + below(26 - i)]);
            val[i] = below(10);
            (doc_ += key[i]) += '=';
            num(val[i]);
            doc_ += ' ';
        }
        int q = below(k);
        ((doc_ += "? ") += key[q]) += " > ";
        num(val[q]);
    }
    // "count abcab b > 2"
    void counting() {
        int k = between(3, 12), n = 0;
        char s[12], q = char('a' + below(4));
        doc_ += "count ";
        for (int i = 0; i < k; i++) {
            s[i] = char('a' + below(4));
            doc_ += s[i];
            n += s[i] == q;
        }
        ((doc_ += ' ') += q) += " > ";
        num(n);
    }
};

}  // namespace

const std::vector<std::string>& synth_domain_names() {
    static const std::vector<std::string> names = {"arithmetic", "sorting", "reversal", "brackets",
                                                   "grammar",    "lookup",  "counting"};
    return names;
}

SynthStats synth_corpus(const std::string& out_dir, uint64_t tokens, uint64_t seed, double val_frac,
                        const std::function<void(double)>& progress) {
    check_val_frac(val_frac);
    // val gets val_frac of the tokens, but at least enough for 8 eval batches of 8 x 256.
    uint64_t n_val = std::max<uint64_t>(SYNTH_MIN_SPLIT, (uint64_t)std::llround((double)tokens * val_frac));
    if (tokens < 2 * SYNTH_MIN_SPLIT || tokens - n_val < SYNTH_MIN_SPLIT)
        fail("{} tokens are too few for a synthetic corpus with val fraction {}: train and val need at least {} "
             "tokens each, enough for 8 batches of 8 x 256", tokens, val_frac, SYNTH_MIN_SPLIT);
    uint64_t n_train = tokens - n_val;
    prepare_out_dir(out_dir);

    // Independent streams for the two splits, so that each starts with a whole document.
    SynthGen train_gen(seed, 0), val_gen(seed, 1);
    auto report = [&](uint64_t base) {
        return [&progress, base, tokens](uint64_t done) { if (progress) progress((double)(base + done) / tokens); };
    };
    SynthStats st;
    st.train_shards = train_shard_count(n_train);
    write_split(out_dir, "train", n_train, st.train_shards,
                [&](uint16_t* d, size_t n) { train_gen.fill(d, n); }, report(0));
    write_split(out_dir, "val", n_val, 1, [&](uint16_t* d, size_t n) { val_gen.fill(d, n); }, report(n_train));
    st.train_tokens = n_train, st.val_tokens = n_val, st.val_shards = 1;
    return st;
}

SynthStats text_corpus(const std::string& in_path, const std::string& out_dir, double val_frac,
                       const std::function<void(double)>& progress) {
    check_val_frac(val_frac);
    std::string bytes = read_file(in_path, "input text");
    const uint64_t n = bytes.size();
    if (n == 0) fail("input text is empty ({})", in_path);
    uint64_t n_val = (uint64_t)std::llround((double)n * val_frac);
    if (n_val < TEXT_MIN_SPLIT || n - n_val < TEXT_MIN_SPLIT)
        fail("input text has only {} bytes: val fraction {} leaves {} train and {} val tokens; each split needs "
             "at least {} ({})", n, val_frac, n - n_val, n_val, TEXT_MIN_SPLIT, in_path);
    const uint64_t n_train = n - n_val;
    prepare_out_dir(out_dir);

    uint64_t cursor = 0;  // the train split is the head of the file, val its tail
    auto copy = [&](uint16_t* d, size_t k) {
        for (size_t i = 0; i < k; i++) d[i] = (uint8_t)bytes[cursor + i];
        cursor += k;
    };
    auto report = [&](uint64_t base) {
        return [&progress, base, n](uint64_t done) { if (progress) progress((double)(base + done) / n); };
    };
    SynthStats st;
    st.train_shards = train_shard_count(n_train);
    write_split(out_dir, "train", n_train, st.train_shards, copy, report(0));
    write_split(out_dir, "val", n_val, 1, copy, report(n_train));
    st.train_tokens = n_train, st.val_tokens = n_val, st.val_shards = 1;
    return st;
}

}  // namespace moe
