// safetensors (SPEC §5): round trips of every dtype, the writer's byte layout and refusals, files written by Python.
//
// The reader's validation of malformed files: test_safetensors_reader.cpp; detect_format and the
// atomic writer: test_tensor_file.cpp (ctest -L io).
#include <gtest/gtest.h>

#include <cstdint>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "io/tensor_file.h"
#include "tests/test_helpers.h"

#ifndef LOOM_IO_TEST_DIR
#error "LOOM_IO_TEST_DIR must point at tests/io"
#endif

namespace loom::io {
namespace {

using loom::testing::le64;
using loom::testing::read_bytes;
using loom::testing::TempDir;

// ---- helpers ---------------------------------------------------------------------------------

std::string raw(const Tensor& t) {
  const Tensor c = t.contiguous();
  return std::string(static_cast<const char*>(c.raw_data()), size_t(c.numel()) * itemsize(c.dtype()));
}

// A tensor of `dtype` whose bytes follow a fixed pseudo-random pattern (NaN/Inf bit patterns included).
Tensor patterned(const Shape& shape, DType dtype, uint32_t seed) {
  Tensor t = Tensor::empty(shape, dtype);
  auto* p = static_cast<unsigned char*>(t.raw_data());
  uint32_t x = seed * 2654435761u + 12345u;
  for (size_t i = 0; i < size_t(t.numel()) * itemsize(dtype); ++i) {
    x ^= x << 13, x ^= x >> 17, x ^= x << 5;
    p[i] = static_cast<unsigned char>(x);
  }
  return t;
}
// ---- round trips ---------------------------------------------------------------------------------

TEST(Safetensors, RoundTripEveryDtypeWithMetadata) {
  TempDir dir;
  const std::vector<std::pair<std::string, Tensor>> tensors = {
      {"layer.f32", patterned({3, 5}, DType::F32, 1)},  {"layer.f64", patterned({7}, DType::F64, 2)},
      {"layer.f16", patterned({2, 3, 2}, DType::F16, 3)}, {"layer.bf16", patterned({9}, DType::BF16, 4)},
      {"layer.i64", patterned({2, 2}, DType::I64, 5)},
  };
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"lora_adapter_metadata", "{\"r\": 4}"},
                                                       {"empty", ""}, {"unicode", "\xc3\xa9t\xc3\xa9"}};
  const std::string path = dir / "all.safetensors";
  write_safetensors(path, tensors, metadata);
  const TensorFile f = read_safetensors(path);
  ASSERT_EQ(f.tensors.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    SCOPED_TRACE(tensors[i].first);
    EXPECT_EQ(f.tensors[i].first, tensors[i].first);  // the order given
    const Tensor& t = f.tensors[i].second;
    EXPECT_EQ(t.dtype(), tensors[i].second.dtype());
    EXPECT_EQ(t.shape(), tensors[i].second.shape());
    EXPECT_TRUE(t.device().is_cpu());
    EXPECT_EQ(raw(t), raw(tensors[i].second));  // bit-exact, NaN patterns included
  }
  EXPECT_EQ(f.metadata, metadata);
  EXPECT_TRUE(f.attributes.empty());
  EXPECT_TRUE(f.group_attributes.empty());
}

TEST(Safetensors, RoundTripValues) {
  TempDir dir;
  const std::vector<double> v = {1.0, -2.5, 0.15625, 3.0, 1024.0, -0.0};
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (DType d : {DType::F32, DType::F64, DType::F16, DType::BF16, DType::I64})
    tensors.emplace_back(std::string("t.") + dtype_name(d), Tensor::from_values(d == DType::I64 ? std::vector<double>{1, -2, 0, 3, 1024, 7} : v, {2, 3}, d));
  write_safetensors(dir / "v.safetensors", tensors);
  const TensorFile f = read_safetensors(dir / "v.safetensors");
  ASSERT_EQ(f.tensors.size(), 5u);
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(f.tensors[i].second.to_vector(), tensors[i].second.to_vector());
  EXPECT_TRUE(f.metadata.empty());
}

