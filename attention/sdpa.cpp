// The attention dispatcher: backend choice, checks, and the differentiable op.
#include "attention/sdpa.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <mutex>
#include <set>

#include "attention/sdpa_backends.h"
#include "autograd/ops.h"
#include "tensor/backend.h"
#include "tensor/ops.h"
#include "tensor/precision.h"

namespace loom::attention {

using detail::SdpaBackend;
using detail::SdpaProblem;
using detail::SdpaSaved;

// ---- backend choice -------------------------------------------------------------

const char* backend_name(BackendKind kind) {
  switch (kind) {
    case BackendKind::Math: return "math";
    case BackendKind::Flash: return "flash";
    case BackendKind::Sliced: return "sliced";
    case BackendKind::Auto: return "auto";
  }
  return "unknown";
}

BackendKind parse_backend(const std::string& name, const std::string& what) {
  for (BackendKind k : {BackendKind::Math, BackendKind::Flash, BackendKind::Sliced, BackendKind::Auto})
    if (name == backend_name(k)) return k;
  LOOM_FAIL(what, ": unknown attention backend '", name, "' (expected math, flash, sliced or auto)");
}

namespace {

std::mutex default_mutex;
std::optional<BackendKind> process_default;
thread_local std::optional<BackendKind> scoped_override;

#ifdef NDEBUG
constexpr bool kDebugBuild = false;
#else
constexpr bool kDebugBuild = true;
#endif

bool env_checks() {
  const char* v = std::getenv("LOOM_ATTN_CHECKS");
  return v && std::string(v) == "1";
}
bool scanning_checks = kDebugBuild || env_checks();

}  // namespace

BackendKind default_backend() {
  std::lock_guard<std::mutex> lock(default_mutex);
  if (!process_default) {
    const char* env = std::getenv("LOOM_ATTENTION_BACKEND");
    process_default = env && *env ? parse_backend(env, "LOOM_ATTENTION_BACKEND") : BackendKind::Auto;
  }
  return *process_default;
}

void set_default_backend(BackendKind kind) {
  std::lock_guard<std::mutex> lock(default_mutex);
  process_default = kind;
}

ScopedAttentionBackend::ScopedAttentionBackend(BackendKind kind) : previous_(scoped_override) {
  scoped_override = kind;
}
ScopedAttentionBackend::~ScopedAttentionBackend() { scoped_override = previous_; }

BackendKind resolve_backend(std::optional<BackendKind> layer_override) {
  if (scoped_override) return *scoped_override;
  if (layer_override) return *layer_override;
  return default_backend();
}

namespace {
// Says `note` on stderr the first time it comes up in this process.
void note_once(const std::string& note) {
  static std::mutex m;
  static std::set<std::string> said;
  std::lock_guard<std::mutex> lock(m);
  if (said.insert(note).second) std::cerr << "loom: note: " << note << "\n";
}
}  // namespace

BackendKind auto_backend(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& mask, int64_t heads) {
  const Device dev = q.device();
  const DType dt = q.dtype();
  // CUDA in f64, or f32 without TF32: the exact flash kernel (CUDA cores) loses to cuBLAS. f32 with
  // TF32 (--precision tf32) has tensor-core flash kernels: flash where they cover the call.
  if (dev.is_cuda() && (dt == DType::F64 || (dt == DType::F32 && !allow_tf32()))) {
    note_once(std::string("attention on ") + dev.str() + " in " + dtype_name(dt) +
              (dt == DType::F32 ? " without TF32" : "") +
              ": auto uses 'math' (cuBLAS; the exact flash kernel is slower there); --backend flash to insist" +
              (dt == DType::F32 ? " (--precision tf32 has tensor-core flash kernels)" : ""));
    return BackendKind::Math;
  }
  FlashAttentionArgs a;
  a.q = q, a.k = k, a.v = v, a.mask = mask, a.heads = heads;
  try {
    backend_for(dev).flash_attention_check(a);
    return BackendKind::Flash;
  } catch (const Error& e) {
    note_once(std::string("auto attention uses 'math' for this call: ") + e.what());
    return BackendKind::Math;
  }
}

bool scanning_checks_enabled() { return scanning_checks; }
void set_scanning_checks(bool on) { scanning_checks = on; }

// ---- checks ---------------------------------------------------------------------------

namespace {

const SdpaBackend& backend_of(BackendKind kind) {
  switch (kind) {
    case BackendKind::Math: return detail::math_backend();
    case BackendKind::Flash: return detail::flash_backend();
    case BackendKind::Sliced: return detail::sliced_backend();
    case BackendKind::Auto: break;
  }
  LOOM_FAIL("attention: unknown backend code ", int(kind));
}

// mask: undefined, or [1 or batches, 1 or q_len, k_len] on `dev`.
void check_mask(const Tensor& m, int64_t batches, int64_t q_len, int64_t k_len, const Device& dev) {
  if (!m.defined()) return;
  LOOM_CHECK(m.device() == dev, "attention check: mask on ", m.device(), ", q on ", dev);
  LOOM_CHECK(m.dim() == 3, "attention check: mask must be [B or 1, Q or 1, K], got ", m.shape());
  LOOM_CHECK(m.size(-1) == k_len, "attention check: mask.last != K: mask ", m.shape(), " vs ", k_len,
             " keys (masks are not padded)");
  LOOM_CHECK(m.size(0) == 1 || m.size(0) == batches, "attention check: mask batch ", m.size(0), " is neither 1 nor ",
             batches, " (mask ", m.shape(), ")");
  LOOM_CHECK(m.size(1) == 1 || m.size(1) == q_len, "attention check: mask rows ", m.size(1),
             " are neither 1 nor Q = ", q_len, " (mask ", m.shape(), ")");
}

void check_inputs(const Variable& q, const Variable& k, const Variable& v, const SdpaOptions& o) {
  LOOM_CHECK(q.defined() && k.defined() && v.defined(), "attention: undefined q, k or v");
  LOOM_CHECK(q.device() == k.device() && q.device() == v.device(), "attention check: q, k, v on different devices (q ",
             q.device(), ", k ", k.device(), ", v ", v.device(), ")");
  LOOM_CHECK(q.dtype() == k.dtype() && q.dtype() == v.dtype(), "attention check: q, k, v dtypes differ (q ", q.dtype(),
             ", k ", k.dtype(), ", v ", v.dtype(), ")");
  LOOM_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "attention check: q, k, v must be [N, len, dim]; got q ",
             q.shape(), ", k ", k.shape(), ", v ", v.shape());
  LOOM_CHECK(q.size(0) == k.size(0) && q.size(0) == v.size(0), "attention check: batch·heads differ: q ", q.shape(),
             ", k ", k.shape(), ", v ", v.shape());
  LOOM_CHECK(q.size(2) == k.size(2), "attention check: q.d != k.d: q ", q.shape(), " vs k ", k.shape());
  LOOM_CHECK(k.size(1) == v.size(1), "attention check: k.len != v.len: k ", k.shape(), " vs v ", v.shape());
  LOOM_CHECK(k.size(1) >= 1, "attention check: no keys (k ", k.shape(), ")");
  LOOM_CHECK(o.heads >= 1 && q.size(0) % o.heads == 0, "attention check: batch·heads ", q.size(0),
             " is not a multiple of heads ", o.heads);
  LOOM_CHECK(!(o.mask.defined() && o.causal), "attention check: mask and causal given together (fold the causal "
             "part into the mask)");
  check_mask(o.mask, q.size(0) / o.heads, q.size(1), k.size(1), q.device());
}

void scan_finite(const Tensor& t, const char* name, bool allow_neg_inf) {
  for (double x : t.to_vector()) {
    LOOM_CHECK(!std::isnan(x), "attention check: ", name, " ", t.shape(), " contains NaN");
    LOOM_CHECK(allow_neg_inf || std::isfinite(x), "attention check: ", name, " ", t.shape(), " contains inf");
  }
}

SdpaProblem make_problem(const Variable& q, const Variable& k, const Variable& v, const SdpaOptions& o) {
  SdpaProblem p;
  p.q = q.tensor().contiguous();
  p.k = k.tensor().contiguous();
  p.v = v.tensor().contiguous();
  if (o.mask.defined()) {
    p.mask = o.mask.to(q.dtype()).contiguous();
    p.mask_batches = p.mask.size(0);
    p.mask_rows = p.mask.size(1);
  }
  p.n = q.size(0), p.q_len = q.size(1), p.k_len = k.size(1), p.d = q.size(2), p.dv = v.size(2);
  p.heads = o.heads, p.slice_size = o.slice_size, p.scale = o.scale, p.causal = o.causal;
  return p;
}

}  // namespace

