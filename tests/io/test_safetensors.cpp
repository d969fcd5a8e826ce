// safetensors reader/writer (SPEC §5), detect_format and the atomic writer (io/tensor_file.h).
#include <dirent.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "io/tensor_file.h"
#include "tests/test_helpers.h"

#ifndef LOOM_IO_TEST_DIR
#error "LOOM_IO_TEST_DIR must point at tests/io"
#endif

namespace loom::io {
namespace {

using loom::testing::read_bytes;
using loom::testing::TempDir;
using loom::testing::write_bytes;

// ---- helpers ---------------------------------------------------------------------------------

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = char((n >> (8 * i)) & 0xff);
  return s;
}

// A safetensors image from a header text and a data section (the header is used verbatim).
std::string image(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

TensorFile parse(const std::string& bytes, const std::string& name = "model.safetensors") {
  return parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), name);
}

// The FileError message for `bytes`, or "" when it parses.
std::string error_of(const std::string& bytes) {
  try {
    parse(bytes);
  } catch (const FileError& e) {
    EXPECT_EQ(e.path(), "model.safetensors");
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind("model.safetensors: ", 0), 0u) << msg;
    return msg;
  }
  return "";
}

#define EXPECT_FILE_ERROR(bytes, phrase)                                             \
  do {                                                                               \
    const std::string msg_ = error_of(bytes);                                        \
    EXPECT_NE(msg_, "") << "accepted a bad file; expected: " << (phrase);             \
    EXPECT_NE(msg_.find(phrase), std::string::npos) << "message: " << msg_;           \
  } while (0)

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

// ---- reader validation -----------------------------------------------------------------------

const std::string kEntryA = R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";

TEST(SafetensorsReader, AcceptsWellFormedVariants) {
  const std::string d8(8, '\1');
  // Unpadded header, padded header, extra entry fields, zero-sized entries at tile boundaries.
  EXPECT_EQ(parse(image("{" + kEntryA + "}", d8)).tensors.size(), 1u);
  EXPECT_EQ(parse(image("{" + kEntryA + "}      \n\t ", d8)).tensors.size(), 1u);
  EXPECT_EQ(parse(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":[1]}})", d8)).tensors.size(),
            1u);
  const TensorFile f = parse(image(
      R"({"z0":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
      R"("z1":{"dtype":"I64","shape":[3,0],"data_offsets":[4,4]},"b":{"dtype":"F32","shape":[],"data_offsets":[4,8]},)"
      R"("z2":{"dtype":"BF16","shape":[0],"data_offsets":[8,8]}})",
      d8));
  ASSERT_EQ(f.tensors.size(), 5u);
  EXPECT_EQ(f.tensors[0].first, "z0");  // header order
  EXPECT_EQ(f.tensors[4].first, "z2");
  EXPECT_EQ(f.find("b")->shape(), Shape{});
  EXPECT_EQ(f.find("z1")->shape(), (Shape{3, 0}));
  // No tensors at all.
  EXPECT_TRUE(parse(image("{}")).tensors.empty());
  EXPECT_EQ(parse(image(R"({"__metadata__":{}})")).metadata.size(), 0u);
  // Entries out of data order in the header.
  const TensorFile g = parse(image(R"({"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},)" + kEntryA + "}",
                                   std::string(12, '\0')));
  EXPECT_EQ(g.tensors[0].first, "b");
  EXPECT_EQ(g.tensors[1].first, "a");
}

TEST(SafetensorsReader, HeaderLength) {
  EXPECT_FILE_ERROR(std::string(""), "truncated");
  EXPECT_FILE_ERROR(std::string("\x05\0\0", 3), "truncated");
  EXPECT_FILE_ERROR(le64(123456789012ull) + "{}", "header length 123456789012 exceeds the 100 MB limit");
  EXPECT_FILE_ERROR(le64(~0ull) + "{}", "exceeds the 100 MB limit");
  EXPECT_FILE_ERROR(le64(100000001) + "{}", "exceeds the 100 MB limit");
  EXPECT_FILE_ERROR(le64(800) + std::string(12, ' '), "truncated (header says 800 bytes, file has 20)");
  EXPECT_FILE_ERROR(le64(0), "empty header");
  EXPECT_FILE_ERROR(le64(0) + "{}", "empty header");
}

