// Flash attention forward on Hopper's warpgroup tensor cores (wgmma, sm_90a), head dims 40 and 64,
// bf16 / f16 with f32 accumulation: the same contract and arithmetic as cuda_flash_fwd.cu (log2-
// domain online softmax, O and one natural-log LSE per row), built on the operands wgmma reads
// from shared memory instead of mma.sync's fragments.
//
//   block   kWg warpgroups; warpgroup w owns the 64 query rows i0 + 64w…; keys in tiles of kN.
//   S = Q·Kᵀ   wgmma m64nkNk16 × ⌈d / 16⌉ (d in k-steps of 16; d = 40 zero-padded to 48 in
//              shared memory), Q and K both from shared memory (K-major, rows of 64 elements
//              in the 128-byte swizzle; cuda_wgmma.cuh), S in registers (kN / 2 per thread);
//   softmax    in registers, on mma.sync's C layout (the warpgroup accumulator layout); the
//              row maximum lags by up to kMaxLag (O rescaled only when a warp's rows move), and
//              with kPoly every kPoly-th column block is exponentiated on the FMA pipe;
//   O += P·V   wgmma m64ndk16 × kN / 16, P from registers (the accumulators rounded to T:
//              the A layout), V from shared memory read MN-major (imm-trans-b).
// K and V tiles are cp.async double-buffered (tile it + 1 is copied while tile it is used), made
// visible to wgmma by fence.proxy.async and the barrier that opens each tile.
//
// The default forward is the warp-specialised kernel of cuda_flash_wgmma_ws.cu (same steps, TMA
// loads by a producer warpgroup, no block barrier); this one runs where that cannot, or on request.
//
// Compiled for sm_90a only (tensor/CMakeLists.txt: loom_tensor_sm90a); flash_wgmma_available()
// says whether the current device runs it. Shapes: flash_wgmma_forward's comment.
#include "tensor/cuda/cuda_flash_wgmma_fwd.cuh"

#include <cstdlib>
#include <string>

