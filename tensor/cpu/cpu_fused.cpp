// CPU kernels of the fused slots (contracts: tensor/fused_args.h, cpu_fused.h).
//
// Layout: dtype plumbing; layer norm; group norm; GEGLU; optimizer update; bias + residual;
// loss scaling's unscale + finite check.
// Rows (norm groups, GEGLU rows, optimizer chunks) are spread over an OpenMP
// team when the op is large enough; parameter gradients are reduced per column
// block, each by one thread, so results do not depend on the thread count.
#include "tensor/cpu/cpu_fused.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "tensor/cpu/cpu_kernels.h"
#include "tensor/cpu/cpu_math.h"
#include "tensor/error.h"

namespace loom::cpu {
namespace {

constexpr int64_t kParallelElems = int64_t(1) << 15;  // below this an op stays on the calling thread
constexpr int64_t kColumnBlock = 64;                  // columns per parameter-gradient work item
constexpr int64_t kUpdateChunk = int64_t(1) << 14;    // elements per optimizer work item
constexpr int64_t kSumBlock = 128;                    // values per block of a statistics sum

// ---- dtype plumbing ----------------------------------------------------------------

using detail::Tag;
using detail::visit_floating;  // the four floating dtypes (cpu_kernels.h)

template <typename T>
constexpr bool is_half_v = std::is_same_v<T, bf16> || std::is_same_v<T, f16>;

// The arithmetic type for storage type T: double for f64, float otherwise.
template <typename T> using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T> compute_t<T> ld(T v) {
  if constexpr (is_half_v<T>) return float(v);
  else return v;
}
template <typename T> T st(compute_t<T> v) { return T(v); }

template <typename T> const T* in_ptr(const Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.raw_data()) : nullptr;
}
template <typename T> T* out_ptr(const Tensor& t) { return t.defined() ? static_cast<T*>(t.raw_data()) : nullptr; }

// Σ f(x[j]) over j < n in the compute type C, block by block (each block of
// kSumBlock values summed on its own, then the blocks): f32 statistics for f32 /
// bf16 / f16 storage, as on CUDA (so an f32 overflow is an overflow on both), with
// a rounding error that grows with the block count, not with n.
template <typename T, typename F>
compute_t<T> blocked_sum(const T* x, int64_t n, const F& f) {
  using C = compute_t<T>;
  C total = C(0);
  for (int64_t j0 = 0; j0 < n; j0 += kSumBlock) {
    const int64_t j1 = std::min(n, j0 + kSumBlock);
    C block = C(0);
    for (int64_t j = j0; j < j1; ++j) block += f(ld(x[j]));
    total += block;
  }
  return total;
}

// mean and 1/√(var + eps) of x[0..n) (biased variance, two passes, in C).
template <typename T>
void moments(const T* x, int64_t n, double eps, compute_t<T>& mean, compute_t<T>& rstd) {
  using C = compute_t<T>;
  const C m = blocked_sum(x, n, [](C v) { return v; }) / C(n);
  const C var = blocked_sum(x, n, [m](C v) {
                  const C d = v - m;
                  return d * d;
                }) / C(n);
  mean = m;
  rstd = C(1) / std::sqrt(var + C(eps));
}

// ---- layer norm ----------------------------------------------------------------------

template <typename T>
void layer_norm_typed(const LayerNormArgs& a) {
  using C = compute_t<T>;
  const T *x = in_ptr<T>(a.x), *w = in_ptr<T>(a.weight), *b = in_ptr<T>(a.bias), *res = in_ptr<T>(a.residual);
  T *y = out_ptr<T>(a.y), *sum = out_ptr<T>(a.sum);
  C *mean = out_ptr<C>(a.mean), *rstd = out_ptr<C>(a.rstd);
  const int64_t n = a.n;
#pragma omp parallel for if (a.rows > 1 && a.rows * n > kParallelElems) schedule(static)
  for (int64_t r = 0; r < a.rows; ++r) {
    const T* xr = x + r * n;
    if (res) {  // the row of x + residual, rounded to T as ops::add's, is what is normalised
      for (int64_t j = 0; j < n; ++j) sum[r * n + j] = st<T>(ld(xr[j]) + ld(res[r * n + j]));
      xr = sum + r * n;
    }
    T* yr = y + r * n;
    C mc, rc;
    moments(xr, n, a.eps, mc, rc);
    mean[r] = mc;
    rstd[r] = rc;
    for (int64_t j = 0; j < n; ++j) {
      C v = (ld(xr[j]) - mc) * rc;
      if (w) v *= ld(w[j]);
      if (b) v += ld(b[j]);
      yr[j] = st<T>(v);
    }
  }
}

// Σ_r dy·x̂ and Σ_r dy per column, one column block per work item.
template <typename T>
void norm_param_grads_rows(const T* dy, const T* x, const compute_t<T>* mean, const compute_t<T>* rstd, int64_t rows,
                           int64_t n, T* dw, T* db) {
  const int64_t blocks = (n + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for if (blocks > 1 && rows * n > kParallelElems) schedule(static)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t j0 = blk * kColumnBlock, w = std::min(kColumnBlock, n - j0);
    double acc_w[kColumnBlock] = {}, acc_b[kColumnBlock] = {};
    for (int64_t r = 0; r < rows; ++r) {
      const double m = double(mean[r]), rs = double(rstd[r]);
      const T *dr = dy + r * n + j0, *xr = x + r * n + j0;
      for (int64_t j = 0; j < w; ++j) {
        const double g = double(ld(dr[j]));
        acc_w[j] += g * ((double(ld(xr[j])) - m) * rs);
        acc_b[j] += g;
      }
    }
    for (int64_t j = 0; j < w; ++j) {
      if (dw) dw[j0 + j] = st<T>(compute_t<T>(acc_w[j]));
      if (db) db[j0 + j] = st<T>(compute_t<T>(acc_b[j]));
    }
  }
}

template <typename T>
void layer_norm_backward_typed(const LayerNormGradArgs& a) {
  using C = compute_t<T>;
  const T *dy = in_ptr<T>(a.dy), *x = in_ptr<T>(a.x), *w = in_ptr<T>(a.weight);
  const C *mean = in_ptr<C>(a.mean), *rstd = in_ptr<C>(a.rstd);
  const int64_t n = a.n;
  if (T* dx = out_ptr<T>(a.dx)) {
#pragma omp parallel for if (a.rows > 1 && a.rows * n > kParallelElems) schedule(static)
    for (int64_t r = 0; r < a.rows; ++r) {
      const T *dr = dy + r * n, *xr = x + r * n;
      const double m = double(mean[r]), rs = double(rstd[r]);
      double sg = 0.0, sgx = 0.0;  // Σ ĝ, Σ ĝ·x̂
      for (int64_t j = 0; j < n; ++j) {
        const double g = double(ld(dr[j])) * (w ? double(ld(w[j])) : 1.0);
        sg += g;
        sgx += g * ((double(ld(xr[j])) - m) * rs);
      }
      const double mg = sg / double(n), mgx = sgx / double(n);
      for (int64_t j = 0; j < n; ++j) {
        const double g = double(ld(dr[j])) * (w ? double(ld(w[j])) : 1.0);
        const double xh = (double(ld(xr[j])) - m) * rs;
        dx[r * n + j] = st<T>(C(rs * (g - mg - xh * mgx)));
      }
    }
  }
  if (a.dweight.defined() || a.dbias.defined())
    norm_param_grads_rows(dy, x, mean, rstd, a.rows, n, out_ptr<T>(a.dweight), out_ptr<T>(a.dbias));
}

// ---- group norm ----------------------------------------------------------------------

template <typename T>
void group_norm_typed(const GroupNormArgs& a) {
  using C = compute_t<T>;
  const T *x = in_ptr<T>(a.x), *w = in_ptr<T>(a.weight), *b = in_ptr<T>(a.bias), *shift = in_ptr<T>(a.shift);
  T* y = out_ptr<T>(a.y);
  C *mean = out_ptr<C>(a.mean), *rstd = out_ptr<C>(a.rstd);
  const int64_t cg = a.channels / a.groups, S = a.spatial, items = a.batch * a.groups;
#pragma omp parallel for if (items > 1 && items * cg * S > kParallelElems) schedule(static)
  for (int64_t item = 0; item < items; ++item) {  // item = (sample, group)
    const int64_t n = item / a.groups, c0 = (item % a.groups) * cg;
    const int64_t base = n * a.channels * S + c0 * S;
    // with a shift, the group's u = x + shift[n, c] in the compute type (never rounded to T)
    std::vector<C> shifted(shift ? size_t(cg * S) : 0);
    for (int64_t c = 0; shift && c < cg; ++c) {
      const C sh = ld(shift[n * a.channels + c0 + c]);
      for (int64_t s = 0; s < S; ++s) shifted[size_t(c * S + s)] = ld(x[base + c * S + s]) + sh;
    }
    C mc = C(0), rc = C(1) / std::sqrt(C(a.eps));
    if (cg * S > 0) {
      if (shift) moments(shifted.data(), cg * S, a.eps, mc, rc);
      else moments(x + base, cg * S, a.eps, mc, rc);
    }
    mean[item] = mc;
    rstd[item] = rc;
    if (!y) continue;  // the statistics only
    auto u = [&](int64_t c, int64_t s) { return shift ? shifted[size_t(c * S + s)] : ld(x[base + c * S + s]); };
    for (int64_t c = 0; c < cg; ++c) {
      const C wc = w ? ld(w[c0 + c]) : C(1), bc = b ? ld(b[c0 + c]) : C(0);
      T* yc = y + base + c * S;
      if (a.silu) {
        for (int64_t s = 0; s < S; ++s) {
          const C v = (u(c, s) - mc) * rc * wc + bc;
          yc[s] = st<T>(v / (C(1) + std::exp(-v)));  // silu(v) = v·σ(v)
        }
      } else {
        for (int64_t s = 0; s < S; ++s) yc[s] = st<T>((u(c, s) - mc) * rc * wc + bc);
      }
    }
  }
}

template <typename T>
void group_norm_backward_typed(const GroupNormGradArgs& a) {
  using C = compute_t<T>;
  const T *dy = in_ptr<T>(a.dy), *x = in_ptr<T>(a.x), *w = in_ptr<T>(a.weight);
  const C *mean = in_ptr<C>(a.mean), *rstd = in_ptr<C>(a.rstd);
  const int64_t N = a.batch, Ch = a.channels, S = a.spatial, G = a.groups, cg = Ch / G;
  // Per (sample, channel): sum_dy = Σ_s dy, sum_dyx = Σ_s dy·x̂.
  std::vector<double> sum_dy(size_t(N * Ch)), sum_dyx(size_t(N * Ch));
  const bool parallel = N * Ch * S > kParallelElems;
#pragma omp parallel for if (parallel) schedule(static)
  for (int64_t nc = 0; nc < N * Ch; ++nc) {
    const int64_t grp = (nc / Ch) * G + (nc % Ch) / cg;
    const double m = double(mean[grp]), rs = double(rstd[grp]);
    const T *dr = dy + nc * S, *xr = x + nc * S;
    double s1 = 0.0, s2 = 0.0;
    for (int64_t s = 0; s < S; ++s) {
      const double g = double(ld(dr[s]));
      s1 += g;
      s2 += g * ((double(ld(xr[s])) - m) * rs);
    }
    sum_dy[size_t(nc)] = s1;
    sum_dyx[size_t(nc)] = s2;
  }
  if (T* dx = out_ptr<T>(a.dx)) {
    const double count = double(cg * S);
#pragma omp parallel for if (parallel && N * G > 1) schedule(static)
    for (int64_t item = 0; item < N * G; ++item) {
      const int64_t n = item / G, c0 = (item % G) * cg;
      const double m = double(mean[item]), rs = double(rstd[item]);
      double mg = 0.0, mgx = 0.0;  // means of ĝ = dy·w and of ĝ·x̂ over the group
      for (int64_t c = 0; c < cg; ++c) {
        const double wc = w ? double(ld(w[c0 + c])) : 1.0;
        mg += wc * sum_dy[size_t(n * Ch + c0 + c)];
        mgx += wc * sum_dyx[size_t(n * Ch + c0 + c)];
      }
      mg /= count;
      mgx /= count;
      for (int64_t c = 0; c < cg; ++c) {
        const double wc = w ? double(ld(w[c0 + c])) : 1.0;
        const int64_t off = (n * Ch + c0 + c) * S;
        for (int64_t s = 0; s < S; ++s) {
          const double xh = (double(ld(x[off + s])) - m) * rs;
          dx[off + s] = st<T>(C(rs * (double(ld(dy[off + s])) * wc - mg - xh * mgx)));
        }
      }
    }
  }
  T *dw = out_ptr<T>(a.dweight), *db = out_ptr<T>(a.dbias);
  for (int64_t c = 0; c < Ch; ++c) {
    double sw = 0.0, sb = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      sw += sum_dyx[size_t(n * Ch + c)];
      sb += sum_dy[size_t(n * Ch + c)];
    }
    if (dw) dw[c] = st<T>(C(sw));
    if (db) db[c] = st<T>(C(sb));
  }
}

