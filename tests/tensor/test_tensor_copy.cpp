// Tests of loom::Tensor copies and dtype conversions: contiguous, clone, to(), copy_, item, bf16 / f16 bit patterns.
//
// Every expectation is computed independently in the test: values as doubles, 16-bit floats
// against their IEEE bit patterns (the conventions of test_tensor.cpp).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "tensor/device.h"
#include "tensor/dtype.h"
#include "tensor/error.h"
#include "tensor/random.h"
#include "tensor/tensor.h"
#include "tests/test_helpers.h"

namespace {

using loom::Device;
using loom::DType;
using loom::Generator;
using loom::Shape;
using loom::Tensor;
using testing::HasSubstr;
using loom::testing::error_of;
using loom::testing::opsref::iota;
using loom::testing::opsref::iota_tensor;
using loom::testing::opsref::ravel;
using loom::testing::opsref::unravel;

// The bits of the single element of a contiguous bf16 / f16 tensor.
template <typename H>
std::vector<uint16_t> half_bits(const Tensor& t) {
  const Tensor c = t.contiguous();
  const H* p = c.data<H>();
  std::vector<uint16_t> bits(size_t(c.numel()));
  for (int64_t i = 0; i < c.numel(); ++i) bits[size_t(i)] = p[i].bits;
  return bits;
}

float float_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ============================================================================
// Copies
// ============================================================================

TEST(TensorCopy, ContiguousReturnsSelfWhenContiguousAndCopiesOtherwise) {
  const Shape bs{5, 3, 7};
  const Tensor base = iota_tensor(bs);
  const Tensor same = base.contiguous();
  EXPECT_EQ(same.storage(), base.storage());

  const Tensor p = base.permute({1, 2, 0});
  const Tensor c = p.contiguous();
  EXPECT_TRUE(c.is_contiguous());
  EXPECT_EQ(c.strides(), (Shape{35, 5, 1}));
  EXPECT_NE(c.storage(), base.storage());
  const std::vector<double> cv = c.to_vector();
  for (int64_t i = 0; i < 105; ++i) {
    const auto idx = unravel(i, {3, 7, 5});
    EXPECT_EQ(cv[size_t(i)], double(ravel({idx[2], idx[0], idx[1]}, bs)));
  }
}

TEST(TensorCopy, CloneIsAFreshContiguousCopy) {
  Generator gen(101);
  const Tensor a = Tensor::randn({7, 9}, gen, DType::F32);
  const Tensor c = a.clone();
  EXPECT_NE(c.storage(), a.storage());
  EXPECT_EQ(c.to_vector(), a.to_vector());
  c.fill_(0.0);
  EXPECT_NE(a.to_vector(), c.to_vector());

  const Tensor t = a.transpose(0, 1).clone();
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(t.shape(), (Shape{9, 7}));
  const std::vector<double> av = a.to_vector(), tv = t.to_vector();
  for (int64_t i = 0; i < 9; ++i)
    for (int64_t j = 0; j < 7; ++j) EXPECT_EQ(tv[size_t(i * 7 + j)], av[size_t(j * 9 + i)]);
}

TEST(TensorCopy, ToSameDtypeAndToCpuAreNoOps) {
  const Tensor a = iota_tensor({3, 4}, DType::F32);
  EXPECT_EQ(a.to(DType::F32).storage(), a.storage());
  const Tensor b = a.to(Device::cpu());
  EXPECT_EQ(b.storage(), a.storage());
  EXPECT_TRUE(b.device().is_cpu());
  EXPECT_EQ(b.to_vector(), iota(12));
}

TEST(TensorCopy, ToConvertsBetweenEveryPairOfDtypesExactly) {
  // Integers that every dtype (bf16 has 8 significant bits) holds exactly.
  const std::vector<double> ints{-128, -7, -1, 0, 1, 2, 3, 17, 100, 255, 256, -64};
  // Fractions that every floating dtype holds exactly.
  const std::vector<double> fracs{0.5, -0.25, 1.5, 3.75, -0.0078125, 96.5, 0.015625, -2.125};
  const std::vector<DType> all{DType::F32, DType::F64, DType::BF16, DType::F16, DType::I64};
  for (DType from : all) {
    for (DType to : all) {
      SCOPED_TRACE(std::string(loom::dtype_name(from)) + " -> " + loom::dtype_name(to));
      const Tensor a = Tensor::from_values(ints, {3, 4}, from);
      const Tensor b = a.to(to);
      EXPECT_EQ(b.dtype(), to);
      EXPECT_EQ(b.shape(), (Shape{3, 4}));
      EXPECT_EQ(b.to_vector(), ints);
      // non-contiguous source
      const Tensor bt = a.transpose(0, 1).to(to);
      EXPECT_EQ(bt.shape(), (Shape{4, 3}));
      std::vector<double> expect_t(12);
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 3; ++j) expect_t[size_t(i * 3 + j)] = ints[size_t(j * 4 + i)];
      EXPECT_EQ(bt.to_vector(), expect_t);
      if (from != DType::I64 && to != DType::I64) {
        EXPECT_EQ(Tensor::from_values(fracs, {8}, from).to(to).to_vector(), fracs);
      }
    }
  }
}

