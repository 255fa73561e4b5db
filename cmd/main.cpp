/* `moe`: one binary, one subcommand per file in cmd/. Every user error surfaces here as one line
   "error: <what> (<where>)" with exit status 1; usage errors exit 2. */
#include "commands.h"
#include "common.h"
#include "device.h"

#include <cstdio>
#include <new>

int main(int argc, char** argv) {
    CLI::App app{"moe: train, evaluate and upcycle Mixture-of-Experts GPTs (CPU/OpenMP and CUDA)", "moe"};
    app.require_subcommand(1);
    app.set_version_flag("--version", moe::build_info());
    moe::register_train_command(app);
    moe::register_eval_command(app);
    moe::register_upcycle_command(app);
    moe::register_data_commands(app);
    moe::register_bench_command(app);
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
        std::fflush(stdout);
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    } catch (const std::bad_alloc&) {
        std::fflush(stdout);
        std::fprintf(stderr, "error: out of memory\n");
        return 1;
    } catch (const std::exception& e) {
        std::fflush(stdout);
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
