#include "tensor/error.h"

#include <cstdio>
#include <cstdlib>

namespace loom {

std::ostream& operator<<(std::ostream& os, const std::vector<int64_t>& shape) {
  os << '[';
  for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
  return os << ']';
}

namespace detail {

void throw_error(const std::string& msg, const char* func) {
  (void)func;  // not appended: messages start with the op name (see LOOM_CHECK in error.h)
  throw Error(msg);
}

void assert_fail(const char* cond, const char* file, int line) {
  throw Error(concat("loom internal error: assertion '", cond, "' failed at ", file, ":", line));
}

}  // namespace detail
}  // namespace loom
