// loom's own GEMMs on Hopper (sm_90a, bf16 / f16), one persistent warp-specialised kernel with two
// products (below): a Linear, with or without its bias (y = x·Wᵀ + b, LOOM_GEMM_WGMMA; tiles of
// 128 × 256, the two W boxes side by side), and first of all a Linear followed by GEGLU: y [rows, h] =
// (x·W[:h]ᵀ + b[:h]) · gelu(x·W[h:]ᵀ + b[h:]) (LinearGegluArgs, tensor/fused_args.h), where
// cuBLAS + the GEGLU pass write the [rows, 2h] projection, read it back and write y. On Stable
// Diffusion's feed-forward (h = 4·channels) that pass moved 5 bytes a y element and took ~5% of a
// sampling step (docs/gpu-bench.md).
//
//   tile     128 rows of x × 128 columns of y: the product of x's rows with W's rows n0…n0 + 127
//            (the hidden half) and h + n0… (the gate half), in k-steps of 64 (one 128-byte
//            swizzle row), both operands K-major as they lie in memory (x [rows, in], W [2h, in]).
//   block    2 consumer warpgroups (64 rows each: two m64n128k16 accumulators, hidden and gate, 128
//            f32 registers a thread) and a producer warpgroup whose registers go to the consumers
//            (setmaxnreg: 24 against 240). Persistent: one block per SM walks tiles blockIdx.x,
//            + gridDim.x, … in row-block-major order (the blocks running together share W's
//            tiles and a few row blocks of x in L2; tile_at).
//   producer one thread: per k-step, x's [128 × 64] box and W's two [128 × 64] boxes by TMA into
//            stage it % kStages of a ring, whose `full` mbarrier completes on their bytes; a stage
//            is refilled after its `empty` barrier has the 8 consumer warps' arrivals of the
//            previous round. Boxes past the matrix arrive as zeros (rows past `rows`, columns past
//            `in`, W's rows past 2h); the hidden box of the last column tile may hold gate rows
//            past h, whose columns of y are not written.
//   consumer per k-step: wait for `full`, 8 wgmma (4 k16 slices × hidden, gate), commit, wait
//            until only this step's group runs, release the previous step's stage. Epilogue:
//            bias (its pairs loaded before the tile's products), gelu (erf, branch-free) and
//            product in f32, one rounding, predicated 4-byte stores of column pairs.
//            The tensor cores wait during the epilogue (~a fifth of a tile at in = 640); a
//            deferred epilogue (a tile's GELUs during the next tile's first products, the sums held
//            as T pairs) was tried and ran slower (docs/gpu-bench.md, run 25).
//   epilogue warpgroup (opt-in, LOOM_LINEAR_GEGLU_EPILOGUE=warpgroup): the consumers stage the
//            tile's products as T pairs in shared memory (staged_full / staged_empty mbarriers)
//            and go on; a fourth warpgroup computes the epilogue above from them. 3 stages. Run
//            25: −9…12% at in ≤ 640, even at in = 1280; one rounding more.
#include "tensor/cuda/cuda_device.cuh"
#include "tensor/cuda/cuda_flash_tc.cuh"
#include "tensor/cuda/cuda_gemm_wgmma.h"
#include "tensor/cuda/cuda_tma.cuh"
#include "tensor/cuda/cuda_tma_host.h"
#include "tensor/cuda/cuda_wgmma.cuh"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace loom::cuda {
namespace {

constexpr int kTileRows = 128;     // rows of x (and y) a tile: 2 consumer warpgroups × 64
constexpr int kTileCols = 128;     // columns of y a tile (W rows: 128 hidden + 128 gate)
constexpr int kStepK = 64;         // one 128-byte swizzle row of bf16 / f16
constexpr int kConsumerWarps = 8;  // 2 warpgroups
constexpr int kProducerRegs = 24;
constexpr uint32_t kBoxBytes = kTileRows * kStepK * 2;  // one [128 × 64] box: 16 KiB
constexpr uint32_t kStageBytes = 3 * kBoxBytes;         // x, W hidden, W gate
constexpr int kStagedWords = kTileCols / 2 + 4;         // a staged row: 64 pairs + 4 words against bank conflicts

// The block's two forms. Without epilogue warps: 2 consumer + 1 producer warpgroups, 4 stages, the
// consumers compute the GELUs (the tensor cores wait). With them (LOOM_LINEAR_GEGLU_EPILOGUE=warpgroup):
// a fourth warpgroup takes each tile's products from shared memory (hidden and gate rounded to T
// pairs, [128][kStagedWords] each) and computes the GELUs while the consumers run the next tile;
// 3 stages (the staged tile takes the fourth's room).
template <bool kEpilogueWarps>
struct Block {
  static constexpr int kStages = kEpilogueWarps ? 3 : 4;
  static constexpr int kThreads = 128 * (kEpilogueWarps ? 4 : 3);
  static constexpr int kEpilogueRegs = 72;
  // registers a thread, in steps of 8: 2·consumer + producer (+ epilogue) = 65536 / 128
  static constexpr int kConsumerRegs = kEpilogueWarps ? 208 : 240;
  static constexpr size_t kStagedBytes = kEpilogueWarps ? size_t(2) * kTileRows * kStagedWords * 4 : 0;
  static constexpr size_t kSmem = 1024 + size_t(kStages) * kStageBytes + kStagedBytes;
  static_assert(2 * kConsumerRegs + kProducerRegs + (kEpilogueWarps ? kEpilogueRegs : 0) <= 65536 / 128);
};

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

struct PairMaps {
  CUtensorMap x, w;  // [rows][in] and W [2h or n][in], boxes of 64 columns × 128 rows
};

struct PairGemm {
  void* y;
  const void* bias;  // Geglu: [2h]; Bias: [n]; or null
  int64_t rows, in;
  int64_t h;         // Geglu: y's width h; Bias: n
  int64_t ldy;       // y's row stride, elements
  int64_t batches = 1;   // BiasNMajor: problems i < batches, B[i] at rows i·in of its map
  int64_t stride_y = 0;  // elements from y[i] to y[i + 1]
};

// The tile's problem, first row and first column. The blocks running together share tiles of the
// large operand in L2: x's row blocks (Geglu, Bias: the column tiles of a row block follow each
// other), B's column slabs (BiasNMajor, where x is the small W of a convolution and B its columns:
// the row tiles of a column slab follow each other).
struct TileAt {
  int64_t batch, m0, n0;
};
template <Product P>
__device__ __forceinline__ TileAt tile_at(const PairGemm& p, int64_t tile, int64_t col_tiles) {
  if constexpr (P == Product::Geglu) {
    return {0, tile / col_tiles * kTileRows, tile % col_tiles * kTileSpan<P>};
  } else {
    const int64_t row_tiles = (p.rows + kTileRows - 1) / kTileRows, per_batch = row_tiles * col_tiles;
    const int64_t in_batch = tile % per_batch;
    if constexpr (P == Product::Bias)
      return {tile / per_batch, in_batch / col_tiles * kTileRows, in_batch % col_tiles * kTileSpan<P>};
    else
      return {tile / per_batch, in_batch % row_tiles * kTileRows, in_batch / row_tiles * kTileSpan<P>};
  }
}

// W's row of the tile's second box, and whether the tile has one.
template <Product P>
__host__ __device__ __forceinline__ int64_t second_box_row(const PairGemm& p, int64_t n0) {
  return P == Product::Geglu ? p.h + n0 : n0 + kTileCols;
}
template <Product P>
__host__ __device__ __forceinline__ bool has_second_box(const PairGemm& p, int64_t n0) {
  return P == Product::Geglu || n0 + kTileCols < p.h;
}

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

// Issues the k-step's 8 products of this warpgroup (its 64 rows of x's box against W's two boxes,
// into hid and gate; the second's only where `second`; `first`: the tile's first step, which
// overwrites the accumulators) and commits them.
// kNMajor: W's boxes are [2 × 64 n][64 k] (n contiguous; the second 64 columns 8 KiB further: the
// leading byte offset), the k16 slice kk 16 rows of 128 bytes further.
template <typename T, bool kNMajor>
__device__ __forceinline__ void issue_step(float (&hid)[64], float (&gate)[64], const T* x_box, const T* w_hidden,
                                           const T* w_gate, int wg, bool first, bool second) {
  const uint64_t a = sw128_desc(x_box + wg * 64 * kStepK, 16, 1024);
  constexpr uint32_t kLeading = kNMajor ? kBoxBytes / 2 : 16;
  constexpr int kSliceStep = kNMajor ? 16 * 128 / 16 : 2;  // descriptor units (16 bytes) a k16 slice
  const uint64_t bh = sw128_desc(w_hidden, kLeading, 1024), bg = sw128_desc(w_gate, kLeading, 1024);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kStepK / 16; ++kk) {  // the k16 slice kk: 32 bytes further in each row of x
    const int accumulate = !first || kk > 0;
    if constexpr (kNMajor) {
      wgmma_ss<1>(hid, a + 2 * kk, bh + kSliceStep * kk, accumulate, T());
      if (second) wgmma_ss<1>(gate, a + 2 * kk, bg + kSliceStep * kk, accumulate, T());
    } else {
      wgmma_ss(hid, a + 2 * kk, bh + 2 * kk, accumulate, T());
      if (second) wgmma_ss(gate, a + 2 * kk, bg + 2 * kk, accumulate, T());
    }
  }
  wgmma_commit();
}

