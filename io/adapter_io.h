// Adapter files: every LoRA key family of SPEC §5 read (also mixed in one file), PEFT,
// diffusers, kohya and loom HDF5 written; Custom Diffusion files; model directories; load reports.
//
// Key families (one `to_q` of `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1`):
//   diffusers legacy  unet.….attn1.processor.to_q_lora.down.weight / .up.weight (to_out_lora = to_out.0)
//   diffusers         unet.….attn1.to_q.lora.down.weight / .lora.up.weight (+ unet.….to_q.alpha)
//   PEFT              unet.….attn1.to_q.lora_A.weight / .lora_B.weight (+ lora_adapter_metadata JSON)
//   kohya             lora_unet_down_blocks_0_…_attn1_to_q.lora_down.weight / .lora_up.weight / .alpha
//   LyCORIS (kohya names) lora_unet_…_to_q.hada_w1_a / hada_w1_b / hada_w2_a / hada_w2_b (LoHa),
//                     .lokr_w1 (or lokr_w1_a, lokr_w1_b) / .lokr_w2 (or _a, _b) (LoKr), .alpha, .dora_scale
//   DoRA (PEFT)       unet.….to_q.lora_magnitude_vector beside lora_A / lora_B
// (formulas in adapters/lycoris.h and docs/io.md).
//   Custom Diffusion  down_blocks.0.…attn2.processor.to_k_custom_diffusion.weight (no `unet.`)
// Keys are read relative to an optional prefix (e.g. "down_blocks.0.attentions.0"): keys
// under other blocks are counted as outside the prefix, not as unmatched.
//
// Implementation, by concern: key families io/adapter_keys.cpp, alphas io/adapter_alpha.cpp,
// reports io/adapter_report.cpp, reading io/lora_read.cpp, writing io/lora_write.cpp,
// conversion io/adapter_convert.cpp, Custom Diffusion io/custom_diffusion_io.cpp, model
// directories io/model_dir.cpp; shared internals in io/adapter_detail.h.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "adapters/lora.h"
#include "attention/transformer.h"
#include "io/tensor_file.h"
#include "nn/module.h"

