// Implicit-GEMM 2-D convolution on tensor cores: bf16 / f16 storage, mma.sync m16n8k16 with f32
// accumulators, NCHW in and out, any kernel size / stride / padding, dilation 1, groups 1.
// Contract: Conv2dArgs / Conv2dInputGradArgs (tensor/backend.h); parameters: cuda_conv_igemm.h.
//
// GEMM view (nothing of size K × P is ever stored):
//   M = O output channels, N = P = batch·oh·ow pixels, p = (n·oh + oy)·ow + ox, K = C·kh·kw,
//   k = (c·kh + i)·kw + j;  y[n, o, oy, ox] = Σ_k A[o, k]·B[k, p] + bias[o] with
//   A = w viewed row-major [O, K] and B[k, p] = x[n, c, oy·sh + i − ph, ox·sw + j − pw] (0 outside).
// Block: 128 channels × 128 pixels, 8 warps as 2 (M) × 4 (N), warp tile 64 × 32 (4 × 4 mma per
// 16 of K); K in tiles of 32 through two shared-memory stages (tile t + 1 is fetched while tile t
// is multiplied, one __syncthreads per tile):
//   A [128][32] (row stride 40): cp.async 16 B when K % 8 == 0 and w is 16-byte aligned (a chunk
//     of 8 is then wholly inside or outside K); otherwise plain loads staged in registers.
//     Rows ≥ O and columns ≥ K are zero.
//   B [32][128] (row stride 136), k-major: gathered through registers. Each thread owns one pixel
//     column (decoded once) and 16 consecutive k of the tile (the tap (c, i, j) advanced
//     incrementally, one division per tile); it loads them, zero outside the image / K / P, while
//     the other stage is multiplied and stores them afterwards.
// Fragments come from shared memory through ldmatrix (A: row-major [m][k]; B: .trans of [k][n]),
// the helpers of cuda_flash_tc.cuh. The padded row strides put the 8 rows of one ldmatrix matrix
// into distinct bank groups.
// Epilogue: accumulators + bias (f32) rounded once to T into shared memory [128][136], then each
// thread writes its pixel column down the 128 channels (a warp writes 32 consecutive pixels).
//
// The input gradient for stride 1 is the same kernel on dy with the flipped, transposed weight
// w'[c, o, i, j] = w[o, c, kh−1−i, kw−1−j] (flip_weight_kernel) and padding k − 1 − pad.
#include <cstdint>
#include <initializer_list>
#include <string>

#include "tensor/cuda/cuda_conv_igemm.h"
#include "tensor/cuda/cuda_flash_tc.cuh"

