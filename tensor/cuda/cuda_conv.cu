// im2col / col2im kernels (contract in tensor/backend.h): blocks over rows (planes), threads over
// the positions of a row, 32-bit index math within a row. 16-bit types accumulate in float, f64 in double.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "tensor/cuda/cuda_common.h"
#include "tensor/cuda/cuda_conv.h"
#include "tensor/cuda/cuda_device.cuh"

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

// The group norm (+ SiLU) that im2col_normed applies to the image as it is read (Im2ColNorm in
// tensor/backend.h), with the formula of group_norm_apply_kernel (cuda_group_norm.cu):
// v = (u − mean)·(rstd·w) + b, u = x (+ shift), silu(v) = v / (1 + e^−v). Each image value is
// normed by the ~3.75 threads whose windows hold it (3×3 kernel), so for bf16 / f16 the SiLU
// takes the fast exp and division (relative error ~1e-7, against the output's rounding of ~4e-3);
// f32 / f64 keep the apply kernel's.
struct NormRead {
  const void *mean = nullptr, *rstd = nullptr, *weight = nullptr, *bias = nullptr, *shift = nullptr;
  int channels = 1, per_group = 1;  // channels per group
  bool silu = false;
};

// One plane's (n, c) constants of the norm; apply() maps an image value to its normed value.
template <typename T>
struct PlaneNorm {
  using A = typename Acc<T>::type;
  A mean = A(0), wc = A(1), bc = A(0), sh = A(0);
  bool has_shift = false, silu = false;
  PlaneNorm() = default;
  __device__ __forceinline__ PlaneNorm(const NormRead& r, int64_t plane) {
    const int64_t n = plane / r.channels;
    const int c = int(plane - n * r.channels);
    const int64_t item = n * (r.channels / r.per_group) + c / r.per_group;
    mean = static_cast<const A*>(r.mean)[item];
    const A rstd = static_cast<const A*>(r.rstd)[item];
    wc = rstd * (r.weight ? load(static_cast<const T*>(r.weight) + c) : A(1));
    bc = r.bias ? load(static_cast<const T*>(r.bias) + c) : A(0);
    has_shift = r.shift != nullptr;
    sh = has_shift ? load(static_cast<const T*>(r.shift) + plane) : A(0);
    silu = r.silu;
  }
  __device__ __forceinline__ T apply(T x) const {
    const A u = has_shift ? load(&x) + sh : load(&x);  // x + 0 is not x for x = −0
    A v = (u - mean) * wc + bc;
    if (silu) {
      if constexpr (sizeof(T) == 2)  // bf16 / f16: the fast exp and division, far inside the rounding
        v = __fdividef(v, 1.f + __expf(-v));
      else
        v = v / (A(1) + m_exp(-v));
    }
    T out;
    store(&out, v);
    return out;
  }
};

// cols index (((n·C + c)·kh + i)·kw + j)·L + oy·ow + ox, L = oh·ow.
// Grid: x = one row of cols (plane n·C + c, tap i, j) per block row, y·blockDim = positions l of
// that row. The row's constants are computed once per thread; the per-element index math is
// 32-bit (an image plane and a cols row are < 2^31 elements, checked by the launcher), and the
// writes of a warp are consecutive.
template <typename T, bool kNorm = false>
__global__ void im2col_kernel(T* __restrict__ cols, const T* __restrict__ image, Im2ColArgs a, int64_t rows,
                              NormRead norm = {}) {
  const int L = int(a.out_h * a.out_w), kw = int(a.kernel_w), kk = int(a.kernel_h * a.kernel_w);
  const int W = int(a.width), H = int(a.height), ow = int(a.out_w);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int tap = int(row % kk);
    const int64_t plane = row / kk;
    const int i = tap / kw, j = tap % kw;
    const int y0 = i * int(a.dilation_h) - int(a.pad_h), x0 = j * int(a.dilation_w) - int(a.pad_w);
    const T* src = image + plane * int64_t(H) * W;
    T* dst = cols + row * int64_t(L);
    PlaneNorm<T> pn;
    if constexpr (kNorm) pn = PlaneNorm<T>(norm, plane);
    for (int l = blockIdx.y * blockDim.x + threadIdx.x; l < L; l += gridDim.y * blockDim.x) {
      const int oy = l / ow, ox = l - oy * ow;
      const int y = oy * int(a.stride_h) + y0, x = ox * int(a.stride_w) + x0;
      const bool inside = unsigned(y) < unsigned(H) && unsigned(x) < unsigned(W);
      T v = inside ? src[y * W + x] : T(0.0f);
      if constexpr (kNorm) v = inside ? pn.apply(v) : v;
      dst[l] = v;
    }
  }
}

