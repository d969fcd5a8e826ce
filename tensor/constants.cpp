#include "tensor/constants.h"

#include <map>
#include <mutex>
#include <tuple>

namespace loom {

const Tensor& cached_constant(const std::string& name, const Shape& shape, DType dtype, Device device,
                              const std::function<std::vector<double>()>& values) {
  static std::mutex mu;
  // Never destroyed (a static pointer, not a static map): device memory must not be freed after
  // the CUDA runtime is gone, and the entries stay reachable for leak checkers.
  static auto* cache = new std::map<std::tuple<std::string, Shape, int, std::string>, Tensor>();
  std::lock_guard<std::mutex> lock(mu);
  Tensor& slot = (*cache)[{name, shape, int(dtype), device.str()}];
  if (!slot.defined()) slot = Tensor::from_values(values(), shape, dtype, device);
  return slot;
}

}  // namespace loom
