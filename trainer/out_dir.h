// The output directory of a training run (--out): one writer at a time.
#pragma once

#include <iosfwd>
#include <string>

namespace loom::trainer {

// Holds an exclusive flock on `<dir>/.lock` (created if needed; the holder's pid is written
// into it) for the object's lifetime. A second writer — another process, or another
// OutputDirLock on the same directory in this one — gets OptionError naming the directory
// and, when it can be read, the pid of the run holding it. The lock goes with the process, so
// a killed run never leaves the directory locked. On taking the lock, stale temporary files
// (`.<name>.tmp.<pid>` of processes that no longer run) are removed and named on `log`.
class OutputDirLock {
 public:
  OutputDirLock(const std::string& dir, std::ostream& log);
  ~OutputDirLock();
  OutputDirLock(const OutputDirLock&) = delete;
  OutputDirLock& operator=(const OutputDirLock&) = delete;

 private:
  int fd_ = -1;
};

}  // namespace loom::trainer
