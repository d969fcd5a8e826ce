// Flash attention backward on Hopper's warpgroup tensor cores (wgmma, sm_90a), head dims 40, 64,
// bf16 / f16 with f32 accumulation: the kernel behind run_bwd_tc's launch step (cuda_flash_bwd.cu
// computes D = rowsum(dO∘O) before it, zeroes the f32 accumulators, and converts them after it,
// scaling dQ and dK), with the same arithmetic as the mma.sync kernel there.
//
//   block   64·kWgs keys j0… (kWgs = 1 or 2 warpgroups × 64 keys), row n, query tiles
//           [first, last) of 64;
//           K and V of the block stay in shared memory; Q, dO, lse, D of tile it + 1 are
//           cp.async'ed while tile it is used. Per query tile and warpgroup w (keys j0 + 64w…):
//     Sᵀ  = K_w·Qᵀ    wgmma m64n64k16 × ⌈d / 16⌉ from shared memory (both K-major; d = 40
//                     zero-padded to 48)
//     dPᵀ = V_w·dOᵀ   likewise
//     Pᵀ  = exp2(Sᵀ·scale·log2e + mask − lse·log2e), dSᵀ = Pᵀ∘(dPᵀ − D)   in registers
//     dV += Pᵀ·dO, dK += dSᵀ·Q   wgmma m64ndk16 × 4, A from registers, B read N-major
//     dSᵀ → shared memory; then dQ's columns split over the warpgroups (one: all d; two: d = 64
//           32 + 32, d = 40 24 + 16) = dS·K[:, those columns] over all the block's keys (wgmma
//           m64nNk16, A read M-major from dSᵀ, B N-major), added into dQ's f32 buffer with vector
//           atomics — or, at d = 40 with one warpgroup (the default there), stored as f32 rows
//           in shared memory and added by one bulk reduction per warp (bulk_dq_part)
//   and at the end dK, dV of the block's keys are added into their f32 buffers, or written as
//   the gradients themselves where the block holds every query tile of its keys (direct_kv).
// The pipelined loop (d = 40 with one warpgroup and bulk dQ, the default there; d = 64 with two
// by LOOM_FLASH_BWD_PIPE=1) runs the same steps with the next tile's Sᵀ, dPᵀ issued behind this
// tile's dQ (the kPipe loop).
// Shared-memory tiles are 128-byte swizzled ([rows][64], cuda_wgmma.cuh).
#include "tensor/cuda/cuda_flash_tc.cuh"
#include "tensor/cuda/cuda_wgmma.cuh"

namespace loom::cuda {

namespace {

constexpr int kBwdRows = 64;     // queries per tile
constexpr int kTileBytes = 64 * 128;  // one [64][64] swizzled tile
// kWgs warpgroups of 64 keys each. Shared memory: K, V [64·kWgs][64]; Q, dO [2][64][64];
// dSᵀ [64·kWgs][64]; lse, D [2][64] f32; 1024 bytes of alignment.
// With kBulkDq, dQ's f32 tile [64][D] follows (bulk_dq_part).
template <int kWgs, int D = 0, bool kBulkDq = false>
constexpr size_t bwd_smem() {
  return 1024 + 2 * kWgs * kTileBytes + 4 * kTileBytes + kWgs * kTileBytes + 4 * kBwdRows * sizeof(float) +
         (kBulkDq ? size_t(kBwdRows) * D * sizeof(float) : 0);
}

// Issues (and commits) dq = dS·K[:, c0…c0+N) over the block's kKeys keys: dSᵀ [kKeys][64] and K
// [kKeys][64] in shared memory (k-step kk = keys 16kk…, 16 rows = 2048 bytes further in both);
// the caller waits for it. dq holds mma.sync C fragments over N: rows g, g + 8 of the warp's 16,
// columns 8j + 2t, + 1.
template <typename T, int N, int kKeys>
__device__ __forceinline__ void issue_dq(float (&dq)[N / 2], const unsigned char* sdS, const T* sK, int c0) {
  const uint64_t ds_desc = sw128_desc(sdS, 16, 1024);
  const uint64_t k_desc = sw128_desc(reinterpret_cast<const unsigned char*>(sK) + 2 * c0, 16, 1024);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kKeys / 16; ++kk) wgmma_ss_ta_tb(dq, ds_desc + kk * 128, k_desc + kk * 128, kk, T());
  wgmma_commit();
}

// The warp's two rows g, g + 8 of dq (columns c0 + 8j + 2t, + 1) into f32 rows ld floats apart
// starting at rows (the warp's first row).
template <int N>
__device__ __forceinline__ void store_dq_rows(float* rows, int ld, const float (&dq)[N / 2], int c0, int g, int t) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int j = 0; j < N / 8; ++j)
      *reinterpret_cast<float2*>(rows + (g + 8 * h) * ld + c0 + 8 * j + 2 * t) =
          make_float2(dq[4 * j + 2 * h], dq[4 * j + 2 * h + 1]);
}