TEST(SafetensorsReader, HeaderJson) {
  EXPECT_FILE_ERROR(image("[1, 2]"), "header is not a JSON object");
  EXPECT_FILE_ERROR(image(" {}"), "header is not a JSON object");
  EXPECT_FILE_ERROR(image("\"{}\""), "header is not a JSON object");
  EXPECT_FILE_ERROR(image("        "), "header is not a JSON object");
  EXPECT_FILE_ERROR(image("{"), "header is not valid JSON");
  EXPECT_FILE_ERROR(image("{} x"), "header is not valid JSON");
  EXPECT_FILE_ERROR(image("{}{}"), "header is not valid JSON");
  EXPECT_FILE_ERROR(image(std::string("{}\0\0\0\0\0\0", 8)), "header is not valid JSON");
  EXPECT_FILE_ERROR(image("{\"a\xff\":1}"), "header is not valid JSON");  // not UTF-8
  EXPECT_FILE_ERROR(image("{\"a\":" + std::string(100, '[') + std::string(100, ']') + "}"), "nested");
  EXPECT_FILE_ERROR(image("{\"a\":\"" + std::string(100, '[') + "\"}"), "entry 'a' is not an object");  // brackets in a string
  EXPECT_FILE_ERROR(image(R"({"a":1})"), "entry 'a' is not an object");
  EXPECT_FILE_ERROR(image(R"({"a":[]})"), "entry 'a' is not an object");
}

TEST(SafetensorsReader, DuplicateKeys) {
  const std::string d8(8, '\0');
  EXPECT_FILE_ERROR(image("{" + kEntryA + "," + kEntryA + "}", d8), "duplicate key 'a'");
  EXPECT_FILE_ERROR(image(R"({"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}})", d8),
                    "duplicate key 'dtype'");
  EXPECT_FILE_ERROR(image(R"({"__metadata__":{"k":"1","k":"2"}})"), "duplicate key 'k'");
  EXPECT_FILE_ERROR(image(R"({"__metadata__":{},"__metadata__":{}})"), "duplicate key '__metadata__'");
  // The same key in different objects is fine.
  EXPECT_EQ(parse(image(R"({"__metadata__":{"a":"x"},)" + kEntryA + "}", d8)).metadata.at("a"), "x");
}

TEST(SafetensorsReader, Metadata) {
  EXPECT_FILE_ERROR(image(R"({"__metadata__":{"k":1}})"), "__metadata__ value for key 'k' is not a string");
  EXPECT_FILE_ERROR(image(R"({"__metadata__":{"k":null}})"), "is not a string");
  EXPECT_FILE_ERROR(image(R"({"__metadata__":{"k":{"x":"y"}}})"), "is not a string");
  EXPECT_FILE_ERROR(image(R"({"__metadata__":["k"]})"), "__metadata__ is not an object");
  EXPECT_FILE_ERROR(image(R"({"__metadata__":"k"})"), "__metadata__ is not an object");
  const TensorFile f = parse(image(R"({"__metadata__":{"format":"pt","x":"\u00e9\n"}})"));
  EXPECT_EQ(f.metadata.at("format"), "pt");
  EXPECT_EQ(f.metadata.at("x"), "\xc3\xa9\n");
}

TEST(SafetensorsReader, EntryFields) {
  const std::string d8(8, '\0');
  EXPECT_FILE_ERROR(image(R"({"a":{"shape":[2],"data_offsets":[0,8]}})", d8), "entry 'a' has no dtype");
  EXPECT_FILE_ERROR(image(R"({"a":{"dtype":"F32","data_offsets":[0,8]}})", d8), "entry 'a' has no shape");
  EXPECT_FILE_ERROR(image(R"({"a":{"dtype":"F32","shape":[2]}})", d8), "entry 'a' has no data_offsets");
  EXPECT_FILE_ERROR(image(R"({"a":{"dtype":5,"shape":[2],"data_offsets":[0,8]}})", d8), "dtype that is not a string");
}

TEST(SafetensorsReader, Dtypes) {
  EXPECT_FILE_ERROR(image(R"({"lora.alpha":{"dtype":"Q7","shape":[],"data_offsets":[0,4]}})", std::string(4, '\0')),
                    "entry 'lora.alpha' has unknown dtype 'Q7'");
  EXPECT_FILE_ERROR(image(R"({"a":{"dtype":"f32","shape":[],"data_offsets":[0,4]}})", std::string(4, '\0')),
                    "unknown dtype 'f32'");
  // Dtypes of the format that loom cannot hold: checked for layout, then rejected by name.
  for (const auto& [dt, size] : std::vector<std::pair<std::string, int>>{{"U64", 8}, {"F8_E4M3", 1}, {"C64", 8}}) {
    SCOPED_TRACE(dt);
    const std::string h = R"({"w":{"dtype":")" + dt + R"(","shape":[3],"data_offsets":[0,)" + std::to_string(3 * size) + "]}}";
    EXPECT_FILE_ERROR(image(h, std::string(size_t(3 * size), '\0')), "entry 'w' has dtype " + dt + ", which loom cannot read");
    // A layout error in the same file is reported first.
    EXPECT_FILE_ERROR(image(h, std::string(size_t(3 * size + 1), '\0')), "1 trailing bytes");
  }
}

