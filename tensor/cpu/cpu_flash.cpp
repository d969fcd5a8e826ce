// The flash backend on the CPU (f32, f64): tiled attention with an online
// softmax (SPEC §2). Eigen computes the tile products; OpenMP spreads work
// units over threads.
//
// Forward, per (row n, query tile of kRows):  for each key tile of kCols
//   S = scale·Q_i·K_jᵀ + M;  m' = max(m, rowmax S);  P = exp(S − m')
//   l = l·exp(m − m') + rowsum P;  O = O·exp(m − m') + P·V_j
// then O /= l and L = m + log l. Only O [N,Q,dv] and L [N,Q] are kept.
//
// Backward, with D = rowsum(dO∘O), per (row n, key range):  for each key tile j,
// for each query tile i:  P = exp(scale·Q_i·K_jᵀ + M − L_i);  dV_j += Pᵀ·dO_i;
//   dP = dO_i·V_jᵀ;  dS = P∘(dP − D_i);  dK_j += scale·dSᵀ·Q_i;  dQ_i += scale·dS·K_j.
// With at least as many rows n as threads, one pass per row does all of it
// (the row's dQ belongs to one thread). With fewer rows, a first pass over
// (row, key tile) computes dK, dV and a second over (row, query tile)
// recomputes P and dS for dQ: two more tile products, but every thread busy
// and no per-thread copies of dQ.
// No buffer of size Q×K exists anywhere: the largest scratch is one tile.
#include <omp.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <limits>

#include "tensor/cpu/cpu_flash.h"

namespace loom::cpu {

namespace {

constexpr int64_t kRows = 64;   // query rows per tile
constexpr int64_t kCols = 128;  // keys per tile
// Multiply-adds (N·Q·K·d) below which one thread does the whole problem: a team costs more.
constexpr double kParallelWork = double(1 << 20);

bool worth_a_team(const FlashAttentionArgs& a) {
  return double(a.q.size(0)) * double(a.q.size(1)) * double(a.k.size(1)) *
             double(std::max(a.q.size(2), a.v.size(2))) >= kParallelWork;
}

template <typename T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using ConstMap = Eigen::Map<const Mat<T>>;
template <typename T>
using MutMap = Eigen::Map<Mat<T>>;
template <typename T>
using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Raw view of one problem.
template <typename T>
struct Flash {
  const T* q;
  const T* k;
  const T* v;
  const T* mask;  // [Bm, Qm, K] or null
  int64_t n, nq, nk, d, dv, heads, mask_batches, mask_rows;
  T scale;
  bool causal;

  explicit Flash(const FlashAttentionArgs& a)
      : q(static_cast<const T*>(a.q.raw_data())),
        k(static_cast<const T*>(a.k.raw_data())),
        v(static_cast<const T*>(a.v.raw_data())),
        mask(a.mask.defined() ? static_cast<const T*>(a.mask.raw_data()) : nullptr),
        n(a.q.size(0)), nq(a.q.size(1)), nk(a.k.size(1)), d(a.q.size(2)), dv(a.v.size(2)), heads(a.heads),
        mask_batches(a.mask.defined() ? a.mask.size(0) : 0), mask_rows(a.mask.defined() ? a.mask.size(1) : 0),
        scale(T(a.scale)), causal(a.causal) {}

  ConstMap<T> q_rows(int64_t row, int64_t i0, int64_t cnt) const { return {q + (row * nq + i0) * d, cnt, d}; }
  ConstMap<T> k_rows(int64_t row, int64_t j0, int64_t cnt) const { return {k + (row * nk + j0) * d, cnt, d}; }
  ConstMap<T> v_rows(int64_t row, int64_t j0, int64_t cnt) const { return {v + (row * nk + j0) * dv, cnt, dv}; }

  // Whether every key of [j0, ...) lies after every query of [i0, i1) (a tile the causal mask removes).
  bool tile_masked_out(int64_t i1, int64_t j0) const { return causal && j0 > i1 - 1; }

  // s(r, c) += M[b, i0 + r, j0 + c], and −inf where key j0 + c > query i0 + r when causal.
  template <typename Block>
  void add_bias(Block& s, int64_t row, int64_t i0, int64_t j0) const {
    const int64_t rows = s.rows(), cols = s.cols();
    if (mask) {
      const int64_t b = mask_batches == 1 ? 0 : row / heads;
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t mi = mask_rows == 1 ? 0 : i0 + r;
        s.row(r) += Eigen::Map<const Eigen::Matrix<T, 1, Eigen::Dynamic>>(mask + (b * mask_rows + mi) * nk + j0, cols);
      }
    }
    if (causal) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t first = std::max<int64_t>(0, i0 + r + 1 - j0);  // first masked column
        for (int64_t c = first; c < cols; ++c) s(r, c) = -std::numeric_limits<T>::infinity();
      }
    }
  }
};