// dQ[i0 + the warp's rows, c0…c0+N) += dq with vector f32 atomics (rows past q_len left out).
template <int D, int N>
__device__ __forceinline__ void add_dq_atomic(const FlashParams& p, const float (&dq)[N / 2], int c0, int64_t n,
                                              int64_t i0, int warp, int g, int t) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t qi = i0 + warp * 16 + g + 8 * h;
    if (qi >= p.q_len) continue;
#pragma unroll
    for (int j = 0; j < N / 8; ++j)
      atomic_add2(p.dq_accum + (n * p.q_len + qi) * D + c0 + 8 * j + 2 * t, dq[4 * j + 2 * h], dq[4 * j + 2 * h + 1]);
  }
}

// dQ[i0…, c0…c0+N) += dS·K[:, c0…c0+N) with vector f32 atomics.
template <typename T, int D, int N, int kKeys>
__device__ __forceinline__ void dq_part(const FlashParams& p, const unsigned char* sdS, const T* sK, int c0, int64_t n,
                                        int64_t i0, int warp, int g, int t) {
  float dq[N / 2];
  issue_dq<T, N, kKeys>(dq, sdS, sK, c0);
  wgmma_wait<0>();
  fence_operands(dq);
  add_dq_atomic<D, N>(p, dq, c0, n, i0, warp, g, t);
}

// The warp's 16 rows r0… of dQ, stored as f32 rows [16][D] at `mine` by every lane, are added into
// dq_accum (those below q_len) by one bulk reduction that lane 0 issues.
template <int D>
__device__ __forceinline__ void send_warp_dq_rows(const FlashParams& p, const float* mine, int64_t n, int64_t r0,
                                                  int lane) {
  fence_async_shared();  // every lane's stores, visible to the bulk-copy engine
  __syncwarp();
  if (lane == 0 && r0 < p.q_len) {
    const int64_t rows = min(int64_t(16), p.q_len - r0);
    bulk_reduce_add_f32(p.dq_accum + (n * p.q_len + r0) * D, mine, uint32_t(rows * D * sizeof(float)));
    bulk_commit();
  }
}

// dQ[i0…i0 + 63, all D columns] += dS·K over the block's kKeys keys (one warpgroup), sent by the
// bulk-copy engine instead of per-thread atomics: each warp stores its 16 rows [16][D] f32 into its
// slice of sdQ (contiguous, like those rows of dq_accum [n, q_len, D]) and its lane 0 issues one
// bulk reduction of them. Lane 0 first waits until its previous reduction has read the slice. At
// D = 40 the rows are 160 bytes, so the float2 stores of a warp meet no bank conflict (D = 64 would
// be 8-way: not offered).
template <typename T, int D, int kKeys>
__device__ __forceinline__ void bulk_dq_part(const FlashParams& p, const unsigned char* sdS, const T* sK, float* sdQ,
                                             int64_t n, int64_t i0, int warp, int lane, int g, int t) {
  static_assert(D == 40, "bulk dQ: rows of 160 bytes only (conflict-free stores)");
  float dq[D / 2];
  issue_dq<T, D, kKeys>(dq, sdS, sK, 0);
  float* mine = sdQ + warp * 16 * D;
  if (lane == 0) bulk_wait_read<0>();  // the previous tile's reduction has read this slice
  __syncwarp();
  wgmma_wait<0>();
  fence_operands(dq);
  store_dq_rows<D>(mine, D, dq, 0, g, t);
  send_warp_dq_rows<D>(p, mine, n, i0 + warp * 16, lane);
}

