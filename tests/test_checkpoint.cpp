/* Tests for checkpoint.cpp: safetensors round trips, the exact byte layout, rejection of every
   kind of corrupt file (hand-built in a mkdtemp directory), truncation at every length, atomic
   replacement, and a cross-check with an independent Python reader (json + struct only). */
#include "checkpoint.h"
#include "common.h"

#include <doctest/doctest.h>
#include <fmt/ranges.h>

#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <fstream>
#include <sstream>
#include <sys/resource.h>
#include <unistd.h>

using namespace moe;

namespace {

// A private directory, removed (one level deep) with everything in it at the end of the test.
struct TmpDir {
    std::string path;
    TmpDir() {
        char tmpl[] = "/tmp/moe_test_ckpt_XXXXXX";
        REQUIRE(mkdtemp(tmpl) != nullptr);
        path = tmpl;
    }
    ~TmpDir() {
        for (const std::string& name : list()) std::remove((path + "/" + name).c_str());
        rmdir(path.c_str());
    }
    std::string operator/(const std::string& name) const { return path + "/" + name; }
    std::vector<std::string> list() const {
        std::vector<std::string> out;
        if (DIR* d = opendir(path.c_str())) {
            while (dirent* e = readdir(d))
                if (std::strcmp(e->d_name, ".") && std::strcmp(e->d_name, "..")) out.push_back(e->d_name);
            closedir(d);
        }
        return out;
    }
};

std::string slurp(const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
}

void spit(const std::string& path, const std::string& bytes) {
    // Unlink first: truncating a written file makes ext4 flush it on close (auto_da_alloc),
    // which turns thousands of tiny writes into seconds.
    std::remove(path.c_str());
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f.write(bytes.data(), (std::streamsize)bytes.size());
    REQUIRE(f.good());
}

std::string u64le(uint64_t v) {
    std::string s(8, '\0');
    for (int i = 0; i < 8; i++) s[i] = (char)(uint8_t)(v >> (8 * i));
    return s;
}

// A hand-built file: length field, header (space-padded to 8 like real files), data.
std::string raw_file(std::string header, const std::string& data) {
    header.append((8 - header.size() % 8) % 8, ' ');
    return u64le(header.size()) + header + data;
}

// The moe::Error message of loading path, or "" if it loads. Any other exception fails the test.
std::string load_error(const std::string& path) {
    try {
        load_safetensors(path);
    } catch (const Error& e) {
        return e.what();
    }
    return "";
}

std::string f32_bytes(std::initializer_list<float> v) {
    std::string s(v.size() * 4, '\0');
    std::memcpy(&s[0], std::data(v), s.size());
    return s;
}

// A small valid file with several dtypes, used by the truncation and fuzz tests.
void save_sample(const std::string& path) {
    float a[6] = {1, 2, 3, 4, 5, 6};
    int32_t b[3] = {-1, 0, 7};
    uint16_t c[2] = {0x3F80, 0xC020};  // 1.0, -2.5
    save_safetensors(path, {{"a", "F32", {2, 3}, a}, {"b", "I32", {3}, b}, {"c", "BF16", {2}, c}},
                     {{"format", "moe-ckpt-1"}, {"step", "5"}});
}

}  // namespace

