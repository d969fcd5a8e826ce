// Kernels and launchers for the CUDA backend's elementwise methods: unary, binary, copy, fill
// (reductions and softmax: cuda_reduce.cu). Each launcher takes a plain parameter struct
// (cuda_common.h), picks the device types for the dtype (float, double, __nv_bfloat16, __half,
// int64_t) and the op as template arguments, and launches on the current device's compute stream
// without synchronizing.
//
// Arithmetic: 16-bit types and f32 compute in float, f64 in double.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tensor/cuda/cuda_common.h"
#include "tensor/cuda/cuda_device.cuh"

namespace loom::cuda {
namespace {

// ---- unary ---------------------------------------------------------------------------

template <UnaryOp op, typename C>
__device__ __forceinline__ C apply_unary(C x, C s) {
  if constexpr (op == UnaryOp::Neg) {
    return -x;
  } else if constexpr (op == UnaryOp::Exp) {
    return m_exp(x);
  } else if constexpr (op == UnaryOp::Log) {
    return m_log(x);
  } else if constexpr (op == UnaryOp::Sqrt) {
    return m_sqrt(x);
  } else if constexpr (op == UnaryOp::Rsqrt) {
    return C(1) / m_sqrt(x);
  } else if constexpr (op == UnaryOp::Tanh) {
    return m_tanh(x);
  } else if constexpr (op == UnaryOp::Sigmoid) {
    // Stable on both sides: never exponentiates a large positive number.
    if (x >= C(0)) return C(1) / (C(1) + m_exp(-x));
    const C e = m_exp(x);
    return e / (C(1) + e);
  } else if constexpr (op == UnaryOp::Relu) {
    return x < C(0) ? C(0) : x;  // NaN stays NaN, as on the CPU
  } else if constexpr (op == UnaryOp::Step) {
    return x > C(0) ? C(1) : C(0);
  } else if constexpr (op == UnaryOp::GeluErf) {
    return gelu_erf(x);
  } else if constexpr (op == UnaryOp::GeluTanh) {
    return gelu_tanh(x);
  } else if constexpr (op == UnaryOp::GeluErfGrad) {
    return gelu_erf_grad(x);
  } else if constexpr (op == UnaryOp::GeluTanhGrad) {
    return gelu_tanh_grad(x);
  } else if constexpr (op == UnaryOp::Silu) {
    return x * apply_unary<UnaryOp::Sigmoid, C>(x, s);
  } else if constexpr (op == UnaryOp::SiluGrad) {
    const C sig = apply_unary<UnaryOp::Sigmoid, C>(x, s);
    return sig * (C(1) + x * (C(1) - sig));
  } else if constexpr (op == UnaryOp::Abs) {
    return m_abs(x);
  } else if constexpr (op == UnaryOp::Square) {
    return x * x;
  } else if constexpr (op == UnaryOp::Reciprocal) {
    return C(1) / x;
  } else if constexpr (op == UnaryOp::AddScalar) {
    return x + s;
  } else if constexpr (op == UnaryOp::MulScalar) {
    return x * s;
  } else {
    static_assert(op == UnaryOp::PowScalar, "unhandled UnaryOp");
    return m_pow(x, s);
  }
}

// out[i] = op(in[i], s), i < n.
template <typename T, UnaryOp op>
__global__ void unary_kernel(T* __restrict__ out, const T* __restrict__ in, int64_t n, double scalar) {
  using C = compute_t<T>;
  const C s = C(scalar);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = narrow<T>(apply_unary<op>(widen(in[i]), s));
}

// The same over 16-byte packs (8 bf16 / f16, 4 f32, 2 f64): one vector load and store per pack;
// packs [0, n / V) here, the tail of n % V elements by the first threads. in and out 16-byte aligned.
template <typename T, UnaryOp op>
__global__ void unary_vec_kernel(T* __restrict__ out, const T* __restrict__ in, int64_t n, double scalar) {
  using C = compute_t<T>;
  using P = Pack16<T>;
  const C s = C(scalar);
  const int64_t packs = n / P::kSize, tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = tid; i < packs; i += stride) {
    P x = reinterpret_cast<const P*>(in)[i];
#pragma unroll
    for (int k = 0; k < P::kSize; ++k) x.v[k] = narrow<T>(apply_unary<op>(widen(x.v[k]), s));
    reinterpret_cast<P*>(out)[i] = x;
  }
  for (int64_t i = packs * P::kSize + tid; i < n; i += stride) out[i] = narrow<T>(apply_unary<op>(widen(in[i]), s));
}

template <UnaryOp op> using UnaryTag = std::integral_constant<UnaryOp, op>;

template <typename F>
void dispatch_unary_op(UnaryOp op, F&& f) {
  switch (op) {
    case UnaryOp::Neg: f(UnaryTag<UnaryOp::Neg>{}); return;
    case UnaryOp::Exp: f(UnaryTag<UnaryOp::Exp>{}); return;
    case UnaryOp::Log: f(UnaryTag<UnaryOp::Log>{}); return;
    case UnaryOp::Sqrt: f(UnaryTag<UnaryOp::Sqrt>{}); return;
    case UnaryOp::Rsqrt: f(UnaryTag<UnaryOp::Rsqrt>{}); return;
    case UnaryOp::Tanh: f(UnaryTag<UnaryOp::Tanh>{}); return;
    case UnaryOp::Sigmoid: f(UnaryTag<UnaryOp::Sigmoid>{}); return;
    case UnaryOp::Relu: f(UnaryTag<UnaryOp::Relu>{}); return;
    case UnaryOp::Step: f(UnaryTag<UnaryOp::Step>{}); return;
    case UnaryOp::GeluErf: f(UnaryTag<UnaryOp::GeluErf>{}); return;
    case UnaryOp::GeluTanh: f(UnaryTag<UnaryOp::GeluTanh>{}); return;
    case UnaryOp::GeluErfGrad: f(UnaryTag<UnaryOp::GeluErfGrad>{}); return;
    case UnaryOp::GeluTanhGrad: f(UnaryTag<UnaryOp::GeluTanhGrad>{}); return;
    case UnaryOp::Silu: f(UnaryTag<UnaryOp::Silu>{}); return;
    case UnaryOp::SiluGrad: f(UnaryTag<UnaryOp::SiluGrad>{}); return;
    case UnaryOp::Abs: f(UnaryTag<UnaryOp::Abs>{}); return;
    case UnaryOp::Square: f(UnaryTag<UnaryOp::Square>{}); return;
    case UnaryOp::Reciprocal: f(UnaryTag<UnaryOp::Reciprocal>{}); return;
    case UnaryOp::AddScalar: f(UnaryTag<UnaryOp::AddScalar>{}); return;
    case UnaryOp::MulScalar: f(UnaryTag<UnaryOp::MulScalar>{}); return;
    case UnaryOp::PowScalar: f(UnaryTag<UnaryOp::PowScalar>{}); return;
  }
  LOOM_FAIL("cuda unary: unknown UnaryOp ", int(op));
}

// ---- binary --------------------------------------------------------------------------

template <BinaryOp op, typename C>
__device__ __forceinline__ C apply_binary(C a, C b) {
  if constexpr (op == BinaryOp::Add) {
    return a + b;
  } else if constexpr (op == BinaryOp::Sub) {
    return a - b;
  } else if constexpr (op == BinaryOp::Mul) {
    return a * b;
  } else if constexpr (op == BinaryOp::Div) {
    return a / b;
  } else if constexpr (op == BinaryOp::Max) {  // NaN in either operand gives NaN
    return (a > b || m_isnan(a)) ? a : b;
  } else {
    static_assert(op == BinaryOp::Min, "unhandled BinaryOp");
    return (a < b || m_isnan(a)) ? a : b;
  }
}

// Element offsets of linear index i (row-major over shape) in two strided operands, in index
// type I: uint32_t when the launcher found that every index and offset fits (fits_32bit), since
// 64-bit division costs several times a 32-bit one; int64_t otherwise.
template <typename I>
__device__ __forceinline__ void strided_offsets(I i, int ndim, const int64_t* shape, const int64_t* s0,
                                                const int64_t* s1, I& o0, I& o1) {
  o0 = 0;
  o1 = 0;
  for (int d = ndim - 1; d >= 0; --d) {
    const I extent = I(shape[d]);
    const I idx = i % extent;
    i /= extent;
    o0 += idx * I(s0[d]);
    o1 += idx * I(s1[d]);
  }
}

// out[i] = op(a[·], b[·]) with a and b strided (broadcasting: stride 0); index type I.
template <typename T, BinaryOp op, typename I>
__global__ void binary_kernel(BinaryParams p) {
  T* __restrict__ out = static_cast<T*>(p.out);
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  const I n = I(p.numel);
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
    I oa, ob;
    strided_offsets<I>(i, p.ndim, p.shape, p.a_strides, p.b_strides, oa, ob);
    out[i] = narrow<T>(apply_binary<op>(widen(a[oa]), widen(b[ob])));
  }
}

