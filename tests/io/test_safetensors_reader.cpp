// The safetensors reader (SPEC §5): every rule checked before any tensor is made; the fuzz corpus replayed.
#include <dirent.h>
#include <gtest/gtest.h>

#include <cstdint>
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
using loom::testing::write_bytes;

// ---- helpers ---------------------------------------------------------------------------------

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
