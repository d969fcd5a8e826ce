// The format-independent parts of io/tensor_file.h: FileError, TensorFile::find, detect_format,
// read_tensor_file, format_name and the atomic writer shared by both formats.
#include "io/tensor_file.h"
#include "io/temp_files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cerrno>
#include <cstring>
#include <functional>

namespace loom::io {

FileError::FileError(const std::string& path, const std::string& problem)
    : Error(path + ": " + problem), path_(path) {}

const Tensor* TensorFile::find(const std::string& name) const {
  for (const auto& [n, t] : tensors)
    if (n == name) return &t;
  return nullptr;
}

namespace {

std::string errno_text(int err) { return std::strerror(err); }

// Reads up to `n` bytes at `offset`; returns how many were read.
size_t read_at(int fd, unsigned char* buf, size_t n, off_t offset) {
  size_t got = 0;
  while (got < n) {
    const ssize_t r = ::pread(fd, buf + got, n - got, offset + off_t(got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    got += size_t(r);
  }
  return got;
}

constexpr unsigned char kHdf5Signature[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
constexpr uint64_t kMaxSafetensorsHeader = 100u * 1000u * 1000u;  // SPEC §5: 100 MB

}  // namespace

FileFormat detect_format(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FileError(path, "cannot open (" + errno_text(errno) + ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw FileError(path, "cannot stat (" + errno_text(err) + ")");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FileError(path, S_ISDIR(st.st_mode) ? "is a directory, not a file" : "not a regular file");
  }
  unsigned char head[9] = {};
  const size_t got = read_at(fd, head, sizeof head, 0);
  // HDF5: the superblock signature is at 0, or at 512, 1024, 2048, ... when there is a user block.
  bool hdf5 = got >= 8 && std::memcmp(head, kHdf5Signature, 8) == 0;
  for (off_t off = 512; !hdf5 && off + 8 <= off_t(st.st_size); off *= 2) {
    unsigned char sig[8];
    if (read_at(fd, sig, 8, off) == 8 && std::memcmp(sig, kHdf5Signature, 8) == 0) hdf5 = true;
  }
  ::close(fd);
  if (hdf5) return FileFormat::Hdf5;
  if (got == 9 && head[8] == '{') {
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | head[i];
    // A plausible header length; read_safetensors reports a truncated file precisely.
    if (n >= 2 && n <= kMaxSafetensorsHeader) return FileFormat::Safetensors;
  }
  throw FileError(path, "not a safetensors or HDF5 file");
}

TensorFile read_tensor_file(const std::string& path) {
  switch (detect_format(path)) {
    case FileFormat::Safetensors: return read_safetensors(path);
    case FileFormat::Hdf5: return read_hdf5(path);
  }
  throw FileError(path, "unknown file format");
}

// ---- model weights --------------------------------------------------------------------------

namespace {

template <typename T>
bool finite_values(const void* data, int64_t n) {
  const T* p = static_cast<const T*>(data);
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(p[i])) return false;
  return true;
}

// bf16 / f16: Inf and NaN are the values whose exponent bits are all ones.
bool finite_halves(const void* data, int64_t n, uint16_t exponent_bits) {
  const uint16_t* p = static_cast<const uint16_t*>(data);
  for (int64_t i = 0; i < n; ++i)
    if ((p[i] & exponent_bits) == exponent_bits) return false;
  return true;
}

}  // namespace

bool all_finite(const Tensor& t) {
  if (!t.defined() || !is_floating(t.dtype()) || t.numel() == 0) return true;
  const Tensor host = t.device().is_cpu() && t.is_contiguous() ? t : t.to(Device::cpu()).contiguous();
  const int64_t n = host.numel();
  switch (host.dtype()) {
    case DType::F32: return finite_values<float>(host.raw_data(), n);
    case DType::F64: return finite_values<double>(host.raw_data(), n);
    case DType::BF16: return finite_halves(host.raw_data(), n, 0x7F80);
    case DType::F16: return finite_halves(host.raw_data(), n, 0x7C00);
    default: return true;
  }
}

TensorFile read_weight_file(const std::string& path, std::vector<std::string>& notes) {
  TensorFile f = read_tensor_file(path);
  for (const auto& [key, t] : f.tensors)
    if (!all_finite(t)) throw FileError(path, "key '" + key + "' holds NaN or Inf values");
  for (const std::string& n : f.notes) notes.push_back(path + ": " + n);
  return f;
}

const char* format_name(FileFormat f) {
  switch (f) {
    case FileFormat::Safetensors: return "safetensors";
    case FileFormat::Hdf5: return "HDF5";
  }
  return "unknown";
}

// ---- atomic writes --------------------------------------------------------------------------

namespace detail {

TempFileRegistration::TempFileRegistration(const std::string& tmp) : slot_(register_temp_file(tmp)) {}
TempFileRegistration::~TempFileRegistration() { unregister_temp_file(slot_); }

// Writes a file atomically: `produce` is handed a function that appends bytes to a temporary file
// `.<name>.tmp.<pid>` in the target's directory; the file is then fsync'ed and renamed over `path`.
// On any failure (including an exception from `produce`) the temporary file is removed, the
// target is left untouched and FileError is thrown. Declared again in io/safetensors.cpp.
void write_file_atomic_with(const std::string& path,
                            const std::function<void(const std::function<void(const void*, size_t)>&)>& produce) {
  if (path.empty()) throw FileError(path, "empty file name");
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  if (base.empty() || base == "." || base == "..") throw FileError(path, "not a file name");
  const std::string prefix = (slash == std::string::npos ? "" : path.substr(0, slash + 1)) + "." + base + ".tmp." +
                             std::to_string(::getpid());

  // Unique within this process too (two threads saving the same path get different names).
  static std::atomic<unsigned> counter{0};
  std::string tmp = prefix;
  int fd = -1;
  for (int attempt = 0; attempt < 100; ++attempt) {
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd >= 0 || errno != EEXIST) break;
    tmp = prefix + "." + std::to_string(counter.fetch_add(1) + 1);
  }
  if (fd < 0)
    throw FileError(path, "cannot create a temporary file in directory '" + dir + "' (" + errno_text(errno) + ")");
  const TempFileRegistration registration(tmp);  // removed by SIGTERM/SIGINT until renamed
  temp_file_created(tmp);

  // Keep the permissions of a file being replaced.
  struct stat old {};
  if (::stat(path.c_str(), &old) == 0 && S_ISREG(old.st_mode)) ::fchmod(fd, old.st_mode & 07777);

  std::string problem;
  auto fail = [&](const std::string& what) {
    if (problem.empty()) problem = what;
  };
  try {
    produce([&](const void* data, size_t n) {
      if (!problem.empty()) return;
      const char* p = static_cast<const char*>(data);
      while (n > 0) {
        const ssize_t w = ::write(fd, p, n > (size_t(1) << 30) ? (size_t(1) << 30) : n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) {
          fail("cannot write (" + errno_text(w < 0 ? errno : EIO) + ")");
          return;
        }
        p += w;
        n -= size_t(w);
      }
    });
  } catch (...) {
    ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (problem.empty() && ::fsync(fd) != 0) fail("cannot flush to disk (" + errno_text(errno) + ")");
  if (::close(fd) != 0) fail("cannot write (" + errno_text(errno) + ")");
  if (problem.empty() && ::rename(tmp.c_str(), path.c_str()) != 0)
    fail("cannot rename the temporary file over it (" + errno_text(errno) + ")");
  if (!problem.empty()) {
    ::unlink(tmp.c_str());
    throw FileError(path, problem);
  }
  // Make the rename itself durable (best effort: some file systems refuse fsync on directories).
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace detail

void write_file_atomic(const std::string& path, const std::string& bytes) {
  detail::write_file_atomic_with(path, [&](const std::function<void(const void*, size_t)>& write) {
    write(bytes.data(), bytes.size());
  });
}

}  // namespace loom::io