namespace loom::cuda {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 32;          // block tile: channels, pixels, K step
constexpr int kLdA = kBK + 8, kLdB = kBN + 8, kLdC = kBN + 8;  // shared-memory row strides (elements)
constexpr int kConvThreads = 256;                       // 8 warps: 2 along M × 4 along N
constexpr int kWarpM = 64, kWarpN = 32;                 // warp tile
constexpr int kKPerThread = kBK * kBN / kConvThreads;   // B elements gathered per thread and tile (16)
constexpr int kAPerThread = kBM * kBK / kConvThreads;   // A elements per thread and tile, plain path (16)
constexpr int kStageA = kBM * kLdA, kStageB = kBK * kLdB;  // elements per stage
constexpr int kSmemBytes = 2 * (kStageA + kStageB) * 2;   // 37 888 bytes
static_assert(kBM * kLdC * 2 <= kSmemBytes, "the epilogue tile reuses the pipeline's shared memory");
static_assert(kBN * (kConvThreads / kBN) * kKPerThread == kBN * kBK, "B gather covers the tile");

// The pixel column a thread gathers (and writes in the epilogue): p = p0 + tid % kBN.
struct Pixel {
  int64_t x_off = 0;            // n·C·H·W + iy0·W + ix0 (iy0 = oy·sh − ph, ix0 = ox·sw − pw): x's offset
                                // of tap (c, i, j) is x_off + c·H·W + i·W + j (read only inside the image)
  int64_t y_off = 0;            // n·O·oh·ow + oy·ow + ox: the pixel's offset in y at channel 0
  uint32_t rows = 0, cols = 0;  // bit i: 0 ≤ iy0 + i < H; bit j: 0 ≤ ix0 + j < W; both 0 when p ≥ P
  bool ok = false;              // p < P
};

// kernel_h, kernel_w ≤ 32 (the masks' bits; checked by the host).
__device__ __forceinline__ Pixel decode_pixel(const ConvGemmParams& p, int pix) {
  Pixel px;
  const int ohw = p.out_h * p.out_w;
  px.ok = pix < p.batch * ohw;
  if (!px.ok) return px;
  const int n = pix / ohw, q = pix - n * ohw, oy = q / p.out_w, ox = q - oy * p.out_w;
  const int iy0 = oy * p.stride_h - p.pad_h, ix0 = ox * p.stride_w - p.pad_w;
  px.x_off = int64_t(n) * p.channels * p.height * p.width + int64_t(iy0) * p.width + ix0;
  px.y_off = int64_t(n) * p.out_channels * ohw + q;
  for (int i = 0; i < p.kernel_h; ++i) px.rows |= uint32_t(unsigned(iy0 + i) < unsigned(p.height)) << i;
  for (int j = 0; j < p.kernel_w; ++j) px.cols |= uint32_t(unsigned(ix0 + j) < unsigned(p.width)) << j;
  return px;
}

// Element e of 16-bit values packed two per register (e even: low half).
__device__ __forceinline__ uint16_t unpack16(const uint32_t* v, int e) {
  return uint16_t(e % 2 == 0 ? v[e / 2] : v[e / 2] >> 16);
}

// B[k, p] for k = k0 … k0 + 15 of this thread's pixel, zero outside the image, K or P; packed
// two per register: element e in the low (e even) or high half of v[e / 2]. The tap (c, i, j)
// of k and its offset c·H·W + i·W + j advance incrementally; the offset is unsigned, so that it
// may wrap past the image where nothing is read (inside, it is < C·H·W < 2^31).
template <bool kPointwise>
__device__ __forceinline__ void gather_b(uint32_t* v, const ConvGemmParams& p, const uint16_t* x, const Pixel& px,
                                         int k0) {
  const int C = p.channels, W = p.width, kh = p.kernel_h, kw = p.kernel_w;
  const uint32_t hw = uint32_t(p.height) * uint32_t(W);
  int c = k0, i = 0, j = 0;
  if constexpr (!kPointwise) {
    const int kk = kh * kw;
    c = k0 / kk;
    const int r = k0 - c * kk;
    i = r / kw;
    j = r - i * kw;
  }
  uint32_t off = uint32_t(c) * hw + uint32_t(i * W + j);
  const uint32_t row_step = uint32_t(W - kw), plane_step = hw - uint32_t(kh) * uint32_t(W);
#pragma unroll
  for (int e = 0; e < kKPerThread; ++e) {
    const bool in = c < C && ((px.rows >> i) & (px.cols >> j) & 1u);
    const uint32_t u = in ? __ldg(x + (px.x_off + int64_t(off))) : uint16_t(0);
    v[e / 2] = e % 2 == 0 ? u : v[e / 2] | (u << 16);
    if constexpr (kPointwise) {
      ++c, off += hw;
    } else {
      ++j, ++off;
      if (j == kw) {
        j = 0, off += row_step;
        if (++i == kh) i = 0, off += plane_step, ++c;
      }
    }
  }
}

// A tile rows m0 …, columns k0 … through cp.async (K % 8 == 0, w 16-byte aligned): 2 chunks of 8 per thread.
__device__ __forceinline__ void load_a_async(uint16_t* sA, const uint16_t* w, int m0, int k0, int O, int K, int tid) {
#pragma unroll
  for (int r = 0; r < kBM * kBK / 8 / kConvThreads; ++r) {
    const int idx = tid + r * kConvThreads, row = idx / (kBK / 8), kc = (idx % (kBK / 8)) * 8;
    const bool in = m0 + row < O && k0 + kc < K;
    cp_async16(sA + row * kLdA + kc, in ? w + int64_t(m0 + row) * K + k0 + kc : w, in);
  }
}

// The plain path: element (row tid / 32 + 8r, column tid % 32) of the A tile into v (packed as gather_b's).
__device__ __forceinline__ void load_a_regs(uint32_t* v, const uint16_t* w, int m0, int k0, int O, int K, int tid) {
  const int row0 = tid / kBK, kq = tid % kBK;
#pragma unroll
  for (int r = 0; r < kAPerThread; ++r) {
    const int row = row0 + r * (kConvThreads / kBK);
    const bool in = m0 + row < O && k0 + kq < K;
    const uint32_t u = in ? __ldg(w + int64_t(m0 + row) * K + k0 + kq) : uint16_t(0);
    v[r / 2] = r % 2 == 0 ? u : v[r / 2] | (u << 16);
  }
}
__device__ __forceinline__ void store_a_regs(uint16_t* sA, const uint32_t* v, int tid) {
  const int row0 = tid / kBK, kq = tid % kBK;
#pragma unroll
  for (int r = 0; r < kAPerThread; ++r) sA[(row0 + r * (kConvThreads / kBK)) * kLdA + kq] = unpack16(v, r);
}
// B values (packed by gather_b) into column `col`, rows krow … of a B stage.
__device__ __forceinline__ void store_b_regs(uint16_t* sB, const uint32_t* v, int krow, int col) {
#pragma unroll
  for (int e = 0; e < kKPerThread; ++e) sB[(krow + e) * kLdB + col] = unpack16(v, e);
}

// acc += A tile · B tile of one stage (two k16 steps) for this warp's 64 × 32.
template <typename T>
__device__ __forceinline__ void multiply_stage(float (&acc)[4][4][4], const T* sA, const T* sB, int wm, int wn,
                                               int lane) {
#pragma unroll
  for (int kk = 0; kk < kBK / 16; ++kk) {
    uint32_t af[4][4];
#pragma unroll
    for (int a = 0; a < 4; ++a) ldsm_a(af[a], sA, wm * kWarpM + a * 16, kk * 16, kLdA, lane);
#pragma unroll
    for (int bp = 0; bp < 2; ++bp) {
      uint32_t b[4];
      ldsm_b_trans_pair(b, sB, kk * 16, wn * kWarpN + bp * 16, kLdB, lane);
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        mma16816(acc[a][2 * bp], af[a], b, T());
        mma16816(acc[a][2 * bp + 1], af[a], b + 2, T());
      }
    }
  }
}

