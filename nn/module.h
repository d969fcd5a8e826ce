// loom::nn::Module: the base of every layer. A module owns named parameters
// (Variables, leaves), named buffers (plain Tensors that are saved but not
// trained) and named child modules, each in registration order. Names join
// into dotted paths ("transformer_blocks.0.attn1.to_q.weight"), which are the
// keys of every file loom reads and writes (SPEC §5).
//
// Ownership: modules are held by std::shared_ptr and are not copyable. A
// parameter is one Variable for the module's whole life: load_state_dict(),
// set_parameter_data() and to() replace the tensor *inside* it (through its
// VariableImpl), so optimizers and adapters holding the handle keep working.
//
// Iteration order (named_parameters, named_buffers, state_dict keys in a
// std::map aside): a module's own entries first, in registration order, then
// each child's, in the children's registration order (PyTorch's order).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "autograd/variable.h"

namespace loom::nn {

// A key whose stored shape differs from the model's.
struct ShapeMismatch {
  std::string key;
  Shape expected;  // the model's shape
  Shape got;       // the shape in the loaded dict
};

// What load_state_dict() did. Key lists are sorted.
struct LoadReport {
  std::vector<std::string> matched;      // copied into the model
  std::vector<std::string> missing;      // in the model, not in the dict (left unchanged)
  std::vector<std::string> unexpected;   // in the dict, not in the model (ignored)
  std::vector<ShapeMismatch> shape_mismatches;  // in both, shapes differ (left unchanged)
  bool ok() const { return missing.empty() && unexpected.empty() && shape_mismatches.empty(); }
  std::string summary() const;  // "12 matched, 1 missing, 0 unexpected, 0 shape mismatches"
};

class Module {
 public:
  Module() = default;
  virtual ~Module() = default;
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  // Short class name for messages and printing ("Linear", "GroupNorm", ...).
  virtual std::string type_name() const { return "Module"; }

  // ---- registration (names: non-empty, no '.', unique among this module's
  // parameters, buffers and children; violations throw loom::Error) ----------
  // Wraps `value` in a leaf Variable and returns it (the handle the layer keeps).
  Variable register_parameter(const std::string& name, Tensor value, bool requires_grad = true);
  void register_buffer(const std::string& name, Tensor value);
  template <class M>
  std::shared_ptr<M> register_module(const std::string& name, std::shared_ptr<M> module) {
    add_child(name, module);
    return module;
  }

  // Replaces an existing child (dotted path allowed: "attn1.to_q"); it keeps its
  // slot in the order. The owning module's on_replace_module() runs first and
  // may reject the replacement by throwing.
  void replace_module(const std::string& dotted_name, std::shared_ptr<Module> module);
  // Replaces the tensor inside an existing parameter (dotted path allowed), in
  // place: the Variable handle stays the same, its gradient is dropped. The new
  // tensor must have the parameter's shape; dtype and device are taken from it.
  void set_parameter_data(const std::string& dotted_name, const Tensor& value);

  // ---- lookup -------------------------------------------------------------------
  // Direct child by name; throws naming the module and the known children if absent.
  std::shared_ptr<Module> child(const std::string& name) const;
  // Direct child cast to M; throws if absent or of another type.
  template <class M>
  std::shared_ptr<M> child_as(const std::string& name) const {
    auto m = std::dynamic_pointer_cast<M>(child(name));
    if (!m) throw_wrong_child_type(name);
    return m;
  }
  // Descendant by dotted path ("attn1.to_q"); nullptr when absent (or for "").
  std::shared_ptr<Module> find_module(const std::string& dotted_name) const;
  // Parameter by dotted path; an undefined Variable when absent.
  Variable find_parameter(const std::string& dotted_name) const;
  // This module's own parameter / buffer by name; throws if absent.
  Variable parameter(const std::string& name) const;
  Tensor buffer(const std::string& name) const;

  // ---- iteration (recursive unless said otherwise) -----------------------------------
  // Each parameter once, even when shared between modules (first name wins).
  std::vector<std::pair<std::string, Variable>> named_parameters() const;
  std::vector<Variable> parameters() const;
  std::vector<std::pair<std::string, Tensor>> named_buffers() const;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> named_children() const;  // direct only
  // Every module of the subtree with its dotted path; not including this one
  // (whose path would be ""); pre-order.
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> named_modules() const;
  int64_t num_parameters(bool trainable_only = false) const;

