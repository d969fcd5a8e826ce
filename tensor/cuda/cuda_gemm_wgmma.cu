// loom's own GEMMs on Hopper (sm_90a, bf16 / f16), one persistent warp-specialised kernel for
// three products (Product, cuda_gemm_wgmma_epilogue.cuh, with the epilogues): a Linear, with or
// without its bias (y = x·Wᵀ + b, LOOM_GEMM_WGMMA; tiles of 128 × 256, the two W boxes side by
// side), the same with B N-major over problems sharing x (a convolution's W·columns), and first of
// all a Linear followed by GEGLU: y [rows, h] =
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
#include "tensor/cuda/cuda_gemm_wgmma_epilogue.cuh"
#include "tensor/cuda/cuda_tma.cuh"
#include "tensor/cuda/cuda_tma_host.h"
#include "tensor/cuda/cuda_wgmma.cuh"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace loom::cuda {
namespace {

constexpr int kConsumerWarps = 8;  // 2 warpgroups
constexpr int kProducerRegs = 24;

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

struct PairMaps {
  CUtensorMap x, w;  // x [rows][in] and W (PairOperands: its layouts and boxes)
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
  if (!env) return WgmmaGemms::None;  // every GEMM asks: no string made on the default path
  const std::string v = env;
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
