// Counter-based random numbers shared by the CPU and CUDA kernels (tensor/cpu/cpu_random.cpp,
// tensor/cuda/cuda_random.cu): Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
// 1, 2, 3", SC11; Random123's philox4x32 with 10 rounds, the generator cuRAND and PyTorch use) and
// the transformations of its output into uniform, normal and dropout-mask values.
//
// Element i of a tensor drawn with (seed, offset) is a pure function of one Philox block:
//   key = (seed low 32 bits, seed high 32 bits), counter = (c, c >> 32, 0, 0) with c = offset + i,
// so a draw of n elements uses the counters [offset, offset + n) and the next draw that must not
// overlap starts at offset + n. The block's four words x0..x3 become:
//   uniform (storage dtype with d significand bits: f64 53, f32 24, f16 11, bf16 8):
//     u = top d bits of the 53-bit integer (x0·2³² + x1) >> 11, times 2⁻ᵈ: exactly representable, in [0, 1)
//   normal (Box–Muller): u1 = (k1 + 1)·2⁻⁵³ ∈ (0, 1] from (x0, x1), u2 = k2·2⁻⁵³ ∈ [0, 1) from (x2, x3),
//     z = √(−2 ln u1) · cos(2π u2) in double, rounded to the storage dtype (bf16/f16 through float)
//   dropout mask: 1/(1 − p) where k1·2⁻⁵³ ≥ p (kept), else 0 (so P(keep) = 1 − p).
//
// Bit-identical on both devices: only integer arithmetic and correctly rounded IEEE double
// +, −, ×, /, √ are used (ln and cos are evaluated here by polynomials, never by libm or CUDA's
// math library), and the files that include this header are compiled without FMA contraction
// (-ffp-contract=off on the CPU, --fmad=false for nvcc).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LOOM_HD __host__ __device__ __forceinline__
#else
#define LOOM_HD inline
#endif

namespace loom::philox {

struct Block {
  uint32_t x[4];
};

// One Philox4x32-10 block: the counter ctr[0..3] encrypted under the key key[0..1].
LOOM_HD Block philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // multipliers
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // Weyl key increments
  for (int round = 0; round < 10; ++round) {
    if (round > 0) k0 += kW0, k1 += kW1;
    const uint64_t p0 = uint64_t(kM0) * c0, p1 = uint64_t(kM1) * c2;
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0), hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
  }
  return {{c0, c1, c2, c3}};
}

// The block of element `index` of a draw with (seed, offset) (counter wraps modulo 2⁶⁴).
LOOM_HD Block element_block(uint64_t seed, uint64_t offset, uint64_t index) {
  const uint64_t c = offset + index;
  return philox4x32_10(uint32_t(c), uint32_t(c >> 32), 0u, 0u, uint32_t(seed), uint32_t(seed >> 32));
}

// A 53-bit integer from two words.
LOOM_HD uint64_t bits53(uint32_t hi, uint32_t lo) { return ((uint64_t(hi) << 32) | lo) >> 11; }

// Uniform in [0, 1) on the grid 2⁻ᵈ (d = significand bits of the storage dtype, 1 ≤ d ≤ 53): exact.
LOOM_HD double uniform(const Block& b, int digits) {
  const uint64_t k = bits53(b.x[0], b.x[1]) >> (53 - digits);
  return double(k) * (1.0 / double(uint64_t(1) << digits));
}

// Whether a dropout element with drop probability p is kept: u ≥ p with u = k1·2⁻⁵³.
LOOM_HD bool dropout_keep(const Block& b, double p) { return double(bits53(b.x[0], b.x[1])) * 0x1p-53 >= p; }

// ---- ln and cos by polynomials (correctly rounded basic operations only) -----------------------

LOOM_HD int leading_zeros64(uint64_t v) {
#if defined(__CUDA_ARCH__)
  return __clzll(static_cast<long long>(v));
#else
  return v == 0 ? 64 : __builtin_clzll(v);
#endif
}

