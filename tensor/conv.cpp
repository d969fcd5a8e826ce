#include "tensor/conv.h"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "tensor/constants.h"
#include "tensor/ops.h"
#include "tensor/ops_fused.h"

namespace loom::ops {

namespace {
bool pointwise(const Im2ColArgs& g) {
  return g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_h == 0 && g.pad_w == 0;
}
}  // namespace

Im2ColArgs conv2d_geometry(const Shape& x, int64_t kh, int64_t kw, const Conv2dParams& p) {
  LOOM_CHECK(x.size() == 4, "conv2d: input must be [N, C, H, W], got ", x);
  LOOM_CHECK(kh >= 1 && kw >= 1, "conv2d: kernel size must be positive, got ", kh, "x", kw);
  LOOM_CHECK(p.stride_h >= 1 && p.stride_w >= 1, "conv2d: stride must be positive, got ", p.stride_h, ",",
             p.stride_w);
  LOOM_CHECK(p.pad_h >= 0 && p.pad_w >= 0, "conv2d: padding must be non-negative, got ", p.pad_h, ",", p.pad_w);
  Im2ColArgs g;
  g.batch = x[0], g.channels = x[1], g.height = x[2], g.width = x[3];
  g.kernel_h = kh, g.kernel_w = kw;
  g.stride_h = p.stride_h, g.stride_w = p.stride_w;
  g.pad_h = p.pad_h, g.pad_w = p.pad_w;
  const int64_t eh = g.height + 2 * p.pad_h - kh, ew = g.width + 2 * p.pad_w - kw;
  LOOM_CHECK(eh >= 0 && ew >= 0, "conv2d: kernel ", kh, "x", kw, " is larger than the padded input ", x,
             " (padding ", p.pad_h, ",", p.pad_w, ")");
  g.out_h = eh / p.stride_h + 1;
  g.out_w = ew / p.stride_w + 1;
  return g;
}

namespace {
// The host kernels hold f32 and f64: bf16 / f16 on the CPU go through f32 (im2col is exact that
// way; col2im's sums are rounded once), as the CPU's low-precision ops do (SPEC §7).
bool host_low_precision(const Tensor& t) {
  return t.device().is_cpu() && (t.dtype() == DType::BF16 || t.dtype() == DType::F16);
}
}  // namespace

Tensor im2col(const Tensor& x, const Im2ColArgs& g) {
  if (x.defined() && host_low_precision(x)) return im2col(x.to(DType::F32), g).to(x.dtype());
  LOOM_CHECK(x.defined() && x.shape() == Shape({g.batch, g.channels, g.height, g.width}), "im2col: input ",
             x.defined() ? x.str() : std::string("undefined"), " does not match the geometry [", g.batch, ", ",
             g.channels, ", ", g.height, ", ", g.width, "]");
  const int64_t rows = g.channels * g.kernel_h * g.kernel_w, L = g.out_h * g.out_w;
  if (pointwise(g)) return x.reshape({g.batch, rows, L});
  Backend& be = backend_for("im2col", OpKind::Binary, x.device(), x.dtype());
  const Tensor src = x.contiguous();
  Tensor cols = Tensor::empty({g.batch, rows, L}, x.dtype(), x.device());
  if (cols.numel()) be.im2col(cols, src, g);
  return cols;
}

Tensor col2im(const Tensor& cols, const Im2ColArgs& g) {
  if (cols.defined() && host_low_precision(cols)) return col2im(cols.to(DType::F32), g).to(cols.dtype());
  const int64_t rows = g.channels * g.kernel_h * g.kernel_w, L = g.out_h * g.out_w;
  LOOM_CHECK(cols.defined() && cols.shape() == Shape({g.batch, rows, L}), "col2im: columns ",
             cols.defined() ? cols.str() : std::string("undefined"), " do not match the geometry [", g.batch, ", ",
             rows, ", ", L, "]");
  const Shape image_shape{g.batch, g.channels, g.height, g.width};
  if (pointwise(g)) return cols.reshape(image_shape);
  Backend& be = backend_for("col2im", OpKind::Binary, cols.device(), cols.dtype());
  const Tensor src = cols.contiguous();
  Tensor image = Tensor::empty(image_shape, cols.dtype(), cols.device());
  if (image.numel()) be.col2im(image, src, g);
  return image;
}

namespace {
void check_conv(const Tensor& x, const Tensor& w, const Tensor& bias) {
  LOOM_CHECK(x.defined() && w.defined(), "conv2d: undefined input or weight");
  LOOM_CHECK(x.device() == w.device() && x.dtype() == w.dtype(), "conv2d: input ", x.str(), " and weight ",
             w.str(), " differ in device or dtype");
  LOOM_CHECK(x.dim() == 4, "conv2d: input must be [N, C, H, W], got ", x.shape());
  LOOM_CHECK(w.dim() == 4, "conv2d: weight must be [out, in, kh, kw], got ", w.shape());
  LOOM_CHECK(w.size(1) == x.size(1), "conv2d: weight ", w.shape(), " expects ", w.size(1),
             " input channels, input ", x.shape(), " has ", x.size(1), " (groups other than 1 are not supported)");
  LOOM_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == w.size(0)), "conv2d: bias ",
             bias.defined() ? bias.str() : std::string(), " does not match weight ", w.shape());
}
}  // namespace