// Integer dtypes without a loom type (kohya writes alphas in them) are widened to i64, sign kept.
TEST(SafetensorsReader, SmallIntegerDtypesWidenToI64) {
  struct Case {
    std::string dtype;
    std::string bytes;  // little-endian elements
    std::vector<double> want;
  };
  const std::vector<Case> cases{
      {"I32", std::string("\x04\x00\x00\x00\xff\xff\xff\xff", 8), {4, -1}},
      {"I16", std::string("\x08\x00\xfe\xff", 4), {8, -2}},
      {"I8", std::string("\x7f\x80", 2), {127, -128}},
      {"U8", std::string("\xff\x10", 2), {255, 16}},
      {"U16", std::string("\xff\xff\x01\x00", 4), {65535, 1}},
      {"U32", std::string("\xff\xff\xff\xff\x02\x00\x00\x00", 8), {4294967295.0, 2}},
      {"BOOL", std::string("\x01\x00", 2), {1, 0}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.dtype);
    const std::string h = R"({"alpha":{"dtype":")" + c.dtype + R"(","shape":[2],"data_offsets":[0,)" +
                          std::to_string(c.bytes.size()) + "]}}";
    const std::string img = image(h, c.bytes);
    const loom::io::TensorFile f =
        loom::io::parse_safetensors(reinterpret_cast<const uint8_t*>(img.data()), img.size(), "t.safetensors");
    ASSERT_EQ(f.tensors.size(), 1u);
    EXPECT_EQ(f.tensors[0].second.dtype(), loom::DType::I64);
    EXPECT_EQ(f.tensors[0].second.to_vector(), c.want);
  }
}

TEST(SafetensorsReader, Shapes) {
  const std::string d8(8, '\0');
  for (const std::string shape : {"[-2]", "[2.0]", "[\"2\"]", "[null]", "2", "{}", "[[2]]", "[1e3]", "[9223372036854775808]",
                                  "[18446744073709551616]", "[true]"}) {
    SCOPED_TRACE(shape);
    EXPECT_FILE_ERROR(image(R"({"a":{"dtype":"F32","shape":)" + shape + R"(,"data_offsets":[0,8]}})", d8),
                      "entry 'a' has a shape that is not a list of non-negative integers");
  }
  EXPECT_FILE_ERROR(image(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", d8),
                    "overflows");
  // Overflow among the non-zero sizes is rejected even though a zero makes the count 0.
  EXPECT_FILE_ERROR(
      image(R"({"a":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904,0],"data_offsets":[0,0]}})"),
      "overflows");
  // numel fits in int64 but numel * itemsize does not fit in 64 bits.
  EXPECT_FILE_ERROR(image(R"({"a":{"dtype":"F64","shape":[4611686018427387904],"data_offsets":[0,8]}})", d8),
                    "entry 'a' has 8 bytes but shape [4611686018427387904] of F64 needs more than 2^64");
}

TEST(SafetensorsReader, DataOffsets) {
  const std::string d8(8, '\0');
  for (const std::string off : {"[0]", "[0,8,8]", "[]", "[-1,8]", "[0,8.0]", "[0,\"8\"]", "\"0,8\"", "{\"0\":8}",
                                "[0,null]", "[0,18446744073709551616]"}) {
    SCOPED_TRACE(off);
    EXPECT_FILE_ERROR(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":)" + off + "}}", d8),
                      "entry 'a' has data_offsets that are not two non-negative integers");
  }
  EXPECT_FILE_ERROR(image(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", d8), "begin after end");
  EXPECT_FILE_ERROR(image(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", d8),
                    "entry 'a' has data_offsets [0, 16) outside the file");
  EXPECT_FILE_ERROR(image(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[9,9]}})", d8), "outside the file");
  EXPECT_FILE_ERROR(image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551615,18446744073709551615]}})", d8),
                    "outside the file");
}