// The same rows written one 16-byte pack (V = 16 / sizeof(T) consecutive positions) per thread:
// needs out_w % V == 0 (a pack never crosses an output row, and every cols row starts on a pack
// boundary). The V source values of a pack are one row of the image at x, x + stride, …; each is
// bounds-checked (zero outside), and a pack whose image row lies outside is stored as zeros.
template <typename T>
__global__ void im2col_pack_kernel(T* __restrict__ cols, const T* __restrict__ image, Im2ColArgs a, int64_t rows) {
  using P = Pack16<T>;
  constexpr int V = P::kSize;
  const int L = int(a.out_h * a.out_w), packs = L / V, kw = int(a.kernel_w), kk = int(a.kernel_h * a.kernel_w);
  const int W = int(a.width), H = int(a.height), ow = int(a.out_w), sw = int(a.stride_w);
  const int64_t total = rows * packs;  // flat over (row, pack): small planes keep every thread busy
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = idx / packs;
    const int q = int(idx - row * packs);
    const int tap = int(row % kk);
    const int64_t plane = row / kk;
    const int i = tap / kw, j = tap % kw;
    const int y0 = i * int(a.dilation_h) - int(a.pad_h), x0 = j * int(a.dilation_w) - int(a.pad_w);
    const T* src = image + plane * int64_t(H) * W;
    P* dst = reinterpret_cast<P*>(cols + row * int64_t(L));
    {
      const int l = q * V, oy = l / ow, ox = l - oy * ow;
      const int y = oy * int(a.stride_h) + y0, x = ox * sw + x0;
      P out;
      if (unsigned(y) < unsigned(H)) {
        const T* line = src + y * W;
#pragma unroll
        for (int e = 0; e < V; ++e) {
          const int xe = x + e * sw;
          out.v[e] = unsigned(xe) < unsigned(W) ? line[xe] : T(0.0f);
        }
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) out.v[e] = T(0.0f);
      }
      dst[q] = out;
    }
  }
}

// The 3×3 convolution at stride 1, padding 1, dilation 1 (every k×k convolution of Stable
// Diffusion's UNet and VAE but the downsamplers): out_h = H, out_w = W, needs W % V == 0 (V =
// 16 / sizeof(T)). One thread per (plane, output row oy, pack of V positions x0 … x0 + V − 1)
// writes that pack of all nine cols rows of the plane: per image row y = oy + i − 1 it loads the
// V values at x0 as one 16-byte pack and their two neighbours x0 − 1, x0 + V (zero outside),
// and stores the three shifted windows (taps j = 0, 1, 2) — 9 aligned stores from 3 pack loads,
// where im2col_pack_kernel spends V scalar loads and 64-bit index math on every store.
// Threads are numbered (plane, oy, pack) with 32-bit math (the launcher checks the count).
// kNorm: each image value read is group-normed first (PlaneNorm), the zeros outside are not.
template <typename T, bool kNorm = false>
__global__ void im2col_3x3_kernel(T* __restrict__ cols, const T* __restrict__ image, int H, int W,
                                  uint32_t total, NormRead norm = {}) {
  using P = Pack16<T>;
  constexpr int V = P::kSize;
  const uint32_t packs = uint32_t(W / V), per_plane = uint32_t(H) * packs;
  const int64_t L = int64_t(H) * W;
  for (uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += gridDim.x * blockDim.x) {
    const uint32_t plane = idx / per_plane, rem = idx - plane * per_plane;
    const int oy = int(rem / packs), x0 = int(rem - uint32_t(oy) * packs) * V;
    const T* src = image + int64_t(plane) * L;
    T* dst = cols + int64_t(plane) * 9 * L + int64_t(oy) * W + x0;
    PlaneNorm<T> pn;
    if constexpr (kNorm) pn = PlaneNorm<T>(norm, plane);
    auto normed = [&](T v) {
      if constexpr (kNorm) return pn.apply(v);
      else return v;
    };
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      const int y = oy + i - 1;
      T win[V + 2];  // image row y at x0 − 1 … x0 + V
      if (unsigned(y) < unsigned(H)) {
        const T* line = src + int64_t(y) * W;
        const P mid = *reinterpret_cast<const P*>(line + x0);
#pragma unroll
        for (int e = 0; e < V; ++e) win[e + 1] = normed(mid.v[e]);
        win[0] = x0 > 0 ? normed(line[x0 - 1]) : T(0.0f);
        win[V + 1] = x0 + V < W ? normed(line[x0 + V]) : T(0.0f);
      } else {
#pragma unroll
        for (int e = 0; e < V + 2; ++e) win[e] = T(0.0f);
      }
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        P out;
#pragma unroll
        for (int e = 0; e < V; ++e) out.v[e] = win[e + j];
        *reinterpret_cast<P*>(dst + int64_t(i * 3 + j) * L) = out;
      }
    }
  }
}

