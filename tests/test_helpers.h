// Helpers shared by the test executables (one copy, not one per file): error capture,
// relative error, scratch directories, whole-file reads and writes, little-endian lengths, a
// scoped environment variable, the TF32 switch and rounding, the flash attention slot run on any
// device, and the skip of GPU tests where no CUDA device is usable; then, each in a namespace of
// its own, what the files of one split test family share: op and tensor references (opsref),
// LoRA helpers (lora) and adapter-file helpers (adapter_io).
#pragma once

#include <dirent.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "adapters/lora.h"
#include "attention/transformer.h"
#include "autograd/variable.h"
#include "tensor/backend.h"
#include "tensor/error.h"
#include "tensor/precision.h"
#include "tensor/random.h"
#include "tensor/tensor.h"

namespace loom::testing {

// What error_of / any_error_of return when `f` throws nothing.
inline const std::string kNoError = "<no error>";

// The message of the loom::Error that `f` throws. Anything else that escapes is itself a
// defect (loom reports every error as loom::Error): it comes back as "<not a loom::Error: …>",
// which no expected message matches. kNoError when `f` throws nothing.
inline std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const loom::Error& e) {
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<not a loom::Error: ") + e.what() + ">";
  } catch (...) {
    return "<not a loom::Error: unknown exception>";
  }
  return kNoError;
}

// The message of any std::exception that `f` throws (loom::Error or not): for checks that
// only care that a call is refused. kNoError when `f` throws nothing.
inline std::string any_error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return kNoError;
}

// ‖x − ref‖ / ‖ref‖ over all elements (‖x − ref‖ when ref is all zeros); INFINITY when the
// shapes differ or the difference is not finite, so a comparison against a tolerance fails.
inline double rel_error(const Tensor& x, const Tensor& ref) {
  if (x.shape() != ref.shape()) return INFINITY;
  const std::vector<double> a = x.to_vector(), b = ref.to_vector();
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) num += (a[i] - b[i]) * (a[i] - b[i]), den += b[i] * b[i];
  if (!std::isfinite(num)) return INFINITY;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// max |a − b| over all elements (any device and dtype, compared in f64 on the CPU); INFINITY when
// the shapes differ or an element of a is NaN, so a comparison against a tolerance fails.
inline double max_abs_diff(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape()) return INFINITY;
  const std::vector<double> x = a.to_vector(), y = b.to_vector();
  double m = 0;
  for (size_t i = 0; i < x.size(); ++i) m = std::max(m, std::isnan(x[i]) ? INFINITY : std::abs(x[i] - y[i]));
  return m;
}

// max |a| over all elements (0 for an empty tensor).
inline double max_abs(const Tensor& a) {
  double m = 0;
  for (double x : a.to_vector()) m = std::max(m, std::abs(x));
  return m;
}

// max |x − ref| / max |ref| (max |x − ref| when ref is all zeros), in f64 on the CPU; INFINITY
// when the shapes differ or an element of x is NaN (max_abs_diff).
inline double max_rel_error(const Tensor& x, const Tensor& ref) {
  const double d = max_abs_diff(x, ref), r = max_abs(ref);
  return r > 0 ? d / r : d;
}

// A fresh directory under the test temp dir (mkdtemp), removed with its files at the end.
class TempDir {
 public:
  explicit TempDir(const std::string& stem = "loom_test_") {
    std::string tmpl = ::testing::TempDir() + stem + "XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    if (!::mkdtemp(buf.data())) throw std::runtime_error("mkdtemp failed for " + tmpl);
    path_ = buf.data();
  }
  ~TempDir() { remove_tree(path_); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  std::string operator/(const std::string& name) const { return file(name); }
  // Names in the directory (not recursive), sorted.
  std::vector<std::string> files() const {
    std::vector<std::string> out;
    if (DIR* d = ::opendir(path_.c_str())) {
      while (dirent* e = ::readdir(d))
        if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) out.push_back(e->d_name);
      ::closedir(d);
    }
    std::sort(out.begin(), out.end());
    return out;
  }

 private:
  static void remove_tree(const std::string& path) {
    if (DIR* d = ::opendir(path.c_str())) {
      while (dirent* e = ::readdir(d)) {
        if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
        const std::string child = path + "/" + e->d_name;
        if (::unlink(child.c_str()) != 0) remove_tree(child);
      }
      ::closedir(d);
    }
    ::rmdir(path.c_str());
  }
  std::string path_;
};

// The whole file as bytes ("" when it cannot be read).
inline std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// Replaces the file with `bytes`.
inline void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << bytes;
}