TEST(Safetensors, ZeroDimAndEmptyTensors) {
  TempDir dir;
  const std::vector<std::pair<std::string, Tensor>> tensors = {
      {"alpha", Tensor::scalar(4.0)},
      {"alpha_i", Tensor::scalar(8.0, DType::I64)},
      {"empty", Tensor::empty({0}, DType::F32)},
      {"empty3", Tensor::empty({3, 0, 2}, DType::BF16)},
      {"after", Tensor::from_values({1, 2, 3}, {3}, DType::F64)},
  };
  write_safetensors(dir / "z.safetensors", tensors);
  const TensorFile f = read_safetensors(dir / "z.safetensors");
  ASSERT_EQ(f.tensors.size(), tensors.size());
  EXPECT_EQ(f.tensors[0].second.shape(), Shape{});
  EXPECT_EQ(f.tensors[0].second.item(), 4.0);
  EXPECT_EQ(f.tensors[1].second.dtype(), DType::I64);
  EXPECT_EQ(f.tensors[1].second.item(), 8.0);
  EXPECT_EQ(f.tensors[2].second.shape(), Shape{0});
  EXPECT_EQ(f.tensors[3].second.shape(), (Shape{3, 0, 2}));
  EXPECT_EQ(f.tensors[3].second.dtype(), DType::BF16);
  EXPECT_EQ(f.tensors[4].second.to_vector(), (std::vector<double>{1, 2, 3}));
}

TEST(Safetensors, NoTensors) {
  TempDir dir;
  write_safetensors(dir / "none.safetensors", {});
  EXPECT_EQ(read_bytes(dir / "none.safetensors"), le64(8) + "{}      ");
  const TensorFile f = read_safetensors(dir / "none.safetensors");
  EXPECT_TRUE(f.tensors.empty());
  EXPECT_TRUE(f.metadata.empty());
  write_safetensors(dir / "meta.safetensors", {}, {{"k", "v"}});
  EXPECT_EQ(read_safetensors(dir / "meta.safetensors").metadata.at("k"), "v");
}

TEST(Safetensors, NonContiguousTensorsAreWrittenInLogicalOrder) {
  TempDir dir;
  const Tensor a = Tensor::from_values({1, 2, 3, 4, 5, 6}, {2, 3});
  const Tensor at = a.transpose(0, 1);  // [3, 2], a view
  ASSERT_FALSE(at.is_contiguous());
  write_safetensors(dir / "t.safetensors", {{"at", at}});
  const TensorFile f = read_safetensors(dir / "t.safetensors");
  EXPECT_EQ(f.tensors[0].second.shape(), (Shape{3, 2}));
  EXPECT_EQ(f.tensors[0].second.to_vector(), (std::vector<double>{1, 4, 2, 5, 3, 6}));
}

TEST(Safetensors, KeysKeepTheOrderGiven) {
  TempDir dir;
  write_safetensors(dir / "o.safetensors", {{"z", Tensor::scalar(1)}, {"a", Tensor::scalar(2)}, {"m", Tensor::scalar(3)}});
  const TensorFile f = read_safetensors(dir / "o.safetensors");
  ASSERT_EQ(f.tensors.size(), 3u);
  EXPECT_EQ(f.tensors[0].first, "z");
  EXPECT_EQ(f.tensors[1].first, "a");
  EXPECT_EQ(f.tensors[2].first, "m");
  ASSERT_NE(f.find("a"), nullptr);
  EXPECT_EQ(f.find("a")->item(), 2.0);
  EXPECT_EQ(f.find("nope"), nullptr);
}

// ---- writer byte layout ------------------------------------------------------------------------

TEST(Safetensors, WriterByteLayout) {
  TempDir dir;
  const Tensor a = Tensor::from_values({1, 2, 3}, {3}, DType::F32);       // 12 bytes
  const Tensor b = Tensor::from_values({-1, 0.5}, {1, 2}, DType::F16);    // 4 bytes
  const Tensor c = Tensor::scalar(7, DType::I64);                         // 8 bytes
  for (const std::string name : {"x", "a.longer.name.to.change.the.padding", "ab"}) {
    SCOPED_TRACE(name);
    write_safetensors(dir / "l.safetensors", {{name, a}, {"b", b}, {"c", c}}, {{"format", "pt"}});
    const std::string bytes = read_bytes(dir / "l.safetensors");
    ASSERT_GE(bytes.size(), 9u);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(bytes[i]);
    EXPECT_EQ(n % 8, 0u);  // the data starts at a multiple of 8
    EXPECT_EQ(bytes[8], '{');
    ASSERT_EQ(bytes.size(), 8 + n + 12 + 4 + 8);
    const std::string header = bytes.substr(8, n);
    const size_t close = header.find_last_of('}');
    ASSERT_NE(close, std::string::npos);
    EXPECT_LT(header.size() - 1 - close, 8u);
    EXPECT_EQ(header.substr(close + 1), std::string(header.size() - 1 - close, ' '));  // padded with spaces
    const auto j = nlohmann::ordered_json::parse(header);
    std::vector<std::string> keys;
    for (const auto& [k, v] : j.items()) keys.push_back(k);
    EXPECT_EQ(keys, (std::vector<std::string>{"__metadata__", name, "b", "c"}));
    EXPECT_EQ(j["__metadata__"], nlohmann::ordered_json({{"format", "pt"}}));
    EXPECT_EQ(j[name]["dtype"], "F32");
    EXPECT_EQ(j[name]["shape"], nlohmann::ordered_json({3}));
    EXPECT_EQ(j[name]["data_offsets"], nlohmann::ordered_json({0, 12}));
    EXPECT_EQ(j["b"]["dtype"], "F16");
    EXPECT_EQ(j["b"]["shape"], nlohmann::ordered_json({1, 2}));
    EXPECT_EQ(j["b"]["data_offsets"], nlohmann::ordered_json({12, 16}));
    EXPECT_EQ(j["c"]["dtype"], "I64");
    EXPECT_EQ(j["c"]["shape"], nlohmann::ordered_json::array());
    EXPECT_EQ(j["c"]["data_offsets"], nlohmann::ordered_json({16, 24}));
    EXPECT_EQ(bytes.substr(8 + n), raw(a) + raw(b) + raw(c));
  }
}

