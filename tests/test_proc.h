/* Process helpers for the crash, signal and error-path tests (test_crash.cpp,
   test_hardening.cpp): start the moe binary in the background, signal it, wait for it. */
#pragma once
#include <doctest/doctest.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <dirent.h>
#include <spawn.h>
#include <string>
#include <sys/wait.h>
#include <vector>

extern char** environ;

namespace moe_test {

// Starts `sh -c 'exec CMD'` (so the pid is the command's own, not a shell's) with SIGINT and
// SIGTERM at their default dispositions whatever this process inherited; returns the pid.
inline pid_t spawn_shell(const std::string& cmd) {
    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t def;
    sigemptyset(&def);
    sigaddset(&def, SIGINT);
    sigaddset(&def, SIGTERM);
    posix_spawnattr_setsigdefault(&attr, &def);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF);
    std::string full = "exec " + cmd;
    const char* argv[] = {"sh", "-c", full.c_str(), nullptr};
    pid_t pid = -1;
    int rc = posix_spawn(&pid, "/bin/sh", nullptr, &attr, const_cast<char**>(argv), environ);
    posix_spawnattr_destroy(&attr);
    REQUIRE(rc == 0);
    return pid;
}

// Exit status, or -signal when it was killed by one.
inline int wait_status(pid_t pid) {
    int st = 0;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR) return -999;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
}

// Names in a directory, sorted, without . and ..; empty if it does not exist.
inline std::vector<std::string> list_dir(const std::string& dir) {
    std::vector<std::string> names;
    if (DIR* d = opendir(dir.c_str())) {
        while (dirent* e = readdir(d))
            if (std::string(e->d_name) != "." && std::string(e->d_name) != "..") names.push_back(e->d_name);
        closedir(d);
    }
    std::sort(names.begin(), names.end());
    return names;
}

}  // namespace moe_test