// The 8 bytes of n, little-endian (a safetensors header length).
inline std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = char((n >> (8 * i)) & 0xff);
  return s;
}

// Sets (or, with value nullptr, unsets) an environment variable for the guard's lifetime and
// restores the previous state afterwards, e.g. ScopedEnv im2col("LOOM_CONV", "im2col").
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = ::getenv(name)) had_ = true, old_ = old;
    if (value) ::setenv(name, value, 1);
    else ::unsetenv(name);
  }
  ~ScopedEnv() {
    if (had_) ::setenv(name_.c_str(), old_.c_str(), 1);
    else ::unsetenv(name_.c_str());
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::string name_, old_;
  bool had_ = false;
};

// Sets allow_tf32() (the switch of --precision tf32) for the guard's lifetime and restores the
// previous value afterwards.
class ScopedAllowTf32 {
 public:
  explicit ScopedAllowTf32(bool on) : old_(allow_tf32()) { set_allow_tf32(on); }
  ~ScopedAllowTf32() { set_allow_tf32(old_); }
  ScopedAllowTf32(const ScopedAllowTf32&) = delete;
  ScopedAllowTf32& operator=(const ScopedAllowTf32&) = delete;

 private:
  bool old_;
};

// x (any dtype, on the CPU) through f32 rounded to TF32 as cvt.rna.tf32.f32 rounds it: 10 mantissa
// bits, to nearest, ties away from zero; returned in f64.
inline Tensor round_to_tf32(const Tensor& x) {
  std::vector<double> v = x.to_vector();
  for (double& e : v) {
    float f = float(e);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;  // inf / NaN stay
    std::memcpy(&f, &u, 4);
    e = f;
  }
  return Tensor::from_values(v, x.shape(), DType::F64);
}

// The floor of the flash tests' bf16 / f16 bound (flash-attention's own tests add one likewise):
// half an ulp of the largest reference value in the output dtype, the rounding no kernel that
// returns that dtype can avoid (and at least 1e-4 of max(1, largest)). Without it the bound
// "2 × the math backend's error" fails whenever the math backend's largest error happens to fall
// well under that rounding: seen on the H200 with four different kernels giving one bit-identical
// largest error (causal, d = 40 and 64).
inline double flash_rounding_floor(DType dtype, double largest) {
  const double half_ulp = dtype == DType::BF16 ? 0x1p-8 : dtype == DType::F16 ? 0x1p-11 : 0.0;
  return std::max(half_ulp * largest, 1e-4 * std::max(1.0, largest));
}

// What the flash attention slot (Backend::flash_attention_*) returns, in f64 on the CPU.
struct FlashSlotResult {
  Tensor out, lse, dq, dk, dv;
};

// a's q, k, v (and mask) in `dtype` on `dev`.
inline FlashAttentionArgs flash_args_on(const FlashAttentionArgs& a, DType dtype, Device dev) {
  FlashAttentionArgs b = a;
  b.q = a.q.to(dtype).to(dev), b.k = a.k.to(dtype).to(dev), b.v = a.v.to(dtype).to(dev);
  if (a.mask.defined()) b.mask = a.mask.to(dtype).to(dev).contiguous();
  return b;
}

// Forward and backward through the slot on `dev` in `dtype` (either layout of a: plain
// [N, len, d] or packed [B, len, heads·d]), the outputs poisoned with NaN first.
inline FlashSlotResult run_flash_slot(const FlashAttentionArgs& a64, const Tensor& grad_out64, DType dtype, Device dev) {
  const FlashAttentionArgs a = flash_args_on(a64, dtype, dev);
  Backend& be = backend_for(dev);
  const int64_t problems = a.q.size(0) * (a.packed_heads ? a.heads : 1);
  const Tensor out = Tensor::full({a.q.size(0), a.q.size(1), a.v.size(2)}, NAN, dtype, dev);
  const Tensor lse = Tensor::full({problems, a.q.size(1)}, NAN, flash_stats_dtype(dtype), dev);
  be.flash_attention_forward(a, out, lse);
  const Tensor dq = Tensor::full(a.q.shape(), NAN, dtype, dev), dk = Tensor::full(a.k.shape(), NAN, dtype, dev),
               dv = Tensor::full(a.v.shape(), NAN, dtype, dev);
  be.flash_attention_backward(a, out, lse, grad_out64.to(dtype).to(dev), dq, dk, dv);
  auto host = [](const Tensor& t) { return t.to(Device::cpu()).to(DType::F64); };
  return {host(out), host(lse), host(dq), host(dk), host(dv)};
}

}  // namespace loom::testing