// ln(k · 2⁻⁵³) for an integer 1 ≤ k ≤ 2⁵³ (≈ 1e-16 relative error).
LOOM_HD double log_of_fraction53(uint64_t k) {
  int e = 63 - leading_zeros64(k);                          // 2ᵉ ≤ k < 2ᵉ⁺¹
  const uint64_t top = e <= 52 ? k << (52 - e) : k >> (e - 52);  // k·2^(52−e), exact (k ≤ 2⁵³)
  double m = double(top) * 0x1p-52;                         // k / 2ᵉ ∈ [1, 2), exact
  if (m > 1.4142135623730951) m *= 0.5, e += 1;             // m ∈ (√½, √2]
  const double s = (m - 1.0) / (m + 1.0), s2 = s * s;       // ln m = 2·atanh(s), |s| < 0.1716
  double poly = 1.0 / 23.0;
  poly = poly * s2 + 1.0 / 21.0;
  poly = poly * s2 + 1.0 / 19.0;
  poly = poly * s2 + 1.0 / 17.0;
  poly = poly * s2 + 1.0 / 15.0;
  poly = poly * s2 + 1.0 / 13.0;
  poly = poly * s2 + 1.0 / 11.0;
  poly = poly * s2 + 1.0 / 9.0;
  poly = poly * s2 + 1.0 / 7.0;
  poly = poly * s2 + 1.0 / 5.0;
  poly = poly * s2 + 1.0 / 3.0;
  poly = poly * s2 + 1.0;
  const double n = double(e - 53);
  constexpr double kLn2Hi = 0.6931471803691238, kLn2Lo = 1.9082149292705877e-10;  // ln 2 = hi + lo
  return n * kLn2Hi + (n * kLn2Lo + 2.0 * s * poly);
}

// cos(x) and sin(x) for |x| ≤ π/4 (Taylor series to x¹⁸ / x¹⁹).
LOOM_HD double cos_small(double x) {
  const double x2 = x * x;
  double c = -1.0 / 6402373705728000.0;  // −1/18!
  c = c * x2 + 1.0 / 20922789888000.0;   // +1/16!
  c = c * x2 - 1.0 / 87178291200.0;      // −1/14!
  c = c * x2 + 1.0 / 479001600.0;        // +1/12!
  c = c * x2 - 1.0 / 3628800.0;          // −1/10!
  c = c * x2 + 1.0 / 40320.0;            // +1/8!
  c = c * x2 - 1.0 / 720.0;
  c = c * x2 + 1.0 / 24.0;
  c = c * x2 - 0.5;
  return c * x2 + 1.0;
}
LOOM_HD double sin_small(double x) {
  const double x2 = x * x;
  double s = -1.0 / 121645100408832000.0;  // −1/19!
  s = s * x2 + 1.0 / 355687428096000.0;    // +1/17!
  s = s * x2 - 1.0 / 1307674368000.0;      // −1/15!
  s = s * x2 + 1.0 / 6227020800.0;         // +1/13!
  s = s * x2 - 1.0 / 39916800.0;           // −1/11!
  s = s * x2 + 1.0 / 362880.0;             // +1/9!
  s = s * x2 - 1.0 / 5040.0;
  s = s * x2 + 1.0 / 120.0;
  s = s * x2 - 1.0 / 6.0;
  return x + x * (s * x2);
}

// cos(2π · k · 2⁻⁵³) for an integer 0 ≤ k < 2⁵³: the quarter turn q = round(4t) is taken out
// exactly in integers, the rest (|r| ≤ 1/8 turn) goes through the series.
LOOM_HD double cos_two_pi_fraction53(uint64_t k) {
  const uint64_t q = (k + (uint64_t(1) << 50)) >> 51;                      // 0..4
  const int64_t r = int64_t(k) - int64_t(q << 51);                         // |r| ≤ 2⁵⁰
  const double x = double(r) * 0x1p-53 * 6.283185307179586476925286766559;  // 2π · r·2⁻⁵³
  switch (q & 3u) {
    case 0: return cos_small(x);
    case 1: return -sin_small(x);
    case 2: return -cos_small(x);
    default: return sin_small(x);
  }
}

LOOM_HD double correctly_rounded_sqrt(double v) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(v);  // IEEE round-to-nearest for double
#else
  return std::sqrt(v);
#endif
}

// A standard normal value from a block (Box–Muller, the cosine branch), in double.
LOOM_HD double normal(const Block& b) {
  const uint64_t k1 = bits53(b.x[0], b.x[1]) + 1, k2 = bits53(b.x[2], b.x[3]);
  const double radius = -2.0 * log_of_fraction53(k1);
  return (radius > 0.0 ? correctly_rounded_sqrt(radius) : 0.0) * cos_two_pi_fraction53(k2);
}

}  // namespace loom::philox
