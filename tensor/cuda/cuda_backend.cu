// CudaBackend: the Backend interface (tensor/backend.h) on CUDA devices.
//
//   supports(): Copy and Fill for f32, f64, bf16, f16, i64;
//               Unary, Binary, Reduce, Softmax, Gemm for f32, f64, bf16, f16;
//               the fused LayerNorm, GroupNorm, Geglu for f32, f64, bf16, f16 and
//               OptimizerUpdate for f32, f64 (cuda_fused.h);
//               Conv2d (the implicit-GEMM convolution, cuda_conv_igemm.h) for bf16, f16;
//               Conv2dLibrary (cuDNN, cuda_conv_cudnn.h) for bf16, f16 where the build has it.
//
// Each method checks its operands on the host (device, dtype, shape, layout),
// fills a plain parameter struct (cuda_common.h), makes the operands' device
// current for the call (DeviceGuard) and calls one launcher. Kernels run on the
// device's compute stream (cuda_common.h); copy_to_host, copy_from_host (legacy
// stream, which a blocking stream stays ordered with) and synchronize are
// synchronous, everything else is asynchronous and ordered on the compute stream.
// Memory comes from the caching allocator (cuda_allocator.h).
#include <array>
#include <initializer_list>
#include <vector>

#include "tensor/backend.h"
#include "tensor/cuda/cuda_allocator.h"
#include "tensor/cuda/cuda_backend.h"
#include "tensor/cuda/cuda_common.h"
#include "tensor/cuda/cuda_flash.h"
#include "tensor/cuda/cuda_conv.h"
#include "tensor/cuda/cuda_conv_cudnn.h"
#include "tensor/cuda/cuda_conv_igemm.h"
#include "tensor/cuda/cuda_fused.h"
#include "tensor/cuda/cuda_gemm_wgmma.h"

namespace loom {
namespace {

using cuda::DeviceGuard;
using cuda::kMaxDims;

// The CUDA device index shared by `ts`; throws naming `op` when a tensor is
// undefined, not on a CUDA device, or on another CUDA device than the first.
int common_device(const char* op, std::initializer_list<const Tensor*> ts) {
  int index = -1;
  for (const Tensor* t : ts) {
    LOOM_CHECK(t->defined(), op, ": undefined tensor");
    const Device d = t->device();
    LOOM_CHECK(d.is_cuda(), op, ": tensor ", t->str(), " is not on a CUDA device");
    if (index < 0) index = d.index;
    LOOM_CHECK(d.index == index, op, ": tensors on different CUDA devices (cuda:", index, " and ", d, ")");
  }
  return index;
}

// Merges dims so the strided kernels loop over as few dims as possible: size-1
// dims are dropped, and an outer dim d is merged into the next kept inner dim e
// when every operand has stride[d] == stride[e]·shape[e]. Writes the merged
// shape and strides (rank ≥ 1; a one-element tensor becomes [1] with stride 1)
// and returns the rank. Throws when more than kMaxDims dims remain.
template <size_t K>
int merge_dims(const char* op, const Shape& shape, const std::array<const Shape*, K>& strides,
               int64_t* out_shape, const std::array<int64_t*, K>& out_strides) {
  std::vector<int64_t> sh;
  std::vector<std::array<int64_t, K>> st;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    std::array<int64_t, K> s{};
    for (size_t k = 0; k < K; ++k) s[k] = (*strides[k])[d];
    if (!sh.empty()) {
      bool mergeable = true;
      for (size_t k = 0; k < K; ++k) mergeable = mergeable && st.back()[k] == s[k] * shape[d];
      if (mergeable) {
        sh.back() *= shape[d];
        st.back() = s;
        continue;
      }
    }
    sh.push_back(shape[d]);
    st.push_back(s);
  }
  if (sh.empty()) {
    sh.push_back(1);
    std::array<int64_t, K> ones;
    ones.fill(1);
    st.push_back(ones);
  }
  LOOM_CHECK(sh.size() <= size_t(kMaxDims), op, ": shape ", shape, " has ", sh.size(),
             " dims that cannot be merged; the cuda backend supports strided operands of at most ", kMaxDims,
             " dims (make the tensor contiguous first)");
  for (size_t d = 0; d < sh.size(); ++d) {
    out_shape[d] = sh[d];
    for (size_t k = 0; k < K; ++k) out_strides[k][d] = st[d][k];
  }
  return int(sh.size());
}

void check_floating(const char* op, DType dtype) {
  LOOM_CHECK(dtype != DType::I64, op, ": not supported on the cuda backend for dtype ", dtype);
}

class CudaBackend final : public Backend {
 public:
  const char* name() const override { return "cuda"; }

