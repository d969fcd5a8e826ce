#include "unet/vae.h"

#include <filesystem>

#include "attention/attention.h"
#include "autograd/ops.h"
#include "io/tensor_file.h"
#include "nn/conv.h"
#include "nn/norm.h"
#include "tensor/ops.h"
#include "io/config_json.h"
#include "unet/embeddings.h"
#include "unet/resnet.h"
#include "unet/unet_io.h"

namespace loom::unet {

namespace fs = std::filesystem;

namespace {

constexpr double kVaeEps = 1e-6;  // resnets, group norms and the attention's group_norm

std::shared_ptr<ResnetBlock2D> make_resnet(int64_t in, int64_t out, const AutoencoderKLConfig& c, Generator& gen,
                                           DType dtype, Device device) {
  ResnetBlock2DOptions r;
  r.in_channels = in, r.out_channels = out, r.temb_channels = 0;
  r.groups = c.norm_num_groups, r.eps = kVaeEps, r.non_linearity = c.act_fn;
  return std::make_shared<ResnetBlock2D>(r, gen, dtype, device);
}

// A ModuleList of ResnetBlock2Ds run in order (temb none).
Variable run_resnets(const nn::ModuleList& resnets, Variable h) {
  for (int64_t i = 0; i < resnets.size(); ++i) h = resnets.at_as<ResnetBlock2D>(i)->forward(h);
  return h;
}

}  // namespace

// ---- blocks -----------------------------------------------------------------------------------

VaeMidBlock::VaeMidBlock(int64_t channels, const AutoencoderKLConfig& c, Generator& gen, DType dtype, Device device) {
  auto resnets = std::make_shared<nn::ModuleList>();
  resnets->push_back(make_resnet(channels, channels, c, gen, dtype, device));
  resnets->push_back(make_resnet(channels, channels, c, gen, dtype, device));
  if (c.mid_block_add_attention) {
    // diffusers: Attention(C, heads = C / attention_head_dim (= C), dim_head = C, eps, norm_num_groups,
    // residual_connection, bias, upcast_softmax, _from_deprecated_attn_block)
    attention::AttentionOptions o;
    o.query_dim = channels, o.heads = 1, o.dim_head = channels;
    o.bias = true, o.upcast_softmax = true, o.residual_connection = true, o.rescale_output_factor = 1.0;
    o.norm_num_groups = c.norm_num_groups, o.eps = kVaeEps;
    o.dtype = dtype, o.device = device;
    auto attentions = std::make_shared<nn::ModuleList>();
    attentions->push_back(std::make_shared<attention::Attention>(o, gen));
    register_module("attentions", attentions);
  }
  register_module("resnets", resnets);
}

Variable VaeMidBlock::forward(const Variable& x) const {
  const auto resnets = child_as<nn::ModuleList>("resnets");
  Variable h = resnets->at_as<ResnetBlock2D>(0)->forward(x);
  if (find_module("attentions")) h = child_as<nn::ModuleList>("attentions")->at_as<attention::Attention>(0)->forward(h);
  return resnets->at_as<ResnetBlock2D>(1)->forward(h);
}

DownEncoderBlock2D::DownEncoderBlock2D(int64_t in, int64_t out, bool downsample, const AutoencoderKLConfig& c,
                                       Generator& gen, DType dtype, Device device) {
  auto resnets = std::make_shared<nn::ModuleList>();
  for (int64_t i = 0; i < c.layers_per_block; ++i)
    resnets->push_back(make_resnet(i == 0 ? in : out, out, c, gen, dtype, device));
  register_module("resnets", resnets);
  if (downsample) {
    auto down = std::make_shared<nn::ModuleList>();
    down->push_back(std::make_shared<Downsample2D>(out, out, /*padding=*/0, gen, dtype, device));
    register_module("downsamplers", down);
  }
}

Variable DownEncoderBlock2D::forward(const Variable& x) const {
  Variable h = run_resnets(*child_as<nn::ModuleList>("resnets"), x);
  if (find_module("downsamplers")) h = child_as<nn::ModuleList>("downsamplers")->at_as<Downsample2D>(0)->forward(h);
  return h;
}

UpDecoderBlock2D::UpDecoderBlock2D(int64_t in, int64_t out, bool upsample, const AutoencoderKLConfig& c,
                                   Generator& gen, DType dtype, Device device) {
  auto resnets = std::make_shared<nn::ModuleList>();
  for (int64_t i = 0; i < c.layers_per_block + 1; ++i)
    resnets->push_back(make_resnet(i == 0 ? in : out, out, c, gen, dtype, device));
  register_module("resnets", resnets);
  if (upsample) {
    auto up = std::make_shared<nn::ModuleList>();
    up->push_back(std::make_shared<Upsample2D>(out, out, gen, dtype, device));
    register_module("upsamplers", up);
  }
}

Variable UpDecoderBlock2D::forward(const Variable& x) const {
  Variable h = run_resnets(*child_as<nn::ModuleList>("resnets"), x);
  if (find_module("upsamplers")) h = child_as<nn::ModuleList>("upsamplers")->at_as<Upsample2D>(0)->forward(h);
  return h;
}

// ---- encoder and decoder ------------------------------------------------------------------------

VaeEncoder::VaeEncoder(const AutoencoderKLConfig& c, Generator& gen, DType dtype, Device device) {
  const auto& ch = c.block_out_channels;
  const size_t nb = ch.size();
  register_module("conv_in", std::make_shared<nn::Conv2d>(c.in_channels, ch[0], 3, 1, 1, true, gen, dtype, device));
  auto down = std::make_shared<nn::ModuleList>();
  for (size_t i = 0; i < nb; ++i)
    down->push_back(std::make_shared<DownEncoderBlock2D>(i == 0 ? ch[0] : ch[i - 1], ch[i], i + 1 < nb, c, gen, dtype,
                                                         device));
  register_module("down_blocks", down);
  register_module("mid_block", std::make_shared<VaeMidBlock>(ch.back(), c, gen, dtype, device));
  register_module("conv_norm_out", std::make_shared<nn::GroupNorm>(c.norm_num_groups, ch.back(), kVaeEps, true, dtype, device));
  register_module("conv_out", std::make_shared<nn::Conv2d>(ch.back(), 2 * c.latent_channels, 3, 1, 1, true, gen, dtype, device));
}

Variable VaeEncoder::forward(const Variable& x) const {
  Variable h = child_as<nn::UnaryModule>("conv_in")->forward(x);
  const auto down = child_as<nn::ModuleList>("down_blocks");
  for (int64_t i = 0; i < down->size(); ++i) h = down->at_as<DownEncoderBlock2D>(i)->forward(h);
  h = child_as<nn::UnaryModule>("mid_block")->forward(h);
  h = silu(child_as<nn::UnaryModule>("conv_norm_out")->forward(h));  // diffusers' conv_act is nn.SiLU()
  return child_as<nn::UnaryModule>("conv_out")->forward(h);
}

VaeDecoder::VaeDecoder(const AutoencoderKLConfig& c, Generator& gen, DType dtype, Device device) {
  const std::vector<int64_t> rev(c.block_out_channels.rbegin(), c.block_out_channels.rend());
  const size_t nb = rev.size();
  register_module("conv_in", std::make_shared<nn::Conv2d>(c.latent_channels, rev[0], 3, 1, 1, true, gen, dtype, device));
  register_module("mid_block", std::make_shared<VaeMidBlock>(rev[0], c, gen, dtype, device));
  auto up = std::make_shared<nn::ModuleList>();
  for (size_t i = 0; i < nb; ++i)
    up->push_back(std::make_shared<UpDecoderBlock2D>(i == 0 ? rev[0] : rev[i - 1], rev[i], i + 1 < nb, c, gen, dtype,
                                                     device));
  register_module("up_blocks", up);
  register_module("conv_norm_out", std::make_shared<nn::GroupNorm>(c.norm_num_groups, rev.back(), kVaeEps, true, dtype, device));
  register_module("conv_out", std::make_shared<nn::Conv2d>(rev.back(), c.out_channels, 3, 1, 1, true, gen, dtype, device));
}

Variable VaeDecoder::forward(const Variable& z) const {
  Variable h = child_as<nn::UnaryModule>("conv_in")->forward(z);
  h = child_as<nn::UnaryModule>("mid_block")->forward(h);
  const auto up = child_as<nn::ModuleList>("up_blocks");
  for (int64_t i = 0; i < up->size(); ++i) h = up->at_as<UpDecoderBlock2D>(i)->forward(h);
  h = silu(child_as<nn::UnaryModule>("conv_norm_out")->forward(h));
  return child_as<nn::UnaryModule>("conv_out")->forward(h);
}

// ---- AutoencoderKL --------------------------------------------------------------------------------

AutoencoderKL::AutoencoderKL(const AutoencoderKLConfig& config, Generator& gen, DType dtype, Device device)
    : config_(config) {
  const auto& c = config_;
  register_module("encoder", std::make_shared<VaeEncoder>(c, gen, dtype, device));
  register_module("decoder", std::make_shared<VaeDecoder>(c, gen, dtype, device));
  if (c.use_quant_conv)
    register_module("quant_conv", std::make_shared<nn::Conv2d>(2 * c.latent_channels, 2 * c.latent_channels, 1, 1, 0,
                                                               true, gen, dtype, device));
  if (c.use_post_quant_conv)
    register_module("post_quant_conv",
                    std::make_shared<nn::Conv2d>(c.latent_channels, c.latent_channels, 1, 1, 0, true, gen, dtype, device));
}

Variable AutoencoderKL::encode(const Variable& image) const {
  LOOM_CHECK(image.defined() && image.dim() == 4 && image.size(1) == config_.in_channels,
             "AutoencoderKL.encode: expected an image [N, ", config_.in_channels, ", H, W], got ",
             image.defined() ? image.shape() : Shape{});
  Variable h = child_as<nn::UnaryModule>("encoder")->forward(image);
  if (find_module("quant_conv")) h = child_as<nn::UnaryModule>("quant_conv")->forward(h);
  return h;
}

Variable AutoencoderKL::decode(const Variable& z) const {
  LOOM_CHECK(z.defined() && z.dim() == 4 && z.size(1) == config_.latent_channels,
             "AutoencoderKL.decode: expected latents [N, ", config_.latent_channels, ", h, w], got ",
             z.defined() ? z.shape() : Shape{});
  Variable h = z;
  if (find_module("post_quant_conv")) h = child_as<nn::UnaryModule>("post_quant_conv")->forward(h);
  return child_as<nn::UnaryModule>("decoder")->forward(h);
}

// ---- latents ---------------------------------------------------------------------------------------

LatentPosterior latent_posterior(const Tensor& moments) {
  LOOM_CHECK(moments.defined() && moments.dim() == 4 && moments.size(1) % 2 == 0,
             "latent_posterior: expected moments [N, 2·latent, h, w], got ", moments.defined() ? moments.shape() : Shape{});
  const int64_t half = moments.size(1) / 2;
  LatentPosterior p;
  p.mean = moments.narrow(1, 0, half).contiguous();
  const Tensor logvar = moments.narrow(1, half, half).contiguous();
  const Tensor lo = Tensor::full(logvar.shape(), -30.0, logvar.dtype(), logvar.device());
  const Tensor hi = Tensor::full(logvar.shape(), 20.0, logvar.dtype(), logvar.device());
  p.logvar = ops::minimum(ops::maximum(logvar, lo), hi);
  return p;
}

Tensor LatentPosterior::std() const { return ops::exp(ops::mul_scalar(logvar, 0.5)); }

Tensor LatentPosterior::sample(Generator& gen) const {
  const Tensor noise = Tensor::randn(mean.shape(), gen, mean.dtype()).to(mean.device());
  return ops::add(mean, ops::mul(std(), noise));
}

Tensor scale_latents(const Tensor& z, const AutoencoderKLConfig& c) {
  return ops::mul_scalar(ops::add_scalar(z, -c.shift_factor), c.scaling_factor);
}

Tensor unscale_latents(const Tensor& latents, const AutoencoderKLConfig& c) {
  return ops::add_scalar(ops::mul_scalar(latents, 1.0 / c.scaling_factor), c.shift_factor);
}

// ---- loading -----------------------------------------------------------------------------------------

int rename_deprecated_attention_keys(std::map<std::string, Tensor>& weights) {
  static const std::pair<const char*, const char*> renames[] = {
      {"query", "to_q"}, {"key", "to_k"}, {"value", "to_v"}, {"proj_attn", "to_out.0"}};
  std::vector<std::pair<std::string, std::string>> moves;
  for (const auto& [name, t] : weights) {
    // encoder.mid_block.attentions.0.query.weight -> encoder.mid_block.attentions.0.to_q.weight
    const size_t at = name.find("mid_block.attentions.");
    if (at == std::string::npos) continue;
    const size_t idx_end = name.find('.', at + 21);
    if (idx_end == std::string::npos) continue;
    const std::string head = name.substr(0, idx_end + 1), rest = name.substr(idx_end + 1);
    for (const auto& [old_name, new_name] : renames)
      for (const char* suffix : {".weight", ".bias"})
        if (rest == std::string(old_name) + suffix) moves.emplace_back(name, head + new_name + suffix);
  }
  for (const auto& [from, to] : moves) {
    LOOM_CHECK(!weights.count(to), "the weights hold both '", from, "' and '", to, "' (old and new names of one tensor)");
    auto node = weights.extract(from);
    node.key() = to;
    weights.insert(std::move(node));
  }
  return int(moves.size());
}

bool is_vae_dir(const std::string& dir) { return io::config_json::dir_has_class(dir, "AutoencoderKL"); }

LoadedVae load_vae_dir(const std::string& dir, const VaeLoadOptions& options) {
  const fs::path config_path = fs::path(dir) / "config.json";
  if (!fs::is_regular_file(config_path))
    throw io::FileError(config_path.string(), "missing (a VAE directory holds diffusers' config.json)");
  LoadedVae r;
  const auto config = io::config_json::read_config_file<AutoencoderKLConfig>(config_path.string());
  r.notes = config.notes;
  Generator gen(0);  // the initial values are overwritten by the load
  r.model = std::make_shared<AutoencoderKL>(config, gen, options.dtype, options.device);
  auto weights = read_model_weights(dir, options.variant, r.weight_files, "VAE", r.notes);
  const std::string file = r.weight_files.empty() ? dir : r.weight_files.front();
  try {
    if (const int renamed = rename_deprecated_attention_keys(weights))
      r.notes.push_back(file + ": " + std::to_string(renamed) +
                        " keys of the deprecated attention naming (query/key/value/proj_attn) read as to_q/to_k/to_v/to_out.0");
    r.model->load_state_dict(weights, true);
  } catch (const Error& e) {
    throw io::FileError(file, e.what());
  }
  return r;
}

}  // namespace loom::unet
