// Tests of loom::Tensor (tensor/tensor.h): factories, metadata, views sharing storage, dim arguments on 0-d tensors.
//
// Every expectation is computed independently in the test: views against the element mapping
// they promise (written with plain index arithmetic), values as doubles. Copies and dtype
// conversions: test_tensor_copy.cpp; random tensors and devices: test_tensor_random_device.cpp.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "tensor/dtype.h"
#include "tensor/error.h"
#include "tensor/random.h"
#include "tensor/tensor.h"
#include "tests/test_helpers.h"

namespace {

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

// ============================================================================
// Factories and metadata
// ============================================================================

TEST(TensorFactory, EmptyHasShapeDtypeDeviceAndRowMajorStrides) {
  const Tensor t = Tensor::empty({3, 5, 7}, DType::F64);
  EXPECT_TRUE(t.defined());
  EXPECT_EQ(t.shape(), (Shape{3, 5, 7}));
  EXPECT_EQ(t.strides(), (Shape{35, 7, 1}));
  EXPECT_EQ(t.dim(), 3);
  EXPECT_EQ(t.numel(), 105);
  EXPECT_EQ(t.offset(), 0);
  EXPECT_EQ(t.size(0), 3);
  EXPECT_EQ(t.size(-1), 7);
  EXPECT_EQ(t.size(-3), 3);
  EXPECT_EQ(t.dtype(), DType::F64);
  EXPECT_TRUE(t.device().is_cpu());
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_GE(t.storage()->nbytes(), size_t(105 * 8));
  EXPECT_EQ(t.str(), "Tensor(f64, cpu, [3, 5, 7])");
}

TEST(TensorFactory, EmptyTensorsAreContiguous) {
  // a zero in the shape: contiguous_strides keeps the other strides as if it were one, and a
  // kernel that asks for contiguous input must accept the result (CUDA group norm did not)
  for (const Shape& shape : {Shape{2, 4, 0}, Shape{0, 3}, Shape{3, 0, 5}}) {
    const Tensor t = Tensor::empty(shape, DType::F32);
    EXPECT_EQ(t.numel(), 0);
    EXPECT_TRUE(t.is_contiguous()) << t.str();
    EXPECT_TRUE(t.contiguous().is_contiguous()) << t.str();
  }
  EXPECT_FALSE(Tensor::empty({2, 3}, DType::F32).transpose(0, 1).is_contiguous());
}

TEST(TensorFactory, DefaultConstructedTensorIsUndefined) {
  const Tensor t;
  EXPECT_FALSE(t.defined());
  EXPECT_EQ(t.str(), "Tensor(undefined)");
  EXPECT_THAT(error_of([&] { t.clone(); }), HasSubstr("undefined"));
  EXPECT_THAT(error_of([&] { t.to_vector(); }), HasSubstr("undefined"));
}

TEST(TensorFactory, SizeWithOutOfRangeDimThrows) {
  const Tensor t = Tensor::zeros({2, 3});
  EXPECT_THAT(error_of([&] { t.size(2); }), HasSubstr("out of range"));
  EXPECT_THAT(error_of([&] { t.size(-3); }), HasSubstr("out of range"));
}

TEST(TensorFactory, NegativeSizeInShapeThrows) {
  EXPECT_THAT(error_of([] { Tensor::empty({2, -3}); }), HasSubstr("negative"));
}

TEST(TensorFactory, ZerosOnesAndFullHoldTheirValueInEveryDtype) {
  for (DType dt : {DType::F32, DType::F64, DType::BF16, DType::F16, DType::I64}) {
    SCOPED_TRACE(loom::dtype_name(dt));
    const Shape shape{3, 7, 5};
    const Tensor z = Tensor::zeros(shape, dt), o = Tensor::ones(shape, dt);
    const double fv = dt == DType::I64 ? -7.0 : -2.5;
    const Tensor f = Tensor::full(shape, fv, dt);
    for (const Tensor* t : {&z, &o, &f}) {
      EXPECT_EQ(t->shape(), shape);
      EXPECT_EQ(t->dtype(), dt);
      EXPECT_TRUE(t->is_contiguous());
    }
    EXPECT_EQ(z.to_vector(), std::vector<double>(105, 0.0));
    EXPECT_EQ(o.to_vector(), std::vector<double>(105, 1.0));
    EXPECT_EQ(f.to_vector(), std::vector<double>(105, fv));
  }
}

TEST(TensorFactory, ScalarIsZeroDimensionalWithOneElement) {
  const Tensor s = Tensor::scalar(3.25, DType::F64);
  EXPECT_EQ(s.dim(), 0);
  EXPECT_EQ(s.shape(), Shape{});
  EXPECT_EQ(s.strides(), Shape{});
  EXPECT_EQ(s.numel(), 1);
  EXPECT_TRUE(s.is_contiguous());
  EXPECT_EQ(s.item(), 3.25);
  EXPECT_EQ(s.to_vector(), std::vector<double>{3.25});
  EXPECT_EQ(Tensor::scalar(-1.5).dtype(), DType::F32);
  EXPECT_EQ(Tensor::scalar(-1.5).item(), -1.5);
}

TEST(TensorFactory, FromValuesIsRowMajorAndConvertsToTheDtype) {
  const std::vector<double> v{1.5, -2.0, 3.25, 4.0, -5.5, 6.0};
  const Tensor t = Tensor::from_values(v, {2, 3});
  EXPECT_EQ(t.dtype(), DType::F32);
  EXPECT_EQ(t.shape(), (Shape{2, 3}));
  const float* p = t.data<float>();
  for (int i = 0; i < 6; ++i) EXPECT_EQ(p[i], float(v[size_t(i)])) << i;

  const Tensor d = Tensor::from_values({0.1, 0.2}, {2}, DType::F64);
  EXPECT_EQ(d.data<double>()[0], 0.1);  // f64 keeps every bit
  const Tensor f = Tensor::from_values({0.1, 0.2}, {2}, DType::F32);
  EXPECT_EQ(f.data<float>()[0], 0.1f);  // f32 rounds once
  const Tensor i = Tensor::from_values({3.0, -4.0, 5.0}, {3}, DType::I64);
  EXPECT_EQ(i.data<int64_t>()[1], -4);
}

TEST(TensorFactory, FromValuesWithWrongCountThrowsNamingShape) {
  const std::string msg = error_of([] { Tensor::from_values({1, 2, 3, 4, 5}, {2, 3}); });
  EXPECT_THAT(msg, HasSubstr("from_values"));
  EXPECT_THAT(msg, HasSubstr("[2, 3]"));
}

TEST(TensorFactory, FromVectorKeepsTypedValuesExactly) {
  const std::vector<float> vf{1.25f, -0.1f, 3.0e-8f, 7.0f, 1e30f, -2.0f};
  const Tensor tf = Tensor::from_vector(vf, {3, 2});
  EXPECT_EQ(tf.dtype(), DType::F32);
  for (int i = 0; i < 6; ++i) EXPECT_EQ(tf.data<float>()[i], vf[size_t(i)]);

  const std::vector<double> vd{0.1, 1e-300, -3.5};
  const Tensor td = Tensor::from_vector(vd, {3});
  EXPECT_EQ(td.dtype(), DType::F64);
  EXPECT_EQ(td.to_vector(), vd);

  const std::vector<int64_t> vi{int64_t(1) << 53, -(int64_t(1) << 40) - 3, 0, 42};
  const Tensor ti = Tensor::from_vector(vi, {2, 2});
  EXPECT_EQ(ti.dtype(), DType::I64);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(ti.data<int64_t>()[i], vi[size_t(i)]);

  EXPECT_THAT(error_of([&] { Tensor::from_vector(vd, {2, 2}); }), HasSubstr("from_vector"));
}

TEST(TensorFactory, DataOfTheWrongTypeThrows) {
  const Tensor t = Tensor::zeros({2}, DType::F32);
  EXPECT_THAT(error_of([&] { t.data<double>(); }), HasSubstr("f64"));
}

TEST(TensorFactory, RandnAndRandHaveTheRequestedShapeAndDtype) {
  Generator gen(11);
  for (DType dt : {DType::F32, DType::F64, DType::BF16, DType::F16}) {
    SCOPED_TRACE(loom::dtype_name(dt));
    const Tensor a = Tensor::randn({5, 3, 7}, gen, dt);
    const Tensor b = Tensor::rand({13}, gen, dt);
    EXPECT_EQ(a.shape(), (Shape{5, 3, 7}));
    EXPECT_EQ(b.shape(), (Shape{13}));
    EXPECT_EQ(a.dtype(), dt);
    EXPECT_EQ(b.dtype(), dt);
    EXPECT_TRUE(a.is_contiguous());
  }
}

TEST(TensorFactory, ZeroSizedTensorsHaveNoElements) {
  const Tensor t = Tensor::zeros({0, 3});
  EXPECT_EQ(t.numel(), 0);
  EXPECT_EQ(t.shape(), (Shape{0, 3}));
  EXPECT_TRUE(t.to_vector().empty());
  EXPECT_EQ(t.clone().numel(), 0);
  EXPECT_EQ(t.reshape({3, 0, 5}).shape(), (Shape{3, 0, 5}));
}

// ============================================================================
// Views share storage
// ============================================================================

TEST(TensorView, ViewSharesStorageAndWritesReachTheBase) {
  const Tensor base = iota_tensor({3, 4, 5});
  const Tensor v = base.view({12, 5});
  EXPECT_EQ(v.shape(), (Shape{12, 5}));
  EXPECT_EQ(v.strides(), (Shape{5, 1}));
  EXPECT_EQ(v.storage(), base.storage());
  EXPECT_EQ(v.to_vector(), iota(60));

  v.select(0, 7).fill_(-1.0);  // row 7 of [12, 5] = base[1, 3, :]
  std::vector<double> expect = iota(60);
  for (int k = 0; k < 5; ++k) expect[size_t(ravel({1, 3, k}, {3, 4, 5}))] = -1.0;
  EXPECT_EQ(base.to_vector(), expect);

  // and the other way: writing the base is visible through the view
  base.fill_(2.0);
  EXPECT_EQ(v.to_vector(), std::vector<double>(60, 2.0));
}

TEST(TensorView, ViewInfersOneMinusOneDim) {
  const Tensor base = iota_tensor({3, 4, 5});
  EXPECT_EQ(base.view({-1}).shape(), (Shape{60}));
  EXPECT_EQ(base.view({4, -1}).shape(), (Shape{4, 15}));
  EXPECT_EQ(base.view({-1, 3, 2}).shape(), (Shape{10, 3, 2}));
  EXPECT_EQ(base.view({2, -1, 1, 2}).shape(), (Shape{2, 15, 1, 2}));
  EXPECT_EQ(base.view({4, -1}).to_vector(), iota(60));
}

TEST(TensorView, ViewWithBadShapeThrows) {
  const Tensor base = iota_tensor({3, 4, 5});
  EXPECT_THAT(error_of([&] { base.view({-1, -1}); }), HasSubstr("-1"));
  EXPECT_THAT(error_of([&] { base.view({7, -1}); }), HasSubstr("view"));
  EXPECT_THAT(error_of([&] { base.view({61}); }), HasSubstr("view"));
  EXPECT_THAT(error_of([&] { base.reshape({8, 8}); }), HasSubstr("reshape"));
}

TEST(TensorView, ViewOfNonViewableTensorThrowsAndReshapeCopies) {
  const Shape bs{3, 4, 5};
  const Tensor base = iota_tensor(bs);
  const Tensor t = base.transpose(0, 1);  // [4, 3, 5]
  EXPECT_THAT(error_of([&] { t.view({12, 5}); }), HasSubstr("view"));
  EXPECT_THAT(error_of([&] { t.view({-1}); }), HasSubstr("view"));

  const Tensor r = t.reshape({12, 5});
  EXPECT_EQ(r.shape(), (Shape{12, 5}));
  EXPECT_TRUE(r.is_contiguous());
  EXPECT_NE(r.storage(), base.storage());
  const std::vector<double> rv = r.to_vector();
  for (int64_t j = 0; j < 4; ++j)
    for (int64_t i = 0; i < 3; ++i)
      for (int64_t k = 0; k < 5; ++k)
        EXPECT_EQ(rv[size_t((j * 3 + i) * 5 + k)], double(ravel({i, j, k}, bs)));

  r.fill_(-9.0);  // a copy: the base keeps its values
  EXPECT_EQ(base.to_vector(), iota(60));
}

TEST(TensorView, ReshapeOfContiguousOrViewableTensorSharesStorage) {
  const Tensor base = iota_tensor({3, 4, 5});
  const Tensor r = base.reshape({-1, 5});
  EXPECT_EQ(r.shape(), (Shape{12, 5}));
  EXPECT_EQ(r.storage(), base.storage());
  r.select(1, 2).fill_(-1.0);
  std::vector<double> expect = iota(60);
  for (int64_t i = 0; i < 60; i += 5) expect[size_t(i + 2)] = -1.0;
  EXPECT_EQ(base.to_vector(), expect);

  // A transposed tensor can still be viewed when the merged dims stay adjacent.
  const Tensor t = base.transpose(0, 2);  // [5, 4, 3], strides [1, 5, 20]
  const Tensor u = t.reshape({5, 4, 3, 1});
  EXPECT_EQ(u.storage(), base.storage());
  const Tensor w = t.reshape({5, 4, 1, 3});
  EXPECT_EQ(w.storage(), base.storage());
  EXPECT_EQ(w.to_vector(), t.contiguous().to_vector());
}

TEST(TensorView, ViewOfSlicedRowsSplitsButCannotMergeDims) {
  const Tensor base = iota_tensor({6, 8});
  const Tensor s = base.slice(0, 0, 6, 2);  // rows 0, 2, 4: strides [16, 1]
  EXPECT_EQ(s.strides(), (Shape{16, 1}));
  const Tensor v = s.view({3, 2, 4});
  EXPECT_EQ(v.storage(), base.storage());
  EXPECT_EQ(v.strides(), (Shape{16, 4, 1}));
  const std::vector<double> vv = v.to_vector();
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t c = 0; c < 8; ++c) EXPECT_EQ(vv[size_t(r * 8 + c)], double(2 * r * 8 + c));
  EXPECT_THAT(error_of([&] { s.view({24}); }), HasSubstr("view"));
  EXPECT_EQ(s.reshape({24}).to_vector(), vv);
}

