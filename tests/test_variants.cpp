/* Every config in configs/variants/ (the directory is enumerated, so a new file is covered
   without touching this test) trains for real through the `moe` binary, shrunk by --set to a
   tiny model on a tiny synthetic corpus: exit 0, three step lines with a finite loss, exactly
   the balancing terms the config turns on in the step line, routing stats (maxvio), a
   checkpoint, and `moe eval --ckpt` on it prints a val loss. The routing/balancing keys and the
   expert counts stay as in the file: those are what the variant is about. */
#include <doctest/doctest.h>

#include "config.h"
#include "data.h"
#include "model_io.h"
#include "test_util.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fmt/format.h>
#include <regex>
#include <string>
#include <vector>

using namespace moe;
using namespace moe_test;
namespace fs = std::filesystem;

namespace {

const char* kVariantDir = "configs/variants";

std::vector<std::string> variant_files() {
    std::vector<std::string> files;
    if (!fs::is_directory(kVariantDir)) return files;
    for (const auto& entry : fs::directory_iterator(kVariantDir))
        if (entry.is_regular_file() && entry.path().extension() == ".yaml") files.push_back(entry.path().string());
    std::sort(files.begin(), files.end());
    return files;
}

// The same tiny model shape for every variant (about 0.1 s per run on a 2-core CPU); the
// router, balance and expert keys are left as the file sets them.
std::string shrink_args(const std::string& data_dir, const std::string& out_dir) {
    std::string a;
    for (const char* kv :
         {"model.seq_len=32", "model.n_layer=2", "model.d_model=32", "model.n_head=2", "train.batch_size=2",
          "train.steps=3", "train.warmup=1", "train.eval_every=0", "train.eval_batches=2", "train.ckpt_every=0",
          "train.threads=1", "train.device=cpu"})
        a += std::string(" --set ") + kv;
    a += " --set 'data.train=" + data_dir + "/train_*.bin' --set 'data.val=" + data_dir + "/val_*.bin'";
    a += " --set 'train.out_dir=" + out_dir + "'";
    return a;
}

// The lines of `text` that are training step lines of a 3-step run ("step 2/3 | loss ...").
std::vector<std::string> step_lines(const std::string& text) {
    static const std::regex step_re(R"(^step +\d+/3 \| loss .*$)");
    std::vector<std::string> lines;
    size_t pos = 0;
    while (pos < text.size()) {
        size_t end = text.find('\n', pos);
        if (end == std::string::npos) end = text.size();
        std::string line = text.substr(pos, end - pos);
        if (std::regex_match(line, step_re)) lines.push_back(line);
        pos = end + 1;
    }
    return lines;
}

}  // namespace

TEST_CASE("variants: every config in configs/variants trains, checkpoints and evaluates") {
    const std::vector<std::string> files = variant_files();
    INFO("run from the repository root; looked in " << kVariantDir);
    REQUIRE(!files.empty());

    TempDir dir;
    const std::string data_dir = dir / "data";
    synth_corpus(data_dir, 100000, 1337, 0.1);
    for (const std::string& file : files) {
        CAPTURE(file);
        const std::string name = fs::path(file).stem().string();
        const std::string out_dir = dir / ("run_" + name);

        // the file itself: one comment line on top (what it is, which paper), its own out_dir
        const std::string text = file_bytes(file);
        CHECK(text.rfind("# ", 0) == 0);
        CHECK(text.find("\n#") == std::string::npos);
        CHECK(text.find("out_dir: runs/" + name + "\n") != std::string::npos);

        const std::string train_cmd =
            "OMP_NUM_THREADS=1 " + moe_bin() + " train " + file + shrink_args(data_dir, out_dir);
        RunResult r = run(train_cmd);
        INFO("command: " << train_cmd << "\noutput:\n" << r.output);
        CHECK(r.status == 0);
        const std::vector<std::string> lines = step_lines(r.output);
        CHECK(lines.size() == 3);
        if (r.status != 0 || lines.size() != 3) continue;  // the next variant is still checked
        const Config cfg = load_config(file);               // it trained, so it loads
        CHECK(cfg.model.moe.enabled);
        for (int i = 0; i < 3; i++) {
            const std::string& line = lines[i];
            CAPTURE(line);
            CHECK(line.rfind(fmt::format("step {}/3 | loss ", i + 1), 0) == 0);
            const double loss = std::strtod(line.c_str() + line.find("| loss ") + 7, nullptr);
            CHECK(std::isfinite(loss));
            CHECK(loss > 0);
            // exactly the balancing terms the config turns on are reported
            for (auto [term, coef] : {std::pair{"aux", cfg.balance.aux_loss}, {"z", cfg.balance.z_loss},
                                      {"imp", cfg.balance.importance_loss}, {"load", cfg.balance.load_loss}}) {
                CAPTURE(term);
                CHECK((line.find(std::string(" | ") + term + " ") != std::string::npos) == (coef > 0));
            }
            CHECK(line.find(" | maxvio ") != std::string::npos);
            CHECK(line.find(" | drop ") != std::string::npos);
        }

        const std::string ckpt = checkpoint_path(out_dir, 3);
        CHECK(fs::is_regular_file(ckpt));
        CHECK(fs::is_regular_file(state_path_for(ckpt)));

        const std::string eval_cmd = "OMP_NUM_THREADS=1 " + moe_bin() + " eval --ckpt " + out_dir;
        RunResult e = run(eval_cmd);
        INFO("eval command: " << eval_cmd << "\neval output:\n" << e.output);
        CHECK(e.status == 0);
        std::smatch m;
        const bool has_val = std::regex_search(e.output, m, std::regex(R"(val loss (\S+))"));
        CHECK(has_val);
        if (has_val) CHECK(std::isfinite(std::strtod(m[1].str().c_str(), nullptr)));
    }
}