  bool supports(OpKind op, DType dtype) const override {
    switch (op) {
      case OpKind::Copy:
      case OpKind::Fill:
        return true;
      case OpKind::Unary:
      case OpKind::Binary:
      case OpKind::Reduce:
      case OpKind::Gemm:
      case OpKind::Softmax:
      case OpKind::FlashAttention:
      case OpKind::LayerNorm:
      case OpKind::GroupNorm:
      case OpKind::Geglu:
      case OpKind::BiasResidual:
      case OpKind::Random:
      case OpKind::UnscaleCheckFinite:
        return dtype == DType::F32 || dtype == DType::F64 || dtype == DType::BF16 || dtype == DType::F16;
      case OpKind::OptimizerUpdate:
        return dtype == DType::F32 || dtype == DType::F64;
      case OpKind::Conv2d:  // tensor cores; f32 / f64 keep im2col + cuBLAS
        return dtype == DType::BF16 || dtype == DType::F16;
      case OpKind::Conv2dLibrary:  // cuDNN where this build has it (cuda_conv_cudnn.h); bf16 / f16 as above
        return (dtype == DType::BF16 || dtype == DType::F16) && cuda::cudnn_conv_available();
      case OpKind::GemmBias:  // cuBLASLt's bias epilogue (cuda_gemm_lt.cu); f32 / f64 keep GEMM + add
        return dtype == DType::BF16 || dtype == DType::F16;
      case OpKind::Im2colNormed:  // cuda_conv.cu
        return dtype == DType::F32 || dtype == DType::F64 || dtype == DType::BF16 || dtype == DType::F16;
      case OpKind::LinearGeglu:  // cuda_gemm_wgmma.cu: Hopper's wgmma (a build and device with sm_90a)
        return (dtype == DType::BF16 || dtype == DType::F16) && cuda::flash_wgmma_available();
    }
    return false;
  }

  // ---- memory ------------------------------------------------------------
  void* allocate(size_t nbytes, int device_index) override { return cuda::cached_malloc(nbytes, device_index); }

  void deallocate(void* ptr, size_t nbytes, int device_index) override {
    cuda::cached_free(ptr, nbytes, device_index);
  }

  void copy_from_host(void* dst, const void* src, size_t nbytes, int device_index) override {
    if (nbytes == 0) return;
    DeviceGuard guard(device_index);
    LOOM_CUDA_CHECK(cudaMemcpy(dst, src, nbytes, cudaMemcpyHostToDevice));
  }

  void copy_to_host(void* dst, const void* src, size_t nbytes, int device_index) override {
    if (nbytes == 0) return;
    DeviceGuard guard(device_index);
    LOOM_CUDA_CHECK(cudaMemcpy(dst, src, nbytes, cudaMemcpyDeviceToHost));
  }

  void synchronize(int device_index) override {
    DeviceGuard guard(device_index);
    LOOM_CUDA_CHECK(cudaDeviceSynchronize());
  }

  // ---- kernels -------------------------------------------------------------
  void copy(const Tensor& dst, const Tensor& src) override {
    const int device = common_device("cuda copy", {&dst, &src});
    LOOM_CHECK(dst.shape() == src.shape(), "cuda copy: destination shape ", dst.shape(), " != source shape ",
               src.shape());
    cuda::CopyParams p;
    p.dst = dst.raw_data();
    p.src = src.raw_data();
    p.dst_dtype = dst.dtype();
    p.src_dtype = src.dtype();
    p.numel = dst.numel();
    if (p.numel == 0) return;
    p.ndim = merge_dims<2>("cuda copy", dst.shape(), {&dst.strides(), &src.strides()}, p.shape,
                           {p.dst_strides, p.src_strides});
    DeviceGuard guard(device);
    cuda::launch_copy(p);
  }