// out[i] = op(a[i], b[i]), all contiguous and 16-byte aligned, over 16-byte packs; the tail of
// n % V elements by the first threads.
template <typename T, BinaryOp op>
__global__ void binary_vec_kernel(T* __restrict__ out, const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  using P = Pack16<T>;
  const int64_t packs = n / P::kSize, tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = tid; i < packs; i += stride) {
    P x = reinterpret_cast<const P*>(a)[i];
    const P y = reinterpret_cast<const P*>(b)[i];
#pragma unroll
    for (int k = 0; k < P::kSize; ++k) x.v[k] = narrow<T>(apply_binary<op>(widen(x.v[k]), widen(y.v[k])));
    reinterpret_cast<P*>(out)[i] = x;
  }
  for (int64_t i = packs * P::kSize + tid; i < n; i += stride)
    out[i] = narrow<T>(apply_binary<op>(widen(a[i]), widen(b[i])));
}

// out = op(a, b) where one operand is contiguous (like out) and the other is broadcast, over
// 16-byte packs of the contiguous one; the innermost extent `inner` is a multiple of the pack.
// The broadcast operand is either
//   constant along the innermost dim (kInnerContig false, stride 0 there: a conv's per-channel
//   bias, a [N, C, 1, 1] time embedding): every pack reads one of its values, or
//   contiguous along it (kInnerContig true, stride 1: a Linear's bias [C] over [rows, C], any row
//   broadcast), with 16-byte aligned rows: every pack reads one pack of it.
// Its offset comes from the outer dims' strides, once per pack.
// kBroadcastA: a is the broadcast operand (op(s, x)); else b is (op(x, s)).
template <typename T, BinaryOp op, bool kBroadcastA, bool kInnerContig>
__global__ void binary_inner_bcast_kernel(BinaryParams p, int64_t inner) {
  using P = Pack16<T>;
  const T* full = static_cast<const T*>(kBroadcastA ? p.b : p.a);
  const T* bcast = static_cast<const T*>(kBroadcastA ? p.a : p.b);
  const int64_t* bstrides = kBroadcastA ? p.a_strides : p.b_strides;
  const int64_t packs = p.numel / P::kSize, stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t q = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; q < packs; q += stride) {
    const int64_t first = q * P::kSize, row0 = first / inner;
    int64_t row = row0, off = 0;
    for (int d = p.ndim - 2; d >= 0; --d) {
      off += (row % p.shape[d]) * bstrides[d];
      row /= p.shape[d];
    }
    P x = reinterpret_cast<const P*>(full)[q];
    if constexpr (kInnerContig) {
      const P s = *reinterpret_cast<const P*>(bcast + off + (first - row0 * inner));
#pragma unroll
      for (int k = 0; k < P::kSize; ++k)
        x.v[k] = narrow<T>(kBroadcastA ? apply_binary<op>(widen(s.v[k]), widen(x.v[k]))
                                       : apply_binary<op>(widen(x.v[k]), widen(s.v[k])));
    } else {
      const compute_t<T> s = widen(bcast[off]);
#pragma unroll
      for (int k = 0; k < P::kSize; ++k)
        x.v[k] = narrow<T>(kBroadcastA ? apply_binary<op>(s, widen(x.v[k])) : apply_binary<op>(widen(x.v[k]), s));
    }
    reinterpret_cast<P*>(p.out)[q] = x;
  }
}

