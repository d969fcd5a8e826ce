// im2col / col2im on the host (OpenMP over (batch, channel) planes).
//
// im2col: each (n, c) plane of the image produces kh·kw rows of cols.
// col2im: the adjoint, written as a gather (each image pixel sums the columns
// that read it), so planes are independent and no two threads write one value.
#include "tensor/cpu/cpu_conv.h"

#include <cstdint>

namespace loom::cpu {
namespace {

// First output index o >= 0 with o·stride − pad + off >= 0, and one past the last with
// o·stride − pad + off < in (clamped to [0, out]): the range where a kernel tap reads inside.
void valid_range(int64_t in, int64_t out, int64_t stride, int64_t pad, int64_t off, int64_t& lo, int64_t& hi) {
  const int64_t shift = off - pad;  // input index = o·stride + shift
  lo = shift >= 0 ? 0 : (-shift + stride - 1) / stride;
  hi = in - shift <= 0 ? 0 : (in - shift + stride - 1) / stride;
  if (lo > out) lo = out;
  if (hi > out) hi = out;
  if (hi < lo) hi = lo;
}

template <typename T>
void im2col_typed(T* cols, const T* image, const Im2ColArgs& a) {
  const int64_t planes = a.batch * a.channels, kk = a.kernel_h * a.kernel_w, L = a.out_h * a.out_w;
  const int64_t hw = a.height * a.width;
#pragma omp parallel for schedule(static) if (planes * kk * L > (int64_t(1) << 15))
  for (int64_t p = 0; p < planes; ++p) {
    const T* src = image + p * hw;
    T* dst_plane = cols + p * kk * L;  // [n, c] rows start at (n·C + c)·kk·L
    for (int64_t i = 0; i < a.kernel_h; ++i) {
      int64_t ylo, yhi;
      valid_range(a.height, a.out_h, a.stride_h, a.pad_h, i * a.dilation_h, ylo, yhi);
      for (int64_t j = 0; j < a.kernel_w; ++j) {
        int64_t xlo, xhi;
        valid_range(a.width, a.out_w, a.stride_w, a.pad_w, j * a.dilation_w, xlo, xhi);
        T* row = dst_plane + (i * a.kernel_w + j) * L;
        for (int64_t oy = 0; oy < a.out_h; ++oy) {
          T* r = row + oy * a.out_w;
          if (oy < ylo || oy >= yhi) {
            for (int64_t ox = 0; ox < a.out_w; ++ox) r[ox] = T(0);
            continue;
          }
          const T* s = src + (oy * a.stride_h - a.pad_h + i * a.dilation_h) * a.width;
          const int64_t xoff = j * a.dilation_w - a.pad_w;
          for (int64_t ox = 0; ox < xlo; ++ox) r[ox] = T(0);
          for (int64_t ox = xlo; ox < xhi; ++ox) r[ox] = s[ox * a.stride_w + xoff];
          for (int64_t ox = xhi; ox < a.out_w; ++ox) r[ox] = T(0);
        }
      }
    }
  }
}

template <typename T>
void col2im_typed(T* image, const T* cols, const Im2ColArgs& a) {
  const int64_t planes = a.batch * a.channels, kk = a.kernel_h * a.kernel_w, L = a.out_h * a.out_w;
  const int64_t hw = a.height * a.width;
#pragma omp parallel for schedule(static) if (planes * kk * L > (int64_t(1) << 15))
  for (int64_t p = 0; p < planes; ++p) {
    T* dst = image + p * hw;
    const T* src_plane = cols + p * kk * L;
    for (int64_t q = 0; q < hw; ++q) dst[q] = T(0);
    // Scatter within one plane: only this thread writes it, so plain adds are race-free.
    for (int64_t i = 0; i < a.kernel_h; ++i) {
      int64_t ylo, yhi;
      valid_range(a.height, a.out_h, a.stride_h, a.pad_h, i * a.dilation_h, ylo, yhi);
      for (int64_t j = 0; j < a.kernel_w; ++j) {
        int64_t xlo, xhi;
        valid_range(a.width, a.out_w, a.stride_w, a.pad_w, j * a.dilation_w, xlo, xhi);
        const T* row = src_plane + (i * a.kernel_w + j) * L;
        const int64_t xoff = j * a.dilation_w - a.pad_w;
        for (int64_t oy = ylo; oy < yhi; ++oy) {
          const T* r = row + oy * a.out_w;
          T* d = dst + (oy * a.stride_h - a.pad_h + i * a.dilation_h) * a.width;
          for (int64_t ox = xlo; ox < xhi; ++ox) d[ox * a.stride_w + xoff] += r[ox];
        }
      }
    }
  }
}

template <typename F>
void visit_float(const char* op, DType t, F&& f) {
  if (t == DType::F32) return f(float{});
  if (t == DType::F64) return f(double{});
  LOOM_FAIL("cpu ", op, ": dtype ", dtype_name(t), " is not supported (f32 and f64 only)");
}

}  // namespace

void im2col(const Tensor& cols, const Tensor& image, const Im2ColArgs& args) {
  if (cols.numel() == 0) return;
  visit_float("im2col", image.dtype(), [&](auto zero) {
    using T = decltype(zero);
    im2col_typed<T>(static_cast<T*>(cols.raw_data()), static_cast<const T*>(image.raw_data()), args);
  });
}

void col2im(const Tensor& image, const Tensor& cols, const Im2ColArgs& args) {
  if (image.numel() == 0) return;
  visit_float("col2im", image.dtype(), [&](auto zero) {
    using T = decltype(zero);
    col2im_typed<T>(static_cast<T*>(image.raw_data()), static_cast<const T*>(cols.raw_data()), args);
  });
}

}  // namespace loom::cpu
