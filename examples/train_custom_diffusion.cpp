// train_custom_diffusion: teach Custom Diffusion's trainable cross-attention keys and values
// a hidden change of a small Transformer2DModel with a hand-written training loop, save the
// weights in diffusers' format, and load them back.
//
//   train_custom_diffusion [--device D] [--precision P] [out.safetensors]
//                                               (default: custom_diffusion_example.safetensors)
//
// --device / --precision as for `loom train` (examples/example_flags.h): the model is stored in
// the precision's dtype on the device, the trainable copies and the optimizer state in f32, the
// loss is computed in f32, and f16 uses dynamic loss scaling (optim::GradScaler).
//
// diffusers' train_custom_diffusion.py does the same with CustomDiffusionAttnProcessor on
// every attn2 (train_kv=True, train_q_out=False) and save_attn_procs / load_attn_procs.
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>

#include "adapters/custom_diffusion.h"
#include "attention/transformer.h"
#include "autograd/ops.h"
#include "examples/example_flags.h"
#include "io/adapter_io.h"
#include "optim/optim.h"
#include "tensor/ops.h"
#include "tensor/random.h"

using namespace loom;
using attention::Transformer2DConfig;
using attention::Transformer2DModel;

// The model's config.json, written in code: 8 channels, 2 heads of 8, text context of width 12.
Transformer2DConfig small_config() {
  Transformer2DConfig c;
  c.in_channels = 8;
  c.num_attention_heads = 2;
  c.attention_head_dim = 8;
  c.norm_num_groups = 4;
  c.cross_attention_dim = 12;
  return c;
}

// ||a − b|| / ||b||
double relative_error(const Tensor& a, const Tensor& b) {
  const Tensor d = ops::sub(a, b);
  return std::sqrt(ops::sum(ops::square(d)).item() / ops::sum(ops::square(b)).item());
}

int main(int argc, char** argv) {
  const examples::ExampleFlags flags = examples::parse_example_flags(
      argc, argv, "train_custom_diffusion [--device D] [--precision P] [out.safetensors]");
  const std::string out_path = flags.positional.empty() ? "custom_diffusion_example.safetensors" : flags.positional[0];
  const trainer::Placement& where = flags.where;
  const DType act = storage_dtype(where.precision);  // weights and activations
  try {
    // 1. The base model, with seeded weights (a real run would use io::load_model_dir), on the
    //    device in the precision's storage dtype.
    const uint64_t seed = 42;
    Generator model_gen(seed);
    auto model = std::make_shared<Transformer2DModel>(small_config(), model_gen);
    trainer::place_model(*model, where);

    // 2. A "teacher": the same base weights with attn2's key and value projections changed.
    Generator teacher_gen(seed);
    Transformer2DModel teacher(small_config(), teacher_gen);
    Generator gen(7);
    for (const char* name : {"transformer_blocks.0.attn2.to_k.weight", "transformer_blocks.0.attn2.to_v.weight"}) {
      const Tensor w = teacher.find_parameter(name).tensor();
      teacher.set_parameter_data(name, ops::add(w, Tensor::randn(w.shape(), gen, DType::F32, Device::cpu(), 0.0, 0.3)));
    }
    trainer::place_model(teacher, where);

    // 3. Random inputs: latents [B, C, H, W] and text context [B, tokens, 12], on the device.
    const Variable x(Tensor::randn({2, 8, 4, 4}, gen).to(where.device).to(act));
    const Variable context(Tensor::randn({2, 6, 12}, gen).to(where.device).to(act));
    Tensor target;
    {
      NoGradGuard no_grad;  // like torch.no_grad()
      target = teacher.forward(x, context).tensor();
    }

    // 4. Install Custom Diffusion processors on every attn2 ("crossattn_kv": trainable copies of
    //    to_k and to_v). The base model is frozen; the returned parameters are the trainable ones,
    //    named like diffusers' "…attn2.processor.to_k_custom_diffusion.weight".
    const auto trainable = adapters::apply_custom_diffusion(*model, "crossattn_kv");
    for (const auto& [name, p] : trainable) std::printf("trainable: %s %s\n", name.c_str(), p.str().c_str());

    // 5. The optimizer over those parameters only (torch.optim.AdamW(params, lr=1e-2)).
    optim::OptimizerConfig oc;
    oc.lr = 1e-2;
    auto opt = optim::make_optimizer("adamw", trainable, oc);

    // 6. The training loop: forward, MSE loss (in f32 whatever the precision), backward, step.
    //    f16 scales the loss (torch.cuda.amp.GradScaler) and skips a step whose gradients overflow.
    std::optional<optim::GradScaler> scaler;
    if (where.precision == Precision::F16) scaler.emplace();
    std::vector<Variable> params;
    for (const auto& [name, v] : trainable) params.push_back(v);
    const Variable target_f32(target.to(DType::F32));
    const int steps = 150;
    double first = 0.0, last = 0.0;
    for (int step = 0; step <= steps; ++step) {
      opt->zero_grad();
      const Variable loss = mse_loss(to_dtype(model->forward(x, context), DType::F32), target_f32);
      last = loss.tensor().item();
      if (step == 0) first = last;
      if (step % 25 == 0) std::printf("step %3d  loss %.6g\n", step, last);
      if (step == steps) break;  // the last pass only measures
      (scaler ? scaler->scale_loss(loss) : loss).backward();
      if (scaler && scaler->unscale(params)) {
        scaler->update(true);
        std::printf("step %3d  gradients overflowed: skipped, loss scale now %g\n", step, scaler->scale());
        continue;
      }
      opt->step();
      if (scaler) scaler->update(false);
    }
    std::printf("loss %.4g -> %.4g (%.2f%% of the start)\n", first, last, 100.0 * last / first);
    if (!(last < 0.05 * first)) {
      std::fprintf(stderr, "error: the loss did not fall below 5%% of its start\n");
      return 1;
    }

    // 7. Save the processor weights (unet.save_attn_procs: keys as in pytorch_custom_diffusion_weights).
    io::save_custom_diffusion(*model, out_path);
    std::printf("saved %s\n", out_path.c_str());

    // 8. Reload into a fresh copy of the base model (unet.load_attn_procs(path)): the processors
    //    are installed from what the file holds, then filled.
    Generator fresh_gen(seed);
    Transformer2DModel fresh(small_config(), fresh_gen);
    trainer::place_model(fresh, where);
    const io::AdapterLoadReport report = io::load_custom_diffusion(fresh, out_path);
    std::printf("reloaded: %zu keys matched, clean: %s\n", report.matched.size(), report.clean() ? "yes" : "no");
    NoGradGuard no_grad;
    const double err = relative_error(fresh.forward(x, context).tensor().to(Device::cpu()).to(DType::F32),
                                      model->forward(x, context).tensor().to(Device::cpu()).to(DType::F32));
    std::printf("reloaded vs trained output: relative error %.3g\n", err);
    if (!(err <= 1e-5)) {
      std::fprintf(stderr, "error: the reloaded weights give different outputs\n");
      return 1;
    }
    return 0;
  } catch (const Error& e) {  // every loom failure (io::FileError included) is a loom::Error
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
