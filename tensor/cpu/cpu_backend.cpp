// CpuBackend: the Backend contract of tensor/backend.h on the host, with
// Eigen 3 for GEMM and OpenMP loops for everything else.
//
// This file: the elementwise kernels (copy & fill, unary, binary) and the CpuBackend class;
// reductions and softmax are in cpu_reduce.cpp, GEMM in cpu_gemm.cpp, the shared dispatch and
// strided iteration in cpu_kernels.h.
#include "tensor/cpu/cpu_backend.h"
#include "tensor/cpu/cpu_flash.h"

#include "tensor/cpu/cpu_conv.h"
#include "tensor/cpu/cpu_fused.h"
#include "tensor/cpu/cpu_kernels.h"
#include "tensor/cpu/cpu_ops.h"
#include "tensor/cpu/cpu_math.h"
#include "tensor/cpu/cpu_random.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace loom {
namespace {

using namespace cpu::detail;

using cpu::gelu_erf;
using cpu::gelu_erf_grad;
using cpu::gelu_tanh;
using cpu::gelu_tanh_grad;
// ---- copy and fill ---------------------------------------------------------------

// n elements: dst[i·ds] = src[i·ss].
template <typename D, typename S>
void copy_run(D* dst, int64_t ds, const S* src, int64_t ss, int64_t n) {
  if (ds == 1 && ss == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] = convert<D>(src[i]);
  } else if (ds == 1 && ss == 0) {
    std::fill_n(dst, n, convert<D>(src[0]));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i * ds] = convert<D>(src[i * ss]);
  }
}

template <typename D, typename S>
void copy_strided(const Tensor& dst, const Tensor& src) {
  const auto L = collapse<2>(dst.shape(), {&dst.strides(), &src.strides()});
  D* d = static_cast<D*>(dst.raw_data());
  const S* s = static_cast<const S*>(src.raw_data());
  for_each_run(L, dst.numel() > kParallelCopy, [&](const std::array<int64_t, 2>& off, int64_t len) {
    copy_run(d + off[0], L.inner_stride(0), s + off[1], L.inner_stride(1), len);
  });
}

// memcpy in 1 MiB blocks spread over threads when there are several.
void parallel_memcpy(void* dst, const void* src, size_t nbytes) {
  constexpr size_t kBlock = size_t(1) << 20;
  const int64_t blocks = int64_t((nbytes + kBlock - 1) / kBlock);
  char* d = static_cast<char*>(dst);
  const char* s = static_cast<const char*>(src);
#pragma omp parallel for if (blocks > 4) schedule(static)
  for (int64_t i = 0; i < blocks; ++i) {
    const size_t off = size_t(i) * kBlock;
    std::memcpy(d + off, s + off, std::min(kBlock, nbytes - off));
  }
}

template <typename T>
void fill_typed(const Tensor& dst, double value) {
  const T v = from_double<T>(value);
  T* p = static_cast<T*>(dst.raw_data());
  const int64_t n = dst.numel();
#pragma omp parallel for if (n > kParallelCopy) schedule(static)
  for (int64_t i = 0; i < n; ++i) p[i] = v;
}

// ---- unary -------------------------------------------------------------------------

template <typename T, typename F>
void map_unary(T* out, const T* in, int64_t n, const F& f) {
#pragma omp parallel for simd if (n > kParallelElems) schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = f(in[i]);
}

// 1/(1+e^-x), evaluated so that neither branch overflows.
template <typename T> T sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}

