// LoRA adapters (SPEC §4) over any model whose projections are nn::Linear
// (Conv1x1 included) or nn::Conv2d (kohya's LoCon / PEFT's Conv2d LoRA).
//
// Every adapted projection computes, at one choke point (lora_forward):
//
//   y = W·x + b + Σ_adapters w·s·B·(A·x)      A = down (r, in), B = up (out, r)
//
// with s = alpha/r (alpha/√r with rsLoRA; 1 when no alpha is given) and w the
// user weight of the adapter (times a per-block weight when one matches). An
// adapter with effective weight 0, or disabled, is skipped: the output is then
// the base output bit for bit. The base weight is never modified in place,
// except by fuse(), which keeps an untouched copy that unfuse() restores.
//
// On a k×k Conv2d (W (out, in, kh, kw)) the adapter is A = down (r, in, kh, kw),
// a conv with the base's stride and padding, then B = up (out, r, 1, 1), a 1×1
// conv: y = conv(x, W) + b + Σ w·s·conv1x1(conv(x, A), B) (lora_conv_forward).
//
// LyCORIS modules (LoHa, LoKr) and DoRA (a magnitude on any module) go through the same
// choke point: their change of the weight W' − W is built densely (adapters/lycoris.h) and
// added as w·x·(W' − W)ᵀ (a conv with it on a Conv2d); see lycoris.h for the formulas. With
// DoRA this makes weight w the blend W + w·(W' − W): w = 1 is PEFT's W', w = 0 the base.
//
// Parameter names of an adapter are "<module path>.lora_A.weight" and
// "<module path>.lora_B.weight" (module path as in the model's
// named_parameters, e.g. "transformer_blocks.0.attn1.to_q"); LoHa / LoKr factors
// are "<module path>.<LyCORIS name>" (hada_w1_a, lokr_w1, ...), a DoRA magnitude
// "<module path>.lora_magnitude_vector" or ".dora_scale" (the name it was read as).
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "nn/conv.h"
#include "nn/linear.h"
#include "nn/module.h"
#include "tensor/random.h"

namespace loom::adapters {

// The default LoRA targets of an attention layer.
const std::vector<std::string>& default_lora_targets();  // to_q, to_k, to_v, to_out.0

struct LoraConfig {
  int64_t rank = 4;
  std::optional<double> alpha;  // network_alpha / lora_alpha; none: scale 1
  bool use_rslora = false;      // s = alpha / √r
  // A module is adapted when its path equals a target or ends with "." + target.
  std::vector<std::string> targets = default_lora_targets();
  // Per-module overrides, keyed like targets (the longest matching key wins).
  std::map<std::string, int64_t> rank_pattern;
  std::map<std::string, double> alpha_pattern;
};

// What an adapted module holds: a LoRA (down, up), or one of LyCORIS' LoHa / LoKr (factors).
enum class ModuleKind { LoRA, LoHa, LoKr };
const char* module_kind_name(ModuleKind kind);  // "LoRA", "LoHa", "LoKr"

// How DoRA normalises W + s·ΔW before the magnitude multiplies it: one norm per output row
// (PEFT's lora_magnitude_vector, LyCORIS' dora_scale of shape (out, 1, …)) or one per input
// channel, over the output rows and the kernel (LyCORIS' dora_scale of shape (1, in, …)).
enum class DoraNorm { PerOutput, PerInput };

// One adapted projection of one adapter.
struct LoraModule {
  ModuleKind kind = ModuleKind::LoRA;
  Variable down;  // LoRA: A (r, in); on a Conv2d (r, in, kh, kw)
  Variable up;    // LoRA: B (out, r); on a Conv2d (out, r, 1, 1)
  // LoHa / LoKr factors by their LyCORIS names (adapters/lycoris.h lists them and their shapes).
  std::map<std::string, Variable> factors;
  // DoRA (undefined: none): the magnitude m, (out) values for DoraNorm::PerOutput, (in) for
  // PerInput, stored in the shape the file has.
  Variable magnitude;
  DoraNorm dora_norm = DoraNorm::PerOutput;
  double dora_eps = 0.0;  // added to the norm: 0 for PEFT; LyCORIS adds its dtype's machine epsilon
  std::string magnitude_name = "lora_magnitude_vector";  // the key suffix it was read as
  // LoRA: r. LoHa: the rank of hada_w1_b. LoKr: the rank of lokr_w1_a (else lokr_w2_a); 0 when
  // both lokr_w1 and lokr_w2 are full matrices (then the scale is 1, as LyCORIS has it).
  int64_t rank = 0;
  std::optional<double> alpha;
  bool use_rslora = false;
  // LoRA: alpha/r, alpha/√r, or 1 without alpha. LoHa / LoKr as LyCORIS: alpha/r, with a missing
  // or zero alpha meaning alpha = r (scale 1), and scale 1 for a LoKr without factors.
  double scale() const;
  // A plain LoRA (no DoRA): the low-rank path of the choke point.
  bool plain() const { return kind == ModuleKind::LoRA && !magnitude.defined(); }
};

class LoraAdapter {
 public:
  explicit LoraAdapter(std::string name) : name_(std::move(name)) {}
  const std::string& name() const { return name_; }

  const std::map<std::string, LoraModule>& modules() const { return modules_; }
  LoraModule& module(const std::string& path);  // throws naming the path when absent
  void add_module(const std::string& path, LoraModule m) { modules_[path] = std::move(m); }

  std::vector<std::pair<std::string, Variable>> named_parameters() const;
  std::vector<Variable> parameters() const;

  double weight() const { return weight_; }
  bool enabled() const { return enabled_; }
  // The weight applied to `path`: weight() × the block weight of the longest pattern found
  // in the path as whole dotted components.
  double effective_weight(const std::string& path) const;