TEST_CASE("checkpoint: round trip of F32, I32, BF16, scalars and empty tensors") {
    TmpDir dir;
    std::string path = dir / "model_00000100.safetensors";
    std::vector<float> w(2 * 3 * 4);
    for (size_t i = 0; i < w.size(); i++) w[i] = 0.25f * (float)i - 3.0f;
    int32_t ids[5] = {0, -7, 2147483647, -2147483647 - 1, 42};
    uint16_t bf[3] = {0x3F80, 0xC020, 0x0000};  // 1.0, -2.5, 0.0
    float scalar = 3.5f;
    std::map<std::string, std::string> meta = {
        {"format", "moe-ckpt-1"}, {"step", "100"},
        {"config", "model:\n  n_layer: 2   # \"quoted\" \\ back\tslash\nname: café\n"}, {"empty", ""}};
    save_safetensors(path,
                     {{"h.0.w", "F32", {2, 3, 4}, w.data()}, {"ids", "I32", {5}, ids},
                      {"bf", "BF16", {3}, bf}, {"scalar", "F32", {}, &scalar},
                      {"empty_f", "F32", {0, 5}, nullptr}, {"empty_i", "I32", {3, 0}, nullptr}},
                     meta);

    SafeTensors st = load_safetensors(path);
    CHECK(st.path == path);
    CHECK(st.metadata == meta);
    CHECK(st.meta("config") == meta["config"]);
    CHECK(st.tensors.size() == 6);

    const TensorData& tw = st.get("h.0.w", {2, 3, 4});
    CHECK(tw.dtype == "F32");
    CHECK(tw.numel() == 24);
    CHECK(tw.f32() == w);
    CHECK(st.get("ids", {5}).i32() == std::vector<int32_t>(ids, ids + 5));
    CHECK(st.get("bf").dtype == "BF16");
    CHECK(st.get("bf", {3}).f32() == std::vector<float>{1.0f, -2.5f, 0.0f});
    const TensorData& ts = st.get("scalar");
    CHECK(ts.shape.empty());
    CHECK(ts.numel() == 1);
    CHECK(ts.f32() == std::vector<float>{3.5f});
    CHECK(st.get("empty_f", {0, 5}).numel() == 0);
    CHECK(st.get("empty_f").f32().empty());
    CHECK(st.get("empty_i", {3, 0}).i32().empty());
    CHECK(st.has("ids"));
    CHECK_FALSE(st.has("nope"));

    float buf[3] = {9, 9, 9};
    st.get("bf").to_f32(buf);
    CHECK(buf[1] == -2.5f);
    CHECK_THROWS_AS(st.get("ids").to_f32(buf), Error);
    CHECK_THROWS_AS(st.get("h.0.w").i32(), Error);
    CHECK_THROWS_AS(st.get("bf").i32(), Error);

    // Error messages say what and where.
    CHECK_THROWS_WITH_AS(st.get("h.0.attn.c_attn.weight"),
                         ("missing tensor h.0.attn.c_attn.weight (" + path + ")").c_str(), Error);
    CHECK_THROWS_WITH_AS(st.get("h.0.w", {4, 3, 2}),
                         ("tensor h.0.w has shape [2, 3, 4], expected [4, 3, 2] (" + path + ")").c_str(), Error);
    CHECK_THROWS_AS(st.get("scalar", {1}), Error);
    CHECK_THROWS_WITH_AS(st.meta("seed"), ("missing metadata seed (" + path + ")").c_str(), Error);

    // No tensors and no metadata is still a valid file.
    save_safetensors(dir / "empty.safetensors", {}, {});
    SafeTensors e = load_safetensors(dir / "empty.safetensors");
    CHECK(e.tensors.empty());
    CHECK(e.metadata.empty());
}

TEST_CASE("checkpoint: byte-exact layout of a tiny file") {
    TmpDir dir;
    std::string path = dir / "tiny.safetensors";
    float a[2] = {1.0f, -2.0f};
    int32_t b = 7;
    save_safetensors(path, {{"a", "F32", {2}, a}, {"b", "I32", {}, &b}}, {{"k", "v"}});

    // 132 bytes of JSON, padded with 4 spaces to 136 so the data starts at byte 144 (8-aligned);
    // tensors in the order given, offsets relative to the data section.
    std::string json = "{\"__metadata__\":{\"k\":\"v\"},"
                       "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                       "\"b\":{\"dtype\":\"I32\",\"shape\":[],\"data_offsets\":[8,12]}}";
    REQUIRE(json.size() == 132);
    std::string expect = std::string("\x88\0\0\0\0\0\0\0", 8) + json + "    " +
                         std::string("\x00\x00\x80\x3f" "\x00\x00\x00\xc0" "\x07\x00\x00\x00", 12);
    std::string got = slurp(path);
    CHECK(got.size() == 156);
    CHECK(got == expect);
}