// Skips the calling test (or the void helper it is in) with the reason when no CUDA device is
// usable: the GPU tests (ctest label gpu) run everywhere and report SKIPPED without a GPU. A
// macro because GTEST_SKIP returns from the function it is written in.
#define LOOM_SKIP_WITHOUT_CUDA()                                                                      \
  do {                                                                                                \
    if (!::loom::cuda_available())                                                                    \
      GTEST_SKIP() << "no CUDA device: cuda_device_count() is 0 (loom built without CUDA, no driver, " \
                      "no GPU, or none visible)";                                                     \
  } while (0)

namespace loom::testing {
// A GoogleTest parameter name from free text: every character that is not a letter or a digit
// becomes '_'.
inline std::string gtest_param_name(std::string s) {
  for (char& ch : s)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return s;
}
}  // namespace loom::testing

// ---- op-test references (tests/tensor/test_ops*.cpp, test_tensor.cpp, test_tensor_copy.cpp) ----
// Row-major index arithmetic, NumPy broadcasting, relative errors, inputs of a logical shape
// laid out contiguous, transposed or sliced with their values as a reference vector, and tensors
// whose element i holds i.

// Runs body in a child process (thread-safe death-test style) and expects it to exit with 0.
#define LOOM_EXPECT_CHILD_EXITS_0(body)             \
  do {                                               \
    GTEST_FLAG_SET(death_test_style, "threadsafe"); \
    EXPECT_EXIT(body, ::testing::ExitedWithCode(0), ""); \
  } while (0)

