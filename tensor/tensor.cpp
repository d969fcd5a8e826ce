#include "tensor/tensor.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "tensor/backend.h"
#include "tensor/random.h"

namespace loom {

// ---- Storage ------------------------------------------------------------------

Storage::Storage(size_t nbytes, Device device) : nbytes_(nbytes), device_(device) {
  data_ = backend_for(device).allocate(nbytes, device.index);
}

Storage::~Storage() {
  try {
    backend_for(device_).deallocate(data_, nbytes_, device_.index);
  } catch (...) {  // a destructor must not throw; the device is gone anyway
  }
}

// ---- shape helpers ------------------------------------------------------------

int64_t shape_numel(const Shape& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

Shape contiguous_strides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t s = 1;
  for (int64_t i = int64_t(shape.size()) - 1; i >= 0; --i) {
    strides[i] = s;
    s *= std::max<int64_t>(shape[i], 1);
  }
  return strides;
}

int64_t wrap_dim(int64_t d, int64_t dim, const char* op) {
  const int64_t lo = dim == 0 ? -1 : -dim, hi = dim == 0 ? 0 : dim - 1;
  LOOM_CHECK(d >= lo && d <= hi, op, ": dim ", d, " out of range for a tensor of rank ", dim,
             " (expected ", lo, "..", hi, ")");
  return d < 0 ? d + std::max<int64_t>(dim, 1) : d;
}

Shape broadcast_shapes(const Shape& a, const Shape& b, const char* op) {
  const size_t n = std::max(a.size(), b.size());
  Shape out(n);
  for (size_t i = 0; i < n; ++i) {
    const int64_t da = i < n - a.size() ? 1 : a[i - (n - a.size())];
    const int64_t db = i < n - b.size() ? 1 : b[i - (n - b.size())];
    LOOM_CHECK(da == db || da == 1 || db == 1, op, ": shapes ", a, " and ", b,
               " cannot be broadcast together (dim ", i, ": ", da, " vs ", db, ")");
    out[i] = da == 1 ? db : da;
  }
  return out;
}

namespace {

void check_shape_valid(const Shape& shape, const char* op) {
  for (int64_t s : shape) LOOM_CHECK(s >= 0, op, ": negative size in shape ", shape);
}

// Replaces a single -1 in `shape` so that it holds `numel` elements.
Shape infer_shape(Shape shape, int64_t numel, const char* op) {
  int64_t known = 1, infer_at = -1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      LOOM_CHECK(infer_at < 0, op, ": only one -1 allowed in shape ", shape);
      infer_at = int64_t(i);
    } else {
      LOOM_CHECK(shape[i] >= 0, op, ": invalid size ", shape[i], " in shape ", shape);
      known *= shape[i];
    }
  }
  if (infer_at >= 0) {
    LOOM_CHECK(known != 0 && numel % known == 0, op, ": shape ", shape, " is invalid for ", numel,
               " elements");
    shape[infer_at] = numel / known;
  }
  LOOM_CHECK(shape_numel(shape) == numel, op, ": shape ", shape, " is invalid for ", numel, " elements");
  return shape;
}

// Strides that let `new_shape` view memory laid out as (old_shape, old_strides),
// or false when no such strides exist (dims that are merged must be contiguous
// with one another).
bool view_strides(const Shape& old_shape, const Shape& old_strides, const Shape& new_shape, Shape& out) {
  out.assign(new_shape.size(), 0);
  if (shape_numel(old_shape) == 0 || old_shape.empty()) {
    out = contiguous_strides(new_shape);
    return true;
  }
  int64_t view_d = int64_t(new_shape.size()) - 1;
  int64_t chunk_stride = old_strides.back();
  int64_t tensor_numel = 1, view_numel = 1;
  for (int64_t d = int64_t(old_shape.size()) - 1; d >= 0; --d) {
    tensor_numel *= old_shape[d];
    const bool chunk_ends =
        d == 0 || (old_shape[d - 1] != 1 && old_strides[d - 1] != tensor_numel * chunk_stride);
    if (!chunk_ends) continue;
    while (view_d >= 0 && (view_numel < tensor_numel || new_shape[view_d] == 1)) {
      out[view_d] = view_numel * chunk_stride;
      view_numel *= new_shape[view_d];
      --view_d;
    }
    if (view_numel != tensor_numel) return false;
    if (d > 0) {
      chunk_stride = old_strides[d - 1];
      tensor_numel = view_numel = 1;
    }
  }
  return view_d == -1;
}

