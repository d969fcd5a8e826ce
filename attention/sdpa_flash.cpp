// The `flash` attention backend: the device's own flash kernels, called through the fused-op slots
// of the device interface (Backend::flash_attention_*; CPU: tensor/cpu/cpu_flash.cpp, CUDA:
// tensor/cuda/cuda_flash.cu). The forward keeps O and one log-sum-exp per query row; the backward
// recomputes P tile by tile from them. Nothing of size Q×K is allocated.
#include "attention/sdpa_backends.h"
#include "tensor/backend.h"

namespace loom::attention::detail {

namespace {

FlashAttentionArgs args_of(const SdpaProblem& p) {
  FlashAttentionArgs a;
  a.q = p.q, a.k = p.k, a.v = p.v, a.mask = p.mask;
  a.heads = p.heads, a.scale = p.scale, a.causal = p.causal, a.packed_heads = p.packed;
  return a;
}

class FlashBackend final : public SdpaBackend {
 public:
  BackendKind kind() const override { return BackendKind::Flash; }

  void check_supported(const SdpaProblem& p) const override {
    backend_for(p.q.device()).flash_attention_check(args_of(p));
  }

  Tensor forward(const SdpaProblem& p, SdpaSaved* saved) const override {
    const Device dev = p.q.device();
    const Shape out_shape = p.packed ? Shape{p.n / p.heads, p.q_len, p.heads * p.dv} : Shape{p.n, p.q_len, p.dv};
    Tensor out = Tensor::empty(out_shape, p.q.dtype(), dev);
    Tensor lse = Tensor::empty({p.n, p.q_len}, flash_stats_dtype(p.q.dtype()), dev);
    if (out.numel() > 0) backend_for(dev).flash_attention_forward(args_of(p), out, lse);
    if (saved) {
      saved->out = out;
      saved->lse = lse;
    }
    return out;
  }

  SdpaGrads backward(const SdpaProblem& p, const SdpaSaved& saved, const Tensor& grad_out,
                     const std::vector<bool>& needs) const override {
    const Device dev = p.q.device();
    SdpaGrads g;
    if (needs[0]) g.dq = Tensor::empty(p.q.shape(), p.q.dtype(), dev);
    if (needs[1]) g.dk = Tensor::empty(p.k.shape(), p.k.dtype(), dev);
    if (needs[2]) g.dv = Tensor::empty(p.v.shape(), p.v.dtype(), dev);
    if (p.n > 0 && p.q_len > 0)
      backend_for(dev).flash_attention_backward(args_of(p), saved.out, saved.lse, grad_out, g.dq, g.dk, g.dv);
    else {  // no queries: every gradient is zero
      for (Tensor* t : {&g.dq, &g.dk, &g.dv})
        if (t->defined()) t->fill_(0.0);
    }
    return g;
  }
};

}  // namespace

const SdpaBackend& flash_backend() {
  static const FlashBackend backend;
  return backend;
}

}  // namespace loom::attention::detail