TEST_CASE("checkpoint: every kind of corrupt file is rejected with an error naming the file") {
    TmpDir dir;
    std::string path = dir / "bad.safetensors";
    const std::string t8 = f32_bytes({1, 2});  // 8 data bytes
    struct Case { std::string name, bytes, expect; };
    std::string deep(100000, '[');
    std::vector<Case> cases = {
        {"empty file", "", "file is 0 bytes"},
        {"shorter than 8 bytes", std::string("\x10\0\0", 3), "file is 3 bytes"},
        {"header length 0", u64le(0) + "{}", "header length is 0"},
        {"header length past the end", u64le(64) + "{}      ", "header length 64 but only 8 bytes follow"},
        {"absurd header length", u64le(~0ull) + "{}      ", "exceeds"},
        {"header length just over the cap", u64le(100000001) + "{}      ", "exceeds"},
        {"header not JSON", raw_file("{not json", ""), "not valid JSON"},
        {"header with a NUL", raw_file(std::string("{\"a\0\":1}", 8), ""), "not valid JSON"},
        {"header not UTF-8", raw_file("{\"\xff\xfe\":{}}", ""), "not valid JSON"},
        {"header deeply nested", raw_file(deep, ""), "not valid JSON"},
        {"deep but valid JSON", raw_file("{\"a\":" + std::string(200000, '[') + std::string(200000, ']') + "}", ""),
         "tensor a: entry is not an object"},
        {"header is an array", raw_file("[1,2]", ""), "not a JSON object"},
        {"header is a number", raw_file("12", ""), "not a JSON object"},
        {"metadata not an object", raw_file("{\"__metadata__\":[\"x\"]}", ""), "__metadata__ is not an object"},
        {"metadata value a number", raw_file("{\"__metadata__\":{\"step\":5}}", ""), "metadata step is not a string"},
        {"entry not an object", raw_file("{\"a\":[1]}", ""), "tensor a: entry is not an object"},
        {"missing dtype", raw_file("{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", t8), "tensor a: missing dtype"},
        {"missing shape", raw_file("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", t8), "missing shape"},
        {"missing data_offsets", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", t8), "missing data_offsets"},
        {"dtype a number", raw_file("{\"a\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}", t8), "dtype is not a string"},
        {"unknown dtype", raw_file("{\"a\":{\"dtype\":\"F64\",\"shape\":[1],\"data_offsets\":[0,8]}}", t8), "unknown dtype 'F64'"},
        {"shape a string", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":\"2\",\"data_offsets\":[0,8]}}", t8), "shape is not an array"},
        {"shape holds a float", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", t8), "non-integer"},
        {"shape holds a bool", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[true],\"data_offsets\":[0,8]}}", t8), "non-integer"},
        {"negative dim", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", t8), "invalid dimension -2"},
        {"dim beyond int64", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[18446744073709551615],\"data_offsets\":[0,8]}}", t8), "invalid dimension"},
        {"numel overflows", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,4],\"data_offsets\":[0,8]}}", t8), "too large"},
        {"bytes overflow", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],\"data_offsets\":[0,8]}}", t8), "too large"},
        {"numel does not match offsets", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", t8), "needs 12 bytes"},
        {"offsets one number", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8]}}", t8), "data_offsets is not"},
        {"offsets negative", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[-8,0]}}", t8), "data_offsets is not"},
        {"offsets strings", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[\"0\",\"8\"]}}", t8), "data_offsets is not"},
        {"offsets reversed", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}", t8), "end before they begin"},
        {"offsets beyond the data", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", t8), "data section holds 8 bytes, header needs 16"},
        {"offsets near 2^64", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[18446744073709551608,18446744073709551615]}}", t8), "needs 8 bytes"},
        {"overlapping tensors", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                                         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", t8 + "abcd"), "overlaps"},
        {"same offsets twice", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
                                        "\"b\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[0,8]}}", t8), "overlaps"},
        {"gap between tensors", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                                         "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", t8 + "abcd"), "gap of 4 bytes before tensor b"},
        {"trailing garbage", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", t8 + "x"), "trailing"},
        {"data with no tensors", raw_file("{}", "x"), "trailing"},
        {"truncated data", raw_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[100],\"data_offsets\":[0,400]}}", std::string(100, 'z')),
         "truncated checkpoint (" + path + ": data section holds 100 bytes, header needs 400)"},
    };
    for (const Case& c : cases) {
        CAPTURE(c.name);
        spit(path, c.bytes);
        std::string msg = load_error(path);
        CAPTURE(msg);
        CHECK(msg.find(path) != std::string::npos);
        CHECK(msg.find(c.expect) != std::string::npos);
    }

    // Not a file at all.
    CHECK(load_error(dir / "missing.safetensors").find("cannot read checkpoint") != std::string::npos);
    CHECK(load_error(dir.path).find("not a regular file") != std::string::npos);
}

TEST_CASE("checkpoint: a truncated file errors cleanly at every length") {
    TmpDir dir;
    std::string good = dir / "good.safetensors", cut = dir / "cut.safetensors";
    save_sample(good);
    std::string bytes = slurp(good);
    REQUIRE(load_error(good) == "");
    for (size_t n = 0; n < bytes.size(); n++) {
        CAPTURE(n);
        spit(cut, bytes.substr(0, n));
        CHECK(load_error(cut) != "");
    }

    // A bigger file: a stride of lengths, plus every length around the header/data boundary.
    std::vector<float> big(50000);
    for (size_t i = 0; i < big.size(); i++) big[i] = (float)i;
    save_safetensors(good, {{"x", "F32", {50000}, big.data()}, {"y", "F32", {10}, big.data()}}, {});
    bytes = slurp(good);
    size_t data_start = bytes.size() - 50010 * 4;
    for (size_t n = 0; n < bytes.size(); n += (n > data_start + 16 ? 4093 : 1)) {
        CAPTURE(n);
        spit(cut, bytes.substr(0, n));
        std::string msg = load_error(cut);
        CHECK(msg.find("checkpoint (" + cut) != std::string::npos);
    }
    spit(cut, bytes.substr(0, bytes.size() - 1));
    CHECK(load_error(cut).find("truncated checkpoint") != std::string::npos);
    CHECK(load_safetensors(good).get("x").f32() == big);
}