// The value `v` takes once stored as `dtype` (f64 values are stored through f32
// for the 16-bit types, as Tensor::to does).
double round_to_dtype(double v, DType dtype) {
  switch (dtype) {
    case DType::F32: return double(float(v));
    case DType::BF16: return double(float(bf16(float(v))));
    case DType::F16: return double(float(f16(float(v))));
    case DType::I64: return std::trunc(v);
    case DType::F64: break;
  }
  return v;
}

}  // namespace

// ---- factories -------------------------------------------------------------------

Tensor Tensor::empty(const Shape& shape, DType dtype, Device device) {
  check_shape_valid(shape, "empty");
  Tensor t;
  t.storage_ = std::make_shared<Storage>(size_t(shape_numel(shape)) * itemsize(dtype), device);
  t.shape_ = shape;
  t.strides_ = contiguous_strides(shape);
  t.dtype_ = dtype;
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dtype, Device device) { return full(shape, 0.0, dtype, device); }
Tensor Tensor::ones(const Shape& shape, DType dtype, Device device) { return full(shape, 1.0, dtype, device); }

Tensor Tensor::full(const Shape& shape, double value, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  t.fill_(value);
  return t;
}

Tensor Tensor::scalar(double value, DType dtype, Device device) { return full({}, value, dtype, device); }

Tensor Tensor::from_host(const void* data, const Shape& shape, DType dtype, Device device) {
  Tensor t = empty(shape, dtype, device);
  const size_t nbytes = size_t(t.numel()) * itemsize(dtype);
  if (nbytes) backend_for(device).copy_from_host(t.raw_data(), data, nbytes, device.index);
  return t;
}

Tensor Tensor::from_values(const std::vector<double>& values, const Shape& shape, DType dtype, Device device) {
  check_shape_valid(shape, "from_values");
  LOOM_CHECK(int64_t(values.size()) == shape_numel(shape), "from_values: ", values.size(),
             " values for shape ", shape, " (", shape_numel(shape), " elements)");
  return from_host(values.data(), shape, DType::F64, Device::cpu()).to(dtype).to(device);
}

Tensor Tensor::randn(const Shape& shape, Generator& gen, DType dtype, Device device, double mean, double std) {
  check_shape_valid(shape, "randn");
  std::vector<double> v(size_t(shape_numel(shape)));
  for (double& x : v) x = mean + std * gen.normal();
  return from_values(v, shape, dtype, device);
}

Tensor Tensor::rand(const Shape& shape, Generator& gen, DType dtype, Device device, double low, double high) {
  check_shape_valid(shape, "rand");
  LOOM_CHECK(low < high, "rand: empty range [", low, ", ", high, ")");
  std::vector<double> v(size_t(shape_numel(shape)));
  for (double& x : v) {
    do {  // redraw the rare value that rounds up to `high` in the target dtype
      x = round_to_dtype(low + (high - low) * gen.uniform(), dtype);
    } while (x >= high);
  }
  return from_values(v, shape, dtype, device);
}

// ---- metadata --------------------------------------------------------------------

int64_t Tensor::size(int64_t d) const {
  LOOM_CHECK(dim() > 0, "size: a 0-d tensor has no dims (asked for dim ", d, ")");
  return shape_[wrap_dim(d, dim(), "size")];
}

Device Tensor::device() const {
  LOOM_CHECK(defined(), "device: undefined tensor");
  return storage_->device();
}

// A tensor without elements is contiguous whatever its strides (as in PyTorch): contiguous_strides
// gives [2, 4, 0] the strides [4, 1, 1], which the walk below would reject.
bool Tensor::is_contiguous() const {
  if (numel() == 0) return true;
  int64_t expected = 1;
  for (int64_t i = dim() - 1; i >= 0; --i) {
    if (shape_[i] == 1) continue;
    if (strides_[i] != expected) return false;
    expected *= shape_[i];
  }
  return true;
}

void* Tensor::raw_data() const {
  LOOM_CHECK(defined(), "raw_data: undefined tensor");
  return static_cast<char*>(storage_->data()) + offset_ * int64_t(itemsize(dtype_));
}

std::string Tensor::str() const {
  if (!defined()) return "Tensor(undefined)";
  std::ostringstream os;
  os << "Tensor(" << dtype_ << ", " << device() << ", " << shape_ << ")";
  return os.str();
}

// ---- views -----------------------------------------------------------------------

