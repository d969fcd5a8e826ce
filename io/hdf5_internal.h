// HDF5 files (SPEC §5), through the HDF5 C API only (serial libhdf5; no C++ bindings).
// This header: what io/hdf5_write.cpp and io/hdf5_read.cpp share (the lock, owned identifiers,
// errors naming the file, names). Internal to loom_io.
//
// Layout: one dataset per tensor at the path made from its dotted name ("a.b.c" -> group /a/b,
// dataset c), little-endian IEEE f32/f64 (i64 tensors as little-endian 64-bit integers; bf16 and
// f16 tensors are widened to f32, which is exact), PyTorch (row-major) shapes, 0-d tensors as
// scalar dataspaces, empty tensors as dataspaces with a zero-sized dimension. Non-empty tensors
// are stored chunked (one chunk up to 16 MiB) with HDF5's Fletcher-32 checksum filter, so damaged
// tensor data is reported as corrupt instead of read silently (HDF5 checksums its own metadata in
// this format); h5py reads them transparently. Attributes are
// scalars: strings as fixed-length UTF-8 strings (h5py returns them as numpy.bytes_: .decode()
// gives str; see kVariableLengthStrings for why not variable-length), integers as little-endian
// int64, doubles as little-endian f64. Groups are created with link creation order
// tracked, so a file written by loom reads back with its tensors in the order they were written
// (per group, depth first); files without that (most h5py files) read in name order.
//
// Reading: float datasets of 32/64 bits read as f32/f64 (16-bit floats, e.g. numpy float16, are
// widened to f32), integer datasets of any size and signedness as i64 (a value outside the int64
// range is an error, not a clamp); any other type (strings, compounds such as complex numbers,
// enums such as numpy bool, ...) is a FileError naming the dataset and its type. The attributes of
// the root and of every group are returned (those of datasets are ignored); an attribute must hold
// one value (a scalar or a one-element array) of integer, float or string type. Soft and external
// links are refused (an external link could make a read touch another file); a group reached twice
// (a hard-link cycle) is an error.
//
// Every HDF5 call is checked. HDF5's automatic error printing is switched off (see Hdf5Session),
// and the innermost message of HDF5's error stack is appended to the FileError. Every
// handle is closed on every path (H5Id below). HDF5 (serial) is not thread-safe: all calls are
// serialised by one mutex.
//
// Writing is atomic: the file is created as `.<name>.tmp.<pid>[.<n>]` next to the target, closed,
// fsync'ed and renamed over the target (the directory is fsync'ed afterwards, best effort). On any
// failure the temporary file is removed, the target is untouched and FileError is thrown.
#pragma once

#include <hdf5.h>

#include <cerrno>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "io/tensor_file.h"

namespace loom::io::hdf5 {

// ---- HDF5 plumbing ---------------------------------------------------------------------------

// HDF5 (serial build) is not thread-safe.
inline std::mutex& hdf5_mutex() {
  static std::mutex m;
  return m;
}

// Holds the HDF5 lock for the duration of a read or a write, with HDF5's automatic error printing
// switched off (loom reports every failure itself, as a FileError). It is left off afterwards: after
// some corrupt files HDF5 1.10 keeps a few internal objects it failed to free, and with printing on
// it reports "HDF5: infinite loop closing library" on stderr at process exit. Only io/hdf5_*.cpp call
// HDF5 in loom.
class Hdf5Session {
 public:
  Hdf5Session() : lock_(hdf5_mutex()) {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    H5Eclear2(H5E_DEFAULT);
  }
  ~Hdf5Session() { H5Eclear2(H5E_DEFAULT); }
  Hdf5Session(const Hdf5Session&) = delete;
  Hdf5Session& operator=(const Hdf5Session&) = delete;

 private:
  std::lock_guard<std::mutex> lock_;
};

// An owned HDF5 identifier, closed with its type's close function.
class H5Id {
 public:
  using Closer = herr_t (*)(hid_t);
  H5Id() = default;
  H5Id(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  H5Id(H5Id&& o) noexcept : id_(o.id_), closer_(o.closer_) { o.id_ = H5I_INVALID_HID; }
  H5Id& operator=(H5Id&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      closer_ = o.closer_;
      o.id_ = H5I_INVALID_HID;
    }
    return *this;
  }
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  ~H5Id() { reset(); }

