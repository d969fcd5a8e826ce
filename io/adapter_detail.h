// Internals shared by the adapter-file readers and writers of io/ (not a public header).
// One section per concern, each implemented in its own file:
//   names and key families  io/adapter_keys.cpp
//   alpha resolution         io/adapter_alpha.cpp
//   load reports             io/adapter_report.cpp
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>

#include "io/adapter_io.h"
#include "nn/linear.h"

namespace loom::io::detail {

// ---- strings and paths (io/adapter_keys.cpp) ------------------------------------------------
bool starts_with(const std::string& s, const std::string& p);
bool ends_with(const std::string& s, const std::string& p);
std::string underscored(std::string s);  // dots -> underscores (kohya's flattening)
std::string join_path(const std::string& prefix, const std::string& path);

// Every Linear (Conv1x1 included) of a model, by path.
std::map<std::string, std::shared_ptr<nn::Linear>> model_linears(const nn::Module& model);
// The weight shape of every module an adapter can change, by path: (out, in) for a Linear
// (Conv1x1 included), (out, in, kh, kw) for a Conv2d (io/lycoris_read.cpp).
std::map<std::string, Shape> model_weight_shapes(const nn::Module& model);

// ---- key families (io/adapter_keys.cpp) ------------------------------------------------------
// Down / Up / Alpha of a LoRA; Factor: a LyCORIS tensor (hada_w1_a, lokr_w2, hada_t1, …);
// Magnitude: DoRA's (PEFT lora_magnitude_vector, LyCORIS / kohya dora_scale).
enum class Role { Down, Up, Alpha, Factor, Magnitude };

// A LoRA key taken apart: the module's path in the full model (prefix included, no
// "unet."), what the tensor is, and the spelling it came in.
struct LoraKey {
  std::string module;
  Role role;
  KeyFamily family;
  std::string name = "";  // Factor / Magnitude: the key's suffix (hada_w1_a, dora_scale, lora_magnitude_vector)
};

// Strips the component prefixes diffusers and PEFT put in front of UNet keys
// ("unet.", "base_model.model.", "base_model.model.unet.").
std::string strip_component(const std::string& key);
// Keys of the diffusers, legacy diffusers and PEFT spellings.
std::optional<LoraKey> parse_non_kohya(const std::string& key);
// A kohya key taken apart into its flattened module name ("lora_unet_…_to_q") and role;
// nullopt when the part after the first dot is not lora_down.weight / lora_up.weight / alpha
// or a LyCORIS name (hada_*, lokr_*, dora_scale: Role Factor / Magnitude, see lycoris_role).
std::optional<std::pair<std::string, Role>> split_kohya_key(const std::string& key);
// The role of a LyCORIS key suffix ("hada_w1_a" … "lokr_t2": Factor; "dora_scale": Magnitude).
std::optional<Role> lycoris_role(const std::string& suffix);
// Whether a key belongs to a text encoder (kohya lora_te…, diffusers/PEFT text_encoder…).
bool is_text_encoder_key(const std::string& key);

// ---- alpha resolution (io/adapter_alpha.cpp) ----------------------------------------------------
// LoRA settings from PEFT's adapter config in the safetensors metadata (keys with or without "unet.").
struct PeftConfig {
  std::optional<int64_t> r;
  std::optional<double> lora_alpha;
  std::map<std::string, int64_t> rank_pattern;
  std::map<std::string, double> alpha_pattern;
  bool use_rslora = false;
  bool present = false;
};
PeftConfig peft_config(const TensorFile& file, const std::string& path);

// Whether the file says it is loom's own HDF5 format.
bool is_loom_file(const TensorFile& file);

// The alpha and scaling convention of the module at `full` (prefix included), from the first
// source that has them: loom's per-module group attributes, a `.alpha` key, PEFT's metadata.
// An alpha that is not a finite number is a FileError naming `path` and the module.
void resolve_alpha(const TensorFile& file, const std::string& path, const PeftConfig& peft, const std::string& full,
                   const std::optional<double>& key_alpha, std::optional<double>& alpha, bool& use_rslora);

// The value of an `.alpha` key: one finite number (0-d, or a 1-element vector), else a FileError
// naming `path` and `key` (empty, several values, NaN, Inf).
double alpha_value(const Tensor& t, const std::string& path, const std::string& key);

// Throws (naming `out`) unless every module of `lora` has finite weights and a finite alpha and
// scale: writers never write what readers would refuse.
void check_writable(const RawLora& lora, const std::string& out);

// ---- collecting a module's tensors ----------------------------------------------------------
// A 2-D LoRA matrix from a 2-D or (·, ·, 1, 1) tensor.
std::optional<Tensor> as_matrix(const Tensor& t);

// One module's pieces as they are collected from the file.
struct Pieces {
  std::string down_key, up_key;
  Tensor down, up;
  std::optional<double> alpha;
  std::map<std::string, Tensor> factors;  // LyCORIS tensors by name (hada_w1_a, lokr_w1, …)
  std::map<std::string, std::string> factor_keys;
  Tensor magnitude;  // DoRA
  std::string magnitude_key, magnitude_name;
  bool empty_module() const { return !down.defined() && !up.defined() && factors.empty(); }
};

// ---- LyCORIS and DoRA pieces (io/lycoris_read.cpp) ----------------------------------------------
// Files a tensor of `key` (parsed as `k`) into `p`.
void add_piece(Pieces& p, const LoraKey& k, const std::string& key, const Tensor& tensor);
// The kind the pieces make (LoRA when they hold down / up); throws FileError naming `path` and the
// keys when they mix kinds or use LyCORIS' Tucker form (hada_t1/t2, lokr_t1/t2), not supported.
adapters::ModuleKind pieces_kind(const Pieces& p, const std::string& path, const std::string& module);
// A LoHa / LoKr module from its pieces (factors as in the file; rank filled); the shapes are
// checked against `weight_shape` ((out, in) or (out, in, kh, kw)): an error message naming the
// key and both shapes is returned in `problem` (and nullopt) when they do not fit.
std::optional<adapters::LoraModule> lycoris_module(const Pieces& p, adapters::ModuleKind kind, const Shape& weight_shape,
                                                   const std::string& module, std::string& problem);
// Adds the DoRA magnitude of `p` to `m` (PEFT lora_magnitude_vector: one per output row, no eps;
// LyCORIS dora_scale: (out, 1, …) per output row or (1, in, …) per input channel, plus the
// machine epsilon of its stored dtype); false with `problem` set when its shape fits neither.
bool attach_magnitude(const Pieces& p, adapters::LoraModule& m, const Shape& weight_shape, const std::string& module,
                      std::string& problem);
// The machine epsilon of a floating dtype (LyCORIS adds torch.finfo(dtype).eps to DoRA's norm).
double machine_epsilon(DType dtype);

// ---- writing (io/lora_write.cpp) --------------------------------------------------------------
// Writes `lora` in `family` (safetensors, or loom HDF5 with per-module attributes and `root`).
void write_raw_lora(const std::string& path, const RawLora& lora, KeyFamily family, Attributes root,
                    const WriteOptions& options = {});

// ---- load reports (io/adapter_report.cpp) ------------------------------------------------------
[[noreturn]] void strict_fail(const std::string& path, const std::string& problem);
// Throws FileError for the first shape mismatch, unmatched key or non-finite key of `r`.
void check_strict(const AdapterLoadReport& r, const std::string& path);

}  // namespace loom::io::detail
