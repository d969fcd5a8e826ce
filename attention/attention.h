// The diffusers `Attention` layer (SPEC §1) with its processors.
//
// Parameter names are diffusers' exactly: to_q, to_k, to_v, to_out.0 (to_out.1
// is the dropout), add_k_proj, add_v_proj, group_norm, norm_cross, and the
// children of a processor that has parameters under `processor.` (Custom
// Diffusion, later).
//
// Shapes: x [B, S, query_dim] or [B, query_dim, H, W]; context [B, K, Cc];
// mask an additive bias of shape (B, K), (B, 1, K) or (B, Q, K) (batch 1
// broadcasts), whose last dim must equal the number of keys. The output has
// x's shape.
#pragma once

#include <cmath>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "attention/sdpa.h"
#include "nn/linear.h"
#include "nn/module.h"

namespace loom::attention {

struct AttentionOptions {
  int64_t query_dim = 0;                        // required
  std::optional<int64_t> cross_attention_dim;   // default: query_dim
  int64_t heads = 8;
  int64_t dim_head = 64;
  double dropout = 0.0;
  bool bias = false;        // of to_q, to_k, to_v
  bool out_bias = true;     // of to_out.0
  bool upcast_attention = false;  // no effect at f32 and above: statistics are always f32
  bool upcast_softmax = false;    // likewise
  bool scale_qk = true;           // scale = dim_head^-0.5, else 1
  bool only_cross_attention = false;
  std::optional<int64_t> added_kv_proj_dim;     // selects the added-KV processor
  std::optional<int64_t> norm_num_groups;       // group_norm over query_dim channels
  std::string cross_attention_norm;             // "", "layer_norm" or "group_norm"
  int64_t cross_attention_norm_num_groups = 32;
  bool residual_connection = false;
  double rescale_output_factor = 1.0;
  double eps = 1e-5;
  DType dtype = DType::F32;
  Device device = Device::cpu();
};

class Attention;

// How an Attention layer turns (x, context, mask) into its output. A processor
// is a Module: one with parameters is registered as the layer's `processor`
// child, so its keys read `…attn2.processor.to_k_custom_diffusion.weight`.
class AttentionProcessor : public nn::Module {
 public:
  virtual Variable process(const Attention& attn, const Variable& x, const Variable& context,
                           const Tensor& mask) const = 0;
};

// The classic processor (AttnProcessor); also slices when the layer has a slice size.
class DefaultProcessor : public AttentionProcessor {
 public:
  std::string type_name() const override { return "AttnProcessor"; }
  Variable process(const Attention& attn, const Variable& x, const Variable& context,
                   const Tensor& mask) const override;
};

// AttnAddedKVProcessor: keys/values = [add_k_proj(ctx); to_k(x)] (context first). As in
// diffusers, its input is always channels first: [B, C, H, W] or [B, C, L].
class AddedKVProcessor : public AttentionProcessor {
 public:
  std::string type_name() const override { return "AttnAddedKVProcessor"; }
  Variable process(const Attention& attn, const Variable& x, const Variable& context,
                   const Tensor& mask) const override;
};

class Attention : public nn::Module {
 public:
  explicit Attention(const AttentionOptions& options, Generator& gen = default_generator());
  std::string type_name() const override { return "Attention"; }

  // x [B, S, query_dim] or [B, query_dim, H, W]; context undefined for self-attention.
  Variable forward(const Variable& x, const Variable& context = Variable(), const Tensor& mask = Tensor()) const;

  // ---- configuration ----------------------------------------------------------
  const AttentionOptions& options() const { return options_; }
  int64_t inner_dim() const { return options_.heads * options_.dim_head; }
  int64_t cross_attention_dim() const { return *options_.cross_attention_dim; }
  double scale() const { return options_.scale_qk ? 1.0 / std::sqrt(double(options_.dim_head)) : 1.0; }
  bool is_added_kv() const { return options_.added_kv_proj_dim.has_value(); }

  // Per-layer backend override (SPEC §2); nullopt follows the process default.
  void set_backend(std::optional<BackendKind> backend) { backend_ = backend; }
  std::optional<BackendKind> backend() const { return backend_; }
  // Sliced attention over `slice_size` rows of batch·heads (0 turns slicing off).
  void set_attention_slice(int64_t slice_size);
  int64_t attention_slice() const { return slice_size_; }

