// io::all_finite and io::read_weight_file (io/tensor_file.h): the finiteness check and the
// "no checksum" notes that every model loader (UNet and VAE directories, single-file
// checkpoints, one-block model directories) gets from the one weight reader.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <limits>
#include <unistd.h>

#include "io/tensor_file.h"
#include "tests/test_helpers.h"

namespace loom::io {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;

const std::string kFixtures = std::string(LOOM_SOURCE_DIR) + "/tests/io/fixtures/";

TEST(WeightFile, AllFiniteInEveryDtypeAndLayout) {
  const double inf = std::numeric_limits<double>::infinity(), nan = std::numeric_limits<double>::quiet_NaN();
  for (DType d : {DType::F32, DType::F64, DType::BF16, DType::F16}) {
    SCOPED_TRACE(dtype_name(d));
    Tensor t = Tensor::full({3, 5}, 1.5, d);
    EXPECT_TRUE(all_finite(t));
    // the largest finite values are finite; Inf, -Inf and NaN are not, wherever they are
    EXPECT_TRUE(all_finite(Tensor::full({2}, d == DType::F16 ? 65504.0 : d == DType::BF16 ? 3.3e38 : 1e38, d)));
    for (double bad : {inf, -inf, nan})
      for (int64_t at : {0, 7, 14}) {
        Tensor u = Tensor::full({3, 5}, -2.0, DType::F64);
        u.data<double>()[at] = bad;
        EXPECT_FALSE(all_finite(u.to(d))) << bad << " at " << at;
        EXPECT_FALSE(all_finite(u.to(d).transpose(0, 1))) << "non-contiguous, " << bad << " at " << at;
      }
    // a view that leaves the bad value out is finite
    Tensor u = Tensor::full({3, 5}, 0.25, DType::F64);
    u.data<double>()[0] = nan;
    EXPECT_TRUE(all_finite(u.to(d).narrow(0, 1, 2)));
  }
  EXPECT_TRUE(all_finite(Tensor::zeros({0}, DType::F32)));
  EXPECT_TRUE(all_finite(Tensor::full({2}, 3, DType::I64)));
}

TEST(WeightFile, NamesTheFileAndKeyOfANonFiniteWeightAndPassesOnNotes) {
  const std::string dir = (fs::temp_directory_path() / ("loom_weight_file_" + std::to_string(::getpid()))).string();
  fs::create_directories(dir);
  Tensor bad = Tensor::full({4}, 1.0, DType::F64);
  bad.data<double>()[2] = std::numeric_limits<double>::quiet_NaN();
  write_safetensors(dir + "/w.safetensors", {{"fine", Tensor::ones({2}, DType::F32)}, {"layer.weight", bad.to(DType::BF16)}});
  std::vector<std::string> notes;
  try {
    read_weight_file(dir + "/w.safetensors", notes);
    ADD_FAILURE() << "a NaN weight was read";
  } catch (const FileError& e) {
    EXPECT_THAT(e.what(), AllOf(HasSubstr(dir + "/w.safetensors"), HasSubstr("'layer.weight'"), HasSubstr("NaN or Inf")));
  }
  // h5py writes no checksums: the reader's note reaches the caller, naming the file
  const TensorFile f = read_weight_file(kFixtures + "h5py_lora.h5", notes);
  EXPECT_FALSE(f.tensors.empty());
  ASSERT_EQ(notes.size(), 1u);
  EXPECT_THAT(notes[0], AllOf(HasSubstr(kFixtures + "h5py_lora.h5: "), HasSubstr("carry no checksum")));
  fs::remove_all(dir);
}

}  // namespace
}  // namespace loom::io
