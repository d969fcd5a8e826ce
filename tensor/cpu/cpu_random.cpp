// CPU kernel of the random slot (contract: tensor/cpu/cpu_random.h).
#include "tensor/cpu/cpu_random.h"

#include <type_traits>

#include "tensor/error.h"
#include "tensor/philox.h"

namespace loom::cpu {
namespace {

constexpr int64_t kParallelElems = int64_t(1) << 14;  // below this the draw stays on the calling thread

// Significand bits of the storage type: the grid of its uniform values.
template <typename T> constexpr int digits_of() {
  if constexpr (std::is_same_v<T, double>) return 53;
  else if constexpr (std::is_same_v<T, float>) return 24;
  else if constexpr (std::is_same_v<T, f16>) return 11;
  else return 8;  // bf16
}

// A double value rounded to storage type T (16-bit floats through float, as on CUDA).
template <typename T> T store(double v) {
  if constexpr (std::is_same_v<T, double>) return v;
  else if constexpr (std::is_same_v<T, float>) return float(v);
  else return T(float(v));
}

template <typename T>
void random_typed(const RandomArgs& a) {
  T* out = static_cast<T*>(a.out.raw_data());
  const int64_t n = a.out.numel();
  const uint64_t seed = a.seed, offset = a.offset;
  const double p = a.p, scale = 1.0 / (1.0 - a.p);
  const RandomKind kind = a.kind;
#pragma omp parallel for if (n > kParallelElems) schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const philox::Block b = philox::element_block(seed, offset, uint64_t(i));
    double v;
    if (kind == RandomKind::Uniform) v = philox::uniform(b, digits_of<T>());
    else if (kind == RandomKind::Normal) v = philox::normal(b);
    else v = philox::dropout_keep(b, p) ? scale : 0.0;
    out[i] = store<T>(v);
  }
}

}  // namespace

void random(const RandomArgs& a) {
  switch (a.out.dtype()) {
    case DType::F32: return random_typed<float>(a);
    case DType::F64: return random_typed<double>(a);
    case DType::BF16: return random_typed<bf16>(a);
    case DType::F16: return random_typed<f16>(a);
    case DType::I64: break;
  }
  LOOM_FAIL("cpu random: dtype ", dtype_name(a.out.dtype()), " is not supported (f32, f64, bf16, f16)");
}

}  // namespace loom::cpu
