// The UNet (and a LoCon on it) on CUDA against diffusers' goldens and the CPU: the
// f64 forward ≤ 1e-10 and the f32 forward ≤ 1e-4 relative to diffusers, and the f64
// gradients of the sample and of a conv weight equal to the CPU's ≤ 1e-10; in bf16, the
// implicit-GEMM convolution as close to f64 as im2col + cuBLAS (ctest -L gpu). Skips, with
// the reason, without a GPU.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <string>

#include "io/tensor_file.h"
#include "tensor/backend.h"
#include "tensor/random.h"
#include "unet/unet_io.h"
#include "tests/test_helpers.h"

namespace loom::unet {
namespace {

double rel_error(const Tensor& a, const Tensor& b) {
  const auto x = a.to(Device::cpu()).to(DType::F64).to_vector(), y = b.to(Device::cpu()).to(DType::F64).to_vector();
  EXPECT_EQ(x.size(), y.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
    num = std::max(num, std::abs(x[i] - y[i]));
    den = std::max(den, std::abs(y[i]));
  }
  return num / (den > 0 ? den : 1);
}

// ||a − b||₂ / ||b||₂ over all elements: the bf16 comparisons' measure (one element of a bf16
// gradient at the end of the whole backward can be far off by rounding alone, which sways the
// largest-element error of rel_error from run to run).
double norm_error(const Tensor& a, const Tensor& b) {
  const auto x = a.to(Device::cpu()).to(DType::F64).to_vector(), y = b.to(Device::cpu()).to(DType::F64).to_vector();
  EXPECT_EQ(x.size(), y.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < x.size() && i < y.size(); ++i) num += (x[i] - y[i]) * (x[i] - y[i]), den += y[i] * y[i];
  return std::sqrt(num / (den > 0 ? den : 1));
}

struct RunResult {
  Tensor out, grad_sample, grad_conv;
};

RunResult run(const std::string& name, DType dtype, Device device, bool backward) {
  const std::string dir = std::string(LOOM_UNET_FIXTURE_DIR) + "/" + name;
  UNetLoadOptions o;
  o.dtype = dtype, o.device = device;
  const LoadedUNet u = load_unet_dir(dir, o);
  const io::TensorFile g = io::read_safetensors(dir + "/golden.safetensors");
  auto get = [&](const char* k) { return g.find(k) ? g.find(k)->to(dtype).to(device) : Tensor(); };
  UNetInputs in;
  in.sample = Variable(get("sample"), backward);
  in.timestep = *g.find("timestep");
  in.encoder_hidden_states = Variable(get("encoder_hidden_states"));
  in.encoder_attention_mask = get("encoder_attention_mask");
  if (g.find("text_embeds")) in.text_embeds = Variable(get("text_embeds"));
  in.time_ids = get("time_ids");
  RunResult r;
  if (!backward) {
    NoGradGuard ng;
    r.out = u.model->forward(in).tensor();
    return r;
  }
  const Variable conv = u.model->find_parameter("down_blocks.0.resnets.0.conv1.weight");
  const Variable out = u.model->forward(in);
  Generator gen(17);
  out.backward(Tensor::randn(out.shape(), gen, DType::F64).to(dtype).to(device));
  r.out = out.tensor();
  r.grad_sample = in.sample.grad();
  r.grad_conv = conv.grad();
  return r;
}

class GpuUNet : public ::testing::TestWithParam<std::string> {};

TEST_P(GpuUNet, MatchesDiffusersAndTheCpu) {
  LOOM_SKIP_WITHOUT_CUDA();
  const std::string dir = std::string(LOOM_UNET_FIXTURE_DIR) + "/" + GetParam();
  const io::TensorFile g = io::read_safetensors(dir + "/golden.safetensors");
  const RunResult gpu64 = run(GetParam(), DType::F64, Device::cuda(0), true);
  EXPECT_LE(rel_error(gpu64.out, *g.find("output_f64")), 1e-10);
  const RunResult cpu64 = run(GetParam(), DType::F64, Device::cpu(), true);
  EXPECT_LE(rel_error(gpu64.grad_sample, cpu64.grad_sample), 1e-10);
  EXPECT_LE(rel_error(gpu64.grad_conv, cpu64.grad_conv), 1e-10);
  const RunResult gpu32 = run(GetParam(), DType::F32, Device::cuda(0), false);
  EXPECT_LE(rel_error(gpu32.out, *g.find("output_f32")), 1e-4);
}

// bf16 on CUDA through each direct convolution of LOOM_CONV — igemm (the implicit-GEMM kernel:
// forward, input gradient at stride 1) and cudnn (forward and both gradients, where the build has
// cuDNN) — against the f64 CPU run, next to the same bf16 run through im2col + cuBLAS
// (LOOM_CONV=im2col): the output, the sample's gradient and a conv weight's gradient may be at
// most 2× as far from f64 as that run's, plus 1e-3, norm-wise (norm_error; both measures printed).
TEST_P(GpuUNet, Bf16DirectConvsAreAsCloseAsIm2col) {
  LOOM_SKIP_WITHOUT_CUDA();
  const RunResult cpu64 = run(GetParam(), DType::F64, Device::cpu(), true);
  RunResult im2col;
  {
    loom::testing::ScopedEnv env("LOOM_CONV", "im2col");
    im2col = run(GetParam(), DType::BF16, Device::cuda(0), true);
  }
  for (const char* path : {"igemm", "cudnn"}) {
    SCOPED_TRACE(std::string("LOOM_CONV=") + path);
    if (std::string(path) == "cudnn" && !backend_for(Device::cuda(0)).supports(OpKind::Conv2dLibrary, DType::BF16)) {
      std::printf("[ note ] this build or device has no cuDNN: LOOM_CONV=cudnn not checked\n");
      continue;
    }
    RunResult direct;
    {
      loom::testing::ScopedEnv env("LOOM_CONV", path);
      direct = run(GetParam(), DType::BF16, Device::cuda(0), true);
    }
    const double out = norm_error(direct.out, cpu64.out), out_im2col = norm_error(im2col.out, cpu64.out);
    EXPECT_LE(out, 2 * out_im2col + 1e-3) << "output: " << path << " " << out << ", im2col " << out_im2col;
    const double gs = norm_error(direct.grad_sample, cpu64.grad_sample);
    const double gs_im2col = norm_error(im2col.grad_sample, cpu64.grad_sample);
    EXPECT_LE(gs, 2 * gs_im2col + 1e-3) << "sample gradient: " << path << " " << gs << ", im2col " << gs_im2col;
    const double gc = norm_error(direct.grad_conv, cpu64.grad_conv);
    const double gc_im2col = norm_error(im2col.grad_conv, cpu64.grad_conv);
    EXPECT_LE(gc, 2 * gc_im2col + 1e-3) << "conv weight gradient: " << path << " " << gc << ", im2col " << gc_im2col;
    std::printf("[ note ] %s LOOM_CONV=%s, norm-wise (largest-element) error against f64: output %.3g (%.3g), "
                "sample gradient %.3g (%.3g), conv weight gradient %.3g (%.3g); im2col %.3g (%.3g), %.3g (%.3g), "
                "%.3g (%.3g)\n",
                GetParam().c_str(), path, out, rel_error(direct.out, cpu64.out), gs,
                rel_error(direct.grad_sample, cpu64.grad_sample), gc, rel_error(direct.grad_conv, cpu64.grad_conv),
                out_im2col, rel_error(im2col.out, cpu64.out), gs_im2col,
                rel_error(im2col.grad_sample, cpu64.grad_sample), gc_im2col,
                rel_error(im2col.grad_conv, cpu64.grad_conv));
  }
}

INSTANTIATE_TEST_SUITE_P(Configs, GpuUNet, ::testing::Values("sd1", "sd2", "sdxl"));

}  // namespace
}  // namespace loom::unet
