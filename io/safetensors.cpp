// safetensors reader and writer (SPEC §5).
//
// Layout: an 8-byte little-endian header length N, N bytes of JSON (an object starting with '{',
// padded with spaces), then the data section. Each entry {"dtype", "shape", "data_offsets": [b, e)}
// addresses the data section; "__metadata__" maps strings to strings.
//
// The reader validates the whole header before it creates any tensor:
//   * N is at most 100 MB, N > 0 and the file holds the whole header;
//   * the header is a JSON object (nesting at most kMaxDepth levels deep; no duplicate keys at any
//     level: nlohmann keeps the last of duplicated keys, so duplicates are detected while parsing);
//   * every entry has a string dtype, a shape of non-negative integers whose product (the element
//     count) fits in int64, and data_offsets of exactly two non-negative integers with b <= e that
//     lie inside the data section; e - b equals numel · itemsize;
//   * sorted by offset, the entries tile the data section exactly: no overlaps, no gaps and no
//     trailing bytes after the last one (zero-sized entries may sit at any tile boundary);
//   * __metadata__, when present, is an object of strings.
// Extra fields inside an entry are ignored (as the reference implementation does). Dtypes that the
// format defines but loom cannot hold (I32, I16, I8, U8, BOOL, U16, U32, U64, F8_*, C64) take part in
// the layout checks and are then rejected with an error naming the tensor and the dtype.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "io/tensor_file.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "loom's safetensors code assumes a little-endian host"
#endif

namespace loom::io {

namespace detail {
// Defined in io/tensor_file.cpp: an atomic write fed through a byte sink.
void write_file_atomic_with(const std::string& path,
                            const std::function<void(const std::function<void(const void*, size_t)>&)>& produce);
}  // namespace detail

namespace {

using ojson = nlohmann::ordered_json;

constexpr uint64_t kMaxHeader = 100u * 1000u * 1000u;  // SPEC §5: 100 MB
constexpr int kMaxDepth = 16;                          // a valid header nests 3 levels deep

// How stored elements become loom elements: as they are, or widened to i64 (integer
// dtypes loom has no type for: kohya stores alphas in them).
enum class Widen { None, Signed, Unsigned };

struct DtypeInfo {
  const char* name;
  size_t itemsize;
  bool supported;
  DType dtype;
  Widen widen = Widen::None;
};

// Dtypes of the format with a whole number of bytes per element.
constexpr DtypeInfo kDtypes[] = {
    {"F32", 4, true, DType::F32},       {"F64", 8, true, DType::F64},      {"F16", 2, true, DType::F16},
    {"BF16", 2, true, DType::BF16},     {"I64", 8, true, DType::I64},
    {"I32", 4, true, DType::I64, Widen::Signed},   {"I16", 2, true, DType::I64, Widen::Signed},
    {"I8", 1, true, DType::I64, Widen::Signed},    {"U8", 1, true, DType::I64, Widen::Unsigned},
    {"BOOL", 1, true, DType::I64, Widen::Unsigned}, {"U16", 2, true, DType::I64, Widen::Unsigned},
    {"U32", 4, true, DType::I64, Widen::Unsigned},  {"U64", 8, false, DType::F32},      {"F8_E5M2", 1, false, DType::F32}, {"F8_E4M3", 1, false, DType::F32},
    {"F8_E8M0", 1, false, DType::F32},  {"C64", 8, false, DType::F32},
};

// Little-endian integers of `d` -> an i64 tensor.
Tensor widened(const uint8_t* data, const Shape& shape, const DtypeInfo& d) {
  std::vector<int64_t> values(size_t(shape_numel(shape)));
  for (size_t i = 0; i < values.size(); ++i) {
    uint64_t u = 0;
    for (size_t b = 0; b < d.itemsize; ++b) u |= uint64_t(data[i * d.itemsize + b]) << (8 * b);
    const unsigned bits = unsigned(8 * d.itemsize);
    if (d.widen == Widen::Signed && bits < 64 && (u >> (bits - 1)) & 1u) u |= ~uint64_t(0) << bits;  // sign-extend
    values[i] = int64_t(u);
  }
  return Tensor::from_vector(values, shape);
}

const DtypeInfo* find_dtype(const std::string& s) {
  for (const DtypeInfo& d : kDtypes)
    if (s == d.name) return &d;
  return nullptr;
}

const char* safetensors_dtype(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F64: return "F64";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::I64: return "I64";
  }
  return "?";
}

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ']';
  return os.str();
}

