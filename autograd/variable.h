// Reverse-mode autograd. A Variable is a Tensor plus what autograd needs: a
// requires_grad flag, an accumulated gradient (leaves), and for results of
// differentiable ops the Node that records how to send a gradient back to the
// op's inputs. Variables are handles: copies share the same gradient and node.
//
// The graph holds only what the gradient rules saved; an op's inputs are
// referenced through Edges (the input's Node, or the leaf itself), so
// intermediate values that no rule needs are freed as soon as the forward
// code drops them.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tensor/tensor.h"

namespace loom {

struct Node;

struct VariableImpl {
  Tensor data;
  Tensor grad;                    // accumulated gradient (leaves only)
  bool requires_grad = false;
  std::shared_ptr<Node> grad_fn;  // null for leaves
};

class Variable {
 public:
  Variable() = default;
  explicit Variable(Tensor data, bool requires_grad = false);

  bool defined() const { return impl_ != nullptr; }
  const Tensor& tensor() const;
  // Gradient accumulated by backward(); undefined when none has arrived (or after zero_grad()).
  const Tensor& grad() const;
  void set_grad(const Tensor& g) const;
  bool requires_grad() const { return impl_ && impl_->requires_grad; }
  // Only on leaves: marks a parameter as trainable (true) or frozen (false).
  Variable& set_requires_grad(bool on);
  bool is_leaf() const { return impl_ && !impl_->grad_fn; }
  const std::shared_ptr<Node>& grad_fn() const;
  void zero_grad() const;     // drops the accumulated gradient (no memory kept)
  Variable detach() const;    // same data, no history, requires_grad false

  // Backpropagates from this variable. grad_output defaults to 1 for a
  // one-element variable and is required otherwise (same shape, dtype, device).
  // Without retain_graph the graph's saved tensors are released afterwards and
  // a second backward through it throws.
  void backward(const Tensor& grad_output = Tensor(), bool retain_graph = false) const;

  // Tensor metadata, forwarded.
  const Shape& shape() const { return tensor().shape(); }
  int64_t dim() const { return tensor().dim(); }
  int64_t size(int64_t d) const { return tensor().size(d); }
  int64_t numel() const { return tensor().numel(); }
  DType dtype() const { return tensor().dtype(); }
  Device device() const { return tensor().device(); }
  std::string str() const;

  const std::shared_ptr<VariableImpl>& impl() const { return impl_; }

 private:
  std::shared_ptr<VariableImpl> impl_;
};

// Where a gradient for one input of a Node goes: the input's own Node (an
// intermediate result) or the input leaf's .grad. Shape, dtype and device are
// the input's, used by the engine to un-broadcast and check gradients.
struct Edge {
  std::shared_ptr<Node> node;
  std::shared_ptr<VariableImpl> leaf;
  Shape shape;
  DType dtype = DType::F32;
  Device device;
  bool needs_grad() const { return node != nullptr || leaf != nullptr; }
};

// A gradient rule: given dL/d(output) and which inputs need a gradient, returns
// dL/d(input i) for each input (undefined where not needed). A returned
// gradient may have the broadcast shape of the forward computation: the engine
// sums it down to the input's shape.
using BackwardFn = std::function<std::vector<Tensor>(const Tensor& grad_out, const std::vector<bool>& needs)>;

struct Node {
  const char* op = "";
  std::vector<Edge> inputs;
  BackwardFn backward;  // empty once released
};

// Thread-local switch for graph recording.
struct GradMode {
  static bool is_enabled();
  static void set_enabled(bool on);
};

// Disables graph recording for its lifetime (inference, optimizer updates).
class NoGradGuard {
 public:
  NoGradGuard() : prev_(GradMode::is_enabled()) { GradMode::set_enabled(false); }
  ~NoGradGuard() { GradMode::set_enabled(prev_); }
  NoGradGuard(const NoGradGuard&) = delete;
  NoGradGuard& operator=(const NoGradGuard&) = delete;

 private:
  bool prev_;
};

// Whether record() would create a node for `inputs`: grad mode on and some input requires a
// gradient (undefined inputs require none).
bool records_gradient(const std::vector<Variable>& inputs);

// Records `out` as the result of op `op` on `inputs`, with gradient rule `fn`.
// When !records_gradient(inputs), no node is created (and `fn` is dropped). Used by the op files
// in autograd/.
Variable record(const char* op, Tensor out, const std::vector<Variable>& inputs, BackwardFn fn);

}  // namespace loom
