// CpuBackend: the Backend contract of tensor/backend.h on the host, with
// Eigen 3 for GEMM and OpenMP loops for everything else.
//
// Layout of this file:
//   dtype dispatch and conversions
//   strided iteration (Layout / RowCursor / for_each_run), shared by copy and binary
//   kernels by family: copy & fill, unary, binary, reduce, softmax, gemm
//   the CpuBackend class and cpu_backend()
#include "tensor/cpu/cpu_backend.h"
#include "tensor/cpu/cpu_flash.h"

#include "tensor/cpu/cpu_conv.h"
#include "tensor/cpu/cpu_fused.h"
#include "tensor/cpu/cpu_math.h"
#include "tensor/cpu/cpu_random.h"

#include <omp.h>

#include <Eigen/Core>
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

using cpu::gelu_erf;
using cpu::gelu_erf_grad;
using cpu::gelu_tanh;
using cpu::gelu_tanh_grad;

// Element counts above which a kernel runs an OpenMP team; smaller ops stay on
// the calling thread, where a team would cost more than it saves.
constexpr int64_t kParallelElems = int64_t(1) << 15;  // unary, binary, reduce, softmax
constexpr int64_t kParallelCopy = int64_t(1) << 16;   // copy, fill
// Longest inner run handed to one thread by for_each_run.
constexpr int64_t kRunChunk = int64_t(1) << 14;
// Widest column block of the [outer, n, inner] reduction (accumulators on the stack).
constexpr int64_t kColumnBlock = 256;
constexpr size_t kAlign = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
template <typename T> bool is_nan(T x) { return x != x; }

// ---- dtype dispatch and conversions -----------------------------------------------

template <typename T> struct Tag { using type = T; };

// Calls f(Tag<T>{}) with the C++ type T of dtype t (all five dtypes).
template <typename F>
void visit_any(DType t, const char* op, F&& f) {
  switch (t) {
    case DType::F32: return f(Tag<float>{});
    case DType::F64: return f(Tag<double>{});
    case DType::BF16: return f(Tag<bf16>{});
    case DType::F16: return f(Tag<f16>{});
    case DType::I64: return f(Tag<int64_t>{});
  }
  LOOM_FAIL("cpu ", op, ": unknown dtype code ", int(t));
}

// Calls f(Tag<T>{}) for f32 / f64; throws naming op and dtype for the others.
template <typename F>
void visit_float(DType t, const char* op, F&& f) {
  if (t == DType::F32) return f(Tag<float>{});
  if (t == DType::F64) return f(Tag<double>{});
  LOOM_FAIL("cpu ", op, ": dtype ", dtype_name(t), " is not supported (f32 and f64 only)");
}

template <typename T>
constexpr bool is_half_v = std::is_same_v<T, bf16> || std::is_same_v<T, f16>;

// NaN -> 0; out-of-range values saturate; otherwise truncation toward zero.
int64_t saturate_i64(double v) {
  if (is_nan(v)) return 0;
  if (v >= 9223372036854775808.0) return std::numeric_limits<int64_t>::max();
  if (v <= -9223372036854775808.0) return std::numeric_limits<int64_t>::min();
  return int64_t(v);
}

template <typename T>
double to_double(T v) {
  if constexpr (is_half_v<T>) return double(float(v));
  else return double(v);
}

// bf16 / f16 are rounded from f32 (round to nearest even).
template <typename T>
T from_double(double v) {
  if constexpr (is_half_v<T>) return T(float(v));
  else if constexpr (std::is_same_v<T, int64_t>) return saturate_i64(v);
  else return T(v);
}

// Same type: the value itself (exact for i64); otherwise through double, which
// holds every f32, bf16, f16 value exactly.
template <typename D, typename S>
D convert(S v) {
  if constexpr (std::is_same_v<D, S>) return v;
  else return from_double<D>(to_double(v));
}

// ---- strided iteration ---------------------------------------------------------

// The index space of N operands sharing one shape, with size-1 dims dropped and
// adjacent dims merged wherever every operand's strides allow it. The last dim
// is the inner run; a rank-0 space becomes shape [1] with strides 0.
template <int N>
struct Layout {
  std::vector<int64_t> shape;
  std::array<std::vector<int64_t>, N> strides;  // in elements, per operand

  int64_t inner() const { return shape.back(); }
  int64_t inner_stride(int k) const { return strides[k].back(); }
  int64_t rows() const {
    int64_t r = 1;
    for (size_t d = 0; d + 1 < shape.size(); ++d) r *= shape[d];
    return r;
  }
};