namespace {
// Which convolution runs (LOOM_CONV, read at every call so that a benchmark can time every path
// in one process):
//   auto (default)    on a device with a convolution library (CUDA bf16 / f16 with cuDNN), the two
//                     gradients of k×k convolutions (k > 1) through the library, everything else
//                     im2col + GEMM — the fastest of the three on the H200 at Stable Diffusion's
//                     shapes, pass by pass (docs/gpu-bench.md, conv run of the eighth session):
//                     cuDNN's gradients beat GEMM + col2im / im2col + GEMM in 17 of 18 k×k cases and
//                     hold no column buffer; its forward (v7 heuristics) is slower than im2col +
//                     cuBLAS at 7 of 9 k×k shapes; 1×1 convolutions are plain GEMMs;
//   im2col            im2col + GEMM (+ bias add); GEMM + col2im for the input gradient;
//   igemm             the device's direct kernel (Backend::conv2d, supports(OpKind::Conv2d): CUDA
//                     bf16 / f16) for kernels up to kConv2dMaxKernel; the input gradient at
//                     stride 1; the weight gradient stays im2col + GEMM;
//   cudnn             the device's convolution library (Backend::library_conv2d*, supports(
//                     OpKind::Conv2dLibrary): cuDNN for CUDA bf16 / f16) for the forward and both
//                     gradients. Other devices and dtypes keep im2col + GEMM; a CUDA build
//                     without cuDNN is an error naming it.
enum class ConvPath { Im2col, Direct, Library };
enum class ConvPass { Forward, InputGrad, WeightGrad };

bool library_takes(const Tensor& t) {
  return t.device().is_cuda() && (t.dtype() == DType::BF16 || t.dtype() == DType::F16) &&
         backend_for(t.device()).supports(OpKind::Conv2dLibrary, t.dtype());
}

ConvPath conv_path(const Tensor& t, const Im2ColArgs& g, ConvPass pass) {
  const char* env = std::getenv("LOOM_CONV");
  const std::string choice = env ? env : "";
  LOOM_CHECK(choice.empty() || choice == "auto" || choice == "im2col" || choice == "igemm" || choice == "cudnn",
             "LOOM_CONV='", choice, "' is not auto, im2col, igemm or cudnn");
  if (choice.empty() || choice == "auto") {
    const bool kxk = g.kernel_h > 1 || g.kernel_w > 1;
    return pass != ConvPass::Forward && kxk && library_takes(t) ? ConvPath::Library : ConvPath::Im2col;
  }
  Backend& be = backend_for(t.device());
  if (choice == "cudnn" && t.device().is_cuda()) {
    if (t.dtype() != DType::BF16 && t.dtype() != DType::F16) return ConvPath::Im2col;  // f32 / f64 stay exact
    LOOM_CHECK(be.supports(OpKind::Conv2dLibrary, t.dtype()), "LOOM_CONV=cudnn: backend '", be.name(),
               "' has no convolution library here (a CUDA build finds cuDNN through CMake: the toolkit's, or "
               "-DCUDNN_ROOT=DIR with DIR/include/cudnn.h and DIR/lib/libcudnn.so.9; cuda_conv_cudnn.h)");
    return ConvPath::Library;
  }
  if (choice != "igemm" || pass == ConvPass::WeightGrad) return ConvPath::Im2col;
  if (g.kernel_h > kConv2dMaxKernel || g.kernel_w > kConv2dMaxKernel) return ConvPath::Im2col;
  return be.supports(OpKind::Conv2d, t.dtype()) ? ConvPath::Direct : ConvPath::Im2col;
}
}  // namespace