// Per-thread scratch, sized for one tile.
template <typename T>
struct ForwardScratch {
  Mat<T> qs, s, o;
  Vec<T> m, l;
  ForwardScratch(int64_t d, int64_t dv) : qs(kRows, d), s(kRows, kCols), o(kRows, dv), m(kRows), l(kRows) {}
};

// One query tile [i0, i1) of row n: writes out rows and their log-sum-exp.
template <typename T>
void forward_tile(const Flash<T>& f, int64_t row, int64_t i0, int64_t i1, ForwardScratch<T>& w, T* out, T* lse) {
  const int64_t br = i1 - i0;
  const T neg_inf = -std::numeric_limits<T>::infinity();
  auto qs = w.qs.topRows(br);
  auto o = w.o.topRows(br);
  qs.noalias() = f.q_rows(row, i0, br) * f.scale;  // [br, d], scale folded into Q
  o.setZero();
  w.m.head(br).setConstant(neg_inf);
  w.l.head(br).setZero();
  for (int64_t j0 = 0; j0 < f.nk; j0 += kCols) {
    if (f.tile_masked_out(i1, j0)) break;
    const int64_t bc = std::min(kCols, f.nk - j0);
    auto s = w.s.topLeftCorner(br, bc);
    s.noalias() = qs * f.k_rows(row, j0, bc).transpose();  // [br, d] x [d, bc]
    f.add_bias(s, row, i0, j0);
    for (int64_t r = 0; r < br; ++r) {
      const T m_new = std::max(w.m[r], s.row(r).maxCoeff());
      const T shift = m_new == neg_inf ? T(0) : m_new;  // a row masked so far keeps P = 0
      s.row(r) = (s.row(r).array() - shift).exp();
      const T correction = std::exp(w.m[r] - shift);
      w.l[r] = w.l[r] * correction + s.row(r).sum();
      o.row(r) *= correction;
      w.m[r] = m_new;
    }
    o.noalias() += s * f.v_rows(row, j0, bc);  // [br, bc] x [bc, dv]
  }
  for (int64_t r = 0; r < br; ++r) {
    MutMap<T>(out + ((row * f.nq) + i0 + r) * f.dv, 1, f.dv) = o.row(r) / w.l[r];
    lse[row * f.nq + i0 + r] = w.m[r] + std::log(w.l[r]);
  }
}

template <typename T>
void flash_forward(const FlashAttentionArgs& p, const Tensor& out, const Tensor& lse) {
  const Flash<T> f(p);
  T* o = static_cast<T*>(out.raw_data());
  T* l = static_cast<T*>(lse.raw_data());
  const int64_t tiles = ceil_div(f.nq, kRows), units = f.n * tiles;
#pragma omp parallel if (worth_a_team(p))
  {
    ForwardScratch<T> w(f.d, f.dv);
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) {
      const int64_t row = u / tiles, i0 = (u % tiles) * kRows;
      forward_tile(f, row, i0, std::min(f.nq, i0 + kRows), w, o, l);
    }
  }
}

template <typename T>
struct BackwardScratch {
  Mat<T> s, dp, dk, dv;
  BackwardScratch(int64_t d, int64_t dv_) : s(kRows, kCols), dp(kRows, kCols), dk(kCols, d), dv(kCols, dv_) {}
};

// Inputs of the backward of one problem, as raw pointers.
template <typename T>
struct BackwardArgs {
  const T* lse;    // [N, Q]
  const T* delta;  // [N, Q] rowsum(dO∘O)
  const T* dout;   // [N, Q, dv]
  T* dq;           // [N, Q, d] (unscaled Σ dS·K until the end)
  T* dk;           // [N, K, d]
  T* dv;           // [N, K, dv]
};

