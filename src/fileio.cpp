/* File helpers: atomic writes, whole-file reads, mkdir -p. See fileio.h. */
#include "fileio.h"
#include "common.h"

#include <cerrno>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace moe {

AtomicFile::AtomicFile(const std::string& path) : path_(path) {
    // SIGXFSZ (ulimit -f) would kill us mid-write; as an error instead, the old file survives.
    std::signal(SIGXFSZ, SIG_IGN);
    tmp_ = path + ".tmp." + std::to_string(getpid());
    f_ = std::fopen(tmp_.c_str(), "wb");
    if (!f_) fail("cannot create {} ({})", tmp_, std::strerror(errno));
}

AtomicFile::~AtomicFile() {
    if (f_) { std::fclose(f_); std::remove(tmp_.c_str()); }
}

void AtomicFile::write(const void* data, size_t nbytes) {
    if (nbytes == 0) return;
    if (std::fwrite(data, 1, nbytes, f_) != nbytes)
        fail("write failed ({}: {})", path_, std::strerror(errno));
}

void AtomicFile::commit() {
    if (std::fflush(f_) != 0 || fsync(fileno(f_)) != 0) {
        int e = errno;
        fail("write failed ({}: {})", path_, std::strerror(e));
    }
    if (std::fclose(f_) != 0) { f_ = nullptr; std::remove(tmp_.c_str()); fail("write failed ({})", path_); }
    f_ = nullptr;
    if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
        int e = errno;
        std::remove(tmp_.c_str());
        fail("cannot rename {} to {} ({})", tmp_, path_, std::strerror(e));
    }
    std::string dir = path_.find('/') == std::string::npos ? "." : path_.substr(0, path_.rfind('/'));
    if (dir.empty()) dir = "/";
    int fd = open(dir.c_str(), O_RDONLY);
    if (fd >= 0) { fsync(fd); close(fd); }
}

std::string read_file(const std::string& path, const std::string& what) {
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) fail("cannot read {} ({}: {})", what, path, std::strerror(errno));
    std::string out;
    char buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
    bool bad = std::ferror(f);
    std::fclose(f);
    if (bad) fail("cannot read {} ({}: read error)", what, path);
    return out;
}

bool file_exists(const std::string& path) {
    struct stat st;
    return stat(path.c_str(), &st) == 0;
}

void make_dirs(const std::string& dir) {
    if (dir.empty()) return;
    std::string cur;
    for (size_t i = 0; i <= dir.size(); i++) {
        if (i == dir.size() || dir[i] == '/') {
            struct stat st;
            if (!cur.empty() && stat(cur.c_str(), &st) == 0 && !S_ISDIR(st.st_mode))
                fail("cannot create directory {} (a file of that name is in the way)", cur);
            if (!cur.empty() && !file_exists(cur) && mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST)
                fail("cannot create directory {} ({})", cur, std::strerror(errno));
        }
        if (i < dir.size()) cur += dir[i];
    }
}

}  // namespace moe