// ---- GEGLU ---------------------------------------------------------------------------

template <typename C> C gelu_of(C v, bool approximate) { return approximate ? gelu_tanh(v) : gelu_erf(v); }
template <typename C> C gelu_grad_of(C v, bool approximate) {
  return approximate ? gelu_tanh_grad(v) : gelu_erf_grad(v);
}

template <typename T>
void geglu_typed(const GegluArgs& a) {
  const T* x = in_ptr<T>(a.x);
  T* y = out_ptr<T>(a.y);
  const int64_t h = a.h;
#pragma omp parallel for if (a.rows > 1 && a.rows * h > kParallelElems) schedule(static)
  for (int64_t r = 0; r < a.rows; ++r) {
    const T* xr = x + r * 2 * h;
    for (int64_t j = 0; j < h; ++j) y[r * h + j] = st<T>(ld(xr[j]) * gelu_of(ld(xr[h + j]), a.approximate));
  }
}

template <typename T>
void geglu_backward_typed(const GegluGradArgs& a) {
  using C = compute_t<T>;
  const T *dy = in_ptr<T>(a.dy), *x = in_ptr<T>(a.x);
  T* dx = out_ptr<T>(a.dx);
  const int64_t h = a.h;
#pragma omp parallel for if (a.rows > 1 && a.rows * h > kParallelElems) schedule(static)
  for (int64_t r = 0; r < a.rows; ++r) {
    const T* xr = x + r * 2 * h;
    T* dxr = dx + r * 2 * h;
    for (int64_t j = 0; j < h; ++j) {
      const C g = ld(dy[r * h + j]), hv = ld(xr[j]), gv = ld(xr[h + j]);
      dxr[j] = st<T>(g * gelu_of(gv, a.approximate));
      dxr[h + j] = st<T>(g * hv * gelu_grad_of(gv, a.approximate));
    }
  }
}