namespace {
// The kk×kk exchange matrix J (J[a][b] = 1 where a + b = kk − 1) in `dtype` on `device`: X·J
// reverses the order of X's columns exactly (one product by 1 per output, the rest add 0). Made
// once per (kk, dtype, device) and kept (tensor/constants.h: no host copy inside a step).
const Tensor& exchange_matrix(int64_t kk, DType dtype, Device device) {
  return cached_constant("exchange_matrix", {kk, kk}, dtype, device, [kk] {
    std::vector<double> j(size_t(kk * kk), 0.0);
    for (int64_t a = 0; a < kk; ++a) j[size_t(a * kk + (kk - 1 - a))] = 1.0;
    return j;
  });
}
}  // namespace

namespace {
// The forward's im2col columns are built for at most this many bytes at once (when a sample's
// alone exceed it, one sample at a time): SDXL's up-block 960 → 320 convolution at 128×128 would
// otherwise hold 283 MB of columns per sample, 1.1 GB at batch 4 — more than the rest of the
// forward's activations. Products stay one GEMM per sample either way.
// LOOM_CONV_COLUMN_BYTES (read at every call) sets another budget, e.g. for tests.
constexpr int64_t kColumnBudgetBytes = int64_t(256) << 20;

int64_t column_budget() {
  const char* env = std::getenv("LOOM_CONV_COLUMN_BYTES");
  if (!env || !*env) return kColumnBudgetBytes;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  LOOM_CHECK(end && *end == '\0' && v > 0, "LOOM_CONV_COLUMN_BYTES='", env, "' is not a positive byte count");
  return int64_t(v);
}

// Samples per im2col + GEMM chunk of the forward (≥ 1; g.batch when all fit the budget).
int64_t column_chunk(const Im2ColArgs& g, DType dtype) {
  const int64_t per_sample = g.channels * g.kernel_h * g.kernel_w * g.out_h * g.out_w * int64_t(itemsize(dtype));
  const int64_t budget = column_budget();
  if (per_sample <= 0 || per_sample * g.batch <= budget) return std::max<int64_t>(g.batch, 1);
  return std::max<int64_t>(1, budget / per_sample);
}

// y [N, O, oh, ow] = W·columns(x) (+ bias): columns(s0, part) gives the [part.batch, C·kk, L]
// columns of samples s0 … s0 + part.batch − 1, asked for a column_chunk of samples at a time,
// each product written into its slice of y.
template <typename Columns>
Tensor im2col_gemm(const Tensor& x, const Tensor& w, const Tensor& bias, const Im2ColArgs& g, Columns&& columns) {
  const int64_t O = w.size(0);
  const Tensor w2 = w.reshape({O, -1});
  const int64_t chunk = column_chunk(g, x.dtype());
  Tensor y;
  if (chunk >= g.batch) {
    y = matmul(w2, columns(0, g));  // [O, C·kk] x [N, C·kk, L] -> [N, O, L]
  } else {
    y = Tensor::empty({g.batch, O, g.out_h * g.out_w}, x.dtype(), x.device());
    for (int64_t s0 = 0; s0 < g.batch; s0 += chunk) {
      Im2ColArgs part = g;
      part.batch = std::min(chunk, g.batch - s0);
      y.narrow(0, s0, part.batch).copy_(matmul(w2, columns(s0, part)));
    }
  }
  if (bias.defined()) y = add(y, bias.reshape({O, 1}));
  return y.reshape({g.batch, O, g.out_h, g.out_w});
}
}  // namespace

