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
// Compiled for sm_90a only (tensor/CMakeLists.txt: loom_tensor_sm90a); flash_wgmma_available()
// says whether the current device runs it. Shapes: flash_wgmma_forward's comment.
#include "tensor/cuda/cuda_flash_tc.cuh"
#include "tensor/cuda/cuda_wgmma.cuh"

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

// s = Q·Kᵀ for the warpgroup's 64 queries and the kN keys of the tile (issued, not waited for).
template <typename T, int D, int kN>
__device__ __forceinline__ void wgmma_qk(float (&s)[kN / 2], uint64_t q_desc, uint64_t k_desc) {
#pragma unroll
  for (int kk = 0; kk < (D + 15) / 16; ++kk)  // the k-slice 16kk…: 32 bytes further in each row
    wgmma_ss(s, q_desc + 2 * kk, k_desc + 2 * kk, kk, T());
}

// o += P·V with P in A fragments pa (k-step kk = keys 16kk…) and V's [kN][64] tile (issued).
template <typename T, int D, int kN>
__device__ __forceinline__ void wgmma_pv(float (&o)[D / 2], const uint32_t (&pa)[kN / 16][4], uint64_t v_desc) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) wgmma_rs_tb(o, pa[kk], v_desc + kk * (16 * 128 >> 4), 1, T());
}

// P (kN / 2 accumulators of mma.sync's C layout, column blocks j) as wgmma A fragments: k-step kk
// is column blocks 2kk and 2kk + 1.
template <typename T, int kN>
__device__ __forceinline__ void pack_p(uint32_t (&pa)[kN / 16][4], const float (&s)[kN / 2]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
    pa[kk][0] = Half2<T>::pack(s[8 * kk + 0], s[8 * kk + 1]);
    pa[kk][1] = Half2<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
    pa[kk][2] = Half2<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
    pa[kk][3] = Half2<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

// O's rows g (corr[0]) and g + 8 (corr[1]) times corr, when any row of the warp moved (rare after
// the first tiles).
template <int D>
__device__ __forceinline__ void rescale_o(float (&o)[D / 2], const float (&corr)[2]) {
  if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[4 * j] *= corr[0], o[4 * j + 1] *= corr[0], o[4 * j + 2] *= corr[1], o[4 * j + 3] *= corr[1];
  }
}

// 2^x for x ≤ 8 on the FMA pipe instead of the MUFU unit (which does 16 ex2 per SM and clock,
// an eighth of the FMA rate): x = n + f with n = round(x) (the 1.5·2²³ trick), 2^f by a cubic on
// [−0.5, 0.5] (minimax in relative error, 7.5e-5: below half an f16 ulp, far below bf16's), 2^n
// added to the exponent bits. x is clamped at −125 (2^x then ~1e-38 instead of 0): only for tiles
// whose scores are all finite.
__device__ __forceinline__ float poly_exp2(float x) {
  x = fmaxf(x, -125.f);
  const float t = x + 12582912.f;  // n in the low mantissa bits of t
  const float f = x - (t - 12582912.f);
  float p = fmaf(fmaf(fmaf(0.05517085269f, f, 0.2426093966f), f, 0.6932609677f), f, 0.9999281764f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));
}

// Row h of this thread's scores: s ← 2^(s·fs − shift), every kPoly-th column block through
// poly_exp2 (kPoly = 0: all on the MUFU unit); returns their sum.
template <int kN, int kPoly>
__device__ __forceinline__ float exp_row(float (&s)[kN / 2], int h, float fs, float shift) {
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
    float& a = s[4 * j + 2 * h];
    float& b = s[4 * j + 2 * h + 1];
    bool on_fma = false;
    if constexpr (kPoly > 0) on_fma = j % kPoly == kPoly - 1;
    if (on_fma) {
      a = poly_exp2(fmaf(a, fs, -shift));
      b = poly_exp2(fmaf(b, fs, -shift));
    } else {
      a = fast_exp2(fmaf(a, fs, -shift));
      b = fast_exp2(fmaf(b, fs, -shift));
    }
    sum += a + b;
  }
  return sum;
}

