// Internal: the backend interface behind attention::scaled_dot_product_attention
// (attention/sdpa.h). One SdpaProblem describes a checked call; each backend
// computes the forward (keeping in SdpaSaved what its backward reads) and the
// backward.
#pragma once

#include "attention/sdpa.h"

namespace loom::attention::detail {

// A checked call: q [N,Q,d], k [N,K,d], v [N,K,dv] contiguous, one dtype and
// device; mask undefined or contiguous [Bm, Qm, K] in q's dtype.
struct SdpaProblem {
  Tensor q, k, v, mask;         // [N, len, d], or packed [N / heads, len, heads·d] (flash only)
  bool packed = false;          // FlashAttentionArgs::packed_heads
  int64_t n = 0, q_len = 0, k_len = 0, d = 0, dv = 0;
  int64_t heads = 1, mask_batches = 0, mask_rows = 0;
  int64_t slice_size = 0;
  double scale = 1.0;
  bool causal = false;
};

struct SdpaSaved {
  Tensor out;    // [N, Q, dv]
  Tensor lse;    // [N, Q] log-sum-exp of the scaled, masked scores (flash)
  Tensor probs;  // [N, Q, K] (math)
};

struct SdpaGrads {
  Tensor dq, dk, dv;
};

class SdpaBackend {
 public:
  virtual ~SdpaBackend() = default;
  virtual BackendKind kind() const = 0;
  // Throws "attention backend '<name>' does not support <feature>" when it cannot run p.
  virtual void check_supported(const SdpaProblem& p) const = 0;
  // out [N, Q, dv]; when saved is non-null, also fills what backward() reads.
  virtual Tensor forward(const SdpaProblem& p, SdpaSaved* saved) const = 0;
  // grad_out [N, Q, dv] contiguous; computes only the gradients asked for.
  virtual SdpaGrads backward(const SdpaProblem& p, const SdpaSaved& saved, const Tensor& grad_out,
                             const std::vector<bool>& needs) const = 0;
};

const SdpaBackend& math_backend();
// The device's flash kernel (Backend::flash_attention_*), whatever the device.
// How many calls took the packed-heads flash path so far (for tests: it is not a silent split).
int64_t packed_flash_calls();
const SdpaBackend& flash_backend();
const SdpaBackend& sliced_backend();

// Additive bias for rows [n0, n1) of the problem, broadcastable to [n1−n0, Q, K]
// (mask and causal parts), or undefined when there is none.
Tensor dense_bias(const SdpaProblem& p, int64_t n0, int64_t n1);

// The math algorithm on rows [n0, n1): returns out; stores P in *probs if given.
Tensor math_forward_rows(const SdpaProblem& p, int64_t n0, int64_t n1, Tensor* probs);
SdpaGrads math_backward_rows(const SdpaProblem& p, int64_t n0, int64_t n1, const Tensor& probs,
                             const Tensor& grad_out, const std::vector<bool>& needs);

}  // namespace loom::attention::detail
