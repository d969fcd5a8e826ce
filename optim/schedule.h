// Learning-rate schedules with diffusers' names and formulas
// (diffusers.optimization.get_scheduler, LambdaLR multipliers). With w warmup
// steps, T training steps and s the number of optimizer steps already taken
// (0 for the first step, as LambdaLR's last_epoch):
//
//   constant               1
//   constant_with_warmup   s < w ? s / max(1, w) : 1
//   linear                 s < w ? s / max(1, w) : max(0, (T − s) / max(1, T − w))
//   cosine                 s < w ? s / max(1, w)
//                                : max(0, ½·(1 + cos(π · 2·num_cycles · (s − w) / max(1, T − w))))
//
// num_cycles is 0.5 (a half cosine from 1 to 0 at s = T) as in diffusers.
// Note that warmup starts at factor 0: the first step runs with lr 0.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loom::optim {

class Optimizer;

enum class ScheduleKind { Constant, ConstantWithWarmup, Linear, Cosine };

class LRSchedule {
 public:
  // Throws for negative warmup/total steps, or a linear/cosine schedule
  // without total_steps > 0.
  explicit LRSchedule(ScheduleKind kind, int64_t warmup_steps = 0, int64_t total_steps = 0,
                      double num_cycles = 0.5);

  // The lr multiplier for step s >= 0 (throws for s < 0).
  double factor(int64_t step) const;
  // Sets optimizer.lr() to base_lr · factor(step).
  void apply(Optimizer& optimizer, int64_t step, double base_lr) const;

  ScheduleKind kind() const { return kind_; }
  std::string name() const;  // diffusers' name, e.g. "constant_with_warmup"
  int64_t warmup_steps() const { return warmup_; }
  int64_t total_steps() const { return total_; }

 private:
  ScheduleKind kind_;
  int64_t warmup_;
  int64_t total_;
  double num_cycles_;

  double warmup_factor(int64_t step) const;
};

// {"constant", "constant_with_warmup", "linear", "cosine"}.
std::vector<std::string> schedule_names();
// The schedule called `name` (case-insensitive); an unknown name throws naming
// it and listing the valid ones. `constant` ignores warmup_steps and
// total_steps; `constant_with_warmup` ignores total_steps.
LRSchedule make_schedule(const std::string& name, int64_t warmup_steps, int64_t total_steps);

}  // namespace loom::optim