TEST(TensorView, PermuteReordersDimsAndStrides) {
  const Shape bs{3, 4, 5};
  const Tensor base = iota_tensor(bs);
  const Tensor p = base.permute({2, 0, 1});  // p[i, j, k] = base[j, k, i]
  EXPECT_EQ(p.shape(), (Shape{5, 3, 4}));
  EXPECT_EQ(p.strides(), (Shape{1, 20, 5}));
  EXPECT_FALSE(p.is_contiguous());
  EXPECT_EQ(p.storage(), base.storage());
  const std::vector<double> pv = p.to_vector();
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t j = 0; j < 3; ++j)
      for (int64_t k = 0; k < 4; ++k)
        EXPECT_EQ(pv[size_t(ravel({i, j, k}, {5, 3, 4}))], double(ravel({j, k, i}, bs)));

  p.select(0, 3).fill_(-1.0);  // base[:, :, 3]
  std::vector<double> expect = iota(60);
  for (int64_t j = 0; j < 3; ++j)
    for (int64_t k = 0; k < 4; ++k) expect[size_t(ravel({j, k, 3}, bs))] = -1.0;
  EXPECT_EQ(base.to_vector(), expect);

  EXPECT_EQ(base.permute({-1, 0, 1}).shape(), (Shape{5, 3, 4}));
  EXPECT_THAT(error_of([&] { base.permute({0, 0, 1}); }), HasSubstr("permute"));
  EXPECT_THAT(error_of([&] { base.permute({0, 1}); }), HasSubstr("permute"));
  EXPECT_THAT(error_of([&] { base.permute({0, 1, 3}); }), HasSubstr("out of range"));
}