// Two warpgroups: this warpgroup's columns [c0, c0 + N) of dQ = dS·K over the block's kKeys keys
// into the shared f32 tile sdQ [64][D] (rows as in dq_accum); thread 0 sends the whole tile with
// one bulk reduction after the next block barrier (flush_dq_tile). At D = 64 the float2 stores of a
// warp fall into one 32-byte bank group per row (256-byte rows): 8-way conflicts, accepted.
template <typename T, int D, int N, int kKeys>
__device__ __forceinline__ void dq_part_to_tile(const unsigned char* sdS, const T* sK, float* sdQ, int c0, int warp,
                                                int g, int t) {
  float dq[N / 2];
  issue_dq<T, N, kKeys>(dq, sdS, sK, c0);
  wgmma_wait<0>();
  fence_operands(dq);
  store_dq_rows<N>(sdQ + warp * 16 * D, D, dq, c0, g, t);
  fence_async_shared();  // for the bulk reduction, after the next barrier
}

// Thread 0 adds the tile sdQ of query tile it (rows past q_len left out) into dq_accum by one bulk
// reduction; every thread's stores into it were fenced and a block barrier came since.
template <int D>
__device__ __forceinline__ void flush_dq_tile(const FlashParams& p, const float* sdQ, int64_t n, int64_t it) {
  const int64_t i0 = it * kBwdRows, rows = min(int64_t(kBwdRows), p.q_len - i0);
  bulk_reduce_add_f32(p.dq_accum + (n * p.q_len + i0) * D, sdQ, uint32_t(rows * D * sizeof(float)));
  bulk_commit();
}

// direct_kv: this block is the only one for its keys (no split of the query tiles), so it writes
// dK·scale and dV into p.dk / p.dv_out itself instead of adding into the f32 accumulators.
// Blocks per SM: one of 2 warpgroups; of 1 warpgroup 3 at d = 40 (152 registers), 2 at d = 64
// (3 there, at 166 registers, measured slower: run 12).
// kBulkDq: dQ by bulk reductions instead of atomics — one warpgroup (D = 40): bulk_dq_part, one
// per warp; two warpgroups: dq_part_to_tile, one per block and query tile, sent by thread 0 after
// the next iteration's first barrier (so no barrier is added), the last one after the loop.
// kPipe (kWgs = 1 at D = 40 with kBulkDq, or kWgs = 2 at D = 64): the next tile's Sᵀ / dPᵀ issued
// behind this tile's dQ.
template <typename T, int D, int kWgs, bool kBulkDq = false, bool kPipe = false>
__global__ void __launch_bounds__(128 * kWgs, kWgs == 1 ? (D == 40 ? 3 : 2) : 1)
    flash_bwd_wgmma_kernel(const FlashParams p, int query_tiles_per_block, bool direct_kv) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kBwdKeys = 64 * kWgs, kBwdThreads = 128 * kWgs;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = align_1024(smem_raw);
  T* sK = reinterpret_cast<T*>(smem);                          // [kBwdKeys][64]
  T* sV = reinterpret_cast<T*>(smem + kWgs * kTileBytes);      // [kBwdKeys][64]
  T* sQ0 = reinterpret_cast<T*>(smem + 2 * kWgs * kTileBytes);  // [2][64][64]
  T* sdO0 = reinterpret_cast<T*>(smem + (2 * kWgs + 2) * kTileBytes);  // [2][64][64]
  unsigned char* sdS = smem + (2 * kWgs + 4) * kTileBytes;             // dSᵀ [kBwdKeys keys][64 queries]
  float* sL0 = reinterpret_cast<float*>(smem + (3 * kWgs + 4) * kTileBytes);  // [2][64] raw lse (natural log)
  float* sD0 = sL0 + 2 * kBwdRows;                                            // [2][64]
  float* sdQ = sD0 + 2 * kBwdRows;  // kBulkDq: [64][D] f32
  static_assert(!kBulkDq || kWgs == 2 || D == 40, "bulk dQ with one warpgroup: d = 40 only");
  constexpr bool kTileDq = kBulkDq && kWgs == 2;  // dq_part_to_tile + flush_dq_tile

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid / 32) % 4, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t n = blockIdx.y, j0 = int64_t(blockIdx.x) * kBwdKeys;
  const FlashRows qr = flash_rows(p, n, p.q_len, D), kr = flash_rows(p, n, p.k_len, D);
  const T* q = static_cast<const T*>(p.q) + qr.base;
  const T* k = static_cast<const T*>(p.k) + kr.base;
  const T* v = static_cast<const T*>(p.v) + kr.base;
  const T* dout = static_cast<const T*>(p.grad_out) + qr.base;
  const float* lse = static_cast<const float*>(p.lse) + n * p.q_len;
  const float* delta = static_cast<const float*>(p.delta) + n * p.q_len;
  const T* mask = static_cast<const T*>(p.mask);
  const float sl2 = float(p.scale) * kLog2e;

  // query tiles of this block: [first, last)
  const int64_t all_tiles = (p.q_len + kBwdRows - 1) / kBwdRows;
  int64_t first = int64_t(blockIdx.z) * query_tiles_per_block;
  const int64_t last = min(all_tiles, first + query_tiles_per_block);
  if (p.causal) first = max(first, j0 / kBwdRows);  // earlier query tiles see none of these keys

  // Q, dO, lse, D of query tile `it` into buffer `buf` (zero past q_len: such rows have dO = 0
  // and D = 0, so whatever P they get adds nothing to dV, dK; dQ skips them).
  auto load_query_tile = [&](int64_t it, int buf) {
    const int64_t i0 = it * kBwdRows;
    load_sw128_tile_pair<T, D, kBwdRows, kBwdThreads>(sQ0 + buf * 64 * 64, q, sdO0 + buf * 64 * 64, dout, i0,
                                                       p.q_len, qr.stride, tid);
    if (tid < 2 * kBwdRows) {
      const int rr = tid % kBwdRows;
      const bool in = i0 + rr < p.q_len;
      if (tid < kBwdRows) cp_async4(sL0 + buf * kBwdRows + rr, in ? lse + i0 + rr : lse, in);
      else cp_async4(sD0 + buf * kBwdRows + rr, in ? delta + i0 + rr : delta, in);
    }
  };
  zero_sw128_pad<D, (2 * kWgs + 4) * 64, kBwdThreads>(sK, tid);  // K, V, then Q and dO [2] follow each other
  load_sw128_tile_pair<T, D, kBwdKeys, kBwdThreads>(sK, k, sV, v, j0, p.k_len, kr.stride, tid);
  if (first < last) load_query_tile(first, 0);
  cp_async_commit();

  float dk[D / 2], dv[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) dk[i] = dv[i] = 0.f;
  const uint64_t k_desc = sw128_desc(reinterpret_cast<unsigned char*>(sK) + wg * kTileBytes, 16, 1024);
  const uint64_t v_desc = sw128_desc(reinterpret_cast<unsigned char*>(sV) + wg * kTileBytes, 16, 1024);
  const int key_local = wg * 64 + warp * 16 + g;  // this thread's key rows key_local, key_local + 8

  // Sᵀ = K_w·Qᵀ and dPᵀ = V_w·dOᵀ of the query tile in buffer buf, [64 keys][64 queries] each:
  // issued as two groups (Sᵀ first).
  auto issue_s_dp = [&](float (&st)[32], float (&dpt)[32], int buf) {
    const uint64_t q_desc = sw128_desc(sQ0 + buf * 64 * 64, 16, 1024);
    const uint64_t do_desc = sw128_desc(sdO0 + buf * 64 * 64, 16, 1024);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < (D + 15) / 16; ++kk) wgmma_ss(st, k_desc + 2 * kk, q_desc + 2 * kk, kk, T());
    wgmma_commit();
