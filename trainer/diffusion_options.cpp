#include "trainer/diffusion_options.h"

#include <cmath>
#include <nlohmann/json.hpp>

#include "tensor/error.h"

namespace loom::trainer {

using nlohmann::json;

std::string DiffusionOptions::to_json() const {
  json j{{"enabled", enabled},
         {"prediction_type", schedule.prediction_type},
         {"beta_schedule", schedule.beta_schedule},
         {"beta_start", schedule.beta_start},
         {"beta_end", schedule.beta_end},
         {"num_train_timesteps", schedule.num_train_timesteps},
         {"noise_offset", noise_offset}};
  j["snr_gamma"] = snr_gamma ? json(*snr_gamma) : json(nullptr);
  return j.dump();
}

DiffusionOptions DiffusionOptions::from_json(const std::string& text) {
  DiffusionOptions o;
  try {
    const json j = json::parse(text);
    o.enabled = j.at("enabled");
    o.schedule.prediction_type = j.at("prediction_type"), o.schedule.beta_schedule = j.at("beta_schedule");
    o.schedule.beta_start = j.at("beta_start"), o.schedule.beta_end = j.at("beta_end");
    o.schedule.num_train_timesteps = j.at("num_train_timesteps"), o.noise_offset = j.at("noise_offset");
    if (!j.at("snr_gamma").is_null()) o.snr_gamma = j.at("snr_gamma").get<double>();
  } catch (const json::exception& e) {
    LOOM_FAIL("diffusion options: ", e.what());
  }
  return o;
}

void DiffusionOptions::validate() const {
  const auto& s = schedule;
  LOOM_CHECK(s.prediction_type == "epsilon" || s.prediction_type == "v_prediction",
             "--prediction-type must be epsilon or v_prediction, got '", s.prediction_type, "'");
  LOOM_CHECK(s.beta_schedule == "scaled_linear" || s.beta_schedule == "linear" || s.beta_schedule == "squaredcos_cap_v2",
             "--beta-schedule must be scaled_linear, linear or squaredcos_cap_v2, got '", s.beta_schedule, "'");
  LOOM_CHECK(std::isfinite(s.beta_start) && std::isfinite(s.beta_end) && s.beta_start > 0 && s.beta_end < 1 &&
                 s.beta_start <= s.beta_end,
             "--beta-start / --beta-end must satisfy 0 < start ≤ end < 1, got ", s.beta_start, " and ", s.beta_end);
  LOOM_CHECK(s.num_train_timesteps >= 2, "--num-train-timesteps must be at least 2, got ", s.num_train_timesteps);
  LOOM_CHECK(!snr_gamma || (std::isfinite(*snr_gamma) && *snr_gamma > 0), "--snr-gamma must be a positive number");
  LOOM_CHECK(std::isfinite(noise_offset) && noise_offset >= 0, "--noise-offset must be ≥ 0, got ", noise_offset);
}

}  // namespace loom::trainer