// Grid: x = (pixel tile of kBN)·(channel tiles) + channel tile of kBM. kVecA: A through cp.async (then two
// blocks per SM, ≤ 128 registers without spills; the plain path needs more and runs one).
// kPointwise: a 1×1 kernel (k = c).
template <typename T, bool kVecA, bool kPointwise>
__global__ void __launch_bounds__(kConvThreads, kVecA ? 2 : 1) conv_igemm_kernel(const ConvGemmParams p) {
  __shared__ __align__(16) unsigned char smem[kSmemBytes];
  uint16_t* sA = reinterpret_cast<uint16_t*>(smem);  // [2][kBM][kLdA]
  uint16_t* sB = sA + 2 * kStageA;                   // [2][kBK][kLdB]

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / (kBN / kWarpN), wn = warp % (kBN / kWarpN);
  const int O = p.out_channels, K = p.channels * p.kernel_h * p.kernel_w;
  const int m_tiles = (O + kBM - 1) / kBM;  // channel tiles vary fastest: blocks that share x run together
  const int m0 = int(blockIdx.x % unsigned(m_tiles)) * kBM, p0 = int(blockIdx.x / unsigned(m_tiles)) * kBN;
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const uint16_t* w = static_cast<const uint16_t*>(p.w);

  const bool warp_rows = m0 + wm * kWarpM < O;                  // this warp has channels to compute
  const int col = tid % kBN, krow = (tid / kBN) * kKPerThread;  // this thread's B column and k rows
  const Pixel px = decode_pixel(p, p0 + col);

  float acc[4][4][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b][0] = acc[a][b][1] = acc[a][b][2] = acc[a][b][3] = 0.f;

  const int tiles = (K + kBK - 1) / kBK;
  uint32_t bv[kKPerThread / 2], av[kVecA ? 1 : kAPerThread / 2];
  if (tiles > 0) {
    if constexpr (kVecA) {
      load_a_async(sA, w, m0, 0, O, K, tid);
    } else {
      load_a_regs(av, w, m0, 0, O, K, tid);
      store_a_regs(sA, av, tid);
    }
    gather_b<kPointwise>(bv, p, x, px, krow);
    store_b_regs(sB, bv, krow, col);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
  }
  for (int t = 0; t < tiles; ++t) {
    const int st = t & 1, k_next = (t + 1) * kBK;
    const bool more = t + 1 < tiles;
    uint16_t* sA_next = sA + (st ^ 1) * kStageA;
    uint16_t* sB_next = sB + (st ^ 1) * kStageB;
    if (more) {  // stage st ^ 1 was last read before the previous iteration's __syncthreads
      if constexpr (kVecA) load_a_async(sA_next, w, m0, k_next, O, K, tid);
      else load_a_regs(av, w, m0, k_next, O, K, tid);
      gather_b<kPointwise>(bv, p, x, px, k_next + krow);
    }
    cp_async_commit();
    if (warp_rows)  // a warp whose 64 rows all lie at or beyond O (the last channel tile) only loads
      multiply_stage<T>(acc, reinterpret_cast<const T*>(sA + st * kStageA),
                        reinterpret_cast<const T*>(sB + st * kStageB), wm, wn, lane);
    if (more) {
      if constexpr (!kVecA) store_a_regs(sA_next, av, tid);
      store_b_regs(sB_next, bv, krow, col);
    }
    cp_async_wait_all();
    __syncthreads();  // stage st ^ 1 complete for every thread; every warp is done with stage st
  }

  // Epilogue: (acc + bias) -> T in shared memory [kBM][kLdC] (the pipeline's stages are free:
  // the loop ended with __syncthreads), then pixel column `col` down the block's channels.
  const T* bias = static_cast<const T*>(p.bias);
  T* sC = reinterpret_cast<T*>(smem);
  const int g = lane / 4, tq = lane % 4;
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = wm * kWarpM + a * 16 + g + 8 * h;
      const float b = bias && m0 + row < O ? Half2<T>::to_float(bias[m0 + row]) : 0.f;
#pragma unroll
      for (int nb = 0; nb < 4; ++nb) {
        const int c0 = wn * kWarpN + nb * 8 + 2 * tq;
        *reinterpret_cast<uint32_t*>(sC + row * kLdC + c0) =
            Half2<T>::pack(acc[a][nb][2 * h] + b, acc[a][nb][2 * h + 1] + b);
      }
    }
  }
  __syncthreads();
  if (!px.ok) return;
  const int64_t ohw = int64_t(p.out_h) * p.out_w;
  T* y = static_cast<T*>(p.y) + px.y_off;
  const int rows = min(kBM, O - m0);
  for (int row = tid / kBN; row < rows; row += kConvThreads / kBN) y[(m0 + row) * ohw] = sC[row * kLdC + col];
}

