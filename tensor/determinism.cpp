#include "tensor/determinism.h"

#include <atomic>

namespace loom {
namespace {
std::atomic<bool> deterministic{false};
}  // namespace

void set_deterministic_algorithms(bool on) { deterministic = on; }
bool deterministic_algorithms() { return deterministic; }

}  // namespace loom