#pragma unroll
    for (int kk = 0; kk < (D + 15) / 16; ++kk) wgmma_ss(dpt, v_desc + 2 * kk, do_desc + 2 * kk, kk, T());
    wgmma_commit();
  };
  // Waits for Sᵀ (the second-newest group) and turns it into Pᵀ, then for dPᵀ (the newest) and
  // computes dSᵀ = Pᵀ∘(dPᵀ − D) (unscaled: the conversion scales dQ and dK); both as A fragments
  // pa, dsa, and dSᵀ to shared memory as bf16 / f16 pairs (row key, columns 2t, 2t + 1 of chunk j).
  auto p_and_ds = [&](float (&st)[32], float (&dpt)[32], uint32_t (&pa)[4][4], uint32_t (&dsa)[4][4], int64_t i0,
                      int buf) {
    const float* sL = sL0 + buf * kBwdRows;
    const float* sD = sD0 + buf * kBwdRows;
    wgmma_wait<1>();
    fence_operands(st);
    // Pᵀ = exp2(s2 − L2): element (key row key_local + 8·(e / 2), query column 8j + 2t + (e & 1))
    // The interior-tile path (no mask, no key past k_len, no causal cut) is its own copy of the
    // loop: left to the compiler, whether it made one depended on unrelated code, and one copy
    // with the checks inside measured ~22% slower at d = 64 (1.256 against 0.975 ms, run 12).
    auto exp_tile = [&](auto plain_tag) {
      constexpr bool kPlain = decltype(plain_tag)::value;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ql = j * 8 + 2 * t + (e & 1);
          float x = st[4 * j + e] * sl2;
          if constexpr (!kPlain) {
            const int64_t qi = i0 + ql, kj = j0 + key_local + (e / 2) * 8;
            if (kj >= p.k_len || (p.causal && kj > qi)) x = -INFINITY;
            else if (mask && qi < p.q_len) x += mask_log2(p, mask, n, qi, kj);
          }
          st[4 * j + e] = fast_exp2(x - sL[ql] * kLog2e);
        }
      }
    };
    if (!mask && j0 + kBwdKeys <= p.k_len && (!p.causal || i0 >= j0 + kBwdKeys - 1)) exp_tile(std::true_type());
    else exp_tile(std::false_type());
    wgmma_wait<0>();
    fence_operands(dpt);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dpt[4 * j + e] = st[4 * j + e] * (dpt[4 * j + e] - sD[j * 8 + 2 * t + (e & 1)]);
      const uint32_t lo = Half2<T>::pack(dpt[4 * j + 0], dpt[4 * j + 1]);
      const uint32_t hi = Half2<T>::pack(dpt[4 * j + 2], dpt[4 * j + 3]);
      *reinterpret_cast<uint32_t*>(sdS + sw128_offset(key_local, j) + 4 * t) = lo;
      *reinterpret_cast<uint32_t*>(sdS + sw128_offset(key_local + 8, j) + 4 * t) = hi;
      dsa[j / 2][(j % 2) * 2 + 0] = lo;
      dsa[j / 2][(j % 2) * 2 + 1] = hi;
      pa[j / 2][(j % 2) * 2 + 0] = Half2<T>::pack(st[4 * j + 0], st[4 * j + 1]);
      pa[j / 2][(j % 2) * 2 + 1] = Half2<T>::pack(st[4 * j + 2], st[4 * j + 3]);
    }
  };
  // dV += Pᵀ·dO, dK += dSᵀ·Q of the tile in buffer buf: k-step kk = queries 16kk… (rows of the
  // tiles: 16·128·kk bytes); one group. (Sending dV before dS is computed, to overlap the two,
  // measured no faster: run 12.)
  auto issue_dv_dk = [&](const uint32_t (&pa)[4][4], const uint32_t (&dsa)[4][4], int buf) {
    const uint64_t q_desc = sw128_desc(sQ0 + buf * 64 * 64, 16, 1024);
    const uint64_t do_desc = sw128_desc(sdO0 + buf * 64 * 64, 16, 1024);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kBwdRows / 16; ++kk) wgmma_rs_tb(dv, pa[kk], do_desc + kk * 128, 1, T());