TEST(SafetensorsReader, SizeMismatch) {
  EXPECT_FILE_ERROR(
      image(R"({"a.weight":{"dtype":"F32","shape":[2,4],"data_offsets":[0,24]}})", std::string(24, '\0')),
      "entry 'a.weight' has 24 bytes but shape [2, 4] of F32 needs 32");
  EXPECT_FILE_ERROR(image(R"({"s":{"dtype":"BF16","shape":[],"data_offsets":[0,4]}})", std::string(4, '\0')),
                    "entry 's' has 4 bytes but shape [] of BF16 needs 2");
}

TEST(SafetensorsReader, Tiling) {
  const auto e = [](const std::string& name, int b, int end, int n) {
    return "\"" + name + R"(":{"dtype":"F32","shape":[)" + std::to_string(n) + R"(],"data_offsets":[)" + std::to_string(b) +
           "," + std::to_string(end) + "]}";
  };
  EXPECT_FILE_ERROR(image("{" + e("a", 0, 8, 2) + "," + e("b", 4, 12, 2) + "}", std::string(12, '\0')),
                    "entries 'a' and 'b' overlap");
  EXPECT_FILE_ERROR(image("{" + e("b", 0, 8, 2) + "," + e("a", 0, 8, 2) + "}", std::string(8, '\0')), "overlap");
  EXPECT_FILE_ERROR(image("{" + e("a", 0, 8, 2) + "," + e("z", 4, 4, 0) + "}", std::string(8, '\0')),
                    "entries 'a' and 'z' overlap");  // a zero-sized entry inside another
  EXPECT_FILE_ERROR(image("{" + e("a", 0, 8, 2) + "," + e("b", 12, 16, 1) + "}", std::string(16, '\0')),
                    "gap of 4 bytes before entry 'b'");
  EXPECT_FILE_ERROR(image("{" + e("a", 4, 8, 1) + "}", std::string(8, '\0')),
                    "gap of 4 bytes before entry 'a' (at the start of the data)");
  EXPECT_FILE_ERROR(image("{" + e("a", 0, 8, 2) + "}", std::string(13, '\0')), "5 trailing bytes after the last tensor");
  EXPECT_FILE_ERROR(image("{}", "xyz"), "3 trailing bytes");
  EXPECT_FILE_ERROR(image(R"({"__metadata__":{"a":"b"}})", "x"), "1 trailing bytes");
}

TEST(SafetensorsReader, NoTensorOnError) {
  // The first entry is fine and the second is not: nothing is returned, the error names the second.
  const std::string h = "{" + kEntryA + R"(,"b":{"dtype":"F32","shape":[3],"data_offsets":[8,16]}})";
  EXPECT_FILE_ERROR(image(h, std::string(16, '\0')), "entry 'b' has 8 bytes but shape [3] of F32 needs 12");
}

TEST(SafetensorsReader, Files) {
  TempDir dir;
  try {
    read_safetensors(dir / "missing.safetensors");
    ADD_FAILURE();
  } catch (const FileError& e) {
    EXPECT_EQ(std::string(e.what()), dir / "missing.safetensors" + ": cannot open (No such file or directory)");
    EXPECT_EQ(e.path(), dir / "missing.safetensors");
  }
  EXPECT_THROW(read_safetensors(dir.path()), FileError);
  write_bytes(dir / "empty", "");
  try {
    read_safetensors(dir / "empty");
    ADD_FAILURE();
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find(dir / "empty: truncated"), std::string::npos) << e.what();
  }
  write_bytes(dir / "trunc.safetensors", le64(800) + std::string(12, ' '));
  try {
    read_safetensors(dir / "trunc.safetensors");
    ADD_FAILURE();
  } catch (const FileError& e) {
    EXPECT_EQ(std::string(e.what()), dir / "trunc.safetensors" + ": truncated (header says 800 bytes, file has 20)");
  }
  // A truncated data section (a file cut short).
  write_safetensors(dir / "ok.safetensors", {{"w", Tensor::from_values({1, 2, 3, 4}, {4})}});
  const std::string full = read_bytes(dir / "ok.safetensors");
  write_bytes(dir / "cut.safetensors", full.substr(0, full.size() - 3));
  try {
    read_safetensors(dir / "cut.safetensors");
    ADD_FAILURE();
  } catch (const FileError& e) {
    EXPECT_NE(std::string(e.what()).find("entry 'w' has data_offsets [0, 16) outside the file"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(read_safetensors("/dev/null"), FileError);  // not a regular file
  EXPECT_THROW(parse_safetensors(nullptr, 0, "x"), FileError);
}

// ---- detect_format / read_tensor_file ----------------------------------------------------------

TEST(TensorFile, DetectFormat) {
  TempDir dir;
  write_safetensors(dir / "m.bin", {{"w", Tensor::scalar(2)}});
  EXPECT_EQ(detect_format(dir / "m.bin"), FileFormat::Safetensors);  // by content, not by extension
  const TensorFile f = read_tensor_file(dir / "m.bin");
  ASSERT_EQ(f.tensors.size(), 1u);
  EXPECT_EQ(f.tensors[0].second.item(), 2.0);

  write_bytes(dir / "x.h5", std::string("\x89HDF\r\n\x1a\n", 8) + std::string(100, '\0'));
  EXPECT_EQ(detect_format(dir / "x.h5"), FileFormat::Hdf5);
  write_bytes(dir / "ub.h5", std::string(512, '\0') + std::string("\x89HDF\r\n\x1a\n", 8) + std::string(100, '\0'));
  EXPECT_EQ(detect_format(dir / "ub.h5"), FileFormat::Hdf5);  // after a 512-byte user block

  // A truncated safetensors file is still recognised, so that the reader can say what is wrong.
  write_bytes(dir / "t.safetensors", le64(800) + "{\"a\"");
  EXPECT_EQ(detect_format(dir / "t.safetensors"), FileFormat::Safetensors);

  for (const std::string& junk : {std::string("hello world, this is text"), std::string(""), std::string("{}"),
                                  le64(123456789012ull) + "{}", le64(16) + "[1,2]"}) {
    write_bytes(dir / "junk", junk);
    try {
      detect_format(dir / "junk");
      ADD_FAILURE() << junk;
    } catch (const FileError& e) {
      EXPECT_EQ(std::string(e.what()), dir / "junk" + ": not a safetensors or HDF5 file");
    }
    EXPECT_THROW(read_tensor_file(dir / "junk"), FileError);
  }
  try {
    detect_format(dir / "missing");
    ADD_FAILURE();
  } catch (const FileError& e) {
    EXPECT_EQ(std::string(e.what()), dir / "missing" + ": cannot open (No such file or directory)");
  }
  EXPECT_THROW(detect_format(dir.path()), FileError);
  EXPECT_STREQ(format_name(FileFormat::Safetensors), "safetensors");
  EXPECT_STREQ(format_name(FileFormat::Hdf5), "HDF5");
}

TEST(TensorFile, FileErrorMessage) {
  const FileError e("model.safetensors", "header length 5 exceeds the 100 MB limit");
  EXPECT_STREQ(e.what(), "model.safetensors: header length 5 exceeds the 100 MB limit");
  EXPECT_EQ(e.path(), "model.safetensors");
  const Error& base = e;  // a loom::Error
  EXPECT_NE(std::string(base.what()).find("100 MB"), std::string::npos);
}

// ---- atomic writes ---------------------------------------------------------------------------

TEST(AtomicWrite, WritesAndReplaces) {
  TempDir dir;
  write_file_atomic(dir / "f", "first");
  EXPECT_EQ(read_bytes(dir / "f"), "first");
  ::chmod((dir / "f").c_str(), 0640);
  write_file_atomic(dir / "f", std::string("sec\0ond", 7));
  EXPECT_EQ(read_bytes(dir / "f"), std::string("sec\0ond", 7));
  struct stat st {};
  ASSERT_EQ(::stat((dir / "f").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0640u);  // the replaced file's permissions are kept
  write_file_atomic(dir / "e", "");
  EXPECT_EQ(read_bytes(dir / "e"), "");
  EXPECT_EQ(dir.files(), (std::vector<std::string>{"e", "f"}));  // no temporary files left
}

TEST(AtomicWrite, MissingDirectoryThrowsAndCreatesNothing) {
  TempDir dir;
  const std::string path = dir / "no/such/dir/model.safetensors";
  try {
    write_safetensors(path, {{"w", Tensor::scalar(1)}});
    ADD_FAILURE();
  } catch (const FileError& e) {
    EXPECT_EQ(e.path(), path);
    EXPECT_NE(std::string(e.what()).find("No such file or directory"), std::string::npos) << e.what();
  }
  EXPECT_THROW(write_file_atomic(path, "x"), FileError);
  EXPECT_TRUE(dir.files().empty());
  struct stat st {};
  EXPECT_NE(::stat((dir / "no").c_str(), &st), 0);
}

TEST(AtomicWrite, FailedRenameRemovesTheTemporaryFile) {
  TempDir dir;
  ASSERT_EQ(::mkdir((dir / "target").c_str(), 0755), 0);
  ASSERT_EQ(::mkdir((dir / "target/inside").c_str(), 0755), 0);  // a non-empty directory cannot be replaced
  EXPECT_THROW(write_safetensors(dir / "target", {{"w", Tensor::scalar(1)}}), FileError);
  EXPECT_EQ(dir.files(), std::vector<std::string>{"target"});
  ::rmdir((dir / "target/inside").c_str());
  ::rmdir((dir / "target").c_str());
}

// A child process writing a large file is killed mid-write: the previous file must be intact.
TEST(AtomicWrite, KillMidWriteLeavesThePreviousFile) {
  TempDir dir;
  const std::string path = dir / "model.safetensors";
  const Tensor old_w = Tensor::from_values({1, 2, 3, 4, 5, 6}, {2, 3});
  write_safetensors(path, {{"w", old_w}}, {{"version", "old"}});
  const std::string before = read_bytes(path);

  // 200 MB, made before fork (the child only writes). Filled in a plain loop: no threads needed.
  const int64_t n = 50 * 1000 * 1000;
  const Tensor big = Tensor::empty({n}, DType::F32);
  float* p = big.data<float>();
  for (int64_t i = 0; i < n; ++i) p[i] = float(i % 1000);
  const uint64_t full_size = uint64_t(n) * 4;
  const std::string tmp_prefix = ".model.safetensors.tmp.";

  bool killed_mid_write = false;
  for (int attempt = 0; attempt < 5 && !killed_mid_write; ++attempt) {
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      try {
        for (int i = 0; i < 1000; ++i) write_safetensors(path, {{"w", big}}, {{"version", "new"}});
      } catch (...) {
      }
      ::_exit(0);
    }
    // Poll (bounded, short sleeps) until the child's temporary file exists and is partly written.
    const std::string tmp = tmp_prefix + std::to_string(child);
    bool seen = false;
    for (int i = 0; i < 200000 && !seen; ++i) {  // at most ~20 s
      struct stat st {};
      if (::stat((dir / tmp).c_str(), &st) == 0 && st.st_size > 0 && uint64_t(st.st_size) < full_size / 2) seen = true;
      else {
        const timespec ts{0, 100 * 1000};
        ::nanosleep(&ts, nullptr);
      }
    }
    ::kill(child, SIGKILL);
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    EXPECT_TRUE(WIFSIGNALED(status));
    struct stat st {};
    // The temporary file still there (and short) proves the kill came before the first rename.
    killed_mid_write = seen && ::stat((dir / tmp).c_str(), &st) == 0 && uint64_t(st.st_size) < full_size;
    ::unlink((dir / tmp).c_str());
    if (!killed_mid_write) write_bytes(path, before);  // the child got through a whole write: retry
  }
  ASSERT_TRUE(killed_mid_write) << "could not catch the child in the middle of a write";
  EXPECT_EQ(read_bytes(path), before);
  const TensorFile f = read_safetensors(path);
  ASSERT_EQ(f.tensors.size(), 1u);
  EXPECT_EQ(f.tensors[0].second.to_vector(), old_w.to_vector());
  EXPECT_EQ(f.metadata.at("version"), "old");
  EXPECT_EQ(dir.files(), std::vector<std::string>{"model.safetensors"});
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

// ---- the fuzz corpus, replayed under the regular (sanitizer) build ------------------------------

TEST(SafetensorsFuzzCorpus, EveryFileParsesOrFailsCleanly) {
  const std::string corpus = std::string(LOOM_IO_TEST_DIR) + "/corpus";
  DIR* d = ::opendir(corpus.c_str());
  ASSERT_NE(d, nullptr) << corpus;
  int count = 0, ok = 0;
  while (dirent* e = ::readdir(d)) {
    if (e->d_name[0] == '.') continue;
    const std::string bytes = read_bytes(corpus + "/" + e->d_name);
    ++count;
    try {
      parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), e->d_name);
      ++ok;
    } catch (const Error&) {
    }
  }
  ::closedir(d);
  EXPECT_GE(count, 10);
  EXPECT_GE(ok, 1);
}

}  // namespace
}  // namespace loom::io
