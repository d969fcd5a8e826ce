#include "attention/transformer.h"

#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <tuple>

#include "autograd/ops.h"
#include "io/config_json.h"
#include "nn/feedforward.h"
#include "nn/norm.h"

namespace loom::attention {

// ---- BasicTransformerBlock --------------------------------------------------------------

BasicTransformerBlock::BasicTransformerBlock(const BasicTransformerBlockOptions& options, Generator& gen)
    : options_(options) {
  const auto& o = options_;
  LOOM_CHECK(o.dim > 0 && o.dim == o.heads * o.dim_head, "BasicTransformerBlock: dim ", o.dim,
             " must equal heads·dim_head = ", o.heads, "·", o.dim_head);
  auto attention = [&](std::optional<int64_t> cross) {
    AttentionOptions a;
    a.query_dim = o.dim, a.heads = o.heads, a.dim_head = o.dim_head, a.dropout = o.dropout;
    a.bias = o.attention_bias, a.upcast_attention = o.upcast_attention, a.cross_attention_dim = cross;
    a.dtype = o.dtype, a.device = o.device;
    return std::make_shared<Attention>(a, gen);
  };
  auto layer_norm = [&] {
    return std::make_shared<nn::LayerNorm>(o.dim, o.norm_eps, o.norm_elementwise_affine, o.dtype, o.device);
  };
  LOOM_CHECK(!o.only_cross_attention || o.cross_attention_dim,
             "BasicTransformerBlock: only_cross_attention needs cross_attention_dim");
  register_module("norm1", layer_norm());
  register_module("attn1", attention(o.only_cross_attention ? o.cross_attention_dim : std::nullopt));
  has_attn2_ = o.cross_attention_dim.has_value() || o.double_self_attention;
  if (has_attn2_) {
    register_module("norm2", layer_norm());
    register_module("attn2", attention(o.double_self_attention ? std::nullopt : o.cross_attention_dim));
  }
  register_module("norm3", layer_norm());
  nn::FeedForwardOptions ff;
  ff.dim = o.dim, ff.activation = o.activation_fn, ff.dropout = o.dropout;
  register_module("ff", std::make_shared<nn::FeedForward>(ff, gen, o.dtype, o.device));
}

Variable BasicTransformerBlock::forward(const Variable& x, const Variable& context, const Tensor& attention_mask,
                                        const Tensor& encoder_attention_mask) const {
  // Each residual add and the norm after it run as one pass (LayerNorm::forward_after_add):
  // h = a + h is written once and normalised from registers, not added, stored and read again.
  auto add_then_norm = [&](const char* norm, const Variable& a, const Variable& h) {
    return child_as<nn::LayerNorm>(norm)->forward_after_add(a, h);  // {a + h, norm(a + h)}
  };
  const Variable self_context = options_.only_cross_attention ? context : Variable();
  const Variable a1 = child_as<Attention>("attn1")->forward(child_as<nn::LayerNorm>("norm1")->forward(x), self_context,
                                                            attention_mask);
  auto [h, normed] = add_then_norm(has_attn2_ ? "norm2" : "norm3", a1, x);
  if (has_attn2_) {
    const Variable ctx = options_.double_self_attention ? Variable() : context;
    const Variable a2 = child_as<Attention>("attn2")->forward(normed, ctx, encoder_attention_mask);
    std::tie(h, normed) = add_then_norm("norm3", a2, h);
  }
  return child_as<nn::UnaryModule>("ff")->forward(normed) + h;
}

// ---- Transformer2DConfig -------------------------------------------------------------------

Transformer2DConfig Transformer2DConfig::from_json_text(const std::string& text, const std::string& source) {
  const io::config_json::json j = io::config_json::parse_object(text, source);
  const io::config_json::Reader r{j, source};
  Transformer2DConfig c;
  c.in_channels = r.required_positive("in_channels");
  c.num_attention_heads = r.required_positive("num_attention_heads");
  c.attention_head_dim = r.required_positive("attention_head_dim");
  r.opt("out_channels", c.out_channels);
  r.opt("num_layers", c.num_layers);
  r.opt("cross_attention_dim", c.cross_attention_dim);
  r.opt("norm_num_groups", c.norm_num_groups);
  r.opt("use_linear_projection", c.use_linear_projection);
  r.opt("attention_bias", c.attention_bias);
  r.opt("only_cross_attention", c.only_cross_attention);
  r.opt("double_self_attention", c.double_self_attention);
  r.opt("upcast_attention", c.upcast_attention);
  r.opt("activation_fn", c.activation_fn);
  r.opt("norm_elementwise_affine", c.norm_elementwise_affine);
  r.opt("norm_eps", c.norm_eps);
  r.opt("dropout", c.dropout);
  std::string norm_type = "layer_norm";
  r.opt("norm_type", norm_type);
  LOOM_CHECK(norm_type == "layer_norm", source, ": norm_type '", norm_type, "' is not supported (layer_norm only)");
  LOOM_CHECK(c.num_layers >= 1, source, ": num_layers must be ≥ 1, got ", c.num_layers);
  LOOM_CHECK(c.norm_num_groups > 0, source, ": key 'norm_num_groups' must be positive, got ", c.norm_num_groups);
  LOOM_CHECK(c.in_channels % c.norm_num_groups == 0, source, ": in_channels ",
             c.in_channels, " is not divisible by norm_num_groups ", c.norm_num_groups);
  c.check_values(source);

  static const std::set<std::string> known = {
      "in_channels", "num_attention_heads", "attention_head_dim", "out_channels", "num_layers",
      "cross_attention_dim", "norm_num_groups", "use_linear_projection", "attention_bias", "only_cross_attention",
      "double_self_attention", "upcast_attention", "activation_fn", "norm_elementwise_affine", "norm_eps",
      "dropout", "norm_type"};
  io::config_json::note_unknown_keys(j, known, {}, source, c.notes);
  return c;
}

void Transformer2DConfig::check_values(const std::string& source) const {
  LOOM_CHECK(!out_channels || *out_channels > 0, source, ": key 'out_channels' must be positive, got ", *out_channels);
  LOOM_CHECK(!cross_attention_dim || *cross_attention_dim > 0, source,
             ": key 'cross_attention_dim' must be positive (or null for no cross-attention), got ", *cross_attention_dim);
  LOOM_CHECK(activation_fn == "geglu" || activation_fn == "gelu" || activation_fn == "gelu-approximate", source,
             ": key 'activation_fn' is '", activation_fn, "' (supported: geglu, gelu, gelu-approximate)");
  LOOM_CHECK(std::isfinite(norm_eps) && norm_eps > 0, source, ": key 'norm_eps' must be a positive number, got ",
             norm_eps);
  LOOM_CHECK(std::isfinite(dropout) && dropout >= 0 && dropout < 1, source,
             ": key 'dropout' must be in [0, 1), got ", dropout);
  // Sizes: each one bounded first, then the parameter count in long double (no int64 overflow),
  // so that a nonsense config is refused before anything is allocated.
  const std::pair<const char*, int64_t> sizes[] = {
      {"in_channels", in_channels}, {"num_attention_heads", num_attention_heads},
      {"attention_head_dim", attention_head_dim}, {"out_channels", out_channels.value_or(1)},
      {"cross_attention_dim", cross_attention_dim.value_or(1)}, {"num_layers", num_layers}};
  for (const auto& [key, v] : sizes)
    LOOM_CHECK(v <= kMaxConfigSize, source, ": key '", key, "' is ", v, ", larger than loom accepts (", kMaxConfigSize,
               ")");
  const long double params = parameter_count_bound();
  LOOM_CHECK(params <= (long double)kMaxParameters, source, ": the model would hold about ", double(params),
             " parameters (", double(params * 4 / 1e9), " GB in f32; num_attention_heads ", num_attention_heads,
             " x attention_head_dim ", attention_head_dim, " = inner dim ", double((long double)num_attention_heads *
             attention_head_dim), ", num_layers ", num_layers, "), more than loom's limit of ", double(kMaxParameters),
             ": check num_attention_heads and attention_head_dim");
}

long double Transformer2DConfig::parameter_count_bound() const {
  // Per block (inner dim d, context width k): norms 6d, attn1 4d² + 4d, attn2 2d² + 2dk + 4d,
  // GEGLU feed-forward 12d² + 9d; around the blocks: norm 2C, proj_in Cd + d, proj_out d·out + out.
  const long double d = (long double)num_attention_heads * (long double)attention_head_dim;
  const long double ctx = cross_attention_dim ? (long double)*cross_attention_dim : d;
  const long double C = (long double)in_channels, out = (long double)out_channels.value_or(in_channels);
  const long double block = 18 * d * d + 2 * d * ctx + 23 * d;
  return (long double)num_layers * block + 2 * C + C * d + d + d * out + out;
}

Transformer2DConfig Transformer2DConfig::from_file(const std::string& path) {
  struct stat st {};
  LOOM_CHECK(::stat(path.c_str(), &st) == 0, path, ": cannot open the config file (", std::strerror(errno), ")");
  LOOM_CHECK(!S_ISDIR(st.st_mode), path, ": is a directory, not a config file (expected a JSON file)");
  std::ifstream in(path);
  LOOM_CHECK(in.good(), path, ": cannot open the config file");
  std::stringstream ss;
  ss << in.rdbuf();
  return from_json_text(ss.str(), path);
}

// ---- Transformer2DModel ----------------------------------------------------------------------

Transformer2DModel::Transformer2DModel(const Transformer2DConfig& config, Generator& gen, DType dtype, Device device)
    : config_(config) {
  const auto& c = config_;
  const int64_t inner = c.inner_dim(), out_channels = c.out_channels.value_or(c.in_channels);
  register_module("norm", std::make_shared<nn::GroupNorm>(c.norm_num_groups, c.in_channels, 1e-6, true, dtype, device));
  if (c.use_linear_projection)
    register_module("proj_in", std::make_shared<nn::Linear>(c.in_channels, inner, true, gen, dtype, device));
  else
    register_module("proj_in", std::make_shared<nn::Conv1x1>(c.in_channels, inner, true, gen, dtype, device));
  auto blocks = std::make_shared<nn::ModuleList>();
  for (int64_t i = 0; i < c.num_layers; ++i) {
    BasicTransformerBlockOptions b;
    b.dim = inner, b.heads = c.num_attention_heads, b.dim_head = c.attention_head_dim, b.dropout = c.dropout;
    b.cross_attention_dim = c.cross_attention_dim, b.activation_fn = c.activation_fn;
    b.attention_bias = c.attention_bias, b.only_cross_attention = c.only_cross_attention;
    b.double_self_attention = c.double_self_attention, b.upcast_attention = c.upcast_attention;
    b.norm_elementwise_affine = c.norm_elementwise_affine, b.norm_eps = c.norm_eps;
    b.dtype = dtype, b.device = device;
    blocks->push_back(std::make_shared<BasicTransformerBlock>(b, gen));
  }
  register_module("transformer_blocks", blocks);
  if (c.use_linear_projection)
    register_module("proj_out", std::make_shared<nn::Linear>(inner, out_channels, true, gen, dtype, device));
  else
    register_module("proj_out", std::make_shared<nn::Conv1x1>(inner, out_channels, true, gen, dtype, device));
}

namespace {
// 2-D keep-mask -> (B, 1, K) additive bias; 3-D masks are biases already.
Tensor mask_as_bias(const Tensor& mask, DType dtype) {
  if (!mask.defined() || mask.dim() != 2) return mask;
  return keep_mask_to_bias(mask, dtype).unsqueeze(1);
}
}  // namespace

Variable Transformer2DModel::forward(const Variable& x, const Variable& context, const Tensor& encoder_attention_mask,
                                     const Tensor& attention_mask) const {
  LOOM_CHECK(x.defined() && x.dim() == 4, "Transformer2DModel: input must be [B, C, H, W], got ",
             x.defined() ? x.shape() : Shape{});
  LOOM_CHECK(x.size(1) == config_.in_channels, "Transformer2DModel: input ", x.shape(), " has ", x.size(1),
             " channels, in_channels is ", config_.in_channels);
  const int64_t b = x.size(0), height = x.size(2), width = x.size(3), inner = config_.inner_dim();
  const Tensor enc_bias = mask_as_bias(encoder_attention_mask, x.dtype());
  const Tensor self_bias = mask_as_bias(attention_mask, x.dtype());
  Variable h = child_as<nn::UnaryModule>("norm")->forward(x);
  const auto proj_in = child_as<nn::UnaryModule>("proj_in");
  if (config_.use_linear_projection) {  // [B, C, H, W] -> [B, H·W, C] -> Linear
    h = proj_in->forward(reshape(permute(h, {0, 2, 3, 1}), {b, height * width, -1}));
  } else {  // 1×1 conv, then [B, inner, H, W] -> [B, H·W, inner]
    h = reshape(permute(proj_in->forward(h), {0, 2, 3, 1}), {b, height * width, inner});
  }
  const auto blocks = child_as<nn::ModuleList>("transformer_blocks");
  for (int64_t i = 0; i < blocks->size(); ++i)
    h = blocks->at_as<BasicTransformerBlock>(i)->forward(h, context, self_bias, enc_bias);
  const auto proj_out = child_as<nn::UnaryModule>("proj_out");
  if (config_.use_linear_projection) {  // Linear, then [B, H·W, C] -> [B, C, H, W]
    h = permute(reshape(proj_out->forward(h), {b, height, width, -1}), {0, 3, 1, 2});
  } else {  // [B, H·W, inner] -> [B, inner, H, W], then 1×1 conv
    h = proj_out->forward(permute(reshape(h, {b, height, width, inner}), {0, 3, 1, 2}));
  }
  return h + x;
}

std::vector<std::pair<std::string, std::shared_ptr<Attention>>> Transformer2DModel::attention_layers() const {
  std::vector<std::pair<std::string, std::shared_ptr<Attention>>> layers;
  for (const auto& [name, module] : named_modules())
    if (auto attn = std::dynamic_pointer_cast<Attention>(module)) layers.emplace_back(name, attn);
  return layers;
}

}  // namespace loom::attention