  // The processor in use; a processor with parameters becomes the `processor` child.
  void set_processor(std::shared_ptr<AttentionProcessor> processor);
  const std::shared_ptr<AttentionProcessor>& processor() const { return processor_; }

  // ---- building blocks shared by processors --------------------------------------------
  // x [B, S, C] as is, or [B, C, H, W] -> [B, H·W, C]; checks C == query_dim.
  Variable to_sequence(const Variable& x) const;
  // y [B, S, C] back to the layout of an input of shape `input_shape`.
  static Variable from_sequence(const Variable& y, const Shape& input_shape);
  // Checks a context [B, K, channels] against the input batch.
  void check_context(const Variable& context, int64_t batch, int64_t channels) const;
  // residual_connection and rescale_output_factor of the classic processor.
  Variable finish_output(const Variable& out, const Variable& x) const;
  std::shared_ptr<nn::Linear> projection(const std::string& name) const;  // "to_q", "add_k_proj", "to_out.0", ...
  bool has_projection(const std::string& name) const;
  // [B, S, heads·dim_head] -> [B·heads, S, dim_head]
  Variable head_to_batch(const Variable& x) const;
  // [B·heads, S, dim_head] -> [B, S, heads·dim_head]
  Variable batch_to_head(const Variable& x) const;
  // group_norm over the channels of [B, S, C] (identity when the layer has none).
  Variable apply_group_norm(const Variable& x) const;
  // norm_cross on the context [B, K, Cc] (identity when the layer has none).
  Variable apply_norm_cross(const Variable& context) const;
  // Checks an additive mask against (batch, queries, keys) and shapes it [Bm, Qm, K].
  Tensor prepare_mask(const Tensor& mask, int64_t batch, int64_t queries, int64_t keys) const;
  // SDPA of head-split q [B·h, Q, d], k, v with this layer's scale, backend and slicing.
  Variable attend(const Variable& q, const Variable& k, const Variable& v, const Tensor& mask) const;
  // The same on the projections' own layout: q [B, Q, heads·d], k, v [B, K, heads·d] ->
  // [B, Q, heads·dv] (scaled_dot_product_attention_packed: no head split copies on CUDA flash).
  Variable attend_heads(const Variable& q, const Variable& k, const Variable& v, const Tensor& mask) const;
  // This layer's scale, heads, backend and slicing for a call with `mask`.
  SdpaOptions sdpa_options(const Tensor& mask) const;
  // to_out.0 then to_out.1 (dropout).
  Variable project_out(const Variable& x) const;

  // ---- keys and values of a fixed context ----------------------------------------------------
  // While on, the layer keeps the keys and values it projects from a context under no-grad and
  // reuses them when handed the same context tensor again (same storage, offset, shape, strides,
  // dtype): the prompt embeddings of a sampling loop are projected once, not at every step
  // (unet::sample_latents turns it on for its loop). The caller must not write into a context
  // while it is cached, nor change the projections' weights. Off (the default) empties the cache.
  // A cache, not state: callable on a const layer.
  void set_context_cache(bool on) const;
  bool context_cache() const { return context_cache_; }
  // {k, v} of `context` (the raw context, before norm_cross): `project()` on a miss, when the
  // cache is off, or while gradients are recorded.
  std::vector<Variable> context_projections(const Variable& context,
                                            const std::function<std::vector<Variable>()>& project) const;

 protected:
  void on_replace_module(const std::string& name, const std::shared_ptr<Module>& module) override;

 private:
  AttentionOptions options_;
  std::optional<BackendKind> backend_;
  int64_t slice_size_ = 0;
  std::shared_ptr<AttentionProcessor> processor_;
  mutable bool context_cache_ = false;
  mutable Tensor cached_context_;          // holds the storage: its address cannot be reused meanwhile
  mutable std::vector<Variable> cached_kv_;  // {k, v} of cached_context_
};

// A keep-mask (1 keep, 0 drop) as diffusers' Transformer2DModel turns it into a bias:
// (1 − m)·(−10000), in `dtype`.
Tensor keep_mask_to_bias(const Tensor& keep_mask, DType dtype);

}  // namespace loom::attention