TEST(TensorCopy, ToI64TruncatesTowardZeroAndSaturates) {
  const Tensor a = Tensor::from_values({2.7, -2.7, 0.5, -0.5, 1e30, -1e30, 3.0}, {7}, DType::F64);
  const Tensor i = a.to(DType::I64);
  const int64_t* p = i.data<int64_t>();
  EXPECT_EQ(p[0], 2);
  EXPECT_EQ(p[1], -2);
  EXPECT_EQ(p[2], 0);
  EXPECT_EQ(p[3], 0);
  EXPECT_EQ(p[4], std::numeric_limits<int64_t>::max());
  EXPECT_EQ(p[5], std::numeric_limits<int64_t>::min());
  EXPECT_EQ(p[6], 3);
  const Tensor n = Tensor::from_vector(std::vector<float>{std::nanf("")}, {1}).to(DType::I64);
  EXPECT_EQ(n.data<int64_t>()[0], 0);
}

TEST(TensorCopy, LargeI64ValuesSurviveConversionToF64) {
  const std::vector<int64_t> v{(int64_t(1) << 40) + 3, -(int64_t(1) << 52) + 1, 123456789012345};
  const Tensor d = Tensor::from_vector(v, {3}).to(DType::F64);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(d.data<double>()[i], double(v[size_t(i)]));
  const Tensor back = d.to(DType::I64);
  for (int i = 0; i < 3; ++i) EXPECT_EQ(back.data<int64_t>()[i], v[size_t(i)]);
}

TEST(TensorCopy, Bf16ConversionRoundsToNearestEven) {
  const float t8 = std::ldexp(1.0f, -8), t9 = std::ldexp(1.0f, -9), t16 = std::ldexp(1.0f, -16);
  const std::vector<float> in{
      1.0f,                 // 0x3F80
      1.0f + t9,            // below half an ulp (2^-7): down
      1.0f + t8,            // exact tie, 1.0 is even: down
      1.0f + 3 * t8,        // exact tie between 0x3F81 (odd) and 0x3F82: up to even
      1.0f + t8 + t16,      // just above the tie: up
      -2.0f,                // 0xC000
      0.1f,                 // 0x3DCCCCCD -> 0x3DCD
      std::numeric_limits<float>::max(),  // above bf16 max + half ulp: inf
      std::numeric_limits<float>::infinity(),
      -std::numeric_limits<float>::infinity(),
      -0.0f,
      float_from_bits(0x7F7F7FFFu),  // just below the rounding boundary to inf: bf16 max
  };
  const std::vector<uint16_t> expect{0x3F80, 0x3F80, 0x3F80, 0x3F82, 0x3F81, 0xC000,
                                     0x3DCD, 0x7F80, 0x7F80, 0xFF80, 0x8000, 0x7F7F};
  const Tensor b = Tensor::from_vector(in, {int64_t(in.size())}).to(DType::BF16);
  const std::vector<uint16_t> bits = half_bits<loom::bf16>(b);
  for (size_t i = 0; i < in.size(); ++i)
    EXPECT_EQ(bits[i], expect[i]) << "input " << in[i] << " (index " << i << ")";

  // and back: bf16 -> f32 is exact
  const std::vector<double> back = b.to(DType::F32).to_vector();
  EXPECT_EQ(back[3], 1.0 + 2.0 / 128.0);
  EXPECT_EQ(back[4], 1.0 + 1.0 / 128.0);
  EXPECT_TRUE(std::isinf(back[7]) && back[7] > 0);

  const Tensor nan = Tensor::from_vector(std::vector<float>{std::nanf("")}, {1}).to(DType::BF16);
  const uint16_t nb = half_bits<loom::bf16>(nan)[0];
  EXPECT_EQ(nb & 0x7F80u, 0x7F80u);
  EXPECT_NE(nb & 0x007Fu, 0u) << "NaN must stay NaN, got bits " << nb;
}

