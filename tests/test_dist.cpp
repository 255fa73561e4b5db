/* Expert + data parallelism on OpenMPI, on this CPU (ranks oversubscribed): N ranks with batch
   B each train exactly like one process with batch B and grad_accum N (the same global batch,
   the same micro-batches), step by step, for dropless top-k, capacity dropping, the aux-loss-free
   bias and the global aux scope; a checkpoint written by 4 ranks evaluates the same in one
   process; bad layouts and a failing rank end every rank with an error, none hangs. */
#include <doctest/doctest.h>

#include "test_util.h"

#include <cmath>
#include <fmt/format.h>
#include <fstream>
#include <regex>

using namespace moe_test;

namespace {

bool have_mpirun() { return run("command -v mpirun").status == 0; }

std::string mpirun(int np) {
    // root in CI containers; bounded time so a hang fails instead of blocking the suite
    return fmt::format("OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 "
                       "timeout 300 mpirun --oversubscribe -np {} ", np);
}

std::vector<double> losses_of(const std::string& out) {
    std::vector<double> l;
    std::regex re(R"(step +\d+/\d+ \| loss ([0-9.]+))");
    for (std::sregex_iterator it(out.begin(), out.end(), re), end; it != end; ++it) l.push_back(std::stod((*it)[1]));
    return l;
}

struct Fixture {
    TempDir dir;
    Fixture() {
        RunResult r = run(moe_bin() + " data synth --out " + (dir / "data") + " --tokens 200k");
        REQUIRE(r.status == 0);
        std::ofstream(dir / "c.yaml") << fmt::format(R"(model: {{vocab_size: 256, seq_len: 32, n_layer: 2, n_head: 2, d_model: 32, d_ff: 64,
        moe: {{experts: 4, top_k: 2, expert_ff: 32}}}}
train: {{batch_size: 2, steps: 10, warmup: 2, eval_every: 0, eval_batches: 2, ckpt_every: 0, threads: 1}}
data: {{train: {}/train_*.bin, val: {}/val_*.bin}}
)", dir / "data", dir / "data");
    }
};

}  // namespace

TEST_CASE("dist: N ranks == one process with grad_accum N, for every balancing mode") {
    if (!have_mpirun()) { FAIL("mpirun not found: install openmpi-bin (make deps)"); }
    Fixture f;
    const std::vector<std::pair<std::string, std::string>> modes = {
        {"dropless top-k", ""},
        {"capacity dropping", "--set router.capacity_factor=1.0"},
        {"aux-loss-free bias", "--set router.score=sigmoid --set balance.bias_rate=0.01"},
        {"global aux scope", "--set balance.aux_loss=0.1 --set balance.aux_scope=global"},
    };
    const std::vector<std::pair<int, int>> layouts = {{2, 2}, {4, 4}, {4, 2}, {2, 1}};  // (ranks, EP)
    for (const auto& [name, sets] : modes) {
        for (const auto& [np, ep] : layouts) {
            if (name != "dropless top-k" && np == 2 && ep == 1) continue;  // pure DP is covered once
            CAPTURE(name);
            CAPTURE(np);
            CAPTURE(ep);
            std::string base = moe_bin() + " train " + (f.dir / "c.yaml") + " " + sets;
            RunResult one = run(base + fmt::format(" --set train.grad_accum={} --set train.out_dir={}", np, f.dir / "one"));
            REQUIRE(one.status == 0);
            RunResult many = run(mpirun(np) + base + fmt::format(" --set dist.expert_parallel={} --set train.out_dir={}",
                                                                 ep, f.dir / "many"));
            INFO(many.output);
            REQUIRE(many.status == 0);
            std::vector<double> a = losses_of(one.output), b = losses_of(many.output);
            REQUIRE(a.size() == 10);
            REQUIRE(b.size() == 10);  // rank 0 alone prints
            for (int i = 0; i < 10; i++) CHECK(std::fabs(a[i] - b[i]) <= 1e-5 * std::fabs(a[i]));
            if (name == "capacity dropping") CHECK(many.output.find("drop 0.0%") == std::string::npos);
            if (ep > 1) CHECK(many.output.find("| a2a ") != std::string::npos);
        }
    }
}