// s = P = exp(scale·Q_i·K_jᵀ + M − L_i), dp = dS = P∘(dO_i·V_jᵀ − D_i), for one (query tile, key tile).
template <typename T, typename Block>
void recompute_tile(const Flash<T>& f, const BackwardArgs<T>& a, int64_t row, int64_t i0, int64_t j0, Block& s,
                    Block& dp) {
  const int64_t br = s.rows(), bc = s.cols();
  const ConstMap<T> qi = f.q_rows(row, i0, br), kj = f.k_rows(row, j0, bc), vj = f.v_rows(row, j0, bc);
  const ConstMap<T> doi(a.dout + (row * f.nq + i0) * f.dv, br, f.dv);
  s.noalias() = (qi * kj.transpose()) * f.scale;
  f.add_bias(s, row, i0, j0);
  for (int64_t r = 0; r < br; ++r) s.row(r) = (s.row(r).array() - a.lse[row * f.nq + i0 + r]).exp();
  dp.noalias() = doi * vj.transpose();  // dO·Vᵀ  [br, bc]
  for (int64_t r = 0; r < br; ++r)
    dp.row(r) = s.row(r).cwiseProduct((dp.row(r).array() - a.delta[row * f.nq + i0 + r]).matrix());
}

// Keys [ja, jb) of row n against every query: writes dK, dV; adds dS·K into dQ when with_dq.
template <typename T>
void backward_keys(const Flash<T>& f, const BackwardArgs<T>& a, int64_t row, int64_t ja, int64_t jb, bool with_dq,
                   BackwardScratch<T>& w) {
  for (int64_t j0 = ja; j0 < jb; j0 += kCols) {
    const int64_t bc = std::min(kCols, jb - j0);
    auto dk = w.dk.topRows(bc);
    auto dv = w.dv.topRows(bc);
    dk.setZero();
    dv.setZero();
    const int64_t first_i = f.causal ? (j0 / kRows) * kRows : 0;  // earlier query tiles see none of these keys
    for (int64_t i0 = first_i; i0 < f.nq; i0 += kRows) {
      const int64_t br = std::min(kRows, f.nq - i0);
      auto s = w.s.topLeftCorner(br, bc);
      auto ds = w.dp.topLeftCorner(br, bc);
      recompute_tile(f, a, row, i0, j0, s, ds);
      const ConstMap<T> doi(a.dout + (row * f.nq + i0) * f.dv, br, f.dv);
      dv.noalias() += s.transpose() * doi;                  // Pᵀ·dO  [bc, dv]
      dk.noalias() += ds.transpose() * f.q_rows(row, i0, br);  // dSᵀ·Q  [bc, d]
      if (with_dq) MutMap<T>(a.dq + (row * f.nq + i0) * f.d, br, f.d).noalias() += ds * f.k_rows(row, j0, bc);
    }
    MutMap<T>(a.dk + (row * f.nk + j0) * f.d, bc, f.d) = dk * f.scale;
    MutMap<T>(a.dv + (row * f.nk + j0) * f.dv, bc, f.dv) = dv;
  }
}

// Queries [i0, i1) of row n against every key: dQ rows (unscaled).
template <typename T>
void backward_queries(const Flash<T>& f, const BackwardArgs<T>& a, int64_t row, int64_t i0, int64_t i1,
                      BackwardScratch<T>& w) {
  const int64_t br = i1 - i0;
  MutMap<T> dq(a.dq + (row * f.nq + i0) * f.d, br, f.d);
  for (int64_t j0 = 0; j0 < f.nk; j0 += kCols) {
    if (f.tile_masked_out(i1, j0)) break;
    const int64_t bc = std::min(kCols, f.nk - j0);
    auto s = w.s.topLeftCorner(br, bc);
    auto ds = w.dp.topLeftCorner(br, bc);
    recompute_tile(f, a, row, i0, j0, s, ds);
    dq.noalias() += ds * f.k_rows(row, j0, bc);  // dS·K  [br, d]
  }
}

// D[n, i] = Σ_c dO[n, i, c]·O[n, i, c]
template <typename T>
void row_dots(const T* dout, const T* out, int64_t rows, int64_t dv, T* delta) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    delta[r] = Eigen::Map<const Vec<T>>(dout + r * dv, dv).dot(Eigen::Map<const Vec<T>>(out + r * dv, dv));
  }
}