// w [O, C, kh, kw] -> [C, O, kh, kw] with w'[c, o, i, j] = w[o, c, kh − 1 − i, kw − 1 − j].
Tensor flipped_transposed(const Tensor& w) {
  const int64_t O = w.size(0), C = w.size(1), kh = w.size(2), kw = w.size(3);
  const Tensor rows = w.permute({1, 0, 2, 3}).contiguous().reshape({C * O, kh * kw});
  return matmul(rows, exchange_matrix(kh * kw, w.dtype(), w.device())).reshape({C, O, kh, kw});
}

Tensor conv2d(const Tensor& x, const Tensor& w, const Tensor& bias, const Conv2dParams& p) {
  check_conv(x, w, bias);
  const Im2ColArgs g = conv2d_geometry(x.shape(), w.size(2), w.size(3), p);
  const int64_t O = w.size(0);
  const ConvPath path = conv_path(x, g, ConvPass::Forward);
  if (path != ConvPath::Im2col) {
    Conv2dArgs a;
    a.x = x.contiguous(), a.w = w.contiguous(), a.geo = g;
    if (bias.defined()) a.bias = bias.contiguous();
    a.y = Tensor::empty({g.batch, O, g.out_h, g.out_w}, x.dtype(), x.device());
    if (a.y.numel() == 0) return a.y;
    if (path == ConvPath::Library)
      backend_for("conv2d", OpKind::Conv2dLibrary, x.device(), x.dtype()).library_conv2d(a);
    else
      backend_for("conv2d", OpKind::Conv2d, x.device(), x.dtype()).conv2d(a);
    return a.y;
  }
  return im2col_gemm(x, w, bias, g, [&](int64_t s0, const Im2ColArgs& part) {
    return im2col(part.batch == g.batch ? x : x.narrow(0, s0, part.batch), part);
  });
}

namespace {
bool normed_columns_fit(const Tensor& x, const Im2ColArgs& g) {
  const char* env = std::getenv("LOOM_CONV_NORMED");
  const std::string choice = env ? env : "";
  LOOM_CHECK(choice.empty() || choice == "0" || choice == "1", "LOOM_CONV_NORMED='", choice, "' is not 0 or 1");
  return choice != "0" && !pointwise(g) && conv_path(x, g, ConvPass::Forward) == ConvPath::Im2col &&
         backend_for(x.device()).supports(OpKind::Im2colNormed, x.dtype());
}
}  // namespace

Tensor conv2d_normed(const Tensor& x, const GroupNormBeforeConv& norm, const Tensor& w, const Tensor& bias,
                     const Conv2dParams& p) {
  check_conv(x, w, bias);
  const Im2ColArgs g = conv2d_geometry(x.shape(), w.size(2), w.size(3), p);
  if (!normed_columns_fit(x, g))
    return conv2d(group_norm(x, norm.groups, norm.weight, norm.bias, norm.eps, norm.silu, norm.shift).y, w, bias, p);
  const NormForward stats = group_norm_statistics(x, norm.groups, norm.eps, norm.shift);
  Im2ColNorm n;
  n.mean = stats.mean, n.rstd = stats.rstd, n.groups = norm.groups, n.silu = norm.silu;
  if (norm.weight.defined()) n.weight = norm.weight.contiguous();
  if (norm.bias.defined()) n.bias = norm.bias.contiguous();
  if (norm.shift.defined()) n.shift = norm.shift.contiguous();
  const Tensor src = x.contiguous();
  Backend& be = backend_for("conv2d_normed", OpKind::Im2colNormed, x.device(), x.dtype());
  return im2col_gemm(x, w, bias, g, [&](int64_t s0, const Im2ColArgs& part) {
    Im2ColNorm slice = n;  // the samples s0 … s0 + part.batch − 1
    slice.mean = n.mean.narrow(0, s0, part.batch), slice.rstd = n.rstd.narrow(0, s0, part.batch);
    if (n.shift.defined()) slice.shift = n.shift.narrow(0, s0, part.batch);
    Tensor cols = Tensor::empty({part.batch, g.channels * g.kernel_h * g.kernel_w, g.out_h * g.out_w}, x.dtype(),
                                x.device());
    if (cols.numel()) be.im2col_normed(cols, src.narrow(0, s0, part.batch), part, slice);
    return cols;
  });
}