// ---- the differentiable op ----------------------------------------------------------------

Variable scaled_dot_product_attention(const Variable& q, const Variable& k, const Variable& v, const SdpaOptions& o) {
  check_inputs(q, k, v, o);
  const SdpaProblem p = make_problem(q, k, v, o);
  BackendKind kind = resolve_backend(o.backend);
  if (kind == BackendKind::Auto) kind = auto_backend(p.q, p.k, p.v, p.mask, p.heads);
  const SdpaBackend& backend = backend_of(kind);
  backend.check_supported(p);
  if (scanning_checks_enabled()) {
    scan_finite(p.q, "q", false), scan_finite(p.k, "k", false), scan_finite(p.v, "v", false);
    if (p.mask.defined()) scan_finite(p.mask, "mask", true);
  }
  const bool need_grad = GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  auto saved = need_grad ? std::make_shared<SdpaSaved>() : nullptr;
  const Tensor out = backend.forward(p, saved.get());
  const SdpaBackend* be = &backend;
  return record("scaled_dot_product_attention", out, {q, k, v},
                [p, saved, be](const Tensor& g, const std::vector<bool>& needs) {
                  const detail::SdpaGrads grads = be->backward(p, *saved, g.contiguous(), needs);
                  return std::vector<Tensor>{needs[0] ? grads.dq : Tensor(), needs[1] ? grads.dk : Tensor(),
                                             needs[2] ? grads.dv : Tensor()};
                });
}