 private:
  friend class LoraSet;
  std::string name_;
  std::map<std::string, LoraModule> modules_;
  double weight_ = 1.0;
  std::map<std::string, double> block_weights_;  // pattern (substring of the path) -> weight
  bool enabled_ = true;
};

// y = base(x) + Σ w·s·B(A·x) over the given adapters of one projection: the choke point.
Variable lora_forward(const nn::Linear& base, const Variable& x, const std::vector<const LoraAdapter*>& adapters,
                      const std::string& path);
// lora_forward of several projections on one input x (bases[i] at paths[i] with its adapters[i],
// each list in the set's order), with the same numbers: where one adapter is a plain LoRA with a
// non-zero weight on two or more of them (an attention's to_q, to_k and to_v on its own input), their
// down-projections run as ONE GEMM with the stacked down weight [Σr, in], reading x once, and its
// [..., Σr] result is split into the views the up GEMMs read; the backward then runs one dA and
// one dx GEMM for all of them. Everything else (a LoHa / LoKr / DoRA module, a disabled adapter,
// weight 0, an adapter on only one of them) goes as in lora_forward. `shared_gemms`, when given,
// is increased by the number of shared down GEMMs run.
std::vector<Variable> lora_forward_shared(const std::vector<const nn::Linear*>& bases, const Variable& x,
                                          const std::vector<std::vector<const LoraAdapter*>>& adapters,
                                          const std::vector<std::string>& paths, int64_t* shared_gemms = nullptr);
// The same for a Conv2d: y = conv(x, W) + b + Σ w·s·conv1x1(conv(x, A), B) (LoCon); without b when
// !with_bias (the caller adds it in a later pass: nn::Conv2d::forward_without_bias).
Variable lora_conv_forward(const nn::Conv2d& base, const Variable& x, const std::vector<const LoraAdapter*>& adapters,
                           const std::string& path, bool with_bias = true);

// The adapters attached to one model (a model holds one LoraSet at a time; a set holds
// any number of adapters). Attaching installs one LinearExtension per adapted
// projection; detaching (remove / destruction) restores plain Linears.
class LoraSet {
 public:
  explicit LoraSet(std::shared_ptr<nn::Module> model);
  ~LoraSet();
  LoraSet(const LoraSet&) = delete;
  LoraSet& operator=(const LoraSet&) = delete;

  // New adapter on every Linear (and Conv2d) matching config.targets: A ~ N(0, 1/r), B = 0, in the
  // base weight's dtype and device. Freezes the base model. Throws when nothing matches.
  LoraAdapter& add(const std::string& name, const LoraConfig& config, Generator& gen = default_generator());
  // An adapter from given weights (e.g. a file): path -> LoraModule. Every path must be a
  // Linear or Conv2d of the model and the shapes must fit it; errors name the path and both shapes.
  LoraAdapter& add_from_weights(const std::string& name, std::map<std::string, LoraModule> modules);

  bool has(const std::string& name) const;
  LoraAdapter& adapter(const std::string& name);
  std::vector<std::string> names() const;
  void remove(const std::string& name);

  void set_weight(const std::string& name, double weight);
  // Weight for the projections whose path contains `pattern` as whole dotted components
  // ("attn2", "transformer_blocks.0" — which does not match transformer_blocks.10).
  void set_block_weight(const std::string& name, const std::string& pattern, double weight);
  void enable(const std::string& name, bool on = true);
  void disable(const std::string& name) { enable(name, false); }

  // W' = W + Σ w·s·B·A in f64 from an untouched copy of W; the adapter terms are then
  // skipped at run time. unfuse() restores the copy bit for bit.
  void fuse();
  void unfuse();
  bool fused() const { return fused_; }

  // Whether the projections of one input are computed together (lora_forward_shared, asked for by
  // nn::forward_shared_input); on by default. Off, each projection runs lora_forward on its own:
  // the same numbers, the reference the shared path is tested against.
  void set_share_inputs(bool on) { share_inputs_ = on; }
  bool share_inputs() const { return share_inputs_; }
  // How many shared down GEMMs this set's forwards have run so far (a diagnostic for tests and
  // benchmarks: nonzero once batching took place).
  int64_t shared_down_gemms() const { return shared_down_gemms_.load(); }

  // Trainable parameters of all enabled adapters, named "<adapter>.<path>.lora_A.weight".
  std::vector<std::pair<std::string, Variable>> trainable_parameters() const;
  nn::Module& model() { return *model_; }

 private:
  std::shared_ptr<nn::Module> model_;
  std::vector<std::unique_ptr<LoraAdapter>> adapters_;
  std::map<std::string, std::shared_ptr<nn::Linear>> linears_;  // every Linear of the model, by path
  std::map<std::string, std::shared_ptr<nn::Conv2d>> convs_;    // every Conv2d of the model, by path
  std::map<std::string, Tensor> fused_base_;                    // path -> untouched W while fused
  bool fused_ = false;
  bool share_inputs_ = true;
  mutable std::atomic<int64_t> shared_down_gemms_{0};

  LoraAdapter& insert(std::unique_ptr<LoraAdapter> adapter);
  // A LoHa / LoKr / DoRA module checked against the model's weight at `path` and moved to its
  // device (f32 masters over bf16 / f16 weights).
  LoraModule checked_lycoris_module(const std::string& name, const std::string& path, LoraModule m) const;
  void refresh_extensions();  // (re)installs the extension of every projection with adapters
  std::vector<const LoraAdapter*> adapters_at(const std::string& path) const;
  // Σ w·s·B·A in f64 over the enabled adapters at `path`, shaped like `base`; undefined when none.
  Tensor fused_delta(const std::string& path, const Tensor& base) const;
  void check_not_fused(const char* op) const;
};

}  // namespace loom::adapters
