// Tests of the counter-based random numbers (tensor/philox.h, tensor/random.h) on the CPU:
// Philox4x32-10 against Random123's published known-answer vectors, the mapping of
// (seed, offset, element) onto Philox blocks, the uniform / normal / dropout transformations
// against independent computations (libm's log and cos for Box–Muller), their moments,
// determinism, offsets that partition a stream, and the dropout op drawing its mask this way.
// The CUDA kernel is compared with these CPU values bit for bit in tests/gpu/test_gpu_random.cpp.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "autograd/ops.h"
#include "autograd/variable.h"
#include "tensor/dtype.h"
#include "tensor/philox.h"
#include "tensor/random.h"
#include "tensor/tensor.h"
#include "tests/test_helpers.h"

namespace {

using loom::Device;
using loom::DType;
using loom::Generator;
using loom::Shape;
using loom::Tensor;
using loom::testing::error_of;
using testing::HasSubstr;
namespace philox = loom::philox;

const DType kFloatTypes[] = {DType::F32, DType::F64, DType::BF16, DType::F16};

int digits_of(DType t) {
  switch (t) {
    case DType::F64: return 53;
    case DType::F32: return 24;
    case DType::F16: return 11;
    default: return 8;
  }
}

// ---- Philox4x32-10: known answers ------------------------------------------------------------

struct Kat {
  uint32_t ctr[4], key[2], out[4];
};

// Random123's tests/kat_vectors (github.com/DEShawResearch/random123), the three
// "philox4x32 10" lines; columns: counter (4 words), key (2 words), expected (4 words).
const Kat kRandom123Kat[] = {
    {{0x00000000, 0x00000000, 0x00000000, 0x00000000}, {0x00000000, 0x00000000},
     {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
    {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff},
     {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
    {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0},
     {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
};

// More philox4x32 10 lines of the extended kat_vectors shipped with the Random123 manual's
// examples (github.com/girving/random123-manual, examples/kat_vectors): single-bit counters
// and keys, which pin down the word order of counter and key.
const Kat kExtendedKat[] = {
    {{0x00000001, 0x00000000, 0x00000000, 0x00000000}, {0x00000001, 0x00000000},
     {0xac08141b, 0xdfc5ccbe, 0x79c07a47, 0xa7f66093}},
    {{0x00000000, 0x00000001, 0x00000000, 0x00000000}, {0x00000001, 0x00000000},
     {0x833ff8dc, 0x225c963c, 0x232b88b3, 0x0b334b07}},
    {{0x00000000, 0x00000000, 0x00000000, 0x00000001}, {0x00000000, 0x00000001},
     {0x96b27e8c, 0x28826d0f, 0x66d958ef, 0x081509dc}},
    {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0x00000000, 0x80000000},
     {0x63675d2c, 0x422d7c4d, 0x3145d30d, 0x3bce33a4}},
};

void expect_kat(const Kat& k) {
  const philox::Block b = philox::philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
  for (int w = 0; w < 4; ++w)
    EXPECT_EQ(b.x[w], k.out[w]) << "word " << w << " for counter " << std::hex << k.ctr[0] << " " << k.ctr[1] << " "
                                << k.ctr[2] << " " << k.ctr[3] << ", key " << k.key[0] << " " << k.key[1];
}

TEST(Philox, Random123KnownAnswers) {
  for (const Kat& k : kRandom123Kat) expect_kat(k);
}

TEST(Philox, ExtendedKnownAnswers) {
  for (const Kat& k : kExtendedKat) expect_kat(k);
}

// Element i of (seed, offset) is the block of counter offset + i (low word first, carried into
// the second word) under the key (seed low, seed high).
TEST(Philox, ElementBlockIsCounterOffsetPlusIndex) {
  const uint64_t seed = 0x299f31d0a4093822ull;
  const uint64_t offset = 0xfffffffeull;  // offset + 2 carries into the counter's second word
  for (uint64_t i = 0; i < 4; ++i) {
    const uint64_t c = offset + i;
    const philox::Block want = philox::philox4x32_10(uint32_t(c), uint32_t(c >> 32), 0, 0, 0xa4093822u, 0x299f31d0u);
    const philox::Block got = philox::element_block(seed, offset, i);
    for (int w = 0; w < 4; ++w) EXPECT_EQ(got.x[w], want.x[w]) << "element " << i << " word " << w;
  }
  // seed 0, counter 0 is the first known answer.
  EXPECT_EQ(philox::element_block(0, 0, 0).x[0], 0x6627e8d5u);
}

// ---- the tensor API: values against independent computations ----------------------------------

// The 53-bit integer of words (hi, lo) of element i's block.
uint64_t bits53_of(uint64_t seed, uint64_t offset, uint64_t i, int first_word) {
  const philox::Block b = philox::element_block(seed, offset, i);
  return ((uint64_t(b.x[first_word]) << 32) | b.x[first_word + 1]) >> 11;
}

TEST(RandomUniform, FirstValueComesFromTheKnownAnswer) {
  const Tensor u = loom::random_uniform({1}, DType::F64, Device::cpu(), 0, 0);
  const double want = double((0x6627e8d5ull << 32 | 0xe169c58dull) >> 11) * 0x1p-53;
  EXPECT_EQ(u.to_vector()[0], want);
}

TEST(RandomUniform, EachDtypeTakesTheTopBitsOfTheSameWords) {
  const uint64_t seed = 1234567, offset = 99;
  const int64_t n = 4099;
  for (DType t : kFloatTypes) {
    SCOPED_TRACE(loom::dtype_name(t));
    const std::vector<double> u = loom::random_uniform({n}, t, Device::cpu(), seed, offset).to_vector();
    const int d = digits_of(t);
    for (int64_t i = 0; i < n; ++i) {
      const double want = std::ldexp(double(bits53_of(seed, offset, uint64_t(i), 0) >> (53 - d)), -d);
      ASSERT_EQ(u[size_t(i)], want) << "element " << i;
      ASSERT_GE(u[size_t(i)], 0.0);
      ASSERT_LT(u[size_t(i)], 1.0);
    }
  }
}

// Box–Muller with libm: the polynomial ln and cos of philox.h agree to ~1e-15.
TEST(RandomNormal, MatchesBoxMullerWithLibm) {
  const uint64_t seed = 42, offset = 7;
  const int64_t n = 20011;
  const std::vector<double> z = loom::random_normal({n}, DType::F64, Device::cpu(), seed, offset).to_vector();
  double worst = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double u1 = double(bits53_of(seed, offset, uint64_t(i), 0) + 1) * 0x1p-53;
    const double u2 = double(bits53_of(seed, offset, uint64_t(i), 2)) * 0x1p-53;
    const double want = std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2);
    worst = std::max(worst, std::fabs(z[size_t(i)] - want));
  }
  EXPECT_LT(worst, 1e-13);
}

TEST(RandomNormal, LowPrecisionIsTheF64ValueRoundedThroughFloat) {
  const std::vector<double> z64 = loom::random_normal({3001}, DType::F64, Device::cpu(), 5, 0).to_vector();
  for (DType t : {DType::F32, DType::BF16, DType::F16}) {
    SCOPED_TRACE(loom::dtype_name(t));
    const std::vector<double> z = loom::random_normal({3001}, t, Device::cpu(), 5, 0).to_vector();
    const std::vector<double> want =
        Tensor::from_values(z64, {3001}, DType::F64).to(DType::F32).to(t).to_vector();
    EXPECT_EQ(z, want);
  }
}

// ---- moments --------------------------------------------------------------------------------

struct Moments {
  double mean = 0, var = 0;
};
Moments moments(const std::vector<double>& v) {
  Moments m;
  for (double x : v) m.mean += x;
  m.mean /= double(v.size());
  for (double x : v) m.var += (x - m.mean) * (x - m.mean);
  m.var /= double(v.size());
  return m;
}

TEST(RandomUniform, MeanAndVariance) {
  const int64_t n = 200000;  // σ(mean) ≈ 6.5e-4, σ(var) ≈ 1.7e-4
  for (DType t : kFloatTypes) {
    SCOPED_TRACE(loom::dtype_name(t));
    const Moments m = moments(loom::random_uniform({n}, t, Device::cpu(), 2024, 0).to_vector());
    // bf16's grid of 2⁻⁸ shifts the mean by −2⁻⁹ (values k/256, k < 256).
    const double grid = std::ldexp(1.0, -digits_of(t));
    EXPECT_NEAR(m.mean, 0.5 - grid / 2, 4e-3);
    EXPECT_NEAR(m.var, 1.0 / 12.0 - grid * grid / 12, 1.5e-3);
  }
}

TEST(RandomNormal, MeanVarianceAndTails) {
  const int64_t n = 200000;  // σ(mean) ≈ 2.2e-3, σ(var) ≈ 3.2e-3
  const std::vector<double> z = loom::random_normal({n}, DType::F32, Device::cpu(), 77, 0).to_vector();
  const Moments m = moments(z);
  EXPECT_NEAR(m.mean, 0.0, 0.012);
  EXPECT_NEAR(m.var, 1.0, 0.016);
  int64_t within1 = 0, beyond3 = 0;
  for (double x : z) within1 += std::fabs(x) < 1.0, beyond3 += std::fabs(x) > 3.0;
  EXPECT_NEAR(double(within1) / double(n), 0.682689, 0.006);
  EXPECT_NEAR(double(beyond3) / double(n), 0.0026998, 0.0008);
}

// ---- determinism and offsets ---------------------------------------------------------------------

TEST(RandomTensors, DeterministicForASeedAndDifferentAcrossSeeds) {
  const Tensor a = loom::random_normal({2, 3, 517}, DType::F32, Device::cpu(), 9, 0);
  const Tensor b = loom::random_normal({2, 3, 517}, DType::F32, Device::cpu(), 9, 0);
  const Tensor c = loom::random_normal({2, 3, 517}, DType::F32, Device::cpu(), 10, 0);
  EXPECT_EQ(a.shape(), (Shape{2, 3, 517}));
  EXPECT_EQ(a.to_vector(), b.to_vector());
  const std::vector<double> va = a.to_vector(), vc = c.to_vector();
  int64_t equal = 0;
  for (size_t i = 0; i < va.size(); ++i) equal += va[i] == vc[i];
  EXPECT_LT(equal, 5);
}

// Draws at offsets 0 and n are the two halves of one draw of 2n: consecutive draws partition the
// stream, so they never reuse a counter.
TEST(RandomTensors, ConsecutiveOffsetsPartitionOneStream) {
  const uint64_t seed = 31337;
  const int64_t n = 1000;
  for (DType t : kFloatTypes) {
    SCOPED_TRACE(loom::dtype_name(t));
    const std::vector<double> whole = loom::random_normal({2 * n}, t, Device::cpu(), seed, 0).to_vector();
    const std::vector<double> first = loom::random_normal({n}, t, Device::cpu(), seed, 0).to_vector();
    const std::vector<double> second = loom::random_normal({n}, t, Device::cpu(), seed, uint64_t(n)).to_vector();
    EXPECT_EQ(first, std::vector<double>(whole.begin(), whole.begin() + n));
    EXPECT_EQ(second, std::vector<double>(whole.begin() + n, whole.end()));
    // An overlapping draw (offset n/2) repeats the tail of the first: what separate offsets avoid.
    const std::vector<double> overlap = loom::random_normal({n}, t, Device::cpu(), seed, uint64_t(n / 2)).to_vector();
    EXPECT_EQ(std::vector<double>(overlap.begin(), overlap.begin() + n / 2),
              std::vector<double>(whole.begin() + n / 2, whole.begin() + n));
  }
}

TEST(RandomTensors, LargeThreadedDrawEqualsItsPieces) {
  // Above the OpenMP threshold: the values do not depend on how the elements are split.
  const int64_t n = 100003;
  const std::vector<double> whole = loom::random_uniform({n}, DType::F32, Device::cpu(), 3, 11).to_vector();
  const std::vector<double> tail = loom::random_uniform({17}, DType::F32, Device::cpu(), 3, 11 + uint64_t(n) - 17)
                                       .to_vector();
  EXPECT_EQ(tail, std::vector<double>(whole.end() - 17, whole.end()));
}

TEST(RandomTensors, EmptyShapesAndErrors) {
  EXPECT_EQ(loom::random_uniform({0, 3}, DType::F32, Device::cpu(), 1).numel(), 0);
  EXPECT_THAT(error_of([] { loom::random_uniform({4}, DType::I64, Device::cpu(), 1); }),
              AllOf(HasSubstr("random_uniform"), HasSubstr("i64")));
  EXPECT_THAT(error_of([] { loom::random_normal({4}, DType::F32, Device::cpu(), 1, UINT64_MAX - 2); }),
              HasSubstr("2^64"));
  EXPECT_EQ(loom::random_normal({3}, DType::F32, Device::cpu(), 1, UINT64_MAX - 2).numel(), 3);  // the last counters
  EXPECT_THAT(error_of([] { loom::random_dropout_mask({4}, DType::F32, Device::cpu(), 1.0, 1); }),
              HasSubstr("[0, 1)"));
  EXPECT_THAT(error_of([] { loom::random_dropout_mask({4}, DType::F32, Device::cpu(), -0.1, 1); }),
              HasSubstr("[0, 1)"));
}

// ---- dropout masks ----------------------------------------------------------------------------------

TEST(RandomDropoutMask, KeepsWithProbabilityOneMinusPScaled) {
  const double p = 0.3;
  const int64_t n = 100000;  // σ(kept fraction) ≈ 1.4e-3
  const uint64_t seed = 8, offset = 3;
  const std::vector<double> m = loom::random_dropout_mask({n}, DType::F64, Device::cpu(), p, seed, offset).to_vector();
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double u = double(bits53_of(seed, offset, uint64_t(i), 0)) * 0x1p-53;
    ASSERT_EQ(m[size_t(i)], u >= p ? 1.0 / (1.0 - p) : 0.0) << "element " << i;
    kept += m[size_t(i)] != 0.0;
  }
  EXPECT_NEAR(double(kept) / double(n), 1.0 - p, 0.008);
  EXPECT_EQ(loom::random_dropout_mask({5}, DType::BF16, Device::cpu(), 0.0, 1).to_vector(),
            std::vector<double>(5, 1.0));
}

TEST(Dropout, MaskComesFromTheGeneratorsNextWord) {
  const Tensor x = loom::random_normal({4, 257}, DType::F32, Device::cpu(), 1, 0);
  Generator gen(2718), twin(2718);
  const loom::Variable y = loom::dropout(loom::Variable(x), 0.25, true, gen);
  const Tensor mask = loom::random_dropout_mask({4, 257}, DType::F32, Device::cpu(), 0.25, twin.next_u64());
  const std::vector<double> vx = x.to_vector(), vy = y.tensor().to_vector(), vm = mask.to_vector();
  for (size_t i = 0; i < vx.size(); ++i) ASSERT_EQ(vy[i], float(vx[i] * vm[i])) << i;
  EXPECT_EQ(gen.next_u64(), twin.next_u64());  // one word per call
}

TEST(Dropout, SameSeedSameMasksAndGradientIsTheMask) {
  const Tensor x = Tensor::ones({1000}, DType::F32);
  Generator g1(5), g2(5);
  loom::Variable v(x, true);
  const loom::Variable a = loom::dropout(v, 0.5, true, g1);
  const loom::Variable b = loom::dropout(loom::Variable(x), 0.5, true, g2);
  EXPECT_EQ(a.tensor().to_vector(), b.tensor().to_vector());
  const loom::Variable c = loom::dropout(loom::Variable(x), 0.5, true, g2);  // the next call: a new mask
  EXPECT_NE(b.tensor().to_vector(), c.tensor().to_vector());
  loom::sum(a).backward();
  EXPECT_EQ(v.grad().to_vector(), a.tensor().to_vector());  // d(x·m)/dx = m, and x = 1
  int64_t zeros = 0;
  for (double m : a.tensor().to_vector()) {
    ASSERT_TRUE(m == 0.0 || m == 2.0) << m;
    zeros += m == 0.0;
  }
  EXPECT_GT(zeros, 400);
  EXPECT_LT(zeros, 600);
}

}  // namespace
