// Random damage to an h5py-written HDF5 file: loom's reader must answer every copy with a tensor
// file or a FileError, never a crash or a hang.
//
//   fuzz_hdf5_damage SEED_FILE COUNT [RNG_SEED] [WORK_DIR]
//
// Makes COUNT damaged copies of SEED_FILE (tests/io/fixtures/h5py_lora.h5: written by h5py, with
// variable-length string attributes and so a global heap) and reads each with io::read_hdf5 in a
// child process (so that a crash is counted, not fatal). Kinds of damage, in turn: 1-8 random bytes
// anywhere; 1-4 random bytes inside the global heap collection (GCOL); one 8-byte field set to
// 0x00, 0xFF or random bytes; truncation. A child that is killed by a signal, exits otherwise than
// "read" or "FileError", or runs over 60 s is a failure; its file is kept in WORK_DIR. Prints the
// counts and 'N passed, M failed' (and a progress line every 250 copies); exit status 1 on any
// failure. ctest io_h5py_fuzz runs 300 copies; docs/io.md records the long runs.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <random>
#include <string>

#include "io/tensor_file.h"

namespace {

std::string damage(const std::string& data, std::mt19937_64& rng, int kind, size_t heap_at) {
  std::string b = data;
  auto below = [&](size_t n) { return size_t(rng() % n); };
  if (kind == 1 && heap_at == std::string::npos) kind = 0;
  switch (kind) {
    case 0:
      for (size_t i = 0, n = 1 + below(8); i < n; ++i) b[below(b.size())] = char(rng());
      break;
    case 1:
      for (size_t i = 0, n = 1 + below(4); i < n; ++i) b[std::min(b.size() - 1, heap_at + below(4096))] = char(rng());
      break;
    case 2: {
      const size_t at = below(b.size() - 8);
      const int fill = int(below(3));
      for (size_t i = 0; i < 8; ++i) b[at + i] = fill == 0 ? '\0' : fill == 1 ? char(0xff) : char(rng());
      break;
    }
    default:
      b.resize(below(b.size()));
  }
  return b;
}

// 0: read; 3: FileError; other values: a failure (signal number + 1000, 2000 for a hang).
int read_in_child(const std::string& path) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::alarm(60);  // a hang ends as SIGALRM
    int code = 0;
    try {
      loom::io::read_hdf5(path);
    } catch (const loom::io::FileError&) {
      code = 3;
    } catch (...) {
      code = 4;
    }
    ::_exit(code);
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
  }
  if (WIFSIGNALED(status) && WTERMSIG(status) == SIGALRM) return 2000;
  if (WIFSIGNALED(status)) return 1000 + WTERMSIG(status);
  return WEXITSTATUS(status);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: fuzz_hdf5_damage SEED_FILE COUNT [RNG_SEED] [WORK_DIR]\n";
    return 2;
  }
  std::ifstream in(argv[1], std::ios::binary);
  const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (data.size() < 64) {
    std::cerr << "fuzz_hdf5_damage: cannot read " << argv[1] << "\n";
    return 2;
  }
  const long count = std::stol(argv[2]);
  std::mt19937_64 rng(argc > 3 ? std::stoull(argv[3]) : 1);
  const std::string work = argc > 4 ? argv[4] : "/tmp";
  const size_t heap_at = data.find("GCOL");
  long read = 0, file_errors = 0, failures = 0;
  for (long i = 0; i < count; ++i) {
    const std::string path = work + "/fuzz_hdf5_case_" + std::to_string(i) + ".h5";
    {
      std::ofstream out(path, std::ios::binary | std::ios::trunc);
      const std::string copy = damage(data, rng, int(i % 4), heap_at);
      out.write(copy.data(), std::streamsize(copy.size()));
    }
    const int r = read_in_child(path);
    if ((i + 1) % 250 == 0)  // progress, so that an interrupted run still has a record
      std::cout << "progress: " << i + 1 << " copies, " << failures + (r != 0 && r != 3) << " failed" << std::endl;
    if (r == 0 || r == 3) {
      ++(r == 0 ? read : file_errors);
      std::remove(path.c_str());
      continue;
    }
    ++failures;
    if (failures <= 20)
      std::cout << "case " << i << " (kind " << i % 4 << "): "
                << (r >= 2000 ? "hang" : r >= 1000 ? "signal " + std::to_string(r - 1000) : "exit " + std::to_string(r))
                << " (" << path << ")\n";
  }
  std::cout << count << " damaged copies: " << read << " read, " << file_errors << " FileErrors, " << failures
            << " crashes or hangs\n"
            << (count - failures) << " passed, " << failures << " failed\n";
  return failures ? 1 : 0;
}