namespace {
std::atomic<int64_t> packed_calls{0};

// The packed problem when the backend this call resolves to reads it (else nullopt).
std::optional<SdpaProblem> packed_problem(const Variable& q, const Variable& k, const Variable& v,
                                          const SdpaOptions& o) {
  BackendKind kind = resolve_backend(o.backend);
  if (kind != BackendKind::Flash && kind != BackendKind::Auto) return std::nullopt;
  // the tensor-core families: bf16 / f16, and f32 with TF32
  const DType dt = q.dtype();
  const bool tensor_cores = dt == DType::BF16 || dt == DType::F16 || (dt == DType::F32 && allow_tf32());
  if (!q.device().is_cuda() || !tensor_cores) return std::nullopt;
  if (scanning_checks_enabled() || o.causal) return std::nullopt;
  SdpaProblem p;
  p.q = q.tensor().contiguous(), p.k = k.tensor().contiguous(), p.v = v.tensor().contiguous();
  if (o.mask.defined()) {
    p.mask = o.mask.to(q.dtype()).contiguous();
    p.mask_batches = p.mask.size(0), p.mask_rows = p.mask.size(1);
  }
  p.packed = true;
  p.heads = o.heads, p.scale = o.scale;
  p.n = q.size(0) * o.heads, p.q_len = q.size(1), p.k_len = k.size(1);
  p.d = q.size(2) / o.heads, p.dv = v.size(2) / o.heads;
  FlashAttentionArgs a;
  a.q = p.q, a.k = p.k, a.v = p.v, a.mask = p.mask, a.heads = p.heads, a.packed_heads = true;
  try {
    backend_for(q.device()).flash_attention_check(a);
  } catch (const Error&) {
    return std::nullopt;  // the split path below reports whatever the backend lacks
  }
  return p;
}
}  // namespace

Variable split_heads(const Variable& x, int64_t h) {
  const int64_t b = x.size(0), s = x.size(1);
  return reshape(permute(reshape(x, {b, s, h, -1}), {0, 2, 1, 3}), {b * h, s, -1});
}
Variable merge_heads(const Variable& x, int64_t h) {
  const int64_t b = x.size(0) / h, s = x.size(1);
  return reshape(permute(reshape(x, {b, h, s, -1}), {0, 2, 1, 3}), {b, s, -1});
}

namespace detail {
int64_t packed_flash_calls() { return packed_calls.load(); }
}  // namespace detail

Variable scaled_dot_product_attention_packed(const Variable& q, const Variable& k, const Variable& v,
                                             const SdpaOptions& o) {
  LOOM_CHECK(q.defined() && k.defined() && v.defined(), "attention: undefined q, k or v");
  LOOM_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "attention check: packed q, k, v must be [B, len, heads·d]; "
             "got q ", q.shape(), ", k ", k.shape(), ", v ", v.shape());
  LOOM_CHECK(o.heads >= 1 && q.size(2) % o.heads == 0 && k.size(2) % o.heads == 0 && v.size(2) % o.heads == 0,
             "attention check: packed q ", q.shape(), ", k ", k.shape(), ", v ", v.shape(), " do not split into ",
             o.heads, " heads");
  const std::optional<SdpaProblem> packed = packed_problem(q, k, v, o);
  if (!packed) return merge_heads(scaled_dot_product_attention(split_heads(q, o.heads), split_heads(k, o.heads),
                                                               split_heads(v, o.heads), o),
                                  o.heads);
  const SdpaProblem p = *packed;
  ++packed_calls;
  LOOM_CHECK(q.size(0) == k.size(0) && q.size(0) == v.size(0), "attention check: batches differ: q ", q.shape(),
             ", k ", k.shape(), ", v ", v.shape());
  LOOM_CHECK(q.size(2) == k.size(2), "attention check: q.d != k.d: q ", q.shape(), " vs k ", k.shape());
  LOOM_CHECK(k.size(1) == v.size(1), "attention check: k.len != v.len: k ", k.shape(), " vs v ", v.shape());
  LOOM_CHECK(k.size(1) >= 1, "attention check: no keys (k ", k.shape(), ")");
  check_mask(o.mask, q.size(0), q.size(1), k.size(1), q.device());
  const SdpaBackend& backend = detail::flash_backend();
  const bool need_grad = GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  auto saved = need_grad ? std::make_shared<SdpaSaved>() : nullptr;
  const Tensor out = backend.forward(p, saved.get());
  return record("scaled_dot_product_attention", out, {q, k, v},
                [p, saved, &backend](const Tensor& g, const std::vector<bool>& needs) {
                  const detail::SdpaGrads grads = backend.backward(p, *saved, g.contiguous(), needs);
                  return std::vector<Tensor>{needs[0] ? grads.dq : Tensor(), needs[1] ? grads.dk : Tensor(),
                                             needs[2] ? grads.dv : Tensor()};
                });
}

}  // namespace loom::attention