// Lane 0 of the warp arrives on the `empty` barriers of the `count` k-steps before `it` (their
// products done: every lane of the warp has waited for them).
template <int kStages>
__device__ __forceinline__ void release_steps(uint64_t* empty, int64_t it, int count, int lane) {
  __syncwarp();
  if (lane == 0)
    for (int q = 1; q <= count; ++q) mbar_arrive(&empty[(it - q) % kStages]);
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

template <typename T, Product P, bool kEpilogueWarps>
__global__ void __launch_bounds__(Block<kEpilogueWarps>::kThreads, 1)
    gemm_pair_kernel(const PairGemm p, const __grid_constant__ PairMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(P == Product::Geglu || !kEpilogueWarps, "the epilogue warpgroup computes GEGLU only");
  using B = Block<kEpilogueWarps>;
  constexpr int kStages = B::kStages;
  extern __shared__ unsigned char smem_raw[];
  // full[kStages], empty[kStages], staged_full, staged_empty (the staged tile's, kEpilogueWarps)
  __shared__ alignas(8) uint64_t bars[2 * kStages + 2];
  unsigned char* smem = align_1024(smem_raw);
  uint32_t* staged = reinterpret_cast<uint32_t*>(smem + kStages * kStageBytes);
  uint64_t* staged_full = bars + 2 * kStages;
  uint64_t* staged_empty = staged_full + 1;
  auto x_box = [&](int s) { return reinterpret_cast<T*>(smem + s * kStageBytes); };
  auto w_box = [&](int s, int half) { return reinterpret_cast<T*>(smem + s * kStageBytes + (1 + half) * kBoxBytes); };
  uint64_t* full = bars;
  uint64_t* empty = bars + kStages;

  const int tid = threadIdx.x, warp_id = tid / 32, lane = tid % 32;
  const int64_t col_tiles = (p.h + kTileSpan<P> - 1) / kTileSpan<P>;
  const int64_t tiles = (P == Product::Geglu ? 1 : p.batches) * ((p.rows + kTileRows - 1) / kTileRows) * col_tiles;
  const int k_steps = int((p.in + kStepK - 1) / kStepK);

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) mbar_init(&full[s], 1), mbar_init(&empty[s], kConsumerWarps);
    mbar_init(staged_full, 32 * kConsumerWarps), mbar_init(staged_empty, 128);
    mbar_init_fence();
  }
  __syncthreads();  // the only block barrier

  // Both sides count k-steps over all of the block's tiles (`it`: stage it % kStages, round
  // it / kStages): the parities of full and empty.
  if (kEpilogueWarps && warp_id >= kConsumerWarps + 4) {  // the epilogue warpgroup
    set_max_registers_dec<B::kEpilogueRegs>();
    const int ew = warp_id - kConsumerWarps - 4;
    const uint32_t* bias = static_cast<const uint32_t*>(p.bias);
    uint32_t j = 0;  // the block's tile count: the parities of staged_full
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++j) {
      const TileAt at = tile_at<P>(p, tile, col_tiles);
      const int64_t m0 = at.m0, n0 = at.n0;
      uint32_t b_hid[2], b_gate[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int64_t col = n0 + 2 * lane + 64 * c;
        const bool in = bias && col < p.h;
        b_hid[c] = in ? __ldg(bias + col / 2) : 0u;
        b_gate[c] = in ? __ldg(bias + (p.h + col) / 2) : 0u;
      }
      mbar_wait(staged_full, j & 1);
      finish_staged<T>(p, staged, m0, n0, b_hid, b_gate, ew, lane);
      mbar_arrive(staged_empty);
    }
    return;
  }
  if (warp_id >= kConsumerWarps) {
    set_max_registers_dec<kProducerRegs>();
    if (warp_id == kConsumerWarps && lane == 0) {
      int64_t it = 0;
      for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        const TileAt at = tile_at<P>(p, tile, col_tiles);
        const int m0 = int(at.m0), n0 = int(at.n0);
        const bool second = has_second_box<P>(p, n0);
        const int second_row = int(second_box_row<P>(p, n0));
        for (int k = 0; k < k_steps; ++k, ++it) {
          const int s = int(it % kStages);
          const uint32_t round = uint32_t(it / kStages);
          if (round > 0) mbar_wait(&empty[s], (round - 1) & 1);
          if constexpr (P == Product::BiasNMajor) {  // W's rows k of problem at.batch, columns n0 + 64c
            // Chunks of 64 columns wholly past n are not loaded: their stale values reach only
            // accumulator columns that are never stored.
            const int chunks = int(min(int64_t(4), (p.h - n0 + 63) / 64));
            mbar_arrive_expect_tx(&full[s], kBoxBytes + uint32_t(chunks) * (kBoxBytes / 2));
            tma_load_2d(x_box(s), &maps.x, &full[s], k * kStepK, m0);
            const int k_row = int(at.batch * p.in) + k * kStepK;
            for (int q = 0; q < chunks; ++q)
              tma_load_2d(w_box(s, q / 2) + (q % 2) * 64 * kStepK, &maps.w, &full[s], n0 + 64 * q, k_row);
          } else {
            mbar_arrive_expect_tx(&full[s], second ? kStageBytes : 2 * kBoxBytes);
            tma_load_2d(x_box(s), &maps.x, &full[s], k * kStepK, m0);
            tma_load_2d(w_box(s, 0), &maps.w, &full[s], k * kStepK, n0);
            if (second) tma_load_2d(w_box(s, 1), &maps.w, &full[s], k * kStepK, second_row);
          }
        }
      }
    }
    return;
  }

  set_max_registers_inc<B::kConsumerRegs>();
  const int wg = warp_id / 4, warp = warp_id % 4, g = lane / 4, t = lane % 4;
  int64_t it = 0;
  uint32_t j = 0;  // the block's tile count (kEpilogueWarps: the parities of staged_empty)
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x, ++j) {
    const TileAt at = tile_at<P>(p, tile, col_tiles);
    const int64_t m0 = at.m0, n0 = at.n0;
    const int r_tile = wg * 64 + warp * 16 + g;
    const bool second = has_second_box<P>(p, n0);
    TileBias bias;  // its latency hidden behind the products
    if constexpr (!kEpilogueWarps) bias = load_tile_bias<T, P>(p, n0, t);
    float hid[64], gate[64];
    for (int k = 0; k < k_steps; ++k, ++it) {
      const int s = int(it % kStages);
      mbar_wait(&full[s], uint32_t(it / kStages) & 1);
      issue_step<T, P == Product::BiasNMajor>(hid, gate, x_box(s), w_box(s, 0), w_box(s, 1), wg, k == 0, second);
      if (k > 0) {  // the previous step's products are done
        wgmma_wait<1>();
        release_steps<kStages>(empty, it, 1, lane);
      }
    }
    wgmma_wait<0>();
    fence_operands(hid);
    fence_operands(gate);
    release_steps<kStages>(empty, it, 1, lane);
    if constexpr (kEpilogueWarps) {
      if (j > 0) mbar_wait(staged_empty, (j - 1) & 1);  // the epilogue warps are done with the last tile
      stage_tile<T>(staged, hid, gate, r_tile, t);
      mbar_arrive(staged_full);
    } else if constexpr (P == Product::Geglu) {
      store_geglu<T>(p, m0 + r_tile, n0, hid, gate, bias, t);
    } else {
      PairGemm pt = p;  // problem at.batch's y
      pt.y = static_cast<T*>(p.y) + at.batch * p.stride_y;
      store_bias<T>(pt, m0 + r_tile, n0, hid, gate, bias, t);
    }
  }
