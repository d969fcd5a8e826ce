// `loom extract`: a LoRA approximating tuned − base by a truncated SVD per module (see
// io/lora_extract.h for the formulas), and the report shared with `loom resize`.
#include <algorithm>
#include <cmath>
#include <iomanip>
#include <sstream>

#include "io/adapter_detail.h"
#include "io/lora_extract.h"
#include "nn/conv.h"
#include "tensor/ops.h"

namespace loom::io {

using namespace detail;

// ---- the report ------------------------------------------------------------------------------------

size_t LowRankReport::written() const {
  return size_t(std::count_if(modules.begin(), modules.end(), [](const ModuleReport& m) { return m.rank > 0; }));
}

double LowRankReport::total_energy() const {
  double kept = 0, all = 0;
  for (const ModuleReport& m : modules)
    if (m.rank > 0) kept += m.energy * m.sigma_sq, all += m.sigma_sq;
  return all > 0 ? kept / all : 1.0;
}

std::string LowRankReport::table() const {
  size_t width = 6;
  for (const ModuleReport& m : modules) width = std::max(width, m.path.size());
  std::ostringstream os;
  os << std::left << std::setw(int(width) + 2) << "module" << std::setw(18) << "shape" << std::setw(10) << "rank"
     << std::setw(10) << "energy" << "|dW|_F^2\n";
  for (const ModuleReport& m : modules) {
    std::ostringstream shape, rank;
    shape << m.shape;
    if (m.rank > 0)
      rank << m.old_rank << "->" << m.rank;
    else
      rank << "skipped";
    os << std::setw(int(width) + 2) << m.path << std::setw(18) << shape.str() << std::setw(10) << rank.str();
    if (m.rank > 0)
      os << std::setw(10) << std::fixed << std::setprecision(6) << m.energy;
    else
      os << std::setw(10) << "-";
    os << std::scientific << std::setprecision(3) << m.sigma_sq << std::defaultfloat;
    if (!m.note.empty()) os << "  (" << m.note << ")";
    os << "\n";
  }
  const size_t skipped = modules.size() - written();
  os << "total: " << written() << " modules written" << (skipped ? ", " + std::to_string(skipped) + " skipped" : "")
     << ", energy kept " << std::fixed << std::setprecision(6) << total_energy() << std::defaultfloat
     << " (sum of kept sigma^2 / sum of sigma^2)\n";
  for (const std::string& n : notes) os << "note: " << n << "\n";
  return os.str();
}

// ---- extract --------------------------------------------------------------------------------------

namespace {

// A module a LoRA can adapt: its weight as stored and how its LoRA factors are shaped.
struct Projection {
  Tensor weight;      // (out, in), (out, in, 1, 1) or (out, in, kh, kw)
  bool conv = false;  // stored 4-D (Conv1x1 or Conv2d)
  bool spatial = false;  // a k×k kernel (k > 1)
};

std::map<std::string, Projection> projections(const nn::Module& model) {
  std::map<std::string, Projection> out;
  for (const auto& [path, m] : model.named_modules()) {
    if (auto l = std::dynamic_pointer_cast<nn::Linear>(m)) {
      const Tensor w = l->weight().tensor();
      out[path] = {w, w.dim() == 4, false};
    } else if (auto c = std::dynamic_pointer_cast<nn::Conv2d>(m)) {
      const Tensor w = c->weight().tensor();
      out[path] = {w, true, w.size(2) * w.size(3) > 1};
    }
  }
  return out;
}

// Paths in `a` but not in `b`, listed for a message (at most 5 named).
std::string only_in(const std::map<std::string, Projection>& a, const std::map<std::string, Projection>& b,
                    size_t& count) {
  std::string names;
  count = 0;
  for (const auto& [path, p] : a)
    if (!b.count(path) && ++count <= 5) names += (names.empty() ? "'" : ", '") + path + "'";
  if (count > 5) names += ", … (" + std::to_string(count) + " in all)";
  return names;
}

void check_same_modules(const std::map<std::string, Projection>& base, const std::map<std::string, Projection>& tuned,
                        const std::string& base_name, const std::string& tuned_name) {
  size_t n_base = 0, n_tuned = 0;
  const std::string in_base = only_in(base, tuned, n_base), in_tuned = only_in(tuned, base, n_tuned);
  if (n_base)
    throw FileError(tuned_name, "has no module " + in_base + " of the base model " + base_name +
                                    " (the models must have the same architecture)");
  if (n_tuned)
    throw FileError(tuned_name, "module " + in_tuned + " is not in the base model " + base_name +
                                    " (the models must have the same architecture)");
  for (const auto& [path, p] : base) {
    const Tensor& t = tuned.at(path).weight;
    if (t.shape() != p.weight.shape()) {
      std::ostringstream os;
      os << "module '" << path << "' has the weight shape " << t.shape() << ", the base model " << base_name << " "
         << p.weight.shape();
      throw FileError(tuned_name, os.str());
    }
  }
}

// kohya's clamping: the values of both factors limited to ± their `quantile`-quantile (linear
// interpolation between order statistics, as torch.quantile).
double clamp_factors(Tensor& left, Tensor& right, double quantile) {
  std::vector<double> all = left.to_vector();
  const std::vector<double> r = right.to_vector();
  all.insert(all.end(), r.begin(), r.end());
  std::sort(all.begin(), all.end());
  const double pos = quantile * double(all.size() - 1);
  const size_t lo = size_t(std::floor(pos)), hi = std::min(all.size() - 1, lo + 1);
  const double limit = all[lo] + (all[hi] - all[lo]) * (pos - double(lo));
  for (Tensor* t : {&left, &right}) {
    double* d = t->data<double>();
    for (int64_t i = 0; i < t->numel(); ++i) d[i] = std::clamp(d[i], -std::abs(limit), std::abs(limit));
  }
  return limit;
}

// Names of the parameters (biases, norms, embeddings) that differ between the models but are not
// the weight of a projection: a LoRA holds none of them, so they are named in the report.
std::string other_changes(const nn::Module& base, const nn::Module& tuned, const std::map<std::string, Projection>& proj) {
  std::map<std::string, Tensor> b;
  for (const auto& [name, v] : base.named_parameters()) b[name] = v.tensor();
  size_t count = 0;
  std::string names;
  for (const auto& [name, v] : tuned.named_parameters()) {
    const size_t dot = name.rfind('.');
    if (dot != std::string::npos && name.substr(dot) == ".weight" && proj.count(name.substr(0, dot))) continue;
    const auto it = b.find(name);
    if (it == b.end() || it->second.shape() != v.tensor().shape()) continue;
    const Tensor d = ops::sub(v.tensor().to(Device::cpu()).to(DType::F64), it->second.to(Device::cpu()).to(DType::F64));
    const std::vector<double> values = d.to_vector();
    if (std::any_of(values.begin(), values.end(), [](double x) { return x != 0; }) && ++count <= 5)
      names += (names.empty() ? "'" : ", '") + name + "'";
  }
  if (!count) return "";
  return std::to_string(count) + " other parameter" + (count == 1 ? "" : "s") + " differ (" + names +
         (count > 5 ? ", …" : "") + "): a LoRA holds only Linear/Conv weights, so these changes are not in the output";
}

}  // namespace

ExtractResult extract_lora(const nn::Module& base, const nn::Module& tuned, const ExtractOptions& options,
                           const std::string& base_name, const std::string& tuned_name) {
  LOOM_CHECK(options.rank > 0, "extract: the rank must be positive, got ", options.rank);
  LOOM_CHECK(!options.conv_rank || *options.conv_rank > 0, "extract: the conv rank must be positive");
  LOOM_CHECK(!options.alpha || (std::isfinite(*options.alpha) && *options.alpha > 0), "extract: alpha must be a positive number");
  const auto base_proj = projections(base), tuned_proj = projections(tuned);
  check_same_modules(base_proj, tuned_proj, base_name, tuned_name);
  ExtractResult result;
  for (const auto& [path, p] : base_proj) {
    ModuleReport row;
    row.path = join_path(options.prefix, path);
    row.shape = p.weight.shape();
    const int64_t out = row.shape[0], cols = p.weight.numel() / std::max<int64_t>(out, 1);
    const Tensor delta = ops::sub(tuned_proj.at(path).weight.to(Device::cpu()).to(DType::F64),
                                  p.weight.to(Device::cpu()).to(DType::F64))
                             .contiguous()
                             .reshape({out, cols});
    const std::vector<double> values = delta.to_vector();
    for (double v : values) {
      if (!std::isfinite(v)) throw FileError(tuned_name, "module '" + path + "': the difference to the base holds NaN or Inf");
      row.max_abs = std::max(row.max_abs, std::abs(v));
      row.sigma_sq += v * v;
    }
    row.old_rank = std::min(out, cols);
    std::ostringstream note;
    if (row.max_abs <= options.min_diff) {
      note << "unchanged: max |dW| = " << row.max_abs << " <= --min-diff " << options.min_diff;
    } else if (p.spatial && !options.conv_rank) {
      note << row.shape[2] << "x" << row.shape[3] << " conv: give --conv-rank to extract it";
    }
    if (!note.str().empty()) {
      row.note = note.str();
      result.report.modules.push_back(row);
      continue;
    }
    const int64_t wanted = p.spatial ? *options.conv_rank : options.rank;
    const int64_t rank = std::min(wanted, row.old_rank);
    if (rank < wanted) note << "rank capped at min(out, in*kh*kw) = " << rank;
    TruncatedSvd svd = truncated_svd(delta, rank);
    if (options.clamp_quantile) {
      const double limit = clamp_factors(svd.left, svd.right, *options.clamp_quantile);
      note << (note.str().empty() ? "" : "; ") << "factors clamped at +-" << limit;
    }
    row.rank = rank;
    row.energy = svd.energy_kept();
    row.note = note.str();
    const double alpha = options.alpha.value_or(double(rank));
    RawLoraModule m;
    m.alpha = alpha;
    m.up = ops::mul_scalar(svd.left, double(rank) / alpha);  // s·up·down = ΔW_r with s = alpha / r
    m.down = svd.right;
    if (p.conv) {
      m.up = m.up.reshape({out, rank, 1, 1});
      m.down = m.down.reshape({rank, row.shape[1], row.shape[2], row.shape[3]});
    }
    result.lora.modules[row.path] = std::move(m);
    result.report.modules.push_back(row);
  }
  const std::string others = other_changes(base, tuned, base_proj);
  if (!others.empty()) result.report.notes.push_back(others);
  if (result.lora.modules.empty())
    throw FileError(tuned_name, "does not differ from the base model " + base_name + " in any module LoRA can hold" +
                                    (options.min_diff > 0 ? " (max |dW| <= --min-diff everywhere)" : "") +
                                    (others.empty() ? "" : "; " + others));
  return result;
}

void write_extracted_lora(const ExtractResult& result, const std::string& out, KeyFamily family) {
  RawLora lora = result.lora;
  for (auto& [path, m] : lora.modules) m.up = m.up.to(DType::F32), m.down = m.down.to(DType::F32);
  write_raw_lora(out, lora, family, {{"adapter", std::string("extracted")}});
}

}  // namespace loom::io
