// `loom inspect` and `loom gradcheck` (examples/cli_inspect.h).
#include "examples/cli_inspect.h"

#include <algorithm>
#include <iomanip>
#include <iostream>
#include <memory>
#include <sstream>
#include <variant>
#include <vector>

#include "adapters/custom_diffusion.h"
#include "adapters/lora.h"
#include "attention/attention.h"
#include "autograd/gradcheck.h"
#include "autograd/op_cases.h"
#include "examples/cli_common.h"
#include "io/adapter_io.h"
#include "io/checkpoint.h"
#include "trainer/trainer.h"

namespace loom::cli {

namespace {

// ---- inspect -------------------------------------------------------------------------------------

std::string attr_text(const io::AttrValue& v) {
  std::ostringstream os;
  std::visit([&](const auto& x) { os << x; }, v);
  return os.str();
}

}  // namespace

int run_inspect(const std::string& path) {
  const io::FileFormat format = io::detect_format(path);
  const io::TensorFile f = io::read_tensor_file(path);
  std::cout << path << "\n  format   " << io::format_name(format) << "\n  tensors  " << f.tensors.size() << "\n";
  for (const auto& [k, v] : f.attributes) std::cout << "  attr     " << k << " = " << attr_text(v) << "\n";
  for (const auto& [k, v] : f.metadata) {
    std::string shown = v.size() > 200 ? v.substr(0, 200) + "…" : v;
    std::replace(shown.begin(), shown.end(), '\n', ' ');
    std::cout << "  metadata " << k << " = " << shown << "\n";
  }
  const auto kind = f.attributes.find("kind");
  if (kind != f.attributes.end() && attr_text(kind->second) == "checkpoint") {
    const io::Checkpoint c = io::load_checkpoint(path);
    const trainer::TrainOptions o = trainer::TrainOptions::from_json(c.options_json);
    std::cout << "  kind     training checkpoint (resume with: loom train --model DIR --data FILE --resume DIR)\n"
              << "  step     " << c.step << " of " << o.steps << " planned\n"
              << "  adapter  " << c.adapter_kind << ", " << c.adapter.size() << " tensors"
              << (c.adapter_kind == "lora" ? ", rank " + std::to_string(o.rank) : std::string()) << "\n"
              << "  options  optimizer " << o.optimizer << ", lr " << o.lr << ", scheduler " << o.scheduler
              << " (warm-up " << o.warmup_steps << "), batch size " << o.batch_size << " x " << o.grad_accum
              << ", seed " << o.seed << "\n"
              << "  losses   " << c.losses.size();
    if (!c.losses.empty()) std::cout << " (first " << c.losses.front() << ", last " << c.losses.back() << ")";
    std::cout << "\n";
  } else if (io::is_custom_diffusion_file(f)) {
    std::cout << "  family   custom-diffusion\n";
  } else {
    const io::RawLora lora = io::read_raw_lora(f, path);
    if (!lora.modules.empty()) {
      std::cout << "  family  ";
      for (auto fam : lora.families) std::cout << " " << io::family_name(fam);
      std::cout << "\n  modules  " << lora.modules.size() << " (kind, rank, alpha, scale)\n";
      for (const auto& [p, m] : lora.modules)
        std::cout << "    " << p << "  " << m.kind_text() << "  r=" << m.rank()
                  << "  alpha=" << (m.alpha ? std::to_string(*m.alpha) : "none") << "  scale=" << m.scale()
                  << (m.use_rslora ? " (rsLoRA)" : "")
                  << (m.magnitude.defined() ? "  magnitude=" + m.magnitude_name : std::string()) << "\n";
    }
  }
  std::cout << "  tensors (name, dtype, shape):\n";
  for (const auto& [k, t] : f.tensors) std::cout << "    " << k << "  " << t.dtype() << "  " << t.shape() << "\n";
  return 0;
}

// ---- gradcheck -------------------------------------------------------------------------------------

int run_gradcheck(const std::string& filter) {
  struct Row {
    std::string name;
    GradcheckResult r;
  };
  std::vector<Row> rows;
  Generator gen(2024);
  for (const cases::OpCase& c : cases::op_cases()) {
    if (!filter.empty() && c.name().find(filter) == std::string::npos) continue;
    rows.push_back({c.name(), gradcheck(c.fn, cases::make_inputs(c, gen, DType::F64, Device::cpu()))});
  }
  // Layers: an attention layer (self, cross with mask, added-KV), a LoRA-adapted one, Custom Diffusion.
  auto layer_case = [&](const std::string& name, attention::AttentionOptions o, bool context, bool lora, bool cd) {
    if (!filter.empty() && name.find(filter) == std::string::npos) return;
    o.dtype = DType::F64;
    auto attn = std::make_shared<attention::Attention>(o, gen);
    std::unique_ptr<adapters::LoraSet> set;
    std::vector<Variable> inputs{Variable(Tensor::randn({2, 3, o.query_dim}, gen, DType::F64), true)};
    if (o.added_kv_proj_dim) inputs[0] = Variable(Tensor::randn({2, o.query_dim, 3}, gen, DType::F64), true);
    // Custom Diffusion blocks the K/V gradient at context position 0 by design, so its context is
    // not a gradcheck input there (the finite differences would see through the block).
    if (context)
      inputs.emplace_back(Tensor::randn({2, 4, o.added_kv_proj_dim.value_or(o.query_dim)}, gen, DType::F64), !cd);
    if (lora) {
      set = std::make_unique<adapters::LoraSet>(attn);
      adapters::LoraConfig cfg;
      cfg.rank = 2, cfg.alpha = 4.0;
      for (const auto& [n, m] : set->add("l", cfg, gen).modules()) {
        m.up.tensor().copy_(Tensor::randn(m.up.shape(), gen, DType::F64));
        inputs.push_back(m.down), inputs.push_back(m.up);
      }
    }
    if (cd) {
      attn->set_processor(std::make_shared<adapters::CustomDiffusionProcessor>(*attn, adapters::CustomDiffusionOptions{}));
      for (const auto& [n, p] : attn->named_parameters())
        if (n.find("_custom_diffusion") != std::string::npos && n.find("to_q") != std::string::npos) {
          Variable v = p;
          inputs.push_back(v.set_requires_grad(true));
        }
    }
    rows.push_back({name, gradcheck([&](const std::vector<Variable>& v) {
                      return attn->forward(v[0], context ? v[1] : Variable());
                    }, inputs)});
  };
  attention::AttentionOptions base;
  base.query_dim = 4, base.heads = 2, base.dim_head = 2;
  layer_case("layer_attention_self", base, false, false, false);
  layer_case("layer_attention_cross", base, true, false, false);
  auto added = base;
  added.added_kv_proj_dim = 3, added.norm_num_groups = 2;
  layer_case("layer_attention_added_kv", added, true, false, false);
  layer_case("layer_attention_lora", base, true, true, false);
  layer_case("layer_custom_diffusion", base, true, false, true);

  if (rows.empty()) throw UsageError("gradcheck: --filter '" + filter + "' selects no check");
  int failed = 0;
  std::cout << std::left << std::setw(34) << "check" << std::setw(8) << "result" << std::setw(12) << "entries"
            << "max |analytic - numeric|\n";
  for (const Row& r : rows) {
    failed += !r.r.ok;
    std::cout << std::setw(34) << r.name << std::setw(8) << (r.r.ok ? "ok" : "FAIL") << std::setw(12)
              << r.r.entries_checked << std::scientific << std::setprecision(2) << r.r.max_abs_error
              << std::defaultfloat << (r.r.ok ? "" : "   " + r.r.message) << "\n";
  }
  std::cout << rows.size() - size_t(failed) << "/" << rows.size()
            << " gradient checks passed (f64 central differences, eps 1e-6, atol 1e-5, rtol 1e-3)\n";
  return failed ? 4 : 0;
}

}  // namespace loom::cli