namespace loom::cuda {

namespace {

// kWg warpgroups of 64 queries, kN-key tiles; kPipe: P·V of tile it − 1 runs on the tensor cores
// while the softmax of tile it runs on the other units (V then needs a third buffer).
template <int kWg, int kN, bool kPipe>
struct WgShape {
  static constexpr int kRows = 64 * kWg;
  static constexpr int kThreads = 128 * kWg;
  static constexpr int kVBufs = kPipe ? 3 : 2;
  // registers: kN / 2 for S, d / 2 for O; two blocks of 2 warpgroups fit an SM with kN = 64
  static constexpr int kMinBlocks = kN == 64 && kWg <= 2 ? 2 : 1;
  // Q [kRows][64], K [2][kN][64], V [kVBufs][kN][64], 1024 bytes of alignment slack
  static constexpr size_t kSmem = 1024 + size_t(kRows + (2 + kVBufs) * kN) * 128;
};

template <typename T, int D, int kWg, int kN, bool kPipe, int kPoly>
__global__ void __launch_bounds__(WgShape<kWg, kN, kPipe>::kThreads, WgShape<kWg, kN, kPipe>::kMinBlocks)
    flash_fwd_wgmma_kernel(const FlashParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = WgShape<kWg, kN, kPipe>;
  constexpr int kRows = S::kRows, kThreads = S::kThreads, kTile = kN * 64;  // elements of a K / V tile
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = align_1024(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK0 = sQ + kRows * 64;    // [2][kN][64]
  T* sV0 = sK0 + 2 * kTile;    // [kVBufs][kN][64]

  const int tid = threadIdx.x, wg = tid / 128, warp = (tid / 32) % 4, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t n = blockIdx.y, i0 = int64_t(blockIdx.x) * kRows;
  const FlashRows qr = flash_rows(p, n, p.q_len, D), kr = flash_rows(p, n, p.k_len, D);
  const T* q = static_cast<const T*>(p.q) + qr.base;
  const T* k = static_cast<const T*>(p.k) + kr.base;
  const T* v = static_cast<const T*>(p.v) + kr.base;
  const T* mask = static_cast<const T*>(p.mask);
  const float sl2 = float(p.scale) * kLog2e;
  auto k_tile = [&](int64_t it) { return sK0 + int(it & 1) * kTile; };
  auto v_tile = [&](int64_t it) { return sV0 + int(it % S::kVBufs) * kTile; };

  int64_t tiles = (p.k_len + kN - 1) / kN;
  if (p.causal) tiles = min(tiles, (i0 + kRows - 1) / kN + 1);

  zero_sw128_pad<D, kRows, kThreads>(sQ, tid);
  zero_sw128_pad<D, (2 + S::kVBufs) * kN, kThreads>(sK0, tid);  // the K and V buffers follow each other
  load_sw128_tile<T, D, kRows, kThreads>(sQ, q, i0, p.q_len, qr.stride, tid);
  if (tiles > 0) {
    load_sw128_tile_pair<T, D, kN, kThreads>(k_tile(0), k, v_tile(0), v, 0, p.k_len, kr.stride, tid);
  }
  cp_async_commit();

  const uint64_t q_desc = sw128_desc(sQ + wg * 64 * 64, 16, 1024);
  float o[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const int64_t row0 = i0 + wg * 64 + warp * 16 + g;
  const int64_t row_q[2] = {row0, row0 + 8};
  uint32_t pa[kN / 16][4];  // P of the tile as A fragments (with kPipe: of the previous tile, in flight)

  for (int64_t it = 0; it < tiles; ++it) {
    cp_async_wait_all();
    fence_async_shared();
    __syncthreads();  // tile it landed for every thread; no warpgroup still reads the buffers refilled next
    if (it + 1 < tiles) {
      load_sw128_tile_pair<T, D, kN, kThreads>(k_tile(it + 1), k, v_tile(it + 1), v, (it + 1) * kN, p.k_len, kr.stride,
                                               tid);
    }
    cp_async_commit();

    float s[kN / 2];  // s[4j + e]: mma.sync's C fragment of column block j
    wgmma_fence();
    wgmma_qk<T, D, kN>(s, q_desc, sw128_desc(k_tile(it), 16, 1024));
    wgmma_commit();
    if (kPipe && it > 0) {  // P·V of the previous tile behind it; wait for S only
      wgmma_pv<T, D, kN>(o, pa, sw128_desc(v_tile(it - 1), 16, 1024));
      wgmma_commit();
      wgmma_wait<1>();
    } else {
      wgmma_wait<0>();
    }
    fence_operands(s);
    float corr[2];
    softmax_tile<T, kN, kPoly>(s, m, l, corr, p, mask, n, i0, it * kN, row_q, t, sl2);
    if constexpr (kPipe) {
      wgmma_wait<0>();
      fence_operands(o);
    }
    rescale_o<D>(o, corr);
    pack_p<T, kN>(pa, s);
    if constexpr (!kPipe) {
      wgmma_fence();
      wgmma_pv<T, D, kN>(o, pa, sw128_desc(v_tile(it), 16, 1024));
      wgmma_commit();
      wgmma_wait<0>();
      fence_operands(o);
    }
  }
  if (kPipe && tiles > 0) {  // the last tile's P·V
    wgmma_fence();
    wgmma_pv<T, D, kN>(o, pa, sw128_desc(v_tile(tiles - 1), 16, 1024));
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands(o);
  }

  T* out = static_cast<T*>(p.out) + qr.base;
  float* lse = static_cast<float*>(p.lse) + n * p.q_len;
  store_output<T, D>(out, lse, qr.stride, p.q_len, o, m, l, row_q, t);
#else
  (void)p;
  __trap();  // built without sm_90a: flash_wgmma_available() is false there
#endif
}

template <typename T, int D, int kWg, int kN, bool kPipe, int kPoly = 0>
void wgmma_forward(const FlashParams& p) {
  using S = WgShape<kWg, kN, kPipe>;
  auto* kernel = flash_fwd_wgmma_kernel<T, D, kWg, kN, kPipe, kPoly>;
  LOOM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(S::kSmem)));
  const dim3 grid(unsigned((p.q_len + S::kRows - 1) / S::kRows), unsigned(p.n));
  kernel<<<grid, S::kThreads, S::kSmem, compute_stream()>>>(p);
  check_last_launch("flash_fwd_wgmma_kernel");
}

template <typename T, int D>
void wgmma_forward_for(const FlashParams& p, const std::string& tile) {
  if (tile == "3x128") return wgmma_forward<T, D, 3, 128, false>(p);
  if (tile == "2x128") return wgmma_forward<T, D, 2, 128, false>(p);
  if (tile == "2x64") return wgmma_forward<T, D, 2, 64, false>(p);
  if (tile == "4x64") return wgmma_forward<T, D, 4, 64, false>(p);
  // 256 queries per block: 16 blocks per (2,·,4096) head against 3x128's 22 (the last one a third
  // full), so the grid ends in fewer partial waves; 512 threads leave ≤ 128 registers each
  if (tile == "4x128") return wgmma_forward<T, D, 4, 128, false>(p);
  if (tile == "4x128e4") return wgmma_forward<T, D, 4, 128, false, 4>(p);
  if (tile == "2x128p") return wgmma_forward<T, D, 2, 128, true>(p);
  // every 4th column block of unmasked tiles exponentiated on the FMA pipe (the default family at d = 40)
  if (tile == "3x128e4") return wgmma_forward<T, D, 3, 128, false, 4>(p);
  LOOM_FAIL("LOOM_FLASH_FWD_TILE='", tile,
            "' is not one of ws3x128, ws3x128s3, ws2x128, wsp3x128, wsp3x128i, sync, 3x128, 3x128e4, 4x128, 4x128e4, 2x128, 2x64, 4x64, 2x128p");
}

template <typename T>
void wgmma_forward_for(const FlashParams& p, const std::string& tile) {
  if (p.d == 40) return wgmma_forward_for<T, 40>(p, tile);
  return wgmma_forward_for<T, 64>(p, tile);
}

// The block-synchronous kernel's block where the warp-specialised one cannot run (or for
// LOOM_FLASH_FWD_TILE=sync): 3 or 4 warpgroups (192 or 256 queries), whichever leaves the grid's
// last wave less empty — blocks of either kind run one per SM, so the cost is ⌈blocks / SMs⌉ waves
// of the block's rows (ties go to 3). H200 (docs/gpu-bench.md, attention run 16): (2,8,4096,·) 352
// blocks of 192 = 3 waves against 256 of 256 = 2 waves, 0.199 against 0.211 ms at d = 40;
// (2,10,4096,64) 4 waves of 192 and 3 of 256 tie, measured 0.313 against 0.327. The cubic exp2 on
// a quarter of the columns pays at d = 40 (run 13: 0.211 against 0.221 ms), not at d = 64
// (0.245 / 0.236).
std::string block_synchronous_tile(const FlashParams& p) {
  const int64_t sms = flash_sm_count();
  auto cost = [&](int64_t rows) {
    const int64_t blocks = (p.q_len + rows - 1) / rows * p.n;
    return (blocks + sms - 1) / sms * rows;
  };
  const std::string wgs = cost(256) < cost(192) ? "4x128" : "3x128";
  return p.d == 40 ? wgs + "e4" : wgs;
}

}  // namespace

bool flash_wgmma_available() {
#if !defined(LOOM_BUILT_FOR_SM90A)
  return false;
#endif
  static const bool available = [] {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) return false;
    return major == 9 && minor == 0;  // sm_90a code runs on compute capability 9.0 only
  }();
  return available;
}

