// Temporary files of atomic writes (`.<name>.tmp.<pid>[.<n>]` next to the target):
// a registry of the ones this process is writing, removed by a SIGTERM/SIGINT
// handler, and the removal of stale ones left by processes that no longer run.
#pragma once

#include <string>
#include <vector>

namespace loom::io {

// Registers `path` as a temporary file being written (at most kMaxTempFiles at once; beyond
// that the file is simply not registered). Returns a slot for unregister_temp_file, or -1.
// Thread-safe. When the environment variable LOOM_TEST_HOLD_SAVE_FD names an open file
// descriptor (a test hook), the path and a newline are written to it after registration and the
// calling thread then blocks until a signal arrives; tests use it to stop a run mid-save. With
// LOOM_TEST_HOLD_SAVE_NAME set, only a file whose name contains that text is held.
int register_temp_file(const std::string& path);
void unregister_temp_file(int slot);
inline constexpr int kMaxTempFiles = 16;

// Called by the atomic writers once the temporary file exists: runs the test hook above.
void temp_file_created(const std::string& path);

namespace detail {
// Registers a temporary file for the lifetime of the object (register_temp_file / unregister_temp_file).
class TempFileRegistration {
 public:
  explicit TempFileRegistration(const std::string& tmp);
  ~TempFileRegistration();
  TempFileRegistration(const TempFileRegistration&) = delete;
  TempFileRegistration& operator=(const TempFileRegistration&) = delete;

 private:
  int slot_;
};
}  // namespace detail

// Installs handlers for SIGTERM and SIGINT that unlink every registered temporary file
// (async-signal-safe: unlink only) and then end the process by the same signal, as the
// default action would. For programs (the `loom` command line), not for the library.
void remove_temp_files_on_signals();

// Removes, in `dir` (not recursive), every `.<name>.tmp.<pid>[.<n>]` file whose process
// <pid> no longer runs. Returns the names removed (the caller reports them).
std::vector<std::string> remove_stale_temp_files(const std::string& dir);

}  // namespace loom::io
