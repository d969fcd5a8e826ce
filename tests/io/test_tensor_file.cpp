// io/tensor_file.h: detect_format / read_tensor_file by content, FileError messages, the atomic writer.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <ctime>
#include <string>
#include <vector>

#include "io/tensor_file.h"
#include "tests/test_helpers.h"

namespace loom::io {
namespace {

using loom::testing::le64;
using loom::testing::read_bytes;
using loom::testing::TempDir;
using loom::testing::write_bytes;

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

}  // namespace
}  // namespace loom::io