TEST_CASE("checkpoint: single-byte corruptions load or throw moe::Error, never crash") {
    TmpDir dir;
    std::string good = dir / "good.safetensors", bad = dir / "bad.safetensors";
    save_sample(good);
    std::string bytes = slurp(good);
    int loaded = 0, rejected = 0;
    for (size_t i = 0; i < bytes.size(); i++) {
        for (char v : {'\0', '\xff', '"', '9', '-', '[', '}', ' '}) {
            if (bytes[i] == v) continue;
            std::string b = bytes;
            b[i] = v;
            spit(bad, b);
            CAPTURE(i);
            try {
                SafeTensors st = load_safetensors(bad);
                for (auto& [name, t] : st.tensors)  // whatever loaded is self-consistent
                    CHECK((int64_t)t.bytes.size() == t.numel() * (t.dtype == "BF16" ? 2 : 4));
                loaded++;
            } catch (const Error&) {
                rejected++;
            }
        }
    }
    CHECK(rejected > 0);
    CHECK(loaded > 0);  // flips inside tensor data or metadata strings are legitimately loadable
}

TEST_CASE("checkpoint: save validates its inputs") {
    TmpDir dir;
    std::string path = dir / "x.safetensors";
    float a[2] = {1, 2};
    CHECK_THROWS_AS(save_safetensors(path, {{"a", "F64", {2}, a}}, {}), Error);
    CHECK_THROWS_AS(save_safetensors(path, {{"a", "F32", {2}, a}, {"a", "F32", {2}, a}}, {}), Error);
    CHECK_THROWS_AS(save_safetensors(path, {{"a", "F32", {-2}, a}}, {}), Error);
    CHECK_THROWS_AS(save_safetensors(path, {{"__metadata__", "F32", {2}, a}}, {}), Error);
    CHECK_THROWS_AS(save_safetensors(path, {{"", "F32", {2}, a}}, {}), Error);
    CHECK_THROWS_AS(save_safetensors(path, {{"a", "F32", {2}, nullptr}}, {}), Error);
    CHECK_THROWS_AS(save_safetensors(path, {{"a", "F32", {1ll << 62, 8}, a}}, {}), Error);
    CHECK_THROWS_AS(save_safetensors(path, {{"\xff", "F32", {2}, a}}, {}), Error);  // not UTF-8
    CHECK(dir.list().empty());  // nothing written, not even a temp file
}

TEST_CASE("checkpoint: save replaces atomically; a failed save keeps the old file") {
    TmpDir dir;
    std::string path = dir / "model.safetensors";
    float a[2] = {1, 2}, b[3] = {3, 4, 5};
    save_safetensors(path, {{"w", "F32", {2}, a}}, {{"step", "1"}});
    save_safetensors(path, {{"w", "F32", {3}, b}}, {{"step", "2"}});
    CHECK(dir.list() == std::vector<std::string>{"model.safetensors"});
    SafeTensors st = load_safetensors(path);
    CHECK(st.meta("step") == "2");
    CHECK(st.get("w", {3}).f32() == std::vector<float>{3, 4, 5});
    std::string before = slurp(path);

    // Directory does not exist.
    CHECK_THROWS_AS(save_safetensors(dir / "nope/model.safetensors", {{"w", "F32", {2}, a}}, {}), Error);
    // Invalid input over an existing file.
    CHECK_THROWS_AS(save_safetensors(path, {{"w", "F32", {2}, a}, {"w", "F32", {2}, a}}, {}), Error);
    // Disk full mid-write, simulated with a file size limit: the write fails, the old file stays.
    {
        std::vector<float> big(1 << 20, 1.0f);  // 4 MB against a 64 KB limit
        rlimit old_lim;
        REQUIRE(getrlimit(RLIMIT_FSIZE, &old_lim) == 0);
        rlimit lim = old_lim;
        lim.rlim_cur = 64 * 1024;
        auto old_sig = std::signal(SIGXFSZ, SIG_IGN);  // else the kernel kills us on the short write
        REQUIRE(setrlimit(RLIMIT_FSIZE, &lim) == 0);
        bool threw = false;
        try {
            save_safetensors(path, {{"w", "F32", {1 << 20}, big.data()}}, {{"step", "3"}});
        } catch (const Error&) {
            threw = true;
        }
        setrlimit(RLIMIT_FSIZE, &old_lim);
        std::signal(SIGXFSZ, old_sig);
        CHECK(threw);
    }
    CHECK(slurp(path) == before);
    CHECK(dir.list() == std::vector<std::string>{"model.safetensors"});
    CHECK(load_safetensors(path).meta("step") == "2");
}