TEST(Safetensors, WriterRejectsBadInputAndLeavesTheOldFile) {
  TempDir dir;
  const std::string path = dir / "w.safetensors";
  write_safetensors(path, {{"keep", Tensor::scalar(1)}});
  const std::string before = read_bytes(path);
  auto expect = [&](const std::vector<std::pair<std::string, Tensor>>& t, const std::map<std::string, std::string>& m,
                    const std::string& phrase) {
    try {
      write_safetensors(path, t, m);
      ADD_FAILURE() << "no error; expected " << phrase;
    } catch (const FileError& e) {
      EXPECT_NE(std::string(e.what()).find(phrase), std::string::npos) << e.what();
      EXPECT_EQ(e.path(), path);
    }
    EXPECT_EQ(read_bytes(path), before);
    EXPECT_EQ(dir.files(), std::vector<std::string>{"w.safetensors"});  // no temporary left behind
  };
  expect({{"a", Tensor::scalar(1)}, {"a", Tensor::scalar(2)}}, {}, "two tensors are named 'a'");
  expect({{"__metadata__", Tensor::scalar(1)}}, {}, "__metadata__");
  expect({{"u", Tensor()}}, {}, "undefined");
  expect({{"bad\xff", Tensor::scalar(1)}}, {}, "UTF-8");
  expect({{"ok", Tensor::scalar(1)}}, {{"k", "bad\xc3"}}, "UTF-8");
}
// ---- interop with the official safetensors package ---------------------------------------------

TEST(SafetensorsInterop, FilesWrittenByPythonSafetensors) {
  const std::string fixtures = std::string(LOOM_IO_TEST_DIR) + "/fixtures/";
  std::ifstream in(fixtures + "safetensors_expected.json");
  ASSERT_TRUE(in) << "missing " << fixtures << "safetensors_expected.json (run make_safetensors_fixtures.py)";
  const nlohmann::json expected = nlohmann::json::parse(in);
  ASSERT_GE(expected.size(), 2u);
  for (const auto& [file, want] : expected.items()) {
    SCOPED_TRACE(file);
    const TensorFile f = read_safetensors(fixtures + file);
    EXPECT_EQ(f.metadata, (want["metadata"].get<std::map<std::string, std::string>>()));
    ASSERT_EQ(f.tensors.size(), want["tensors"].size());
    for (const auto& [name, w] : want["tensors"].items()) {
      SCOPED_TRACE(name);
      const Tensor* t = f.find(name);
      ASSERT_NE(t, nullptr);
      const std::string dt = w["dtype"];
      const DType d = dt == "F32" ? DType::F32 : dt == "F64" ? DType::F64 : dt == "F16" ? DType::F16
                    : dt == "BF16" ? DType::BF16 : DType::I64;
      EXPECT_EQ(t->dtype(), d);
      EXPECT_EQ(t->shape(), w["shape"].get<Shape>());
      if (d == DType::I64) {
        const std::vector<int64_t> want_v = w["values"];
        ASSERT_EQ(t->numel(), int64_t(want_v.size()));
        for (size_t i = 0; i < want_v.size(); ++i) EXPECT_EQ(t->data<int64_t>()[i], want_v[i]);
      } else {
        EXPECT_EQ(t->to_vector(), w["values"].get<std::vector<double>>());  // exact
      }
    }
  }
}

}  // namespace
}  // namespace loom::io
