#include "tensor/device.h"

#include <cctype>

#include "tensor/error.h"

namespace loom {

Device Device::parse(const std::string& s) {
  if (s == "cpu") return cpu();
  if (s == "cuda") return cuda(0);
  if (s.rfind("cuda:", 0) == 0 && s.size() > 5) {
    int idx = 0;
    for (size_t i = 5; i < s.size(); ++i) {
      LOOM_CHECK(std::isdigit(static_cast<unsigned char>(s[i])), "Device::parse: bad device '", s,
                 "' (expected cpu, cuda or cuda:N)");
      idx = idx * 10 + (s[i] - '0');
      LOOM_CHECK(idx < 1024, "Device::parse: device index too large in '", s, "'");
    }
    return cuda(idx);
  }
  LOOM_FAIL("Device::parse: bad device '", s, "' (expected cpu, cuda or cuda:N)");
}

std::string Device::str() const { return is_cpu() ? "cpu" : "cuda:" + std::to_string(index); }

}  // namespace loom