// image index (n·C + c)·H·W + y·W + x; sums over the taps (i, j) whose output position
// (oy, ox) reads (y, x): oy = (y + pad − i·dil) / stride when that divides exactly and is in range.
// Grid: x = planes, y·blockDim = positions of the plane; 32-bit index math within a plane.
template <typename T>
__global__ void col2im_kernel(T* __restrict__ image, const T* __restrict__ cols, Im2ColArgs a, int64_t planes) {
  using A = typename Acc<T>::type;
  const int L = int(a.out_h * a.out_w), kh = int(a.kernel_h), kw = int(a.kernel_w), hw = int(a.height * a.width);
  const int W = int(a.width), oh = int(a.out_h), ow = int(a.out_w);
  const int sh = int(a.stride_h), sw = int(a.stride_w), dh = int(a.dilation_h), dw = int(a.dilation_w);
  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    const T* base = cols + plane * int64_t(kh * kw) * L;
    T* out = image + plane * int64_t(hw);
    for (int q = blockIdx.y * blockDim.x + threadIdx.x; q < hw; q += gridDim.y * blockDim.x) {
      const int y = q / W, x = q - (q / W) * W;
      A sum = A(0);
      for (int i = 0; i < kh; ++i) {
        const int ty = y + int(a.pad_h) - i * dh;
        if (ty < 0 || ty % sh != 0) continue;
        const int oy = ty / sh;
        if (oy >= oh) continue;
        for (int j = 0; j < kw; ++j) {
          const int tx = x + int(a.pad_w) - j * dw;
          if (tx < 0 || tx % sw != 0) continue;
          const int ox = tx / sw;
          if (ox >= ow) continue;
          sum += load(base + (i * kw + j) * int64_t(L) + oy * ow + ox);
        }
      }
      store(out + q, sum);
    }
  }
}

