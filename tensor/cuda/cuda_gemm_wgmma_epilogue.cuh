// Internal to tensor/cuda/cuda_gemm_wgmma.cu (sm_90a): the tile's shape, the problem it computes
// (PairGemm, Product) and the epilogues that turn a tile's accumulators into y — GEGLU's (bias,
// branch-free erf GELU, product), the Linear's (bias), and the epilogue warpgroup's from a tile
// staged in shared memory. The main loop, the kernel and its launch are in the .cu file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "tensor/cuda/cuda_flash_tc.cuh"

namespace loom::cuda {
namespace {

constexpr int kTileRows = 128;     // rows of x (and y) a tile: 2 consumer warpgroups × 64
constexpr int kTileCols = 128;     // columns of y a tile (W rows: 128 hidden + 128 gate)
constexpr int kStepK = 64;         // one 128-byte swizzle row of bf16 / f16
constexpr uint32_t kBoxBytes = kTileRows * kStepK * 2;  // one [128 × 64] box: 16 KiB
constexpr uint32_t kStageBytes = 3 * kBoxBytes;         // x, W hidden, W gate
constexpr int kStagedWords = kTileCols / 2 + 4;         // a staged row: 64 pairs + 4 words against bank conflicts

// What a tile's two W boxes are and what the epilogue writes:
//   Geglu  W [2h, in]: boxes W rows n0… (hidden) and h + n0… (gate); y [rows, h] = (hidden + b)·
//          gelu(gate + b'); a tile covers 128 columns of y.
//   Bias   W [n, in]: boxes W rows n0… and n0 + 128…; y [rows, n] = x·Wᵀ + b; a tile covers 256
//          columns of y, its second box neither loaded nor multiplied where n0 + 128 ≥ n.
//   BiasNMajor  the same product with B stored [in, n] (N-major: y = x·B + b), in `batches`
//          problems y[i] = x·B[i] (+ b) sharing x (a convolution's W·columns): each box holds W's
//          columns n0… (+ 128) as two [64 k][64 n] TMA boxes, multiplied with B transposed in
//          the instruction.
enum class Product { Geglu, Bias, BiasNMajor };

template <Product P>
constexpr int kTileSpan = P == Product::Geglu ? kTileCols : 2 * kTileCols;  // columns of y a tile

struct PairGemm {
  void* y;
  const void* bias;  // Geglu: [2h]; Bias: [n]; or null
  int64_t rows, in;
  int64_t h;         // Geglu: y's width h; Bias: n
  int64_t ldy;       // y's row stride, elements
  int64_t batches = 1;   // BiasNMajor: problems i < batches, B[i] at rows i·in of its map
  int64_t stride_y = 0;  // elements from y[i] to y[i + 1]
};

// gelu(x) = x·Φ(x), the exact (erf) form, without erff's per-element branch (which serialised
// the epilogue: each gelu its own basic block, ~35 instructions): Φ(x) = 1 − erfc(z)/2 for x ≥ 0,
// erfc(z)/2 for x < 0, z = |x|/√2, with erfc(z) = t·exp(−z² + P(t)), t = 1/(1 + z/2), P of degree 9
// (Numerical Recipes' Chebyshev fit "erfcc": fractional error < 1.2e-7 for every z ≥ 0). P's
// coefficients are scaled by log2 e and the /2 taken as −1 in the exponent, for the hardware
// reciprocal and exp2. Relative error ≤ 2e-5 over all x in f32 (against erfc in f64): below half
// an ulp of the bf16 / f16 y it is rounded into.
__device__ __forceinline__ float gelu_erf_branchless(float x) {
  constexpr float kP[10] = {-1.825748218e+00f, 1.442729204e+00f,  5.397006155e-01f, 1.396300565e-01f,
                            -2.687568603e-01f, 4.023215817e-01f,  -1.637753152e+00f, 2.147474464e+00f,
                            -1.186114945e+00f, 2.465172979e-01f};
  const float t = __fdividef(1.f, fmaf(0.35355339059f, fabsf(x), 1.f));  // 1 / (1 + |x|/(2√2))
  float p = kP[9];
#pragma unroll
  for (int k = 8; k >= 0; --k) p = fmaf(p, t, kP[k]);
  const float half_erfc = t * fast_exp2(fmaf(-0.7213475204f * x, x, p - 1.f));  // −z²·log2 e = −x²·log2 e / 2
  return x * (x >= 0.f ? 1.f - half_erfc : half_erfc);
}

// The tile's biases of this thread's columns n0 + 8j + 2t, + 1 (j < 16) as packed pairs: b[col],
// b[col + 1] in hid[j]; in gate[j] those of the second box's column (Geglu: b[h + col], …; Bias:
// b[col + 128], …); zeros without a bias or past h (n). Loaded before the tile's products so that
// their latency hides behind them.
struct TileBias {
  uint32_t hid[kTileCols / 8], gate[kTileCols / 8];
};

template <typename T, Product P>
__device__ __forceinline__ TileBias load_tile_bias(const PairGemm& p, int64_t n0, int t) {
  TileBias b;
  const uint32_t* bias = static_cast<const uint32_t*>(p.bias);  // pairs: the host checked 4-byte alignment
#pragma unroll
  for (int j = 0; j < kTileCols / 8; ++j) {
    const int64_t col = n0 + 8 * j + 2 * t;  // h is a multiple of 8: col < h means col + 1 < h
    const int64_t col2 = P == Product::Geglu ? p.h + col : col + kTileCols;
    b.hid[j] = bias && col < p.h ? __ldg(bias + col / 2) : 0u;
    b.gate[j] = bias && (P == Product::Geglu ? col : col2) < p.h ? __ldg(bias + col2 / 2) : 0u;
  }
  return b;
}

// A packed pair of T (low half first) as two floats, by bit operations (no address taken).
template <typename T>
__device__ __forceinline__ float2 unpack(uint32_t v) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
  } else {
    __half2 h;
    asm("mov.b32 %0, %1;" : "=r"(*reinterpret_cast<uint32_t*>(&h)) : "r"(v));
    return __half22float2(h);
  }
}