// wt [C, O, kh, kw] from w [O, C, kh, kw]: wt[c, o, i, j] = w[o, c, kh−1−i, kw−1−j]; grid-stride over wt.
__global__ void flip_weight_kernel(uint16_t* __restrict__ wt, const uint16_t* __restrict__ w, int O, int C, int kh,
                                   int kw) {
  const int total = O * C * kh * kw;
  for (int idx = blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += gridDim.x * blockDim.x) {
    const int j = idx % kw, i = (idx / kw) % kh, o = (idx / (kw * kh)) % O, c = idx / (kw * kh * O);
    wt[idx] = w[((o * C + c) * kh + (kh - 1 - i)) * kw + (kw - 1 - j)];
  }
}

template <typename T, bool kVecA, bool kPointwise>
void launch_typed(const ConvGemmParams& p, dim3 grid) {
  conv_igemm_kernel<T, kVecA, kPointwise><<<grid, kConvThreads, 0, compute_stream()>>>(p);
  check_last_launch("conv_igemm_kernel");
}

template <typename T>
void launch_for(const ConvGemmParams& p, dim3 grid, bool vec_a, bool pointwise) {
  if (vec_a) {
    if (pointwise) launch_typed<T, true, true>(p, grid);
    else launch_typed<T, true, false>(p, grid);
  } else {
    if (pointwise) launch_typed<T, false, true>(p, grid);
    else launch_typed<T, false, false>(p, grid);
  }
}

}  // namespace