template <int N>
Layout<N> collapse(const Shape& shape, const std::array<const Shape*, N>& strides) {
  Layout<N> L;
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) continue;
    // The previous (outer) dim merges with d when its stride spans all of d.
    bool merge = !L.shape.empty();
    for (int k = 0; k < N && merge; ++k) merge = L.strides[k].back() == (*strides[k])[d] * shape[d];
    if (merge) {
      L.shape.back() *= shape[d];
      for (int k = 0; k < N; ++k) L.strides[k].back() = (*strides[k])[d];
    } else {
      L.shape.push_back(shape[d]);
      for (int k = 0; k < N; ++k) L.strides[k].push_back((*strides[k])[d]);
    }
  }
  if (L.shape.empty()) {
    L.shape.push_back(1);
    for (int k = 0; k < N; ++k) L.strides[k].push_back(0);
  }
  return L;
}

// Walks the rows of a Layout (every dim but the last) in row-major order,
// keeping each operand's element offset of the current row's first element.
template <int N>
class RowCursor {
 public:
  RowCursor(const Layout<N>& L, int64_t row) : L_(L), idx_(L.shape.size() - 1, 0) {
    offsets_.fill(0);
    for (int64_t d = int64_t(idx_.size()) - 1; d >= 0; --d) {
      idx_[d] = row % L.shape[d];
      row /= L.shape[d];
      for (int k = 0; k < N; ++k) offsets_[k] += idx_[d] * L.strides[k][d];
    }
  }

  void next() {
    for (int64_t d = int64_t(idx_.size()) - 1; d >= 0; --d) {
      for (int k = 0; k < N; ++k) offsets_[k] += L_.strides[k][d];
      if (++idx_[d] < L_.shape[d]) return;
      for (int k = 0; k < N; ++k) offsets_[k] -= idx_[d] * L_.strides[k][d];
      idx_[d] = 0;
    }
  }

  const std::array<int64_t, N>& offsets() const { return offsets_; }

 private:
  const Layout<N>& L_;
  std::vector<int64_t> idx_;
  std::array<int64_t, N> offsets_;
};

// Calls run(offsets, len) for every inner run of L, cut into pieces of at most
// kRunChunk elements (so that one long row still spreads over threads). offsets
// are per operand, in elements, of the piece's first element. With `parallel`,
// each thread of an OpenMP team takes a contiguous range of pieces.
template <int N, typename Run>
void for_each_run(const Layout<N>& L, bool parallel, const Run& run) {
  const int64_t n = L.inner();
  const int64_t per_row = ceil_div(n, kRunChunk);
  const int64_t pieces = L.rows() * per_row;
#pragma omp parallel if (parallel)
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t lo = pieces * t / nt, hi = pieces * (t + 1) / nt;
    if (lo < hi) {
      int64_t row = lo / per_row;
      RowCursor<N> cursor(L, row);
      for (int64_t p = lo; p < hi; ++p) {
        for (; row < p / per_row; ++row) cursor.next();
        const int64_t start = (p % per_row) * kRunChunk;
        std::array<int64_t, N> off = cursor.offsets();
        for (int k = 0; k < N; ++k) off[k] += start * L.inner_stride(k);
        run(off, std::min(kRunChunk, n - start));
      }
    }
  }
}

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

// ---- reduce ------------------------------------------------------------------------

// Σ x[i] over a contiguous run, accumulated in double.
template <typename T>
T sum_run(const T* x, int64_t n, bool parallel) {
  double s = 0.0;
#pragma omp parallel for simd reduction(+ : s) if (parallel) schedule(static)
  for (int64_t i = 0; i < n; ++i) s += double(x[i]);
  return T(s);
}

// max x[i] over a contiguous run; NaN if any element is NaN; -inf when n == 0.
template <typename T>
T max_run(const T* x, int64_t n, bool parallel) {
  T m = -std::numeric_limits<T>::infinity();
  bool nan = false;
#pragma omp parallel for reduction(max : m) reduction(|| : nan) if (parallel) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    m = std::max(m, x[i]);
    nan = nan || is_nan(x[i]);
  }
  return nan ? std::numeric_limits<T>::quiet_NaN() : m;
}