// One tile of the online softmax for this thread's rows row_q[0] (g) and row_q[1] (g + 8): s
// (raw scores of keys j0…) becomes P = exp2(s·scale·log2e + mask − m); m and l are updated and
// corr[h] = exp2(m_old − m_new) is what O must be multiplied by before P·V is added (exactly 1 when
// m stayed: m moves only when the tile's maximum exceeds it by more than kMaxLag). Tiles without
// masked entries exponentiate every kPoly-th column block on the FMA pipe (0: none).
template <typename T, int kN, int kPoly>
__device__ __forceinline__ void softmax_tile(float (&s)[kN / 2], float (&m)[2], float (&l)[2], float (&corr)[2],
                                             const FlashParams& p, const T* mask, int64_t n, int64_t i0, int64_t j0,
                                             const int64_t (&row_q)[2], int t, float sl2) {
  const bool plain = !mask && j0 + kN <= p.k_len && (!p.causal || j0 + kN - 1 <= i0);
  float fs = sl2;  // log2-domain score = s · fs (plain tiles keep s raw: the scale rides in the FFMA)
  if (!plain) {
    fs = 1.f;
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t kj = j0 + j * 8 + 2 * t + (e & 1), qi = row_q[e / 2];
        float x = s[4 * j + e] * sl2;
        if (kj >= p.k_len || (p.causal && kj > qi)) x = -INFINITY;
        else if (mask && qi < p.q_len) x += mask_log2(p, mask, n, qi, kj);
        s[4 * j + e] = x;
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    mx *= fs;  // fs > 0
    const float m_new = mx > m[h] + kMaxLag ? mx : m[h];  // m = −inf takes any finite mx
    const float shift = m_new == -INFINITY ? 0.f : m_new;  // a row masked so far keeps P = 0
    corr[h] = m_new == m[h] ? 1.f : fast_exp2(m[h] - shift);
    const float sum = plain ? exp_row<kN, kPoly>(s, h, fs, shift) : exp_row<kN, 0>(s, h, fs, shift);
    l[h] = l[h] * corr[h] + sum;  // this thread's share of the row; summed over the 4 lanes at the end
    m[h] = m_new;
  }
}

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
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    const int64_t qi = row_q[h];
    if (qi >= p.q_len) continue;
    const float inv = 1.f / l[h];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const uint32_t packed = Half2<T>::pack(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
      *reinterpret_cast<uint32_t*>(out + qi * qr.stride + j * 8 + 2 * t) = packed;
    }
    if (t == 0) lse[qi] = (m[h] + log2f(l[h])) * kLn2;
  }
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
  LOOM_FAIL("LOOM_FLASH_FWD_TILE='", tile, "' is not one of 3x128, 3x128e4, 4x128, 4x128e4, 2x128, 2x64, 4x64, 2x128p");
}

template <typename T>
void wgmma_forward_for(const FlashParams& p, const std::string& tile) {
  if (p.d == 40) return wgmma_forward_for<T, 40>(p, tile);
  return wgmma_forward_for<T, 64>(p, tile);
}

// The block when LOOM_FLASH_FWD_TILE is unset: 3 or 4 warpgroups (192 or 256 queries), whichever
// leaves the grid's last wave less empty — blocks of either kind run one per SM, so the cost is
// ⌈blocks / SMs⌉ waves of the block's rows (ties go to 3). H200 (docs/gpu-bench.md, attention run
// 16): (2,8,4096,·) 352 blocks of 192 = 3 waves against 256 of 256 = 2 waves, 0.199 against 0.211 ms
// at d = 40; (2,10,4096,64) 4 waves of 192 and 3 of 256 tie, measured 0.313 against 0.327. The
// cubic exp2 on a quarter of the columns pays at d = 40 (run 13: 0.211 against 0.221 ms), not at
// d = 64 (0.245 / 0.236).
std::string default_forward_tile(const FlashParams& p) {
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
  const std::string tile = env && *env ? env : default_forward_tile(p);
  if (p.dtype == DType::BF16) return wgmma_forward_for<__nv_bfloat16>(p, tile);
  if (p.dtype == DType::F16) return wgmma_forward_for<__half>(p, tile);
  LOOM_FAIL("flash_wgmma_forward: dtype ", p.dtype, " is not bf16 / f16");
}

}  // namespace loom::cuda
