// Batched GEMM on the host (Backend::gemm) with Eigen 3: the batch in parallel when it has at
// least as many entries as OpenMP threads, else Eigen threads each product; bf16 / f16 through f32.
#include <Eigen/Core>

#include "tensor/cpu/cpu_kernels.h"
#include "tensor/cpu/cpu_ops.h"

namespace loom::cpu {
namespace {

using namespace detail;

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

}  // namespace

void gemm(const GemmBatch& g) {
  static const bool eigen_ready = (Eigen::initParallel(), true);  // once, before any threaded product
  (void)eigen_ready;
  if (g.m == 0 || g.n == 0 || g.batch == 0) return;
  if (is_half_dtype(g.dtype)) return gemm_through_f32(g);
  visit_float(g.dtype, "gemm", [&](auto tag) { gemm_batch<typename decltype(tag)::type>(g); });
}

}  // namespace loom::cpu