namespace loom::io {

enum class KeyFamily { DiffusersLegacy, Diffusers, Peft, Kohya, CustomDiffusion, Loom };
const char* family_name(KeyFamily f);
// The family a `--to` name asks for: "diffusers", "peft", "kohya" or "loom" (others: Error).
KeyFamily parse_family(const std::string& name);

struct KeyShapeMismatch {
  std::string key;
  Shape expected, got;
};

struct AdapterLoadReport {
  std::string file;
  std::set<KeyFamily> families;
  std::vector<std::string> matched;         // file keys used
  std::vector<std::string> unmatched;       // keys (inside the prefix) that fit no module of the model
  std::vector<std::string> outside_prefix;  // keys of other blocks, skipped
  std::vector<std::string> text_encoder;    // text-encoder keys (lora_te…, text_encoder…): not for this model
  std::vector<KeyShapeMismatch> shape_mismatches;
  std::map<std::string, double> alphas_found;  // module path -> alpha (from .alpha keys or metadata)
  std::vector<std::string> alphas_defaulted;   // module paths without alpha (scale 1)
  std::vector<std::string> non_finite;         // keys holding NaN or Inf
  // Modules whose keys do not make an adapter (a LoHa / LoKr factor missing or of a shape that
  // does not fit the module, a DoRA magnitude of the wrong shape): messages naming key and shapes.
  std::vector<std::string> malformed;
  std::map<std::string, std::string> kinds;    // module path -> "LoHa", "LoKr", "LoRA+DoRA", … (not plain LoRA)
  std::vector<std::string> notes;              // e.g. a base fingerprint that differs
  bool clean() const {
    return unmatched.empty() && shape_mismatches.empty() && non_finite.empty() && malformed.empty();
  }
  std::string summary() const;  // one paragraph for humans
};

struct AdapterLoadOptions {
  bool strict = true;  // anything unmatched, mismatched or non-finite is an error
  std::string prefix;  // block of a full-UNet file, e.g. "down_blocks.0.attentions.0"
};

// LoRA modules read from a tensor file, keyed by module path in the model.
struct LoraWeights {
  std::map<std::string, adapters::LoraModule> modules;
  AdapterLoadReport report;
};

// Parses every adapter key of `file` (LoRA, LoHa, LoKr, DoRA magnitudes) against the model's
// Linear and Conv2d layers (shapes checked; malformed modules listed in the report).
// Throws FileError when nothing matches, or (strict) when anything is off; the message
// names the key, both shapes and the hint "wrong base model or prefix?".
LoraWeights parse_lora(const TensorFile& file, const std::string& path, const nn::Module& model,
                       const AdapterLoadOptions& options = {});

// Reads `path` (safetensors or loom HDF5) and adds it to `set` as adapter `name`.
AdapterLoadReport load_lora(adapters::LoraSet& set, const std::string& name, const std::string& path,
                            const AdapterLoadOptions& options = {});

// Writes one adapter in `family` (Peft, Diffusers, Kohya: safetensors; Loom: HDF5), atomically.
// `prefix` is prepended to module paths (the block of a full UNet the model stands for).
void save_lora(const adapters::LoraAdapter& adapter, const nn::Module& model, const std::string& path,
               KeyFamily family = KeyFamily::Peft, const std::string& prefix = "");

// The key → tensor map save_lora would write (for conversion and inspection).
std::vector<std::pair<std::string, Tensor>> lora_tensors(const adapters::LoraAdapter& adapter, const nn::Module& model,
                                                         KeyFamily family, const std::string& prefix,
                                                         std::map<std::string, std::string>* metadata);

// ---- model-free reading (inspect, convert) -------------------------------------------------
// One adapter module as stored: tensors as in the file (2-D, or 4-D for convs). A LoRA has
// down / up; a LoHa / LoKr (LyCORIS) has its factors by name instead; any of them may carry a
// DoRA magnitude (PEFT lora_magnitude_vector or LyCORIS dora_scale, as `magnitude_name` says).
struct RawLoraModule {
  RawLoraModule() = default;
  // A LoRA module (brace-initialisable as before: {down, up, alpha, use_rslora}).
  RawLoraModule(Tensor down_, Tensor up_, std::optional<double> alpha_ = std::nullopt, bool use_rslora_ = false)
      : down(std::move(down_)), up(std::move(up_)), alpha(alpha_), use_rslora(use_rslora_) {}
  Tensor down, up;
  std::optional<double> alpha;
  bool use_rslora = false;
  adapters::ModuleKind kind = adapters::ModuleKind::LoRA;
  std::map<std::string, Tensor> factors;
  Tensor magnitude;
  std::string magnitude_name;
  int64_t rank() const;   // LoRA: rows of down; LoHa / LoKr: as LyCORIS (adapters/lycoris.h), 0 for a full LoKr
  double scale() const;   // as adapters::LoraModule::scale()
  bool plain() const { return kind == adapters::ModuleKind::LoRA && !magnitude.defined(); }
  std::string kind_text() const;  // "LoRA", "LoHa", "LoKr", with "+DoRA" when it has a magnitude
  std::vector<const Tensor*> tensors() const;  // every tensor it holds
};
struct RawLora {
  // Full module path: UNet modules without "unet."; text-encoder modules with their component,
  // "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" ("text_encoder_2." for SDXL's second).
  std::map<std::string, RawLoraModule> modules;
  std::set<KeyFamily> families;
  std::vector<std::string> skipped;  // keys that are not LoRA weights of the UNet
};
// Reads every LoRA module of a file without a model; kohya names are split back into
// diffusers paths with the UNet's vocabulary (down_blocks, transformer_blocks, to_q, ...).
RawLora read_raw_lora(const TensorFile& file, const std::string& path);
// How a family is spelled on writing.
struct WriteOptions {
  bool sgm_names = false;  // kohya: the SGM/LDM block numbering (input_blocks_4_1_…), as sd-scripts writes SDXL
};
// The tensors (and metadata) of `lora` in `family` spelling.
std::vector<std::pair<std::string, Tensor>> raw_lora_tensors(const RawLora& lora, KeyFamily family,
                                                             std::map<std::string, std::string>* metadata,
                                                             const WriteOptions& options = {});
// What a conversion wrote.
struct ConvertReport {
  size_t unet_modules = 0;          // LoRA modules of the UNet (or Custom Diffusion tensors)
  size_t text_encoder_modules = 0;  // LoRA modules of text encoders, carried through renamed
  std::vector<std::string> skipped;  // keys not converted (neither LoRA nor Custom Diffusion weights)
  std::string summary() const;
};
// Converts an adapter file (LoRA of any family, or Custom Diffusion) to `family`.
ConvertReport convert_adapter_file(const std::string& in, const std::string& out, KeyFamily family,
                                   const WriteOptions& options = {});
// The diffusers path of a kohya module name ("lora_unet_down_blocks_0_…_to_q", or in the SGM/LDM
// numbering "lora_unet_input_blocks_4_1_…_to_q"), or "" when it is not one.
std::string kohya_to_path(const std::string& kohya_name);

// The path of a kohya text-encoder module name with its component ("lora_te_text_model_…_q_proj" and
// "lora_te1_…" -> "text_encoder.text_model.….q_proj", "lora_te2_…" -> "text_encoder_2.…"), or "".
std::string kohya_text_encoder_path(const std::string& kohya_name);
// Whether a module path (as in RawLora) belongs to a text encoder.
bool is_text_encoder_path(const std::string& path);

// ---- kohya's SGM/LDM block numbering (io/kohya_sgm.cpp; table in docs/io.md) ----------------
// "input_blocks.4.1.transformer_blocks.0.attn1.to_q" -> "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
// (as diffusers' loader maps them, layers_per_block = 2: SD 1.x, 2.x, SDXL); "" when not an SGM path.
std::string sgm_to_path(const std::string& sgm_path);
// The inverse; `up_blocks_without_attention` (SD 1.x: {0}) puts those blocks' upsampler at
// sub-index 1 instead of 2. "" for a path with no SGM name.
std::string path_to_sgm(const std::string& path, const std::set<int>& up_blocks_without_attention = {});
// Whether a kohya module name uses the SGM numbering (input_blocks, middle_block, output_blocks, ...).
bool is_sgm_kohya_name(const std::string& kohya_name);

// ---- Custom Diffusion -------------------------------------------------------------------------
bool is_custom_diffusion_file(const TensorFile& file);
// Installs Custom Diffusion processors matching the file (to_q_custom_diffusion present:
// "crossattn", else "crossattn_kv") unless present, and loads the weights.
AdapterLoadReport load_custom_diffusion(nn::Module& model, const std::string& path,
                                        const AdapterLoadOptions& options = {});
// Writes the processor parameters (safetensors unless the path ends with .h5/.hdf5).
void save_custom_diffusion(const nn::Module& model, const std::string& path, const std::string& prefix = "");

// ---- models ----------------------------------------------------------------------------------
// A model directory: config.json plus model.safetensors, diffusion_pytorch_model.safetensors
// or model.h5. With a prefix, only the keys under it are loaded (one block of a full UNet); a
// file holding one block with bare keys (transformer_blocks.0.…, proj_in.weight: save_pretrained
// of a Transformer2DModel) is loaded whole, the prefix then selecting only the adapters' keys.
// `notes` (when given) receives what the load could not check, each naming the weights file
// (e.g. a model.h5 written by h5py: no checksums; shapes and finiteness are still checked).
std::shared_ptr<attention::Transformer2DModel> load_model_dir(const std::string& dir, const std::string& prefix = "",
                                                              DType dtype = DType::F32,
                                                              std::vector<std::string>* notes = nullptr);
// A hex digest of the model's parameters at `paths` (".weight" of each adapted module): the
// base fingerprint stored with adapters.
std::string base_fingerprint(const nn::Module& model, const std::vector<std::string>& module_paths);

}  // namespace loom::io