template <BinaryOp op> using BinaryTag = std::integral_constant<BinaryOp, op>;

template <typename F>
void dispatch_binary_op(BinaryOp op, F&& f) {
  switch (op) {
    case BinaryOp::Add: f(BinaryTag<BinaryOp::Add>{}); return;
    case BinaryOp::Sub: f(BinaryTag<BinaryOp::Sub>{}); return;
    case BinaryOp::Mul: f(BinaryTag<BinaryOp::Mul>{}); return;
    case BinaryOp::Div: f(BinaryTag<BinaryOp::Div>{}); return;
    case BinaryOp::Max: f(BinaryTag<BinaryOp::Max>{}); return;
    case BinaryOp::Min: f(BinaryTag<BinaryOp::Min>{}); return;
  }
  LOOM_FAIL("cuda binary: unknown BinaryOp ", int(op));
}

// ---- copy and fill -------------------------------------------------------------------

// dst[i] = cast(src[i]), both contiguous. kVec: both aligned to their 4-element packs; packs of
// 4 per thread, the tail of n % 4 by the first threads.
template <typename Dst, typename Src, bool kVec>
__global__ void convert_kernel(Dst* __restrict__ dst, const Src* __restrict__ src, int64_t n) {
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, stride = int64_t(gridDim.x) * blockDim.x;
  int64_t done = 0;
  if constexpr (kVec) {
    using PS = PackN<Src, 4>;
    using PD = PackN<Dst, 4>;
    const int64_t packs = n / 4;
    for (int64_t i = tid; i < packs; i += stride) {
      const PS x = reinterpret_cast<const PS*>(src)[i];
      PD y;
#pragma unroll
      for (int k = 0; k < 4; ++k) y.v[k] = convert<Dst>(x.v[k]);
      reinterpret_cast<PD*>(dst)[i] = y;
    }
    done = packs * 4;
  }
  for (int64_t i = done + tid; i < n; i += stride) dst[i] = convert<Dst>(src[i]);
}

