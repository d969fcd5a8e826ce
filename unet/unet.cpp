#include "unet/unet.h"

#include "nn/norm.h"

namespace loom::unet {

namespace {
BlockOptions common_block_options(const UNet2DConditionConfig& c) {
  BlockOptions o;
  o.temb_channels = c.time_embed_dim();
  o.resnet_eps = c.norm_eps;
  o.act_fn = c.act_fn;
  o.resnet_groups = c.norm_num_groups;
  o.dropout = c.dropout;
  o.time_embedding_norm = c.resnet_time_scale_shift;
  o.use_linear_projection = c.use_linear_projection;
  o.upcast_attention = c.upcast_attention;
  o.downsample_padding = c.downsample_padding;
  return o;
}

std::vector<int64_t> fit_layers(const std::vector<int64_t>& v, int64_t num_layers) {
  // diffusers: an int is repeated per layer; a list is indexed per layer.
  if (v.size() == 1) return std::vector<int64_t>(size_t(num_layers), v[0]);
  return v;
}
}  // namespace

UNet2DConditionModel::UNet2DConditionModel(const UNet2DConditionConfig& config, Generator& gen, DType dtype,
                                           Device device)
    : config_(config) {
  const auto& c = config_;
  const size_t nb = c.block_out_channels.size();
  const int64_t temb = c.time_embed_dim(), ch0 = c.block_out_channels[0];
  register_module("conv_in", std::make_shared<nn::Conv2d>(c.in_channels, ch0, c.conv_in_kernel, 1,
                                                          (c.conv_in_kernel - 1) / 2, true, gen, dtype, device));
  register_module("time_embedding",
                  std::make_shared<TimestepEmbedding>(TimestepEmbeddingOptions{ch0, temb, 0, c.act_fn}, gen, dtype, device));
  if (c.addition_embed_type == "text_time")
    register_module("add_embedding", std::make_shared<TimestepEmbedding>(
                                         TimestepEmbeddingOptions{c.projection_class_embeddings_input_dim, temb, 0, c.act_fn},
                                         gen, dtype, device));
  if (!c.time_embedding_act_fn.empty()) check_activation(c.time_embedding_act_fn, "time_embedding_act_fn");

  auto down = std::make_shared<nn::ModuleList>();
  int64_t output_channel = ch0;
  for (size_t i = 0; i < nb; ++i) {
    BlockOptions o = common_block_options(c);
    o.type = c.down_block_types[i];
    o.num_layers = c.layers_per_block[i];
    o.in_channels = output_channel;
    o.out_channels = output_channel = c.block_out_channels[i];
    o.add_sample = i + 1 < nb;
    o.cross_attention_dim = c.cross_attention_dim[i];
    o.num_attention_heads = c.num_attention_heads[i];
    o.only_cross_attention = c.only_cross_attention[i];
    o.transformer_layers_per_block = fit_layers(c.transformer_layers_per_block[i], o.num_layers);
    down->push_back(std::make_shared<DownBlock>(o, gen, dtype, device));
  }
  register_module("down_blocks", down);

  auto up = std::make_shared<nn::ModuleList>();
  std::vector<int64_t> rev_ch(c.block_out_channels.rbegin(), c.block_out_channels.rend());
  output_channel = rev_ch[0];
  for (size_t i = 0; i < nb; ++i) {
    const size_t src = nb - 1 - i;  // the down block this up block mirrors
    BlockOptions o = common_block_options(c);
    o.type = c.up_block_types[i];
    o.num_layers = c.layers_per_block[src] + 1;
    o.prev_output_channel = output_channel;
    o.out_channels = output_channel = rev_ch[i];
    o.in_channels = rev_ch[std::min(i + 1, nb - 1)];
    o.add_sample = i + 1 < nb;
    if (o.add_sample) ++num_upsamplers_;
    o.cross_attention_dim = c.cross_attention_dim[src];
    o.num_attention_heads = c.num_attention_heads[src];
    o.only_cross_attention = c.only_cross_attention[src];
    const std::vector<int64_t>& layers = c.reverse_transformer_layers_per_block.empty()
                                             ? c.transformer_layers_per_block[src]
                                             : c.reverse_transformer_layers_per_block[i];
    o.transformer_layers_per_block = fit_layers(layers, o.num_layers);
    if (is_cross_attention_block(o.type))
      LOOM_CHECK(int64_t(o.transformer_layers_per_block.size()) == o.num_layers, "UNet2DConditionModel: up block ", i,
                 " has ", o.num_layers, " layers but transformer_layers_per_block gives ",
                 o.transformer_layers_per_block.size(), " (an asymmetrical UNet needs reverse_transformer_layers_per_block)");
    up->push_back(std::make_shared<UpBlock>(o, gen, dtype, device));
  }
  register_module("up_blocks", up);  // diffusers' order: down_blocks, up_blocks, mid_block

  if (!c.mid_block_type.empty()) {
    BlockOptions o = common_block_options(c);
    o.type = c.mid_block_type;
    o.num_layers = 1;
    o.in_channels = o.out_channels = c.block_out_channels.back();
    o.output_scale_factor = c.mid_block_scale_factor;
    o.cross_attention_dim = c.cross_attention_dim.back();
    o.num_attention_heads = c.num_attention_heads.back();
    o.transformer_layers_per_block = {c.transformer_layers_per_block.back()[0]};  // diffusers: [-1] of the per-block list
    register_module("mid_block", std::make_shared<MidBlock>(o, gen, dtype, device));
  }
  register_module("conv_norm_out", std::make_shared<nn::GroupNorm>(c.norm_num_groups, ch0, c.norm_eps, true, dtype, device));
  register_module("conv_out", std::make_shared<nn::Conv2d>(ch0, c.out_channels, c.conv_out_kernel, 1,
                                                           (c.conv_out_kernel - 1) / 2, true, gen, dtype, device));
}

void UNet2DConditionModel::project_timesteps(UNetInputs& in, int64_t batch, DType dtype, Device device) const {
  const auto& c = config_;
  LOOM_CHECK(in.timestep.defined(), "UNet2DConditionModel: timestep is missing");
  Tensor t = in.timestep.dim() == 0 ? in.timestep.reshape({1}) : in.timestep;
  LOOM_CHECK(t.dim() == 1 && (t.size(0) == 1 || t.size(0) == batch), "UNet2DConditionModel: timestep ",
             in.timestep.shape(), " must be [], [1] or [", batch, "]");
  if (t.size(0) == 1 && batch != 1) t = t.expand({batch});
  in.timestep_proj = timestep_embedding(t.contiguous(), c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift,
                                        dtype, device);
  if (c.addition_embed_type != "text_time") return;
  LOOM_CHECK(in.time_ids.defined(), "UNet2DConditionModel: addition_embed_type text_time needs time_ids [N, 6]");
  LOOM_CHECK(in.time_ids.dim() == 2 && in.time_ids.size(0) == batch, "UNet2DConditionModel: time_ids ",
             in.time_ids.shape(), " must be [", batch, ", 6]");
  // [N, k] -> [N·k, dim] -> [N, k·dim]
  const Tensor ids = in.time_ids.reshape({-1}).contiguous();
  in.time_ids_proj = timestep_embedding(ids, c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift, dtype, device)
                         .reshape({batch, -1});
}

Variable UNet2DConditionModel::time_embedding(const Tensor& timestep, int64_t batch, const UNetInputs& given,
                                              DType dtype, Device device) const {
  const auto& c = config_;
  UNetInputs in = given;
  in.timestep = timestep;
  if (!in.timestep_proj.defined() || (c.addition_embed_type == "text_time" && !in.time_ids_proj.defined() &&
                                      in.time_ids.defined()))
    project_timesteps(in, batch, dtype, device);
  LOOM_CHECK(in.timestep_proj.dim() == 2 && in.timestep_proj.size(0) == batch &&
                 in.timestep_proj.size(1) == c.block_out_channels[0],
             "UNet2DConditionModel: timestep_proj ", in.timestep_proj.shape(), " must be [", batch, ", ",
             c.block_out_channels[0], "]");
  Variable emb = child_as<TimestepEmbedding>("time_embedding")->forward(Variable(in.timestep_proj));
  if (c.addition_embed_type == "text_time") {
    LOOM_CHECK(in.text_embeds.defined() && in.time_ids_proj.defined(), "UNet2DConditionModel: addition_embed_type "
               "text_time needs text_embeds [N, ", c.text_embeds_dim(), "] and time_ids [N, 6]");
    LOOM_CHECK(in.text_embeds.dim() == 2 && in.text_embeds.size(0) == batch && in.time_ids_proj.dim() == 2 &&
                   in.time_ids_proj.size(0) == batch &&
                   in.text_embeds.size(1) + in.time_ids_proj.size(1) == c.projection_class_embeddings_input_dim,
               "UNet2DConditionModel: text_embeds ", in.text_embeds.shape(), " and time_ids ",
               in.time_ids.defined() ? in.time_ids.shape() : in.time_ids_proj.shape(),
               " do not add up to projection_class_embeddings_input_dim ", c.projection_class_embeddings_input_dim,
               " (text_embeds width + time_ids count · ", c.addition_time_embed_dim, ")");
    const Variable add_embeds = cat({in.text_embeds, Variable(in.time_ids_proj)}, 1);  // text_embeds first
    emb = add(emb, child_as<TimestepEmbedding>("add_embedding")->forward(add_embeds));
  }
  if (!c.time_embedding_act_fn.empty()) emb = activation(c.time_embedding_act_fn, emb);
  return emb;
}

Variable UNet2DConditionModel::forward(const UNetInputs& in) const {
  const auto& c = config_;
  const Variable& x = in.sample;
  LOOM_CHECK(x.defined() && x.dim() == 4 && x.size(1) == c.in_channels, "UNet2DConditionModel: sample must be [N, ",
             c.in_channels, ", h, w], got ", x.defined() ? x.shape() : Shape{});
  const int64_t batch = x.size(0);
  LOOM_CHECK(in.encoder_hidden_states.defined() && in.encoder_hidden_states.dim() == 3 &&
                 in.encoder_hidden_states.size(0) == batch,
             "UNet2DConditionModel: encoder_hidden_states must be [", batch, ", K, C], got ",
             in.encoder_hidden_states.defined() ? in.encoder_hidden_states.shape() : Shape{});
  const int64_t factor = int64_t(1) << num_upsamplers_;
  const bool forward_upsample_size = x.size(2) % factor != 0 || x.size(3) % factor != 0;

  BlockContext ctx;
  ctx.temb = time_embedding(in.timestep, batch, in, x.dtype(), x.device());
  ctx.encoder_hidden_states = in.encoder_hidden_states;
  ctx.encoder_attention_mask = in.encoder_attention_mask;

  Variable h = c.center_input_sample ? add_scalar(mul_scalar(x, 2.0), -1.0) : x;
  h = child_as<nn::Conv2d>("conv_in")->forward(h);
  std::vector<Variable> skips{h};
  const auto down = child_as<nn::ModuleList>("down_blocks");
  for (int64_t i = 0; i < down->size(); ++i) h = down->at_as<DownBlock>(i)->forward(h, ctx, skips);
  if (find_module("mid_block")) h = child_as<MidBlock>("mid_block")->forward(h, ctx);
  const auto up = child_as<nn::ModuleList>("up_blocks");
  for (int64_t i = 0; i < up->size(); ++i) {
    const auto block = up->at_as<UpBlock>(i);
    const bool is_final = i == up->size() - 1;
    int64_t uh = 0, uw = 0;
    if (!is_final && forward_upsample_size) {
      // the skip the next block reads first: the one below this block's skips
      const size_t below = skips.size() - size_t(block->num_layers()) - 1;
      LOOM_CHECK(skips.size() > size_t(block->num_layers()), "UNet2DConditionModel: skip connections do not add up");
      uh = skips[below].size(2), uw = skips[below].size(3);
    }
    h = block->forward(h, ctx, skips, uh, uw);
  }
  h = child_as<nn::UnaryModule>("conv_norm_out")->forward(h);
  h = activation(c.act_fn, h);
  return child_as<nn::Conv2d>("conv_out")->forward(h);
}

}  // namespace loom::unet
