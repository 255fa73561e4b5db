/* Each subcommand file registers itself on the CLI11 app; main.cpp wires them up. Subcommand
   callbacks throw moe::Error for user errors; main prints "error: ..." and exits 1. */
#pragma once
#include <CLI/CLI.hpp>

namespace moe {
void register_train_command(CLI::App& app);
void register_eval_command(CLI::App& app);
void register_data_commands(CLI::App& app);
void register_upcycle_command(CLI::App& app);
void register_bench_command(CLI::App& app);
void register_plan_command(CLI::App& app);
}  // namespace moe