void launch_conv_igemm(const ConvGemmParams& p) {
  const int64_t pixels = int64_t(p.batch) * p.out_h * p.out_w;
  if (pixels == 0 || p.out_channels == 0) return;
  const int64_t K = int64_t(p.channels) * p.kernel_h * p.kernel_w;
  const bool vec_a = K % 8 == 0 && reinterpret_cast<uintptr_t>(p.w) % 16 == 0;
  const bool pointwise = p.kernel_h == 1 && p.kernel_w == 1;
  const dim3 grid(unsigned((pixels + kBN - 1) / kBN * ((p.out_channels + kBM - 1) / kBM)));
  if (p.dtype == DType::BF16) return launch_for<__nv_bfloat16>(p, grid, vec_a, pointwise);
  if (p.dtype == DType::F16) return launch_for<__half>(p, grid, vec_a, pointwise);
  LOOM_FAIL("cuda conv2d (implicit GEMM): dtype ", p.dtype, " is not bf16 / f16");
}

void launch_conv_flip_weight(void* wt, const void* w, int out_channels, int channels, int kh, int kw) {
  const int64_t total = int64_t(out_channels) * channels * kh * kw;
  if (total == 0) return;
  flip_weight_kernel<<<grid_for(total), kThreads, 0, compute_stream()>>>(
      static_cast<uint16_t*>(wt), static_cast<const uint16_t*>(w), out_channels, channels, kh, kw);
  check_last_launch("flip_weight_kernel");
}


namespace {

// 32-bit index math: each of these products must stay below 2^31 (minus a tile, for p0 + column),
// and so must the number of blocks.
void check_int32(const char* op, const Im2ColArgs& g, int64_t out_channels) {
  constexpr int64_t kLimit = (int64_t(1) << 31) - kBN;
  const int64_t ohw = g.out_h * g.out_w, kk = g.kernel_h * g.kernel_w;
  LOOM_CHECK(g.batch * ohw < kLimit && g.channels * g.height * g.width < kLimit && out_channels * ohw < kLimit &&
                 out_channels * g.channels * kk < (int64_t(1) << 30) &&
                 (g.batch * ohw + kBN - 1) / kBN * ((out_channels + kBM - 1) / kBM) < kLimit,
             op, ": sizes too large for the implicit-GEMM kernel (input [", g.batch, ", ", g.channels, ", ", g.height,
             ", ", g.width, "], ", out_channels, " output channels, kernel ", g.kernel_h, "x", g.kernel_w, ")");
}

// The CUDA device of x; every other defined tensor must be on it, contiguous and of x's dtype (bf16 / f16).
int conv_device(const char* op, const Tensor& x, std::initializer_list<const Tensor*> others) {
  LOOM_CHECK(x.defined() && x.device().is_cuda(), op, ": input is not a CUDA tensor");
  LOOM_CHECK(x.dtype() == DType::BF16 || x.dtype() == DType::F16, op, ": dtype ", x.dtype(),
             " is not supported (bf16, f16)");
  LOOM_CHECK(x.is_contiguous(), op, ": input ", x.str(), " is not contiguous");
  for (const Tensor* t : others) {
    if (!t->defined()) continue;
    LOOM_CHECK(t->device() == x.device() && t->dtype() == x.dtype(), op, ": tensor ", t->str(),
               " differs from the input ", x.str(), " in device or dtype");
    LOOM_CHECK(t->is_contiguous(), op, ": tensor ", t->str(), " is not contiguous");
  }
  return x.device().index;
}

ConvGemmParams gemm_params(const Im2ColArgs& g, int64_t out_channels, DType dtype) {
  ConvGemmParams p;
  p.dtype = dtype;
  p.batch = int(g.batch), p.channels = int(g.channels), p.height = int(g.height), p.width = int(g.width);
  p.out_channels = int(out_channels), p.kernel_h = int(g.kernel_h), p.kernel_w = int(g.kernel_w);
  p.stride_h = int(g.stride_h), p.stride_w = int(g.stride_w), p.pad_h = int(g.pad_h), p.pad_w = int(g.pad_w);
  p.out_h = int(g.out_h), p.out_w = int(g.out_w);
  return p;
}

}  // namespace

