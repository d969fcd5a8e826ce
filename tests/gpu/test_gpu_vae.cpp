// The VAE (AutoencoderKL) on CUDA against diffusers' goldens: the f64 encoder moments and
// decoder output ≤ 1e-10, f32 ≤ 1e-4, bf16 within the usual bf16 error (ctest -L gpu).
// Skips, with the reason, without a GPU.
#include <gtest/gtest.h>

#include "io/tensor_file.h"
#include "tensor/backend.h"
#include "tests/test_helpers.h"
#include "unet/vae.h"

namespace loom::unet {
namespace {

using loom::testing::rel_error;

class GpuVae : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuVae, MatchesDiffusers) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device available (built without CUDA or no GPU present)";
  const std::string dir = std::string(LOOM_VAE_FIXTURE_DIR) + "/" + GetParam();
  const io::TensorFile g = io::read_safetensors(dir + "/golden.safetensors");
  NoGradGuard no_grad;
  for (const DType dtype : {DType::F64, DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dtype));
    VaeLoadOptions o;
    o.dtype = dtype, o.device = Device::cuda(0);
    const LoadedVae vae = load_vae_dir(dir, o);
    auto get = [&](const char* k) { return g.find(k)->to(dtype).to(o.device); };
    const Tensor moments = vae.model->encode(Variable(get("image"))).tensor().to(Device::cpu()).to(DType::F64);
    const Tensor decoded = vae.model->decode(Variable(get("z"))).tensor().to(Device::cpu()).to(DType::F64);
    const char* suffix = dtype == DType::F64 ? "_f64" : "_f32";
    const double tol = dtype == DType::F64 ? 1e-10 : dtype == DType::F32 ? 1e-4 : 5e-2;
    EXPECT_LE(rel_error(moments, *g.find(std::string("moments") + suffix)), tol);
    EXPECT_LE(rel_error(decoded, *g.find(std::string("decoded") + suffix)), tol);
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, GpuVae, ::testing::Values("tiny", "sd_like", "shifted"));

}  // namespace
}  // namespace loom::unet
