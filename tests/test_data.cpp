/* Tests for src/data.cpp: shard format and its errors, glob expansion, the DataLoader's batch
   windows (shard changes, wrap-around, resume, multi-rank slices), the synthetic corpus
   (determinism, tags, per-domain correctness, balance, learnable structure) and the text corpus. */
#include <doctest/doctest.h>

#include "common.h"
#include "data.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <vector>

using namespace moe;

namespace {

// A fresh directory per test, removed with everything in it at the end.
struct TempDir {
    std::string path;
    TempDir() {
        char tmpl[] = "/tmp/moe_test_data_XXXXXX";
        REQUIRE(mkdtemp(tmpl) != nullptr);
        path = tmpl;
    }
    ~TempDir() { std::filesystem::remove_all(path); }
    std::string operator/(const std::string& name) const { return path + "/" + name; }
};

std::string error_of(const std::function<void()>& f) {
    try {
        f();
    } catch (const Error& e) {
        return e.what();
    }
    return "<no error>";
}

// Checks that f throws moe::Error and that its message contains every one of parts.
void expect_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
    std::string msg = error_of(f);
    INFO("message: " << msg);
    for (const auto& p : parts) CHECK(msg.find(p) != std::string::npos);
}

std::string slurp(const std::string& path) {
    std::FILE* f = std::fopen(path.c_str(), "rb");
    REQUIRE(f != nullptr);
    std::string s;
    char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
    std::fclose(f);
    return s;
}

void spit(const std::string& path, const std::string& bytes) {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    REQUIRE(f != nullptr);
    std::fwrite(bytes.data(), 1, bytes.size(), f);
    std::fclose(f);
}

// A shard whose tokens are base, base+1, ...: every position in every shard is recognisable.
std::vector<uint16_t> iota_tokens(int n, int base) {
    std::vector<uint16_t> t(n);
    for (int i = 0; i < n; i++) t[i] = uint16_t(base + i);
    return t;
}