// Grid for rows × positions: x covers the rows (capped; the kernels loop), y the positions of a row.
dim3 rows_grid(int64_t rows, int64_t per_row) {
  const int64_t y = std::min<int64_t>((per_row + kThreads - 1) / kThreads, 65535);
  const int64_t x = std::min<int64_t>(rows, int64_t(1) << 30);
  return dim3(unsigned(std::max<int64_t>(x, 1)), unsigned(std::max<int64_t>(y, 1)));
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

namespace {
// A 3×3 kernel at stride 1, padding 1, dilation 1: the output plane is the input's (im2col_3x3_kernel).
bool is_3x3_same(const Im2ColArgs& a) {
  return a.kernel_h == 3 && a.kernel_w == 3 && a.stride_h == 1 && a.stride_w == 1 && a.pad_h == 1 && a.pad_w == 1 &&
         a.dilation_h == 1 && a.dilation_w == 1 && a.out_h == a.height && a.out_w == a.width;
}
}  // namespace

// 32-bit index math inside one image plane and one cols row (the kernels' assumption).
void check_plane_sizes(const Im2ColArgs& a, const char* op) {
  constexpr int64_t kLimit = int64_t(1) << 31;
  LOOM_CHECK(a.height * a.width < kLimit && a.out_h * a.out_w < kLimit && a.kernel_h * a.kernel_w < kLimit,
             op, ": an image plane of ", a.height, "x", a.width, " (output ", a.out_h, "x", a.out_w,
             ") exceeds 2^31 elements");
}

void launch_im2col(const Im2ColParams& p) {
  const Im2ColArgs& a = p.geo;
  const int64_t rows = a.batch * a.channels * a.kernel_h * a.kernel_w, L = a.out_h * a.out_w;
  if (rows == 0 || L == 0) return;
  check_plane_sizes(a, "cuda im2col");
  NormRead norm;
  if (p.normed) {
    LOOM_CHECK(a.channels < (int64_t(1) << 31) && p.norm_groups >= 1 && a.channels % p.norm_groups == 0,
               "cuda im2col_normed: ", a.channels, " channels in ", p.norm_groups, " groups");
    norm.mean = p.norm_mean, norm.rstd = p.norm_rstd, norm.weight = p.norm_weight, norm.bias = p.norm_bias;
    norm.shift = p.norm_shift, norm.channels = int(a.channels), norm.per_group = int(a.channels / p.norm_groups);
    norm.silu = p.norm_silu;
  }
  dispatch_conv(p.dtype, "cuda im2col", [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = Pack16<T>::kSize;
    const bool aligned = reinterpret_cast<uintptr_t>(p.cols) % 16 == 0 && reinterpret_cast<uintptr_t>(p.image) % 16 == 0;
    const int64_t threads_3x3 = a.batch * a.channels * a.height * (a.width / V);
    if (is_3x3_same(a) && a.width % V == 0 && aligned && threads_3x3 < (int64_t(1) << 31)) {
      auto launch = [&](auto kernel, const char* name) {
        kernel<<<grid_for(threads_3x3), kThreads, 0, compute_stream()>>>(
            static_cast<T*>(p.cols), static_cast<const T*>(p.image), int(a.height), int(a.width), uint32_t(threads_3x3),
            norm);
        check_last_launch(name);
      };
      if (p.normed) launch(im2col_3x3_kernel<T, true>, "im2col_3x3_kernel (group-normed)");
      else launch(im2col_3x3_kernel<T, false>, "im2col_3x3_kernel");
      return;
    }
    if (!p.normed && a.out_w % V == 0 && reinterpret_cast<uintptr_t>(p.cols) % 16 == 0) {  // one 16-byte store per thread
      im2col_pack_kernel<T><<<grid_for(rows * (L / V)), kThreads, 0, compute_stream()>>>(
          static_cast<T*>(p.cols), static_cast<const T*>(p.image), a, rows);
      check_last_launch("im2col_pack_kernel");
      return;
    }
    auto launch = [&](auto kernel, const char* name) {
      kernel<<<rows_grid(rows, L), kThreads, 0, compute_stream()>>>(static_cast<T*>(p.cols),
                                                                    static_cast<const T*>(p.image), a, rows, norm);
      check_last_launch(name);
    };
    if (p.normed) launch(im2col_kernel<T, true>, "im2col_kernel (group-normed)");
    else launch(im2col_kernel<T, false>, "im2col_kernel");
  });
}

void launch_col2im(const Im2ColParams& p) {
  const Im2ColArgs& a = p.geo;
  const int64_t planes = a.batch * a.channels, hw = a.height * a.width;
  if (planes == 0 || hw == 0) return;
  check_plane_sizes(a, "cuda col2im");
  dispatch_conv(p.dtype, "cuda col2im", [&](auto tag) {
    using T = decltype(tag);
    col2im_kernel<T><<<rows_grid(planes, hw), kThreads, 0, compute_stream()>>>(static_cast<T*>(p.image), static_cast<const T*>(p.cols), a,
                                                          planes);
    check_last_launch("col2im_kernel");
  });
}

}  // namespace loom::cuda