Tensor Tensor::with_layout(Shape shape, Shape strides, int64_t offset) const {
  Tensor t = *this;
  t.shape_ = std::move(shape);
  t.strides_ = std::move(strides);
  t.offset_ = offset;
  return t;
}

Tensor Tensor::view(const Shape& shape) const {
  LOOM_CHECK(defined(), "view: undefined tensor");
  Shape target = infer_shape(shape, numel(), "view");
  Shape strides;
  LOOM_CHECK(view_strides(shape_, strides_, target, strides), "view: cannot view ", str(), " with strides ",
             strides_, " as ", target, " without a copy (use reshape)");
  return with_layout(target, strides, offset_);
}

Tensor Tensor::reshape(const Shape& shape) const {
  LOOM_CHECK(defined(), "reshape: undefined tensor");
  Shape target = infer_shape(shape, numel(), "reshape");
  Shape strides;
  if (view_strides(shape_, strides_, target, strides)) return with_layout(target, strides, offset_);
  return contiguous().view(target);
}

Tensor Tensor::permute(const std::vector<int64_t>& dims) const {
  LOOM_CHECK(int64_t(dims.size()) == dim(), "permute: ", dims.size(), " dims given for a tensor of rank ",
             dim(), " (shape ", shape_, ")");
  Shape shape(dims.size()), strides(dims.size());
  std::vector<bool> seen(dims.size(), false);
  for (size_t i = 0; i < dims.size(); ++i) {
    const int64_t d = wrap_dim(dims[i], dim(), "permute");
    LOOM_CHECK(!seen[d], "permute: dim ", d, " repeated in ", dims);
    seen[d] = true;
    shape[i] = shape_[d];
    strides[i] = strides_[d];
  }
  return with_layout(shape, strides, offset_);
}

Tensor Tensor::transpose(int64_t d0, int64_t d1) const {
  if (dim() == 0) {  // as in PyTorch: dims 0 / -1 of a 0-d tensor name the tensor itself
    wrap_dim(d0, 0, "transpose"), wrap_dim(d1, 0, "transpose");
    return *this;
  }
  d0 = wrap_dim(d0, dim(), "transpose");
  d1 = wrap_dim(d1, dim(), "transpose");
  Shape shape = shape_, strides = strides_;
  std::swap(shape[d0], shape[d1]);
  std::swap(strides[d0], strides[d1]);
  return with_layout(shape, strides, offset_);
}

Tensor Tensor::slice(int64_t d, int64_t start, int64_t end, int64_t step) const {
  LOOM_CHECK(dim() > 0, "slice: cannot slice a 0-d tensor");
  d = wrap_dim(d, dim(), "slice");
  LOOM_CHECK(step > 0, "slice: step must be positive, got ", step);
  const int64_t n = shape_[d];
  if (start < 0) start += n;
  if (end < 0) end += n;
  start = std::clamp<int64_t>(start, 0, n);
  end = std::clamp<int64_t>(end, start, n);
  Shape shape = shape_, strides = strides_;
  shape[d] = (end - start + step - 1) / step;
  strides[d] *= step;
  return with_layout(shape, strides, offset_ + start * strides_[d]);
}

Tensor Tensor::narrow(int64_t d, int64_t start, int64_t length) const {
  LOOM_CHECK(dim() > 0, "narrow: cannot narrow a 0-d tensor");
  d = wrap_dim(d, dim(), "narrow");
  LOOM_CHECK(start >= 0 && length >= 0 && start + length <= shape_[d], "narrow: range [", start, ", ",
             start + length, ") out of bounds for dim ", d, " of size ", shape_[d]);
  return slice(d, start, start + length);
}

Tensor Tensor::select(int64_t d, int64_t index) const {
  LOOM_CHECK(dim() > 0, "select: cannot select from a 0-d tensor");
  d = wrap_dim(d, dim(), "select");
  LOOM_CHECK(index >= -shape_[d] && index < shape_[d], "select: index ", index, " out of range for dim ", d,
             " of size ", shape_[d]);
  if (index < 0) index += shape_[d];
  Shape shape = shape_, strides = strides_;
  shape.erase(shape.begin() + d);
  strides.erase(strides.begin() + d);
  return with_layout(shape, strides, offset_ + index * strides_[d]);
}

