#include "trainer/out_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <ostream>

#include "io/temp_files.h"
#include "io/tensor_file.h"
#include "trainer/trainer.h"

namespace loom::trainer {

OutputDirLock::OutputDirLock(const std::string& dir, std::ostream& log) {
  const std::string path = dir + "/.lock";
  fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) throw io::FileError(path, std::string("cannot create the lock file (") + std::strerror(errno) + ")");
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char buf[32] = {};
    const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
    ::close(fd_);
    fd_ = -1;
    if (err != EWOULDBLOCK)
      throw io::FileError(path, std::string("cannot lock the output directory (") + std::strerror(err) + ")");
    std::string holder = n > 0 ? std::string(buf, size_t(n)) : "";
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    throw OptionError("--out " + dir + ": another loom run is writing into this directory" +
                      (holder.empty() ? "" : " (pid " + holder + ")") +
                      "; wait for it to finish or choose another --out");
  }
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd_, 0) == 0 && ::pwrite(fd_, pid.data(), pid.size(), 0) != ssize_t(pid.size())) {
    // The pid is only for the message of a second writer; the lock itself holds.
  }
  for (const std::string& name : io::remove_stale_temp_files(dir))
    log << "loom: removed " << dir << "/" << name << ", a temporary file left by a run that no longer runs\n";
}

OutputDirLock::~OutputDirLock() {
  if (fd_ >= 0) ::close(fd_);  // releases the flock
}

}  // namespace loom::trainer
