// Flash attention forward on Hopper, warp-specialised (sm_90a, head dims 40 and 64, bf16 / f16):
// the arithmetic of cuda_flash_wgmma.cu (same per-tile steps: cuda_flash_wgmma_fwd.cuh), with the
// loads taken off the consumers and the block barrier taken out of the key loop.
//
//   block    kWg consumer warpgroups of 64 query rows (warps 0 … 4kWg − 1) and one producer
//            warpgroup (its registers handed to the consumers by setmaxnreg: 160 each with 3
//            consumer warpgroups, where a launch bound alone gives 128); kRows = 64·kWg queries,
//            keys in tiles of kN.
//   producer one thread: Q by one TMA copy, then K and V tile it into stage it % kStages of a
//            ring (TMA, the 128-byte swizzle wgmma reads; rows past the length and columns past
//            d come in as zeros), each stage's `full` mbarrier completing when its bytes land; a
//            stage is refilled only after its `empty` mbarrier has the 4kWg consumer warps'
//            arrivals of its previous round.
//   persistent (wsp…, the default) one block per SM (grid = SMs) loops over (query tile,
//            problem) items; the producer loads the next item's Q once every consumer warp has
//            read the current one for the last time (`q_empty`), K / V stages run on across items.
//   consumer waits for `full`, S = Q·Kᵀ, the online softmax, O += P·V, then releases the stage.
//            The warpgroups never wait for each other, so one's softmax runs beside another's
//            products (the block-synchronous kernel's barrier at every tile kept them in step).
//
// The tensor maps (host, flash_wgmma_ws_forward) view q, k, v as [batches][len][heads][d] (the
// plain layout: heads = 1); a box is 64 columns × rows of one head, so at d = 40 columns 40…63
// are zeros (the last k-step of S reads up to column 47). Needs 16-byte-aligned q, k, v; the caller
// falls back to the block-synchronous kernel otherwise.
#include "tensor/cuda/cuda_flash_wgmma_fwd.cuh"
#include "tensor/cuda/cuda_tma.cuh"
#include "tensor/cuda/cuda_tma_host.h"

#include <algorithm>
#include <string>

