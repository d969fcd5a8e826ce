// Scaled dot-product attention, softmax(scale·Q·Kᵀ + M)·V, forward and
// backward, behind one dispatcher (SPEC §2).
//
// Shapes (N = batch·heads, rows n = b·heads + h):
//   q [N, Q, d], k [N, K, d], v [N, K, dv]  ->  out [N, Q, dv]
//   mask: undefined, or an additive bias [Bm, Qm, K] with Bm ∈ {1, N/heads} and
//         Qm ∈ {1, Q}; row n of the problem reads mask batch n / heads.
//
// Backends:
//   math    materialises P = softmax(S) ([N, Q, K]); the reference.
//   flash   the device's flash kernel (Backend::flash_attention_*: CPU f32/f64,
//           bf16/f16 through f32; CUDA bf16/f16 on tensor cores, f32 on TF32 tensor
//           cores when allow_tf32() (--precision tf32), else f32/f64 exact):
//           tiled online softmax; the forward keeps O and one log-sum-exp per
//           query row; the backward recomputes P tile by tile. Nothing of size
//           Q×K is ever allocated.
//   sliced  the math algorithm over `slice_size` rows of N at a time (smaller
//           peak memory, same numbers); the backward recomputes P per slice.
//   auto    the default: flash where the device's flash kernel is the fast path
//           and can run the call (the CPU; CUDA in bf16/f16, and in f32 with
//           TF32), math otherwise (CUDA in f64 and in f32 without TF32, where
//           cuBLAS beats the exact flash kernel, or a head dim the kernel lacks);
//           the first such choice of math is said once on stderr.
//
// Choosing the backend, strongest first: a ScopedAttentionBackend guard (the
// innermost one), then a per-call (per-layer) override, then the process
// default, read once from LOOM_ATTENTION_BACKEND (math | flash | sliced | auto;
// default auto). A backend asked for explicitly that cannot do a call throws an
// error naming the backend and the feature; there is no silent fallback.
//
// Checks: shape, dtype and device consistency are always checked (they are
// O(1) and guard memory safety). With LOOM_ATTN_CHECKS=1, and always in builds
// without NDEBUG, the inputs are also scanned for NaN (and q/k/v for ±inf).
#pragma once

#include <optional>
#include <string>

#include "autograd/variable.h"

namespace loom::attention {

enum class BackendKind { Math, Flash, Sliced, Auto };

const char* backend_name(BackendKind kind);
// Parses "math", "flash", "sliced", "auto"; throws naming the bad value and `what`.
BackendKind parse_backend(const std::string& name, const std::string& what = "attention backend");

// The process default (LOOM_ATTENTION_BACKEND at first use; auto when unset).
BackendKind default_backend();
void set_default_backend(BackendKind kind);

// Forces a backend for the current thread while alive; restores the previous state.
class ScopedAttentionBackend {
 public:
  explicit ScopedAttentionBackend(BackendKind kind);
  ~ScopedAttentionBackend();
  ScopedAttentionBackend(const ScopedAttentionBackend&) = delete;
  ScopedAttentionBackend& operator=(const ScopedAttentionBackend&) = delete;

 private:
  std::optional<BackendKind> previous_;
};

// The backend a call with this per-layer override would use (Auto is resolved per call).
BackendKind resolve_backend(std::optional<BackendKind> layer_override = std::nullopt);
// What Auto picks for q [N, Q, d] (dtype, device) with values of head dim dv, masked or not.
BackendKind auto_backend(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, int64_t heads);

// Whether the scanning checks run (LOOM_ATTN_CHECKS=1, or a build without NDEBUG).
bool scanning_checks_enabled();
void set_scanning_checks(bool on);  // for tests

struct SdpaOptions {
  Tensor mask;                 // additive bias [Bm, Qm, K], or undefined
  int64_t heads = 1;           // N / batch: maps row n to mask batch n / heads
  double scale = 1.0;
  bool causal = false;         // mask key j > query i (top-left aligned)
  std::optional<BackendKind> backend;  // per-layer override
  int64_t slice_size = 0;      // rows of N per slice for `sliced` (0: heads)
};

// The differentiable attention op: gradients flow to q, k and v (not to the mask).
Variable scaled_dot_product_attention(const Variable& q, const Variable& k, const Variable& v,
                                      const SdpaOptions& options = {});

// [B, S, heads·d] -> [B·heads, S, d] and back (copies): the head split and merge of the layers.
Variable split_heads(const Variable& x, int64_t heads);
Variable merge_heads(const Variable& x, int64_t heads);

// The same with the heads packed in the channels, as the projections write them:
//   q [B, Q, H·d], k [B, K, H·d], v [B, K, H·dv] -> out [B, Q, H·dv], H = options.heads;
// head h of batch b is problem row b·H + h above. Equal to splitting the heads
// ([B, S, H·d] -> [B·H, S, d]), scaled_dot_product_attention and merging them back, which is
// what it does unless the chosen backend reads the packed layout itself (CUDA's flash kernels in
// bf16 / f16, and in f32 with TF32): then no copy is made for the split or the merge, forward or
// backward.
Variable scaled_dot_product_attention_packed(const Variable& q, const Variable& k, const Variable& v,
                                             const SdpaOptions& options = {});

}  // namespace loom::attention