template <typename T>
void unary_typed(UnaryOp op, T* o, const T* x, int64_t n, T s) {
  switch (op) {
    case UnaryOp::Neg: return map_unary(o, x, n, [](T v) { return -v; });
    case UnaryOp::Exp: return map_unary(o, x, n, [](T v) { return std::exp(v); });
    case UnaryOp::Log: return map_unary(o, x, n, [](T v) { return std::log(v); });
    case UnaryOp::Sqrt: return map_unary(o, x, n, [](T v) { return std::sqrt(v); });
    case UnaryOp::Rsqrt: return map_unary(o, x, n, [](T v) { return T(1) / std::sqrt(v); });
    case UnaryOp::Tanh: return map_unary(o, x, n, [](T v) { return std::tanh(v); });
    case UnaryOp::Sigmoid: return map_unary(o, x, n, [](T v) { return sigmoid(v); });
    case UnaryOp::Relu: return map_unary(o, x, n, [](T v) { return v < T(0) ? T(0) : v; });  // NaN stays
    case UnaryOp::Step: return map_unary(o, x, n, [](T v) { return v > T(0) ? T(1) : T(0); });
    case UnaryOp::GeluErf: return map_unary(o, x, n, [](T v) { return gelu_erf(v); });
    case UnaryOp::GeluTanh: return map_unary(o, x, n, [](T v) { return gelu_tanh(v); });
    case UnaryOp::GeluErfGrad: return map_unary(o, x, n, [](T v) { return gelu_erf_grad(v); });
    case UnaryOp::GeluTanhGrad: return map_unary(o, x, n, [](T v) { return gelu_tanh_grad(v); });
    case UnaryOp::Silu: return map_unary(o, x, n, [](T v) { return v * sigmoid(v); });
    case UnaryOp::SiluGrad:
      return map_unary(o, x, n, [](T v) {
        const T sig = sigmoid(v);
        return sig * (T(1) + v * (T(1) - sig));
      });
    case UnaryOp::Abs: return map_unary(o, x, n, [](T v) { return std::abs(v); });
    case UnaryOp::Square: return map_unary(o, x, n, [](T v) { return v * v; });
    case UnaryOp::Reciprocal: return map_unary(o, x, n, [](T v) { return T(1) / v; });
    case UnaryOp::AddScalar: return map_unary(o, x, n, [s](T v) { return v + s; });
    case UnaryOp::MulScalar: return map_unary(o, x, n, [s](T v) { return v * s; });
    case UnaryOp::PowScalar: return map_unary(o, x, n, [s](T v) { return std::pow(v, s); });
  }
  LOOM_FAIL("cpu unary: unknown op code ", int(op));
}

// ---- binary ------------------------------------------------------------------------