namespace loom::cuda {

namespace {

template <int kWg, int kN, int kStages>
struct WsShape {
  static constexpr int kRows = 64 * kWg;
  static constexpr int kConsumerWarps = 4 * kWg;
  static constexpr int kThreads = 128 * kWg + 128;  // + the producer warpgroup
  // Registers a thread after setmaxnreg (the launch gives every thread 65536 / kThreads, capped
  // at 128 when a sub-partition holds 4 warps): the producer keeps 24, the consumers take what is
  // left of the SM's 64 Ki (in steps of 8).
  static constexpr int kProducerRegs = 24;
  static constexpr int kLeft = (65536 / 128 - kProducerRegs) / kWg / 8 * 8;
  static constexpr int kConsumerRegs = kLeft < 240 ? kLeft : 240;
  static constexpr uint32_t kTileBytes = kN * 128;  // one K or V tile: kN rows of 64 elements
  // Q [kRows][64], then per stage K [kN][64] and V [kN][64]; 1024 bytes of alignment slack
  static constexpr size_t kSmem = 1024 + size_t(kRows) * 128 + size_t(kStages) * 2 * kTileBytes;
};

struct WsMaps {
  CUtensorMap q, k, v;
};

// The block's work items: kPersistent, items blockIdx.x, + gridDim.x, … of the q_tiles · n (query
// tile, problem) pairs, problem-major (blocks running side by side share a problem's K and V in
// L2); else the one pair (blockIdx.x, blockIdx.y).
struct WsItems {
  int64_t first, end, step, q_tiles;
  __device__ void at(int64_t i, int kRows, int64_t& n, int64_t& i0) const {
    n = i / q_tiles, i0 = (i % q_tiles) * kRows;
  }
};

// A consumer warpgroup whose 64 query rows of an item all lie past q_len (the last query tile of
// a problem, when q_len is not a multiple of kRows: at 1024 rows in blocks of 192 two of the
// three) has nothing to compute, but the barriers count its warps: it still takes part in every
// phase. It waits for the item's Q (`q_full`: the producer issues it only after q_empty's
// previous phase completed, so an arrival after it counts toward this item's phase, never the
// previous one's) and for each K / V stage's `full` (likewise for `empty`), and arrives on
// q_empty at the item's last tile and on each stage's empty. The busy warpgroup then has the
// tensor cores to itself for that item.
template <int kN, int kStages>
__device__ __forceinline__ void pass_idle_item(uint64_t* q_full, uint64_t* q_empty, uint64_t* full, uint64_t* empty,
                                               uint32_t round, int64_t tiles, int64_t& it, int lane) {
  mbar_wait(q_full, round & 1);
  for (int64_t j = 0; j < tiles; ++j, ++it) {
    const int s = int(it % kStages);
    mbar_wait(&full[s], uint32_t(it / kStages) & 1);
    __syncwarp();
    if (lane == 0) {
      if (j == tiles - 1) mbar_arrive(q_empty);
      mbar_arrive(&empty[s]);
    }
  }
}

template <typename T, int D, int kWg, int kN, int kStages, bool kPersistent, bool kSkipIdle = false>
__global__ void __launch_bounds__(WsShape<kWg, kN, kStages>::kThreads, 1)
    flash_fwd_ws_kernel(const FlashParams p, const __grid_constant__ WsMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = WsShape<kWg, kN, kStages>;
  constexpr int kRows = S::kRows;
  extern __shared__ unsigned char smem_raw[];
  // q_full, q_empty, full[kStages], empty[kStages]
  __shared__ alignas(8) uint64_t bars[2 + 2 * kStages];
  unsigned char* smem = align_1024(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem);
  auto k_tile = [&](int s) { return reinterpret_cast<T*>(smem + kRows * 128 + s * 2 * S::kTileBytes); };
  auto v_tile = [&](int s) { return k_tile(s) + kN * 64; };
  uint64_t* q_full = bars;
  uint64_t* q_empty = bars + 1;
  uint64_t* full = bars + 2;
  uint64_t* empty = bars + 2 + kStages;

  const int tid = threadIdx.x, warp_id = tid / 32, lane = tid % 32;
  const int64_t heads = p.packed ? p.heads : 1;
  const int64_t q_tiles = (p.q_len + kRows - 1) / kRows;
  const WsItems items = kPersistent ? WsItems{blockIdx.x, q_tiles * p.n, gridDim.x, q_tiles}
                                    : WsItems{blockIdx.y * q_tiles + blockIdx.x, blockIdx.y * q_tiles + blockIdx.x + 1,
                                              1, q_tiles};
  auto key_tiles = [&](int64_t i0) {  // ≥ 1 (k_len ≥ 1)
    const int64_t tiles = (p.k_len + kN - 1) / kN;
    return p.causal ? min(tiles, (i0 + kRows - 1) / kN + 1) : tiles;
  };

  if (tid == 0) {
    mbar_init(q_full, 1);
    mbar_init(q_empty, S::kConsumerWarps);
    for (int s = 0; s < kStages; ++s) mbar_init(&full[s], 1), mbar_init(&empty[s], S::kConsumerWarps);
    mbar_init_fence();
  }
  __syncthreads();  // the only block barrier

  // Both sides count key tiles over all of the block's items (`it`, its stage it % kStages and
  // round it / kStages) and items (`round`): the parities of full / empty and q_full / q_empty.
  if (warp_id >= S::kConsumerWarps) {  // the producer warpgroup: one thread issues every copy
    set_max_registers_dec<S::kProducerRegs>();
    if (warp_id == S::kConsumerWarps && lane == 0) {
      int64_t it = 0;
      uint32_t round = 0;
      for (int64_t i = items.first; i < items.end; i += items.step, ++round) {
        int64_t n, i0;
        items.at(i, kRows, n, i0);
        const int head = int(n % heads), batch = int(n / heads);
        if (round > 0) mbar_wait(q_empty, (round - 1) & 1);  // every consumer warp is past its last S
        mbar_arrive_expect_tx(q_full, kRows * 128);
        tma_load_4d(sQ, &maps.q, q_full, 0, head, int(i0), batch);
        const int64_t tiles = key_tiles(i0);
        for (int64_t j = 0; j < tiles; ++j, ++it) {
          const int s = int(it % kStages);
          const uint32_t stage_round = uint32_t(it / kStages);
          if (stage_round > 0) mbar_wait(&empty[s], (stage_round - 1) & 1);
          mbar_arrive_expect_tx(&full[s], 2 * S::kTileBytes);
          tma_load_4d(k_tile(s), &maps.k, &full[s], 0, head, int(j * kN), batch);
          tma_load_4d(v_tile(s), &maps.v, &full[s], 0, head, int(j * kN), batch);
        }
      }
    }
    return;
  }

  set_max_registers_inc<S::kConsumerRegs>();
  const int wg = warp_id / 4, warp = warp_id % 4, g = lane / 4, t = lane % 4;
  const T* mask = static_cast<const T*>(p.mask);
  const float sl2 = float(p.scale) * kLog2e;
  const uint64_t q_desc = sw128_desc(sQ + wg * 64 * 64, 16, 1024);
  int64_t it = 0;
  uint32_t round = 0;
  for (int64_t i = items.first; i < items.end; i += items.step, ++round) {
    int64_t n, i0;
    items.at(i, kRows, n, i0);
    if (kSkipIdle && i0 + wg * 64 >= p.q_len) {
      pass_idle_item<kN, kStages>(q_full, q_empty, full, empty, round, key_tiles(i0), it, lane);
      continue;
    }
    float o[D / 2];
#pragma unroll
    for (int e = 0; e < D / 2; ++e) o[e] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    const int64_t row0 = i0 + wg * 64 + warp * 16 + g;
    const int64_t row_q[2] = {row0, row0 + 8};
    uint32_t pa[kN / 16][4];  // P as A fragments
    const int64_t tiles = key_tiles(i0);

    mbar_wait(q_full, round & 1);
    for (int64_t j = 0; j < tiles; ++j, ++it) {
      const int s = int(it % kStages);
      mbar_wait(&full[s], uint32_t(it / kStages) & 1);
      float sc[kN / 2];
      wgmma_fence();
      wgmma_qk<T, D, kN>(sc, q_desc, sw128_desc(k_tile(s), 16, 1024));
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(sc);
      if (j == tiles - 1) {  // Q is read for the last time: the producer may load the next item's
        __syncwarp();
        if (lane == 0) mbar_arrive(q_empty);
      }
      float corr[2];
      softmax_tile<T, kN, 0>(sc, m, l, corr, p, mask, n, i0, j * kN, row_q, t, sl2);
      rescale_o<D>(o, corr);
      pack_p<T, kN>(pa, sc);
      wgmma_fence();
      wgmma_pv<T, D, kN>(o, pa, sw128_desc(v_tile(s), 16, 1024));
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(o);
      __syncwarp();  // every lane's products are done: this warp no longer reads the stage
      if (lane == 0) mbar_arrive(&empty[s]);
    }
    const FlashRows qr = flash_rows(p, n, p.q_len, D);
    T* out = static_cast<T*>(p.out) + qr.base;
    float* lse = static_cast<float*>(p.lse) + n * p.q_len;
    store_output<T, D>(out, lse, qr.stride, p.q_len, o, m, l, row_q, t);
  }
#else
  (void)p;
  (void)maps;
  __trap();  // built without sm_90a: flash_wgmma_available() is false there
#endif
}

// The map of one of q, k, v (`len` rows of each problem): [n / heads][len][heads][d] elements,
// boxes of 64 columns × box_rows rows of one head, 128-byte swizzle, zeros outside.
CUtensorMap rows_map(const FlashParams& p, const void* base, int64_t len, int box_rows, const char* name) {
  const int64_t heads = p.packed ? p.heads : 1;
  const cuuint64_t elem = 2;  // bf16 / f16
  const cuuint64_t dims[4] = {cuuint64_t(p.d), cuuint64_t(heads), cuuint64_t(len), cuuint64_t(p.n / heads)};
  const cuuint64_t strides[3] = {p.d * elem, heads * p.d * elem, len * heads * p.d * elem};
  const cuuint32_t box[4] = {64, 1, cuuint32_t(box_rows), 1};
  return tensor_map_sw128(p.dtype, 4, base, dims, strides, box,
                          std::string("flash forward (warp-specialised): the map of ") + name);
}

template <typename T, int D, int kWg, int kN, int kStages, bool kPersistent = false, bool kSkipIdle = false>
void ws_forward(const FlashParams& p) {
  using S = WsShape<kWg, kN, kStages>;
  const WsMaps maps{rows_map(p, p.q, p.q_len, S::kRows, "q"), rows_map(p, p.k, p.k_len, kN, "k"),
                    rows_map(p, p.v, p.k_len, kN, "v")};
  auto* kernel = flash_fwd_ws_kernel<T, D, kWg, kN, kStages, kPersistent, kSkipIdle>;
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(S::kSmem)));
  const int64_t q_tiles = (p.q_len + S::kRows - 1) / S::kRows;
  const dim3 grid = kPersistent ? dim3(unsigned(std::min<int64_t>(q_tiles * p.n, flash_sm_count())))
                                : dim3(unsigned(q_tiles), unsigned(p.n));
  kernel<<<grid, S::kThreads, S::kSmem, compute_stream()>>>(p, maps);
  check_last_launch("flash_fwd_ws_kernel");
}