// inner == 1: out[o] = reduce(in[o, 0:n]). Parallel over rows when there are
// enough of them, else over the elements of each row.
template <typename T>
void reduce_rows(ReduceOp op, T* out, const T* in, int64_t outer, int64_t n) {
  auto row_result = [&](int64_t o, bool parallel) {
    const T* row = in + o * n;
    return op == ReduceOp::Sum ? sum_run(row, n, parallel) : max_run(row, n, parallel);
  };
  const bool large = outer * n > kParallelElems;
  if (large && outer >= omp_get_max_threads()) {
#pragma omp parallel for schedule(static)
    for (int64_t o = 0; o < outer; ++o) out[o] = row_result(o, false);
    return;
  }
  for (int64_t o = 0; o < outer; ++o) out[o] = row_result(o, large && n > kParallelElems);
}

// dst[0:w] = reduce over j < n of src[j·stride + 0:w]: one row at a time, so
// every read is a contiguous run of w elements.
template <typename T>
void reduce_columns(ReduceOp op, T* dst, const T* src, int64_t n, int64_t stride, int64_t w) {
  if (op == ReduceOp::Sum) {
    double acc[kColumnBlock] = {};
    for (int64_t j = 0; j < n; ++j) {
      const T* row = src + j * stride;
      for (int64_t i = 0; i < w; ++i) acc[i] += double(row[i]);
    }
    for (int64_t i = 0; i < w; ++i) dst[i] = T(acc[i]);
    return;
  }
  T acc[kColumnBlock];
  std::fill_n(acc, w, -std::numeric_limits<T>::infinity());
  for (int64_t j = 0; j < n; ++j) {
    const T* row = src + j * stride;
    for (int64_t i = 0; i < w; ++i) acc[i] = (row[i] > acc[i] || is_nan(row[i])) ? row[i] : acc[i];
  }
  std::copy_n(acc, w, dst);
}

// inner > 1: in [outer, n, inner] -> out [outer, inner], in column blocks; the
// work items (outer × column blocks) spread over threads. Blocks shrink (down to
// 16 columns) when there are fewer items than threads.
template <typename T>
void reduce_inner(ReduceOp op, T* out, const T* in, int64_t outer, int64_t n, int64_t inner) {
  const bool parallel = outer * n * inner > kParallelElems;
  int64_t block = kColumnBlock;
  while (parallel && block > 16 && outer * ceil_div(inner, block) < omp_get_max_threads()) block /= 2;
  const int64_t blocks = ceil_div(inner, block);
#pragma omp parallel for if (parallel && outer * blocks > 1) schedule(static)
  for (int64_t item = 0; item < outer * blocks; ++item) {
    const int64_t o = item / blocks, c0 = (item % blocks) * block;
    reduce_columns(op, out + o * inner + c0, in + o * n * inner + c0, n, inner,
                   std::min(block, inner - c0));
  }
}

// ---- softmax -----------------------------------------------------------------------

// One row of n: out = softmax(in) or log_softmax(in), shifted by the row max;
// the sum of exps is accumulated in double. out may alias in.
template <typename T>
void softmax_row(T* out, const T* in, int64_t n, bool log) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) m = (in[j] > m || is_nan(in[j])) ? in[j] : m;
  double s = 0.0;
  if (log) {
    for (int64_t j = 0; j < n; ++j) s += double(std::exp(in[j] - m));
    const T log_s = T(std::log(s));  // (x − m) − log s: rounding at the scale of x − m, not of m
    for (int64_t j = 0; j < n; ++j) out[j] = (in[j] - m) - log_s;
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    out[j] = std::exp(in[j] - m);
    s += double(out[j]);
  }
  const T inv = T(1.0 / s);
  for (int64_t j = 0; j < n; ++j) out[j] *= inv;
}

template <typename T>
void softmax_typed(const Tensor& out, const Tensor& in, int64_t rows, int64_t n, bool log) {
  T* o = static_cast<T*>(out.raw_data());
  const T* x = static_cast<const T*>(in.raw_data());
#pragma omp parallel for if (rows > 1 && rows * n > kParallelElems) schedule(static)
  for (int64_t r = 0; r < rows; ++r) softmax_row(o + r * n, x + r * n, n, log);
}

// dx = y∘(dy − Σ_j dy∘y) over rows of n (sum in double); dx may alias dy.
template <typename T>
void softmax_backward_typed(const Tensor& dx, const Tensor& y, const Tensor& dy, int64_t rows, int64_t n) {
  T* o = static_cast<T*>(dx.raw_data());
  const T* py = static_cast<const T*>(y.raw_data());
  const T* pg = static_cast<const T*>(dy.raw_data());
#pragma omp parallel for if (rows > 1 && rows * n > kParallelElems) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const T *yr = py + r * n, *gr = pg + r * n;
    double s = 0.0;
    for (int64_t j = 0; j < n; ++j) s += double(gr[j]) * double(yr[j]);
    T* out = o + r * n;
    for (int64_t j = 0; j < n; ++j) out[j] = T(double(yr[j]) * (double(gr[j]) - s));
  }
}