  hid_t get() const { return id_; }
  // Closes now; returns the close function's status (0 when nothing was open).
  herr_t reset() {
    herr_t status = 0;
    if (id_ >= 0 && closer_) status = closer_(id_);
    id_ = H5I_INVALID_HID;
    return status;
  }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

// The innermost (most specific) message on HDF5's error stack; clears the stack.
inline herr_t innermost_error(unsigned n, const H5E_error2_t* err, void* data) {
  auto* out = static_cast<std::string*>(data);
  if (out->empty() && err && err->desc && *err->desc) {
    try {
      *out = err->desc;
    } catch (...) {
      return -1;
    }
  }
  (void)n;
  return 0;
}

inline std::string hdf5_detail() {
  std::string detail;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, innermost_error, &detail);
  H5Eclear2(H5E_DEFAULT);
  return detail;
}

inline const char* class_name(H5T_class_t c) {
  switch (c) {
    case H5T_INTEGER: return "integer";
    case H5T_FLOAT: return "float";
    case H5T_TIME: return "time";
    case H5T_STRING: return "string";
    case H5T_BITFIELD: return "bitfield";
    case H5T_OPAQUE: return "opaque";
    case H5T_COMPOUND: return "compound, e.g. complex";
    case H5T_REFERENCE: return "reference";
    case H5T_ENUM: return "enum, e.g. bool";
    case H5T_VLEN: return "variable-length sequence";
    case H5T_ARRAY: return "array";
    default: return "unknown";
  }
}

inline std::string quoted(const std::string& s) { return "'" + s + "'"; }

inline std::string errno_text(int err) { return std::strerror(err); }

// Errors of one file.
struct Context {
  std::string path;

  [[noreturn]] void fail(const std::string& problem) const { throw FileError(path, problem); }
  // `what` is "<function>" or "<function> for <subject>": "(H5Dread failed for 'x': <detail>)".
  [[noreturn]] void fail_h5(const std::string& problem, const std::string& what) const {
    const std::string detail = hdf5_detail();
    const size_t space = what.find(' ');
    const std::string call = space == std::string::npos
                                 ? what + " failed"
                                 : what.substr(0, space) + " failed" + what.substr(space);
    throw FileError(path, problem + " (" + call + (detail.empty() ? "" : ": " + detail) + ")");
  }
  H5Id check(hid_t id, H5Id::Closer closer, const std::string& problem, const std::string& what) const {
    if (id < 0) fail_h5(problem, what);
    return H5Id(id, closer);
  }
  void check(herr_t status, const std::string& problem, const std::string& what) const {
    if (status < 0) fail_h5(problem, what);
  }
};

// File access: the sec2 driver, every object closed with the file, no file locking (the files
// loom reads are not being written: a writer writes a temporary file and renames it) and, for
// writing, the HDF5 1.10 file format (read by HDF5 >= 1.10, so by any current h5py; it indexes a
// dataset of one chunk without a B-tree, which keeps checksummed small tensors small).
inline H5Id file_access(const Context& c, const std::string& problem, bool for_writing) {
  H5Id fapl = c.check(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, problem, "H5Pcreate");
  c.check(H5Pset_fclose_degree(fapl.get(), H5F_CLOSE_STRONG), problem, "H5Pset_fclose_degree");
#if (H5_VERS_MAJOR == 1 && H5_VERS_MINOR == 10 && H5_VERS_RELEASE >= 7) || H5_VERSION_GE(1, 12, 1)
  c.check(H5Pset_file_locking(fapl.get(), false, true), problem, "H5Pset_file_locking");
#endif
#if H5_VERSION_GE(1, 10, 2)
  if (for_writing)
    c.check(H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V110, H5F_LIBVER_V110), problem, "H5Pset_libver_bounds");
#else
  (void)for_writing;
#endif
  return fapl;
}

// ---- names -------------------------------------------------------------------------------------

inline std::vector<std::string> split_dotted(const std::string& name) {
  std::vector<std::string> parts;
  size_t begin = 0;
  while (true) {
    const size_t dot = name.find('.', begin);
    parts.push_back(name.substr(begin, dot == std::string::npos ? std::string::npos : dot - begin));
    if (dot == std::string::npos) break;
    begin = dot + 1;
  }
  return parts;
}

// "a.b.c" -> "/a/b/c"
inline std::string h5_path(const std::vector<std::string>& parts, size_t count) {
  std::string p;
  for (size_t i = 0; i < count; ++i) p += "/" + parts[i];
  return p.empty() ? "/" : p;
}

inline std::string dotted(const std::vector<std::string>& parts, size_t count) {
  std::string p;
  for (size_t i = 0; i < count; ++i) p += (i ? "." : "") + parts[i];
  return p;
}

inline void check_name(const Context& c, const std::string& what, const std::string& name) {
  if (name.empty()) c.fail("cannot write: " + what + " has an empty name");
  for (const std::string& part : split_dotted(name)) {
    if (part.empty()) c.fail("cannot write: " + what + " " + quoted(name) + " has an empty component");
    if (part.find('/') != std::string::npos)
      c.fail("cannot write: " + what + " " + quoted(name) + " contains '/' (dots separate groups)");
    if (part.find('\0') != std::string::npos) c.fail("cannot write: " + what + " " + quoted(name) + " contains a NUL byte");
  }
}

}  // namespace loom::io::hdf5
