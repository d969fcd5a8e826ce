// Learning-rate schedules (diffusers' lambdas; formulas in schedule.h).
#include "optim/schedule.h"

#include <algorithm>
#include <cmath>

#include "optim/optimizer.h"

namespace loom::optim {

namespace {

const char* kind_name(ScheduleKind k) {
  switch (k) {
    case ScheduleKind::Constant: return "constant";
    case ScheduleKind::ConstantWithWarmup: return "constant_with_warmup";
    case ScheduleKind::Linear: return "linear";
    case ScheduleKind::Cosine: return "cosine";
  }
  return "?";
}

constexpr double kPi = 3.14159265358979323846;

}  // namespace

LRSchedule::LRSchedule(ScheduleKind kind, int64_t warmup_steps, int64_t total_steps, double num_cycles)
    : kind_(kind), warmup_(warmup_steps), total_(total_steps), num_cycles_(num_cycles) {
  LOOM_CHECK(warmup_ >= 0, "LRSchedule(", name(), "): warmup_steps must be >= 0, got ", warmup_);
  LOOM_CHECK(total_ >= 0, "LRSchedule(", name(), "): total_steps must be >= 0, got ", total_);
  const bool decays = kind == ScheduleKind::Linear || kind == ScheduleKind::Cosine;
  LOOM_CHECK(!decays || total_ > 0, "LRSchedule(", name(), "): needs total_steps > 0");
  LOOM_CHECK(std::isfinite(num_cycles_), "LRSchedule(", name(), "): num_cycles must be finite");
}

std::string LRSchedule::name() const { return kind_name(kind_); }

double LRSchedule::warmup_factor(int64_t step) const { return double(step) / double(std::max<int64_t>(1, warmup_)); }

double LRSchedule::factor(int64_t step) const {
  LOOM_CHECK(step >= 0, "LRSchedule(", name(), ").factor: step must be >= 0, got ", step);
  if (kind_ == ScheduleKind::Constant) return 1.0;
  if (step < warmup_) return warmup_factor(step);
  const double span = double(std::max<int64_t>(1, total_ - warmup_));
  switch (kind_) {
    case ScheduleKind::Linear: return std::max(0.0, double(total_ - step) / span);
    case ScheduleKind::Cosine: {
      const double progress = double(step - warmup_) / span;
      return std::max(0.0, 0.5 * (1.0 + std::cos(kPi * num_cycles_ * 2.0 * progress)));
    }
    default: return 1.0;  // constant_with_warmup after warmup
  }
}

void LRSchedule::apply(Optimizer& optimizer, int64_t step, double base_lr) const {
  optimizer.set_lr(base_lr * factor(step));
}

std::vector<std::string> schedule_names() { return {"constant", "constant_with_warmup", "linear", "cosine"}; }

LRSchedule make_schedule(const std::string& name, int64_t warmup_steps, int64_t total_steps) {
  const std::string n = detail::lower(name);
  for (ScheduleKind k : {ScheduleKind::Constant, ScheduleKind::ConstantWithWarmup, ScheduleKind::Linear,
                         ScheduleKind::Cosine})
    if (n == kind_name(k)) return LRSchedule(k, warmup_steps, total_steps);
  LOOM_FAIL("make_schedule: unknown schedule '", name, "' (valid: ", detail::join(schedule_names()), ")");
}

}  // namespace loom::optim
