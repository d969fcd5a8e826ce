#include "unet/blocks.h"

namespace loom::unet {

bool is_cross_attention_block(const std::string& type) {
  return type == "CrossAttnDownBlock2D" || type == "CrossAttnUpBlock2D" || type == "UNetMidBlock2DCrossAttn";
}

namespace {

std::shared_ptr<ResnetBlock2D> make_resnet(const BlockOptions& o, int64_t in, int64_t out, Generator& gen,
                                           DType dtype, Device device) {
  ResnetBlock2DOptions r;
  r.in_channels = in, r.out_channels = out, r.temb_channels = o.temb_channels;
  r.groups = o.resnet_groups, r.eps = o.resnet_eps, r.dropout = o.dropout;
  r.time_embedding_norm = o.time_embedding_norm, r.non_linearity = o.act_fn;
  r.output_scale_factor = o.output_scale_factor;
  return std::make_shared<ResnetBlock2D>(r, gen, dtype, device);
}

std::shared_ptr<attention::Transformer2DModel> make_transformer(const BlockOptions& o, int64_t channels,
                                                                int64_t layers, Generator& gen, DType dtype,
                                                                Device device) {
  LOOM_CHECK(o.num_attention_heads > 0 && channels % o.num_attention_heads == 0, o.type, ": ", channels,
             " channels cannot be split into ", o.num_attention_heads, " attention heads");
  attention::Transformer2DConfig c;
  c.in_channels = channels;
  c.num_attention_heads = o.num_attention_heads;
  c.attention_head_dim = channels / o.num_attention_heads;
  c.num_layers = layers;
  c.cross_attention_dim = o.cross_attention_dim;
  c.norm_num_groups = o.resnet_groups;
  c.use_linear_projection = o.use_linear_projection;
  c.only_cross_attention = o.only_cross_attention;
  c.upcast_attention = o.upcast_attention;
  return std::make_shared<attention::Transformer2DModel>(c, gen, dtype, device);
}

int64_t layers_at(const BlockOptions& o, int64_t i) {
  LOOM_CHECK(int64_t(o.transformer_layers_per_block.size()) == o.num_layers, o.type, ": transformer_layers_per_block has ",
             o.transformer_layers_per_block.size(), " entries for ", o.num_layers, " layers");
  return o.transformer_layers_per_block[size_t(i)];
}

Variable run_attention(const nn::ModuleList& attentions, int64_t i, const Variable& h, const BlockContext& ctx) {
  return attentions.at_as<attention::Transformer2DModel>(i)->forward(h, ctx.encoder_hidden_states,
                                                                     ctx.encoder_attention_mask);
}

}  // namespace

DownBlock::DownBlock(const BlockOptions& o, Generator& gen, DType dtype, Device device) : options_(o) {
  LOOM_CHECK(o.type == "DownBlock2D" || o.type == "CrossAttnDownBlock2D", "down block type \"", o.type,
             "\" is not supported (DownBlock2D, CrossAttnDownBlock2D)");
  const bool cross = is_cross_attention_block(o.type);
  auto resnets = std::make_shared<nn::ModuleList>();
  auto attentions = std::make_shared<nn::ModuleList>();
  for (int64_t i = 0; i < o.num_layers; ++i) {
    resnets->push_back(make_resnet(o, i == 0 ? o.in_channels : o.out_channels, o.out_channels, gen, dtype, device));
    if (cross) attentions->push_back(make_transformer(o, o.out_channels, layers_at(o, i), gen, dtype, device));
  }
  if (cross) register_module("attentions", attentions);
  register_module("resnets", resnets);
  if (o.add_sample) {
    auto down = std::make_shared<nn::ModuleList>();
    down->push_back(std::make_shared<Downsample2D>(o.out_channels, o.out_channels, o.downsample_padding, gen, dtype,
                                                   device));
    register_module("downsamplers", down);
  }
}

Variable DownBlock::forward(const Variable& x, const BlockContext& ctx, std::vector<Variable>& skips) const {
  const auto resnets = child_as<nn::ModuleList>("resnets");
  const auto attentions = find_module("attentions") ? child_as<nn::ModuleList>("attentions") : nullptr;
  Variable h = x;
  for (int64_t i = 0; i < options_.num_layers; ++i) {
    h = resnets->at_as<ResnetBlock2D>(i)->forward(h, ctx.temb);
    if (attentions) h = run_attention(*attentions, i, h, ctx);
    skips.push_back(h);
  }
  if (options_.add_sample) {
    h = child_as<nn::ModuleList>("downsamplers")->at_as<Downsample2D>(0)->forward(h);
    skips.push_back(h);
  }
  return h;
}

MidBlock::MidBlock(const BlockOptions& o, Generator& gen, DType dtype, Device device) : options_(o) {
  auto resnets = std::make_shared<nn::ModuleList>();
  auto attentions = std::make_shared<nn::ModuleList>();
  resnets->push_back(make_resnet(o, o.in_channels, o.in_channels, gen, dtype, device));
  for (int64_t i = 0; i < o.num_layers; ++i) {
    attentions->push_back(make_transformer(o, o.in_channels, layers_at(o, i), gen, dtype, device));
    resnets->push_back(make_resnet(o, o.in_channels, o.in_channels, gen, dtype, device));
  }
  register_module("attentions", attentions);
  register_module("resnets", resnets);
}

Variable MidBlock::forward(const Variable& x, const BlockContext& ctx) const {
  const auto resnets = child_as<nn::ModuleList>("resnets");
  const auto attentions = child_as<nn::ModuleList>("attentions");
  Variable h = resnets->at_as<ResnetBlock2D>(0)->forward(x, ctx.temb);
  for (int64_t i = 0; i < options_.num_layers; ++i) {
    h = run_attention(*attentions, i, h, ctx);
    h = resnets->at_as<ResnetBlock2D>(i + 1)->forward(h, ctx.temb);
  }
  return h;
}

UpBlock::UpBlock(const BlockOptions& o, Generator& gen, DType dtype, Device device) : options_(o) {
  LOOM_CHECK(o.type == "UpBlock2D" || o.type == "CrossAttnUpBlock2D", "up block type \"", o.type,
             "\" is not supported (UpBlock2D, CrossAttnUpBlock2D)");
  const bool cross = is_cross_attention_block(o.type);
  auto resnets = std::make_shared<nn::ModuleList>();
  auto attentions = std::make_shared<nn::ModuleList>();
  for (int64_t i = 0; i < o.num_layers; ++i) {
    const int64_t skip = i == o.num_layers - 1 ? o.in_channels : o.out_channels;
    const int64_t in = i == 0 ? o.prev_output_channel : o.out_channels;
    resnets->push_back(make_resnet(o, in + skip, o.out_channels, gen, dtype, device));
    if (cross) attentions->push_back(make_transformer(o, o.out_channels, layers_at(o, i), gen, dtype, device));
  }
  if (cross) register_module("attentions", attentions);
  register_module("resnets", resnets);
  if (o.add_sample) {
    auto up = std::make_shared<nn::ModuleList>();
    up->push_back(std::make_shared<Upsample2D>(o.out_channels, o.out_channels, gen, dtype, device));
    register_module("upsamplers", up);
  }
}

Variable UpBlock::forward(const Variable& x, const BlockContext& ctx, std::vector<Variable>& skips,
                          int64_t upsample_h, int64_t upsample_w) const {
  const auto resnets = child_as<nn::ModuleList>("resnets");
  const auto attentions = find_module("attentions") ? child_as<nn::ModuleList>("attentions") : nullptr;
  Variable h = x;
  for (int64_t i = 0; i < options_.num_layers; ++i) {
    LOOM_CHECK(!skips.empty(), options_.type, ": ran out of skip connections");
    const Variable skip = skips.back();
    skips.pop_back();
    h = cat({h, skip}, 1);  // [N, C_h + C_skip, H, W]
    h = resnets->at_as<ResnetBlock2D>(i)->forward(h, ctx.temb);
    if (attentions) h = run_attention(*attentions, i, h, ctx);
  }
  if (options_.add_sample)
    h = child_as<nn::ModuleList>("upsamplers")->at_as<Upsample2D>(0)->forward(h, upsample_h, upsample_w);
  return h;
}

}  // namespace loom::unet