namespace loom::testing::opsref {

using loom::Device;
using loom::DType;
using loom::Generator;
using loom::Shape;
using loom::Tensor;

inline constexpr double kInf = std::numeric_limits<double>::infinity();



inline int64_t numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

inline std::vector<int64_t> unravel(int64_t i, const Shape& shape) {
  std::vector<int64_t> idx(shape.size());
  for (int64_t d = int64_t(shape.size()) - 1; d >= 0; --d) {
    idx[size_t(d)] = i % shape[size_t(d)];
    i /= shape[size_t(d)];
  }
  return idx;
}

inline int64_t ravel(const std::vector<int64_t>& idx, const Shape& shape) {
  int64_t i = 0;
  for (size_t d = 0; d < shape.size(); ++d) i = i * shape[d] + idx[d];
  return i;
}

// 0, 1, 2, ... n-1 as doubles.
inline std::vector<double> iota(int64_t n, double start = 0.0) {
  std::vector<double> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = start + double(i);
  return v;
}

// A contiguous tensor whose element at row-major index i holds the value i.
inline Tensor iota_tensor(const Shape& shape, DType dtype = DType::F64) {
  return Tensor::from_values(iota(loom::shape_numel(shape)), shape, dtype);
}

inline std::string shape_str(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// NumPy broadcast of two shapes (the test's own version).
inline Shape broadcast(const Shape& a, const Shape& b) {
  const size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    const int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    out[i] = da == 1 ? db : da;
  }
  return out;
}

// Index into a tensor of `shape` that broadcasts to `out` at out-index `oi`.
inline int64_t broadcast_index(const std::vector<int64_t>& oi, const Shape& shape) {
  const size_t lead = oi.size() - shape.size();
  std::vector<int64_t> idx(shape.size());
  for (size_t d = 0; d < shape.size(); ++d) idx[d] = shape[d] == 1 ? 0 : oi[lead + d];
  return ravel(idx, shape);
}

inline double rel_err(const std::vector<double>& x, const std::vector<double>& ref) {
  EXPECT_EQ(x.size(), ref.size());
  if (x.size() != ref.size()) return kInf;
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < x.size(); ++i) {
    num += (x[i] - ref[i]) * (x[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  if (std::isnan(num)) return kInf;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Like rel_err, but with ||ref|| floored at sqrt(n) (an RMS of 1): for functions
// evaluated near one of their roots (gelu_grad, log near 1, tanh near 0) the
// absolute rounding error of f32 is ~eps·O(1) however small the value is.
inline double scaled_err(const std::vector<double>& x, const std::vector<double>& ref) {
  double den = 0.0;
  for (double r : ref) den += r * r;
  const double floor = std::sqrt(double(ref.size()));
  const double re = rel_err(x, ref);
  return den > 0 ? re * std::sqrt(den) / std::max(std::sqrt(den), floor) : re / std::max(floor, 1.0);
}

inline bool all_finite(const std::vector<double>& v) {
  return std::all_of(v.begin(), v.end(), [](double x) { return std::isfinite(x); });
}

// Tolerances for elementwise ops / reductions / softmax; matmul uses its own.
inline double tol(DType dt) { return dt == DType::F64 ? 1e-12 : 1e-6; }

enum class Layout { Contiguous, Transposed, Sliced };
inline const Layout kLayouts[] = {Layout::Contiguous, Layout::Transposed, Layout::Sliced};
inline const DType kFloatTypes[] = {DType::F32, DType::F64};

inline const char* layout_name(Layout l) {
  switch (l) {
    case Layout::Contiguous: return "contiguous";
    case Layout::Transposed: return "transposed";
    case Layout::Sliced: return "sliced";
  }
  return "?";
}

inline std::string trace(DType dt, Layout la) { return std::string(loom::dtype_name(dt)) + ", " + layout_name(la); }

// A tensor of logical shape `shape` with values uniform in [lo, hi), laid out as
// asked, and its logical values in row-major order (computed from the
// contiguous base it views, by index arithmetic).
struct Input {
  Tensor t;
  std::vector<double> ref;
};

inline Input make_input(const Shape& shape, Generator& gen, DType dt, Layout layout, double lo = -3.0, double hi = 3.0) {
  const int64_t r = int64_t(shape.size());
  if (layout == Layout::Transposed && r < 2) layout = Layout::Sliced;
  Input in;
  in.ref.resize(size_t(numel(shape)));
  if (layout == Layout::Contiguous) {
    in.t = Tensor::rand(shape, gen, dt, Device::cpu(), lo, hi);
    in.ref = in.t.contiguous().to_vector();
  } else if (layout == Layout::Transposed) {
    Shape bs = shape;
    std::swap(bs[size_t(r - 1)], bs[size_t(r - 2)]);
    const Tensor base = Tensor::rand(bs, gen, dt, Device::cpu(), lo, hi);
    const std::vector<double> bv = base.to_vector();
    in.t = base.transpose(-1, -2);
    for (int64_t i = 0; i < numel(shape); ++i) {
      std::vector<int64_t> idx = unravel(i, shape);
      std::swap(idx[size_t(r - 1)], idx[size_t(r - 2)]);
      in.ref[size_t(i)] = bv[size_t(ravel(idx, bs))];
    }
  } else {  // every other element of a last dim of 2n+1: x[..., j] = base[..., 1 + 2j]
    if (r == 0) {
      const Tensor base = Tensor::rand({3}, gen, dt, Device::cpu(), lo, hi);
      in.t = base.select(0, 1);
      in.ref = {base.to_vector()[1]};
      return in;
    }
    Shape bs = shape;
    bs[size_t(r - 1)] = 2 * shape[size_t(r - 1)] + 1;
    const Tensor base = Tensor::rand(bs, gen, dt, Device::cpu(), lo, hi);
    const std::vector<double> bv = base.to_vector();
    in.t = base.slice(-1, 1, bs[size_t(r - 1)], 2);
    for (int64_t i = 0; i < numel(shape); ++i) {
      std::vector<int64_t> idx = unravel(i, shape);
      idx[size_t(r - 1)] = 1 + 2 * idx[size_t(r - 1)];
      in.ref[size_t(i)] = bv[size_t(ravel(idx, bs))];
    }
  }
  EXPECT_EQ(in.t.shape(), shape);
  // the views really are non-contiguous wherever their layout allows it (a view without elements
  // is contiguous whatever its strides)
  const bool has_elements = numel(shape) > 0;
  if (layout == Layout::Transposed && has_elements && shape[size_t(r - 1)] > 1 && shape[size_t(r - 2)] > 1) {
    EXPECT_FALSE(in.t.is_contiguous());
  }
  if (layout == Layout::Sliced && has_elements && r > 0 && shape.back() > 1) {
    EXPECT_FALSE(in.t.is_contiguous());
  }
  return in;
}

}  // namespace loom::testing::opsref

// ---- LoRA-test helpers (tests/adapters/test_lora.cpp, test_lora_patterns_fuse.cpp, test_lora_gradcheck.cpp)
// A tiny Transformer2DModel and random inputs for it, its output as doubles, every LoRA target,
// random up weights (B = 0 makes an adapter the identity change), relative differences and the
// message of a loom::Error.

namespace loom::testing::lora {

// in_channels 4, 2 heads of dim 2 (inner 4), 2 groups, cross_attention_dim 3.
inline attention::Transformer2DConfig tiny_config(bool linear_projection = false, int64_t head_dim = 2) {
  attention::Transformer2DConfig c;
  c.in_channels = 4;
  c.num_attention_heads = 2;
  c.attention_head_dim = head_dim;
  c.norm_num_groups = 2;
  c.cross_attention_dim = 3;
  c.use_linear_projection = linear_projection;
  return c;
}

inline std::shared_ptr<attention::Transformer2DModel> tiny_model(uint64_t seed, DType dtype,
                                                                 bool linear_projection = false,
                                                                 int64_t head_dim = 2) {
  Generator gen(seed);
  return std::make_shared<attention::Transformer2DModel>(tiny_config(linear_projection, head_dim), gen, dtype);
}

// Every optional target as well as the defaults.
inline std::vector<std::string> all_targets() {
  return {"to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"};
}

// B = 0 makes the adapter an identity change (and dA = 0): give it small random values.
inline void randomize_up(const adapters::LoraAdapter& a, Generator& gen, double std = 0.3) {
  for (const auto& [path, m] : a.modules())
    m.up.tensor().copy_(Tensor::randn(m.up.shape(), gen, DType::F64, Device::cpu(), 0.0, std));
}

inline std::vector<double> run(const attention::Transformer2DModel& model, const Tensor& x, const Tensor& ctx) {
  NoGradGuard no_grad;
  return model.forward(Variable(x), Variable(ctx)).tensor().to_vector();
}

// max |a − b| / max |b|
inline double rel_diff(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num = std::max(num, std::abs(a[i] - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return den > 0.0 ? num / den : num;
}

inline std::vector<double> minus(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> r(a.size());
  for (size_t i = 0; i < a.size(); ++i) r[i] = a[i] - b[i];
  return r;
}

// The message of the loom::Error that `f` throws; "(no exception)" when it throws nothing.
inline std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no exception)";
}

struct Inputs {
  Tensor x, ctx;
};

inline Inputs random_inputs(uint64_t seed, DType dtype, int64_t batch = 2) {
  Generator gen(seed);
  Inputs in;
  in.x = Tensor::randn({batch, 4, 3, 3}, gen, dtype);
  in.ctx = Tensor::randn({batch, 3, 3}, gen, dtype);
  return in;
}

}  // namespace loom::testing::lora

// ---- adapter-file-test helpers (tests/io/test_adapter_io*.cpp, test_model_dir_checkpoint.cpp) --
// A tiny Transformer2DModel (two layers, eval mode), its inputs and output, and a LoRA on it that
// changes the output.

namespace loom::testing::adapter_io {

inline attention::Transformer2DConfig tiny_config(bool linear_projection = false) {
  attention::Transformer2DConfig c;
  c.in_channels = 4, c.num_attention_heads = 2, c.attention_head_dim = 3, c.num_layers = 2;
  c.cross_attention_dim = 5, c.norm_num_groups = 2, c.use_linear_projection = linear_projection;
  return c;
}

inline std::shared_ptr<attention::Transformer2DModel> tiny_model(DType dtype = DType::F32,
                                                                 bool linear_projection = false) {
  Generator gen(11);
  auto m = std::make_shared<attention::Transformer2DModel>(tiny_config(linear_projection), gen, dtype);
  m->eval();
  return m;
}

struct Inputs {
  Variable x, ctx;
};
inline Inputs tiny_inputs(DType dtype) {
  Generator gen(5);
  return {Variable(Tensor::randn({2, 4, 3, 3}, gen, dtype)), Variable(Tensor::randn({2, 4, 5}, gen, dtype))};
}

// A LoRA with non-zero up weights (so it changes the output), per-module ranks and alphas.
inline adapters::LoraAdapter& trained_like(adapters::LoraSet& set, const std::string& name, uint64_t seed,
                                           std::vector<std::string> targets = adapters::default_lora_targets()) {
  adapters::LoraConfig cfg;
  cfg.rank = 2, cfg.alpha = 3.0, cfg.targets = std::move(targets);
  cfg.rank_pattern["attn2.to_k"] = 3;
  cfg.alpha_pattern["attn1.to_v"] = 1.5;
  Generator gen(seed);
  adapters::LoraAdapter& a = set.add(name, cfg, gen);
  for (const auto& [path, m] : a.modules()) {
    const Tensor& up = m.up.tensor();
    m.up.tensor().copy_(Tensor::randn(up.shape(), gen, up.dtype(), up.device(), 0.0, 0.5));
  }
  return a;
}

inline Tensor run(const attention::Transformer2DModel& m, const Inputs& in) {
  NoGradGuard ng;
  return m.forward(in.x, in.ctx).tensor();
}

}  // namespace loom::testing::adapter_io