#else
  (void)p;
  (void)maps;
  __trap();  // built without sm_90a: flash_wgmma_available() is false there
#endif
}

// LOOM_LINEAR_GEGLU_EPILOGUE (read at every call): unset or `consumers` (the default) has the
// consumer warpgroups compute the GELUs; `warpgroup` a fourth warpgroup, while the next tile's
// products run.
bool epilogue_warps() {
  const char* env = std::getenv("LOOM_LINEAR_GEGLU_EPILOGUE");
  const std::string v = env ? env : "";
  LOOM_CHECK(v.empty() || v == "consumers" || v == "warpgroup", "LOOM_LINEAR_GEGLU_EPILOGUE='", v,
             "' is not consumers or warpgroup");
  return v == "warpgroup";
}

// The operands' maps and one persistent block per SM (at most one per tile): x [p.rows][p.in] at
// row stride lda, W [w_rows][w_cols] at row stride ldw (elements): K-major [2h or n][in], boxes of
// 64 × 128 rows; BiasNMajor's [in · batches][n], boxes of 64 × 64 rows.
struct PairOperands {
  const void* x;
  int64_t lda;
  const void* w;
  int64_t w_rows, w_cols, ldw;
  const char* x_map;  // the tensor-map errors' names
  const char* w_map;
};

