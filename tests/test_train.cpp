/* The training loop end to end on a tiny corpus: loss falls, the LR schedule has its shape,
   checkpoints are written atomically, and a resumed run is bit-identical to a straight one. */
#include <doctest/doctest.h>

#include "config.h"
#include "fileio.h"
#include "model_io.h"
#include "optim.h"
#include "trainer.h"
#include "test_util.h"

#include <fmt/format.h>

#include <cmath>

using namespace moe;
using namespace moe_test;

namespace {
Config tiny_config(const TempDir& dir, const std::string& out, int steps) {
    write_tiny_corpus(dir.path, 64, 20000, 4000);
    return parse_config(fmt::format(R"(
model: {{vocab_size: 64, seq_len: 32, n_layer: 2, n_head: 2, d_model: 32, d_ff: 64}}
train: {{batch_size: 4, steps: {}, lr: 1.0e-2, min_lr: 1.0e-3, warmup: 2, eval_every: 5, eval_batches: 2,
        ckpt_every: 10, out_dir: {}, threads: 2}}
data: {{train: {}/train_*.bin, val: {}/val_*.bin}}
)", steps, dir / out, dir.path, dir.path), "test config");
}
}  // namespace

TEST_CASE("lr schedule: linear warmup, cosine to min_lr") {
    TrainConfig tc;
    tc.lr = 1.0; tc.min_lr = 0.1; tc.warmup = 4; tc.steps = 14;
    CHECK(lr_at(tc, 0) == doctest::Approx(0.25));
    CHECK(lr_at(tc, 3) == doctest::Approx(1.0));
    CHECK(lr_at(tc, 4) == doctest::Approx(1.0));
    CHECK(lr_at(tc, 9) == doctest::Approx(0.55));   // halfway through the decay
    CHECK(lr_at(tc, 14) == doctest::Approx(0.1));
}

TEST_CASE("training lowers the loss and writes checkpoints with their state") {
    TempDir dir;
    Config cfg = tiny_config(dir, "run", 30);
    TrainOptions opt;
    opt.quiet = true;
    TrainSummary s = run_training(cfg, opt);
    REQUIRE(s.losses.size() == 30);
    CHECK(s.losses.back() < s.losses.front() - 0.5f);
    REQUIRE(s.val_losses.size() >= 2);
    CHECK(s.val_losses.back().second < s.val_losses.front().second);
    for (int step : {10, 20, 30}) {
        CHECK(file_exists(checkpoint_path(dir / "run", step)));
        CHECK(file_exists(state_path_for(checkpoint_path(dir / "run", step))));
    }
    CHECK(find_latest_checkpoint(dir / "run", true) == checkpoint_path(dir / "run", 30));
    std::string metrics = file_bytes(dir / "run/metrics.jsonl");
    CHECK(metrics.find("\"val_loss\"") != std::string::npos);
    CHECK(metrics.find("\"step\":30") != std::string::npos);
}

TEST_CASE("resume: 20 steps straight == 10 steps + resume + 10 steps, bit for bit") {
    TempDir dir;
    Config straight = tiny_config(dir, "straight", 20);
    TrainOptions quiet;
    quiet.quiet = true;
    TrainSummary a = run_training(straight, quiet);

    Config split = straight;
    split.train.out_dir = dir / "split";
    split.train.ckpt_every = 0;            // the only checkpoint before the end is the interruption's
    TrainOptions first = quiet;
    first.stop_after = 10;
    TrainSummary b1 = run_training(split, first);
    REQUIRE(b1.losses.size() == 10);
    TrainOptions second = quiet;
    second.resume = "latest";
    TrainSummary b2 = run_training(split, second);
    REQUIRE(b2.first_step == 10);
    REQUIRE(b2.losses.size() == 10);
    for (int i = 0; i < 10; i++) {
        CHECK(b1.losses[i] == a.losses[i]);
        CHECK(b2.losses[i] == a.losses[10 + i]);
    }
    // the final weights are identical too: the checkpoints differ only in out_dir in the config
    auto be = make_cpu_backend(2);
    LoadedModel ma = load_model(checkpoint_path(dir / "straight", 20), *be);
    LoadedModel mb = load_model(checkpoint_path(dir / "split", 20), *be);
    CHECK(ma.model->get_weights() == mb.model->get_weights());
}