// dq, dk, dv: contiguous outputs (scratch is used for the ones not asked for).
template <typename T>
void flash_backward(const FlashAttentionArgs& p, const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                    Tensor dq, Tensor dk, Tensor dv) {
  const Flash<T> f(p);
  const Device cpu = Device::cpu();
  const DType dt = p.q.dtype();
  Tensor delta = Tensor::empty({f.n, f.nq}, dt, cpu);
  row_dots<T>(static_cast<const T*>(grad_out.raw_data()), static_cast<const T*>(out.raw_data()), f.n * f.nq,
              f.dv, static_cast<T*>(delta.raw_data()));
  if (!dq.defined()) dq = Tensor::empty(p.q.shape(), dt, cpu);
  if (!dk.defined()) dk = Tensor::empty(p.k.shape(), dt, cpu);
  if (!dv.defined()) dv = Tensor::empty(p.v.shape(), dt, cpu);
  dq.fill_(0.0);
  const BackwardArgs<T> a{static_cast<const T*>(lse.raw_data()), static_cast<const T*>(delta.raw_data()),
                          static_cast<const T*>(grad_out.raw_data()), static_cast<T*>(dq.raw_data()),
                          static_cast<T*>(dk.raw_data()), static_cast<T*>(dv.raw_data())};
  const int64_t key_tiles = ceil_div(f.nk, kCols), query_tiles = ceil_div(f.nq, kRows);
  const bool team = worth_a_team(p);
  const bool one_pass = !team || f.n >= omp_get_max_threads();
#pragma omp parallel if (team)
  {
    BackwardScratch<T> w(f.d, f.dv);
    if (one_pass) {
#pragma omp for schedule(dynamic, 1)
      for (int64_t row = 0; row < f.n; ++row) backward_keys(f, a, row, 0, f.nk, true, w);
    } else {
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = 0; u < f.n * key_tiles; ++u) {
        const int64_t row = u / key_tiles, j0 = (u % key_tiles) * kCols;
        backward_keys(f, a, row, j0, std::min(f.nk, j0 + kCols), false, w);
      }
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = 0; u < f.n * query_tiles; ++u) {
        const int64_t row = u / query_tiles, i0 = (u % query_tiles) * kRows;
        backward_queries(f, a, row, i0, std::min(f.nq, i0 + kRows), w);
      }
    }
  }
  MutMap<T>(a.dq, f.n * f.nq, f.d) *= f.scale;  // dQ = scale·Σ dS·K
}

}  // namespace

namespace {
bool is_half(DType t) { return t == DType::BF16 || t == DType::F16; }

// The arguments with q, k, v and mask as f32 copies (bf16 / f16 storage, f32 compute).
FlashAttentionArgs as_f32(const FlashAttentionArgs& a) {
  FlashAttentionArgs b = a;
  b.q = a.q.to(DType::F32), b.k = a.k.to(DType::F32), b.v = a.v.to(DType::F32);
  if (a.mask.defined()) b.mask = a.mask.to(DType::F32);
  return b;
}
Tensor f32_like(const Tensor& t) { return t.defined() ? Tensor::empty(t.shape(), DType::F32, t.device()) : Tensor(); }
}  // namespace

void flash_check(const FlashAttentionArgs& a) {
  const DType t = a.q.dtype();
  LOOM_CHECK(t == DType::F32 || t == DType::F64 || is_half(t), "attention backend 'flash' does not support dtype ", t,
             " on the cpu (f32, f64; bf16 and f16 are computed in f32)");
  LOOM_CHECK(!a.packed_heads, "attention backend 'flash' on the cpu does not take the packed-heads layout");
}

void flash_forward(const FlashAttentionArgs& a, const Tensor& out, const Tensor& lse) {
  flash_check(a);
  if (out.numel() == 0) return;
  if (is_half(a.q.dtype())) {
    const Tensor out32 = f32_like(out);
    flash_forward<float>(as_f32(a), out32, lse);
    out.copy_(out32);
  } else if (a.q.dtype() == DType::F32) {
    flash_forward<float>(a, out, lse);
  } else {
    flash_forward<double>(a, out, lse);
  }
}

void flash_backward(const FlashAttentionArgs& a, const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                    const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  flash_check(a);
  if (is_half(a.q.dtype())) {
    const Tensor dq32 = f32_like(dq), dk32 = f32_like(dk), dv32 = f32_like(dv);
    flash_backward<float>(as_f32(a), out.to(DType::F32), lse, grad_out.to(DType::F32), dq32, dk32, dv32);
    for (auto [dst, src] : {std::pair{dq, dq32}, std::pair{dk, dk32}, std::pair{dv, dv32}})
      if (dst.defined()) dst.copy_(src);
  } else if (a.q.dtype() == DType::F32) {
    flash_backward<float>(a, out, lse, grad_out, dq, dk, dv);
  } else {
    flash_backward<double>(a, out, lse, grad_out, dq, dk, dv);
  }
}

}  // namespace loom::cpu