void conv2d_implicit_gemm(const Conv2dArgs& a) {
  constexpr const char* op = "cuda conv2d (implicit GEMM)";
  const int device = conv_device(op, a.x, {&a.w, &a.bias, &a.y});
  const Im2ColArgs& g = a.geo;
  LOOM_CHECK(g.dilation_h == 1 && g.dilation_w == 1, op, ": dilation ", g.dilation_h, ",", g.dilation_w,
             " is not supported (1 only)");
  LOOM_CHECK(g.kernel_h <= kConv2dMaxKernel && g.kernel_w <= kConv2dMaxKernel, op, ": kernel ", g.kernel_h, "x", g.kernel_w,
             " is larger than ", kConv2dMaxKernel, "x", kConv2dMaxKernel);
  const int64_t O = a.w.defined() ? a.w.size(0) : 0;
  LOOM_CHECK(a.x.shape() == Shape({g.batch, g.channels, g.height, g.width}) &&
                 a.w.shape() == Shape({O, g.channels, g.kernel_h, g.kernel_w}) &&
                 a.y.defined() && a.y.shape() == Shape({g.batch, O, g.out_h, g.out_w}) &&
                 (!a.bias.defined() || a.bias.shape() == Shape({O})),
             op, ": shapes do not match the geometry (x ", a.x.shape(), ", w ", a.w.shape(), ", y ",
             a.y.defined() ? a.y.str() : std::string("undefined"), ")");
  check_int32(op, g, O);
  ConvGemmParams p = gemm_params(g, O, a.x.dtype());
  p.x = a.x.raw_data(), p.w = a.w.raw_data(), p.y = a.y.raw_data();
  p.bias = a.bias.defined() ? a.bias.raw_data() : nullptr;
  DeviceGuard guard(device);
  launch_conv_igemm(p);
}

void conv2d_input_grad_implicit_gemm(const Conv2dInputGradArgs& a) {
  constexpr const char* op = "cuda conv2d_input_grad (implicit GEMM)";
  const int device = conv_device(op, a.dy, {&a.w, &a.dx});
  const Im2ColArgs& g = a.geo;
  LOOM_CHECK(g.dilation_h == 1 && g.dilation_w == 1 && g.stride_h == 1 && g.stride_w == 1 &&
                 g.pad_h <= g.kernel_h - 1 && g.pad_w <= g.kernel_w - 1,
             op, ": needs stride 1, dilation 1 and padding ≤ kernel − 1 (stride ", g.stride_h, ",", g.stride_w,
             ", padding ", g.pad_h, ",", g.pad_w, ", kernel ", g.kernel_h, "x", g.kernel_w, ")");
  LOOM_CHECK(g.kernel_h <= kConv2dMaxKernel && g.kernel_w <= kConv2dMaxKernel, op, ": kernel ", g.kernel_h, "x", g.kernel_w,
             " is larger than ", kConv2dMaxKernel, "x", kConv2dMaxKernel);
  const int64_t O = a.w.defined() ? a.w.size(0) : 0;
  LOOM_CHECK(a.w.shape() == Shape({O, g.channels, g.kernel_h, g.kernel_w}) &&
                 a.dy.shape() == Shape({g.batch, O, g.out_h, g.out_w}) && a.dx.defined() &&
                 a.dx.shape() == Shape({g.batch, g.channels, g.height, g.width}),
             op, ": shapes do not match the geometry (dy ", a.dy.shape(), ", w ", a.w.shape(), ", dx ",
             a.dx.defined() ? a.dx.str() : std::string("undefined"), ")");
  // The forward geometry of dx = conv(dy, w'): input dy [N, O, oh, ow], C output channels, the
  // same kernel, stride 1, padding k − 1 − pad; its output is H × W (oh + kh − 1 − 2·pad_h = H).
  Im2ColArgs t = g;
  t.channels = O, t.height = g.out_h, t.width = g.out_w;
  t.pad_h = g.kernel_h - 1 - g.pad_h, t.pad_w = g.kernel_w - 1 - g.pad_w;
  t.out_h = g.height, t.out_w = g.width;
  check_int32(op, t, g.channels);
  DeviceGuard guard(device);
  Tensor wt = Tensor::empty({g.channels, O, g.kernel_h, g.kernel_w}, a.w.dtype(), a.w.device());
  launch_conv_flip_weight(wt.raw_data(), a.w.raw_data(), int(O), int(g.channels), int(g.kernel_h),
                          int(g.kernel_w));
  ConvGemmParams p = gemm_params(t, g.channels, a.dy.dtype());
  p.x = a.dy.raw_data(), p.w = wt.raw_data(), p.y = a.dx.raw_data();
  launch_conv_igemm(p);  // wt is freed after: the caching allocator orders its reuse on the stream
}

}  // namespace loom::cuda
