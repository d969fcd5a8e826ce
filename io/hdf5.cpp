// HDF5 files (SPEC §5), through the HDF5 C API only (serial libhdf5; no C++ bindings).
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
#include <fcntl.h>
#include <signal.h>
#include <hdf5.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cerrno>
#include <cstring>
#include <functional>
#include <limits>
#include <mutex>
#include <optional>
#include <new>
#include <set>

#include "io/temp_files.h"
#include "io/tensor_file.h"

namespace loom::io {
namespace {

// ---- HDF5 plumbing ---------------------------------------------------------------------------

// HDF5 (serial build) is not thread-safe.
std::mutex& hdf5_mutex() {
  static std::mutex m;
  return m;
}

// Holds the HDF5 lock for the duration of a read or a write, with HDF5's automatic error printing
// switched off (loom reports every failure itself, as a FileError). It is left off afterwards: after
// some corrupt files HDF5 1.10 keeps a few internal objects it failed to free, and with printing on
// it reports "HDF5: infinite loop closing library" on stderr at process exit. Only this file calls
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
herr_t innermost_error(unsigned n, const H5E_error2_t* err, void* data) {
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

std::string hdf5_detail() {
  std::string detail;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, innermost_error, &detail);
  H5Eclear2(H5E_DEFAULT);
  return detail;
}

const char* class_name(H5T_class_t c) {
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

std::string quoted(const std::string& s) { return "'" + s + "'"; }

std::string errno_text(int err) { return std::strerror(err); }

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
H5Id file_access(const Context& c, const std::string& problem, bool for_writing) {
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

// ---- variable-length strings ----------------------------------------------------------------------

// Reads a variable-length string attribute in a child process. Such strings live in the file's
// global heap, and HDF5 1.10 trusts the heap's sizes and the string's heap index (checked by
// asserts only): a damaged heap or index makes H5Aread read out of bounds and crash (found by
// fuzzing h5py-written files; loom itself writes fixed-length strings). The child does the read
// and sends the bytes back through a pipe; if it crashes, the parent reports the attribute as
// corrupt; one that loops (another effect of a damaged heap) is stopped by an alarm after 10 s.
// The child only calls H5Aread, write and _exit (no HDF5 teardown, no core file).
std::string read_variable_length_string(const Context& c, hid_t attr, hid_t mem, const std::string& what) {
  constexpr size_t kMaxString = size_t(64) << 20;
  // A damaged heap entry can also claim gigabytes, which HDF5 then allocates and copies for
  // seconds (so that the outcome depended on the time it took): no string needs more than a few
  // times kMaxString, so the child's address space may grow by 512 MiB at most (measured here:
  // the child calls nothing but setrlimit, H5Aread, write and _exit).
  rlim_t address_cap = 0;
  if (FILE* statm = std::fopen("/proc/self/statm", "r")) {
    unsigned long pages = 0;
    if (std::fscanf(statm, "%lu", &pages) == 1)
      address_cap = rlim_t(pages) * rlim_t(::sysconf(_SC_PAGESIZE)) + (rlim_t(512) << 20);
    std::fclose(statm);
  }
  int fds[2];
  if (::pipe(fds) != 0) c.fail("cannot read " + what + " (pipe: " + errno_text(errno) + ")");
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int err = errno;
    ::close(fds[0]), ::close(fds[1]);
    c.fail("cannot read " + what + " (fork: " + errno_text(err) + ")");
  }
  if (pid == 0) {  // child
    ::close(fds[0]);
    struct rlimit no_core {0, 0};
    ::setrlimit(RLIMIT_CORE, &no_core);
    ::alarm(10);  // damaged heaps can also make HDF5 loop forever: a string never takes this long
    if (address_cap > 0) {
      struct rlimit as {address_cap, address_cap};
      ::setrlimit(RLIMIT_AS, &as);
    }
    char* p = nullptr;
    if (H5Aread(attr, mem, &p) < 0) ::_exit(2);
    const size_t n = p ? ::strnlen(p, kMaxString + 1) : 0;
    if (n > kMaxString) ::_exit(3);
    const uint64_t len = n;
    bool ok = ::write(fds[1], &len, sizeof len) == ssize_t(sizeof len);
    for (size_t done = 0; ok && done < n;) {
      const ssize_t w = ::write(fds[1], p + done, n - done);
      ok = w > 0;
      done += ok ? size_t(w) : 0;
    }
    ::_exit(ok ? 0 : 4);
  }
  ::close(fds[1]);
  std::string bytes;
  char buf[65536];
  for (;;) {
    const ssize_t r = ::read(fds[0], buf, sizeof buf);
    if (r > 0 && bytes.size() + size_t(r) <= kMaxString + sizeof(uint64_t)) bytes.append(buf, size_t(r));
    if (r == 0 || (r < 0 && errno != EINTR) || bytes.size() > kMaxString) break;
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFSIGNALED(status))
    c.fail("truncated or corrupt (" + what + ": a variable-length string whose global-heap entry is damaged" +
           (WTERMSIG(status) == SIGALRM ? "; reading it did not end" : "") + ")");
  if (!WIFEXITED(status) || WEXITSTATUS(status) == 3)
    c.fail(what + " is a string longer than " + std::to_string(kMaxString >> 20) + " MiB");
  if (WEXITSTATUS(status) == 2) c.fail("truncated or corrupt (H5Aread failed for " + what + ")");
  uint64_t len = 0;
  if (WEXITSTATUS(status) != 0 || bytes.size() < sizeof len) c.fail("cannot read " + what + " (the reader process failed)");
  std::memcpy(&len, bytes.data(), sizeof len);
  if (len != bytes.size() - sizeof len) c.fail("cannot read " + what + " (the reader process sent a short string)");
  return bytes.substr(sizeof len);
}

// ---- names -------------------------------------------------------------------------------------

std::vector<std::string> split_dotted(const std::string& name) {
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
std::string h5_path(const std::vector<std::string>& parts, size_t count) {
  std::string p;
  for (size_t i = 0; i < count; ++i) p += "/" + parts[i];
  return p.empty() ? "/" : p;
}

std::string dotted(const std::vector<std::string>& parts, size_t count) {
  std::string p;
  for (size_t i = 0; i < count; ++i) p += (i ? "." : "") + parts[i];
  return p;
}

void check_name(const Context& c, const std::string& what, const std::string& name) {
  if (name.empty()) c.fail("cannot write: " + what + " has an empty name");
  for (const std::string& part : split_dotted(name)) {
    if (part.empty()) c.fail("cannot write: " + what + " " + quoted(name) + " has an empty component");
    if (part.find('/') != std::string::npos)
      c.fail("cannot write: " + what + " " + quoted(name) + " contains '/' (dots separate groups)");
    if (part.find('\0') != std::string::npos) c.fail("cannot write: " + what + " " + quoted(name) + " contains a NUL byte");
  }
}

// ---- writing -----------------------------------------------------------------------------------

H5Id group_creation(const Context& c) {
  const std::string problem = "cannot write";
  H5Id gcpl = c.check(H5Pcreate(H5P_GROUP_CREATE), H5Pclose, problem, "H5Pcreate");
  c.check(H5Pset_link_creation_order(gcpl.get(), H5P_CRT_ORDER_TRACKED | H5P_CRT_ORDER_INDEXED), problem,
          "H5Pset_link_creation_order");
  return gcpl;
}

// Strings are written as fixed-length UTF-8 strings (NUL-terminated, sized to fit) stored in the
// attribute message itself. Variable-length strings (which h5py >= 3 would return as str rather
// than bytes) live in HDF5's global heap, and HDF5 1.10's global heap code crashes or hangs on
// corrupted files (fuzzing loom's files: 14 crashes/hangs in 1500 mutated files with variable-length
// strings, none with fixed-length ones). The reader accepts both.
constexpr bool kVariableLengthStrings = false;

H5Id string_type(const Context& c, const std::string& problem, size_t length) {
  H5Id t = c.check(H5Tcopy(H5T_C_S1), H5Tclose, problem, "H5Tcopy");
  c.check(H5Tset_size(t.get(), kVariableLengthStrings ? H5T_VARIABLE : length + 1), problem, "H5Tset_size");
  c.check(H5Tset_cset(t.get(), H5T_CSET_UTF8), problem, "H5Tset_cset");
  c.check(H5Tset_strpad(t.get(), H5T_STR_NULLTERM), problem, "H5Tset_strpad");
  return t;
}

void write_attributes(const Context& c, hid_t loc, const std::string& where, const Attributes& attrs) {
  const std::string problem = "cannot write";
  for (const auto& [name, value] : attrs) {
    const std::string what = "attribute " + quoted(name) + " of " + where;
    if (name.empty()) c.fail("cannot write: an attribute of " + where + " has an empty name");
    H5Id space = c.check(H5Screate(H5S_SCALAR), H5Sclose, problem, "H5Screate for " + what);
    H5Id type;
    hid_t file_type = H5I_INVALID_HID, mem_type = H5I_INVALID_HID;
    const void* data = nullptr;
    const char* str = nullptr;
    if (const auto* s = std::get_if<std::string>(&value)) {
      if (s->find('\0') != std::string::npos) c.fail("cannot write: string " + what + " contains a NUL byte");
      type = string_type(c, problem, s->size());
      file_type = mem_type = type.get();
      str = s->c_str();
      data = kVariableLengthStrings ? static_cast<const void*>(&str) : static_cast<const void*>(str);
    } else if (const auto* i = std::get_if<int64_t>(&value)) {
      file_type = H5T_STD_I64LE;
      mem_type = H5T_NATIVE_INT64;
      data = i;
    } else {
      file_type = H5T_IEEE_F64LE;
      mem_type = H5T_NATIVE_DOUBLE;
      data = &std::get<double>(value);
    }
    H5Id attr = c.check(H5Acreate2(loc, name.c_str(), file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose,
                        problem, "H5Acreate2 for " + what);
    c.check(H5Awrite(attr.get(), mem_type, data), problem, "H5Awrite for " + what);
    c.check(attr.reset(), problem, "H5Aclose for " + what);
  }
}

// Chunks of at most kChunkBytes (whole trailing dimensions where possible): a tensor up to that size
// is one chunk, which the 1.10 format indexes without a B-tree.
constexpr size_t kChunkBytes = size_t(16) << 20;

std::vector<hsize_t> chunk_shape(const std::vector<hsize_t>& dims, size_t item) {
  const hsize_t target = std::max<hsize_t>(1, kChunkBytes / item);  // elements
  std::vector<hsize_t> chunk = dims;
  for (size_t d = 0; d < dims.size(); ++d) {
    hsize_t inner = 1;  // elements of one step along d
    for (size_t k = d + 1; k < dims.size(); ++k) inner *= dims[k];
    if (inner >= target) {
      chunk[d] = 1;
      continue;
    }
    chunk[d] = std::min(dims[d], std::max<hsize_t>(1, target / inner));
    break;
  }
  return chunk;
}

void write_dataset(const Context& c, hid_t file, const std::string& name, const std::string& h5name, const Tensor& t) {
  const std::string problem = "cannot write";
  const std::string what = "tensor " + quoted(name);
  Tensor host = t.device().is_cpu() ? t : t.to(Device::cpu());
  hid_t file_type, mem_type;
  switch (host.dtype()) {
    case DType::F32: file_type = H5T_IEEE_F32LE; mem_type = H5T_NATIVE_FLOAT; break;
    case DType::F64: file_type = H5T_IEEE_F64LE; mem_type = H5T_NATIVE_DOUBLE; break;
    case DType::I64: file_type = H5T_STD_I64LE; mem_type = H5T_NATIVE_INT64; break;
    case DType::BF16:
    case DType::F16:  // widened to f32: exact
      host = host.to(DType::F32);
      file_type = H5T_IEEE_F32LE;
      mem_type = H5T_NATIVE_FLOAT;
      break;
    default: c.fail("cannot write: " + what + " has unsupported dtype " + dtype_name(host.dtype()));
  }
  host = host.contiguous();

  H5Id space;
  H5Id dcpl = c.check(H5Pcreate(H5P_DATASET_CREATE), H5Pclose, problem, "H5Pcreate for " + what);
  if (host.dim() == 0) {
    space = c.check(H5Screate(H5S_SCALAR), H5Sclose, problem, "H5Screate for " + what);
  } else {
    if (host.dim() > H5S_MAX_RANK) c.fail("cannot write: " + what + " has more than 32 dimensions");
    std::vector<hsize_t> dims(host.shape().begin(), host.shape().end());
    space = c.check(H5Screate_simple(int(dims.size()), dims.data(), nullptr), H5Sclose, problem,
                    "H5Screate_simple for " + what);
    if (host.numel() > 0) {  // chunked with a Fletcher-32 checksum per chunk (not possible when empty)
      const std::vector<hsize_t> chunk = chunk_shape(dims, itemsize(host.dtype()));
      c.check(H5Pset_chunk(dcpl.get(), int(chunk.size()), chunk.data()), problem, "H5Pset_chunk for " + what);
      c.check(H5Pset_fletcher32(dcpl.get()), problem, "H5Pset_fletcher32 for " + what);
    }
  }
  H5Id dset = c.check(H5Dcreate2(file, h5name.c_str(), file_type, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
                      H5Dclose, problem, "H5Dcreate2 for " + what);
  if (host.numel() > 0)
    c.check(H5Dwrite(dset.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, host.raw_data()), problem,
            "H5Dwrite for " + what);
  c.check(dset.reset(), problem, "H5Dclose for " + what);
}

// Writes the file `tmp` (which must not exist); sets `created` once it does.
void write_contents(const Context& c, const std::string& tmp, bool& created,
                    const std::vector<std::pair<std::string, Tensor>>& tensors, const Attributes& root_attributes,
                    const std::map<std::string, Attributes>& group_attributes) {
  const std::string problem = "cannot write";
  H5Id fcpl = c.check(H5Pcreate(H5P_FILE_CREATE), H5Pclose, problem, "H5Pcreate");
  c.check(H5Pset_link_creation_order(fcpl.get(), H5P_CRT_ORDER_TRACKED | H5P_CRT_ORDER_INDEXED), problem,
          "H5Pset_link_creation_order");
  H5Id fapl = file_access(c, problem, true);
  H5Id file = c.check(H5Fcreate(tmp.c_str(), H5F_ACC_EXCL, fcpl.get(), fapl.get()), H5Fclose,
                      "cannot create the temporary file " + quoted(tmp), "H5Fcreate");
  created = true;
  H5Id gcpl = group_creation(c);

  std::set<std::string> groups;  // dotted paths of the groups created so far
  auto make_groups = [&](const std::vector<std::string>& parts, size_t count) {
    for (size_t k = 1; k <= count; ++k) {
      const std::string g = dotted(parts, k);
      if (groups.count(g)) continue;
      H5Id group = c.check(H5Gcreate2(file.get(), h5_path(parts, k).c_str(), H5P_DEFAULT, gcpl.get(), H5P_DEFAULT),
                           H5Gclose, problem, "H5Gcreate2 for group " + quoted(g));
      c.check(group.reset(), problem, "H5Gclose for group " + quoted(g));
      groups.insert(g);
    }
  };

  for (const auto& [name, t] : tensors) {
    const std::vector<std::string> parts = split_dotted(name);
    make_groups(parts, parts.size() - 1);
    write_dataset(c, file.get(), name, h5_path(parts, parts.size()), t);
  }

  {
    H5Id root = c.check(H5Gopen2(file.get(), "/", H5P_DEFAULT), H5Gclose, problem, "H5Gopen2 for the root group");
    write_attributes(c, root.get(), "the root group", root_attributes);
    c.check(root.reset(), problem, "H5Gclose for the root group");
  }
  for (const auto& [key, attrs] : group_attributes) {
    const std::vector<std::string> parts = split_dotted(key);
    make_groups(parts, parts.size());
    H5Id group = c.check(H5Gopen2(file.get(), h5_path(parts, parts.size()).c_str(), H5P_DEFAULT), H5Gclose, problem,
                         "H5Gopen2 for group " + quoted(key));
    write_attributes(c, group.get(), "group " + quoted(key), attrs);
    c.check(group.reset(), problem, "H5Gclose for group " + quoted(key));
  }

  c.check(H5Fflush(file.get(), H5F_SCOPE_LOCAL), problem, "H5Fflush");
  c.check(file.reset(), problem, "H5Fclose");
}

// Rejects bad names before anything is created: empty components or '/', duplicates, a tensor
// name that is also a group (of another tensor or of group attributes).
void check_layout(const Context& c, const std::vector<std::pair<std::string, Tensor>>& tensors,
                  const std::map<std::string, Attributes>& group_attributes) {
  std::set<std::string> names;
  std::map<std::string, std::string> group_users;  // group path -> what needs it
  for (const auto& [name, t] : tensors) {
    check_name(c, "tensor", name);
    if (!t.defined()) c.fail("cannot write: tensor " + quoted(name) + " is undefined");
    if (!names.insert(name).second) c.fail("cannot write: tensor name " + quoted(name) + " appears twice");
    const auto parts = split_dotted(name);
    for (size_t k = 1; k < parts.size(); ++k) group_users.emplace(dotted(parts, k), "tensor " + quoted(name));
  }
  for (const auto& [key, attrs] : group_attributes) {
    check_name(c, "group", key);
    const auto parts = split_dotted(key);
    for (size_t k = 1; k <= parts.size(); ++k)
      group_users.emplace(dotted(parts, k), "the attributes of group " + quoted(key));
  }
  for (const std::string& name : names)
    if (auto it = group_users.find(name); it != group_users.end())
      c.fail("cannot write: " + quoted(name) + " is both a tensor and a group (of " + it->second + ")");
}

// ---- reading -----------------------------------------------------------------------------------

constexpr int kMaxDepth = 256;

struct LinkEntry {
  std::string name;
  H5L_type_t type;
};

herr_t collect_link(hid_t, const char* name, const H5L_info_t* info, void* data) {
  try {
    static_cast<std::vector<LinkEntry>*>(data)->push_back({name, info->type});
  } catch (...) {
    return -1;
  }
  return 0;
}

herr_t collect_attribute(hid_t, const char* name, const H5A_info_t*, void* data) {
  try {
    static_cast<std::vector<std::string>*>(data)->push_back(name);
  } catch (...) {
    return -1;
  }
  return 0;
}

// Integer conversions that overflow fail instead of clamping.
H5T_conv_ret_t refuse_overflow(H5T_conv_except_t except, hid_t, hid_t, void*, void*, void*) {
  if (except == H5T_CONV_EXCEPT_RANGE_HI || except == H5T_CONV_EXCEPT_RANGE_LOW) return H5T_CONV_ABORT;
  return H5T_CONV_UNHANDLED;
}

// Identity of an object in the file (to detect a group reached twice).
std::string object_key(const Context& c, hid_t obj, const std::string& what) {
#if H5_VERSION_GE(1, 12, 0)
  H5O_info2_t info;
  c.check(H5Oget_info3(obj, &info, H5O_INFO_BASIC), "truncated or corrupt", "H5Oget_info for " + what);
  return std::string(reinterpret_cast<const char*>(&info.token), sizeof info.token);
#elif H5_VERSION_GE(1, 10, 3)
  H5O_info_t info;
  c.check(H5Oget_info2(obj, &info, H5O_INFO_BASIC), "truncated or corrupt", "H5Oget_info for " + what);
  return std::to_string(info.addr);
#else
  H5O_info_t info;
  c.check(H5Oget_info(obj, &info), "truncated or corrupt", "H5Oget_info for " + what);
  return std::to_string(info.addr);
#endif
}

class Reader {
 public:
  explicit Reader(Context c) : c_(std::move(c)) {}

  TensorFile read(hid_t file) {
    H5Id dxpl = c_.check(H5Pcreate(H5P_DATASET_XFER), H5Pclose, kCorrupt, "H5Pcreate");
    c_.check(H5Pset_type_conv_cb(dxpl.get(), refuse_overflow, nullptr), kCorrupt, "H5Pset_type_conv_cb");
    dxpl_ = dxpl.get();
    H5Id root = c_.check(H5Gopen2(file, "/", H5P_DEFAULT), H5Gclose, kCorrupt, "H5Gopen2 for the root group");
    visit_group(root.get(), "", 0);
    if (unchecked_ > 0)
      out_.notes.push_back(std::to_string(unchecked_) + " of " + std::to_string(checkable_) +
                           " tensors carry no checksum (the file was not written by loom, e.g. by h5py): damage to "
                           "their values cannot be detected; their shapes and finiteness are checked");
    std::set<std::string> seen;
    for (const auto& [name, t] : out_.tensors)
      if (!seen.insert(name).second)
        c_.fail("dataset name " + quoted(name) + " appears twice (a link name containing '.' collides with a group)");
    return std::move(out_);
  }

 private:
  static constexpr const char* kCorrupt = "truncated or corrupt";
  Context c_;
  TensorFile out_;
  hid_t dxpl_ = H5P_DEFAULT;
  std::set<std::string> visited_groups_;
  size_t checkable_ = 0, unchecked_ = 0;  // non-empty, non-scalar datasets; those without Fletcher-32

  static std::string label(const std::string& dotted_name) {
    return dotted_name.empty() ? "the root group" : "group " + quoted(dotted_name);
  }

  void visit_group(hid_t group, const std::string& prefix, int depth) {
    if (depth > kMaxDepth) c_.fail("groups nested more than " + std::to_string(kMaxDepth) + " deep at " + quoted(prefix));
    if (!visited_groups_.insert(object_key(c_, group, label(prefix))).second)
      c_.fail(label(prefix) + " is reached twice (a hard-link cycle, or two links to one group)");

    Attributes attrs = read_attributes(group, label(prefix));
    if (prefix.empty())
      out_.attributes = std::move(attrs);
    else if (!attrs.empty())
      out_.group_attributes[prefix] = std::move(attrs);

    // Links in creation order when the group tracks it (files written by loom), else by name.
    H5_index_t index = H5_INDEX_NAME;
    {
      H5Id gcpl = c_.check(H5Gget_create_plist(group), H5Pclose, kCorrupt, "H5Gget_create_plist for " + label(prefix));
      unsigned flags = 0;
      c_.check(H5Pget_link_creation_order(gcpl.get(), &flags), kCorrupt,
               "H5Pget_link_creation_order for " + label(prefix));
      if (flags & H5P_CRT_ORDER_INDEXED) index = H5_INDEX_CRT_ORDER;
    }
    std::vector<LinkEntry> links;
    hsize_t idx = 0;
    c_.check(H5Literate(group, index, H5_ITER_INC, &idx, collect_link, &links), kCorrupt,
             "H5Literate for " + label(prefix));

    for (const LinkEntry& link : links) {
      const std::string name = prefix.empty() ? link.name : prefix + "." + link.name;
      if (link.type == H5L_TYPE_SOFT || link.type == H5L_TYPE_EXTERNAL)
        c_.fail(quoted(name) + (link.type == H5L_TYPE_SOFT ? " is a soft" : " is an external") +
                " link (loom reads groups and datasets only)");
      if (link.type != H5L_TYPE_HARD) c_.fail(quoted(name) + " is a link of an unknown type");
      H5Id obj = c_.check(H5Oopen(group, link.name.c_str(), H5P_DEFAULT), H5Oclose, kCorrupt,
                          "H5Oopen for " + quoted(name));
      switch (H5Iget_type(obj.get())) {
        case H5I_GROUP: visit_group(obj.get(), name, depth + 1); break;
        case H5I_DATASET: read_dataset(obj.get(), name); break;
        case H5I_DATATYPE: break;  // a committed datatype: not a tensor
        default: c_.fail(quoted(name) + " is neither a group nor a dataset");
      }
      c_.check(obj.reset(), kCorrupt, "H5Oclose for " + quoted(name));
    }
  }

  void read_dataset(hid_t dset, const std::string& name) {
    const std::string what = "dataset " + quoted(name);
    H5Id type = c_.check(H5Dget_type(dset), H5Tclose, kCorrupt, "H5Dget_type for " + what);
    const H5T_class_t cls = H5Tget_class(type.get());
    if (cls < 0) c_.fail_h5(kCorrupt, "H5Tget_class for " + what);
    const size_t size = H5Tget_size(type.get());
    if (size == 0) c_.fail_h5(kCorrupt, "H5Tget_size for " + what);
    DType dtype;
    hid_t mem_type;
    if (cls == H5T_FLOAT && (size == 4 || size == 2)) {
      dtype = DType::F32;  // 16-bit floats are widened (exact)
      mem_type = H5T_NATIVE_FLOAT;
    } else if (cls == H5T_FLOAT && size == 8) {
      dtype = DType::F64;
      mem_type = H5T_NATIVE_DOUBLE;
    } else if (cls == H5T_INTEGER) {
      dtype = DType::I64;
      mem_type = H5T_NATIVE_INT64;
    } else {
      c_.fail(what + " has unsupported type (" + class_name(cls) + ", " + std::to_string(size) +
              " bytes; loom reads float32/float64 and integer datasets)");
    }

    H5Id space = c_.check(H5Dget_space(dset), H5Sclose, kCorrupt, "H5Dget_space for " + what);
    const H5S_class_t sclass = H5Sget_simple_extent_type(space.get());
    Shape shape;
    if (sclass == H5S_SIMPLE) {
      const int rank = H5Sget_simple_extent_ndims(space.get());
      if (rank < 0 || rank > H5S_MAX_RANK) c_.fail_h5(kCorrupt, "H5Sget_simple_extent_ndims for " + what);
      std::vector<hsize_t> dims(size_t(rank) + 1);
      if (H5Sget_simple_extent_dims(space.get(), dims.data(), nullptr) < 0)
        c_.fail_h5(kCorrupt, "H5Sget_simple_extent_dims for " + what);
      int64_t numel = 1;
      for (int i = 0; i < rank; ++i) {
        if (dims[size_t(i)] > hsize_t(std::numeric_limits<int64_t>::max()) ||
            __builtin_mul_overflow(numel, int64_t(dims[size_t(i)]), &numel) ||
            numel > std::numeric_limits<int64_t>::max() / 8)
          c_.fail(what + " is too large");
        shape.push_back(int64_t(dims[size_t(i)]));
      }
    } else if (sclass == H5S_NULL) {
      c_.fail(what + " has no dataspace (an HDF5 null dataspace holds no values)");
    } else if (sclass != H5S_SCALAR) {
      c_.fail_h5(kCorrupt, "H5Sget_simple_extent_type for " + what);
    }

    const bool checksummed = check_filters(dset, what);
    if (!shape.empty() && std::all_of(shape.begin(), shape.end(), [](int64_t d) { return d > 0; })) {
      ++checkable_;
      unchecked_ += !checksummed;
    }

    Tensor t;
    try {
      t = Tensor::empty(shape, dtype);
    } catch (const std::bad_alloc&) {
      c_.fail(what + " of shape " + ::loom::detail::concat(shape) + " does not fit in memory");
    } catch (const FileError&) {
      throw;
    } catch (const Error&) {  // the allocator's "out of host memory"
      c_.fail(what + " of shape " + ::loom::detail::concat(shape) + " does not fit in memory");
    }
    if (t.numel() > 0 && H5Dread(dset, mem_type, H5S_ALL, H5S_ALL, dxpl_, t.raw_data()) < 0) {
      // An overflowing conversion (uint64 values >= 2^63) fails too: tell it from corruption.
      if (cls == H5T_INTEGER && H5Tget_sign(type.get()) == H5T_SGN_NONE) {
        const std::string detail = hdf5_detail();
        if (H5Dread(dset, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.raw_data()) >= 0)
          c_.fail(what + " holds unsigned values outside the int64 range");
        H5Eclear2(H5E_DEFAULT);
        c_.fail(std::string(kCorrupt) + " (H5Dread failed for " + quoted(name) +
                (detail.empty() ? "" : ": " + detail) + ")");
      }
      c_.fail_h5(kCorrupt, "H5Dread for " + quoted(name));
    }
    out_.tensors.emplace_back(name, std::move(t));
  }

  // A compressed dataset needs its filter: name a missing one (h5py's lzf, blosc, ...) rather
  // than report a failed read. Returns whether the dataset has the Fletcher-32 checksum.
  bool check_filters(hid_t dset, const std::string& what) {
    bool fletcher32 = false;
    H5Id dcpl = c_.check(H5Dget_create_plist(dset), H5Pclose, kCorrupt, "H5Dget_create_plist for " + what);
    const int n = H5Pget_nfilters(dcpl.get());
    if (n < 0) c_.fail_h5(kCorrupt, "H5Pget_nfilters for " + what);
    for (int i = 0; i < n; ++i) {
      unsigned flags = 0, config = 0;
      size_t nvalues = 0;
      char name[256] = {};
      const H5Z_filter_t id = H5Pget_filter2(dcpl.get(), unsigned(i), &flags, &nvalues, nullptr, sizeof name, name, &config);
      if (id < 0) c_.fail_h5(kCorrupt, "H5Pget_filter2 for " + what);
      fletcher32 = fletcher32 || id == H5Z_FILTER_FLETCHER32;
      if (H5Zfilter_avail(id) <= 0) {
        H5Eclear2(H5E_DEFAULT);
        c_.fail(what + " is compressed with HDF5 filter " + std::to_string(id) + (*name ? " ('" + std::string(name) + "')" : "") +
                ", which this HDF5 library does not have (gzip, shuffle and fletcher32 are built in)");
      }
    }
    return fletcher32;
  }

  Attributes read_attributes(hid_t loc, const std::string& where) {
    std::vector<std::string> names;
    hsize_t idx = 0;
    c_.check(H5Aiterate2(loc, H5_INDEX_NAME, H5_ITER_INC, &idx, collect_attribute, &names), kCorrupt,
             "H5Aiterate2 for " + where);
    Attributes attrs;
    for (const std::string& name : names) attrs[name] = read_attribute(loc, name, "attribute " + quoted(name) + " of " + where);
    return attrs;
  }

  AttrValue read_attribute(hid_t loc, const std::string& name, const std::string& what) {
    H5Id attr = c_.check(H5Aopen(loc, name.c_str(), H5P_DEFAULT), H5Aclose, kCorrupt, "H5Aopen for " + what);
    H5Id space = c_.check(H5Aget_space(attr.get()), H5Sclose, kCorrupt, "H5Aget_space for " + what);
    const H5S_class_t sclass = H5Sget_simple_extent_type(space.get());
    if (sclass < 0) c_.fail_h5(kCorrupt, "H5Sget_simple_extent_type for " + what);
    const hssize_t npoints = H5Sget_simple_extent_npoints(space.get());
    if (npoints < 0) c_.fail_h5(kCorrupt, "H5Sget_simple_extent_npoints for " + what);
    if (sclass == H5S_NULL || npoints != 1)
      c_.fail(what + " holds " + std::to_string(sclass == H5S_NULL ? 0 : npoints) +
              " values (loom reads attributes of one value)");

    H5Id type = c_.check(H5Aget_type(attr.get()), H5Tclose, kCorrupt, "H5Aget_type for " + what);
    const H5T_class_t cls = H5Tget_class(type.get());
    if (cls < 0) c_.fail_h5(kCorrupt, "H5Tget_class for " + what);
    const size_t size = H5Tget_size(type.get());
    if (size == 0) c_.fail_h5(kCorrupt, "H5Tget_size for " + what);

    if (cls == H5T_INTEGER) {
      if (size >= 8 && H5Tget_sign(type.get()) == H5T_SGN_NONE) {
        uint64_t u = 0;
        c_.check(H5Aread(attr.get(), H5T_NATIVE_UINT64, &u), kCorrupt, "H5Aread for " + what);
        if (u > uint64_t(std::numeric_limits<int64_t>::max())) c_.fail(what + " is outside the int64 range");
        return int64_t(u);
      }
      int64_t v = 0;
      c_.check(H5Aread(attr.get(), H5T_NATIVE_INT64, &v), kCorrupt, "H5Aread for " + what);
      return v;
    }
    if (cls == H5T_FLOAT) {
      double v = 0;
      c_.check(H5Aread(attr.get(), H5T_NATIVE_DOUBLE, &v), kCorrupt, "H5Aread for " + what);
      return v;
    }
    if (cls == H5T_STRING) {
      const htri_t vlen = H5Tis_variable_str(type.get());
      if (vlen < 0) c_.fail_h5(kCorrupt, "H5Tis_variable_str for " + what);
      const H5T_cset_t cset = H5Tget_cset(type.get());
      if (cset < 0) c_.fail_h5(kCorrupt, "H5Tget_cset for " + what);
      H5Id mem = c_.check(H5Tcopy(H5T_C_S1), H5Tclose, kCorrupt, "H5Tcopy for " + what);
      c_.check(H5Tset_cset(mem.get(), cset), kCorrupt, "H5Tset_cset for " + what);
      if (vlen) {
        c_.check(H5Tset_size(mem.get(), H5T_VARIABLE), kCorrupt, "H5Tset_size for " + what);
        return read_variable_length_string(c_, attr.get(), mem.get(), what);
      }
      const H5T_str_t pad = H5Tget_strpad(type.get());
      if (pad < 0) c_.fail_h5(kCorrupt, "H5Tget_strpad for " + what);
      c_.check(H5Tset_size(mem.get(), size), kCorrupt, "H5Tset_size for " + what);
      c_.check(H5Tset_strpad(mem.get(), pad), kCorrupt, "H5Tset_strpad for " + what);
      std::string buf(size, '\0');
      c_.check(H5Aread(attr.get(), mem.get(), buf.data()), kCorrupt, "H5Aread for " + what);
      if (pad == H5T_STR_SPACEPAD) {
        buf.erase(buf.find_last_not_of(' ') + 1);
      } else if (const size_t nul = buf.find('\0'); nul != std::string::npos) {
        buf.erase(nul);
      }
      return buf;
    }
    c_.fail(what + " has unsupported type (" + class_name(cls) + "; loom reads integer, float and string attributes)");
  }
};

}  // namespace

// ---- public API ------------------------------------------------------------------------------

void write_hdf5(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                const Attributes& root_attributes, const std::map<std::string, Attributes>& group_attributes) {
  const Context c{path};
  if (path.empty()) c.fail("empty file name");
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  if (base.empty() || base == "." || base == "..") c.fail("not a file name");
  check_layout(c, tensors, group_attributes);

  struct stat dst {};
  if (::stat(dir.c_str(), &dst) != 0)
    c.fail("cannot create a temporary file in directory '" + dir + "' (" + errno_text(errno) + ")");
  if (!S_ISDIR(dst.st_mode)) c.fail("cannot create a temporary file in '" + dir + "' (not a directory)");

  // The temporary file: `.<name>.tmp.<pid>[.<n>]` (the convention of write_file_atomic), a name
  // no other process uses; chosen under the HDF5 lock, so no other thread of this one either.
  const std::string prefix = (slash == std::string::npos ? "" : path.substr(0, slash + 1)) + "." + base + ".tmp." +
                             std::to_string(::getpid());
  static unsigned counter = 0;
  std::string tmp;
  bool created = false;
  std::optional<detail::TempFileRegistration> registration;
  try {
    {
      Hdf5Session session;
      tmp = prefix;
      for (int attempt = 0; attempt < 100 && ::access(tmp.c_str(), F_OK) == 0; ++attempt)
        tmp = prefix + "." + std::to_string(++counter);
      registration.emplace(tmp);  // removed by SIGTERM/SIGINT until renamed
      write_contents(c, tmp, created, tensors, root_attributes, group_attributes);
    }
    temp_file_created(tmp);
    // Keep the permissions of a file being replaced.
    struct stat old {};
    if (::stat(path.c_str(), &old) == 0 && S_ISREG(old.st_mode)) ::chmod(tmp.c_str(), old.st_mode & 07777);
    int fd = ::open(tmp.c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) c.fail("cannot reopen the temporary file to flush it (" + errno_text(errno) + ")");
    if (::fsync(fd) != 0) {
      const int err = errno;
      ::close(fd);
      c.fail("cannot flush to disk (" + errno_text(err) + ")");
    }
    if (::close(fd) != 0) c.fail("cannot write (" + errno_text(errno) + ")");
    if (::rename(tmp.c_str(), path.c_str()) != 0)
      c.fail("cannot rename the temporary file over it (" + errno_text(errno) + ")");
  } catch (...) {
    if (created) ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable (best effort: some file systems refuse fsync on directories).
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

namespace {

// The version of the file's superblock (signature at 0, 512, 1024, ...), or -1.
int superblock_version(const std::string& path) {
  static const char kSignature[8] = {'\x89', 'H', 'D', 'F', '\r', '\n', '\x1a', '\n'};
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  int version = -1;
  char buf[9];
  for (off_t at = 0; at <= (off_t(1) << 20) && version < 0; at = at == 0 ? 512 : at * 2)
    if (::pread(fd, buf, sizeof buf, at) == ssize_t(sizeof buf) && std::memcmp(buf, kSignature, 8) == 0)
      version = static_cast<unsigned char>(buf[8]);
  ::close(fd);
  return version;
}

// Files in the old format (superblock 0 or 1: h5py's default, no metadata checksums) are first
// read in a child process: HDF5 1.10 trusts the sizes in their local heaps, B-trees and global
// heaps, and crashed (or looped) on damaged ones in fuzzing. A child that dies makes the file a
// FileError; a child whose read ends in a FileError sends its problem back through a pipe, and
// the parent reports it without reading again (a damaged string heap costs its 10 s alarm once,
// not twice); otherwise the read is done again here. Called with the HDF5 lock held (the child
// takes no lock: it has one thread).
void probe_in_child(const Context& c, const std::function<void()>& read) {
  int fds[2];
  if (::pipe(fds) != 0) return;  // no probe possible: read as before
  const pid_t pid = ::fork();
  if (pid < 0) {
    ::close(fds[0]), ::close(fds[1]);
    return;
  }
  if (pid == 0) {
    ::close(fds[0]);
    struct rlimit no_core {0, 0};
    ::setrlimit(RLIMIT_CORE, &no_core);
    ::alarm(600);
    int code = 0;
    try {
      read();
    } catch (const FileError& e) {
      const std::string prefix = c.path + ": ", what = e.what();
      const std::string problem = what.compare(0, prefix.size(), prefix) == 0 ? what.substr(prefix.size()) : what;
      const size_t n = std::min<size_t>(problem.size(), 4096);
      code = ::write(fds[1], problem.data(), n) == ssize_t(n) ? 3 : 4;
    } catch (...) {
      code = 4;
    }
    ::_exit(code);
  }
  ::close(fds[1]);
  std::string problem;
  char buf[4096];
  for (ssize_t r; (r = ::read(fds[0], buf, sizeof buf)) != 0;) {
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) break;
    if (problem.size() < 4096) problem.append(buf, size_t(r));
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFSIGNALED(status))
    c.fail(std::string("truncated or corrupt (HDF5 ") + (WTERMSIG(status) == SIGALRM ? "did not finish" : "crashed") +
           " reading it: damaged metadata in a file without checksums)");
  if (WIFEXITED(status) && WEXITSTATUS(status) == 3 && !problem.empty()) c.fail(problem);
}

}  // namespace

TensorFile read_hdf5(const std::string& path) {
  const Context c{path};
  {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) c.fail("cannot open (" + errno_text(errno) + ")");
    struct stat st {};
    const bool ok = ::fstat(fd, &st) == 0;
    ::close(fd);
    if (ok && S_ISDIR(st.st_mode)) c.fail("is a directory, not a file");
    if (ok && !S_ISREG(st.st_mode)) c.fail("not a regular file");
  }
  Hdf5Session session;
#if H5_VERSION_GE(1, 12, 0)
  const htri_t is_hdf5 = H5Fis_accessible(path.c_str(), H5P_DEFAULT);
#else
  const htri_t is_hdf5 = H5Fis_hdf5(path.c_str());
#endif
  if (is_hdf5 == 0) c.fail("not an HDF5 file (no HDF5 signature)");
  if (is_hdf5 < 0) c.fail_h5("not an HDF5 file, or truncated or corrupt", "H5Fis_hdf5");
  auto read = [&] {
    H5Id fapl = file_access(c, "cannot open", false);
    H5Id file = c.check(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl.get()), H5Fclose, "truncated or corrupt", "H5Fopen");
    TensorFile out = Reader(c).read(file.get());
    c.check(file.reset(), "truncated or corrupt", "H5Fclose");
    return out;
  };
  const int version = superblock_version(path);
  if (version == 0 || version == 1) probe_in_child(c, [&] { read(); });
  return read();
}

}  // namespace loom::io