#pragma unroll
    for (int kk = 0; kk < kBwdRows / 16; ++kk) wgmma_rs_tb(dk, dsa[kk], q_desc + kk * 128, 1, T());
    wgmma_commit();
  };

  if constexpr (kPipe) {
    // The next tile's Sᵀ and dPᵀ on the tensor cores while this tile's dQ is finished and sent,
    // the barrier passed and the tile after next requested: per tile, once dV / dK are done,
    // Sᵀ(it + 1), dPᵀ(it + 1) are issued behind dQ(it) and waited for at the end of the iteration,
    // so that no group is in flight across the loop's back edge (ptxas serialises every wgmma of
    // the kernel otherwise: C7515). On the last tile the issue reads buffer buf ^ 1 anyway and its
    // result is dropped. Q, dO of tile it + 1 are loaded during tile it (buffer buf ^ 1) and have
    // landed by the barrier after dSᵀ; tile it + 2 goes into buffer buf once every warp is done
    // with it. dQ: one warpgroup at d = 40 all columns, by a bulk reduction per warp; two at
    // d = 64 32 columns each, by atomics or (kTileDq) the shared tile, flushed after the barrier.
    static_assert((kWgs == 1 && D == 40 && kBulkDq) || (kWgs == 2 && D == 64),
                  "the pipelined loop: one warpgroup at d = 40 with bulk dQ, or two at d = 64");
    constexpr int kN = kWgs == 1 ? D : D / 2;  // dQ columns of this warpgroup
    const int c0 = kN * wg;
    if (first + 1 < last) load_query_tile(first + 1, 1);
    cp_async_commit();
    float st[32], dpt[32];
    if (first < last) {
      cp_async_wait_all();
      fence_async_shared();
      __syncthreads();  // K, V and tiles first, first + 1 landed
      issue_s_dp(st, dpt, 0);
      wgmma_wait<0>();
    }
    for (int64_t it = first; it < last; ++it) {
      const int64_t i0 = it * kBwdRows;
      const int buf = int((it - first) & 1);
      uint32_t pa[4][4], dsa[4][4];
      p_and_ds(st, dpt, pa, dsa, i0, buf);  // its waits find nothing in flight
      issue_dv_dk(pa, dsa, buf);
      cp_async_wait_all();
      fence_async_shared();
      if constexpr (kTileDq) {
        if (tid == 0) bulk_wait_read<0>();  // the previous tile's reduction has read sdQ
      }
      __syncthreads();  // dSᵀ written by every warp; tile it + 1 landed
      float dq[kN / 2];
      issue_dq<T, kN, kBwdKeys>(dq, sdS, sK, c0);
      wgmma_wait<1>();  // dV, dK: pa, dsa and buffer buf's Q, dO are free
      issue_s_dp(st, dpt, buf ^ 1);
      float* mine = sdQ + warp * 16 * D;
      if constexpr (kBulkDq && !kTileDq) {
        if (lane == 0) bulk_wait_read<0>();  // the previous tile's reduction has read this slice
        __syncwarp();
      }
      wgmma_wait<2>();  // dQ
      fence_operands(dq);
      if constexpr (kTileDq) {
        store_dq_rows<kN>(mine, D, dq, c0, g, t);
        fence_async_shared();  // for the flush after the barrier below
      } else if constexpr (kBulkDq) {
        store_dq_rows<kN>(mine, D, dq, c0, g, t);
        send_warp_dq_rows<D>(p, mine, n, i0 + warp * 16, lane);
      } else {
        add_dq_atomic<D, kN>(p, dq, c0, n, i0, warp, g, t);
      }
      __syncthreads();  // no warp still reads buffer buf or dSᵀ (and sdQ is complete)
      if constexpr (kTileDq) {
        if (tid == 0) flush_dq_tile<D>(p, sdQ, n, it);
      }
      if (it + 2 < last) load_query_tile(it + 2, buf);
      cp_async_commit();
      wgmma_wait<0>();  // Sᵀ(it + 1), dPᵀ(it + 1)
    }
    fence_operands(dk);
    fence_operands(dv);
  } else {
    for (int64_t it = first; it < last; ++it) {
      const int64_t i0 = it * kBwdRows;
      const int buf = int((it - first) & 1);
      cp_async_wait_all();
      fence_async_shared();
      __syncthreads();  // tile it landed; no warpgroup still reads the other buffers or dSᵀ
      if (it + 1 < last) load_query_tile(it + 1, buf ^ 1);
      cp_async_commit();
      if constexpr (kTileDq) {
        if (tid == 0 && p.dq_accum && it > first) flush_dq_tile<D>(p, sdQ, n, it - 1);
      }
      float st[32], dpt[32];
      issue_s_dp(st, dpt, buf);
      uint32_t pa[4][4], dsa[4][4];
      p_and_ds(st, dpt, pa, dsa, i0, buf);
      issue_dv_dk(pa, dsa, buf);
      if (p.dq_accum) {  // the same for the whole block
        fence_async_shared();
        if constexpr (kTileDq) {
          if (tid == 0) bulk_wait_read<0>();  // the previous tile's reduction has read sdQ
        }
        __syncthreads();  // dSᵀ of both warpgroups written (and sdQ free again)
        // dQ's columns: one warpgroup all of them; two: d = 64 32·wg…32·wg + 31, d = 40 [0, 24)
        // from warpgroup 0, [24, 40) from warpgroup 1
        if constexpr (kTileDq) {
          if constexpr (D == 64) {
            dq_part_to_tile<T, D, 32, kBwdKeys>(sdS, sK, sdQ, 32 * wg, warp, g, t);
          } else {
            if (wg == 0) dq_part_to_tile<T, D, 24, kBwdKeys>(sdS, sK, sdQ, 0, warp, g, t);
            else dq_part_to_tile<T, D, 16, kBwdKeys>(sdS, sK, sdQ, 24, warp, g, t);
          }
        } else if constexpr (kBulkDq) {
          bulk_dq_part<T, D, kBwdKeys>(p, sdS, sK, sdQ, n, i0, warp, lane, g, t);
        } else if constexpr (kWgs == 1) {
          dq_part<T, D, D, kBwdKeys>(p, sdS, sK, 0, n, i0, warp, g, t);
        } else if constexpr (D == 64) {
          dq_part<T, D, 32, kBwdKeys>(p, sdS, sK, 32 * wg, n, i0, warp, g, t);
        } else {
          if (wg == 0) dq_part<T, D, 24, kBwdKeys>(p, sdS, sK, 0, n, i0, warp, g, t);
          else dq_part<T, D, 16, kBwdKeys>(p, sdS, sK, 24, n, i0, warp, g, t);
        }
      }
      wgmma_wait<0>();
      fence_operands(dk);
      fence_operands(dv);
    }
  }
  cp_async_wait_all();  // a block with no query tile (causal) still has K/V copies in flight
  if constexpr (kTileDq) {
    if (!kPipe && p.dq_accum && first < last) {  // (the pipelined loop flushed every tile itself)
      __syncthreads();  // the last tile's dQ stored by both warpgroups
      if (tid == 0) flush_dq_tile<D>(p, sdQ, n, last - 1);
    }
    if (tid == 0) bulk_wait<0>();  // sdQ must outlive the reductions reading it
  } else if constexpr (kBulkDq) {
    if (lane == 0) bulk_wait<0>();  // sdQ must outlive the reductions reading it
  }
  const float dk_scale = float(p.scale);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t kj = j0 + key_local + 8 * h;
    if (kj >= p.k_len) continue;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int c = j * 8 + 2 * t, e = 4 * j + 2 * h;
      if (direct_kv) {  // the gradients in the layout of k: row kj of head n
        const int64_t at = kr.base + kj * kr.stride + c;
        if (p.dk)
          *reinterpret_cast<uint32_t*>(static_cast<T*>(p.dk) + at) =
              Half2<T>::pack(dk[e] * dk_scale, dk[e + 1] * dk_scale);
        if (p.dv_out)
          *reinterpret_cast<uint32_t*>(static_cast<T*>(p.dv_out) + at) = Half2<T>::pack(dv[e], dv[e + 1]);
      } else {
        const int64_t off = (n * p.k_len + kj) * D + c;
        if (p.dk_accum) atomic_add2(p.dk_accum + off, dk[e], dk[e + 1]);
        if (p.dv_accum) atomic_add2(p.dv_accum + off, dv[e], dv[e + 1]);
      }
    }
  }
