// im2col / col2im kernels (contract in tensor/backend.h), one thread per output
// element with a grid-stride loop. 16-bit types accumulate in float, f64 in double.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "tensor/cuda/cuda_common.h"
#include "tensor/cuda/cuda_conv.h"

namespace loom::cuda {
namespace {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T>
__device__ __forceinline__ typename Acc<T>::type load(const T* p) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(*p);
  else if constexpr (std::is_same_v<T, __half>) return __half2float(*p);
  else return *p;
}

template <typename T, typename A>
__device__ __forceinline__ void store(T* p, A v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) *p = __float2bfloat16_rn(float(v));
  else if constexpr (std::is_same_v<T, __half>) *p = __float2half_rn(float(v));
  else *p = T(v);
}

// cols index (((n·C + c)·kh + i)·kw + j)·L + oy·ow + ox, L = oh·ow.
template <typename T>
__global__ void im2col_kernel(T* __restrict__ cols, const T* __restrict__ image, Im2ColArgs a, int64_t total) {
  const int64_t L = a.out_h * a.out_w, kk = a.kernel_h * a.kernel_w;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t l = idx % L, row = idx / L;
    const int64_t tap = row % kk, plane = row / kk;  // plane = n·C + c
    const int64_t i = tap / a.kernel_w, j = tap % a.kernel_w;
    const int64_t oy = l / a.out_w, ox = l % a.out_w;
    const int64_t y = oy * a.stride_h - a.pad_h + i * a.dilation_h;
    const int64_t x = ox * a.stride_w - a.pad_w + j * a.dilation_w;
    const bool inside = y >= 0 && y < a.height && x >= 0 && x < a.width;
    cols[idx] = inside ? image[(plane * a.height + y) * a.width + x] : T(0.0f);
  }
}

// image index (n·C + c)·H·W + y·W + x; sums over the taps (i, j) whose output position
// (oy, ox) reads (y, x): oy = (y + pad − i·dil) / stride when that divides exactly and is in range.
template <typename T>
__global__ void col2im_kernel(T* __restrict__ image, const T* __restrict__ cols, Im2ColArgs a, int64_t total) {
  using A = typename Acc<T>::type;
  const int64_t L = a.out_h * a.out_w, kk = a.kernel_h * a.kernel_w, hw = a.height * a.width;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t plane = idx / hw, q = idx % hw;
    const int64_t y = q / a.width, x = q % a.width;
    const T* base = cols + plane * kk * L;
    A sum = A(0);
    for (int64_t i = 0; i < a.kernel_h; ++i) {
      const int64_t ty = y + a.pad_h - i * a.dilation_h;
      if (ty < 0 || ty % a.stride_h != 0) continue;
      const int64_t oy = ty / a.stride_h;
      if (oy >= a.out_h) continue;
      for (int64_t j = 0; j < a.kernel_w; ++j) {
        const int64_t tx = x + a.pad_w - j * a.dilation_w;
        if (tx < 0 || tx % a.stride_w != 0) continue;
        const int64_t ox = tx / a.stride_w;
        if (ox >= a.out_w) continue;
        sum += load(base + (i * a.kernel_w + j) * L + oy * a.out_w + ox);
      }
    }
    store(image + idx, sum);
  }
}

template <typename F>
void dispatch_conv(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::F32: f(float{}); return;
    case DType::F64: f(double{}); return;
    case DType::BF16: f(__nv_bfloat16{}); return;
    case DType::F16: f(__half{}); return;
    default: break;
  }
  LOOM_FAIL(op, ": dtype ", dtype_name(dtype), " is not supported (f32, f64, bf16, f16)");
}

}  // namespace

void launch_im2col(const Im2ColParams& p) {
  const Im2ColArgs& a = p.geo;
  const int64_t total = a.batch * a.channels * a.kernel_h * a.kernel_w * a.out_h * a.out_w;
  if (total == 0) return;
  dispatch_conv(p.dtype, "cuda im2col", [&](auto tag) {
    using T = decltype(tag);
    im2col_kernel<T><<<grid_for(total), kThreads>>>(static_cast<T*>(p.cols), static_cast<const T*>(p.image), a,
                                                     total);
    check_last_launch("im2col_kernel");
  });
}

void launch_col2im(const Im2ColParams& p) {
  const Im2ColArgs& a = p.geo;
  const int64_t total = a.batch * a.channels * a.height * a.width;
  if (total == 0) return;
  dispatch_conv(p.dtype, "cuda col2im", [&](auto tag) {
    using T = decltype(tag);
    col2im_kernel<T><<<grid_for(total), kThreads>>>(static_cast<T*>(p.image), static_cast<const T*>(p.cols), a,
                                                     total);
    check_last_launch("col2im_kernel");
  });
}

}  // namespace loom::cuda