TEST_CASE("dist: a checkpoint written by 4 ranks evaluates the same in one process, and resumes there") {
    if (!have_mpirun()) { FAIL("mpirun not found"); }
    Fixture f;
    std::string base = moe_bin() + " train " + (f.dir / "c.yaml");
    RunResult many = run(mpirun(4) + base + " --set dist.expert_parallel=2 --set train.out_dir=" + (f.dir / "many"));
    INFO(many.output);
    REQUIRE(many.status == 0);
    RunResult one = run(base + " --set train.grad_accum=4 --set train.out_dir=" + (f.dir / "one"));
    REQUIRE(one.status == 0);
    RunResult ea = run(moe_bin() + " eval --json --ckpt " + (f.dir / "many"));
    RunResult eb = run(moe_bin() + " eval --json --ckpt " + (f.dir / "one"));
    REQUIRE(ea.status == 0);
    REQUIRE(eb.status == 0);
    auto loss = [](const std::string& s) { return std::stod(s.substr(s.find("\"loss\":") + 7)); };
    CHECK(std::fabs(loss(ea.output) - loss(eb.output)) <= 1e-5 * loss(eb.output));
    // resume the 4-rank run in one process (grad_accum 4 keeps the global batch)
    RunResult res = run(base + " --set train.grad_accum=4 --set train.steps=12 --set train.out_dir=" + (f.dir / "many") +
                        " --resume latest");
    INFO(res.output);
    CHECK(res.status == 0);
    CHECK(res.output.find("step 12/12") != std::string::npos);
}

TEST_CASE("dist: bad layouts and a failing rank end every rank with an error") {
    if (!have_mpirun()) { FAIL("mpirun not found"); }
    Fixture f;
    std::string base = moe_bin() + " train " + (f.dir / "c.yaml") + " --set train.out_dir=" + (f.dir / "bad");
    RunResult r = run(mpirun(2) + base + " --set dist.expert_parallel=3");
    CHECK(r.status != 0);
    CHECK(r.output.find("error: ") != std::string::npos);
    CHECK(r.output.find("expert_parallel") != std::string::npos);
    r = run(mpirun(3) + base + " --set dist.expert_parallel=2");
    CHECK(r.status != 0);
    CHECK(r.output.find("world size 3 is not divisible") != std::string::npos);
    r = run("MOE_INJECT_FAIL_RANK=1 " + mpirun(2) + base + " --set dist.expert_parallel=2");
    CHECK(r.status != 0);
    CHECK(r.status != 124);  // not the time-out: the other rank did not hang
    CHECK(r.output.find("injected start-up failure") != std::string::npos);
}

// MOE_FORCE_EXCHANGE=1 sends the MoE rows through the all-to-all path with EP = 1 (a
// self-exchange): how the one-rank NCCL smoke test of `make test-gpu` exercises ncclSend/ncclRecv
// (docs/nccl.md). On the CPU it must change nothing: plain, forced, and forced under mpirun -np 1
// print the same losses to the last digit.
TEST_CASE("dist: the all-to-all path with EP 1 (MOE_FORCE_EXCHANGE) trains exactly as the local path") {
    if (!have_mpirun()) { FAIL("mpirun not found"); }
    Fixture f;
    std::string base = moe_bin() + " train " + (f.dir / "c.yaml") + " --set train.out_dir=";
    RunResult plain = run(base + (f.dir / "plain"));
    RunResult forced = run("MOE_FORCE_EXCHANGE=1 " + base + (f.dir / "forced"));
    RunResult one = run("MOE_FORCE_EXCHANGE=1 " + mpirun(1) + "-x MOE_FORCE_EXCHANGE=1 " + base + (f.dir / "one"));
    INFO(one.output);
    REQUIRE(plain.status == 0);
    REQUIRE(forced.status == 0);
    REQUIRE(one.status == 0);
    std::vector<double> a = losses_of(plain.output);
    REQUIRE(a.size() == 10);
    CHECK(losses_of(forced.output) == a);
    CHECK(losses_of(one.output) == a);
}
