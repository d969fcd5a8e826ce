#include "io/temp_files.h"

#include <dirent.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace loom::io {

namespace {

// Fixed storage, so that the signal handler reads it without allocating or locking.
// state: 0 free, 1 being filled in, 2 registered.
struct Slot {
  std::atomic<int> state{0};
  char path[4096];
};
Slot g_slots[kMaxTempFiles];

void unlink_registered_and_reraise(int sig) {
  for (Slot& s : g_slots)
    if (s.state.load() == 2) ::unlink(s.path);
  // SA_RESETHAND restored the default action; the signal, blocked while this handler
  // runs, is delivered again when it returns.
  ::raise(sig);
}

// "<pid>" or "<pid>.<n>" → pid; 0 when `s` is not of that form.
long pid_of_suffix(const char* s) {
  char* end = nullptr;
  errno = 0;
  const long pid = std::strtol(s, &end, 10);
  if (errno || end == s || pid <= 0) return 0;
  if (*end == '.') {
    const char* n = end + 1;
    if (*n == '\0') return 0;
    for (; *n; ++n)
      if (*n < '0' || *n > '9') return 0;
  } else if (*end != '\0') {
    return 0;
  }
  return pid;
}

}  // namespace

int register_temp_file(const std::string& path) {
  if (path.size() + 1 > sizeof(Slot::path)) return -1;
  for (int i = 0; i < kMaxTempFiles; ++i) {
    int expected = 0;
    if (g_slots[i].state.compare_exchange_strong(expected, 1)) {
      std::memcpy(g_slots[i].path, path.c_str(), path.size() + 1);
      g_slots[i].state.store(2);
      return i;
    }
  }
  return -1;
}

void unregister_temp_file(int slot) {
  if (slot >= 0 && slot < kMaxTempFiles) g_slots[slot].state.store(0);
}

void temp_file_created(const std::string& path) {
  const char* hook = std::getenv("LOOM_TEST_HOLD_SAVE_FD");
  if (!hook || !*hook) return;
  const char* only = std::getenv("LOOM_TEST_HOLD_SAVE_NAME");
  if (only && *only && path.substr(path.find_last_of('/') + 1).find(only) == std::string::npos) return;
  const int fd = std::atoi(hook);
  const std::string line = path + "\n";
  if (::write(fd, line.data(), line.size()) != ssize_t(line.size())) return;
  for (;;) ::pause();  // until a signal ends the process
}

void remove_temp_files_on_signals() {
  struct sigaction sa {};
  sa.sa_handler = unlink_registered_and_reraise;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESETHAND;
  ::sigaction(SIGTERM, &sa, nullptr);
  ::sigaction(SIGINT, &sa, nullptr);
}

std::vector<std::string> remove_stale_temp_files(const std::string& dir) {
  std::vector<std::string> removed;
  DIR* d = ::opendir(dir.c_str());
  if (!d) return removed;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name.size() < 2 || name[0] != '.') continue;
    const size_t tag = name.rfind(".tmp.");
    if (tag == std::string::npos || tag == 0) continue;
    // The pid is the first number after ".tmp." (".<n>" may follow it).
    const long pid = pid_of_suffix(name.c_str() + tag + 5);
    if (pid == 0 || pid == long(::getpid())) continue;
    if (::kill(pid_t(pid), 0) == 0 || errno != ESRCH) continue;  // still running (or not ours to ask)
    if (::unlink((dir + "/" + name).c_str()) == 0) removed.push_back(name);
  }
  ::closedir(d);
  return removed;
}

}  // namespace loom::io