// ---- optimizer update ------------------------------------------------------------------
// Each line below is one op of the composed update, in T, with the scalar rounded to T.

template <typename T>
void sgd_range(const OptimizerUpdateArgs& a, const OptimizerTensor& e, int64_t lo, int64_t hi) {
  T* p = out_ptr<T>(e.param);
  const T* g = in_ptr<T>(e.grad);
  T* buf = out_ptr<T>(e.state1);
  const T wd = T(a.weight_decay), mu = T(a.momentum), damp = T(1.0 - a.dampening), lr = T(a.lr);
  const bool decay = a.weight_decay != 0, momentum = a.momentum != 0;
  for (int64_t i = lo; i < hi; ++i) {
    T d = g[i];
    if (decay) d = d + p[i] * wd;
    if (momentum) {
      const T b = e.first ? d : buf[i] * mu + d * damp;
      buf[i] = b;
      d = a.nesterov ? d + b * mu : b;
    }
    p[i] = p[i] - d * lr;
  }
}

template <typename T>
void adam_range(const OptimizerUpdateArgs& a, const OptimizerTensor& e, int64_t lo, int64_t hi) {
  T* p = out_ptr<T>(e.param);
  const T* g = in_ptr<T>(e.grad);
  T *m = out_ptr<T>(e.state1), *v = out_ptr<T>(e.state2);
  const bool decoupled = a.kind == OptimizerKind::AdamW, decay = a.weight_decay != 0;
  const T wd = T(a.weight_decay), shrink = T(1.0 - a.lr * a.weight_decay);
  const T b1 = T(a.beta1), c1 = T(1.0 - a.beta1), b2 = T(a.beta2), c2 = T(1.0 - a.beta2), eps = T(a.eps);
  const T inv_bc2 = T(e.inv_bias2_sqrt), step = T(e.step_size);
  for (int64_t i = lo; i < hi; ++i) {
    T pv = p[i], gv = g[i];
    if (decay && decoupled) pv = pv * shrink;
    if (decay && !decoupled) gv = gv + pv * wd;
    const T mv = m[i] * b1 + gv * c1;
    const T vv = v[i] * b2 + (gv * gv) * c2;
    m[i] = mv;
    v[i] = vv;
    const T denom = std::sqrt(vv) * inv_bc2 + eps;
    p[i] = pv - (mv / denom) * step;
  }
}