TEST(TensorView, TransposeSwapsTwoDimsAndCopyWritesThrough) {
  const Shape bs{3, 4, 5};
  const Tensor base = iota_tensor(bs);
  const Tensor t = base.transpose(0, 2);  // [5, 4, 3], t[i, j, k] = base[k, j, i]
  EXPECT_EQ(t.shape(), (Shape{5, 4, 3}));
  EXPECT_EQ(t.strides(), (Shape{1, 5, 20}));
  EXPECT_EQ(t.storage(), base.storage());
  const std::vector<double> tv = t.to_vector();
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t j = 0; j < 4; ++j)
      for (int64_t k = 0; k < 3; ++k) EXPECT_EQ(tv[size_t(ravel({i, j, k}, {5, 4, 3}))], double(ravel({k, j, i}, bs)));

  const Tensor src = Tensor::from_values(iota(60, 1000.0), {5, 4, 3});
  t.copy_(src);
  const std::vector<double> bv = base.to_vector();
  for (int64_t i = 0; i < 5; ++i)
    for (int64_t j = 0; j < 4; ++j)
      for (int64_t k = 0; k < 3; ++k)
        EXPECT_EQ(bv[size_t(ravel({k, j, i}, bs))], 1000.0 + double(ravel({i, j, k}, {5, 4, 3})));

  EXPECT_EQ(base.transpose(-1, -2).shape(), (Shape{3, 5, 4}));
  EXPECT_THAT(error_of([&] { base.transpose(0, 3); }), HasSubstr("out of range"));
}

