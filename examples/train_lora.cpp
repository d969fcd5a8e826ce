// train_lora: teach a LoRA adapter a hidden change of a small Transformer2DModel with a
// hand-written training loop, save it as a PEFT file, and load it back.
//
//   train_lora [--device D] [--precision P] [out.safetensors]   (default: lora_example.safetensors)
//
// --device / --precision as for `loom train` (examples/example_flags.h): the model is stored in
// the precision's dtype on the device, the adapter and the optimizer state stay f32, the loss is
// computed in f32, and f16 uses dynamic loss scaling (optim::GradScaler).
//
// A diffusers/PEFT user would write roughly:
//   model = Transformer2DModel(...); model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_v"]))
//   opt = torch.optim.AdamW(params, lr=1e-2); for step ...: loss.backward(); opt.step()
//   save_file(get_peft_model_state_dict(model), path)
#include <cmath>
#include <cstdio>
#include <optional>
#include <string>

#include "adapters/lora.h"
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
  const examples::ExampleFlags flags =
      examples::parse_example_flags(argc, argv, "train_lora [--device D] [--precision P] [out.safetensors]");
  const std::string out_path = flags.positional.empty() ? "lora_example.safetensors" : flags.positional[0];
  const trainer::Placement& where = flags.where;
  const DType act = storage_dtype(where.precision);  // weights and activations
  try {
    // 1. The base model, with seeded weights (a real run would use io::load_model_dir), moved to
    //    the device in the precision's storage dtype (model.to(device, dtype) in PyTorch).
    const uint64_t seed = 42;
    Generator model_gen(seed);
    auto model = std::make_shared<Transformer2DModel>(small_config(), model_gen);
    trainer::place_model(*model, where);

    // 2. A "teacher": the same base weights plus a hidden rank-2 change of attn2.to_v.
    //    Its outputs are the targets the adapter has to learn to reproduce.
    Generator teacher_gen(seed);
    Transformer2DModel teacher(small_config(), teacher_gen);
    const std::string to_v = "transformer_blocks.0.attn2.to_v.weight";
    Generator gen(7);
    const Tensor w = teacher.find_parameter(to_v).tensor();
    const Tensor change = ops::matmul(Tensor::randn({w.size(0), 2}, gen, DType::F32, Device::cpu(), 0.0, 0.5),
                                      Tensor::randn({2, w.size(1)}, gen, DType::F32, Device::cpu(), 0.0, 0.5));
    teacher.set_parameter_data(to_v, ops::add(w, change));
    trainer::place_model(teacher, where);

    // 3. Random inputs: latents [B, C, H, W] and text context [B, tokens, 12], on the device.
    const Variable x(Tensor::randn({2, 8, 4, 4}, gen).to(where.device).to(act));
    const Variable context(Tensor::randn({2, 6, 12}, gen).to(where.device).to(act));
    Tensor target;
    {
      NoGradGuard no_grad;  // like torch.no_grad()
      target = teacher.forward(x, context).tensor();
    }

    // 4. Attach a LoRA: like peft's LoraConfig(r=4, lora_alpha=4, target_modules=["to_v"]).
    //    "to_v" matches attn1.to_v and attn2.to_v. Adding it freezes the base model;
    //    B starts at 0, so the model's output is unchanged until training moves it.
    adapters::LoraSet loras(model);
    adapters::LoraConfig config;
    config.rank = 4;
    config.alpha = 4.0;
    config.targets = {"to_v"};
    adapters::LoraAdapter& lora = loras.add("example", config, gen);
    std::printf("LoRA 'example': %zu modules, rank %lld\n", lora.modules().size(), (long long)config.rank);

    // 5. The optimizer over the adapter parameters only (torch.optim.AdamW(lora_params, lr=1e-2)).
    optim::OptimizerConfig oc;
    oc.lr = 1e-2;
    auto opt = optim::make_optimizer("adamw", loras.trainable_parameters(), oc);

    // 6. The training loop: forward, MSE loss (in f32 whatever the precision), backward, step.
    //    f16 scales the loss (torch.cuda.amp.GradScaler) and skips a step whose gradients overflow.
    std::optional<optim::GradScaler> scaler;
    if (where.precision == Precision::F16) scaler.emplace();
    std::vector<Variable> params;
    for (const auto& [name, v] : loras.trainable_parameters()) params.push_back(v);
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

    // 7. Save the adapter with PEFT key names (…to_v.lora_A.weight / lora_B.weight).
    io::save_lora(lora, *model, out_path, io::KeyFamily::Peft);
    std::printf("saved %s\n", out_path.c_str());

    // 8. Reload into a fresh copy of the base model (pipe.load_lora_weights(path)) and compare.
    Generator fresh_gen(seed);
    auto fresh = std::make_shared<Transformer2DModel>(small_config(), fresh_gen);
    trainer::place_model(*fresh, where);
    adapters::LoraSet fresh_loras(fresh);
    const io::AdapterLoadReport report = io::load_lora(fresh_loras, "example", out_path);
    std::printf("reloaded: %zu keys matched, clean: %s\n", report.matched.size(), report.clean() ? "yes" : "no");
    NoGradGuard no_grad;
    const double err = relative_error(fresh->forward(x, context).tensor().to(Device::cpu()).to(DType::F32),
                                      model->forward(x, context).tensor().to(Device::cpu()).to(DType::F32));
    std::printf("reloaded vs trained output: relative error %.3g\n", err);
    if (!(err <= 1e-5)) {
      std::fprintf(stderr, "error: the reloaded adapter gives different outputs\n");
      return 1;
    }
    return 0;
  } catch (const Error& e) {  // every loom failure (io::FileError included) is a loom::Error
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