  // ---- state --------------------------------------------------------------------------
  // Parameters and buffers by dotted name (a shared parameter under each of its
  // names). The tensors share storage with the module (clone() for a snapshot).
  std::map<std::string, Tensor> state_dict() const;
  // Copies each value into the existing parameter / buffer of that name (dtype
  // converted to the parameter's, device kept). Shapes must match exactly.
  // strict: any missing key, unexpected key or shape mismatch throws loom::Error
  // naming the first offending key and both shapes ("wrong base model?"), and
  // nothing is copied. Not strict: the matching entries are copied and the
  // report lists the rest.
  LoadReport load_state_dict(const std::map<std::string, Tensor>& dict, bool strict = true);

  // ---- modes --------------------------------------------------------------------------
  void train(bool on = true);  // this module and all descendants
  void eval() { train(false); }
  bool is_training() const { return training_; }
  // Marks every parameter of the subtree trainable (true) or frozen (false).
  void set_requires_grad(bool on);
  void zero_grad();  // drops every parameter's gradient

  // Moves / converts every parameter and buffer of the subtree in place
  // (parameters stay the same leaf Variables; gradients follow). to(DType)
  // converts floating-point tensors only (integer buffers keep their dtype).
  Module& to(Device device);
  Module& to(DType dtype);

 protected:
  // Called by replace_module() before the child `name` is swapped for `module`;
  // a layer keeping a typed pointer to that child updates it here (or throws to
  // refuse a module of the wrong kind).
  virtual void on_replace_module(const std::string& name, const std::shared_ptr<Module>& module);

 private:
  std::vector<std::pair<std::string, Variable>> params_;
  std::vector<std::pair<std::string, Tensor>> buffers_;
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> children_;
  bool training_ = true;

  void add_child(const std::string& name, std::shared_ptr<Module> module);
  void check_new_name(const std::string& name, const char* what) const;
  [[noreturn]] void throw_wrong_child_type(const std::string& name) const;
  // Owner of a dotted path's last component: ("a.b.c") -> (module a.b, "c").
  // Every parameter with its dotted name, shared ones under each name.
  std::vector<std::pair<std::string, Variable>> all_named_parameters() const;
  std::pair<Module*, std::string> resolve_owner(const std::string& dotted_name) const;
  // This module and every descendant, pre-order (for the recursive setters).
  std::vector<Module*> subtree();
};

// A module mapping one Variable to one Variable (Linear, norms, activations,
// Dropout, FeedForward): what Sequential can chain.
class UnaryModule : public Module {
 public:
  virtual Variable forward(const Variable& x) const = 0;
  Variable operator()(const Variable& x) const { return forward(x); }
};

// Children named "0", "1", ... in order (PyTorch's nn.ModuleList): the container
// behind names such as "transformer_blocks.0". No forward of its own.
class ModuleList : public Module {
 public:
  std::string type_name() const override { return "ModuleList"; }
  // Appends `module` as child str(size()) and returns it. (Use push_back, not
  // register_module, on a list: the indices are the names.)
  template <class M>
  std::shared_ptr<M> push_back(std::shared_ptr<M> module) {
    register_module(std::to_string(size_), module);
    ++size_;
    return module;
  }
  int64_t size() const { return size_; }
  std::shared_ptr<Module> at(int64_t i) const;  // throws when out of range
  template <class M>
  std::shared_ptr<M> at_as(int64_t i) const {
    at(i);  // range check
    return child_as<M>(std::to_string(i));
  }

 private:
  int64_t size_ = 0;
};

// Like ModuleList (children "0", "1", ...), but of UnaryModules, and its forward
// applies them in order (FeedForward's `net`).
class Sequential : public UnaryModule {
 public:
  std::string type_name() const override { return "Sequential"; }
  template <class M>
  std::shared_ptr<M> push_back(std::shared_ptr<M> module) {
    static_assert(std::is_base_of<UnaryModule, M>::value, "Sequential holds UnaryModules");
    return register_module(std::to_string(size_++), std::move(module));
  }
  int64_t size() const { return size_; }
  std::shared_ptr<UnaryModule> at(int64_t i) const;
  Variable forward(const Variable& x) const override;

 protected:
  void on_replace_module(const std::string& name, const std::shared_ptr<Module>& module) override;

 private:
  int64_t size_ = 0;
};

}  // namespace loom::nn