// dst[idx] = cast(src[idx]) over p.shape with both operands strided; index type I (see
// strided_offsets).
template <typename Dst, typename Src, typename I>
__global__ void strided_copy_kernel(CopyParams p) {
  Dst* dst = static_cast<Dst*>(p.dst);
  const Src* src = static_cast<const Src*>(p.src);
  const I n = I(p.numel);
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
    I od, os;
    strided_offsets<I>(i, p.ndim, p.shape, p.dst_strides, p.src_strides, od, os);
    dst[od] = convert<Dst>(src[os]);
  }
}

// A batch of transposes: dst [B, R, S] contiguous, src element (b, r, s) at b·sb + r + s·ss (the
// permutes NCHW <-> NHWC of the spatial transformers). A 32×32 tile goes through shared memory so
// that both the reads (along r) and the writes (along s) are coalesced. Grid (S/32, R/32, B),
// block (32, 8).
template <typename Dst, typename Src>
__global__ void transpose_copy_kernel(Dst* __restrict__ dst, const Src* __restrict__ src, int64_t R, int64_t S,
                                      int64_t sb, int64_t ss) {
  __shared__ Src tile[32][33];
  const int64_t b = blockIdx.z, r0 = int64_t(blockIdx.y) * 32, s0 = int64_t(blockIdx.x) * 32;
  for (int j = threadIdx.y; j < 32; j += blockDim.y) {
    const int64_t r = r0 + threadIdx.x, s = s0 + j;
    if (r < R && s < S) tile[j][threadIdx.x] = src[b * sb + r + s * ss];
  }
  __syncthreads();
  for (int j = threadIdx.y; j < 32; j += blockDim.y) {
    const int64_t r = r0 + j, s = s0 + threadIdx.x;
    if (r < R && s < S) dst[(b * R + r) * S + s] = convert<Dst>(tile[threadIdx.x][j]);
  }
}

