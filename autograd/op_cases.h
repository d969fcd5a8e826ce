// The op catalogue: every differentiable op described once, as a function
// of its input Variables plus the shapes and value domains of those inputs.
// tests/autograd/test_gradcheck.cpp and `loom gradcheck` run each case through the f64 gradient check;
// tests/gpu/test_gpu_ops.cpp runs each on CUDA and compares with the CPU in f64.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "autograd/ops.h"
#include "tensor/random.h"

namespace loom::cases {

enum class Domain {
  Any,           // standard normal
  Positive,      // uniform in [0.5, 2]
  AwayFromZero,  // |x| in [0.2, 1.5] with a random sign (for kinks at 0)
};

struct InputSpec {
  Shape shape;
  Domain domain = Domain::Any;
  bool noncontiguous = false;  // built as a transposed (or strided) view
  bool requires_grad = true;
};

struct OpCase {
  std::string op;       // the op's name in autograd/GRADIENTS.md
  std::string variant;  // what this case exercises ("broadcast", "noncontig", ...)
  std::vector<InputSpec> inputs;
  std::function<Variable(const std::vector<Variable>&)> fn;
  bool bf16 = true;  // also compared on the GPU in bf16 (1e-2)
  std::string name() const { return op + "_" + variant; }
};

const std::vector<OpCase>& op_cases();

// Fresh random inputs for a case; identical values for identical generator state,
// whatever dtype and device are asked for (values drawn in f64 on the host).
std::vector<Variable> make_inputs(const OpCase& c, Generator& gen, DType dtype, Device device);

}  // namespace loom::cases
