/* llm.c token shards: parse_shard (bytes in memory) and read_shard (the same bytes as a file)
   must both accept or both reject every input, and agree on the tokens. */
#include "common.h"
#include "data.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    const std::string bytes((const char*)data, size);
    std::vector<uint16_t> mem, file;
    bool mem_ok = true, file_ok = true;
    try {
        mem = moe::parse_shard(bytes, "fuzz.bin");
    } catch (const moe::Error&) {
        mem_ok = false;
    }
    try {
        file = moe::read_shard(moe_fuzz::as_file(bytes));
    } catch (const moe::Error&) {
        file_ok = false;
    }
    if (mem_ok != file_ok) moe_fuzz::invariant_failed("file and memory shard readers disagree");
    if (mem_ok && mem != file) moe_fuzz::invariant_failed("file and memory shard readers return different tokens");
    return 0;
}