// dst[i] = value (a bit pattern of the dtype's width), i < n.
template <typename Word>
__global__ void fill_kernel(Word* __restrict__ dst, Word value, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = value;
}

template <typename Word>
void launch_fill_words(void* dst, Word value, int64_t n) {
  fill_kernel<Word><<<grid_for(n), kThreads, 0, compute_stream()>>>(static_cast<Word*>(dst), value, n);
  check_last_launch("fill_kernel");
}

// The copy as a batch of transposes (transpose_copy_kernel) when, after merging, dst is a
// contiguous [B, R, S] (or [R, S]) and src is unit-stride along R but not along S.
struct TransposeShape {
  int64_t batch = 1, rows = 0, cols = 0, src_batch_stride = 0, src_col_stride = 0;
};
bool as_transpose(const CopyParams& p, TransposeShape& t) {
  const int n = p.ndim;
  if (n != 2 && n != 3) return false;
  const int64_t R = p.shape[n - 2], S = p.shape[n - 1];
  if (p.dst_strides[n - 1] != 1 || p.dst_strides[n - 2] != S || p.src_strides[n - 2] != 1 ||
      p.src_strides[n - 1] <= 1 || R < 8 || S < 8)
    return false;
  if (n == 3) {
    if (p.dst_strides[0] != R * S || p.shape[0] > 65535 || p.src_strides[0] < 0) return false;
    t.batch = p.shape[0], t.src_batch_stride = p.src_strides[0];
  }
  t.rows = R, t.cols = S, t.src_col_stride = p.src_strides[n - 1];
  return (R + 31) / 32 <= 65535;
}

// Whether every linear index below numel (plus a grid stride past it) and every element offset
// of the strided operands fits in 31 bits, so the kernels may use 32-bit index math.
bool fits_32bit(int64_t numel, int ndim, const int64_t* shape, const int64_t* s0, const int64_t* s1) {
  constexpr int64_t kLimit = int64_t(1) << 31;
  if (numel + int64_t(grid_for(numel)) * kThreads >= kLimit) return false;
  int64_t max0 = 0, max1 = 0;
  for (int d = 0; d < ndim; ++d) {
    if (s0[d] < 0 || s1[d] < 0) return false;
    max0 += (shape[d] - 1) * s0[d];
    max1 += (shape[d] - 1) * s1[d];
  }
  return max0 < kLimit && max1 < kLimit;
}

}  // namespace

// ---- launchers -------------------------------------------------------------------------

