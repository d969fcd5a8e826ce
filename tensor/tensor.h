// loom::Tensor: a value type (cheap to copy; copies share storage) describing a
// strided view into a Storage block that lives on one device.
//
//   element (i0, ..., in) is at  storage.data + (offset + Σ ik·strides[k]) · itemsize
//
// Views (view/reshape of contiguous data, permute, transpose, slice, narrow,
// expand, unsqueeze, squeeze) share storage with their source. Strides are in
// elements. A 0-d tensor has shape {} and one element. Tensors carry no
// gradient information: autograd (autograd/variable.h) wraps them.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tensor/device.h"
#include "tensor/dtype.h"
#include "tensor/error.h"

namespace loom {

using Shape = std::vector<int64_t>;

class Generator;

// A block of device memory, freed through the owning device's backend.
class Storage {
 public:
  Storage(size_t nbytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  Device device() const { return device_; }

 private:
  void* data_ = nullptr;
  size_t nbytes_ = 0;
  Device device_;
};

int64_t shape_numel(const Shape& shape);
Shape contiguous_strides(const Shape& shape);
// Normalises a possibly negative dim against rank `dim`; throws naming `op`.
int64_t wrap_dim(int64_t d, int64_t dim, const char* op);

class Tensor {
 public:
  Tensor() = default;  // undefined tensor (defined() == false)

  // ---- factories -------------------------------------------------------
  static Tensor empty(const Shape& shape, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor zeros(const Shape& shape, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor ones(const Shape& shape, DType dtype = DType::F32, Device device = Device::cpu());
  static Tensor full(const Shape& shape, double value, DType dtype = DType::F32,
                     Device device = Device::cpu());
  static Tensor scalar(double value, DType dtype = DType::F32, Device device = Device::cpu());
  // Values in row-major order, converted to `dtype`; values.size() must equal numel(shape).
  static Tensor from_values(const std::vector<double>& values, const Shape& shape,
                            DType dtype = DType::F32, Device device = Device::cpu());
  // Raw host data of `dtype` (values.size() == numel · itemsize is checked by the typed overloads).
  static Tensor from_host(const void* data, const Shape& shape, DType dtype, Device device = Device::cpu());
  template <typename T>
  static Tensor from_vector(const std::vector<T>& values, const Shape& shape, Device device = Device::cpu()) {
    LOOM_CHECK(int64_t(values.size()) == shape_numel(shape), "from_vector: ", values.size(),
               " values for shape ", shape);
    return from_host(values.data(), shape, dtype_of<T>::value, device);
  }
  // Seeded random tensors; the numbers depend only on the generator state, never on the device.
  static Tensor randn(const Shape& shape, Generator& gen, DType dtype = DType::F32,
                      Device device = Device::cpu(), double mean = 0.0, double std = 1.0);
  static Tensor rand(const Shape& shape, Generator& gen, DType dtype = DType::F32,
                     Device device = Device::cpu(), double low = 0.0, double high = 1.0);

  // ---- metadata --------------------------------------------------------
  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int64_t dim() const { return int64_t(shape_.size()); }
  int64_t size(int64_t d) const;  // negative d counts from the end
  int64_t numel() const { return shape_numel(shape_); }
  int64_t offset() const { return offset_; }
  DType dtype() const { return dtype_; }
  Device device() const;
  bool is_contiguous() const;
  const std::shared_ptr<Storage>& storage() const { return storage_; }
  // Address of element (0, ..., 0) on the tensor's device.
  void* raw_data() const;
  // Typed host pointer to element (0,...,0): CPU tensors of dtype T only.
  template <typename T>
  T* data() const {
    LOOM_CHECK(defined() && device().is_cpu() && dtype_ == dtype_of<T>::value, "data<",
               dtype_name(dtype_of<T>::value), ">: tensor is ", str());
    return static_cast<T*>(raw_data());
  }
  std::string str() const;  // "Tensor(f32, cpu, [2, 3])"

  // ---- views (share storage) -------------------------------------------
  Tensor view(const Shape& shape) const;     // requires compatible strides; one -1 allowed
  Tensor reshape(const Shape& shape) const;  // a view when possible, else a contiguous copy
  Tensor permute(const std::vector<int64_t>& dims) const;
  Tensor transpose(int64_t d0, int64_t d1) const;
  Tensor slice(int64_t dim, int64_t start, int64_t end, int64_t step = 1) const;  // [start, end)
  Tensor narrow(int64_t dim, int64_t start, int64_t length) const;
  Tensor select(int64_t dim, int64_t index) const;  // removes `dim`
  Tensor expand(const Shape& shape) const;  // size-1 dims broadcast with stride 0; -1 keeps a dim
  Tensor unsqueeze(int64_t dim) const;
  Tensor squeeze(int64_t dim) const;

  // ---- copies ------------------------------------------------------------
  Tensor contiguous() const;  // *this when already contiguous
  Tensor clone() const;       // always a fresh contiguous copy
  Tensor to(DType dtype) const;
  Tensor to(Device device) const;
  // Writes `src` (broadcast to this shape; any device or dtype) into this view.
  void copy_(const Tensor& src) const;
  void fill_(double value) const;

  // ---- host access (copies to the host; for tests, printing, files) -------
  double item() const;                    // one-element tensors
  std::vector<double> to_vector() const;  // row-major values as double

 private:
  std::shared_ptr<Storage> storage_;
  Shape shape_;
  Shape strides_;
  int64_t offset_ = 0;
  DType dtype_ = DType::F32;

  Tensor with_layout(Shape shape, Shape strides, int64_t offset) const;
};

// Shape that a and b broadcast to (NumPy rules); throws naming `op`.
Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op);

}  // namespace loom