template <typename T>
void optimizer_update_typed(const OptimizerUpdateArgs& a) {
  struct Chunk {
    size_t entry;
    int64_t lo, hi;
  };
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t k = 0; k < a.tensors.size(); ++k) {
    const int64_t n = a.tensors[k].param.numel();
    total += n;
    for (int64_t lo = 0; lo < n; lo += kUpdateChunk) chunks.push_back({k, lo, std::min(n, lo + kUpdateChunk)});
  }
  const int64_t count = int64_t(chunks.size());
#pragma omp parallel for if (count > 1 && total > kParallelElems) schedule(static)
  for (int64_t c = 0; c < count; ++c) {
    const Chunk& ch = chunks[size_t(c)];
    const OptimizerTensor& e = a.tensors[ch.entry];
    if (a.kind == OptimizerKind::Sgd) sgd_range<T>(a, e, ch.lo, ch.hi);
    else adam_range<T>(a, e, ch.lo, ch.hi);
  }
}

// ---- bias + residual -------------------------------------------------------------------------

template <typename T>
void bias_residual_typed(const BiasResidualArgs& a) {
  const T *y = in_ptr<T>(a.y), *b = in_ptr<T>(a.bias), *res = in_ptr<T>(a.residual);
  T* out = out_ptr<T>(a.out);
  const int64_t n = a.n, inner = a.inner;
#pragma omp parallel for if (a.rows > 1 && a.rows * n * inner > kParallelElems) schedule(static)
  for (int64_t r = 0; r < a.rows; ++r)
    for (int64_t c = 0; c < n; ++c)
      for (int64_t j = (r * n + c) * inner; j < (r * n + c + 1) * inner; ++j)
        out[j] = st<T>((b ? ld(y[j]) + ld(b[c]) : ld(y[j])) + ld(res[j]));
}