void launch_copy(const CopyParams& p) {
  if (p.numel == 0) return;
  LOOM_CHECK(p.ndim >= 1 && p.ndim <= kMaxDims, "cuda copy: ", p.ndim, " dims after merging exceed the limit of ",
             kMaxDims);
  const bool contiguous = p.ndim == 1 && p.dst_strides[0] == 1 && p.src_strides[0] == 1;
  if (contiguous && p.dst_dtype == p.src_dtype) {
    LOOM_CUDA_CHECK(cudaMemcpyAsync(p.dst, p.src, size_t(p.numel) * itemsize(p.dst_dtype),
                                    cudaMemcpyDeviceToDevice, compute_stream()));
    return;
  }
  // Rows of contiguous runs on both sides (a concatenation along the channels, a row slice), one
  // dtype: the copy engine's 2-D copy, at the memory's rate, where the element kernel does index
  // math per element.
  if (p.ndim == 2 && p.dst_dtype == p.src_dtype && p.dst_strides[1] == 1 && p.src_strides[1] == 1 &&
      p.dst_strides[0] >= p.shape[1] && p.src_strides[0] >= p.shape[1] &&
      (p.dst_strides[0] | p.src_strides[0]) < (int64_t(1) << 28)) {  // pitches well inside the API's limit
    const size_t item = itemsize(p.dst_dtype);
    LOOM_CUDA_CHECK(cudaMemcpy2DAsync(p.dst, size_t(p.dst_strides[0]) * item, p.src, size_t(p.src_strides[0]) * item,
                                      size_t(p.shape[1]) * item, size_t(p.shape[0]), cudaMemcpyDeviceToDevice,
                                      compute_stream()));
    return;
  }
  dispatch_all(p.dst_dtype, "cuda copy", [&](auto dst_tag) {
    using Dst = decltype(dst_tag);
    dispatch_all(p.src_dtype, "cuda copy", [&](auto src_tag) {
      using Src = decltype(src_tag);
      if (contiguous) {
        const bool vec = reinterpret_cast<uintptr_t>(p.dst) % (4 * sizeof(Dst)) == 0 &&
                         reinterpret_cast<uintptr_t>(p.src) % (4 * sizeof(Src)) == 0;
        if (vec)
          convert_kernel<Dst, Src, true><<<grid_for(p.numel / 4 + 1), kThreads, 0, compute_stream()>>>(static_cast<Dst*>(p.dst),
                                                                                 static_cast<const Src*>(p.src), p.numel);
        else
          convert_kernel<Dst, Src, false><<<grid_for(p.numel), kThreads, 0, compute_stream()>>>(static_cast<Dst*>(p.dst),
                                                                           static_cast<const Src*>(p.src), p.numel);
        check_last_launch("convert_kernel");
      } else if (TransposeShape t; as_transpose(p, t)) {
        const dim3 grid(unsigned((t.cols + 31) / 32), unsigned((t.rows + 31) / 32), unsigned(t.batch));
        transpose_copy_kernel<Dst, Src><<<grid, dim3(32, 8), 0, compute_stream()>>>(static_cast<Dst*>(p.dst),
                                                               static_cast<const Src*>(p.src), t.rows, t.cols,
                                                               t.src_batch_stride, t.src_col_stride);
        check_last_launch("transpose_copy_kernel");
      } else {
        if (fits_32bit(p.numel, p.ndim, p.shape, p.dst_strides, p.src_strides))
          strided_copy_kernel<Dst, Src, uint32_t><<<grid_for(p.numel), kThreads, 0, compute_stream()>>>(p);
        else
          strided_copy_kernel<Dst, Src, int64_t><<<grid_for(p.numel), kThreads, 0, compute_stream()>>>(p);
        check_last_launch("strided_copy_kernel");
      }
    });
  });
}

