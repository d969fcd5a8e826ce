// Load reports: the summary line, finiteness, and the strict-mode errors.
#include <cmath>
#include <sstream>

#include "io/adapter_detail.h"

namespace loom::io {

std::string AdapterLoadReport::summary() const {
  std::ostringstream os;
  os << file << ": " << matched.size() << " keys matched";
  if (!families.empty()) {
    os << " (";
    bool first = true;
    for (KeyFamily f : families) os << (first ? "" : ", ") << family_name(f), first = false;
    os << ")";
  }
  os << ", " << unmatched.size() << " unmatched, " << shape_mismatches.size() << " shape mismatches, "
     << outside_prefix.size() << " outside the prefix, " << alphas_found.size() << " alphas found, "
     << alphas_defaulted.size() << " defaulted (scale 1)";
  if (!text_encoder.empty()) os << ", " << text_encoder.size() << " text-encoder keys (not for this model)";
  if (!non_finite.empty()) os << ", " << non_finite.size() << " with NaN/Inf";
  if (!malformed.empty()) os << ", " << malformed.size() << " malformed modules (first: " << malformed.front() << ")";
  if (!kinds.empty()) {
    std::map<std::string, size_t> count;
    for (const auto& [path, kind] : kinds) ++count[kind];
    os << ";";
    for (const auto& [kind, n] : count) os << " " << n << " " << kind;
    os << " modules";
  }
  for (const auto& n : notes) os << "; " << n;
  return os.str();
}

namespace detail {

[[noreturn]] void strict_fail(const std::string& path, const std::string& problem) {
  throw FileError(path, problem + " (wrong base model or prefix?)");
}

void check_strict(const AdapterLoadReport& r, const std::string& path) {
  if (!r.malformed.empty())
    throw FileError(path, r.malformed.front() +
                              (r.malformed.size() > 1 ? " (and " + std::to_string(r.malformed.size() - 1) + " more)" : ""));
  if (!r.shape_mismatches.empty()) {
    const auto& m = r.shape_mismatches.front();
    std::ostringstream os;
    os << "key '" << m.key << "' has shape " << m.got << " but the model needs " << m.expected;
    strict_fail(path, os.str());
  }
  if (!r.unmatched.empty())
    strict_fail(path, "key '" + r.unmatched.front() + "' matches no module of the model" +
                          (r.unmatched.size() > 1 ? " (and " + std::to_string(r.unmatched.size() - 1) + " more)" : ""));
  if (!r.non_finite.empty()) throw FileError(path, "key '" + r.non_finite.front() + "' holds NaN or Inf values");
}


}  // namespace detail
}  // namespace loom::io
