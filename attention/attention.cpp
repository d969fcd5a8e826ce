#include "attention/attention.h"

#include <cmath>
#include <vector>

#include "autograd/ops.h"
#include "nn/norm.h"
#include "tensor/ops.h"

namespace loom::attention {

namespace {

void check_options(AttentionOptions& o) {
  LOOM_CHECK(o.query_dim > 0, "Attention: query_dim is required and must be positive (got ", o.query_dim, ")");
  LOOM_CHECK(o.heads > 0 && o.dim_head > 0, "Attention: heads (", o.heads, ") and dim_head (", o.dim_head,
             ") must be positive");
  if (!o.cross_attention_dim) o.cross_attention_dim = o.query_dim;
  LOOM_CHECK(*o.cross_attention_dim > 0, "Attention: cross_attention_dim must be positive");
  LOOM_CHECK(o.cross_attention_norm.empty() || o.cross_attention_norm == "layer_norm" ||
                 o.cross_attention_norm == "group_norm",
             "Attention: unknown cross_attention_norm '", o.cross_attention_norm,
             "' (expected none, layer_norm or group_norm)");
  LOOM_CHECK(!o.only_cross_attention || o.added_kv_proj_dim,
             "Attention: only_cross_attention can only be set together with added_kv_proj_dim");
  LOOM_CHECK(!o.added_kv_proj_dim || o.norm_num_groups,
             "Attention: added_kv_proj_dim needs norm_num_groups (the added-KV processor group-normalises x)");
  LOOM_CHECK(o.rescale_output_factor != 0.0, "Attention: rescale_output_factor must not be 0");
}

// [B, S, C] -> norm over channels -> [B, S, C], for a module that normalises [B, C, *].
Variable channels_first_norm(const nn::UnaryModule& norm, const Variable& x) {
  return transpose(norm.forward(transpose(x, 1, 2)), 1, 2);
}

}  // namespace

// ---- construction --------------------------------------------------------------------

Attention::Attention(const AttentionOptions& options, Generator& gen) : options_(options) {
  check_options(options_);
  const AttentionOptions& o = options_;
  const int64_t inner = inner_dim(), cross = *o.cross_attention_dim;
  if (o.norm_num_groups)
    register_module("group_norm", std::make_shared<nn::GroupNorm>(*o.norm_num_groups, o.query_dim, o.eps, true,
                                                                  o.dtype, o.device));
  if (o.cross_attention_norm == "layer_norm")
    register_module("norm_cross", std::make_shared<nn::LayerNorm>(cross, 1e-5, true, o.dtype, o.device));
  if (o.cross_attention_norm == "group_norm")
    register_module("norm_cross", std::make_shared<nn::GroupNorm>(o.cross_attention_norm_num_groups,
                                                                  o.added_kv_proj_dim.value_or(cross), 1e-5, true,
                                                                  o.dtype, o.device));
  auto linear = [&](int64_t in, int64_t out, bool bias) {
    return std::make_shared<nn::Linear>(in, out, bias, gen, o.dtype, o.device);
  };
  register_module("to_q", linear(o.query_dim, inner, o.bias));
  if (!o.only_cross_attention) {
    register_module("to_k", linear(cross, inner, o.bias));
    register_module("to_v", linear(cross, inner, o.bias));
  }
  if (o.added_kv_proj_dim) {
    register_module("add_k_proj", linear(*o.added_kv_proj_dim, inner, true));
    register_module("add_v_proj", linear(*o.added_kv_proj_dim, inner, true));
  }
  auto to_out = std::make_shared<nn::ModuleList>();
  to_out->push_back(linear(inner, o.query_dim, o.out_bias));
  to_out->push_back(std::make_shared<nn::Dropout>(o.dropout));
  register_module("to_out", to_out);
  std::shared_ptr<AttentionProcessor> processor;
  if (o.added_kv_proj_dim)
    processor = std::make_shared<AddedKVProcessor>();
  else
    processor = std::make_shared<DefaultProcessor>();
  processor_ = register_module("processor", processor);  // no parameters: adds no keys
}

void Attention::set_processor(std::shared_ptr<AttentionProcessor> processor) {
  LOOM_CHECK(processor != nullptr, "Attention::set_processor: null processor");
  replace_module("processor", processor);
}

void Attention::on_replace_module(const std::string& name, const std::shared_ptr<Module>& module) {
  if (name != "processor") return;
  auto processor = std::dynamic_pointer_cast<AttentionProcessor>(module);
  LOOM_CHECK(processor != nullptr, "Attention: the 'processor' child must be an AttentionProcessor, got ",
             module ? module->type_name() : "null");
  processor_ = processor;
}

void Attention::set_attention_slice(int64_t slice_size) {
  LOOM_CHECK(slice_size >= 0, "Attention::set_attention_slice: slice_size must be ≥ 0, got ", slice_size);
  slice_size_ = slice_size;
}

Variable Attention::forward(const Variable& x, const Variable& context, const Tensor& mask) const {
  return processor_->process(*this, x, context, mask);
}

// ---- building blocks -----------------------------------------------------------------------

Variable Attention::to_sequence(const Variable& x) const {
  LOOM_CHECK(x.defined(), "Attention: undefined input");
  LOOM_CHECK(x.dim() == 3 || x.dim() == 4, "Attention: input must be [B, S, C] or [B, C, H, W], got ", x.shape());
  // [B, C, H, W] -> [B, C, H·W] -> [B, H·W, C]
  const Variable seq = x.dim() == 4 ? transpose(reshape(x, {x.size(0), x.size(1), -1}), 1, 2) : x;
  LOOM_CHECK(seq.size(-1) == options_.query_dim, "Attention: input ", x.shape(), " has ", seq.size(-1),
             " channels but query_dim is ", options_.query_dim);
  return seq;
}

Variable Attention::from_sequence(const Variable& y, const Shape& input_shape) {
  if (input_shape.size() == 3) return y;
  return reshape(transpose(y, 1, 2), input_shape);  // [B, S, C] -> [B, C, S] -> [B, C, H, W]
}

void Attention::check_context(const Variable& context, int64_t batch, int64_t channels) const {
  LOOM_CHECK(context.dim() == 3, "Attention: context must be [B, K, C], got ", context.shape());
  LOOM_CHECK(context.size(0) == batch, "Attention: context batch ", context.size(0), " differs from input batch ",
             batch);
  LOOM_CHECK(context.size(2) == channels, "Attention: context ", context.shape(), " has ", context.size(2),
             " channels, expected ", channels, is_added_kv() ? " (added_kv_proj_dim)" : " (cross_attention_dim)");
}

Variable Attention::finish_output(const Variable& out, const Variable& x) const {
  const Variable y = options_.residual_connection ? out + x : out;
  return options_.rescale_output_factor == 1.0 ? y : y / options_.rescale_output_factor;
}

std::shared_ptr<nn::Linear> Attention::projection(const std::string& name) const {
  auto linear = std::dynamic_pointer_cast<nn::Linear>(find_module(name));
  LOOM_CHECK(linear != nullptr, "Attention: no projection '", name, "' in this layer");
  return linear;
}

bool Attention::has_projection(const std::string& name) const {
  return std::dynamic_pointer_cast<nn::Linear>(find_module(name)) != nullptr;
}

Variable Attention::head_to_batch(const Variable& x) const { return split_heads(x, options_.heads); }

Variable Attention::batch_to_head(const Variable& x) const { return merge_heads(x, options_.heads); }

Variable Attention::apply_group_norm(const Variable& x) const {
  const auto norm = std::dynamic_pointer_cast<nn::UnaryModule>(find_module("group_norm"));
  return norm ? channels_first_norm(*norm, x) : x;
}

Variable Attention::apply_norm_cross(const Variable& context) const {
  if (options_.cross_attention_norm.empty()) return context;
  const auto norm = child_as<nn::UnaryModule>("norm_cross");
  return options_.cross_attention_norm == "layer_norm" ? norm->forward(context) : channels_first_norm(*norm, context);
}

Tensor Attention::prepare_mask(const Tensor& mask, int64_t batch, int64_t queries, int64_t keys) const {
  if (!mask.defined()) return mask;
  LOOM_CHECK(mask.dim() == 2 || mask.dim() == 3, "Attention: mask must be (B, K), (B, 1, K) or (B, Q, K), got ",
             mask.shape());
  const Tensor m = mask.dim() == 2 ? mask.unsqueeze(1) : mask;  // (B, K) -> (B, 1, K)
  LOOM_CHECK(m.size(-1) == keys, "Attention: mask ", mask.shape(), " has last dim ", m.size(-1), " but there are ",
             keys, " keys (masks are not padded)");
  LOOM_CHECK(m.size(0) == 1 || m.size(0) == batch, "Attention: mask ", mask.shape(), " has batch ", m.size(0),
             ", expected 1 or ", batch);
  LOOM_CHECK(m.size(1) == 1 || m.size(1) == queries, "Attention: mask ", mask.shape(), " has ", m.size(1),
             " query rows, expected 1 or ", queries);
  return m;
}

SdpaOptions Attention::sdpa_options(const Tensor& mask) const {
  SdpaOptions o;
  o.mask = mask;
  o.heads = options_.heads;
  o.scale = scale();
  o.backend = slice_size_ > 0 ? std::optional<BackendKind>(BackendKind::Sliced) : backend_;
  o.slice_size = slice_size_;
  return o;
}

Variable Attention::attend(const Variable& q, const Variable& k, const Variable& v, const Tensor& mask) const {
  return scaled_dot_product_attention(q, k, v, sdpa_options(mask));
}

Variable Attention::attend_heads(const Variable& q, const Variable& k, const Variable& v, const Tensor& mask) const {
  return scaled_dot_product_attention_packed(q, k, v, sdpa_options(mask));
}

Variable Attention::project_out(const Variable& x) const {
  const auto to_out = child_as<nn::ModuleList>("to_out");
  return to_out->at_as<nn::UnaryModule>(1)->forward(to_out->at_as<nn::Linear>(0)->forward(x));
}

void Attention::set_context_cache(bool on) const {
  context_cache_ = on;
  if (!on) cached_context_ = Tensor(), cached_kv_.clear();
}

std::vector<Variable> Attention::context_projections(const Variable& context,
                                                     const std::function<std::vector<Variable>()>& project) const {
  if (!context_cache_ || GradMode::is_enabled()) return project();
  const Tensor& t = context.tensor();
  const Tensor& c = cached_context_;
  const bool hit = c.defined() && c.storage() == t.storage() && c.offset() == t.offset() && c.shape() == t.shape() &&
                   c.strides() == t.strides() && c.dtype() == t.dtype();
  if (hit) return cached_kv_;
  cached_kv_ = project();
  cached_context_ = t;
  return cached_kv_;
}

// ---- processors ------------------------------------------------------------------------------

Variable DefaultProcessor::process(const Attention& attn, const Variable& x, const Variable& context,
                                   const Tensor& mask) const {
  const Variable seq = attn.to_sequence(x);  // [B, Q, C]
  const Variable h = attn.apply_group_norm(seq);
  if (context.defined()) attn.check_context(context, seq.size(0), attn.cross_attention_dim());
  // q, k, v of one input (k, v of one context) are asked for together: adapters may share work.
  const auto to_q = attn.projection("to_q"), to_k = attn.projection("to_k"), to_v = attn.projection("to_v");
  std::vector<Variable> qkv;
  if (context.defined()) {  // k, v of the (normalised) context; a fixed context's from the layer's cache
    qkv.push_back(to_q->forward(h));
    const auto project = [&] {
      return nn::forward_shared_input({to_k.get(), to_v.get()}, attn.apply_norm_cross(context));
    };
    for (Variable& y : attn.context_projections(context, project)) qkv.push_back(std::move(y));
  } else {  // self-attention: keys and values read the normalised x
    qkv = nn::forward_shared_input({to_q.get(), to_k.get(), to_v.get()}, h);
  }
  const Variable q = qkv[0], k = qkv[1], v = qkv[2];  // [B, len, heads·d]
  const Tensor m = attn.prepare_mask(mask, seq.size(0), seq.size(1), k.size(1));
  const Variable out = attn.project_out(attn.attend_heads(q, k, v, m));  // [B, Q, C]
  return attn.finish_output(Attention::from_sequence(out, x.shape()), x);
}

Variable AddedKVProcessor::process(const Attention& attn, const Variable& x, const Variable& context,
                                   const Tensor& mask) const {
  const AttentionOptions& o = attn.options();
  // As diffusers' AttnAddedKVProcessor: any input is channels first, [B, C, *] -> [B, C, S] -> [B, S, C].
  LOOM_CHECK(x.defined() && x.dim() >= 3, "Attention (added-KV): input must be [B, C, *], got ",
             x.defined() ? x.shape() : Shape{});
  LOOM_CHECK(x.size(1) == o.query_dim, "Attention (added-KV): input ", x.shape(), " has ", x.size(1),
             " channels but query_dim is ", o.query_dim);
  const Variable seq = transpose(reshape(x, {x.size(0), x.size(1), -1}), 1, 2);
  Variable ctx = seq;
  if (context.defined()) {
    attn.check_context(context, seq.size(0), *o.added_kv_proj_dim);
    ctx = attn.apply_norm_cross(context);
  }
  const Variable h = attn.apply_group_norm(seq);
  const Variable q = attn.projection("to_q")->forward(h);  // [B, S, heads·d]
  Variable k = attn.projection("add_k_proj")->forward(ctx);
  Variable v = attn.projection("add_v_proj")->forward(ctx);
  if (!o.only_cross_attention) {  // keys: context tokens first, then the layer's own (per head)
    k = cat({k, attn.projection("to_k")->forward(h)}, 1);
    v = cat({v, attn.projection("to_v")->forward(h)}, 1);
  }
  const Tensor m = attn.prepare_mask(mask, seq.size(0), seq.size(1), k.size(1));
  const Variable out = attn.project_out(attn.attend_heads(q, k, v, m));  // [B, S, C]
  return reshape(transpose(out, 1, 2), x.shape()) + x;  // back to [B, C, *]; the residual is always added
}

Tensor keep_mask_to_bias(const Tensor& keep_mask, DType dtype) {
  LOOM_CHECK(keep_mask.defined(), "keep_mask_to_bias: undefined mask");
  return ops::mul_scalar(ops::add_scalar(ops::neg(keep_mask.to(dtype)), 1.0), -10000.0);
}

}  // namespace loom::attention
