// Reductions and softmax on the host (Backend::reduce / softmax / softmax_backward): OpenMP over
// rows above a size threshold, sums accumulated in double.
#include "tensor/cpu/cpu_kernels.h"
#include "tensor/cpu/cpu_ops.h"

namespace loom::cpu {
namespace {

using namespace detail;

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

}  // namespace

void reduce(ReduceOp op, const Tensor& out, const Tensor& in, int64_t outer, int64_t n,
            int64_t inner) {
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

void softmax(const Tensor& out, const Tensor& in, int64_t rows, int64_t n, bool log) {
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

void softmax_backward(const Tensor& dx, const Tensor& y, const Tensor& dy, int64_t rows, int64_t n) {
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

}  // namespace loom::cpu
