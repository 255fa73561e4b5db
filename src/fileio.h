/* File helpers with user-facing errors. AtomicFile is the one way this project writes a file
   that matters (checkpoints, shards, metrics summaries): bytes go to "<path>.tmp.<pid>", then
   fsync, rename over <path>, fsync of the directory. Until commit() the final path is untouched;
   a destroyed, uncommitted AtomicFile removes its temp file. */
#pragma once
#include <cstdint>
#include <cstdio>
#include <string>

namespace moe {

class AtomicFile {
public:
    explicit AtomicFile(const std::string& path);  // throws if the temp file cannot be created
    ~AtomicFile();
    AtomicFile(const AtomicFile&) = delete;
    AtomicFile& operator=(const AtomicFile&) = delete;
    void write(const void* data, size_t nbytes);   // throws on short write (disk full, ulimit -f)
    void commit();                                 // flush, fsync, rename, fsync dir
private:
    std::string path_, tmp_;
    FILE* f_ = nullptr;
};

// Whole file into memory; throws "cannot read <what> (<path>): <reason>".
std::string read_file(const std::string& path, const std::string& what);
bool file_exists(const std::string& path);
void make_dirs(const std::string& dir);            // mkdir -p; throws on failure

}  // namespace moe