  void fill(const Tensor& dst, double value) override {
    const int device = common_device("cuda fill", {&dst});
    LOOM_CHECK(dst.is_contiguous(), "cuda fill: destination ", dst.str(), " is not contiguous");
    cuda::FillParams p;
    p.dst = dst.raw_data();
    p.dtype = dst.dtype();
    p.numel = dst.numel();
    p.value = value;
    DeviceGuard guard(device);
    cuda::launch_fill(p);
  }

  void unary(UnaryOp op, const Tensor& out, const Tensor& in, double scalar) override {
    const int device = common_device("cuda unary", {&out, &in});
    check_floating("cuda unary", in.dtype());
    LOOM_CHECK(out.dtype() == in.dtype() && out.shape() == in.shape(), "cuda unary: output ", out.str(),
               " does not match input ", in.str());
    LOOM_CHECK(out.is_contiguous() && in.is_contiguous(), "cuda unary: operands must be contiguous (", out.str(),
               ", ", in.str(), ")");
    cuda::UnaryParams p;
    p.op = op;
    p.dtype = in.dtype();
    p.out = out.raw_data();
    p.in = in.raw_data();
    p.numel = in.numel();
    p.scalar = scalar;
    DeviceGuard guard(device);
    cuda::launch_unary(p);
  }

  void binary(BinaryOp op, const Tensor& out, const Tensor& a, const Tensor& b) override {
    const int device = common_device("cuda binary", {&out, &a, &b});
    check_floating("cuda binary", out.dtype());
    LOOM_CHECK(a.dtype() == out.dtype() && b.dtype() == out.dtype(), "cuda binary: dtypes differ (out ",
               out.dtype(), ", a ", a.dtype(), ", b ", b.dtype(), ")");
    LOOM_CHECK(a.shape() == out.shape() && b.shape() == out.shape(), "cuda binary: operand shapes ", a.shape(),
               " and ", b.shape(), " must equal the output shape ", out.shape());
    LOOM_CHECK(out.is_contiguous(), "cuda binary: output ", out.str(), " is not contiguous");
    cuda::BinaryParams p;
    p.op = op;
    p.dtype = out.dtype();
    p.out = out.raw_data();
    p.a = a.raw_data();
    p.b = b.raw_data();
    p.numel = out.numel();
    if (p.numel == 0) return;
    // Merging with out's contiguous strides keeps out's linear index valid.
    const Shape out_strides = contiguous_strides(out.shape());
    int64_t merged_out_strides[kMaxDims];
    p.ndim = merge_dims<3>("cuda binary", out.shape(), {&out_strides, &a.strides(), &b.strides()}, p.shape,
                           {merged_out_strides, p.a_strides, p.b_strides});
    DeviceGuard guard(device);
    cuda::launch_binary(p);
  }

  void reduce(ReduceOp op, const Tensor& out, const Tensor& in, int64_t outer, int64_t n,
              int64_t inner) override {
    const int device = common_device("cuda reduce", {&out, &in});
    check_floating("cuda reduce", in.dtype());
    LOOM_CHECK(out.dtype() == in.dtype(), "cuda reduce: output dtype ", out.dtype(), " != input dtype ",
               in.dtype());
    LOOM_CHECK(out.is_contiguous() && in.is_contiguous(), "cuda reduce: operands must be contiguous (",
               out.str(), ", ", in.str(), ")");
    LOOM_CHECK(outer >= 0 && n >= 0 && inner >= 0 && in.numel() == outer * n * inner &&
                   out.numel() == outer * inner,
               "cuda reduce: [outer ", outer, ", n ", n, ", inner ", inner, "] does not match input ", in.str(),
               " and output ", out.str());
    cuda::ReduceParams p;
    p.op = op;
    p.dtype = in.dtype();
    p.out = out.raw_data();
    p.in = in.raw_data();
    p.outer = outer;
    p.n = n;
    p.inner = inner;
    DeviceGuard guard(device);
    cuda::launch_reduce(p);
  }

  void gemm(const GemmBatch& g) override {
    check_floating("cuda gemm", g.dtype);
    cuda::launch_gemm(g);  // sets g.device current itself
  }

