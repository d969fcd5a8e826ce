// SchedulerConfig: diffusers' scheduler_config.json read as XScheduler.from_config reads it.
#include <cmath>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "io/tensor_file.h"
#include "unet/schedulers.h"

namespace loom::unet {
namespace {

using nlohmann::json;

// Python's json writes -Infinity, Infinity and NaN bare (diffusers saves lambda_min_clipped
// = -Infinity); JSON has no such numbers, so outside strings they become the strings "-Infinity", … .
std::string quote_nonfinite_numbers(const std::string& text) {
  std::string out;
  out.reserve(text.size() + 16);
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      out += c;
      if (c == '\\' && i + 1 < text.size()) out += text[++i];
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    bool replaced = false;
    for (const char* word : {"-Infinity", "Infinity", "NaN"}) {
      const size_t n = std::char_traits<char>::length(word);
      if (text.compare(i, n, word) == 0) {
        out += '"' + std::string(word) + '"';
        i += n - 1;
        replaced = true;
        break;
      }
    }
    if (!replaced) out += c;
  }
  return out;
}

// The keys each diffusers class takes (its __init__ arguments).
const std::set<std::string>& keys_of(SchedulerKind kind) {
  static const std::set<std::string> common = {
      "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
      "timestep_spacing", "steps_offset", "rescale_betas_zero_snr"};
  auto with = [](std::initializer_list<const char*> more) {
    std::set<std::string> s = common;
    for (const char* k : more) s.insert(k);
    return s;
  };
  static const std::set<std::string> ddim = with({"clip_sample", "set_alpha_to_one", "thresholding",
                                                  "dynamic_thresholding_ratio", "clip_sample_range",
                                                  "sample_max_value"});
  static const std::set<std::string> euler =
      with({"interpolation_type", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "sigma_min",
            "sigma_max", "timestep_type", "final_sigmas_type"});
  static const std::set<std::string> dpm = with(
      {"solver_order", "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "algorithm_type",
       "solver_type", "lower_order_final", "euler_at_final", "use_karras_sigmas", "use_exponential_sigmas",
       "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "flow_shift", "final_sigmas_type",
       "lambda_min_clipped", "variance_type", "use_dynamic_shifting", "time_shift_type"});
  switch (kind) {
    case SchedulerKind::DDIM: return ddim;
    case SchedulerKind::Euler: return euler;
    case SchedulerKind::DPMSolverMultistep: return dpm;
  }
  return common;
}

struct Reader {
  const json& j;
  const std::string& source;
  const char* cls;

  bool has(const std::string& key) const { return j.contains(key) && !j.at(key).is_null(); }
  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    LOOM_FAIL(source, ": key '", key, "' = ", j.at(key).dump(), ": ", what);
  }
  void opt(const std::string& key, int64_t& f) const {
    if (!has(key)) return;
    if (!j.at(key).is_number_integer()) fail(key, "must be an integer");
    f = j.at(key).get<int64_t>();
  }
  void opt(const std::string& key, double& f) const {
    if (!has(key)) return;
    const json& v = j.at(key);
    if (v.is_number()) f = v.get<double>();
    else if (v == "-Infinity") f = -INFINITY;
    else if (v == "Infinity") f = INFINITY;
    else fail(key, "must be a number");
  }
  void opt(const std::string& key, bool& f) const {
    if (!has(key)) return;
    if (!j.at(key).is_boolean()) fail(key, "must be true or false");
    f = j.at(key).get<bool>();
  }
  void opt(const std::string& key, std::string& f) const {
    if (!has(key)) return;
    if (!j.at(key).is_string()) fail(key, "must be a string");
    f = j.at(key).get<std::string>();
  }
  // A key loom implements with one value only (absent counts as that value; null as null or false).
  void only(const std::string& key, const json& supported, const std::string& what) const {
    if (!j.contains(key)) return;
    const json& v = j.at(key);
    if (v == supported || (v.is_null() && (supported.is_null() || supported == false))) return;
    fail(key, std::string("not supported by loom's ") + cls + " (loom implements " + what + ")");
  }
  void one_of(const std::string& key, const std::string& value, std::initializer_list<const char*> choices) const {
    for (const char* c : choices)
      if (value == c) return;
    std::string list;
    for (const char* c : choices) list += std::string(list.empty() ? "" : ", ") + c;
    fail(key, std::string("not supported by loom's ") + cls + " (loom implements " + list + ")");
  }
};

