// Reading HDF5 files (the format, what is read and what is refused: io/hdf5_internal.h).
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
#include <map>
#include <optional>
#include <new>
#include <set>

#include "io/hdf5_internal.h"
#include "io/tensor_file.h"

namespace loom::io {
namespace {

using namespace hdf5;

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
