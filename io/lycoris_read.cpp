// LyCORIS (LoHa, LoKr) and DoRA pieces of adapter files: which kind a module's keys make,
// LoHa / LoKr modules from their factors, DoRA magnitudes and their norm convention.
#include <sstream>

#include "adapters/lycoris.h"
#include "io/adapter_detail.h"
#include "nn/conv.h"

namespace loom::io::detail {

using adapters::DoraNorm;
using adapters::LoraModule;
using adapters::ModuleKind;

std::map<std::string, Shape> model_weight_shapes(const nn::Module& model) {
  std::map<std::string, Shape> out;
  for (const auto& [path, m] : model.named_modules()) {
    if (auto l = std::dynamic_pointer_cast<nn::Linear>(m)) out[path] = {l->out_features(), l->in_features()};
    if (auto c = std::dynamic_pointer_cast<nn::Conv2d>(m)) out[path] = c->weight().shape();
  }
  return out;
}

double machine_epsilon(DType dtype) {
  switch (dtype) {
    case DType::F64: return 2.220446049250313e-16;
    case DType::F16: return 9.765625e-04;
    case DType::BF16: return 7.8125e-03;
    default: return 1.1920928955078125e-07;  // f32 (and what LyCORIS casts integer tensors to)
  }
}

void add_piece(Pieces& p, const LoraKey& k, const std::string& key, const Tensor& tensor) {
  switch (k.role) {
    case Role::Down: p.down = tensor, p.down_key = key; break;
    case Role::Up: p.up = tensor, p.up_key = key; break;
    case Role::Factor: p.factors[k.name] = tensor, p.factor_keys[k.name] = key; break;
    case Role::Magnitude: p.magnitude = tensor, p.magnitude_key = key, p.magnitude_name = k.name; break;
    case Role::Alpha: break;  // resolved by the caller (alpha_value names the key on errors)
  }
}

ModuleKind pieces_kind(const Pieces& p, const std::string& path, const std::string& module) {
  bool loha = false, lokr = false;
  for (const auto& [name, t] : p.factors) {
    if (name == "hada_t1" || name == "hada_t2" || name == "lokr_t1" || name == "lokr_t2")
      throw FileError(path, "key '" + p.factor_keys.at(name) + "': LyCORIS' Tucker form (" + name +
                                ") is not supported; only LoHa / LoKr without hada_t* / lokr_t* factors are read");
    (name.rfind("hada_", 0) == 0 ? loha : lokr) = true;
  }
  const bool lora = p.down.defined() || p.up.defined();
  if (int(loha) + int(lokr) + int(lora) > 1)
    throw FileError(path, "module '" + module + "' mixes " + std::string(lora ? "LoRA (lora_down/lora_up) " : "") +
                              (loha ? "LoHa (hada_*) " : "") + (lokr ? "LoKr (lokr_*) " : "") +
                              "keys; a module holds one kind of adapter");
  return loha ? ModuleKind::LoHa : lokr ? ModuleKind::LoKr : ModuleKind::LoRA;
}

std::optional<LoraModule> lycoris_module(const Pieces& p, ModuleKind kind, const Shape& weight_shape,
                                         const std::string& module, std::string& problem) {
  LoraModule m;
  m.kind = kind;
  for (const auto& [name, t] : p.factors) m.factors[name] = Variable(t);
  // Messages name the keys as the file spells them: "<key's module name>.<factor>".
  const std::string& any_key = p.factor_keys.begin()->second;
  const std::string key_module = any_key.substr(0, any_key.size() - p.factor_keys.begin()->first.size() - 1);
  try {
    adapters::check_module_shapes("module " + module, key_module, m, weight_shape);
  } catch (const Error& e) {
    problem = e.what();
    return std::nullopt;
  }
  return m;
}

bool attach_magnitude(const Pieces& p, LoraModule& m, const Shape& weight_shape, const std::string& module,
                      std::string& problem) {
  if (!p.magnitude.defined()) return true;
  const Shape s = p.magnitude.shape();
  const int64_t out = weight_shape.at(0), in = weight_shape.at(1);
  m.magnitude = Variable(p.magnitude);
  m.magnitude_name = p.magnitude_name;
  if (p.magnitude_name == "lora_magnitude_vector") {  // PEFT: one per output row, no eps
    m.dora_norm = DoraNorm::PerOutput;
    m.dora_eps = 0.0;
    if (p.magnitude.numel() == out) return true;
  } else {  // LyCORIS dora_scale: (out, 1, …) per output row, (1, in, …) per input channel
    m.dora_eps = machine_epsilon(p.magnitude.dtype());
    if (!s.empty() && s[0] == out && p.magnitude.numel() == out) {
      m.dora_norm = DoraNorm::PerOutput;
      return true;
    }
    if (s.size() >= 2 && s[0] == 1 && s[1] == in && p.magnitude.numel() == in) {
      m.dora_norm = DoraNorm::PerInput;
      return true;
    }
  }
  std::ostringstream os;
  os << "key '" << p.magnitude_key << "' (DoRA magnitude of '" << module << "') has shape " << s
     << "; a weight " << weight_shape << " needs "
     << (p.magnitude_name == "lora_magnitude_vector" ? "(" + std::to_string(out) + ")"
                                                     : "(" + std::to_string(out) + ", 1, …) or (1, " + std::to_string(in) + ", …)");
  problem = os.str();
  return false;
}

}  // namespace loom::io::detail
