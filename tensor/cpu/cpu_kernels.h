// What the CPU kernel files share (internal to tensor/cpu/): the size thresholds of the OpenMP
// loops, dtype dispatch and conversions, strided iteration (Layout / RowCursor / for_each_run), and
// the bf16 / f16 rule (stored in the low precision, computed in f32).
#pragma once

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "tensor/backend.h"
#include "tensor/tensor.h"

namespace loom::cpu::detail {


// Element counts above which a kernel runs an OpenMP team; smaller ops stay on
// the calling thread, where a team would cost more than it saves.
constexpr int64_t kParallelElems = int64_t(1) << 15;  // unary, binary, reduce, softmax
constexpr int64_t kParallelCopy = int64_t(1) << 16;   // copy, fill
// Longest inner run handed to one thread by for_each_run.
constexpr int64_t kRunChunk = int64_t(1) << 14;
// Widest column block of the [outer, n, inner] reduction (accumulators on the stack).
constexpr int64_t kColumnBlock = 256;
constexpr size_t kAlign = 64;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
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

// Calls f(Tag<T>{}) for the four floating dtypes (f32, f64, bf16, f16); throws naming op and
// dtype for i64.
template <typename F>
void visit_floating(DType t, const char* op, F&& f) {
  if (t == DType::I64) LOOM_FAIL("cpu ", op, ": dtype ", dtype_name(t), " is not supported (f32, f64, bf16, f16)");
  visit_any(t, op, [&](auto tag) {
    if constexpr (!std::is_same_v<typename decltype(tag)::type, int64_t>) f(tag);
  });
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
inline int64_t saturate_i64(double v) {
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


inline bool is_half_dtype(DType t) { return t == DType::BF16 || t == DType::F16; }

// A contiguous f32 copy of `t` (any strides; broadcast views are materialised).
inline Tensor widened(const Tensor& t) { return t.to(DType::F32).contiguous(); }

}  // namespace loom::cpu::detail
