#include "autograd/variable.h"

#include <unordered_map>
#include <unordered_set>

#include "tensor/ops.h"

namespace loom {

namespace {
thread_local bool grad_enabled = true;
}

bool GradMode::is_enabled() { return grad_enabled; }
void GradMode::set_enabled(bool on) { grad_enabled = on; }

// ---- Variable ------------------------------------------------------------------

Variable::Variable(Tensor data, bool requires_grad) : impl_(std::make_shared<VariableImpl>()) {
  LOOM_CHECK(data.defined(), "Variable: undefined tensor");
  impl_->data = std::move(data);
  set_requires_grad(requires_grad);
}

const Tensor& Variable::tensor() const {
  LOOM_CHECK(defined(), "Variable: undefined variable");
  return impl_->data;
}

const Tensor& Variable::grad() const {
  LOOM_CHECK(defined(), "grad: undefined variable");
  return impl_->grad;
}

void Variable::set_grad(const Tensor& g) const {
  LOOM_CHECK(defined(), "set_grad: undefined variable");
  LOOM_CHECK(!g.defined() || (g.shape() == shape() && g.dtype() == dtype() && g.device() == device()),
             "set_grad: gradient ", g.str(), " does not match variable ", str());
  impl_->grad = g;
}

Variable& Variable::set_requires_grad(bool on) {
  LOOM_CHECK(defined(), "set_requires_grad: undefined variable");
  LOOM_CHECK(is_leaf(), "set_requires_grad: only leaves can change requires_grad (use detach())");
  LOOM_CHECK(!on || is_floating(dtype()), "set_requires_grad: ", dtype(), " tensors cannot require gradients");
  impl_->requires_grad = on;
  return *this;
}

const std::shared_ptr<Node>& Variable::grad_fn() const {
  LOOM_CHECK(defined(), "grad_fn: undefined variable");
  return impl_->grad_fn;
}

void Variable::zero_grad() const {
  if (impl_) impl_->grad = Tensor();
}

Variable Variable::detach() const { return Variable(tensor(), false); }

std::string Variable::str() const {
  if (!defined()) return "Variable(undefined)";
  return "Variable(" + tensor().str() + (requires_grad() ? ", requires_grad" : "") + ")";
}

// ---- recording -------------------------------------------------------------------

bool records_gradient(const std::vector<Variable>& inputs) {
  if (!GradMode::is_enabled()) return false;
  for (const Variable& v : inputs)
    if (v.requires_grad()) return true;
  return false;
}

Variable record(const char* op, Tensor out, const std::vector<Variable>& inputs, BackwardFn fn) {
  if (!records_gradient(inputs)) return Variable(std::move(out), false);

  auto node = std::make_shared<Node>();
  node->op = op;
  node->backward = std::move(fn);
  for (const Variable& v : inputs) {
    Edge e;
    if (v.requires_grad()) {
      if (v.is_leaf())
        e.leaf = v.impl();
      else
        e.node = v.grad_fn();
      e.shape = v.shape();
      e.dtype = v.dtype();
      e.device = v.device();
    }
    node->inputs.push_back(std::move(e));
  }
  Variable result(std::move(out), false);
  result.impl()->requires_grad = true;
  result.impl()->grad_fn = std::move(node);
  return result;
}

// ---- the backward engine ----------------------------------------------------------

namespace {

// Nodes reachable from root, each after every node that feeds it a gradient.
std::vector<Node*> topological_order(Node* root) {
  std::vector<Node*> post;
  std::unordered_set<Node*> seen{root};
  std::vector<std::pair<Node*, size_t>> stack{{root, 0}};
  while (!stack.empty()) {
    auto& [node, next] = stack.back();
    if (next < node->inputs.size()) {
      Node* child = node->inputs[next++].node.get();
      if (child && seen.insert(child).second) stack.push_back({child, 0});
    } else {
      post.push_back(node);
      stack.pop_back();
    }
  }
  return {post.rbegin(), post.rend()};
}

// The one place where gradients are un-broadcast and checked before accumulating.
Tensor fit_gradient(const char* op, size_t input, const Edge& edge, const Tensor& grad) {
  LOOM_CHECK(grad.defined(), "backward of ", op, ": no gradient returned for input ", input);
  LOOM_CHECK(grad.dtype() == edge.dtype && grad.device() == edge.device, "backward of ", op, ": gradient for input ",
             input, " is ", grad.str(), " but the input is ", edge.dtype, " on ", edge.device);
  LOOM_CHECK(broadcast_shapes(edge.shape, grad.shape(), op) == grad.shape(), "backward of ", op,
             ": gradient shape ", grad.shape(), " does not reduce to input ", input, " shape ", edge.shape);
  return ops::sum_to(grad, edge.shape);
}

void accumulate(Tensor& slot, const Tensor& g) { slot = slot.defined() ? ops::add(slot, g) : g; }

}  // namespace

void Variable::backward(const Tensor& grad_output, bool retain_graph) const {
  LOOM_CHECK(defined(), "backward: undefined variable");
  LOOM_CHECK(requires_grad(), "backward: ", str(), " does not require grad (no input of its graph does)");
  Tensor g = grad_output;
  if (!g.defined()) {
    LOOM_CHECK(numel() == 1, "backward: grad_output is required for a non-scalar output of shape ", shape());
    g = Tensor::ones(shape(), dtype(), device());
  }
  LOOM_CHECK(g.shape() == shape() && g.dtype() == dtype() && g.device() == device(), "backward: grad_output ",
             g.str(), " does not match output ", tensor().str());
  NoGradGuard no_grad;  // gradient rules are not recorded
  if (is_leaf()) {
    accumulate(impl_->grad, g.contiguous());
    return;
  }
  std::unordered_map<Node*, Tensor> pending{{impl_->grad_fn.get(), g}};
  for (Node* node : topological_order(impl_->grad_fn.get())) {
    auto it = pending.find(node);
    if (it == pending.end()) continue;
    const Tensor grad = std::move(it->second);
    pending.erase(it);
    LOOM_CHECK(node->backward, "backward: the graph through '", node->op,
               "' was already freed by an earlier backward (pass retain_graph = true to backward twice)");
    std::vector<bool> needs;
    for (const Edge& e : node->inputs) needs.push_back(e.needs_grad());
    const std::vector<Tensor> grads = node->backward(grad, needs);
    LOOM_CHECK(grads.size() == node->inputs.size(), "backward of ", node->op, ": ", grads.size(),
               " gradients for ", node->inputs.size(), " inputs");
    for (size_t i = 0; i < grads.size(); ++i) {
      const Edge& e = node->inputs[i];
      if (!e.needs_grad()) continue;
      const Tensor gi = fit_gradient(node->op, i, e, grads[i]);
      if (e.leaf)
        accumulate(e.leaf->grad, gi.contiguous());
      else
        accumulate(pending[e.node.get()], gi);
    }
    if (!retain_graph) node->backward = nullptr;
  }
}

}  // namespace loom
