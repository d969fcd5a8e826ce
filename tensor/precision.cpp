#include "tensor/precision.h"

#include <atomic>

#include "tensor/backend.h"
#include "tensor/error.h"

namespace loom {

const char* precision_name(Precision p) {
  switch (p) {
    case Precision::F32: return "f32";
    case Precision::TF32: return "tf32";
    case Precision::BF16: return "bf16";
    case Precision::F16: return "f16";
  }
  return "unknown";
}

Precision parse_precision(const std::string& s, const std::string& what) {
  if (s == "f32" || s == "fp32" || s == "no") return Precision::F32;
  if (s == "tf32") return Precision::TF32;
  if (s == "bf16") return Precision::BF16;
  if (s == "f16" || s == "fp16") return Precision::F16;
  LOOM_FAIL(what, ": unknown precision '", s, "' (expected f32, tf32, bf16 or f16)");
}

Precision default_precision(Device device) { return device.is_cuda() ? Precision::BF16 : Precision::F32; }

DType storage_dtype(Precision p) {
  switch (p) {
    case Precision::BF16: return DType::BF16;
    case Precision::F16: return DType::F16;
    default: return DType::F32;
  }
}

DType master_dtype(DType weight_dtype) {
  return (weight_dtype == DType::BF16 || weight_dtype == DType::F16) ? DType::F32 : weight_dtype;
}

namespace {
std::atomic<bool> tf32_allowed{false};
}
void set_allow_tf32(bool on) { tf32_allowed = on; }
bool allow_tf32() { return tf32_allowed; }

Device parse_device(const std::string& s, const std::string& what) {
  if (s == "auto") return cuda_available() ? Device::cuda(0) : Device::cpu();
  Device d;
  try {
    d = Device::parse(s);
  } catch (const Error&) {
    LOOM_FAIL(what, ": unknown device '", s, "' (expected cpu, cuda, cuda:N or auto)");
  }
  if (d.is_cuda()) {
    const int n = cuda_device_count();
    LOOM_CHECK(n > 0, what, ": device ", d, " asked for, but ",
               cuda_backend_built() ? "no CUDA device is present" : "loom was built without CUDA");
    LOOM_CHECK(d.index >= 0 && d.index < n, what, ": device ", d, " asked for, but only ", n,
               " CUDA device", n == 1 ? " is" : "s are", " present");
  }
  return d;
}

}  // namespace loom