void launch_fill(const FillParams& p) {
  if (p.numel == 0) return;
  const size_t nbytes = size_t(p.numel) * itemsize(p.dtype);
  if (p.value == 0.0 && !std::signbit(p.value)) {  // +0 is all-zero bits in every dtype
    LOOM_CUDA_CHECK(cudaMemsetAsync(p.dst, 0, nbytes, compute_stream()));
    return;
  }
  // The value is converted on the host with loom's own conversions, so a fill
  // stores the same bits as on the CPU.
  switch (p.dtype) {
    case DType::F32: {
      const float v = float(p.value);
      uint32_t w;
      std::memcpy(&w, &v, 4);
      launch_fill_words<uint32_t>(p.dst, w, p.numel);
      return;
    }
    case DType::F64: {
      uint64_t w;
      std::memcpy(&w, &p.value, 8);
      launch_fill_words<uint64_t>(p.dst, w, p.numel);
      return;
    }
    case DType::BF16: launch_fill_words<uint16_t>(p.dst, bf16(float(p.value)).bits, p.numel); return;
    case DType::F16: launch_fill_words<uint16_t>(p.dst, f16(float(p.value)).bits, p.numel); return;
    case DType::I64: {  // truncation, saturation, NaN -> 0, as on the CPU
      const int64_t v = p.value != p.value ? 0
                        : p.value >= kTwo63 ? INT64_MAX
                        : p.value <= -kTwo63 ? INT64_MIN
                                             : int64_t(p.value);
      uint64_t w;
      std::memcpy(&w, &v, 8);
      launch_fill_words<uint64_t>(p.dst, w, p.numel);
      return;
    }
  }
  LOOM_FAIL("cuda fill: unknown dtype ", int(p.dtype));
}

void launch_unary(const UnaryParams& p) {
  if (p.numel == 0) return;
  dispatch_float(p.dtype, "cuda unary", [&](auto tag) {
    using T = decltype(tag);
    dispatch_unary_op(p.op, [&](auto op_tag) {
      constexpr UnaryOp op = decltype(op_tag)::value;
      if (aligned16(p.out) && aligned16(p.in)) {
        unary_vec_kernel<T, op><<<grid_for(p.numel / Pack16<T>::kSize + 1), kThreads, 0, compute_stream()>>>(
            static_cast<T*>(p.out), static_cast<const T*>(p.in), p.numel, p.scalar);
      } else {
        unary_kernel<T, op><<<grid_for(p.numel), kThreads, 0, compute_stream()>>>(static_cast<T*>(p.out), static_cast<const T*>(p.in),
                                                             p.numel, p.scalar);
      }
      check_last_launch("unary_kernel");
    });
  });
}

// A merged binary problem's 16-byte broadcast path (binary_inner_bcast_kernel): which operand is
// broadcast ('a', 'b', or 0 for none) while the other is contiguous and aligned, and whether the
// broadcast one is contiguous along the innermost dim (else constant along it).
struct InnerBroadcast {
  char side = 0;
  bool inner_contig = false;
};

static InnerBroadcast inner_broadcast_of(const BinaryParams& p, int pack) {
  if (p.ndim < 1 || p.shape[p.ndim - 1] % pack != 0 || !aligned16(p.out)) return {};
  auto contiguous = [&](const int64_t* s) {
    int64_t want = 1;
    for (int d = p.ndim - 1; d >= 0; --d) {
      if (p.shape[d] != 1 && s[d] != want) return false;
      want *= p.shape[d];
    }
    return true;
  };
  // the broadcast operand: stride 0 along the innermost dim, or stride 1 with every row offset a
  // whole number of 16-byte packs (outer strides multiples of the pack, base aligned)
  auto broadcast_kind = [&](const int64_t* s, const void* base) -> int {
    if (s[p.ndim - 1] == 0) return 1;
    if (s[p.ndim - 1] != 1 || !aligned16(base)) return 0;
    for (int d = 0; d + 1 < p.ndim; ++d)
      if (p.shape[d] != 1 && s[d] % pack != 0) return 0;
    return 2;
  };
  if (contiguous(p.a_strides) && aligned16(p.a))
    if (const int k = broadcast_kind(p.b_strides, p.b)) return {'b', k == 2};
  if (contiguous(p.b_strides) && aligned16(p.b))
    if (const int k = broadcast_kind(p.a_strides, p.a)) return {'a', k == 2};
  return {};
}

// The launch's name for check_last_launch and LOOM_CUDA_PROFILE: op and path (the contiguous
// 16-byte vector path, the 16-byte broadcast path, or the strided one).
enum class BinaryPath { Vector, Broadcast, Strided };