#else
  (void)p, (void)query_tiles_per_block, (void)direct_kv;
  __trap();  // built without sm_90a: flash_wgmma_available() is false there
#endif
}

// Where dQ goes by bulk reductions (one per warp and query tile, or one per block and query tile
// with two warpgroups) instead of per-thread f32 atomics: LOOM_FLASH_BWD_DQ_BULK = 0 (nowhere: 0),
// 1 (the one-warpgroup kernel at d = 40: 1), all (the default: also the two-warpgroup kernel: 2).
int flash_wgmma_bulk_dq() {
  const char* env = std::getenv("LOOM_FLASH_BWD_DQ_BULK");
  const std::string v = env ? env : "";
  LOOM_CHECK(v.empty() || v == "0" || v == "1" || v == "all", "LOOM_FLASH_BWD_DQ_BULK='", v,
             "' is not 0, 1 or all");
  // H200 (docs/gpu-bench.md attention run 14): (2,8,4096,40) fwd+bwd 0.719 ms with bulk
  // reductions against 0.793 with per-thread atomics; the SD 1.5 block step 2.130 against 2.211.
  // Run 16: "all" (the two-warpgroup kernel too) takes (2,8,4096,64) from 0.949 to 0.922 ms: the
  // default.
  if (v == "0") return 0;
  return v == "1" ? 1 : 2;
}

