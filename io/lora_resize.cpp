// `loom resize`: rank reduction of an existing LoRA by the SVD of each module's scaled ΔW
// (see io/lora_extract.h).
#include <cmath>
#include <sstream>

#include "io/adapter_detail.h"
#include "io/lora_extract.h"
#include "tensor/ops.h"

namespace loom::io {

using namespace detail;

ResizeResult resize_lora(const RawLora& lora, const ResizeOptions& options) {
  LOOM_CHECK(options.rank || options.energy, "resize: give a rank or an energy share");
  LOOM_CHECK(!options.rank || *options.rank > 0, "resize: the rank must be positive, got ", *options.rank);
  LOOM_CHECK(!options.energy || (*options.energy > 0 && *options.energy <= 1),
             "resize: the energy share must be in (0, 1], got ", *options.energy);
  ResizeResult result;
  result.lora.families = lora.families;
  result.lora.skipped = lora.skipped;
  for (const auto& [path, m] : lora.modules) {
    ModuleReport row;
    row.path = path;
    row.old_rank = m.rank();
    const bool conv = m.down.dim() == 4;
    const int64_t out = m.up.size(0);
    row.shape = conv ? Shape{out, m.down.size(1), m.down.size(2), m.down.size(3)} : Shape{out, m.down.size(1)};
    const double s = m.scale();
    // ΔW = s·up·down with up (out, r) and down (r, in·kh·kw): the core SVD sees s·up.
    const Tensor up = ops::mul_scalar(m.up.to(DType::F64).contiguous().reshape({out, row.old_rank}), s);
    const Tensor down = m.down.to(DType::F64).contiguous().reshape({row.old_rank, m.down.numel() / row.old_rank});
    TruncatedSvd full = truncated_svd_of_product(up, down, row.old_rank);
    int64_t rank = options.energy ? rank_for_energy(full.sigma, *options.energy) : full.sigma.size();
    if (options.rank) rank = std::min(rank, *options.rank);
    rank = std::max<int64_t>(1, std::min<int64_t>(rank, int64_t(full.sigma.size())));
    double sigma_sq = 0;
    for (double x : full.sigma) sigma_sq += x * x;
    if (!std::isfinite(sigma_sq)) {
      std::ostringstream os;
      os << "module '" << path << "': its weights hold NaN or Inf";
      throw Error(os.str());
    }
    row.sigma_sq = sigma_sq;
    row.rank = rank;
    row.energy = energy_share(full.sigma, rank);
    if (sigma_sq == 0) row.note = "dW is zero";
    else if (options.rank && *options.rank > row.old_rank) row.note = "already below the rank asked for";
    RawLoraModule r;
    if (m.alpha) r.alpha = s * double(rank);  // the module's scale kept: alpha' / r' = s
    const TruncatedSvd cut = truncated_svd_of_product(up, down, rank);
    const DType up_dtype = m.up.dtype(), down_dtype = m.down.dtype();
    r.up = s == 0 ? ops::mul_scalar(cut.left, 0.0) : ops::mul_scalar(cut.left, 1.0 / s);
    r.down = cut.right;
    if (conv) {
      r.up = r.up.reshape({out, rank, 1, 1});
      r.down = r.down.reshape({rank, row.shape[1], row.shape[2], row.shape[3]});
    } else if (m.up.dim() == 4) {  // a 1×1 conv stored 4-D
      r.up = r.up.reshape({out, rank, 1, 1});
    }
    r.up = r.up.to(up_dtype), r.down = r.down.to(down_dtype);
    result.lora.modules[path] = std::move(r);
    result.report.modules.push_back(row);
  }
  return result;
}

namespace {

// The family a resized file is written in: the input's when it has one writable family.
KeyFamily output_family(const RawLora& lora, LowRankReport& report) {
  std::set<KeyFamily> writable;
  for (KeyFamily f : lora.families)
    writable.insert(f == KeyFamily::DiffusersLegacy ? KeyFamily::Diffusers : f);
  if (writable.size() == 1) {
    if (lora.families.count(KeyFamily::DiffusersLegacy))
      report.notes.push_back("the input uses diffusers' legacy spelling, which loom reads but does not write: written as diffusers");
    return *writable.begin();
  }
  std::string names;
  for (KeyFamily f : lora.families) names += (names.empty() ? "" : ", ") + std::string(family_name(f));
  report.notes.push_back("the input mixes families (" + names + "): written as " + family_name(KeyFamily::Peft) +
                         " (choose with --format)");
  return KeyFamily::Peft;
}

}  // namespace

LowRankReport resize_lora_file(const std::string& in, const std::string& out, const ResizeOptions& options,
                               std::optional<KeyFamily> family) {
  const TensorFile file = read_tensor_file(in);
  if (is_custom_diffusion_file(file)) throw FileError(in, "is a Custom Diffusion file, not a LoRA: it has no rank to reduce");
  const RawLora lora = read_raw_lora(file, in);
  if (lora.modules.empty()) {
    std::ostringstream os;
    os << "holds no LoRA module (" << file.tensors.size() << " tensors";
    if (!file.tensors.empty()) os << ", first key '" << file.tensors.front().first << "'";
    os << ")";
    throw FileError(in, os.str());
  }
  for (const auto& [path, m] : lora.modules)
    if (!all_finite(m.up) || !all_finite(m.down)) throw FileError(in, "module '" + path + "' holds NaN or Inf");
  ResizeResult r = resize_lora(lora, options);
  const KeyFamily to = family ? *family : output_family(lora, r.report);
  if (!lora.skipped.empty())
    r.report.notes.push_back(std::to_string(lora.skipped.size()) + " key" + (lora.skipped.size() == 1 ? "" : "s") +
                             " of the input are not LoRA weights and are not written (first '" + lora.skipped.front() + "')");
  Attributes root;
  if (auto it = file.attributes.find("base_fingerprint"); it != file.attributes.end()) root["base_fingerprint"] = it->second;
  write_raw_lora(out, r.lora, to, root);
  return r.report;
}

}  // namespace loom::io
