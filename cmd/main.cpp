/* `moe`: one binary, one subcommand per file in cmd/. Every user error surfaces here as one line
   "error: <what> (<where>)" with exit status 1; usage errors exit 2. */
#include <malloc.h>
#include "commands.h"
#include "common.h"
#include "device.h"
#include "dist.h"

#include <cstdio>
#include <new>

// With several ranks a failing rank takes the others down (MPI_Abort) instead of leaving them
// blocked in a collective; its message names the rank.
static int fail_exit(const char* msg) {
    std::fflush(stdout);
    moe::Dist& d = moe::Dist::get();
    if (d.active()) {
        std::fprintf(stderr, "error: %s (rank %d of %d)\n", msg, d.rank, d.world);
        std::fflush(stderr);
        d.abort(1);
    }
    std::fprintf(stderr, "error: %s\n", msg);
    return 1;
}

static int run(int argc, char** argv) {
    CLI::App app{"moe: train, evaluate and upcycle Mixture-of-Experts GPTs (CPU/OpenMP and CUDA)", "moe"};
    app.require_subcommand(1);
    app.set_version_flag("--version", moe::build_info());
    moe::register_train_command(app);
    moe::register_eval_command(app);
    moe::register_upcycle_command(app);
    moe::register_data_commands(app);
    moe::register_bench_command(app);
    moe::register_plan_command(app);
    try {
        app.parse(argc, argv);
    } catch (const CLI::CallForHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForAllHelp& e) {
        return app.exit(e);
    } catch (const CLI::CallForVersion& e) {
        return app.exit(e);
    } catch (const CLI::ParseError& e) {
        std::fprintf(stderr, "error: %s (run with --help for usage)\n", e.what());
        return 2;
    } catch (const moe::Error& e) {
        return fail_exit(e.what());
    } catch (const std::bad_alloc&) {
        return fail_exit("out of memory");
    } catch (const std::exception& e) {
        return fail_exit(e.what());
    }
    return 0;
}

int main(int argc, char** argv) {
#ifdef __GLIBC__
    // A training step allocates and frees the same host scratch every step (the routing's (N, E)
    // arrays, a few hundred KB each). glibc serves blocks of 128 KB and more by mmap and gives
    // freed heap tops back to the kernel, so every step paid page faults for them again (with 64
    // experts, a fifth of the routing's time). Keep freed memory in the process instead.
    mallopt(M_MMAP_THRESHOLD, 256 << 20);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
    moe::Dist::get().init(&argc, &argv);
    int rc = run(argc, argv);
    moe::Dist::get().finalize();
    return rc;
}