TEST(TensorView, SliceWithStepAndNegativeIndices) {
  const Tensor base = iota_tensor({17});
  const Tensor s = base.slice(0, 2, 15, 3);
  EXPECT_EQ(s.shape(), (Shape{5}));
  EXPECT_EQ(s.strides(), (Shape{3}));
  EXPECT_EQ(s.offset(), 2);
  EXPECT_EQ(s.to_vector(), (std::vector<double>{2, 5, 8, 11, 14}));
  EXPECT_EQ(base.slice(0, -5, -1).to_vector(), (std::vector<double>{12, 13, 14, 15}));
  EXPECT_EQ(base.slice(0, -4, 17, 2).to_vector(), (std::vector<double>{13, 15}));
  EXPECT_EQ(base.slice(0, 10, 100).to_vector(), (std::vector<double>{10, 11, 12, 13, 14, 15, 16}));
  EXPECT_EQ(base.slice(0, -100, 3).to_vector(), (std::vector<double>{0, 1, 2}));
  EXPECT_EQ(base.slice(0, 9, 4).numel(), 0);
  EXPECT_EQ(base.slice(0, 0, 17, 5).to_vector(), (std::vector<double>{0, 5, 10, 15}));
  EXPECT_THAT(error_of([&] { base.slice(0, 0, 5, 0); }), HasSubstr("step"));

  s.fill_(-1.0);
  std::vector<double> expect = iota(17);
  for (int i : {2, 5, 8, 11, 14}) expect[size_t(i)] = -1.0;
  EXPECT_EQ(base.to_vector(), expect);
}

