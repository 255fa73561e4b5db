/* Token data: llm.c shards (256 x int32 header, magic 20240520, version 1, token count; then
   uint16 tokens), deterministic batching over a glob of shards, and the two corpus makers
   behind `moe data synth` (multi-domain synthetic corpus) and `moe data text` (bytes). */
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace moe {

constexpr int SHARD_MAGIC = 20240520;
constexpr int SHARD_VERSION = 1;
constexpr int SHARD_HEADER_INTS = 256;

// Writes atomically (temp file, fsync, rename). Throws moe::Error on I/O failure.
void write_shard(const std::string& path, const std::vector<uint16_t>& tokens);
// Reads and validates a whole shard: magic, version, token count vs file size.
std::vector<uint16_t> read_shard(const std::string& path);
// The same checks on a whole shard file in memory; `name` stands in for the path in errors.
std::vector<uint16_t> parse_shard(const std::string& bytes, const std::string& name);
// Expands a glob; sorted by name. Throws "error: no files match <pattern> (<what>)" if empty.
std::vector<std::string> expand_glob(const std::string& pattern, const std::string& what);

// Sequential batches over the shards of a glob, llm.c style: batch covers tokens
// [pos, pos + B*T + 1); inputs = tokens[pos .. pos+B*T), targets shifted by one.
// With `world` ranks, rank r reads the r-th B*T slice of every world*B*T global batch.
// When a shard has too few tokens left for the next batch, the loader moves to the next
// shard, and after the last one wraps to the first. Every token is checked < vocab_size
// when its shard is loaded (error names the shard and the token index).
class DataLoader {
public:
    DataLoader(const std::string& pattern, int B, int T, int vocab_size,
               int rank = 0, int world = 1, const std::string& what = "data");
    void next_batch(int* inputs, int* targets);  // each (B, T)
    void reset();                                // back to the start of the first shard
    struct Position { uint64_t shard = 0, offset = 0; };
    Position position() const;                   // where the next batch starts (for resume)
    void set_position(const Position& p);
    uint64_t total_tokens() const;               // over all shards
    const std::vector<std::string>& files() const { return files_; }
    int batch_size() const { return B_; }
    int seq_len() const { return T_; }
private:
    void load_shard(uint64_t idx);
    std::vector<std::string> files_;
    std::vector<uint16_t> tokens_;  // the current shard
    int B_, T_, vocab_, rank_, world_;
    uint64_t shard_ = 0, offset_ = 0, total_ = 0;
    std::string what_;
};

// Synthetic multi-domain corpus. Each document starts with a domain tag byte (1..D) followed
// by printable ASCII text and ends with '\n'. Deterministic for a given (tokens, seed).
const std::vector<std::string>& synth_domain_names();  // index d-1 names tag byte d
struct SynthStats { uint64_t train_tokens = 0, val_tokens = 0; int train_shards = 0, val_shards = 0; };
SynthStats synth_corpus(const std::string& out_dir, uint64_t tokens, uint64_t seed, double val_frac,
                        const std::function<void(double)>& progress = nullptr);
// Any file as bytes (vocab 256): the last val_frac of it becomes val_000.bin, the rest train_*.bin.
SynthStats text_corpus(const std::string& in_path, const std::string& out_dir, double val_frac,
                       const std::function<void(double)>& progress = nullptr);

}  // namespace moe