// A name as it appears in messages: quoted, control characters escaped, long names shortened.
std::string q(const std::string& name) {
  std::string out = "'";
  const size_t limit = 200;
  for (size_t i = 0; i < name.size() && i < limit; ++i) {
    const unsigned char c = static_cast<unsigned char>(name[i]);
    if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  if (name.size() > limit) out += "...";
  return out + "'";
}

// Largest nesting depth of arrays/objects in `text` (strings skipped), stopping early once it
// exceeds `limit`. Rejecting deep nesting up front bounds the parser's memory and recursion.
int nesting_depth(const char* p, size_t n, int limit) {
  int depth = 0, max_depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < n; ++i) {
    const char c = p[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      max_depth = std::max(max_depth, ++depth);
      if (max_depth > limit) return max_depth;
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
  return max_depth;
}

// A non-negative JSON integer (nlohmann stores those as unsigned).
bool as_count(const ojson& v, uint64_t& out) {
  if (!v.is_number_unsigned()) return false;
  out = v.get<uint64_t>();
  return true;
}

struct Entry {
  std::string name;
  const DtypeInfo* dtype = nullptr;
  Shape shape;
  uint64_t begin = 0, end = 0;
};

}  // namespace

TensorFile parse_safetensors(const uint8_t* data, size_t size, const std::string& name) {
  auto fail = [&](const std::string& problem) { throw FileError(name, problem); };

  // ---- header length and bytes ----
  if (size < 8)
    fail("truncated (" + std::to_string(size) + " bytes, shorter than the 8-byte header length)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  if (n > kMaxHeader) fail("header length " + std::to_string(n) + " exceeds the 100 MB limit");
  if (n == 0) fail("empty header (header length 0)");
  if (n > size - 8) fail("truncated (header says " + std::to_string(n) + " bytes, file has " + std::to_string(size) + ")");
  const char* hbegin = reinterpret_cast<const char*>(data + 8);
  const char* hend = hbegin + n;
  if (hbegin[0] != '{') fail("header is not a JSON object (it does not start with '{')");
  // nlohmann takes a NUL byte for the end of the input; JSON allows none anywhere.
  if (std::memchr(hbegin, '\0', n) != nullptr) fail("header is not valid JSON (it contains a NUL byte)");
  if (nesting_depth(hbegin, n, kMaxDepth) > kMaxDepth)
    fail("header JSON is nested more than " + std::to_string(kMaxDepth) + " levels deep");

  // ---- JSON, with duplicate keys detected at every level ----
  std::vector<std::set<std::string>> keys;  // one set per open object
  std::string duplicate;
  const ojson::parser_callback_t on_event = [&](int, ojson::parse_event_t ev, ojson& v) -> bool {
    switch (ev) {
      case ojson::parse_event_t::object_start: keys.emplace_back(); break;
      case ojson::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case ojson::parse_event_t::key:
        if (!keys.empty() && v.is_string() && !keys.back().insert(v.get_ref<const std::string&>()).second &&
            duplicate.empty())
          duplicate = v.get<std::string>();
        break;
      default: break;
    }
    return true;
  };
  ojson header;
  try {
    header = ojson::parse(hbegin, hend, on_event, /*allow_exceptions=*/true, /*ignore_comments=*/false);
  } catch (const nlohmann::json::exception& e) {
    fail(std::string("header is not valid JSON (") + e.what() + ")");
  }
  if (!header.is_object()) fail("header is not a JSON object");
  if (!duplicate.empty()) fail("duplicate key " + q(duplicate) + " in the header");

  // ---- entries ----
  const uint64_t data_size = uint64_t(size) - 8 - n;
  const uint8_t* data_start = data + 8 + n;
  TensorFile out;
  std::vector<Entry> entries;
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) fail("__metadata__ is not an object of strings");
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string()) fail("__metadata__ value for key " + q(mk) + " is not a string");
        out.metadata[mk] = mv.get<std::string>();
      }
      continue;
    }
    const std::string what = "entry " + q(key);
    if (!value.is_object()) fail(what + " is not an object");
    Entry e;
    e.name = key;

    const auto dt = value.find("dtype");
    if (dt == value.end()) fail(what + " has no dtype");
    if (!dt->is_string()) fail(what + " has a dtype that is not a string");
    e.dtype = find_dtype(dt->get<std::string>());
    if (!e.dtype) fail(what + " has unknown dtype " + q(dt->get<std::string>()));

    const auto sh = value.find("shape");
    if (sh == value.end()) fail(what + " has no shape");
    if (!sh->is_array()) fail(what + " has a shape that is not a list of non-negative integers");
    uint64_t numel = 1;  // product of the non-zero sizes, checked for overflow
    bool has_zero = false;
    for (const ojson& d : *sh) {
      uint64_t v = 0;
      if (!as_count(d, v) || v > uint64_t(INT64_MAX))
        fail(what + " has a shape that is not a list of non-negative integers");
      e.shape.push_back(int64_t(v));
      if (v == 0) {
        has_zero = true;
      } else if (__builtin_mul_overflow(numel, v, &numel) || numel > uint64_t(INT64_MAX)) {
        fail(what + " has shape " + shape_str(e.shape) + "... whose element count overflows");
      }
    }
    if (has_zero) numel = 0;

    const auto off = value.find("data_offsets");
    if (off == value.end()) fail(what + " has no data_offsets");
    if (!off->is_array() || off->size() != 2 || !as_count((*off)[0], e.begin) || !as_count((*off)[1], e.end))
      fail(what + " has data_offsets that are not two non-negative integers");
    if (e.begin > e.end)
      fail(what + " has data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
           ") with begin after end");
    if (e.end > data_size)
      fail(what + " has data_offsets [" + std::to_string(e.begin) + ", " + std::to_string(e.end) +
           ") outside the file (the data section has " + std::to_string(data_size) + " bytes; truncated?)");

    uint64_t need = 0;
    const bool overflow = __builtin_mul_overflow(numel, uint64_t(e.dtype->itemsize), &need);
    if (overflow || need != e.end - e.begin)
      fail(what + " has " + std::to_string(e.end - e.begin) + " bytes but shape " + shape_str(e.shape) + " of " +
           e.dtype->name + " needs " + (overflow ? std::string("more than 2^64") : std::to_string(need)));
    entries.push_back(std::move(e));
  }

  // ---- the entries tile [0, data_size) exactly ----
  std::vector<size_t> order(entries.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return entries[a].begin != entries[b].begin ? entries[a].begin < entries[b].begin
                                                : entries[a].end < entries[b].end;
  });
  uint64_t cursor = 0;
  const Entry* last = nullptr;  // the entry that ends at `cursor`
  for (size_t i : order) {
    const Entry& e = entries[i];
    if (e.begin < cursor) fail("entries " + q(last->name) + " and " + q(e.name) + " overlap");
    if (e.begin > cursor)
      fail("gap of " + std::to_string(e.begin - cursor) + " bytes before entry " + q(e.name) +
           (last ? " (after entry " + q(last->name) + ")" : std::string(" (at the start of the data)")));
    if (e.end > cursor || !last) last = &e;
    cursor = e.end;
  }
  if (cursor != data_size)
    fail(std::to_string(data_size - cursor) + " trailing bytes after the " +
         (entries.empty() ? std::string("header (the file has no tensors)") : std::string("last tensor")));

  // ---- dtypes loom can hold ----
  for (const Entry& e : entries)
    if (!e.dtype->supported)
      fail("entry " + q(e.name) + " has dtype " + e.dtype->name +
           ", which loom cannot read (supported: F32, F64, F16, BF16, I64, and I32/I16/I8/U32/U16/U8/BOOL "
           "widened to I64)");

  // ---- everything is valid: copy the tensors out ----
  out.tensors.reserve(entries.size());
  for (const Entry& e : entries)
    out.tensors.emplace_back(e.name, e.dtype->widen == Widen::None
                                         ? Tensor::from_host(data_start + e.begin, e.shape, e.dtype->dtype)
                                         : widened(data_start + e.begin, e.shape, *e.dtype));
  return out;
}

