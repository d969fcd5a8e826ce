// LoRA by truncated SVD (SPEC §9): `loom extract` (a LoRA approximating tuned − base, as kohya's
// sd-scripts networks/extract_lora_from_models.py) and `loom resize` (rank reduction of a LoRA).
//
// Conventions (docs/io.md "extract and resize"):
//   A module's ΔW is a matrix (out, in·kh·kw): a Linear's (out, in) weight, a Conv1x1's
//   (out, in, 1, 1) or a k×k Conv2d's (out, in, kh, kw) reshaped row-major.
//   ΔW = U·diag(σ)·Vᵀ (σ descending, f64). A rank-r LoRA of it is
//     up = U_r·diag(σ_r) / s   (out, r)      down = V_rᵀ (r, in·kh·kw)      s = alpha / r
//   so that s·up·down = ΔW_r, the best rank-r approximation (Eckart–Young):
//     ‖ΔW − ΔW_r‖_F² = Σ_{i>r} σ_i².   Energy kept = Σ_{i≤r} σ_i² / Σ σ_i².
//   Stored as PyTorch holds LoRA weights: Linear down (r, in), up (out, r); Conv down
//   (r, in, kh, kw) (a conv with the base's kernel), up (out, r, 1, 1) (LoCon).
//   No clamping of the factors (kohya clamps at the 0.99 quantile by default, which breaks the
//   optimality above; --clamp-quantile asks for it).
//
// Implementation: the SVD math io/low_rank.cpp, extraction io/lora_extract.cpp, resizing
// io/lora_resize.cpp.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "io/adapter_io.h"
#include "nn/module.h"

namespace loom::io {

// ---- the SVD math (io/low_rank.cpp) ------------------------------------------------------------
// A truncated SVD M ≈ left·right with left = U_r·diag(σ_r) (m, r), right = V_rᵀ (r, n); f64.
struct TruncatedSvd {
  Tensor left, right;          // f64, (m, r) and (r, n)
  std::vector<double> sigma;   // all min(m, n) singular values of M, descending
  int64_t rank() const { return left.size(1); }
  double energy_kept() const;  // Σ_{i<rank} σ_i² / Σ σ_i² (1 when M = 0)
};
// Dense SVD (Eigen's BDCSVD, f64) of a 2-D matrix, truncated to min(rank, m, n).
TruncatedSvd truncated_svd(const Tensor& matrix, int64_t rank);
// The same for M = up·down (up (m, k), down (k, n)) without forming M: QR of up and of downᵀ,
// SVD of the k×k core. The singular values past k (all zero) are not listed.
TruncatedSvd truncated_svd_of_product(const Tensor& up, const Tensor& down, int64_t rank);
// The smallest rank r ≥ 1 with Σ_{i<r} σ_i² ≥ share · Σ σ_i² (share in (0, 1]).
int64_t rank_for_energy(const std::vector<double>& sigma, double share);
// Σ_{i<r} σ_i² / Σ σ_i² (1 when all σ are 0).
double energy_share(const std::vector<double>& sigma, int64_t r);

// ---- extract ----------------------------------------------------------------------------------
struct ExtractOptions {
  int64_t rank = 4;                   // Linear and 1×1 modules
  std::optional<int64_t> conv_rank;   // k×k Conv2d modules; none: they are skipped (as kohya)
  std::optional<double> alpha;        // none: alpha = the module's rank (scale 1)
  double min_diff = 0;                // modules with max |ΔW| ≤ min_diff are skipped (unchanged)
  std::optional<double> clamp_quantile;  // kohya's clamping of up and down at ± this quantile of |values|
  std::string prefix;                 // prepended to module paths (the block a model directory stands for)
};

// One row of the report.
struct ModuleReport {
  std::string path;     // full path (prefix included)
  Shape shape;          // the base weight's shape
  int64_t old_rank = 0; // resize: the rank in the file; extract: min(out, in·kh·kw)
  int64_t rank = 0;     // the rank written (0: skipped)
  double energy = 1;    // Σ kept σ² / Σ σ²
  double sigma_sq = 0;  // Σ σ² = ‖ΔW‖_F²
  double max_abs = 0;   // extract: max |ΔW|
  std::string note;     // why skipped / clamped, or empty
};

struct LowRankReport {
  std::vector<ModuleReport> modules;  // in path order, skipped ones included
  std::vector<std::string> notes;     // whole-run remarks (parameters not extracted, …)
  size_t written() const;
  double total_energy() const;        // Σ over written modules of kept σ² / Σ of σ²
  std::string table() const;          // one line per module and a total, for stdout
};

struct ExtractResult {
  RawLora lora;  // f64 tensors, full paths
  LowRankReport report;
};

// A LoRA approximating tuned − base module by module, over every Linear, Conv1x1 and Conv2d of
// the models. Throws FileError (naming `base_name` / `tuned_name` and the module) when a module is
// in one model only, when shapes differ, when a ΔW is not finite, or when no module differs.
ExtractResult extract_lora(const nn::Module& base, const nn::Module& tuned, const ExtractOptions& options,
                           const std::string& base_name = "base", const std::string& tuned_name = "tuned");

// ---- resize -----------------------------------------------------------------------------------
struct ResizeOptions {
  std::optional<int64_t> rank;    // the new rank (capped by each module's rank)
  std::optional<double> energy;   // the smallest rank keeping this share of Σσ² (capped by `rank`)
};
struct ResizeResult {
  RawLora lora;  // tensors in the input's dtypes
  LowRankReport report;
};
// Each module's scaled ΔW = s·up·down truncated by SVD; the output keeps each module's scale s
// (alpha' = s·r', no rsLoRA; no alpha when the input had none) with up' = U·Σ / s, down' = Vᵀ.
ResizeResult resize_lora(const RawLora& lora, const ResizeOptions& options);

// Reads `in`, resizes, writes `out` in `family` (nullopt: the input's family; a file mixing
// families is written as PEFT, with a note). FileError for a file with no LoRA modules.
LowRankReport resize_lora_file(const std::string& in, const std::string& out, const ResizeOptions& options,
                               std::optional<KeyFamily> family = std::nullopt);

// Writes an extracted LoRA (tensors as f32) in `family`, atomically.
void write_extracted_lora(const ExtractResult& result, const std::string& out, KeyFamily family);

}  // namespace loom::io
