// loom::Error and the LOOM_CHECK macro: every user-facing failure in loom is an
// exception of type loom::Error whose message names the operation and the
// shapes / dtypes / devices involved. Internal invariants use LOOM_ASSERT.
#pragma once

#include <sstream>
#include <stdexcept>
#include <cstdint>
#include <string>
#include <vector>

namespace loom {

// Printing of shapes ("[2, 3, 4]"); declared here so that messages built by
// LOOM_CHECK can include shapes.
std::ostream& operator<<(std::ostream& os, const std::vector<int64_t>& shape);

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

namespace detail {
inline void append(std::ostringstream&) {}
template <typename T, typename... Rest>
void append(std::ostringstream& os, const T& first, const Rest&... rest) {
  os << first;
  append(os, rest...);
}
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  append(os, args...);
  return os.str();
}
[[noreturn]] void throw_error(const std::string& msg, const char* func);
[[noreturn]] void assert_fail(const char* cond, const char* file, int line);
}  // namespace detail

}  // namespace loom

// Throws loom::Error("<message>") when cond is false. The message is shown to users as it is
// (the C++ function name is not appended: it means nothing to them), so it must start with the
// op, layer or file at fault: LOOM_CHECK(ok, "matmul: inner dims differ: ", a, " vs ", b).
#define LOOM_CHECK(cond, ...)                                                  \
  do {                                                                         \
    if (!(cond)) ::loom::detail::throw_error(::loom::detail::concat(__VA_ARGS__), __func__); \
  } while (0)

#define LOOM_FAIL(...) ::loom::detail::throw_error(::loom::detail::concat(__VA_ARGS__), __func__)

// Internal invariant (a bug in loom, not in the caller's input).
#define LOOM_ASSERT(cond)                                                      \
  do {                                                                         \
    if (!(cond)) ::loom::detail::assert_fail(#cond, __FILE__, __LINE__);       \
  } while (0)
