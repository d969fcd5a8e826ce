// Helpers shared by the test executables (one copy, not one per file): error capture,
// relative error, scratch directories, whole-file reads and writes, a scoped environment
// variable, the TF32 switch and rounding, the flash attention slot run on any device, and the
// skip of GPU tests where no CUDA device is usable.
#pragma once

#include <dirent.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "tensor/backend.h"
#include "tensor/error.h"
#include "tensor/precision.h"
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
