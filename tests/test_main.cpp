// main() of every GoogleTest executable here (instead of gtest_main).
//
// CTest runs one process per suite (tests/cmake/register_suites.cmake). A process whose tests all
// skipped — the GPU suites on a machine without a CUDA device — exits with kExitAllSkipped, which the
// suite's SKIP_RETURN_CODE turns into "Not Run (skipped)" in ctest's report; a failure anywhere still
// exits non-zero as usual (1), and a process that ran no test at all exits 0.
#include <gtest/gtest.h>

namespace {
constexpr int kExitAllSkipped = 77;
}

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  const int rc = RUN_ALL_TESTS();
  const ::testing::UnitTest& unit = *::testing::UnitTest::GetInstance();
  if (rc == 0 && unit.successful_test_count() == 0 && unit.skipped_test_count() > 0) return kExitAllSkipped;
  return rc;
}
