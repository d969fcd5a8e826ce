// Linear and Conv1x1 layers, and the extension hook adapters (LoRA) attach to.
//
//   Linear:  x [..., in] -> y [..., out],  y = x·Wᵀ + b,  W (out, in), b (out)
//   Conv1x1: x [B, in, *spatial] -> y [B, out, *spatial], the same map applied to
//            every pixel's channel vector; W stored (out, in, 1, 1) as in PyTorch.
//
// Both initialise W and b from U(−1/√in, 1/√in) (PyTorch's default for
// nn.Linear and for a 1×1 nn.Conv2d), weight first, then bias.
#pragma once

#include <memory>
#include <vector>

#include "nn/module.h"
#include "tensor/random.h"

namespace loom::nn {

class Linear;

// A replacement for a Linear's forward, installed with Linear::set_extension()
// (LoRA and other adapters live in a later layer that nn does not know). It
// receives the base layer and the channel-last input x [..., in] and returns
// [..., out]; it typically calls base.base_forward(x) and adds its own term.
// For a Conv1x1 the extension sees the same channel-last view (see Conv1x1).
class LinearExtension {
 public:
  virtual ~LinearExtension() = default;
  virtual Variable forward(const Linear& base, const Variable& x) const = 0;
  // Optional: the outputs of several Linears on one input x, {linears[i]->forward(x)}, computed
  // together (LoRA reads x once for all their down-projections). Called by forward_shared_input
  // with linears[0] carrying this extension and every one of them carrying an extension; the
  // numbers must be those of the separate forwards. Returns an empty vector to decline: the
  // caller then runs each forward on its own.
  virtual std::vector<Variable> forward_shared(const std::vector<const Linear*>& linears,
                                               const Variable& x) const {
    (void)linears, (void)x;
    return {};
  }
};

class Linear : public UnaryModule {
 public:
  // Parameters `weight` (out, in) and, when `bias`, `bias` (out).
  Linear(int64_t in_features, int64_t out_features, bool bias = true, Generator& gen = default_generator(),
         DType dtype = DType::F32, Device device = Device::cpu());
  std::string type_name() const override { return "Linear"; }

  // x [..., in] -> [..., out]: the extension's forward when one is set, else base_forward.
  Variable forward(const Variable& x) const override;
  // x·Wᵀ + b, ignoring any extension.
  Variable base_forward(const Variable& x) const;

  // Installs (or, with nullptr, removes) the extension; one at a time (an
  // adapter set combines several adapters inside its own extension).
  void set_extension(std::shared_ptr<const LinearExtension> extension) { extension_ = std::move(extension); }
  const std::shared_ptr<const LinearExtension>& extension() const { return extension_; }

  // The parameter as stored: (out, in) for Linear, (out, in, 1, 1) for Conv1x1.
  const Variable& weight() const { return weight_; }
  // The weight as an (out, in) matrix (a differentiable view of weight()).
  Variable weight_matrix() const;
  // The bias (out); undefined when the layer has none.
  const Variable& bias() const { return bias_; }
  // weight_matrix() and bias() in `dtype`, as base_forward multiplies with them: weights kept in
  // another dtype than the activations (f32 masters under bf16 storage) are cast (tensor/precision.h).
  Variable weight_matrix_as(DType dtype) const;
  Variable bias_as(DType dtype) const;
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }

 protected:
  // For subclasses storing the weight in another shape of out·in elements.
  Linear(int64_t in_features, int64_t out_features, const Shape& weight_shape, bool bias, Generator& gen,
         DType dtype, Device device);
  // Checks that x [..., in] fits; `op` names the caller in the message.
  void check_input_features(const Variable& x, int64_t feature_dim, const char* op) const;

 private:
  int64_t in_ = 0, out_ = 0;
  Variable weight_, bias_;
  std::shared_ptr<const LinearExtension> extension_;
};

// {linears[i]->forward(x)}: the projections of several Linears of one input (an attention's
// to_q, to_k and to_v on its own input; to_k and to_v on a shared context), the same numbers as
// the separate forwards. The plain Linears among them (not a subclass such as Conv1x1) that carry
// an extension are offered to the first one's LinearExtension::forward_shared, which may compute
// them together; every other one runs its own forward.
std::vector<Variable> forward_shared_input(const std::vector<const Linear*>& linears, const Variable& x);

// A 1×1 convolution: x [B, in, *spatial] -> [B, out, *spatial] (usually
// [B, C, H, W]). Parameter `weight` (out, in, 1, 1), `bias` (out).
//
// It is a Linear (so adapters targeting Linear layers also reach it): forward
// moves the channels last, [B, *spatial, in], runs Linear::forward on that view
// (extension included: the extension sees x [B, *spatial, in] and should use
// base.weight_matrix(), not weight(), when it needs W), and moves the channels
// back. base_forward() keeps Linear's channel-last contract.
class Conv1x1 : public Linear {
 public:
  Conv1x1(int64_t in_channels, int64_t out_channels, bool bias = true, Generator& gen = default_generator(),
          DType dtype = DType::F32, Device device = Device::cpu());
  std::string type_name() const override { return "Conv1x1"; }
  Variable forward(const Variable& x) const override;  // [B, in, *] -> [B, out, *]
};

}  // namespace loom::nn