TEST(TensorView, SliceOfColumnsWritesThroughToTheBase) {
  const Shape bs{6, 7};
  const Tensor base = iota_tensor(bs);
  const Tensor c = base.slice(1, 1, 7, 2);  // columns 1, 3, 5
  EXPECT_EQ(c.shape(), (Shape{6, 3}));
  EXPECT_EQ(c.strides(), (Shape{7, 2}));
  EXPECT_FALSE(c.is_contiguous());
  const Tensor r = c.slice(0, -2, 6);  // rows 4, 5
  EXPECT_EQ(r.to_vector(), (std::vector<double>{29, 31, 33, 36, 38, 40}));

  c.fill_(-1.0);  // non-contiguous fill
  std::vector<double> expect = iota(42);
  for (int64_t i = 0; i < 6; ++i)
    for (int64_t j : {1, 3, 5}) expect[size_t(ravel({i, j}, bs))] = -1.0;
  EXPECT_EQ(base.to_vector(), expect);
}

TEST(TensorView, NarrowSelectsARangeAndWritesThrough) {
  const Shape bs{6, 7};
  const Tensor base = iota_tensor(bs);
  const Tensor n = base.narrow(0, 2, 3);  // rows 2..4
  EXPECT_EQ(n.shape(), (Shape{3, 7}));
  EXPECT_EQ(n.storage(), base.storage());
  EXPECT_EQ(n.to_vector(), iota(21, 14.0));
  const Tensor m = base.narrow(-1, 5, 2);
  EXPECT_EQ(m.shape(), (Shape{6, 2}));
  EXPECT_EQ(m.select(0, 1).to_vector(), (std::vector<double>{12, 13}));

  n.copy_(Tensor::zeros({7}, DType::F32));  // broadcast, other dtype
  std::vector<double> expect = iota(42);
  for (int64_t i = 14; i < 35; ++i) expect[size_t(i)] = 0.0;
  EXPECT_EQ(base.to_vector(), expect);

  EXPECT_THAT(error_of([&] { base.narrow(0, 5, 3); }), HasSubstr("narrow"));
  EXPECT_THAT(error_of([&] { base.narrow(0, -1, 2); }), HasSubstr("narrow"));
}