void read_common(const Reader& r, SchedulerConfig& c) {
  r.opt("num_train_timesteps", c.noise.num_train_timesteps);
  if (c.noise.num_train_timesteps < 1) r.fail("num_train_timesteps", "must be at least 1");
  r.opt("beta_start", c.noise.beta_start);
  r.opt("beta_end", c.noise.beta_end);
  r.opt("beta_schedule", c.noise.beta_schedule);
  r.one_of("beta_schedule", c.noise.beta_schedule, {"scaled_linear", "linear", "squaredcos_cap_v2"});
  r.only("trained_betas", nullptr, "betas from beta_start, beta_end and beta_schedule; trained_betas null");
  r.opt("prediction_type", c.noise.prediction_type);
  r.one_of("prediction_type", c.noise.prediction_type, {"epsilon", "v_prediction"});
  r.opt("timestep_spacing", c.timestep_spacing);
  r.one_of("timestep_spacing", c.timestep_spacing, {"leading", "trailing", "linspace"});
  r.opt("steps_offset", c.steps_offset);
  r.only("rescale_betas_zero_snr", false, "rescale_betas_zero_snr false");
}

void read_ddim(const Reader& r, SchedulerConfig& c) {
  r.opt("clip_sample", c.clip_sample);
  r.opt("set_alpha_to_one", c.set_alpha_to_one);
  r.opt("clip_sample_range", c.clip_sample_range);
  r.only("thresholding", false, "thresholding false");
}

void read_sigma_options(const Reader& r, SchedulerConfig& c) {
  for (const char* k : {"use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"})
    r.only(k, false, "the schedule's own sigmas: use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas false");
  r.opt("final_sigmas_type", c.final_sigmas_type);
  r.one_of("final_sigmas_type", c.final_sigmas_type, {"zero", "sigma_min"});
}

void read_euler(const Reader& r, SchedulerConfig& c) {
  read_sigma_options(r, c);
  r.only("interpolation_type", "linear", "interpolation_type \"linear\"");
  if (c.noise.prediction_type == "v_prediction")
    r.only("timestep_type", "discrete", "timestep_type \"discrete\" with v_prediction");
  else if (r.has("timestep_type"))
    r.one_of("timestep_type", r.j.at("timestep_type").get<std::string>(), {"discrete", "continuous"});
}

void read_dpm(const Reader& r, SchedulerConfig& c, std::vector<std::string>& notes) {
  read_sigma_options(r, c);
  r.opt("solver_order", c.solver_order);
  if (c.solver_order != 1 && c.solver_order != 2)
    r.fail("solver_order", "not supported by loom's DPMSolverMultistepScheduler (loom implements 1 and 2: DPM++ 2M)");
  std::string algorithm = "dpmsolver++";
  r.opt("algorithm_type", algorithm);
  if (algorithm == "deis") notes.push_back(r.source + ": algorithm_type \"deis\" runs as \"dpmsolver++\", as diffusers does");
  else r.one_of("algorithm_type", algorithm, {"dpmsolver++"});
  r.opt("solver_type", c.solver_type);
  if (c.solver_type == "logrho" || c.solver_type == "bh1" || c.solver_type == "bh2") {
    notes.push_back(r.source + ": solver_type \"" + c.solver_type + "\" runs as \"midpoint\", as diffusers does");
    c.solver_type = "midpoint";
  }
  r.one_of("solver_type", c.solver_type, {"midpoint", "heun"});
  r.opt("lower_order_final", c.lower_order_final);
  r.opt("euler_at_final", c.euler_at_final);
  r.opt("lambda_min_clipped", c.lambda_min_clipped);
  r.only("thresholding", false, "thresholding false");
  r.only("use_lu_lambdas", false, "use_lu_lambdas false");
  r.only("use_flow_sigmas", false, "use_flow_sigmas false");
  r.only("use_dynamic_shifting", false, "use_dynamic_shifting false");
  r.only("variance_type", nullptr, "variance_type null");
}

}  // namespace

SchedulerKind parse_scheduler_kind(const std::string& name) {
  if (name == "ddim") return SchedulerKind::DDIM;
  if (name == "euler") return SchedulerKind::Euler;
  if (name == "dpmpp_2m") return SchedulerKind::DPMSolverMultistep;
  LOOM_FAIL("scheduler '", name, "' is not one of ddim, euler, dpmpp_2m");
}