bool flash_wgmma_head_dim(int64_t d) { return d == 40 || d == 64; }

void flash_wgmma_forward(const FlashParams& p) {
  LOOM_CHECK(flash_wgmma_head_dim(p.d) && p.dv == p.d, "flash_wgmma_forward: head dim ", p.d, " is not 40 or 64");
  const char* env = std::getenv("LOOM_FLASH_FWD_TILE");
  // Unset: the warp-specialised kernel with 3 consumer warpgroups, persistent (cuda_flash_wgmma_ws.cu;
  // H200, attention run 22: ws3x128 0.723 against the block-synchronous 0.894 ms at SDXL's
  // (8,10,4096,64), 0.136 against 0.140 at (8,20,1024,64), 0.167 against 0.176 at (2,8,4096,40);
  // run 23: the persistent wsp3x128 0.758 / 0.131 against ws3x128's 0.802 / 0.146 at the two SDXL
  // shapes), where it can run.
  std::string tile = env && *env ? env : "wsp3x128";
  LOOM_CHECK(p.dtype == DType::BF16 || p.dtype == DType::F16, "flash_wgmma_forward: dtype ", p.dtype,
             " is not bf16 / f16");
  if (tile.rfind("ws", 0) == 0) {
    if (flash_wgmma_ws_forward(p, tile)) return;
    tile = "sync";
  }
  if (tile == "sync") tile = block_synchronous_tile(p);
  if (p.dtype == DType::BF16) return wgmma_forward_for<__nv_bfloat16>(p, tile);
  return wgmma_forward_for<__half>(p, tile);
}

}  // namespace loom::cuda