Tensor Tensor::expand(const Shape& shape) const {
  LOOM_CHECK(int64_t(shape.size()) >= dim(), "expand: cannot expand ", shape_, " to fewer dims ", shape);
  const size_t lead = shape.size() - shape_.size();
  Shape out_shape(shape.size()), out_strides(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i < lead) {
      LOOM_CHECK(shape[i] >= 0, "expand: -1 not allowed for the new leading dim ", i, " in ", shape);
      out_shape[i] = shape[i];
      out_strides[i] = 0;
      continue;
    }
    const int64_t own = shape_[i - lead];
    const int64_t want = shape[i] == -1 ? own : shape[i];
    LOOM_CHECK(own == want || own == 1, "expand: cannot expand ", shape_, " to ", shape, " (dim ", i, ": ", own,
               " vs ", want, ")");
    out_shape[i] = want;
    out_strides[i] = own == want ? strides_[i - lead] : 0;
  }
  return with_layout(out_shape, out_strides, offset_);
}

Tensor Tensor::unsqueeze(int64_t d) const {
  d = wrap_dim(d, dim() + 1, "unsqueeze");
  Shape shape = shape_, strides = strides_;
  const int64_t stride = d < dim() ? strides_[d] * shape_[d] : 1;
  shape.insert(shape.begin() + d, 1);
  strides.insert(strides.begin() + d, stride);
  return with_layout(shape, strides, offset_);
}

Tensor Tensor::squeeze(int64_t d) const {
  if (dim() == 0) {
    wrap_dim(d, 0, "squeeze");
    return *this;
  }
  d = wrap_dim(d, dim(), "squeeze");
  LOOM_CHECK(shape_[d] == 1, "squeeze: dim ", d, " has size ", shape_[d], " (shape ", shape_, "), not 1");
  Shape shape = shape_, strides = strides_;
  shape.erase(shape.begin() + d);
  strides.erase(strides.begin() + d);
  return with_layout(shape, strides, offset_);
}

// ---- copies ----------------------------------------------------------------------

Tensor Tensor::contiguous() const {
  LOOM_CHECK(defined(), "contiguous: undefined tensor");
  return is_contiguous() ? *this : clone();
}

Tensor Tensor::clone() const {
  LOOM_CHECK(defined(), "clone: undefined tensor");
  Tensor out = empty(shape_, dtype_, device());
  out.copy_(*this);
  return out;
}

Tensor Tensor::to(DType dtype) const {
  LOOM_CHECK(defined(), "to: undefined tensor");
  if (dtype == dtype_) return *this;
  Tensor out = empty(shape_, dtype, device());
  out.copy_(*this);
  return out;
}

Tensor Tensor::to(Device device) const {
  LOOM_CHECK(defined(), "to: undefined tensor");
  const Device from = this->device();
  if (device == from) return *this;
  const Tensor src = contiguous();
  Tensor out = empty(shape_, dtype_, device);
  const size_t nbytes = size_t(numel()) * itemsize(dtype_);
  if (nbytes == 0) return out;
  if (from.is_cpu()) {
    backend_for(device).copy_from_host(out.raw_data(), src.raw_data(), nbytes, device.index);
  } else if (device.is_cpu()) {
    backend_for(from).copy_to_host(out.raw_data(), src.raw_data(), nbytes, from.index);
  } else {  // between two CUDA devices: through the host
    out.copy_(src.to(Device::cpu()));
  }
  return out;
}

void Tensor::copy_(const Tensor& src) const {
  LOOM_CHECK(defined() && src.defined(), "copy_: undefined tensor");
  LOOM_CHECK(broadcast_shapes(src.shape(), shape_, "copy_") == shape_, "copy_: cannot broadcast source ",
             src.shape(), " to destination ", shape_);
  Tensor s = src.device() == device() ? src : src.to(device());
  backend_for("copy_", OpKind::Copy, device(), s.dtype());
  backend_for("copy_", OpKind::Copy, device(), dtype_).copy(*this, s.expand(shape_));
}

void Tensor::fill_(double value) const {
  LOOM_CHECK(defined(), "fill_: undefined tensor");
  if (is_contiguous()) {
    backend_for("fill_", OpKind::Fill, device(), dtype_).fill(*this, value);
  } else {
    copy_(Tensor::full({}, value, dtype_, device()));
  }
}

double Tensor::item() const {
  LOOM_CHECK(defined() && numel() == 1, "item: expected a one-element tensor, got ", str());
  return to_vector()[0];
}

std::vector<double> Tensor::to_vector() const {
  LOOM_CHECK(defined(), "to_vector: undefined tensor");
  const Tensor host = to(Device::cpu()).to(DType::F64).contiguous();
  const double* p = host.data<double>();
  return std::vector<double>(p, p + host.numel());
}

}  // namespace loom