const char* scheduler_name(SchedulerKind kind) {
  switch (kind) {
    case SchedulerKind::DDIM: return "ddim";
    case SchedulerKind::Euler: return "euler";
    case SchedulerKind::DPMSolverMultistep: return "dpmpp_2m";
  }
  return "?";
}

const char* scheduler_class_name(SchedulerKind kind) {
  switch (kind) {
    case SchedulerKind::DDIM: return "DDIMScheduler";
    case SchedulerKind::Euler: return "EulerDiscreteScheduler";
    case SchedulerKind::DPMSolverMultistep: return "DPMSolverMultistepScheduler";
  }
  return "?";
}

SchedulerConfig SchedulerConfig::defaults(SchedulerKind kind) {
  SchedulerConfig c;
  c.kind = kind;
  c.noise.num_train_timesteps = 1000;
  c.noise.beta_start = 0.0001;
  c.noise.beta_end = 0.02;
  c.noise.beta_schedule = "linear";
  c.noise.prediction_type = "epsilon";
  c.timestep_spacing = kind == SchedulerKind::DDIM ? "leading" : "linspace";
  return c;
}

SchedulerConfig SchedulerConfig::stable_diffusion_v1_5(SchedulerKind kind) {
  static const char* const kText = R"({
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "num_train_timesteps": 1000, "set_alpha_to_one": false, "steps_offset": 1, "trained_betas": null,
    "clip_sample": false, "timestep_spacing": "leading"})";
  SchedulerConfig c = from_json_text(kText, kind, "Stable Diffusion 1.5's scheduler_config.json");
  c.notes.clear();
  return c;
}

SchedulerConfig SchedulerConfig::from_json_text(const std::string& text, SchedulerKind kind,
                                                const std::string& source) {
  json j;
  try {
    j = json::parse(quote_nonfinite_numbers(text));
  } catch (const json::exception& e) {
    LOOM_FAIL(source, ": not valid JSON (", e.what(), ")");
  }
  LOOM_CHECK(j.is_object(), source, ": expected a JSON object, got ", j.type_name());
  // Keys a saved config lists as defaults of its class are not carried over (diffusers' from_config).
  if (j.contains("_use_default_values") && j.at("_use_default_values").is_array())
    for (const json& k : j.at("_use_default_values"))
      if (k.is_string()) j.erase(k.get<std::string>());
  SchedulerConfig c = defaults(kind);
  const char* cls = scheduler_class_name(kind);
  const Reader r{j, source, cls};
  read_common(r, c);
  if (kind == SchedulerKind::DDIM) read_ddim(r, c);
  if (kind == SchedulerKind::Euler) read_euler(r, c);
  if (kind == SchedulerKind::DPMSolverMultistep) read_dpm(r, c, c.notes);

  if (j.contains("_class_name") && j.at("_class_name") != cls)
    c.notes.push_back(source + ": written for " + (j.at("_class_name").is_string() ? j.at("_class_name").get<std::string>() : j.at("_class_name").dump()) +
                      "; its keys configure " + cls + " (--scheduler " + scheduler_name(kind) +
                      "), and keys it lacks take " + cls + "'s defaults, as diffusers' from_config does");
  std::string unused;
  for (const auto& [key, value] : j.items())
    if (key.rfind('_', 0) != 0 && !keys_of(kind).count(key)) unused += (unused.empty() ? "" : ", ") + key;
  if (!unused.empty()) c.notes.push_back(source + ": not used by " + cls + ": " + unused);
  return c;
}

SchedulerConfig SchedulerConfig::from_file(const std::string& path, SchedulerKind kind) {
  std::ifstream in(path);
  if (!in) throw io::FileError(path, "cannot be read (expected diffusers' scheduler_config.json)");
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    return from_json_text(ss.str(), kind, path);
  } catch (const io::FileError&) {
    throw;
  } catch (const Error& e) {  // the message starts with the path already
    const std::string msg = e.what(), lead = path + ": ";
    throw io::FileError(path, msg.rfind(lead, 0) == 0 ? msg.substr(lead.size()) : msg);
  }
}

}  // namespace loom::unet
