// Internal to tensor/cuda/cuda_flash_wgmma*.cu (sm_90a): the forward's per-tile steps on
// Hopper's warpgroup tensor cores, shared by the block-synchronous kernel (cuda_flash_wgmma.cu)
// and the warp-specialised one (cuda_flash_wgmma_ws.cu): S = Q·Kᵀ and O += P·V as wgmma, the
// online softmax on the accumulator layout (cuda_wgmma.cuh), O's rescale and the final store.
// Arithmetic and layouts: the comment at the top of cuda_flash_wgmma.cu.
#pragma once

#include "tensor/cuda/cuda_flash_tc.cuh"
#include "tensor/cuda/cuda_wgmma.cuh"

namespace loom::cuda {
namespace {

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

// Writes this thread's two rows row_q[0] (g) and row_q[1] (g + 8) of O / l (l summed over the
// row's 4 lanes here) through store_output_row (rows `stride` apart; lane t = 0 writes the row's
// LSE at lse[row]); rows ≥ q_len are not written. o is the warpgroup accumulator: column block j
// at o[4j…4j + 3], the [D / 8][4] fragments store_output_row reads.
template <typename T, int D>
__device__ __forceinline__ void store_output(T* out, float* lse, int64_t stride, int64_t q_len, const float (&o)[D / 2],
                                             const float (&m)[2], float (&l)[2], const int64_t (&row_q)[2], int t) {
  const auto& blocks = reinterpret_cast<const float(&)[D / 8][4]>(o);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    const int64_t qi = row_q[h];
    if (qi < q_len) store_output_row<T, D>(out + qi * stride, lse + qi, blocks, h, m[h], l[h], t);
  }
}

}  // namespace
}  // namespace loom::cuda
