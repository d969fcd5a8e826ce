#include "adapters/custom_diffusion.h"
#include "tensor/precision.h"

#include "autograd/ops.h"
#include "nn/norm.h"

namespace loom::adapters {

namespace {

// A bias-free copy of a base projection (weight cloned, so the two never share memory).
std::shared_ptr<nn::Linear> copy_projection(const attention::Attention& attn, const std::string& name, bool bias) {
  const auto base = attn.projection(name);
  const Tensor& w = base->weight().tensor();
  LOOM_CHECK(bias || !base->bias().defined(), "Custom Diffusion: ", name,
             " has a bias but its Custom Diffusion copy has none (diffusers' layout)");
  Generator unused(0);
  const DType master = master_dtype(w.dtype());  // trains in f32 over bf16 / f16 base weights
  auto copy = std::make_shared<nn::Linear>(base->in_features(), base->out_features(), bias, unused, master,
                                           w.device());
  copy->set_parameter_data("weight", w.to(master).clone());
  if (bias) {
    if (base->bias().defined())
      copy->set_parameter_data("bias", base->bias().tensor().to(master).clone());
    else
      copy->set_parameter_data("bias", Tensor::zeros({base->out_features()}, master, w.device()));
  }
  return copy;
}

}  // namespace

CustomDiffusionProcessor::CustomDiffusionProcessor(const attention::Attention& attn,
                                                   const CustomDiffusionOptions& options)
    : options_(options) {
  if (options_.train_kv) {
    register_module("to_k_custom_diffusion", copy_projection(attn, "to_k", false));
    register_module("to_v_custom_diffusion", copy_projection(attn, "to_v", false));
  }
  if (options_.train_q_out) {
    register_module("to_q_custom_diffusion", copy_projection(attn, "to_q", false));
    auto to_out = std::make_shared<nn::ModuleList>();
    to_out->push_back(copy_projection(attn, "to_out.0", options_.out_bias));
    to_out->push_back(std::make_shared<nn::Dropout>(options_.dropout));
    register_module("to_out_custom_diffusion", to_out);
  }
}

Variable block_first_position_gradient(const Variable& x) {
  LOOM_CHECK(x.dim() == 3, "block_first_position_gradient: expected [B, K, C], got ", x.shape());
  // keep = 1 except at position 0:  x·keep + detach(x)·(1 − keep) == x exactly, ∂/∂x = keep
  std::vector<double> keep(size_t(x.size(1)), 1.0);
  keep[0] = 0.0;
  const Tensor k = Tensor::from_values(keep, {1, x.size(1), 1}, x.dtype(), x.device());
  std::vector<double> complement(keep.size(), 0.0);
  complement[0] = 1.0;
  const Tensor c = Tensor::from_values(complement, {1, x.size(1), 1}, x.dtype(), x.device());
  return x * Variable(k) + x.detach() * Variable(c);
}

Variable CustomDiffusionProcessor::process(const attention::Attention& attn, const Variable& x,
                                           const Variable& context, const Tensor& mask) const {
  auto own = [&](const std::string& name) { return child_as<nn::Linear>(name); };
  const Variable seq = attn.to_sequence(x);  // [B, Q, C]
  const Variable h = attn.apply_group_norm(seq);
  const bool cross = context.defined();
  Variable ctx = h;
  if (cross) {
    attn.check_context(context, seq.size(0), attn.cross_attention_dim());
    ctx = attn.apply_norm_cross(context);
  }
  const Variable q = (options_.train_q_out ? own("to_q_custom_diffusion") : attn.projection("to_q"))->forward(h);
  Variable k = (options_.train_kv ? own("to_k_custom_diffusion") : attn.projection("to_k"))->forward(ctx);
  Variable v = (options_.train_kv ? own("to_v_custom_diffusion") : attn.projection("to_v"))->forward(ctx);
  if (cross) {  // no gradient through the first context token (the start token in Stable Diffusion)
    k = block_first_position_gradient(k);
    v = block_first_position_gradient(v);
  }
  const Tensor m = attn.prepare_mask(mask, seq.size(0), seq.size(1), ctx.size(1));
  Variable out = attn.attend_heads(q, k, v, m);  // [B, Q, inner]
  if (options_.train_q_out) {
    const auto to_out = child_as<nn::ModuleList>("to_out_custom_diffusion");
    out = to_out->at_as<nn::UnaryModule>(1)->forward(to_out->at_as<nn::Linear>(0)->forward(out));
  } else {
    out = attn.project_out(out);
  }
  return attn.finish_output(attention::Attention::from_sequence(out, x.shape()), x);
}

std::vector<std::pair<std::string, Variable>> apply_custom_diffusion(nn::Module& model, const std::string& recipe,
                                                                    bool out_bias, double dropout) {
  LOOM_CHECK(recipe == "crossattn_kv" || recipe == "crossattn", "Custom Diffusion: unknown recipe '", recipe,
             "' (expected crossattn_kv or crossattn)");
  CustomDiffusionOptions options;
  options.train_kv = true;
  options.train_q_out = recipe == "crossattn";
  options.out_bias = out_bias;
  options.dropout = dropout;
  model.set_requires_grad(false);
  int layers = 0;
  for (const auto& [path, module] : model.named_modules()) {
    auto attn = std::dynamic_pointer_cast<attention::Attention>(module);
    const bool is_attn2 = path == "attn2" || (path.size() > 6 && path.compare(path.size() - 6, 6, ".attn2") == 0);
    if (!attn || !is_attn2) continue;
    attn->set_processor(std::make_shared<CustomDiffusionProcessor>(*attn, options));
    ++layers;
  }
  LOOM_CHECK(layers > 0, "Custom Diffusion: the model has no cross-attention layer (attn2)");
  std::vector<std::pair<std::string, Variable>> trainable;
  for (const auto& [name, v] : model.named_parameters()) {
    if (name.find(".processor.") == std::string::npos) continue;
    Variable p = v;
    p.set_requires_grad(true);
    trainable.emplace_back(name, p);
  }
  return trainable;
}

}  // namespace loom::adapters