// n elements: out[i] = f(a[i·sa], b[i·sb]), with unit-stride and broadcast cases
// written out so that they vectorise.
template <typename T, typename F>
void binary_run(T* out, const T* a, int64_t sa, const T* b, int64_t sb, int64_t n, const F& f) {
  if (sa == 1 && sb == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = f(a[i], b[i]);
  } else if (sa == 1 && sb == 0) {
    const T bv = b[0];
    for (int64_t i = 0; i < n; ++i) out[i] = f(a[i], bv);
  } else if (sa == 0 && sb == 1) {
    const T av = a[0];
    for (int64_t i = 0; i < n; ++i) out[i] = f(av, b[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = f(a[i * sa], b[i * sb]);
  }
}

template <typename T, typename F>
void binary_typed(const Tensor& out, const Tensor& a, const Tensor& b, const F& f) {
  T* o = static_cast<T*>(out.raw_data());
  const T* pa = static_cast<const T*>(a.raw_data());
  const T* pb = static_cast<const T*>(b.raw_data());
  const int64_t n = out.numel();
  const bool parallel = n > kParallelElems;
  if (a.is_contiguous() && b.is_contiguous()) {
#pragma omp parallel for simd if (parallel) schedule(static)
    for (int64_t i = 0; i < n; ++i) o[i] = f(pa[i], pb[i]);
    return;
  }
  // out is contiguous, so its collapsed inner stride is 1 (or the run has length 1).
  const auto L = collapse<3>(out.shape(), {&out.strides(), &a.strides(), &b.strides()});
  for_each_run(L, parallel, [&](const std::array<int64_t, 3>& off, int64_t len) {
    binary_run(o + off[0], pa + off[1], L.inner_stride(1), pb + off[2], L.inner_stride(2), len, f);
  });
}

// max / min propagate NaN from either side.
template <typename T>
void binary_dispatch(BinaryOp op, const Tensor& out, const Tensor& a, const Tensor& b) {
  switch (op) {
    case BinaryOp::Add: return binary_typed<T>(out, a, b, [](T x, T y) { return x + y; });
    case BinaryOp::Sub: return binary_typed<T>(out, a, b, [](T x, T y) { return x - y; });
    case BinaryOp::Mul: return binary_typed<T>(out, a, b, [](T x, T y) { return x * y; });
    case BinaryOp::Div: return binary_typed<T>(out, a, b, [](T x, T y) { return x / y; });
    case BinaryOp::Max:
      return binary_typed<T>(out, a, b, [](T x, T y) { return (x > y || is_nan(x)) ? x : y; });
    case BinaryOp::Min:
      return binary_typed<T>(out, a, b, [](T x, T y) { return (x < y || is_nan(x)) ? x : y; });
  }
  LOOM_FAIL("cpu binary: unknown op code ", int(op));
}

// ---- the backend ---------------------------------------------------------------------

class CpuBackend final : public Backend {
 public:
  CpuBackend() = default;

  const char* name() const override { return "cpu"; }

  // bf16 / f16: stored in the low precision, computed in f32 (converted on the way in and out).
  bool supports(OpKind op, DType dtype) const override {
    if (op == OpKind::Copy || op == OpKind::Fill) return true;  // every dtype
    if (op == OpKind::OptimizerUpdate) return dtype == DType::F32 || dtype == DType::F64;
    if (op == OpKind::Conv2d || op == OpKind::Conv2dLibrary) return false;  // tensor/conv.cpp: im2col + GEMM
    if (op == OpKind::GemmBias) return false;  // ops::linear: GEMM, then the bias added
    if (op == OpKind::Im2colNormed) return false;  // tensor/conv.cpp: group norm, then im2col
    if (op == OpKind::LinearGeglu) return false;   // tensor/ops_fused.cpp: linear, then geglu
    return dtype == DType::F32 || dtype == DType::F64 || is_half_dtype(dtype);
  }

  // 64-byte aligned; nbytes 0 still yields a distinct pointer that deallocate frees.
  void* allocate(size_t nbytes, int /*device_index*/) override {
    LOOM_CHECK(nbytes <= std::numeric_limits<size_t>::max() - kAlign,
               "cpu allocate: size too large: ", nbytes, " bytes");
    const size_t rounded = (std::max<size_t>(nbytes, 1) + kAlign - 1) / kAlign * kAlign;
    void* p = std::aligned_alloc(kAlign, rounded);
    LOOM_CHECK(p != nullptr, "cpu allocate: out of host memory allocating ", nbytes, " bytes");
    return p;
  }

  void deallocate(void* ptr, size_t /*nbytes*/, int /*device_index*/) override { std::free(ptr); }

  void copy_from_host(void* dst, const void* src, size_t nbytes, int /*device_index*/) override {
    if (nbytes > 0) parallel_memcpy(dst, src, nbytes);
  }

  void copy_to_host(void* dst, const void* src, size_t nbytes, int /*device_index*/) override {
    if (nbytes > 0) parallel_memcpy(dst, src, nbytes);
  }

  void synchronize(int /*device_index*/) override {}

  void copy(const Tensor& dst, const Tensor& src) override {
    LOOM_CHECK(dst.shape() == src.shape(), "cpu copy: shapes differ: ", dst.shape(), " vs ",
               src.shape());
    if (dst.numel() == 0) return;
    if (dst.dtype() == src.dtype() && dst.is_contiguous() && src.is_contiguous()) {
      parallel_memcpy(dst.raw_data(), src.raw_data(), size_t(dst.numel()) * itemsize(dst.dtype()));
      return;
    }
    visit_any(dst.dtype(), "copy", [&](auto dt) {
      visit_any(src.dtype(), "copy", [&](auto st) {
        copy_strided<typename decltype(dt)::type, typename decltype(st)::type>(dst, src);
      });
    });
  }

  void fill(const Tensor& dst, double value) override {
    visit_any(dst.dtype(), "fill",
              [&](auto tag) { fill_typed<typename decltype(tag)::type>(dst, value); });
  }

  void unary(UnaryOp op, const Tensor& out, const Tensor& in, double scalar) override {
    if (is_half_dtype(out.dtype())) {
      const Tensor o = Tensor::empty(out.shape(), DType::F32);
      unary(op, o, widened(in), scalar);
      return out.copy_(o);
    }
    visit_float(out.dtype(), "unary", [&](auto tag) {
      using T = typename decltype(tag)::type;
      unary_typed<T>(op, static_cast<T*>(out.raw_data()), static_cast<const T*>(in.raw_data()),
                     out.numel(), T(scalar));
    });
  }

  void binary(BinaryOp op, const Tensor& out, const Tensor& a, const Tensor& b) override {
    LOOM_CHECK(a.shape() == out.shape() && b.shape() == out.shape(), "cpu binary: shapes differ: ",
               a.shape(), ", ", b.shape(), " -> ", out.shape());
    if (out.numel() == 0) return;
    if (is_half_dtype(out.dtype())) {
      const Tensor o = Tensor::empty(out.shape(), DType::F32);
      binary(op, o, widened(a), widened(b));
      return out.copy_(o);
    }
    visit_float(out.dtype(), "binary",
                [&](auto tag) { binary_dispatch<typename decltype(tag)::type>(op, out, a, b); });
  }






  // ---- reductions, softmax, GEMM (cpu_reduce.cpp, cpu_gemm.cpp) ----
  void reduce(ReduceOp op, const Tensor& out, const Tensor& in, int64_t outer, int64_t n,
              int64_t inner) override {
    cpu::reduce(op, out, in, outer, n, inner);
  }
  void gemm(const GemmBatch& g) override {
    LOOM_CHECK(g.bias == nullptr, "cpu gemm: no bias epilogue (supports(OpKind::GemmBias) is false)");
    cpu::gemm(g);
  }
  void softmax(const Tensor& out, const Tensor& in, int64_t rows, int64_t n, bool log) override {
    cpu::softmax(out, in, rows, n, log);
  }
  void softmax_backward(const Tensor& dx, const Tensor& y, const Tensor& dy, int64_t rows, int64_t n) override {
    cpu::softmax_backward(dx, y, dy, rows, n);
  }

  // ---- fused ops: attention (tensor/cpu/cpu_flash.cpp) ----
  void flash_attention_check(const FlashAttentionArgs& a) const override { cpu::flash_check(a); }
  void flash_attention_forward(const FlashAttentionArgs& a, const Tensor& out, const Tensor& lse) override {
    cpu::flash_forward(a, out, lse);
  }
  void flash_attention_backward(const FlashAttentionArgs& a, const Tensor& out, const Tensor& lse,
                                const Tensor& grad_out, const Tensor& dq, const Tensor& dk, const Tensor& dv) override {
    cpu::flash_backward(a, out, lse, grad_out, dq, dk, dv);
  }

  // ---- convolution (cpu_conv.cpp) ----
  void im2col(const Tensor& cols, const Tensor& image, const Im2ColArgs& args) override {
    cpu::im2col(cols, image, args);
  }
  void col2im(const Tensor& image, const Tensor& cols, const Im2ColArgs& args) override {
    cpu::col2im(image, cols, args);
  }

  // ---- fused ops: norms, GEGLU, optimizer update (fused family; kernels in cpu_fused.cpp) ----
  void layer_norm(const LayerNormArgs& a) override { cpu::layer_norm(a); }
  void layer_norm_backward(const LayerNormGradArgs& a) override { cpu::layer_norm_backward(a); }
  void group_norm(const GroupNormArgs& a) override { cpu::group_norm(a); }
  void group_norm_backward(const GroupNormGradArgs& a) override { cpu::group_norm_backward(a); }
  void geglu(const GegluArgs& a) override { cpu::geglu(a); }
  void geglu_backward(const GegluGradArgs& a) override { cpu::geglu_backward(a); }
  void optimizer_update(const OptimizerUpdateArgs& a) override { cpu::optimizer_update(a); }
  void bias_residual(const BiasResidualArgs& a) override { cpu::bias_residual(a); }
  void random(const RandomArgs& a) override { cpu::random(a); }
  void unscale_check_finite(const UnscaleArgs& a) override { cpu::unscale_check_finite(a); }
};

}  // namespace

Backend* cpu_backend() {
  static CpuBackend instance;
  return &instance;
}

}  // namespace loom