// H200, attention run 22 (docs/gpu-bench.md), forward ms: ws3x128 0.167 / 0.164 / 0.723 / 0.136 at
// (2,8,4096,40) / (2,8,4096,64) / (8,10,4096,64) / (8,20,1024,64) against ws3x128s3 0.164 / 0.169 /
// 0.749 / 0.139 and ws2x128 0.188 / 0.186 / 0.895 / 0.143 (the block-synchronous default: 0.176 /
// 0.187 / 0.894 / 0.140). A pipelined P·V (2 warpgroups, 3 stages) and a quarter of the
// exponentials on the FMA pipe were slower at every shape and were dropped. Run 23: the persistent
// wsp3x128 (one block per SM looping over (query tile, problem) items, the next item's Q loaded
// while the current one's last tiles run) 0.758 / 0.131 ms against ws3x128's 0.802 / 0.146 at
// (8,10,4096,64) / (8,20,1024,64), equal at (2,8,4096,·): the default.
template <typename T, int D>
void ws_forward_for(const FlashParams& p, const std::string& tile) {
  if (tile == "ws3x128") return ws_forward<T, D, 3, 128, 2>(p);
  if (tile == "ws3x128s3") return ws_forward<T, D, 3, 128, 3>(p);
  if (tile == "ws2x128") return ws_forward<T, D, 2, 128, 2>(p);
  if (tile == "wsp3x128") return ws_forward<T, D, 3, 128, 2, true>(p);
  // the same, warpgroups with no query row in an item only passing its barriers (pass_idle_item;
  // opt-in: its tests pass, the SDXL loop gained 0.35 / 0.42 ms in two calls, inside the spread:
  // docs/gpu-bench.md run 25)
  if (tile == "wsp3x128i") return ws_forward<T, D, 3, 128, 2, true, true>(p);
  LOOM_FAIL("LOOM_FLASH_FWD_TILE='", tile, "' is not one of ws3x128, ws3x128s3, ws2x128, wsp3x128, wsp3x128i");
}

}  // namespace

bool flash_wgmma_ws_forward(const FlashParams& p, const std::string& tile) {
  // TMA: 16-byte-aligned bases (the row strides, d·2 and heads·d·2 bytes, are multiples of 16 for
  // d = 40, 64); coordinates in int32
  const int64_t max_len = std::max(p.q_len, p.k_len);
  if (!tensor_maps_available() || !aligned16(p.q) || !aligned16(p.k) || !aligned16(p.v) || max_len >= (int64_t(1) << 31))
    return false;
  if (p.dtype == DType::BF16) {
    if (p.d == 40) ws_forward_for<__nv_bfloat16, 40>(p, tile);
    else ws_forward_for<__nv_bfloat16, 64>(p, tile);
  } else {
    if (p.d == 40) ws_forward_for<__half, 40>(p, tile);
    else ws_forward_for<__half, 64>(p, tile);
  }
  return true;
}

}  // namespace loom::cuda