// Whether the kernel of `warpgroups` warpgroups issues the next query tile's Sᵀ / dPᵀ while this
// tile's dQ is computed and sent. LOOM_FLASH_BWD_PIPE: 1 / 0 force the pipelined loop on / off;
// unset: on for the one-warpgroup kernel (d = 40), off for the two-warpgroup one (d = 64). H200, attention run 19 (tiles loaded by
// load_sw128_tiles): (2,8,4096,40) fwd+bwd 0.635 ms pipelined against 0.668; (2,8,4096,64) 0.805
// against 0.730, (2,10,4096,64) 1.045 against 0.963.
bool flash_wgmma_backward_pipelined(int warpgroups) {
  const char* env = std::getenv("LOOM_FLASH_BWD_PIPE");
  const std::string v = env ? env : "";
  LOOM_CHECK(v.empty() || v == "0" || v == "1", "LOOM_FLASH_BWD_PIPE='", v, "' is not 0 or 1");
  if (v.empty()) return warpgroups == 1;
  return v == "1";
}

}  // namespace

int flash_wgmma_backward_keys(int64_t d) {
  const char* keys = std::getenv("LOOM_FLASH_BWD_WGMMA_KEYS");
  const std::string k = keys ? keys : "";
  LOOM_CHECK(k.empty() || k == "64" || k == "128", "LOOM_FLASH_BWD_WGMMA_KEYS='", k, "' is not 64 or 128");
  if (!k.empty()) return k == "64" ? 64 : 128;
  // H200, docs/gpu-bench.md run 12: (2,8,4096,40) fwd+bwd 0.817 ms with 64 keys (3 blocks per SM)
  // against 0.847 with 128; (2,8,4096,64) 0.975 with 128 against 1.013 with 64 (2 blocks per SM)
  return d == 40 ? 64 : 128;
}