TEST(TensorView, SelectRemovesADimAndWritesThrough) {
  const Shape bs{3, 4, 5};
  const Tensor base = iota_tensor(bs);
  const Tensor s = base.select(1, -1);  // base[:, 3, :]
  EXPECT_EQ(s.shape(), (Shape{3, 5}));
  EXPECT_EQ(s.strides(), (Shape{20, 1}));
  const std::vector<double> sv = s.to_vector();
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t k = 0; k < 5; ++k) EXPECT_EQ(sv[size_t(i * 5 + k)], double(ravel({i, 3, k}, bs)));
  EXPECT_EQ(base.select(2, 4).select(0, 2).to_vector(), (std::vector<double>{44, 49, 54, 59}));
  EXPECT_EQ(base.select(0, 1).select(0, 2).select(0, 3).item(), double(ravel({1, 2, 3}, bs)));

  s.fill_(7.5);
  std::vector<double> expect = iota(60);
  for (int64_t i = 0; i < 3; ++i)
    for (int64_t k = 0; k < 5; ++k) expect[size_t(ravel({i, 3, k}, bs))] = 7.5;
  EXPECT_EQ(base.to_vector(), expect);

  EXPECT_THAT(error_of([&] { base.select(1, 4); }), HasSubstr("select"));
  EXPECT_THAT(error_of([&] { base.select(1, -5); }), HasSubstr("select"));
}

TEST(TensorView, ExpandBroadcastsSizeOneDimsWithStrideZero) {
  const Tensor col = Tensor::from_values({1, 2, 3}, {3, 1}, DType::F64);
  const Tensor e = col.expand({2, 3, 4});
  EXPECT_EQ(e.shape(), (Shape{2, 3, 4}));
  EXPECT_EQ(e.strides(), (Shape{0, 1, 0}));
  EXPECT_EQ(e.storage(), col.storage());
  EXPECT_FALSE(e.is_contiguous());
  const std::vector<double> ev = e.to_vector();
  for (int64_t i = 0; i < 24; ++i) EXPECT_EQ(ev[size_t(i)], double(unravel(i, {2, 3, 4})[1] + 1));

  EXPECT_EQ(col.expand({-1, 4}).shape(), (Shape{3, 4}));
  EXPECT_EQ(col.expand({3, 1}).strides(), col.strides());

  col.fill_(9.0);  // shared storage: the expanded view sees it
  EXPECT_EQ(e.to_vector(), std::vector<double>(24, 9.0));

  EXPECT_THAT(error_of([&] { col.expand({3, 4}).expand({2, 4}); }), HasSubstr("expand"));
  EXPECT_THAT(error_of([&] { col.expand({4}); }), HasSubstr("expand"));
  EXPECT_THAT(error_of([&] { col.expand({-1, 3, 4}); }), HasSubstr("expand"));
}

TEST(TensorView, ExpandedTensorContiguousMaterialisesTheRepeats) {
  const Tensor row = Tensor::from_values({1, 2, 3, 4, 5}, {5}, DType::F32);
  const Tensor c = row.expand({3, 5}).contiguous();
  EXPECT_TRUE(c.is_contiguous());
  EXPECT_EQ(c.strides(), (Shape{5, 1}));
  EXPECT_NE(c.storage(), row.storage());
  std::vector<double> expect;
  for (int r = 0; r < 3; ++r)
    for (int j = 1; j <= 5; ++j) expect.push_back(j);
  EXPECT_EQ(c.to_vector(), expect);
}