TEST_CASE("checkpoint: an independent Python reader agrees") {
    if (access("/usr/bin/python3", X_OK) != 0) {
        MESSAGE("skipped: /usr/bin/python3 not found");
        return;
    }
    TmpDir dir;
    std::string path = dir / "model.safetensors", script = dir / "read.py";
    std::vector<float> w(37);
    for (size_t i = 0; i < w.size(); i++) w[i] = std::sin((float)i) * 10.0f;
    int32_t ids[4] = {5, -9, 1 << 30, 0};
    uint16_t bf[4] = {0x3F80, 0xC020, 0x4049, 0xBE00};
    float scalar = -0.125f;
    std::map<std::string, std::string> meta = {{"format", "moe-ckpt-1"}, {"config", "a: 1\nb: \"x\"\n"}};
    std::vector<TensorView> views = {{"wte", "F32", {37}, w.data()}, {"h.0.moe.router.hash_table", "I32", {2, 2}, ids},
                                     {"bf", "BF16", {4}, bf}, {"s", "F32", {}, &scalar}, {"z", "F32", {0}, nullptr}};
    save_safetensors(path, views, meta);

    // Reads the file the way any safetensors reader must: no code shared with ours. If the real
    // safetensors package happens to be installed it is checked too.
    spit(script, R"PY(
import json, struct, sys
b = open(sys.argv[1], 'rb').read()
n, = struct.unpack('<Q', b[:8])
assert n % 8 == 0, 'header not 8-aligned'
h = json.loads(b[8:8 + n])
data = b[8 + n:]
meta = h.pop('__metadata__', {})
pos = 0
for name, e in sorted(h.items(), key=lambda kv: kv[1]['data_offsets']):
    s, t = e['data_offsets']
    assert s == pos, 'not contiguous'
    pos = t
assert pos == len(data), 'data section size'
for k in sorted(meta):
    print('meta', k, len(meta[k].encode()), sum(meta[k].encode()))
for name in sorted(h):
    e = h[name]
    s, t = e['data_offsets']
    raw = data[s:t]
    if e['dtype'] == 'F32':
        vals = struct.unpack('<%df' % (len(raw) // 4), raw)
    elif e['dtype'] == 'I32':
        vals = struct.unpack('<%di' % (len(raw) // 4), raw)
    else:
        bits = struct.unpack('<%dH' % (len(raw) // 2), raw)
        vals = [struct.unpack('<f', struct.pack('<I', x << 16))[0] for x in bits]
    print(name, e['dtype'], ','.join(map(str, e['shape'])), '%.6f' % sum(vals))
try:
    from safetensors import safe_open
except ImportError:
    sys.exit(0)
with safe_open(sys.argv[1], framework='numpy') as f:
    assert sorted(f.keys()) == sorted(h), 'safetensors keys'
    assert (f.metadata() or {}) == meta, 'safetensors metadata'
print('safetensors ok')
)PY");

    // The same summary computed from what we load.
    SafeTensors st = load_safetensors(path);
    std::string expect;
    for (auto& [k, v] : st.metadata) {
        long sum = 0;
        for (unsigned char ch : v) sum += ch;
        expect += fmt::format("meta {} {} {}\n", k, v.size(), sum);
    }
    for (auto& [name, t] : st.tensors) {
        double sum = 0;
        if (t.dtype == "I32") for (int32_t x : t.i32()) sum += x;
        else for (float x : t.f32()) sum += x;
        expect += fmt::format("{} {} {} {:.6f}\n", name, t.dtype, fmt::join(t.shape, ","), sum);
    }

    std::string got;
    FILE* p = popen(("/usr/bin/python3 " + script + " " + path + " 2>&1").c_str(), "r");
    REQUIRE(p != nullptr);
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) got.append(buf, n);
    int rc = pclose(p);
    CHECK(rc == 0);
    const std::string ok = "safetensors ok\n";
    if (got.size() >= ok.size() && got.compare(got.size() - ok.size(), ok.size(), ok) == 0) {
        MESSAGE("also checked with the safetensors package");
        got.resize(got.size() - ok.size());
    }
    CHECK(got == expect);
}
