// Named tensors on disk: safetensors and HDF5 (SPEC §5).
//
// Every reader validates before it returns anything: a truncated, corrupt or
// foreign file raises loom::io::FileError naming the file and the problem,
// never a crash and never a partly filled result. Every writer is atomic: it
// writes a temporary file next to the target, flushes it to disk and renames
// it over the target, so a crash mid-save leaves the previous file intact.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "tensor/tensor.h"

namespace loom::io {

// A bad, missing, unreadable or unwritable file (the command line maps it to exit code 3).
class FileError : public Error {
 public:
  FileError(const std::string& path, const std::string& problem);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A value of an HDF5 attribute.
using AttrValue = std::variant<std::string, int64_t, double>;
using Attributes = std::map<std::string, AttrValue>;

// Tensors (CPU, in the file's dtype), in file order, with string metadata
// (safetensors `__metadata__`) and attributes (HDF5: root attributes in
// `attributes`, attributes of groups in `group_attributes` keyed by dotted path).
struct TensorFile {
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::map<std::string, std::string> metadata;
  Attributes attributes;
  std::map<std::string, Attributes> group_attributes;
  // What the reader could not check, said once per file (HDF5: tensors without a checksum).
  std::vector<std::string> notes;

  const Tensor* find(const std::string& name) const;  // nullptr when absent
};

// ---- safetensors (io/safetensors.cpp) ------------------------------------------------
// Reads through a memory map. Dtypes F32, F64, F16, BF16, I64 (also I32, I16, I8, U8, BOOL
// are parsed and rejected with a clear error if their data is needed).
TensorFile read_safetensors(const std::string& path);
// Parses a whole file image (the fuzz target's entry point); `name` is used in errors.
TensorFile parse_safetensors(const uint8_t* data, size_t size, const std::string& name);
// Writes tensors (any device; written as their dtype) and `__metadata__`; atomic.
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// ---- HDF5 (io/hdf5_*.cpp) ----------------------------------------------------------------
// One dataset per tensor at the path made from its dotted name (dots become groups),
// little-endian f32/f64 (other dtypes are written as f32 after a lossless widening:
// bf16/f16 -> f32; i64 stays i64), PyTorch shapes. Atomic.
void write_hdf5(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                const Attributes& root_attributes = {},
                const std::map<std::string, Attributes>& group_attributes = {});
// Reads every dataset (as a dotted name), the root attributes and the groups' attributes.
TensorFile read_hdf5(const std::string& path);

// ---- either ----------------------------------------------------------------------------------
enum class FileFormat { Safetensors, Hdf5 };
// By content (HDF5 signature / safetensors header), not by extension; FileError otherwise.
FileFormat detect_format(const std::string& path);
TensorFile read_tensor_file(const std::string& path);
const char* format_name(FileFormat f);

// ---- model weights -------------------------------------------------------------------------------
// True when every element is finite (integers always are). CPU tensors are read in place in
// their own dtype (bf16 / f16 by their exponent bits); others are copied to the host once.
bool all_finite(const Tensor& t);
// One weight file of a model, read as every model loader reads it (the UNet and VAE directories,
// single-file checkpoints, one-block model directories): read_tensor_file, then every tensor
// checked finite (a NaN / Inf is a FileError naming the file and the key: no checksum guards an
// h5py file's values), and what the reader could not check (an h5py model.h5: "N of M tensors
// carry no checksum") appended to `notes` as "<path>: <note>".
TensorFile read_weight_file(const std::string& path, std::vector<std::string>& notes);

// Writes `bytes` to `path` atomically (temporary file in the same directory, fsync, rename).
void write_file_atomic(const std::string& path, const std::string& bytes);

}  // namespace loom::io