// *dst = v where `pred`, as one predicated instruction: no branch to split the arithmetic around it.
__device__ __forceinline__ void store_u32_if(bool pred, void* dst, uint32_t v) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %0, 0;\n@p st.global.b32 [%1], %2;\n}\n" ::"r"(int(pred)), "l"(dst),
               "r"(v)
               : "memory");
}

// This thread's pairs out[j][r] of y (rows row0 + 8r, columns n0 + 8j + 2t, + 1), those that lie in
// y, each store predicated (no branch to split the arithmetic before it).
template <typename T>
__device__ __forceinline__ void store_pairs(const PairGemm& p, int64_t row0, int64_t n0,
                                            const uint32_t (&out)[kTileCols / 8][2], int t) {
  const int64_t cols = p.h - n0 - 2 * t;  // columns 8j of the rows that exist: 8j < cols
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row0 + 8 * r;
    T* y = static_cast<T*>(p.y) + min(row, p.rows - 1) * p.ldy + n0 + 2 * t;
#pragma unroll
    for (int j = 0; j < kTileCols / 8; ++j)
      store_u32_if(row < p.rows && 8 * j < cols, y + 8 * j, out[j][r]);  // h (n) is a multiple of 8
  }
}

// The warp's rows row0 and row0 + 8 of y, columns n0 + 8j + 2t (+1) for j < 16: hid / gate are the
// m64n128 accumulators (cuda_wgmma.cuh's fragment layout: d[4j + 2r + e], row + 8r, column + e).
// All the arithmetic first, then the stores, each predicated: the epilogue is one basic block, so
// the GELUs of different columns overlap (bounds checks as branches split it and cost 0.09 ms of
// 0.40 at SDXL's level 1: docs/gpu-bench.md, run 25).
template <typename T>
__device__ __forceinline__ void store_geglu(const PairGemm& p, int64_t row0, int64_t n0, const float (&hid)[64],
                                            const float (&gate)[64], const TileBias& bias, int t) {
  uint32_t out[kTileCols / 8][2];
#pragma unroll
  for (int j = 0; j < kTileCols / 8; ++j) {
    const float2 bh = unpack<T>(bias.hid[j]), bg = unpack<T>(bias.gate[j]);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float v0 = hid[4 * j + 2 * r] + bh.x, v1 = hid[4 * j + 2 * r + 1] + bh.y;
      v0 *= gelu_erf_branchless(gate[4 * j + 2 * r] + bg.x);
      v1 *= gelu_erf_branchless(gate[4 * j + 2 * r + 1] + bg.y);
      out[j][r] = Half2<T>::pack(v0, v1);
    }
  }
  store_pairs<T>(p, row0, n0, out, t);
}