// ---- gemm --------------------------------------------------------------------------

template <typename T>
using RowMat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using ConstMatMap = Eigen::Map<const RowMat<T>, Eigen::Unaligned, Eigen::OuterStride<>>;
template <typename T>
using MatMap = Eigen::Map<RowMat<T>, Eigen::Unaligned, Eigen::OuterStride<>>;

// C = alpha·A·B + beta·C, with A, B Eigen expressions (maps or their transposes).
// beta == 0 overwrites C without reading it, so NaN in C does not survive.
template <typename T, typename MA, typename MB>
void gemm_product(MatMap<T>& C, const MA& A, const MB& B, T alpha, T beta) {
  if (beta == T(0)) {
    if (alpha == T(1)) C.noalias() = A * B;
    else C.noalias() = alpha * A * B;
    return;
  }
  if (beta != T(1)) C *= beta;
  C.noalias() += alpha * A * B;
}

// Batch entry i of g. op(A) m×k is stored m×k, or k×m with trans_a; likewise op(B) k×n.
template <typename T>
void gemm_one(const GemmBatch& g, int64_t i) {
  const T* a = static_cast<const T*>(g.a) + i * g.stride_a;
  const T* b = static_cast<const T*>(g.b) + i * g.stride_b;
  MatMap<T> C(static_cast<T*>(g.c) + i * g.stride_c, g.m, g.n, Eigen::OuterStride<>(g.ldc));
  const T alpha = T(g.alpha), beta = T(g.beta);
  if (g.k == 0 || alpha == T(0)) {  // C = beta·C; A and B are not read
    if (beta == T(0)) C.setZero();
    else C *= beta;
    return;
  }
  ConstMatMap<T> A(a, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, Eigen::OuterStride<>(g.lda));
  ConstMatMap<T> B(b, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, Eigen::OuterStride<>(g.ldb));
  if (!g.trans_a && !g.trans_b) gemm_product(C, A, B, alpha, beta);
  else if (!g.trans_a) gemm_product(C, A, B.transpose(), alpha, beta);
  else if (!g.trans_b) gemm_product(C, A.transpose(), B, alpha, beta);
  else gemm_product(C, A.transpose(), B.transpose(), alpha, beta);
}

// A batch of at least one entry per thread runs one product per thread (Eigen is
// single-threaded inside a parallel region); a smaller batch runs its products
// one after another and Eigen threads each. A shared C (stride_c 0) stays serial.
template <typename T>
void gemm_batch(const GemmBatch& g) {
  // A team only pays off for enough work (multiply-adds); tiny batched products stay serial.
  const bool large = double(g.m) * double(g.n) * double(g.k) * double(g.batch) >= double(1 << 18);
  if (large && g.batch > 1 && g.stride_c != 0 && g.batch >= omp_get_max_threads()) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < g.batch; ++i) gemm_one<T>(g, i);
    return;
  }
  for (int64_t i = 0; i < g.batch; ++i) gemm_one<T>(g, i);
}

// ---- bf16 / f16 storage, f32 compute -------------------------------------------------

bool is_half_dtype(DType t) { return t == DType::BF16 || t == DType::F16; }

// A contiguous f32 copy of `t` (any strides; broadcast views are materialised).
Tensor widened(const Tensor& t) { return t.to(DType::F32).contiguous(); }

// Elements [0, count) of a raw bf16 / f16 buffer as f32, and back.
std::vector<float> widen_span(const void* p, DType t, int64_t count) {
  std::vector<float> out(size_t(std::max<int64_t>(count, 0)));
  visit_any(t, "gemm", [&](auto tag) {
    using S = typename decltype(tag)::type;
    const S* src = static_cast<const S*>(p);
    for (int64_t i = 0; i < count; ++i) out[size_t(i)] = convert<float>(src[i]);
  });
  return out;
}
void narrow_span(void* p, DType t, const std::vector<float>& v) {
  visit_any(t, "gemm", [&](auto tag) {
    using D = typename decltype(tag)::type;
    D* dst = static_cast<D*>(p);
    for (size_t i = 0; i < v.size(); ++i) dst[i] = convert<D>(v[i]);
  });
}