Tensor conv2d_input_grad(const Tensor& g, const Tensor& w, const Shape& x_shape, const Conv2dParams& p) {
  const Im2ColArgs geo = conv2d_geometry(x_shape, w.size(2), w.size(3), p);
  const int64_t O = w.size(0);
  LOOM_CHECK(g.shape() == Shape({geo.batch, O, geo.out_h, geo.out_w}), "conv2d backward: gradient ", g.shape(),
             " does not match the output [", geo.batch, ", ", O, ", ", geo.out_h, ", ", geo.out_w, "]");
  // The library takes any stride and padding; the direct kernel stride 1 with padding ≤ kernel − 1
  // (a convolution of g with the flipped weight); other strides keep GEMM + col2im.
  const ConvPath path = g.device() == w.device() && g.dtype() == w.dtype()
                            ? conv_path(g, geo, ConvPass::InputGrad)
                            : ConvPath::Im2col;
  const bool direct_fits = p.stride_h == 1 && p.stride_w == 1 && p.pad_h <= geo.kernel_h - 1 &&
                           p.pad_w <= geo.kernel_w - 1;
  if (path == ConvPath::Library || (path == ConvPath::Direct && direct_fits)) {
    Conv2dInputGradArgs a;
    a.dy = g.contiguous(), a.w = w.contiguous(), a.geo = geo;
    a.dx = Tensor::empty(x_shape, g.dtype(), g.device());
    if (a.dx.numel() == 0) return a.dx;
    if (path == ConvPath::Library)
      backend_for("conv2d_input_grad", OpKind::Conv2dLibrary, g.device(), g.dtype()).library_conv2d_input_grad(a);
    else
      backend_for("conv2d_input_grad", OpKind::Conv2d, g.device(), g.dtype()).conv2d_input_grad(a);
    return a.dx;
  }
  // Stride 1, k > 1: the input gradient is the convolution of g with the flipped, transposed
  // weight at padding k − 1 − p, i.e. im2col of g and one GEMM writing dx in place — no
  // [N, C·kk, L] columns of dx and no col2im gather (the columns are of g: O·kk rows, fewer than
  // C·kk where O < C, e.g. the up blocks' 960 → 320).
  if (p.stride_h == 1 && p.stride_w == 1 && !pointwise(geo) && p.pad_h <= geo.kernel_h - 1 &&
      p.pad_w <= geo.kernel_w - 1) {
    Conv2dParams q;
    q.pad_h = geo.kernel_h - 1 - p.pad_h, q.pad_w = geo.kernel_w - 1 - p.pad_w;
    return conv2d(g, flipped_transposed(w), Tensor(), q);
  }
  // [C·kk, O] x [N, O, L] -> [N, C·kk, L]
  const Tensor dcols = matmul(w.reshape({O, -1}).transpose(0, 1), g.reshape({geo.batch, O, -1}));
  return col2im(dcols, geo);
}

Tensor conv2d_weight_grad(const Tensor& g, const Tensor& x, const Shape& w_shape, const Conv2dParams& p) {
  const Im2ColArgs geo = conv2d_geometry(x.shape(), w_shape[2], w_shape[3], p);
  const int64_t O = w_shape[0];
  if (g.device() == x.device() && g.dtype() == x.dtype() &&
      conv_path(x, geo, ConvPass::WeightGrad) == ConvPath::Library) {
    Conv2dWeightGradArgs a;
    a.dy = g.contiguous(), a.x = x.contiguous(), a.geo = geo;
    a.dw = Tensor::empty(w_shape, x.dtype(), x.device());
    if (a.dw.numel() == 0) return a.dw;
    if (a.dy.numel() == 0) return Tensor::zeros(w_shape, x.dtype(), x.device());
    backend_for("conv2d_weight_grad", OpKind::Conv2dLibrary, x.device(), x.dtype()).library_conv2d_weight_grad(a);
    return a.dw;
  }
  const Tensor cols = im2col(x, geo);  // [N, C·kk, L]
  // [N, O, L] x [N, L, C·kk] -> [N, O, C·kk], summed over N
  const Tensor per_sample = matmul(g.reshape({geo.batch, O, -1}), cols.transpose(-1, -2));
  return sum(per_sample, {0}).reshape(w_shape);
}

}  // namespace loom::ops
