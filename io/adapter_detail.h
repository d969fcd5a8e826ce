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

// ---- key families (io/adapter_keys.cpp) ------------------------------------------------------
enum class Role { Down, Up, Alpha };

// A LoRA key taken apart: the module's path in the full model (prefix included, no
// "unet."), what the tensor is, and the spelling it came in.
struct LoraKey {
  std::string module;
  Role role;
  KeyFamily family;
};

// Strips the component prefixes diffusers and PEFT put in front of UNet keys
// ("unet.", "base_model.model.", "base_model.model.unet.").
std::string strip_component(const std::string& key);
// Keys of the diffusers, legacy diffusers and PEFT spellings.
std::optional<LoraKey> parse_non_kohya(const std::string& key);
// A kohya key taken apart into its flattened module name ("lora_unet_…_to_q") and role;
// nullopt when the part after the first dot is not lora_down.weight / lora_up.weight / alpha.
std::optional<std::pair<std::string, Role>> split_kohya_key(const std::string& key);
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
};

// ---- writing (io/lora_write.cpp) --------------------------------------------------------------
// Writes `lora` in `family` (safetensors, or loom HDF5 with per-module attributes and `root`).
void write_raw_lora(const std::string& path, const RawLora& lora, KeyFamily family, Attributes root,
                    const WriteOptions& options = {});

// ---- load reports (io/adapter_report.cpp) ------------------------------------------------------
[[noreturn]] void strict_fail(const std::string& path, const std::string& problem);
// Throws FileError for the first shape mismatch, unmatched key or non-finite key of `r`.
void check_strict(const AdapterLoadReport& r, const std::string& path);

}  // namespace loom::io::detail