// Elements a strided batch of rows×cols matrices (leading dim ld, batch stride) spans.
int64_t span_of(int64_t batch, int64_t stride, int64_t rows, int64_t cols, int64_t ld) {
  if (rows == 0 || cols == 0 || batch == 0) return 0;
  return (batch - 1) * stride + (rows - 1) * ld + cols;
}

// ---- the backend ---------------------------------------------------------------------

class CpuBackend final : public Backend {
 public:
  CpuBackend() { Eigen::initParallel(); }

  const char* name() const override { return "cpu"; }

  // bf16 / f16: stored in the low precision, computed in f32 (converted on the way in and out).
  bool supports(OpKind op, DType dtype) const override {
    if (op == OpKind::Copy || op == OpKind::Fill) return true;  // every dtype
    if (op == OpKind::OptimizerUpdate) return dtype == DType::F32 || dtype == DType::F64;
    if (op == OpKind::Conv2d) return false;  // no direct kernel: tensor/conv.cpp uses im2col + GEMM
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

  void reduce(ReduceOp op, const Tensor& out, const Tensor& in, int64_t outer, int64_t n,
              int64_t inner) override {
    if (outer == 0 || inner == 0) return;
    if (is_half_dtype(out.dtype())) {
      const Tensor o = Tensor::empty(out.shape(), DType::F32);
      reduce(op, o, widened(in), outer, n, inner);
      return out.copy_(o);
    }
    visit_float(out.dtype(), "reduce", [&](auto tag) {
      using T = typename decltype(tag)::type;
      T* o = static_cast<T*>(out.raw_data());
      const T* x = static_cast<const T*>(in.raw_data());
      if (inner == 1) reduce_rows(op, o, x, outer, n);
      else reduce_inner(op, o, x, outer, n, inner);
    });
  }

  void gemm(const GemmBatch& g) override {
    if (g.m == 0 || g.n == 0 || g.batch == 0) return;
    if (is_half_dtype(g.dtype)) return gemm_through_f32(g);
    visit_float(g.dtype, "gemm", [&](auto tag) { gemm_batch<typename decltype(tag)::type>(g); });
  }

  void softmax(const Tensor& out, const Tensor& in, int64_t rows, int64_t n, bool log) override {
    if (rows == 0 || n == 0) return;
    if (is_half_dtype(out.dtype())) {
      const Tensor o = Tensor::empty(out.shape(), DType::F32);
      softmax(o, widened(in), rows, n, log);
      return out.copy_(o);
    }
    visit_float(out.dtype(), log ? "log_softmax" : "softmax", [&](auto tag) {
      softmax_typed<typename decltype(tag)::type>(out, in, rows, n, log);
    });
  }

  void softmax_backward(const Tensor& dx, const Tensor& y, const Tensor& dy, int64_t rows, int64_t n) override {
    if (rows == 0 || n == 0) return;
    if (is_half_dtype(dx.dtype())) {
      const Tensor o = Tensor::empty(dx.shape(), DType::F32);
      softmax_backward(o, widened(y), widened(dy), rows, n);
      return dx.copy_(o);
    }
    visit_float(dx.dtype(), "softmax_backward", [&](auto tag) {
      softmax_backward_typed<typename decltype(tag)::type>(dx, y, dy, rows, n);
    });
  }

  // bf16 / f16 GEMM: the spans of A, B (and C when beta ≠ 0) widened to f32, the f32 GEMM, C
  // narrowed back (elements between rows round-trip exactly).
  void gemm_through_f32(const GemmBatch& g) {
    const int64_t span_a = span_of(g.stride_a ? g.batch : 1, g.stride_a, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.lda);
    const int64_t span_b = span_of(g.stride_b ? g.batch : 1, g.stride_b, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.ldb);
    const int64_t span_c = span_of(g.stride_c ? g.batch : 1, g.stride_c, g.m, g.n, g.ldc);
    const std::vector<float> a = widen_span(g.a, g.dtype, span_a), b = widen_span(g.b, g.dtype, span_b);
    std::vector<float> c = g.beta != 0.0 ? widen_span(g.c, g.dtype, span_c) : std::vector<float>(size_t(span_c), 0.f);
    GemmBatch w = g;
    w.dtype = DType::F32;
    w.a = a.data(), w.b = b.data(), w.c = c.data();
    gemm_batch<float>(w);
    narrow_span(g.c, g.dtype, c);
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