  void softmax(const Tensor& out, const Tensor& in, int64_t rows, int64_t n, bool log) override {
    const char* op = log ? "cuda log_softmax" : "cuda softmax";
    const int device = common_device(op, {&out, &in});
    check_floating(op, in.dtype());
    LOOM_CHECK(out.dtype() == in.dtype() && out.shape() == in.shape(), op, ": output ", out.str(),
               " does not match input ", in.str());
    LOOM_CHECK(out.is_contiguous() && in.is_contiguous(), op, ": operands must be contiguous (", out.str(), ", ",
               in.str(), ")");
    LOOM_CHECK(rows >= 0 && n >= 0 && in.numel() == rows * n, op, ": [rows ", rows, ", n ", n,
               "] does not match input ", in.str());
    cuda::SoftmaxParams p;
    p.dtype = in.dtype();
    p.out = out.raw_data();
    p.in = in.raw_data();
    p.rows = rows;
    p.n = n;
    p.log = log;
    DeviceGuard guard(device);
    cuda::launch_softmax(p);
  }

  void softmax_backward(const Tensor& dx, const Tensor& y, const Tensor& dy, int64_t rows, int64_t n) override {
    const char* op = "cuda softmax_backward";
    const int device = common_device(op, {&dx, &y, &dy});
    check_floating(op, y.dtype());
    for (const Tensor* t : {&dx, &dy})
      LOOM_CHECK(t->dtype() == y.dtype() && t->shape() == y.shape(), op, ": ", t->str(), " does not match y ", y.str());
    LOOM_CHECK(dx.is_contiguous() && y.is_contiguous() && dy.is_contiguous(), op, ": operands must be contiguous");
    LOOM_CHECK(rows >= 0 && n >= 0 && y.numel() == rows * n, op, ": [rows ", rows, ", n ", n, "] does not match ",
               y.str());
    cuda::SoftmaxGradParams p;
    p.dtype = y.dtype(), p.dx = dx.raw_data(), p.y = y.raw_data(), p.dy = dy.raw_data(), p.rows = rows, p.n = n;
    DeviceGuard guard(device);
    cuda::launch_softmax_backward(p);
  }

  // ---- fused ops: attention (cuda_flash_host.cu, cuda_flash.cu) ----
  void flash_attention_check(const FlashAttentionArgs& a) const override { cuda::flash_check(a); }
  void flash_attention_forward(const FlashAttentionArgs& a, const Tensor& out, const Tensor& lse) override {
    cuda::flash_forward(a, out, lse);
  }
  void flash_attention_backward(const FlashAttentionArgs& a, const Tensor& out, const Tensor& lse,
                                const Tensor& grad_out, const Tensor& dq, const Tensor& dk, const Tensor& dv) override {
    cuda::flash_backward(a, out, lse, grad_out, dq, dk, dv);
  }

  // ---- convolution (cuda_conv.cu) ----
  void im2col(const Tensor& cols, const Tensor& image, const Im2ColArgs& args) override {
    launch_conv_copy("cuda im2col", cols, image, args, true);
  }
  void im2col_normed(const Tensor& cols, const Tensor& image, const Im2ColArgs& args, const Im2ColNorm& norm) override {
    launch_conv_copy("cuda im2col_normed", cols, image, args, true, &norm);
  }
  void col2im(const Tensor& image, const Tensor& cols, const Im2ColArgs& args) override {
    launch_conv_copy("cuda col2im", cols, image, args, false);
  }
  // the implicit-GEMM convolution, bf16 / f16 (cuda_conv_igemm.cu)
  void conv2d(const Conv2dArgs& a) override { cuda::conv2d_implicit_gemm(a); }
  void conv2d_input_grad(const Conv2dInputGradArgs& a) override { cuda::conv2d_input_grad_implicit_gemm(a); }
  void library_conv2d(const Conv2dArgs& a) override { cuda::cudnn_conv2d(a); }
  void library_conv2d_input_grad(const Conv2dInputGradArgs& a) override { cuda::cudnn_conv2d_input_grad(a); }
  void library_conv2d_weight_grad(const Conv2dWeightGradArgs& a) override { cuda::cudnn_conv2d_weight_grad(a); }

