// `loom run --model UNET_DIR` (SPEC §8) against diffusers' own outputs: the tiny SD-1.x-like and
// SDXL-like UNets of tests/unet/fixtures (golden.safetensors holds diffusers' inputs and its f32
// output), and the errors a user meets (missing tensors, shapes that do not fit, --prefix).
#include "tests/cli/cli_fixture.h"
#include "tests/cli/unet_fixture.h"

namespace loom {
namespace {

class CliRunUNet : public Cli {};

TEST_F(CliRunUNet, MatchesDiffusersForSd1AndSdxlConfigs) {
  for (const std::string config : {"sd1", "sdxl"}) {
    SCOPED_TRACE(config);
    const std::string out = path(config + "_out.safetensors");
    const Result r = run_loom({"run", "--model", unet_fixture(config), "--input",
                               write_golden_inputs(config, path(config + "_inputs.safetensors")),
                               "--output", out, "--batch-size", "1"},
                              path("."));
    ASSERT_EQ(r.code, 0) << r;
    const Tensor y = read_output(out);
    ASSERT_TRUE(y.defined()) << r;
    EXPECT_LE(rel_error(y, golden_output(config)), 1e-4) << r;
  }
}

TEST_F(CliRunUNet, ErrorsNameTheTensorAndTheFlag) {
  const std::string model = unet_fixture("sd1");
  // a missing tensor: exit 3 naming the file and the tensor
  std::vector<std::pair<std::string, Tensor>> partial = {{"sample", Tensor::zeros({1, 4, 8, 8})},
                                                         {"timestep", Tensor::zeros({1})}};
  io::write_safetensors(path("partial.safetensors"), partial);
  Result r = run_loom({"run", "--model", model, "--input", path("partial.safetensors"), "--output",
                       path("o.safetensors")},
                      path("."));
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, AllOf(HasSubstr("partial.safetensors"), HasSubstr("encoder_hidden_states")));
  // a context of the wrong width: exit 3 naming the tensor
  partial.emplace_back("encoder_hidden_states", Tensor::zeros({1, 5, 7}));
  io::write_safetensors(path("wide.safetensors"), partial);
  r = run_loom({"run", "--model", model, "--input", path("wide.safetensors"), "--output", path("o.safetensors")},
               path("."));
  EXPECT_EQ(r.code, 3) << r;
  EXPECT_THAT(r.err, HasSubstr("encoder_hidden_states"));
  // --prefix with a whole UNet: a usage error naming the flag
  r = run_loom({"run", "--model", model, "--input", write_golden_inputs("sd1", path("sd1_inputs.safetensors")),
                "--output", path("o.safetensors"), "--prefix", "down_blocks.0.attentions.0"},
               path("."));
  EXPECT_EQ(r.code, 2) << r;
  EXPECT_THAT(r.err, HasSubstr("--prefix"));
  EXPECT_FALSE(exists(path("o.safetensors")));
}

}  // namespace
}  // namespace loom