TEST(TensorCopy, F16ConversionRoundsToNearestEvenIncludingSubnormalsAndOverflow) {
  const float t24 = std::ldexp(1.0f, -24), t25 = std::ldexp(1.0f, -25), t11 = std::ldexp(1.0f, -11);
  const std::vector<float> in{
      1.0f,                          // 0x3C00
      1.0f + t11,                    // tie, even: down
      1.0f + 3 * t11,                // tie between 0x3C01 and 0x3C02: up to even
      1.0f + std::ldexp(1.0f, -9),   // exact: 0x3C02
      1.0f + t11 + std::ldexp(1.0f, -20),  // above the tie: 0x3C01
      -2.0f,                         // 0xC000
      0.1f,                          // 0x2E66
      65504.0f,                      // f16 max
      65519.0f,                      // below the halfway point to 65536: max
      65520.0f,                      // halfway, rounds (to even) to inf
      1.0e5f,                        // overflow: inf
      -1.0e5f,                       // -inf
      std::ldexp(1.0f, -14),         // smallest normal: 0x0400
      t24,                           // smallest subnormal: 0x0001
      t25,                           // half of it, a tie with 0 (even): 0
      1.5f * t25,                    // above the tie: 0x0001
      3 * t25,                       // 1.5 subnormal units, tie: up to 2
      5 * t25,                       // 2.5 units, tie: down to 2
      1023 * t24,                    // largest subnormal: 0x03FF
      -t24,                          // 0x8001
      std::ldexp(1.0f, -26),         // underflow: 0
      -0.0f,                         // 0x8000
      std::ldexp(1.0f, -14) - t24 * 0.5f,  // between max subnormal and min normal, tie -> 0x0400
  };
  const std::vector<uint16_t> expect{0x3C00, 0x3C00, 0x3C02, 0x3C02, 0x3C01, 0xC000, 0x2E66, 0x7BFF,
                                     0x7BFF, 0x7C00, 0x7C00, 0xFC00, 0x0400, 0x0001, 0x0000, 0x0001,
                                     0x0002, 0x0002, 0x03FF, 0x8001, 0x0000, 0x8000, 0x0400};
  ASSERT_EQ(in.size(), expect.size());
  const Tensor h = Tensor::from_vector(in, {int64_t(in.size())}).to(DType::F16);
  const std::vector<uint16_t> bits = half_bits<loom::f16>(h);
  for (size_t i = 0; i < in.size(); ++i)
    EXPECT_EQ(bits[i], expect[i]) << "input " << in[i] << " (index " << i << ")";

  // f16 -> f64: subnormals decode exactly, overflow is inf
  const std::vector<double> back = h.to(DType::F64).to_vector();
  EXPECT_EQ(back[13], std::ldexp(1.0, -24));
  EXPECT_EQ(back[18], 1023 * std::ldexp(1.0, -24));
  EXPECT_EQ(back[19], -std::ldexp(1.0, -24));
  EXPECT_EQ(back[7], 65504.0);
  EXPECT_TRUE(std::isinf(back[9]) && back[9] > 0);
  EXPECT_TRUE(std::isinf(back[11]) && back[11] < 0);

  // the same from f64 tensors (and i64 overflow)
  const Tensor big = Tensor::from_values({1e6, -1e6, 70000.0}, {3}, DType::F64).to(DType::F16);
  EXPECT_EQ(half_bits<loom::f16>(big), (std::vector<uint16_t>{0x7C00, 0xFC00, 0x7C00}));
  const Tensor bigi = Tensor::from_vector(std::vector<int64_t>{100000, -65504}, {2}).to(DType::F16);
  EXPECT_EQ(half_bits<loom::f16>(bigi), (std::vector<uint16_t>{0x7C00, 0xFBFF}));
}

TEST(TensorCopy, CopyBroadcastsTheSourceAndConvertsItsDtype) {
  const Tensor dst = Tensor::zeros({3, 4, 5}, DType::F32);
  const Tensor src = Tensor::from_values({1.5, -2.5, 3.5, -4.5}, {4, 1}, DType::F64);
  dst.copy_(src);
  const std::vector<double> dv = dst.to_vector();
  for (int64_t i = 0; i < 60; ++i) EXPECT_EQ(dv[size_t(i)], src.to_vector()[size_t(unravel(i, {3, 4, 5})[1])]);

  dst.copy_(Tensor::scalar(7.0, DType::I64));
  EXPECT_EQ(dst.to_vector(), std::vector<double>(60, 7.0));

  const Tensor row = Tensor::from_values(iota(5, 10.0), {5}, DType::BF16);
  dst.select(1, 2).copy_(row);  // into a non-contiguous view
  const std::vector<double> dv2 = dst.to_vector();
  for (int64_t i = 0; i < 60; ++i) {
    const auto idx = unravel(i, {3, 4, 5});
    EXPECT_EQ(dv2[size_t(i)], idx[1] == 2 ? 10.0 + double(idx[2]) : 7.0);
  }
}

TEST(TensorCopy, CopyFromAnIncompatibleShapeThrows) {
  const Tensor dst = Tensor::zeros({3, 4});
  EXPECT_THAT(error_of([&] { dst.copy_(Tensor::zeros({3})); }), HasSubstr("copy_"));
  EXPECT_THAT(error_of([&] { dst.copy_(Tensor::zeros({2, 3, 4})); }), HasSubstr("copy_"));
  EXPECT_THAT(error_of([&] { dst.copy_(Tensor::zeros({3, 1, 1})); }), HasSubstr("copy_"));
  EXPECT_EQ(dst.to_vector(), std::vector<double>(12, 0.0));
}

TEST(TensorCopy, ItemAndToVectorReadValuesAsDouble) {
  EXPECT_EQ(Tensor::full({1, 1, 1}, -0.375).item(), -0.375);
  EXPECT_EQ(Tensor::scalar(5.0, DType::I64).item(), 5.0);
  EXPECT_EQ(Tensor::scalar(0.5, DType::BF16).item(), 0.5);
  EXPECT_EQ(iota_tensor({5, 4}).select(1, 1).to_vector(), (std::vector<double>{1, 5, 9, 13, 17}));
  EXPECT_THAT(error_of([] { Tensor::zeros({2}).item(); }), HasSubstr("item"));
}

}  // namespace
