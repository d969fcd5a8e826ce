#include "autograd/op_cases.h"

#include <cmath>

namespace loom::cases {

namespace {

using Vars = std::vector<Variable>;

InputSpec any(Shape s) { return {std::move(s)}; }
InputSpec pos(Shape s) { return {std::move(s), Domain::Positive}; }
InputSpec nc(Shape s, Domain d = Domain::Any) { return {std::move(s), d, true}; }
InputSpec away(Shape s) { return {std::move(s), Domain::AwayFromZero}; }
InputSpec fixed(Shape s, Domain d = Domain::Any) { return {std::move(s), d, false, false}; }

std::vector<OpCase> build_cases() {
  std::vector<OpCase> c;
  auto add_case = [&](std::string op, std::string variant, std::vector<InputSpec> in,
                      std::function<Variable(const Vars&)> fn, bool bf16 = true) {
    c.push_back({std::move(op), std::move(variant), std::move(in), std::move(fn), bf16});
  };

  // ---- elementwise binary: same shape, broadcast, non-contiguous ----
  add_case("add", "same", {any({3, 4}), any({3, 4})}, [](const Vars& v) { return add(v[0], v[1]); });
  add_case("add", "broadcast", {any({2, 3, 4}), any({3, 1})}, [](const Vars& v) { return add(v[0], v[1]); });
  add_case("add", "noncontig", {nc({3, 5}), any({5})}, [](const Vars& v) { return v[0] + v[1]; });
  add_case("sub", "broadcast", {any({4, 1}), any({3})}, [](const Vars& v) { return sub(v[0], v[1]); });
  add_case("sub", "noncontig", {nc({4, 3}), nc({4, 3})}, [](const Vars& v) { return v[0] - v[1]; });
  add_case("mul", "broadcast", {any({2, 3, 4}), any({4})}, [](const Vars& v) { return mul(v[0], v[1]); });
  add_case("mul", "noncontig", {nc({3, 4}), any({3, 4})}, [](const Vars& v) { return v[0] * v[1]; });
  add_case("mul", "frozen_b", {any({3, 4}), fixed({3, 4})}, [](const Vars& v) { return v[0] * v[1]; });
  // a > 0: the gradient of b sums −g·a/b² over rows; with mixed signs that sum cancels and a bf16
  // run (tests/gpu) has no relative accuracy left to compare.
  add_case("div", "broadcast", {pos({3, 4}), pos({1, 4})}, [](const Vars& v) { return div(v[0], v[1]); });
  add_case("div", "noncontig", {nc({3, 4}), nc({3, 4}, Domain::Positive)}, [](const Vars& v) { return v[0] / v[1]; });

  // ---- elementwise unary and scalar forms ----
  add_case("neg", "same", {nc({3, 4})}, [](const Vars& v) { return -v[0]; });
  add_case("add_scalar", "same", {any({3, 4})}, [](const Vars& v) { return v[0] + 2.5; });
  add_case("mul_scalar", "same", {nc({3, 4})}, [](const Vars& v) { return 3.0 * v[0]; });
  add_case("rsub_scalar", "same", {any({5})}, [](const Vars& v) { return 1.5 - v[0]; });
  add_case("rdiv_scalar", "same", {pos({2, 3})}, [](const Vars& v) { return 2.0 / v[0]; });
  add_case("exp", "same", {nc({3, 4})}, [](const Vars& v) { return exp(v[0]); });
  add_case("log", "same", {pos({3, 4})}, [](const Vars& v) { return log(v[0]); });
  add_case("sqrt", "same", {nc({3, 4}, Domain::Positive)}, [](const Vars& v) { return sqrt(v[0]); });
  add_case("pow", "cube", {any({3, 4})}, [](const Vars& v) { return pow(v[0], 3.0); });
  add_case("pow", "fractional", {pos({3, 4})}, [](const Vars& v) { return pow(v[0], -0.5); });
  add_case("tanh", "same", {nc({3, 4})}, [](const Vars& v) { return tanh(v[0]); });
  add_case("sigmoid", "same", {any({3, 4})}, [](const Vars& v) { return sigmoid(v[0]); });
  add_case("relu", "same", {away({3, 4})}, [](const Vars& v) { return relu(v[0]); });
  add_case("gelu", "erf", {nc({3, 4})}, [](const Vars& v) { return gelu(v[0]); });
  add_case("gelu_tanh", "tanh", {any({3, 4})}, [](const Vars& v) { return gelu(v[0], true); });

  // ---- matrix products ----
  add_case("matmul", "2d", {any({3, 5}), any({5, 4})}, [](const Vars& v) { return matmul(v[0], v[1]); });
  add_case("matmul", "batched", {any({2, 3, 5}), any({2, 5, 4})}, [](const Vars& v) { return matmul(v[0], v[1]); });
  add_case("matmul", "broadcast", {any({2, 1, 3, 5}), any({3, 5, 2})},
           [](const Vars& v) { return matmul(v[0], v[1]); });
  add_case("matmul", "noncontig", {nc({3, 5}), nc({5, 4})}, [](const Vars& v) { return matmul(v[0], v[1]); });
  add_case("matmul", "vector", {any({5}), any({2, 5, 3})}, [](const Vars& v) { return matmul(v[0], v[1]); });
  add_case("linear", "bias", {any({2, 3, 5}), any({4, 5}), any({4})},
           [](const Vars& v) { return linear(v[0], v[1], v[2]); });
  add_case("linear", "nobias", {nc({3, 5}), any({4, 5})}, [](const Vars& v) { return linear(v[0], v[1]); });
  add_case("add_linear", "lora", {any({2, 3, 4}), any({2, 3, 2}), any({4, 2})},
           [](const Vars& v) { return add_linear(v[0], v[1], v[2], 0.75); });
  add_case("add_linear", "frozen_x_noncontig", {any({5, 3}), fixed({5, 6}), nc({3, 6})},
           [](const Vars& v) { return add_linear(v[0], v[1], v[2], -2.0); });
  // A fresh y accumulated in place; x a column slice read at its row stride (the shared LoRA path).
  add_case("add_linear", "into_fresh_y_sliced_x", {any({2, 3, 4}), any({2, 3, 5}), any({4, 2})},
           [](const Vars& v) { return add_linear(v[0] * 2.0, slice(v[1], -1, 1, 3), v[2], 0.75); });
  add_case("linear", "frozen_w", {any({3, 5}), fixed({4, 5}), any({4})},
           [](const Vars& v) { return linear(v[0], v[1], v[2]); });

  // ---- shape ----
  add_case("to_dtype", "roundtrip", {nc({3, 4})},
           [](const Vars& v) { return to_dtype(to_dtype(v[0], DType::F64), v[0].dtype()) * 1.5; });
  add_case("reshape", "same", {nc({3, 4})}, [](const Vars& v) { return reshape(v[0], {2, -1}) * 1.5; });
  add_case("permute", "same", {any({2, 3, 4})}, [](const Vars& v) { return permute(v[0], {2, 0, 1}) * 2.0; });
  add_case("transpose", "same", {any({2, 3, 4})},
           [](const Vars& v) { return matmul(transpose(v[0], 1, 2), v[0]); });
  add_case("expand", "same", {any({3, 1})}, [](const Vars& v) { return expand(v[0], {2, 3, 4}) * 2.0; });
  add_case("slice", "step", {any({5, 4})}, [](const Vars& v) { return slice(v[0], 0, 1, 5, 2) * 3.0; });
  add_case("slice", "negative", {nc({4, 6})}, [](const Vars& v) { return slice(v[0], -1, -4, -1) * 3.0; });
  add_case("unsqueeze", "same", {any({3, 4})}, [](const Vars& v) { return unsqueeze(v[0], 1) * v[0]; });
  add_case("squeeze", "same", {any({3, 1, 4})}, [](const Vars& v) { return squeeze(v[0], 1) * 2.0; });
  add_case("cat", "dim1", {any({2, 3}), nc({2, 2}), any({2, 1})},
           [](const Vars& v) { return cat({v[0], v[1], v[2]}, 1) * 2.0; });
  add_case("chunk", "uneven", {any({7, 2})}, [](const Vars& v) {
    const auto p = chunk(v[0], 3, 0);  // sizes 3, 3, 1
    return cat({p[0] * 2.0, p[1] * 3.0, p[2] * 4.0}, 0);
  });
  add_case("split", "sizes", {any({2, 6})}, [](const Vars& v) {
    const auto p = split(v[0], {1, 2, 3}, 1);
    return sum(p[0], {1}) + sum(p[1] * p[1], {1}) + sum(exp(p[2]), {1});
  });

  // ---- reductions and softmax ----
  add_case("sum", "all", {nc({3, 4})}, [](const Vars& v) { return sum(v[0]); });
  add_case("sum", "dims_keepdim", {any({2, 3, 4})}, [](const Vars& v) { return sum(v[0], {0, 2}, true); });
  add_case("sum", "dim", {any({2, 3, 4})}, [](const Vars& v) { return sum(v[0], {-1}); });
  add_case("mean", "all", {any({3, 4})}, [](const Vars& v) { return mean(v[0]); });
  add_case("mean", "dim_keepdim", {nc({3, 4})}, [](const Vars& v) { return mean(v[0], {1}, true); });
  add_case("softmax", "last", {any({2, 3, 5})}, [](const Vars& v) { return softmax(v[0], -1); });
  add_case("softmax", "middle", {nc({3, 4})}, [](const Vars& v) { return softmax(v[0], 0); });
  add_case("log_softmax", "last", {any({3, 5})}, [](const Vars& v) { return log_softmax(v[0], 1); });
  add_case("log_softmax", "first", {any({4, 3})}, [](const Vars& v) { return log_softmax(v[0], 0); });

  // ---- nn ----
  add_case("layer_norm", "affine", {any({2, 3, 5}), any({5}), any({5})},
           [](const Vars& v) { return layer_norm(v[0], {5}, v[1], v[2]); });
  add_case("layer_norm", "plain2d", {nc({3, 4})}, [](const Vars& v) { return layer_norm(v[0], {4}); });
  add_case("layer_norm", "multidim_frozen_bias", {any({2, 3, 4}), any({3, 4}), fixed({3, 4})},
           [](const Vars& v) { return layer_norm(v[0], {3, 4}, v[1], v[2]); });
  add_case("layer_norm", "weight_only", {any({3, 7}), any({7})},
           [](const Vars& v) { return layer_norm(v[0], {7}, v[1], Variable(), 1e-6); });
  // The composed references are compared on the GPU in f32 only: composed of bf16 ops they
  // round every intermediate (the fused op, checked in bf16, is what runs in bf16).
  // both outputs carry the gradient: s·0.5 + norm(s)
  add_case("add_layer_norm", "affine", {any({2, 3, 5}), nc({2, 3, 5}), any({5}), any({5})}, [](const Vars& v) {
    const auto [s, y] = add_layer_norm(v[0], v[1], {5}, v[2], v[3], 1e-6);
    return mul_scalar(s, 0.5) + y;
  });
  add_case("layer_norm_composed", "affine", {any({2, 3, 5}), any({5}), any({5})},
           [](const Vars& v) { return layer_norm_composed(v[0], {5}, v[1], v[2]); }, false);
  add_case("group_norm", "affine", {any({2, 6, 2, 2}), any({6}), any({6})},
           [](const Vars& v) { return group_norm(v[0], 3, v[1], v[2], 1e-6); });
  add_case("group_norm", "plain3d", {nc({2, 4, 3})}, [](const Vars& v) { return group_norm(v[0], 2); });
  add_case("group_norm", "frozen_weight", {any({1, 6, 5}), fixed({6}), any({6})},
           [](const Vars& v) { return group_norm(v[0], 2, v[1], v[2], 1e-6); });
  add_case("group_norm_silu", "shift", {any({2, 4, 3}), any({4}), any({4}), any({2, 4})},
           [](const Vars& v) { return group_norm_silu(v[0], 2, v[1], v[2], 1e-6, v[3]); });
  add_case("group_norm_composed", "affine", {any({2, 6, 2, 2}), any({6}), any({6})},
           [](const Vars& v) { return group_norm_composed(v[0], 3, v[1], v[2], 1e-6); });
  add_case("geglu", "erf", {any({3, 8})}, [](const Vars& v) { return geglu(v[0]); });
  add_case("geglu", "tanh", {nc({2, 3, 6})}, [](const Vars& v) { return geglu(v[0], true); });
  add_case("bias_residual", "broadcast", {any({2, 3, 5}), any({5}), nc({2, 3, 5})},
           [](const Vars& v) { return bias_residual(v[0], v[1], v[2]); });
  add_case("bias_residual", "nobias_frozen_residual", {any({4, 3}), fixed({4, 3})},
           [](const Vars& v) { return bias_residual(v[0], Variable(), v[1]); });
  add_case("bias_residual", "channels_nchw", {any({2, 3, 2, 5}), any({3}), nc({2, 3, 2, 5})},
           [](const Vars& v) { return bias_residual(v[0], v[1], v[2], 1); });
  add_case("geglu_composed", "erf", {any({3, 8})}, [](const Vars& v) { return geglu_composed(v[0]); });
  add_case("dropout", "train", {any({4, 5})}, [](const Vars& v) {
    Generator gen(1234);  // the same mask on every evaluation
    return dropout(v[0], 0.3, true, gen);
  });
  add_case("mse_loss", "both", {any({3, 4}), any({3, 4})}, [](const Vars& v) { return mse_loss(v[0], v[1]); });
  add_case("mse_loss", "target_fixed", {nc({3, 4}), fixed({3, 4})},
           [](const Vars& v) { return mse_loss(v[0], v[1]); });

  // ---- image ops (ops_conv.cpp): odd sizes, strides, padding, pointwise ----
  add_case("conv2d", "k3_pad1", {any({2, 3, 5, 4}), any({4, 3, 3, 3}), any({4})},
           [](const Vars& v) { return conv2d(v[0], v[1], v[2], 1, 1); });
  add_case("conv2d", "k3_stride2", {any({1, 2, 7, 6}), any({3, 2, 3, 3}), any({3})},
           [](const Vars& v) { return conv2d(v[0], v[1], v[2], 2, 1); });
  add_case("conv2d", "k2x3_nopad_nobias", {nc({2, 2, 4, 5}), any({3, 2, 2, 3})},
           [](const Vars& v) { return conv2d(v[0], v[1], Variable(), ops::Conv2dParams{1, 2, 0, 1}); });
  add_case("conv2d", "pointwise", {any({2, 3, 3, 2}), any({5, 3, 1, 1}), any({5})},
           [](const Vars& v) { return conv2d(v[0], v[1], v[2]); });
  add_case("conv2d", "frozen_w", {any({1, 2, 4, 4}), fixed({2, 2, 3, 3}), any({2})},
           [](const Vars& v) { return conv2d(v[0], v[1], v[2], 1, 1); });
  add_case("conv2d_after_group_norm_silu", "shift",
           {any({2, 4, 5, 3}), any({4}), any({4}), any({2, 4}), any({3, 4, 3, 3}), any({3})}, [](const Vars& v) {
             return conv2d_after_group_norm_silu(v[0], 2, v[1], v[2], 1e-6, v[3], v[4], v[5], {1, 1, 1, 1});
           });
  add_case("interpolate_nearest", "double", {any({2, 3, 2, 3})},
           [](const Vars& v) { return interpolate_nearest(v[0], 4, 6) * 1.5; });
  add_case("interpolate_nearest", "to_size", {any({1, 2, 3, 2})},
           [](const Vars& v) { return interpolate_nearest(v[0], 5, 3) * 1.5; });
  add_case("silu", "same", {any({3, 4})}, [](const Vars& v) { return silu(v[0]); });
  return c;
}

double draw(Generator& gen, Domain d) {
  switch (d) {
    case Domain::Any: return gen.normal();
    case Domain::Positive: return 0.5 + 1.5 * gen.uniform();
    case Domain::AwayFromZero: {
      const double m = 0.2 + 1.3 * gen.uniform();
      return gen.uniform() < 0.5 ? -m : m;
    }
  }
  return 0.0;
}

// A tensor with spec.shape whose memory is not laid out contiguously.
Tensor make_tensor(const InputSpec& spec, Generator& gen, DType dtype, Device device) {
  Shape stored = spec.shape;
  const bool transposed = spec.noncontiguous && stored.size() >= 2;
  const bool strided = spec.noncontiguous && stored.size() == 1;
  if (transposed) std::swap(stored[stored.size() - 1], stored[stored.size() - 2]);
  if (strided) stored[0] *= 2;
  std::vector<double> values(size_t(shape_numel(stored)));
  for (double& x : values) x = draw(gen, spec.domain);
  Tensor t = Tensor::from_values(values, stored, dtype, device);
  if (transposed) t = t.transpose(-1, -2);
  if (strided) t = t.slice(0, 0, stored[0], 2);
  return t;
}

}  // namespace

const std::vector<OpCase>& op_cases() {
  static const std::vector<OpCase> cases = build_cases();
  return cases;
}

std::vector<Variable> make_inputs(const OpCase& c, Generator& gen, DType dtype, Device device) {
  std::vector<Variable> vars;
  for (const InputSpec& spec : c.inputs) vars.emplace_back(make_tensor(spec, gen, dtype, device), spec.requires_grad);
  return vars;
}

}  // namespace loom::cases