// Bias: the warp's rows row0 and row0 + 8 of y, columns n0 + 8j + 2t (+1) from `lo` (the first
// box's accumulators) and n0 + 128 + 8j + 2t from `hi` (the second's; garbage where the tile has
// none, and then never stored), plus the bias, one rounding, predicated stores.
template <typename T>
__device__ __forceinline__ void store_bias(const PairGemm& p, int64_t row0, int64_t n0, const float (&lo)[64],
                                           const float (&hi)[64], const TileBias& bias, int t) {
  uint32_t out[2][kTileCols / 8][2];
#pragma unroll
  for (int j = 0; j < kTileCols / 8; ++j) {
    const float2 bl = unpack<T>(bias.hid[j]), bh = unpack<T>(bias.gate[j]);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      out[0][j][r] = Half2<T>::pack(lo[4 * j + 2 * r] + bl.x, lo[4 * j + 2 * r + 1] + bl.y);
      out[1][j][r] = Half2<T>::pack(hi[4 * j + 2 * r] + bh.x, hi[4 * j + 2 * r + 1] + bh.y);
    }
  }
  store_pairs<T>(p, row0, n0, out[0], t);
  store_pairs<T>(p, row0, n0 + kTileCols, out[1], t);
}

// This thread's accumulators into the staged tile (hidden at `staged`, gate kTileRows·kStagedWords
// words further), rounded to T pairs: row r_tile + 8r, pair 4j + t (the fragment layout above;
// conflict-free: the 4-word pad puts the 8 rows g of a warp's store 4 banks apart).
template <typename T>
__device__ __forceinline__ void stage_tile(uint32_t* staged, const float (&hid)[64], const float (&gate)[64],
                                           int r_tile, int t) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    uint32_t* h_row = staged + (r_tile + 8 * r) * kStagedWords + t;
    uint32_t* g_row = h_row + kTileRows * kStagedWords;
#pragma unroll
    for (int j = 0; j < kTileCols / 8; ++j) {
      h_row[4 * j] = Half2<T>::pack(hid[4 * j + 2 * r], hid[4 * j + 2 * r + 1]);
      g_row[4 * j] = Half2<T>::pack(gate[4 * j + 2 * r], gate[4 * j + 2 * r + 1]);
    }
  }
}

// The epilogue warpgroup's share of a staged tile (rows m0 + 32·ew + i of y, i < 32; this lane's
// pairs `lane` and `lane` + 32, columns n0 + 2·lane (+ 64)): bias, GELU and product in f32, one
// rounding, predicated stores. Four rows' loads before their arithmetic, their stores after it.
template <typename T>
__device__ __forceinline__ void finish_staged(const PairGemm& p, const uint32_t* staged, int64_t m0, int64_t n0,
                                              const uint32_t (&b_hid)[2], const uint32_t (&b_gate)[2], int ew,
                                              int lane) {
  constexpr int kRows = 4;
  const int64_t cols = p.h - n0 - 2 * lane;  // pair c exists where 64c < cols
#pragma unroll 1
  for (int i0 = 0; i0 < kTileRows / 4; i0 += kRows) {
    uint32_t hv[kRows][2], gv[kRows][2], out[kRows][2];
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const uint32_t* h_at = staged + (32 * ew + i0 + i) * kStagedWords + lane + 32 * c;
        hv[i][c] = h_at[0], gv[i][c] = h_at[kTileRows * kStagedWords];
      }
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float2 h = unpack<T>(hv[i][c]), g = unpack<T>(gv[i][c]);
        const float2 bh = unpack<T>(b_hid[c]), bg = unpack<T>(b_gate[c]);
        out[i][c] = Half2<T>::pack((h.x + bh.x) * gelu_erf_branchless(g.x + bg.x),
                                   (h.y + bh.y) * gelu_erf_branchless(g.y + bg.y));
      }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int64_t row = m0 + 32 * ew + i0 + i;
      T* y = static_cast<T*>(p.y) + min(row, p.rows - 1) * p.ldy + n0 + 2 * lane;
#pragma unroll
      for (int c = 0; c < 2; ++c) store_u32_if(row < p.rows && 64 * c < cols, y + 64 * c, out[i][c]);
    }
  }
}

}  // namespace
}  // namespace loom::cuda
