// The LoCon round trip of a whole UNet (SPEC §8, §9) as a user runs it: `loom train --model
// UNET_DIR` with LoRA on 3×3 / 1×1 convs as well as Linears writes the adapter; `loom convert --to
// kohya` makes the kohya LoCon file (lora_down (r, in, k, k), lora_up (out, r, 1, 1), alpha);
// `--init-adapter` of that file resumes training exactly where the run stopped, and `loom run`
// with it reproduces the trained model's output.
#include "tests/cli/cli_fixture.h"
#include "tests/cli/unet_fixture.h"

namespace loom {
namespace {

const std::string kSd1 = unet_fixture("sd1");

// The losses of a run's loss.csv ("step,loss" then one line per step).
std::vector<double> losses_of(const std::string& csv) {
  std::istringstream in(read_bytes(csv));
  std::vector<double> out;
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(std::stod(line.substr(line.find(',') + 1)));
  return out;
}

class CliLoconRoundTrip : public Cli {
 protected:
  void SetUp() override {
    Cli::SetUp();
    // Fixed noise and timesteps and one batch of every sample: each step's loss depends only on
    // the adapter's weights, so a run continued from a file is comparable with one straight run.
    Generator gen(9);
    io::write_safetensors(path("data.safetensors"),
                          {{"latents", Tensor::randn({4, 4, 8, 8}, gen)},
                           {"encoder_hidden_states", Tensor::randn({4, 5, 12}, gen)},
                           {"noise", Tensor::randn({4, 4, 8, 8}, gen)},
                           {"timesteps", Tensor::from_vector(std::vector<double>{10, 300, 600, 900}, {4})}});
    write_golden_inputs("sd1", path("input.safetensors"));  // loom run's input
  }
  // SGD (no optimizer state to lose between runs), the whole data set per step.
  Result train(const std::string& out, int steps, std::vector<std::string> extra) const {
    std::vector<std::string> args{"train", "--model", kSd1, "--data", path("data.safetensors"), "--out", path(out),
                                  "--steps", std::to_string(steps), "--batch-size", "4", "--optimizer", "sgd",
                                  "--lr", "0.5", "--device", "cpu", "--quiet"};
    args.insert(args.end(), extra.begin(), extra.end());
    return loom(args);
  }
  Tensor run(const std::string& output, std::vector<std::string> extra) const {
    std::vector<std::string> args{"run", "--model", kSd1, "--input", path("input.safetensors"), "--output",
                                  path(output), "--device", "cpu"};
    args.insert(args.end(), extra.begin(), extra.end());
    const Result r = loom(args);
    EXPECT_EQ(r.code, 0) << r;
    return r.code == 0 ? read_output(path(output)) : Tensor();
  }
};

TEST_F(CliLoconRoundTrip, KohyaLoconFileResumesTrainingAndReproducesTheOutput) {
  const std::vector<std::string> targets{"--targets", "to_q,to_v,conv1,conv2,conv_shortcut"};
  const Result straight = train("straight", 5, targets);
  ASSERT_EQ(straight.code, 0) << straight;
  const Result first = train("first", 3, targets);
  ASSERT_EQ(first.code, 0) << first;

  // the kohya LoCon file of the 3-step run
  const Result conv = loom({"convert", path("first/adapter.safetensors"), path("first/kohya.safetensors"), "--to", "kohya"});
  ASSERT_EQ(conv.code, 0) << conv;
  ASSERT_TRUE(exists(path("first/kohya.safetensors")));
  const io::TensorFile kohya = io::read_tensor_file(path("first/kohya.safetensors"));
  const Tensor* down = kohya.find("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight");
  const Tensor* up = kohya.find("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight");
  ASSERT_TRUE(down && up);
  EXPECT_EQ(down->shape(), (Shape{4, 8, 3, 3}));  // a 3×3 conv: LoCon's down is a k×k conv, up a 1×1
  EXPECT_EQ(up->shape(), (Shape{8, 4, 1, 1}));
  EXPECT_NE(kohya.find("lora_unet_down_blocks_1_resnets_0_conv_shortcut.alpha"), nullptr);
  EXPECT_NE(kohya.find("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"), nullptr);

  // training resumes from it: two more steps give the straight run's steps 4 and 5
  const Result second = train("second", 2, {"--init-adapter", path("first/kohya.safetensors")});
  ASSERT_EQ(second.code, 0) << second;
  const std::vector<double> all = losses_of(path("straight/loss.csv")), head = losses_of(path("first/loss.csv")),
                            tail = losses_of(path("second/loss.csv"));
  ASSERT_EQ(all.size(), 5u);
  ASSERT_EQ(head.size(), 3u);
  ASSERT_EQ(tail.size(), 2u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(head[i], all[i]) << "step " << i + 1;
  for (size_t i = 0; i < 2; ++i) EXPECT_NEAR(tail[i], all[3 + i], 1e-6 * all[3 + i]) << "step " << i + 4;
  EXPECT_LT(all[3], all[0]);  // it did learn: a resume from scratch would start at all[0]

  // loom run with the kohya file reproduces the trained model (the trainer's own file), which
  // differs from the base model
  const Tensor base = run("base.safetensors", {});
  const Tensor trained = run("trained.safetensors", {"--adapter", path("first/adapter.safetensors")});
  const Tensor from_kohya = run("kohya.safetensors", {"--adapter", path("first/kohya.safetensors")});
  ASSERT_TRUE(base.defined() && trained.defined() && from_kohya.defined());
  EXPECT_LE(rel_error(from_kohya, trained), 1e-6);
  EXPECT_GT(rel_error(trained, base), 1e-3);
  // and the continued run's adapter gives the straight run's model
  const Tensor continued = run("continued.safetensors", {"--adapter", path("second/adapter.safetensors")});
  const Tensor five = run("five.safetensors", {"--adapter", path("straight/adapter.safetensors")});
  ASSERT_TRUE(continued.defined() && five.defined());
  EXPECT_LE(rel_error(continued, five), 1e-5);
  EXPECT_GT(rel_error(five, trained), 1e-5);
}

}  // namespace
}  // namespace loom