template <typename T, Product P, bool kEpilogueWarps>
void launch_pair(DType dtype, const PairOperands& o, const PairGemm& p) {
  using B = Block<kEpilogueWarps>;
  const cuuint64_t x_stride = cuuint64_t(o.lda) * 2, w_stride = cuuint64_t(o.ldw) * 2;
  const cuuint64_t x_dims[2] = {cuuint64_t(p.in), cuuint64_t(p.rows)};
  const cuuint64_t w_dims[2] = {cuuint64_t(o.w_cols), cuuint64_t(o.w_rows)};
  const cuuint32_t box[2] = {kStepK, kTileRows};
  const cuuint32_t w_box[2] = {kStepK, P == Product::BiasNMajor ? 64u : cuuint32_t(kTileRows)};
  const PairMaps maps{tensor_map_sw128(dtype, 2, o.x, x_dims, &x_stride, box, o.x_map),
                      tensor_map_sw128(dtype, 2, o.w, w_dims, &w_stride, w_box, o.w_map)};
  const int64_t tiles = p.batches * ((p.rows + kTileRows - 1) / kTileRows) * ((p.h + kTileSpan<P> - 1) / kTileSpan<P>);
  const unsigned grid = unsigned(std::min<int64_t>(tiles, flash_sm_count()));
  auto* kernel = gemm_pair_kernel<T, P, kEpilogueWarps>;
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(B::kSmem)));
  kernel<<<grid, B::kThreads, B::kSmem, compute_stream()>>>(p, maps);
  check_last_launch(P == Product::Geglu  ? "gemm_pair_kernel (linear + geglu)"
                    : P == Product::Bias ? "gemm_pair_kernel (linear + bias)"
                                         : "gemm_pair_kernel (n-major, batched)");
}