// All tokens of a split, shards concatenated in name order, as bytes.
std::string split_bytes(const std::string& dir, const std::string& prefix) {
    std::string s;
    for (const auto& f : expand_glob(dir + "/" + prefix + "_*.bin", "test"))
        for (uint16_t t : read_shard(f)) s += char(t);
    return s;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// shards and globs

TEST_CASE("shard write/read round trip, llm.c header layout") {
    TempDir d;
    std::vector<uint16_t> toks = {0, 1, 255, 256, 50256, 65535, 7};
    write_shard(d / "a.bin", toks);
    CHECK(read_shard(d / "a.bin") == toks);
    std::string raw = slurp(d / "a.bin");
    REQUIRE(raw.size() == 1024 + 2 * toks.size());
    const int32_t* h = reinterpret_cast<const int32_t*>(raw.data());
    CHECK(h[0] == 20240520);
    CHECK(h[1] == 1);
    CHECK(h[2] == (int32_t)toks.size());
    CHECK(h[3] == 0);
    write_shard(d / "empty.bin", {});
    CHECK(read_shard(d / "empty.bin").empty());
    CHECK(std::filesystem::directory_iterator(d.path) != std::filesystem::directory_iterator());
    for (auto& e : std::filesystem::directory_iterator(d.path))  // no temp files left behind
        CHECK(e.path().filename().string().find(".tmp") == std::string::npos);
}

TEST_CASE("read_shard rejects bad magic, wrong version, truncation, short header") {
    TempDir d;
    std::string path = d / "x.bin";
    write_shard(path, iota_tokens(100, 0));
    std::string good = slurp(path);
    auto with_int = [&](int idx, int32_t v) {
        std::string s = good;
        std::memcpy(&s[4 * idx], &v, 4);
        return s;
    };
    spit(path, with_int(0, 12345));
    expect_error([&] { read_shard(path); }, {"bad magic 12345", path, "expected 20240520"});
    spit(path, with_int(1, 2));
    expect_error([&] { read_shard(path); }, {"bad version 2", path, "expected 1"});
    spit(path, good.substr(0, 1024 + 2 * 50));
    expect_error([&] { read_shard(path); }, {"truncated shard", path, "header says 100 tokens", "holds 50"});
    spit(path, good.substr(0, 100));
    expect_error([&] { read_shard(path); }, {"truncated shard", path, "100 bytes"});
    spit(path, good + "xx");
    expect_error([&] { read_shard(path); }, {path, "header says 100 tokens"});
    spit(path, with_int(2, -3));
    expect_error([&] { read_shard(path); }, {"bad token count -3", path});
    expect_error([&] { read_shard(d / "missing.bin"); }, {"cannot open shard", "missing.bin"});
}

TEST_CASE("expand_glob sorts by name and names the config key when nothing matches") {
    TempDir d;
    for (const char* n : {"train_002.bin", "train_000.bin", "train_010.bin", "train_001.bin", "val_000.bin"})
        write_shard(d / n, {1, 2});
    std::vector<std::string> want = {d / "train_000.bin", d / "train_001.bin", d / "train_002.bin",
                                     d / "train_010.bin"};
    CHECK(expand_glob(d / "train_*.bin", "data.train") == want);
    CHECK(expand_glob(d / "val_000.bin", "data.val") == std::vector<std::string>{d / "val_000.bin"});
    std::string pat = d / "nope_*.bin";
    expect_error([&] { expand_glob(pat, "data.train"); }, {"no files match " + pat + " (data.train)"});
}

// ------------------------------------------------------------------------------------------------
// DataLoader

TEST_CASE("loader batches are the expected windows, move to the next shard and wrap") {
    TempDir d;
    // shard 0: tokens 0..99, shard 1: 1000..1069. B=2, T=4: a batch reads 9 tokens, steps by 8.
    write_shard(d / "s_000.bin", iota_tokens(100, 0));
    write_shard(d / "s_001.bin", iota_tokens(70, 1000));
    const int B = 2, T = 4;
    DataLoader dl(d / "s_*.bin", B, T, 65536);
    CHECK(dl.total_tokens() == 170);
    CHECK(dl.files().size() == 2);
    const int sizes[2] = {100, 70}, bases[2] = {0, 1000};
    int shard = 0, offset = 0;
    std::vector<int> x(B * T), y(B * T);
    for (int step = 0; step < 50; step++) {  // 12 + 8 batches per lap: covers two wraps
        auto p = dl.position();
        REQUIRE(p.shard == (uint64_t)shard);
        REQUIRE(p.offset == (uint64_t)offset);
        dl.next_batch(x.data(), y.data());
        for (int i = 0; i < B * T; i++) {
            REQUIRE(x[i] == bases[shard] + offset + i);
            REQUIRE(y[i] == bases[shard] + offset + i + 1);
        }
        offset += B * T;
        if (offset + B * T + 1 > sizes[shard]) shard = (shard + 1) % 2, offset = 0;
    }
    dl.reset();
    CHECK(dl.position().shard == 0);
    CHECK(dl.position().offset == 0);
    dl.next_batch(x.data(), y.data());
    CHECK(x[0] == 0);
}

TEST_CASE("loader with a single shard wraps to its start") {
    TempDir d;
    write_shard(d / "one.bin", iota_tokens(20, 5));  // B*T = 8: offsets 0, 8, then wrap
    DataLoader dl(d / "one.bin", 1, 8, 256);
    std::vector<int> x(8), y(8);
    int starts[] = {5, 13, 5, 13, 5};
    for (int s : starts) {
        dl.next_batch(x.data(), y.data());
        CHECK(x[0] == s);
        CHECK(y[7] == s + 8);
    }
}

TEST_CASE("position/set_position continue a run identically; bad positions are errors") {
    TempDir d;
    write_shard(d / "s_000.bin", iota_tokens(300, 0));
    write_shard(d / "s_001.bin", iota_tokens(200, 2000));
    write_shard(d / "s_002.bin", iota_tokens(250, 4000));
    const int B = 3, T = 5, n = B * T;
    DataLoader a(d / "s_*.bin", B, T, 65536);
    std::vector<int> x(n), y(n), x2(n), y2(n);
    for (int i = 0; i < 23; i++) a.next_batch(x.data(), y.data());
    auto pos = a.position();
    CHECK(pos.shard == 1);
    DataLoader b(d / "s_*.bin", B, T, 65536);
    b.set_position(pos);
    for (int i = 0; i < 100; i++) {
        a.next_batch(x.data(), y.data());
        b.next_batch(x2.data(), y2.data());
        REQUIRE(x == x2);
        REQUIRE(y == y2);
        REQUIRE(a.position().shard == b.position().shard);
        REQUIRE(a.position().offset == b.position().offset);
    }
    expect_error([&] { b.set_position({3, 0}); }, {"shard 3", "3 shard"});
    expect_error([&] { b.set_position({1, 190}); }, {"offset 190", "s_001.bin", "16", "holds 200"});
    expect_error([&] { b.set_position({0, ~0ull}); }, {"s_000.bin"});
    b.set_position({2, 17});  // any offset with room for a batch is fine, aligned or not
    b.next_batch(x.data(), y.data());
    CHECK(x[0] == 4017);
}

TEST_CASE("world > 1: ranks read disjoint consecutive slices that make up the world=1 batch") {
    TempDir d;
    write_shard(d / "s_000.bin", iota_tokens(130, 0));
    write_shard(d / "s_001.bin", iota_tokens(60, 1000));
    write_shard(d / "s_002.bin", iota_tokens(97, 3000));
    const int world = 3, B = 2, T = 4, n = B * T;
    DataLoader whole(d / "s_*.bin", world * B, T, 65536);
    std::vector<DataLoader> ranks;
    for (int r = 0; r < world; r++) ranks.emplace_back(d / "s_*.bin", B, T, 65536, r, world);
    std::vector<int> gx(world * n), gy(world * n), x(n), y(n);
    for (int step = 0; step < 40; step++) {
        whole.next_batch(gx.data(), gy.data());
        for (int r = 0; r < world; r++) {
            ranks[r].next_batch(x.data(), y.data());
            for (int i = 0; i < n; i++) {
                REQUIRE(x[i] == gx[r * n + i]);
                REQUIRE(y[i] == gy[r * n + i]);
            }
            REQUIRE(ranks[r].position().offset == whole.position().offset);
        }
    }
    expect_error([&] { DataLoader(d / "s_*.bin", B, T, 65536, 3, 3); }, {"rank 3", "world size 3"});
}

TEST_CASE("loader validates tokens against vocab_size and shard sizes against the batch") {
    TempDir d;
    auto toks = iota_tokens(100, 0);
    toks[42] = 300;
    write_shard(d / "bad_000.bin", toks);
    expect_error([&] { DataLoader(d / "bad_*.bin", 2, 4, 256, 0, 1, "data.train"); },
                 {"token 300 at index 42", "bad_000.bin", "vocab_size 256", "data.train"});
    // a bad token in the second shard shows up when the loader reaches it
    write_shard(d / "two_000.bin", iota_tokens(20, 0));
    toks = iota_tokens(20, 0);
    toks[3] = 999;
    write_shard(d / "two_001.bin", toks);
    DataLoader dl(d / "two_*.bin", 1, 8, 256);
    std::vector<int> x(8), y(8);
    dl.next_batch(x.data(), y.data());
    expect_error([&] { dl.next_batch(x.data(), y.data()); }, {"token 999 at index 3", "two_001.bin"});

    write_shard(d / "small_000.bin", iota_tokens(50, 0));
    write_shard(d / "small_001.bin", iota_tokens(5, 0));
    expect_error([&] { DataLoader(d / "small_*.bin", 2, 4, 256, 0, 1, "data.val"); },
                 {"small_001.bin", "holds 5 tokens", "needs 9", "data.val"});
    expect_error([&] { DataLoader(d / "small_000.bin", 2, 9, 256, 0, 3); },
                 {"small_000.bin", "needs 55", "world 3 x B 2 x T 9"});
    expect_error([&] { DataLoader(d / "none_*.bin", 2, 4, 256, 0, 1, "data.train"); },
                 {"no files match", "(data.train)"});
}

// ------------------------------------------------------------------------------------------------
// synthetic corpus

namespace {

std::vector<std::string> split(const std::string& s, const std::string& sep) {
    std::vector<std::string> out;
    size_t a = 0, b;
    while ((b = s.find(sep, a)) != std::string::npos) out.push_back(s.substr(a, b - a)), a = b + sep.size();
    out.push_back(s.substr(a));
    return out;
}

bool balanced(const std::string& s) {
    std::string st;
    for (char c : s) {
        size_t o = std::string("([{<").find(c), k = std::string(")]}>").find(c);
        if (o != std::string::npos) st += ")]}>"[o];
        else if (k != std::string::npos && !st.empty() && st.back() == c) st.pop_back();
        else return false;
    }
    return st.empty();
}

// Checks that one item of domain d (1-based tag) is well formed and its answer right.
void check_item(int d, const std::string& it) {
    INFO("domain " << d << " item '" << it << "'");
    std::istringstream in(it);
    if (d == 1) {
        long a, b, c;
        char op, eq;
        REQUIRE((in >> a >> op >> b >> eq >> c));
        CHECK(eq == '=');
        CHECK(c == (op == '+' ? a + b : op == '-' ? a - b : a * b));
    } else if (d == 2 || d == 3 || d == 7) {
        auto halves = split(it, " > ");
        REQUIRE(halves.size() == 2);
        auto lhs = split(halves[0], " ");
        if (d == 2) {
            CHECK(lhs[0] == "sort");
            std::vector<int> v;
            for (size_t i = 1; i < lhs.size(); i++) v.push_back(std::stoi(lhs[i]));
            std::sort(v.begin(), v.end());
            std::string want;
            for (int x : v) want += (want.empty() ? "" : " ") + std::to_string(x);
            CHECK(halves[1] == want);
        } else if (d == 3) {
            REQUIRE(lhs.size() == 2);
            CHECK(lhs[0] == "rev");
            CHECK(halves[1] == std::string(lhs[1].rbegin(), lhs[1].rend()));
        } else {
            REQUIRE(lhs.size() == 3);
            CHECK(lhs[0] == "count");
            CHECK(std::stoi(halves[1]) == std::count(lhs[1].begin(), lhs[1].end(), lhs[2][0]));
        }
    } else if (d == 4) {
        CHECK(balanced(it));
    } else if (d == 6) {
        auto q = split(it, " ? ");
        REQUIRE(q.size() == 2);
        std::map<std::string, std::string> kv;
        for (const auto& pair : split(q[0], " ")) {
            auto p = split(pair, "=");
            REQUIRE(p.size() == 2);
            CHECK(kv.count(p[0]) == 0);  // keys are distinct
            kv[p[0]] = p[1];
        }
        auto ans = split(q[1], " > ");
        REQUIRE(ans.size() == 2);
        CHECK(kv.at(ans[0]) == ans[1]);
    }
}

}  // namespace

TEST_CASE("synth corpus: deterministic per seed, split sizes, shard names") {
    TempDir a, b, c;
    SynthStats s = synth_corpus(a.path, 200000, 1337, 0.05);
    CHECK(s.val_tokens == 16385);  // 5% would be 10,000: raised to 8 batches of 8 x 256 + 1
    CHECK(s.train_tokens == 200000 - 16385);
    CHECK(s.train_shards == 1);
    CHECK(s.val_shards == 1);
    CHECK(std::filesystem::exists(a / "train_000.bin"));
    CHECK(std::filesystem::exists(a / "val_000.bin"));
    synth_corpus(b.path, 200000, 1337, 0.05);
    CHECK(slurp(a / "train_000.bin") == slurp(b / "train_000.bin"));
    CHECK(slurp(a / "val_000.bin") == slurp(b / "val_000.bin"));
    synth_corpus(c.path, 200000, 1338, 0.05);
    CHECK(slurp(a / "train_000.bin") != slurp(c / "train_000.bin"));

    // 2.1M tokens: 105,000 val, 1,995,000 train in two equal shards of at most 1M
    TempDir e;
    std::vector<double> prog;
    s = synth_corpus(e.path, 2100000, 7, 0.05, [&](double f) { prog.push_back(f); });
    CHECK(s.val_tokens == 105000);
    CHECK(s.train_shards == 2);
    CHECK(read_shard(e / "train_000.bin").size() == 997500);
    CHECK(read_shard(e / "train_001.bin").size() == 997500);
    REQUIRE(prog.size() > 10);
    CHECK(std::is_sorted(prog.begin(), prog.end()));
    CHECK(prog.back() == doctest::Approx(1.0));

    expect_error([&] { synth_corpus(e.path, 30000, 1, 0.05); }, {"30000 tokens are too few", "16385"});
    expect_error([&] { synth_corpus(e.path, 40000, 1, 0.9); }, {"too few"});
    expect_error([&] { synth_corpus(e.path, 40000, 1, 0.0); }, {"val fraction", "got 0"});
    expect_error([&] { synth_corpus(e.path, 40000, 1, 1.0); }, {"val fraction"});
}

TEST_CASE("synth corpus: tags, printable text, correct answers, balanced domains") {
    TempDir d;
    synth_corpus(d.path, 600000, 42, 0.05);
    const int D = (int)synth_domain_names().size();
    CHECK(D >= 6);
    for (const char* split_name : {"train", "val"}) {
        std::string s = split_bytes(d.path, split_name);
        REQUIRE(s.size() > 16385);
        CHECK(s[0] >= 1);  // each split starts with a whole document
        CHECK(s[0] <= D);
        std::vector<double> share(D + 1, 0.0);
        size_t start = 0, docs = 0, end;
        while ((end = s.find('\n', start)) != std::string::npos) {  // a cut last document is skipped
            std::string doc = s.substr(start, end - start);
            start = end + 1;
            REQUIRE(doc.size() >= 2);
            int tag = (unsigned char)doc[0];
            REQUIRE(tag >= 1);
            REQUIRE(tag <= D);
            std::string text = doc.substr(1);
            for (char c : text) REQUIRE((c >= 32 && c <= 126));
            share[tag] += doc.size() + 1;
            docs++;
            std::string sep = (tag == 1 || tag == 4 || tag == 5) ? " " : "; ";
            if (tag == 5) {
                CHECK(text.size() >= 2);
                CHECK(text.substr(text.size() - 2) == " .");
                CHECK(text.find("a a") == std::string::npos);
                CHECK(text.find(" a o") == std::string::npos);  // "an old", "an owl"
            } else {
                for (const auto& it : split(text, sep)) check_item(tag, it);
            }
        }
        double total = 0;
        for (double x : share) total += x;
        for (int t = 1; t <= D; t++) {
            INFO(split_name << " domain " << synth_domain_names()[t - 1] << " share " << share[t] / total);
            CHECK(share[t] / total > 0.8 / D);
            CHECK(share[t] / total < 1.2 / D);
        }
        CHECK(docs > 100);
    }
}

TEST_CASE("synth corpus has structure: bigram entropy far below unigram entropy") {
    TempDir d;
    synth_corpus(d.path, 300000, 3, 0.05);
    std::string s = split_bytes(d.path, "train");
    std::vector<double> uni(256, 0), bi(256 * 256, 0);
    for (size_t i = 0; i + 1 < s.size(); i++) {
        uni[(unsigned char)s[i]]++;
        bi[(unsigned char)s[i] * 256 + (unsigned char)s[i + 1]]++;
    }
    double n = (double)s.size() - 1, h1 = 0, h2 = 0;  // h2 = H(next | previous byte)
    for (double c : uni)
        if (c) h1 -= c / n * std::log2(c / n);
    for (int a = 0; a < 256; a++)
        for (int b = 0; b < 256; b++)
            if (double c = bi[a * 256 + b]) h2 -= c / n * std::log2(c / uni[a]);
    INFO("unigram " << h1 << " bits, bigram " << h2 << " bits");
    CHECK(h2 < 0.75 * h1);
}

// ------------------------------------------------------------------------------------------------
// text corpus

TEST_CASE("text corpus: head to train, tail to val, equal shards, errors for tiny inputs") {
    TempDir d;
    std::string bytes;
    for (int i = 0; i < 1000; i++) bytes += char((i * 7) % 256);
    spit(d / "in.txt", bytes);
    std::vector<double> prog;
    SynthStats s = text_corpus(d / "in.txt", d / "out", 0.1, [&](double f) { prog.push_back(f); });
    CHECK(s.train_tokens == 900);
    CHECK(s.val_tokens == 100);
    CHECK(s.train_shards == 1);
    CHECK(split_bytes(d / "out", "train") == bytes.substr(0, 900));
    CHECK(split_bytes(d / "out", "val") == bytes.substr(900));
    REQUIRE(!prog.empty());
    CHECK(prog.back() == doctest::Approx(1.0));

    // 2.5 MB: 2,250,000 train bytes in three shards of 750,000, 250,000 val
    std::string big(2500000, 'x');
    for (size_t i = 0; i < big.size(); i++) big[i] = char('a' + (i * 2654435761u >> 13) % 26);
    spit(d / "big.txt", big);
    s = text_corpus(d / "big.txt", d / "out", 0.1);
    CHECK(s.train_shards == 3);
    CHECK(read_shard(d / "out/train_002.bin").size() == 750000);
    CHECK(split_bytes(d / "out", "train") == big.substr(0, 2250000));
    CHECK(split_bytes(d / "out", "val") == big.substr(2250000));

    // regenerating a smaller corpus in the same directory removes the now stale shards
    text_corpus(d / "in.txt", d / "out", 0.1);
    CHECK(expand_glob(d / "out/train_*.bin", "t") == std::vector<std::string>{d / "out/train_000.bin"});

    spit(d / "empty.txt", "");
    expect_error([&] { text_corpus(d / "empty.txt", d / "o2", 0.1); }, {"empty", "empty.txt"});
    spit(d / "tiny.txt", "abc");
    expect_error([&] { text_corpus(d / "tiny.txt", d / "o2", 0.1); }, {"3 bytes", "at least 2", "tiny.txt"});
    spit(d / "four.txt", "abcd");
    s = text_corpus(d / "four.txt", d / "o3", 0.5);  // the smallest input that works
    CHECK(s.train_tokens == 2);
    CHECK(s.val_tokens == 2);
    expect_error([&] { text_corpus(d / "missing.txt", d / "o2", 0.1); }, {"missing.txt"});
    expect_error([&] { text_corpus(d / "in.txt", d / "o2", 1.5); }, {"val fraction"});
    expect_error([&] { text_corpus(d / "in.txt", d / "in.txt", 0.1); }, {"not a directory"});
}