TEST(TensorView, UnsqueezeAndSqueezeInsertAndRemoveUnitDims) {
  const Tensor base = iota_tensor({3, 4});
  EXPECT_EQ(base.unsqueeze(0).shape(), (Shape{1, 3, 4}));
  EXPECT_EQ(base.unsqueeze(1).shape(), (Shape{3, 1, 4}));
  EXPECT_EQ(base.unsqueeze(2).shape(), (Shape{3, 4, 1}));
  EXPECT_EQ(base.unsqueeze(-1).shape(), (Shape{3, 4, 1}));
  EXPECT_EQ(base.unsqueeze(-3).shape(), (Shape{1, 3, 4}));
  const Tensor u = base.unsqueeze(1);
  EXPECT_EQ(u.storage(), base.storage());
  EXPECT_TRUE(u.is_contiguous());
  EXPECT_EQ(u.to_vector(), iota(12));
  EXPECT_EQ(u.squeeze(1).shape(), (Shape{3, 4}));
  EXPECT_EQ(u.squeeze(-2).strides(), base.strides());
  EXPECT_EQ(Tensor::scalar(2.0).unsqueeze(0).shape(), (Shape{1}));
  EXPECT_EQ(Tensor::scalar(2.0).unsqueeze(-1).item(), 2.0);

  u.squeeze(1).select(0, 2).fill_(-3.0);
  std::vector<double> expect = iota(12);
  for (int i = 8; i < 12; ++i) expect[size_t(i)] = -3.0;
  EXPECT_EQ(base.to_vector(), expect);

  EXPECT_THAT(error_of([&] { base.squeeze(0); }), HasSubstr("squeeze"));
  EXPECT_THAT(error_of([&] { base.unsqueeze(3); }), HasSubstr("out of range"));
}

TEST(TensorView, UnsqueezeOfNonContiguousTensorKeepsElementMapping) {
  const Tensor base = iota_tensor({4, 6});
  const Tensor t = base.transpose(0, 1).slice(0, 1, 6, 2);  // [3, 4]
  const Tensor u = t.unsqueeze(1);                          // [3, 1, 4]
  EXPECT_EQ(u.shape(), (Shape{3, 1, 4}));
  EXPECT_EQ(u.to_vector(), t.to_vector());
  EXPECT_EQ(u.expand({3, 2, 4}).select(1, 1).to_vector(), t.to_vector());
}

// ============================================================================
// Dim arguments on 0-d tensors. wrap_dim accepts dim 0 / -1 for rank 0 (as
// PyTorch does); the methods must then either treat the 0-d tensor sensibly or
// throw loom::Error, never index its empty shape. Run in a child process so a
// crash fails only the test.
// ============================================================================

TEST(TensorScalarDims, SizeOfDimZeroOnScalarThrowsInsteadOfCrashing) {
  LOOM_EXPECT_CHILD_EXITS_0({
    try {
      (void)Tensor::scalar(1.0).size(0);
    } catch (const loom::Error&) {
      std::_Exit(0);
    }
    std::_Exit(3);  // returned a size for a dim that does not exist
  });
}

TEST(TensorScalarDims, SqueezeOnScalarReturnsScalarOrThrows) {
  LOOM_EXPECT_CHILD_EXITS_0({
    try {
      const Tensor s = Tensor::scalar(2.5).squeeze(0);
      std::_Exit(s.dim() == 0 && s.item() == 2.5 ? 0 : 3);
    } catch (const loom::Error&) {
      std::_Exit(0);
    }
  });
}

TEST(TensorScalarDims, SelectSliceNarrowTransposeOnScalarThrowInsteadOfCrashing) {
  LOOM_EXPECT_CHILD_EXITS_0({
    const Tensor s = Tensor::scalar(2.5);
    int thrown = 0;
    try { (void)s.select(0, 0); } catch (const loom::Error&) { ++thrown; }
    try { (void)s.slice(0, 0, 1); } catch (const loom::Error&) { ++thrown; }
    try { (void)s.narrow(0, 0, 1); } catch (const loom::Error&) { ++thrown; }
    try {
      const Tensor t = s.transpose(0, -1);  // a no-op is acceptable here
      if (t.dim() == 0) ++thrown;
    } catch (const loom::Error&) {
      ++thrown;
    }
    std::_Exit(thrown == 4 ? 0 : 3);
  });
}

}  // namespace
