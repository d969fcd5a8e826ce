// run_two_adapters: two LoRA adapters on one model at different weights, and what
// set_weight / disable / fuse / unfuse do to the output.
//
//   run_two_adapters [--device D] [--precision P] [style.safetensors subject.safetensors]
//
// --device / --precision as for `loom run` (examples/example_flags.h): the model is stored in the
// precision's dtype on the device (the adapters in f32, cast at the choke point); fusing rounds
// W + ΔW to that dtype, so "fused == unfused" is checked within the precision's rounding.
//
// Without files, two adapters with random weights are made. Files must fit the model below
// (train_lora writes such files). diffusers equivalent:
//   pipe.load_lora_weights(a, adapter_name="style"); pipe.load_lora_weights(b, adapter_name="subject")
//   pipe.set_adapters(["style", "subject"], adapter_weights=[0.7, 1.2]); pipe.fuse_lora(); pipe.unfuse_lora()
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>

#include "adapters/lora.h"
#include "attention/transformer.h"
#include "examples/example_flags.h"
#include "io/adapter_io.h"
#include "tensor/ops.h"
#include "tensor/random.h"

using namespace loom;
using attention::Transformer2DConfig;
using attention::Transformer2DModel;

// The same small model as train_lora (so its files load here).
Transformer2DConfig small_config() {
  Transformer2DConfig c;
  c.in_channels = 8;
  c.num_attention_heads = 2;
  c.attention_head_dim = 8;
  c.norm_num_groups = 4;
  c.cross_attention_dim = 12;
  return c;
}

double relative_error(const Tensor& a, const Tensor& b) {  // ||a − b|| / ||b||
  return std::sqrt(ops::sum(ops::square(ops::sub(a, b))).item() / ops::sum(ops::square(b)).item());
}
bool same_bits(const Tensor& a, const Tensor& b) {  // compared on the host
  const Tensor ca = a.to(Device::cpu()).contiguous(), cb = b.to(Device::cpu()).contiguous();
  return ca.shape() == cb.shape() && ca.dtype() == cb.dtype() &&
         std::memcmp(ca.raw_data(), cb.raw_data(), ca.numel() * itemsize(ca.dtype())) == 0;
}

int main(int argc, char** argv) {
  const examples::ExampleFlags flags = examples::parse_example_flags(
      argc, argv, "run_two_adapters [--device D] [--precision P] [style.safetensors subject.safetensors]");
  const trainer::Placement& where = flags.where;
  const DType act = storage_dtype(where.precision);
  const double tol = examples::rounding_tolerance(where.precision);
  try {
    NoGradGuard no_grad;  // inference only
    Generator model_gen(42);
    auto model = std::make_shared<Transformer2DModel>(small_config(), model_gen);
    trainer::place_model(*model, where);
    Generator gen(7);
    const Variable x(Tensor::randn({2, 8, 4, 4}, gen).to(where.device).to(act));
    const Variable context(Tensor::randn({2, 6, 12}, gen).to(where.device).to(act));
    // Outputs are compared on the host in f32.
    auto run = [&] { return model->forward(x, context).tensor().to(Device::cpu()).to(DType::F32); };
    const Tensor base = run();  // before any adapter
    std::map<std::string, Tensor> base_weights;
    for (const auto& [name, t] : model->state_dict()) base_weights[name] = t.clone();

    // 1. Two adapters in one LoraSet (a model holds one set; a set holds any number of adapters).
    adapters::LoraSet loras(model);
    if (flags.positional.size() >= 2) {
      io::load_lora(loras, "style", flags.positional[0]);
      io::load_lora(loras, "subject", flags.positional[1]);
    } else {
      // LoraConfig(r=4, lora_alpha=4, target_modules=[...]): "style" on every attention
      // projection, "subject" on the cross-attention keys and values only.
      adapters::LoraConfig style;
      style.alpha = 4.0;
      adapters::LoraConfig subject = style;
      subject.targets = {"attn2.to_k", "attn2.to_v"};
      loras.add("style", style, gen);
      loras.add("subject", subject, gen);
      // A fresh adapter has B = 0 (no effect); give B random values, as if it had been trained.
      for (const char* name : {"style", "subject"})
        for (const auto& [path, m] : loras.adapter(name).modules())
          m.up.tensor().copy_(Tensor::randn(m.up.shape(), gen, DType::F32, Device::cpu(), 0.0, 0.2));
    }
    for (const auto& name : loras.names())
      std::printf("adapter %-8s %zu modules\n", name.c_str(), loras.adapter(name).modules().size());

    // 2. Mix them: set_adapters(["style", "subject"], adapter_weights=[0.7, 1.2]).
    loras.set_weight("style", 0.7);
    loras.set_weight("subject", 1.2);
    const Tensor mixed = run();

    std::printf("\n%-34s %12s %12s\n", "setting", "vs base", "vs mixed");
    auto row = [&](const char* setting, const Tensor& out) {
      std::printf("%-34s %12.3g %12.3g\n", setting, relative_error(out, base), relative_error(out, mixed));
    };
    row("style 0.7 + subject 1.2", mixed);

    // 3. Switch one off without forgetting its weight (disable_adapters / enable_adapters).
    loras.disable("subject");
    const Tensor style_only = run();
    row("subject disabled", style_only);
    loras.enable("subject");

    // 4. Weight 0 skips an adapter entirely: both at 0 gives the base output bit for bit.
    loras.set_weight("style", 0.0);
    loras.set_weight("subject", 0.0);
    const Tensor zero = run();
    row("both at weight 0", zero);
    loras.set_weight("style", 0.7);
    loras.set_weight("subject", 1.2);

    // 5. fuse_lora(): W' = W + Σ w·s·B·A, computed once; the adapters are then skipped at run time.
    loras.fuse();
    const Tensor fused = run();
    row("fused (0.7 / 1.2)", fused);

    // 6. unfuse_lora(): the untouched copy of every base weight comes back.
    loras.unfuse();
    bool weights_restored = true;
    for (const auto& [name, t] : model->state_dict()) weights_restored = weights_restored && same_bits(t, base_weights.at(name));
    row("unfused", run());

    const double fuse_err = relative_error(fused, mixed);
    const bool zero_is_base = same_bits(zero, base);
    std::printf("\nfused == unfused (rel. error %.3g <= %g): %s\n", fuse_err, tol, fuse_err <= tol ? "yes" : "NO");
    std::printf("weight 0 == base, bit for bit: %s\n", zero_is_base ? "yes" : "NO");
    std::printf("unfuse restored every base weight bit for bit: %s\n", weights_restored ? "yes" : "NO");
    return fuse_err <= tol && zero_is_base && weights_restored ? 0 : 1;
  } catch (const Error& e) {  // every loom failure (io::FileError included) is a loom::Error
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
