// The math and sliced backends: compositions of tensor ops (any device and
// dtype the ops support). math materialises P = softmax(S) for the whole
// problem; sliced runs the same algorithm over slice_size rows of N at a time
// and recomputes P per slice in the backward.
#include <algorithm>
#include <cmath>
#include <limits>

#include "attention/sdpa_backends.h"
#include "tensor/ops.h"

namespace loom::attention::detail {

namespace {

// [Q, K] additive bias: −inf where key j > query i (top-left aligned causal mask).
Tensor causal_bias(const SdpaProblem& p) {
  std::vector<double> bias(size_t(p.q_len * p.k_len), 0.0);
  for (int64_t i = 0; i < p.q_len; ++i)
    for (int64_t j = i + 1; j < p.k_len; ++j) bias[size_t(i * p.k_len + j)] = -INFINITY;
  return Tensor::from_values(bias, {p.q_len, p.k_len}, p.q.dtype(), p.q.device());
}

// Mask rows for problem rows [n0, n1): [n1−n0 or 1, Qm, K].
Tensor mask_rows(const SdpaProblem& p, int64_t n0, int64_t n1) {
  if (p.mask_batches == 1) return p.mask;  // broadcasts over every row
  std::vector<Tensor> parts;
  for (int64_t n = n0; n < n1;) {
    const int64_t b = n / p.heads, end = std::min(n1, (b + 1) * p.heads);
    parts.push_back(p.mask.narrow(0, b, 1).expand({end - n, p.mask_rows, p.k_len}));
    n = end;
  }
  return parts.size() == 1 ? parts[0] : ops::cat(parts, 0);
}

}  // namespace

Tensor dense_bias(const SdpaProblem& p, int64_t n0, int64_t n1) {
  Tensor bias;
  if (p.mask.defined()) bias = mask_rows(p, n0, n1);
  if (p.causal) bias = bias.defined() ? ops::add(bias, causal_bias(p)) : causal_bias(p);
  return bias;
}

Tensor math_forward_rows(const SdpaProblem& p, int64_t n0, int64_t n1, Tensor* probs) {
  const int64_t rows = n1 - n0;
  const Tensor q = p.q.narrow(0, n0, rows), k = p.k.narrow(0, n0, rows), v = p.v.narrow(0, n0, rows);
  Tensor s = ops::matmul(q, k.transpose(1, 2), p.scale);  // scale·Q·Kᵀ [rows, Q, K]
  const Tensor bias = dense_bias(p, n0, n1);
  if (bias.defined()) s = ops::add(s, bias);
  const Tensor prob = ops::softmax(s, -1);
  if (probs) *probs = prob;
  return ops::matmul(prob, v);  // [rows, Q, K] x [rows, K, dv] -> [rows, Q, dv]
}

SdpaGrads math_backward_rows(const SdpaProblem& p, int64_t n0, int64_t n1, const Tensor& prob,
                             const Tensor& grad_out, const std::vector<bool>& needs) {
  const int64_t rows = n1 - n0;
  const Tensor q = p.q.narrow(0, n0, rows), k = p.k.narrow(0, n0, rows), v = p.v.narrow(0, n0, rows);
  const Tensor g = grad_out.narrow(0, n0, rows);
  SdpaGrads grads;
  if (needs[2]) grads.dv = ops::matmul(prob.transpose(1, 2), g);  // Pᵀ·dO  [rows, K, dv]
  if (!needs[0] && !needs[1]) return grads;
  const Tensor dp = ops::matmul(g, v.transpose(1, 2));  // dO·Vᵀ  [rows, Q, K]
  const Tensor ds = ops::softmax_backward(prob, dp, -1);  // dS = P∘(dP − Σ_j dP∘P), one pass
  if (needs[0]) grads.dq = ops::matmul(ds, k, p.scale);                   // [rows, Q, d]
  if (needs[1]) grads.dk = ops::matmul(ds.transpose(1, 2), q, p.scale);  // [rows, K, d]
  return grads;
}

namespace {

class MathBackend final : public SdpaBackend {
 public:
  BackendKind kind() const override { return BackendKind::Math; }
  void check_supported(const SdpaProblem&) const override {}  // whatever the tensor ops support
  Tensor forward(const SdpaProblem& p, SdpaSaved* saved) const override {
    return math_forward_rows(p, 0, p.n, saved ? &saved->probs : nullptr);
  }
  SdpaGrads backward(const SdpaProblem& p, const SdpaSaved& saved, const Tensor& grad_out,
                     const std::vector<bool>& needs) const override {
    return math_backward_rows(p, 0, p.n, saved.probs, grad_out, needs);
  }
};

class SlicedBackend final : public SdpaBackend {
 public:
  BackendKind kind() const override { return BackendKind::Sliced; }
  void check_supported(const SdpaProblem& p) const override {
    LOOM_CHECK(p.slice_size >= 0, "attention backend 'sliced' does not support slice_size ", p.slice_size,
               " (must be ≥ 1, or 0 for one head group)");
  }
  Tensor forward(const SdpaProblem& p, SdpaSaved*) const override {
    Tensor out = Tensor::empty({p.n, p.q_len, p.dv}, p.q.dtype(), p.q.device());
    for_each_slice(p, [&](int64_t n0, int64_t n1) {
      out.narrow(0, n0, n1 - n0).copy_(math_forward_rows(p, n0, n1, nullptr));
    });
    return out;
  }
  SdpaGrads backward(const SdpaProblem& p, const SdpaSaved&, const Tensor& grad_out,
                     const std::vector<bool>& needs) const override {
    SdpaGrads all;
    if (needs[0]) all.dq = Tensor::empty(p.q.shape(), p.q.dtype(), p.q.device());
    if (needs[1]) all.dk = Tensor::empty(p.k.shape(), p.k.dtype(), p.k.device());
    if (needs[2]) all.dv = Tensor::empty(p.v.shape(), p.v.dtype(), p.v.device());
    for_each_slice(p, [&](int64_t n0, int64_t n1) {
      Tensor prob;
      math_forward_rows(p, n0, n1, &prob);  // recompute this slice's P
      const SdpaGrads g = math_backward_rows(p, n0, n1, prob, grad_out, needs);
      if (needs[0]) all.dq.narrow(0, n0, n1 - n0).copy_(g.dq);
      if (needs[1]) all.dk.narrow(0, n0, n1 - n0).copy_(g.dk);
      if (needs[2]) all.dv.narrow(0, n0, n1 - n0).copy_(g.dv);
    });
    return all;
  }

 private:
  template <typename F>
  static void for_each_slice(const SdpaProblem& p, F&& f) {
    const int64_t size = p.slice_size > 0 ? p.slice_size : std::max<int64_t>(p.heads, 1);
    for (int64_t n0 = 0; n0 < p.n; n0 += size) f(n0, std::min(p.n, n0 + size));  // every row, remainder too
  }
};

}  // namespace

const SdpaBackend& math_backend() {
  static const MathBackend backend;
  return backend;
}
const SdpaBackend& sliced_backend() {
  static const SlicedBackend backend;
  return backend;
}

}  // namespace loom::attention::detail
