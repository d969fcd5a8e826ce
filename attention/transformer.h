// diffusers' BasicTransformerBlock (norm_type "layer_norm") and
// Transformer2DModel with continuous input (SPEC §3), with diffusers'
// parameter names, so the weights of one `…attentions.N` block of a Stable
// Diffusion UNet load with a prefix.
//
// These live in attention/ rather than nn/ because they are built from the
// Attention layer, and dependencies point one way (nn ← attention).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "attention/attention.h"

namespace loom::attention {

struct BasicTransformerBlockOptions {
  int64_t dim = 0;  // = heads · dim_head
  int64_t heads = 8;
  int64_t dim_head = 64;
  double dropout = 0.0;
  std::optional<int64_t> cross_attention_dim;  // none: no attn2 (unless double_self_attention)
  std::string activation_fn = "geglu";         // geglu | gelu | gelu-approximate
  bool attention_bias = false;
  bool only_cross_attention = false;
  bool double_self_attention = false;
  bool upcast_attention = false;
  bool norm_elementwise_affine = true;
  double norm_eps = 1e-5;
  DType dtype = DType::F32;
  Device device = Device::cpu();
};

// x = attn1(norm1(x), ctx if only_cross_attention, mask) + x
// x = attn2(norm2(x), ctx, encoder_mask) + x      (when attn2 exists)
// x = ff(norm3(x)) + x
class BasicTransformerBlock : public nn::Module {
 public:
  explicit BasicTransformerBlock(const BasicTransformerBlockOptions& options, Generator& gen = default_generator());
  std::string type_name() const override { return "BasicTransformerBlock"; }
  // x [B, S, dim]; context [B, K, Cc]; masks are additive biases (see Attention).
  Variable forward(const Variable& x, const Variable& context = Variable(), const Tensor& attention_mask = Tensor(),
                   const Tensor& encoder_attention_mask = Tensor()) const;
  bool has_attn2() const { return has_attn2_; }

 private:
  BasicTransformerBlockOptions options_;
  bool has_attn2_ = false;
};

// config.json of a Transformer2DModel (diffusers names).
struct Transformer2DConfig {
  int64_t in_channels = 0;          // required
  int64_t num_attention_heads = 0;  // required
  int64_t attention_head_dim = 0;   // required
  std::optional<int64_t> out_channels;  // default in_channels
  int64_t num_layers = 1;
  std::optional<int64_t> cross_attention_dim;
  int64_t norm_num_groups = 32;
  bool use_linear_projection = false;
  bool attention_bias = false;
  bool only_cross_attention = false;
  bool double_self_attention = false;
  bool upcast_attention = false;
  std::string activation_fn = "geglu";
  bool norm_elementwise_affine = true;
  double norm_eps = 1e-5;
  double dropout = 0.0;
  std::vector<std::string> notes;  // keys that were ignored, one note each

  int64_t inner_dim() const { return num_attention_heads * attention_head_dim; }
  // Largest accepted value of any one size key, and of the model's parameter count (16 GB in f32).
  static constexpr int64_t kMaxConfigSize = int64_t(1) << 24;
  static constexpr int64_t kMaxParameters = int64_t(1) << 32;
  // Throws naming `source` and the key when a value is out of range (sizes, activation_fn,
  // norm_eps, dropout) or the model would exceed kMaxParameters; nothing is allocated.
  void check_values(const std::string& source) const;
  // An upper bound on the parameter count, computed without integer overflow.
  long double parameter_count_bound() const;
  // Parses a config.json text / file. A missing required key or a value of the wrong
  // type is an error naming the key (and the file); unknown keys are ignored with a note.
  static Transformer2DConfig from_json_text(const std::string& text, const std::string& source = "config.json");
  static Transformer2DConfig from_file(const std::string& path);
};

class Transformer2DModel : public nn::Module {
 public:
  explicit Transformer2DModel(const Transformer2DConfig& config, Generator& gen = default_generator(),
                              DType dtype = DType::F32, Device device = Device::cpu());
  std::string type_name() const override { return "Transformer2DModel"; }

  // x [B, C, H, W]; context [B, K, Cc] (or undefined); a 2-D mask is a keep-mask
  // (1 keep, 0 drop) turned into (1 − m)·(−10000), a 3-D one an additive bias.
  Variable forward(const Variable& x, const Variable& context = Variable(),
                   const Tensor& encoder_attention_mask = Tensor(), const Tensor& attention_mask = Tensor()) const;

  const Transformer2DConfig& config() const { return config_; }
  // Every Attention layer of the model with its dotted name ("transformer_blocks.0.attn1").
  std::vector<std::pair<std::string, std::shared_ptr<Attention>>> attention_layers() const;

 private:
  Transformer2DConfig config_;
};

}  // namespace loom::attention