// ---- loss scaling: unscale + finite check ----------------------------------------------------

// Each tensor is checked and scaled in chunks; a chunk that meets a non-finite value raises a
// shared flag (any order gives the same flag).
template <typename T>
void unscale_check_finite_typed(const UnscaleArgs& a) {
  using C = compute_t<T>;
  const C inv = C(a.inv_scale);
  bool found = false;
  for (const Tensor& g : a.grads) {
    T* x = out_ptr<T>(g);
    const int64_t n = g.numel();
#pragma omp parallel for if (n > kParallelElems) schedule(static) reduction(|| : found)
    for (int64_t i = 0; i < n; ++i) {
      const C v = ld(x[i]);
      if (!std::isfinite(v)) found = true;
      x[i] = st<T>(v * inv);
    }
  }
  if (found) *static_cast<float*>(a.found_inf.raw_data()) = 1.0f;
}

}  // namespace

void unscale_check_finite(const UnscaleArgs& a) {
  if (a.grads.empty()) return;
  visit_floating(a.grads.front().dtype(), "unscale_check_finite",
                [&](auto tag) { unscale_check_finite_typed<typename decltype(tag)::type>(a); });
}

void bias_residual(const BiasResidualArgs& a) {
  visit_floating(a.y.dtype(), "bias_residual",
                [&](auto tag) { bias_residual_typed<typename decltype(tag)::type>(a); });
}

void layer_norm(const LayerNormArgs& a) {
  visit_floating(a.x.dtype(), "layer_norm", [&](auto tag) { layer_norm_typed<typename decltype(tag)::type>(a); });
}

void layer_norm_backward(const LayerNormGradArgs& a) {
  visit_floating(a.x.dtype(), "layer_norm_backward",
                [&](auto tag) { layer_norm_backward_typed<typename decltype(tag)::type>(a); });
}

void group_norm(const GroupNormArgs& a) {
  visit_floating(a.x.dtype(), "group_norm", [&](auto tag) { group_norm_typed<typename decltype(tag)::type>(a); });
}

void group_norm_backward(const GroupNormGradArgs& a) {
  visit_floating(a.x.dtype(), "group_norm_backward",
                [&](auto tag) { group_norm_backward_typed<typename decltype(tag)::type>(a); });
}

void geglu(const GegluArgs& a) {
  visit_floating(a.x.dtype(), "geglu", [&](auto tag) { geglu_typed<typename decltype(tag)::type>(a); });
}

void geglu_backward(const GegluGradArgs& a) {
  visit_floating(a.x.dtype(), "geglu_backward",
                [&](auto tag) { geglu_backward_typed<typename decltype(tag)::type>(a); });
}

void optimizer_update(const OptimizerUpdateArgs& a) {
  if (a.tensors.empty()) return;
  const DType t = a.tensors.front().param.dtype();
  if (t == DType::F32) return optimizer_update_typed<float>(a);
  if (t == DType::F64) return optimizer_update_typed<double>(a);
  LOOM_FAIL("cpu optimizer_update: parameters of dtype ", dtype_name(t),
            " are not supported (f32 master weights, or f64)");
}

}  // namespace loom::cpu