void flash_wgmma_backward_launch(const FlashParams& p, int keys_per_block, int64_t key_blocks, int64_t splits,
                                 int query_tiles_per_block, bool direct_kv) {
  LOOM_CHECK(flash_wgmma_head_dim(p.d) && p.dv == p.d, "flash_wgmma_backward_launch: head dim ", p.d,
             " is not 40 or 64");
  LOOM_CHECK(keys_per_block == 64 || keys_per_block == 128, "flash_wgmma_backward_launch: ", keys_per_block,
             " keys per block (64 or 128)");
  const dim3 grid(unsigned(key_blocks), unsigned(p.n), unsigned(splits));
  const int wgs = keys_per_block / 64;
  auto launch = [&](auto* kernel, size_t smem) {
    LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    kernel<<<grid, 128 * wgs, smem, compute_stream()>>>(p, query_tiles_per_block, direct_kv);
    check_last_launch("flash_bwd_wgmma_kernel");
  };
  const int bulk = flash_wgmma_bulk_dq();  // 0 none, 1 one warpgroup at d = 40, 2 also two warpgroups
  const bool bulk_dq = wgs == 1 ? p.d == 40 && bulk >= 1 : bulk == 2;
  // the pipelined loop (LOOM_FLASH_BWD_PIPE=1): one warpgroup at d = 40 with bulk dQ, two at d = 64
  const bool pipe = p.dq_accum && flash_wgmma_backward_pipelined(wgs) &&
                    ((wgs == 1 && bulk_dq) || (wgs == 2 && p.d == 64));
  auto for_dtype = [&](auto tag) {
    using T = decltype(tag);
    if (pipe && wgs == 1) return launch(flash_bwd_wgmma_kernel<T, 40, 1, true, true>, bwd_smem<1, 40, true>());
    if (pipe && bulk_dq) return launch(flash_bwd_wgmma_kernel<T, 64, 2, true, true>, bwd_smem<2, 64, true>());
    if (pipe) return launch(flash_bwd_wgmma_kernel<T, 64, 2, false, true>, bwd_smem<2>());
    if (bulk_dq && wgs == 1) return launch(flash_bwd_wgmma_kernel<T, 40, 1, true>, bwd_smem<1, 40, true>());
    if (bulk_dq)
      return p.d == 40 ? launch(flash_bwd_wgmma_kernel<T, 40, 2, true>, bwd_smem<2, 40, true>())
                       : launch(flash_bwd_wgmma_kernel<T, 64, 2, true>, bwd_smem<2, 64, true>());
    if (wgs == 1)
      return p.d == 40 ? launch(flash_bwd_wgmma_kernel<T, 40, 1>, bwd_smem<1>())
                       : launch(flash_bwd_wgmma_kernel<T, 64, 1>, bwd_smem<1>());
    return p.d == 40 ? launch(flash_bwd_wgmma_kernel<T, 40, 2>, bwd_smem<2>())
                     : launch(flash_bwd_wgmma_kernel<T, 64, 2>, bwd_smem<2>());
  };
  if (p.dtype == DType::BF16) return for_dtype(__nv_bfloat16());
  if (p.dtype == DType::F16) return for_dtype(__half());
  LOOM_FAIL("flash_wgmma_backward_launch: dtype ", p.dtype, " is not bf16 / f16");
}

}  // namespace loom::cuda