template <typename T>
void launch_geglu(const LinearGegluArgs& a) {
  const PairOperands o{a.x.raw_data(), a.in, a.w.raw_data(), 2 * a.h, a.in, a.in,
                       "linear_geglu: the map of x", "linear_geglu: the map of w"};
  const PairGemm p{a.y.raw_data(), a.bias.defined() ? a.bias.raw_data() : nullptr, a.rows, a.in, a.h, a.h};
  if (epilogue_warps()) launch_pair<T, Product::Geglu, true>(a.x.dtype(), o, p);
  else launch_pair<T, Product::Geglu, false>(a.x.dtype(), o, p);
}

// LOOM_GEMM_WGMMA (read at every call): unset or `0` leaves every GEMM to cuBLAS / cuBLASLt;
// `bias` runs x·Wᵀ + b here where it fits, `all` x·Wᵀ without a bias too, `conv` also the
// products with B N-major (x·B, and a convolution's W·columns over the samples).
enum class WgmmaGemms { None, Bias, All, Conv };

WgmmaGemms wgmma_gemms_chosen() {
  const char* env = std::getenv("LOOM_GEMM_WGMMA");
  const std::string v = env ? env : "";
  LOOM_CHECK(v.empty() || v == "0" || v == "bias" || v == "all" || v == "conv", "LOOM_GEMM_WGMMA='", v,
             "' is not 0, bias, all or conv");
  return v == "conv" ? WgmmaGemms::Conv : v == "all" ? WgmmaGemms::All : v == "bias" ? WgmmaGemms::Bias : WgmmaGemms::None;
}