  // ---- fused ops: norms, GEGLU, optimizer update (fused family; host checks in cuda_fused.cu) ----
  void layer_norm(const LayerNormArgs& a) override { cuda::fused_layer_norm(a); }
  void layer_norm_backward(const LayerNormGradArgs& a) override { cuda::fused_layer_norm_backward(a); }
  void group_norm(const GroupNormArgs& a) override { cuda::fused_group_norm(a); }
  void group_norm_backward(const GroupNormGradArgs& a) override { cuda::fused_group_norm_backward(a); }
  void geglu(const GegluArgs& a) override { cuda::fused_geglu(a); }
  bool linear_geglu(const LinearGegluArgs& a) override { return cuda::gemm_geglu(a); }
  void geglu_backward(const GegluGradArgs& a) override { cuda::fused_geglu_backward(a); }
  void optimizer_update(const OptimizerUpdateArgs& a) override { cuda::fused_optimizer_update(a); }
  void bias_residual(const BiasResidualArgs& a) override { cuda::fused_bias_residual(a); }
  void random(const RandomArgs& a) override { cuda::fused_random(a); }
  void unscale_check_finite(const UnscaleArgs& a) override { cuda::fused_unscale_check_finite(a); }

 private:
  // The group norm of im2col_normed into p, its operands checked against the image.
  static void set_norm(const char* op, cuda::Im2ColParams& p, const Im2ColNorm& n, const Tensor& image,
                       const Im2ColArgs& args) {
    const DType stats = image.dtype() == DType::F64 ? DType::F64 : DType::F32;
    LOOM_CHECK(n.groups >= 1 && args.channels % n.groups == 0, op, ": ", args.channels,
               " channels do not split into ", n.groups, " groups");
    auto check = [&](const Tensor& t, const char* what, int64_t numel, DType dtype, bool required) -> const void* {
      LOOM_CHECK(t.defined() || !required, op, ": ", what, " is required");
      if (!t.defined()) return nullptr;
      LOOM_CHECK(t.device() == image.device() && t.dtype() == dtype && t.is_contiguous() && t.numel() == numel, op,
                 ": ", what, " ", t.str(), " must be ", numel, " contiguous ", dtype_name(dtype), " values on ",
                 image.device());
      return t.raw_data();
    };
    p.norm_mean = check(n.mean, "mean", args.batch * n.groups, stats, true);
    p.norm_rstd = check(n.rstd, "rstd", args.batch * n.groups, stats, true);
    p.norm_weight = check(n.weight, "weight", args.channels, image.dtype(), false);
    p.norm_bias = check(n.bias, "bias", args.channels, image.dtype(), false);
    p.norm_shift = check(n.shift, "shift", args.batch * args.channels, image.dtype(), false);
    p.norm_groups = n.groups;
    p.norm_silu = n.silu;
    p.normed = true;
  }

  static void launch_conv_copy(const char* op, const Tensor& cols, const Tensor& image, const Im2ColArgs& args,
                               bool to_cols, const Im2ColNorm* norm = nullptr) {
    const int device = common_device(op, {&cols, &image});
    check_floating(op, image.dtype());
    LOOM_CHECK(cols.dtype() == image.dtype(), op, ": dtypes differ (cols ", cols.dtype(), ", image ",
               image.dtype(), ")");
    LOOM_CHECK(cols.is_contiguous() && image.is_contiguous(), op, ": operands must be contiguous (", cols.str(),
               ", ", image.str(), ")");
    LOOM_CHECK(image.numel() == args.batch * args.channels * args.height * args.width &&
                   cols.numel() == args.batch * args.channels * args.kernel_h * args.kernel_w * args.out_h *
                                       args.out_w,
               op, ": geometry does not match image ", image.str(), " and cols ", cols.str());
    cuda::Im2ColParams p;
    p.dtype = image.dtype();
    p.image = image.raw_data();
    p.cols = cols.raw_data();
    p.geo = args;
    if (norm) set_norm(op, p, *norm, image, args);
    DeviceGuard guard(device);
    if (to_cols) cuda::launch_im2col(p);
    else cuda::launch_col2im(p);
  }
};

}  // namespace

Backend* cuda_backend() {
  static CudaBackend* backend = new CudaBackend();  // never destroyed: tensors may outlive statics
  return backend;
}

int cuda_runtime_device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver or no device: clear the error and report none
    return 0;
  }
  return count;
}

}  // namespace loom