static const char* binary_launch_name(BinaryOp op, BinaryPath path) {
  static const char* const names[6][3] = {
      {"binary_kernel add", "binary_kernel add (broadcast)", "binary_kernel add (strided)"},
      {"binary_kernel sub", "binary_kernel sub (broadcast)", "binary_kernel sub (strided)"},
      {"binary_kernel mul", "binary_kernel mul (broadcast)", "binary_kernel mul (strided)"},
      {"binary_kernel div", "binary_kernel div (broadcast)", "binary_kernel div (strided)"},
      {"binary_kernel max", "binary_kernel max (broadcast)", "binary_kernel max (strided)"},
      {"binary_kernel min", "binary_kernel min (broadcast)", "binary_kernel min (strided)"}};
  int row = 0;
  switch (op) {
    case BinaryOp::Add: row = 0; break;
    case BinaryOp::Sub: row = 1; break;
    case BinaryOp::Mul: row = 2; break;
    case BinaryOp::Div: row = 3; break;
    case BinaryOp::Max: row = 4; break;
    case BinaryOp::Min: row = 5; break;
  }
  return names[row][int(path)];
}

template <typename T, BinaryOp op, bool kBroadcastA>
static void launch_inner_bcast(const BinaryParams& p, bool inner_contig) {
  const int64_t inner = p.shape[p.ndim - 1];
  const unsigned grid = grid_for(p.numel / Pack16<T>::kSize);
  if (inner_contig)
    binary_inner_bcast_kernel<T, op, kBroadcastA, true><<<grid, kThreads, 0, compute_stream()>>>(p, inner);
  else
    binary_inner_bcast_kernel<T, op, kBroadcastA, false><<<grid, kThreads, 0, compute_stream()>>>(p, inner);
}

void launch_binary(const BinaryParams& p) {
  if (p.numel == 0) return;
  LOOM_CHECK(p.ndim >= 1 && p.ndim <= kMaxDims, "cuda binary: ", p.ndim,
             " dims after merging exceed the limit of ", kMaxDims);
  if (launch_add_transposed(p)) return;
  const bool contiguous = p.ndim == 1 && p.a_strides[0] == 1 && p.b_strides[0] == 1;
  dispatch_float(p.dtype, "cuda binary", [&](auto tag) {
    using T = decltype(tag);
    dispatch_binary_op(p.op, [&](auto op_tag) {
      constexpr BinaryOp op = decltype(op_tag)::value;
      const bool vec = contiguous && aligned16(p.out) && aligned16(p.a) && aligned16(p.b);
      const InnerBroadcast bc = vec ? InnerBroadcast{} : inner_broadcast_of(p, Pack16<T>::kSize);
      if (bc.side) {
        if (bc.side == 'a') launch_inner_bcast<T, op, true>(p, bc.inner_contig);
        else launch_inner_bcast<T, op, false>(p, bc.inner_contig);
        check_last_launch(binary_launch_name(op, BinaryPath::Broadcast));
        return;
      }
      if (vec) {
        binary_vec_kernel<T, op><<<grid_for(p.numel / Pack16<T>::kSize + 1), kThreads, 0, compute_stream()>>>(
            static_cast<T*>(p.out), static_cast<const T*>(p.a), static_cast<const T*>(p.b), p.numel);
      } else if (fits_32bit(p.numel, p.ndim, p.shape, p.a_strides, p.b_strides)) {
        binary_kernel<T, op, uint32_t><<<grid_for(p.numel), kThreads, 0, compute_stream()>>>(p);
      } else {
        binary_kernel<T, op, int64_t><<<grid_for(p.numel), kThreads, 0, compute_stream()>>>(p);
      }
      check_last_launch(binary_launch_name(op, vec ? BinaryPath::Vector : BinaryPath::Strided));
    });
  });
}

}  // namespace loom::cuda