// The layouts the kernel takes (gemm_wgmma's other conditions aside): x·Wᵀ (B stored [n, k]) as
// one problem, or x·B (B stored [k, n]) over `batch` problems sharing A, B's contiguous (so that
// its 2-D map holds them one under the other) and k a multiple of 64 (no k-step straddles two).
bool layout_fits(const GemmBatch& g, WgmmaGemms chosen) {
  if (g.trans_a) return false;
  if (g.trans_b) return g.batch == 1;
  if (chosen != WgmmaGemms::Conv) return false;
  return g.batch == 1 || (g.stride_a == 0 && g.stride_b == g.k * g.ldb && g.k % kStepK == 0 &&
                          g.stride_c >= g.m * g.ldc && g.batch * g.k < (int64_t(1) << 31));
}

// LOOM_LINEAR_GEGLU: unset or 1 runs the kernel where it applies, 0 never (read at every call).
bool enabled() {
  const char* env = std::getenv("LOOM_LINEAR_GEGLU");
  const std::string v = env ? env : "";
  LOOM_CHECK(v.empty() || v == "0" || v == "1", "LOOM_LINEAR_GEGLU='", v, "' is not 0 or 1");
  return v != "0";
}

}  // namespace

bool gemm_geglu(const LinearGegluArgs& a) {
  const DType dt = a.x.dtype();
  if (!enabled() || !flash_wgmma_available() || !tensor_maps_available()) return false;
  if ((dt != DType::BF16 && dt != DType::F16) || a.w.dtype() != dt || a.y.dtype() != dt) return false;
  if (a.bias.defined() && a.bias.dtype() != dt) return false;
  if (!aligned16(a.x.raw_data()) || !aligned16(a.w.raw_data()) || !aligned16(a.y.raw_data())) return false;
  if (a.bias.defined() && reinterpret_cast<uintptr_t>(a.bias.raw_data()) % 4 != 0) return false;  // pair loads
  // TMA: row strides (in·2 bytes) multiples of 16, coordinates in int32; pair stores: h even
  if (a.in % 8 != 0 || a.h % 8 != 0 || a.rows >= (int64_t(1) << 31) || 2 * a.h >= (int64_t(1) << 31)) return false;
  if (dt == DType::BF16) launch_geglu<__nv_bfloat16>(a);
  else launch_geglu<__half>(a);
  return true;
}

bool gemm_wgmma(const GemmBatch& g) {
  const WgmmaGemms chosen = wgmma_gemms_chosen();
  if (chosen == WgmmaGemms::None || (!g.bias && chosen == WgmmaGemms::Bias)) return false;
  if (!flash_wgmma_available() || !tensor_maps_available()) return false;
  if (g.dtype != DType::BF16 && g.dtype != DType::F16) return false;
  if (!layout_fits(g, chosen) || g.alpha != 1.0 || g.beta != 0.0) return false;
  if (!g.bias && (g.n < kTileCols || g.k < kStepK)) return false;  // LoRA's thin products stay cuBLAS's
  if (!aligned16(g.a) || !aligned16(g.b) || reinterpret_cast<uintptr_t>(g.c) % 4 != 0 ||
      reinterpret_cast<uintptr_t>(g.bias) % 4 != 0)
    return false;
  // TMA: row strides multiples of 16 bytes, coordinates in int32; pair stores: n and ldc even
  if (g.m < kTileRows || g.k % 8 != 0 || g.n % 8 != 0 || g.lda % 8 != 0 || g.ldb % 8 != 0 || g.ldc % 2 != 0)
    return false;
  if (g.m >= (int64_t(1) << 31) || g.n >= (int64_t(1) << 31)) return false;
  if (g.lda < g.k || g.ldb < (g.trans_b ? g.k : g.n) || g.ldc < g.n) return false;  // direct callers
  PairGemm p{g.c, g.bias, g.m, g.k, g.n, g.ldc};
  if (g.trans_b) {
    const PairOperands o{g.a, g.lda, g.b, g.n, g.k, g.ldb, "gemm: the map of A", "gemm: the map of B"};
    if (g.dtype == DType::BF16) launch_pair<__nv_bfloat16, Product::Bias, false>(g.dtype, o, p);
    else launch_pair<__half, Product::Bias, false>(g.dtype, o, p);
  } else {
    p.batches = g.batch, p.stride_y = g.stride_c;
    const PairOperands o{g.a, g.lda, g.b, g.k * g.batch, g.n, g.ldb, "gemm: the map of A", "gemm: the map of B"};
    if (g.dtype == DType::BF16) launch_pair<__nv_bfloat16, Product::BiasNMajor, false>(g.dtype, o, p);
    else launch_pair<__half, Product::BiasNMajor, false>(g.dtype, o, p);
  }
  return true;
}

}  // namespace loom::cuda