TensorFile read_safetensors(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw FileError(path, "cannot open (" + std::string(std::strerror(errno)) + ")");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    throw FileError(path, "cannot stat (" + std::string(std::strerror(err)) + ")");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw FileError(path, S_ISDIR(st.st_mode) ? "is a directory, not a file" : "not a regular file");
  }
  const size_t size = size_t(st.st_size);
  if (size == 0) {
    ::close(fd);
    return parse_safetensors(nullptr, 0, path);  // reports the truncation
  }
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  ::close(fd);  // the mapping stays valid
  if (map == MAP_FAILED) throw FileError(path, "cannot map (" + std::string(std::strerror(map_err)) + ")");
  struct Unmap {
    void* p;
    size_t n;
    ~Unmap() { ::munmap(p, n); }
  } unmap{map, size};
  ::madvise(map, size, MADV_SEQUENTIAL);
  return parse_safetensors(static_cast<const uint8_t*>(map), size, path);
}

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // Everything that can fail for a reason other than the disk is checked before the file is opened.
  std::set<std::string> names;
  std::vector<Tensor> host;
  host.reserve(tensors.size());
  ojson header = ojson::object();
  if (!metadata.empty()) {
    ojson m = ojson::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    header["__metadata__"] = std::move(m);
  }
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    if (name == "__metadata__") throw FileError(path, "a tensor cannot be named '__metadata__'");
    if (!names.insert(name).second) throw FileError(path, "two tensors are named " + q(name));
    if (!t.defined()) throw FileError(path, "tensor " + q(name) + " is undefined");
    host.push_back(t.to(Device::cpu()).contiguous());
    const uint64_t nbytes = uint64_t(t.numel()) * itemsize(t.dtype());
    ojson entry = ojson::object();
    entry["dtype"] = safetensors_dtype(t.dtype());
    entry["shape"] = t.shape();
    entry["data_offsets"] = {offset, offset + nbytes};
    header[name] = std::move(entry);
    offset += nbytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception&) {
    throw FileError(path, "a tensor name or metadata string is not valid UTF-8");
  }
  text.resize((text.size() + 7) / 8 * 8, ' ');  // the data starts at a multiple of 8
  unsigned char len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(uint64_t(text.size()) >> (8 * i));

  detail::write_file_atomic_with(path, [&](const std::function<void(const void*, size_t)>& write) {
    write(len, 8);
    write(text.data(), text.size());
    for (const Tensor& t : host) {
      const size_t nbytes = size_t(t.numel()) * itemsize(t.dtype());
      if (nbytes) write(t.raw_data(), nbytes);
    }
  });
}

}  // namespace loom::io
