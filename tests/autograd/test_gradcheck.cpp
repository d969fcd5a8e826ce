// f64 gradient checks of every differentiable op (ctest -L gradcheck), and the
// manifest check: every op of autograd/GRADIENTS.md has at least one case.
#include <gtest/gtest.h>

#include <fstream>
#include <set>

#include "autograd/gradcheck.h"
#include "autograd/op_cases.h"
#include "tensor/ops.h"

namespace loom::test {
using namespace loom::cases;
namespace {

class OpGradcheck : public ::testing::TestWithParam<size_t> {};

TEST_P(OpGradcheck, MatchesCentralDifferences) {
  const OpCase& c = op_cases()[GetParam()];
  Generator gen(std::hash<std::string>{}(c.name()) ^ ::testing::UnitTest::GetInstance()->random_seed());
  const std::vector<Variable> inputs = make_inputs(c, gen, DType::F64, Device::cpu());
  const GradcheckResult r = gradcheck(c.fn, inputs);
  EXPECT_TRUE(r.ok) << c.name() << ": " << r.message;
  EXPECT_GT(r.entries_checked, 0);
}

INSTANTIATE_TEST_SUITE_P(Ops, OpGradcheck, ::testing::Range(size_t(0), op_cases().size()),
                         [](const ::testing::TestParamInfo<size_t>& info) { return op_cases()[info.param].name(); });

std::set<std::string> manifest_ops() {
  const std::string path = std::string(LOOM_SOURCE_DIR) + "/autograd/GRADIENTS.md";
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot read " << path;
  std::set<std::string> ops;
  for (std::string line; std::getline(in, line);) {  // table rows: | `op` | input | rule |
    if (line.rfind("| `", 0) != 0) continue;
    const size_t end = line.find('`', 3);
    if (end != std::string::npos && end > 3) ops.insert(line.substr(3, end - 3));
  }
  return ops;
}

TEST(GradientManifest, EveryListedOpHasAGradcheckCase) {
  const std::set<std::string> listed = manifest_ops();
  ASSERT_GT(listed.size(), 30u) << "GRADIENTS.md parsed to too few ops";
  std::set<std::string> covered;
  for (const OpCase& c : op_cases()) covered.insert(c.op);
  for (const std::string& op : listed) EXPECT_TRUE(covered.count(op)) << "op '" << op << "' has no gradcheck case";
  for (const std::string& op : covered)
    EXPECT_TRUE(listed.count(op)) << "case op '" << op << "' is missing from GRADIENTS.md";
}

TEST(GradientManifest, BroadcastAndNonContiguousInputsAreCovered) {
  int broadcast = 0, noncontig = 0;
  for (const OpCase& c : op_cases()) {
    broadcast += c.variant == "broadcast";
    for (const InputSpec& s : c.inputs) noncontig += s.noncontiguous;
  }
  EXPECT_GE(broadcast, 5);
  EXPECT_GE(noncontig, 15);
}

// The checker itself must fail on a wrong rule.
TEST(Gradcheck, DetectsAWrongGradientRule) {
  Generator gen(3);
  Variable x(Tensor::randn({3, 2}, gen, DType::F64), true);
  auto wrong_square = [](const std::vector<Variable>& v) {
    const Tensor t = v[0].tensor();
    return record("wrong_square", ops::square(t), {v[0]}, [t](const Tensor& g, const std::vector<bool>&) {
      return std::vector<Tensor>{ops::mul(g, t)};  // should be 2·t·g
    });
  };
  const GradcheckResult r = gradcheck(wrong_square, {x});
  EXPECT_FALSE(r.ok);
  EXPECT_NE(r.message.find("analytic"), std::string::npos) << r.message;
}

TEST(Gradcheck, RejectsNonF64Inputs) {
  Variable x(Tensor::ones({2}, DType::F32), true);
  EXPECT_THROW(gradcheck([](const std::vector<Variable>& v) { return v[0] * 2.0; }, {x}), Error);
}

}  // namespace
}  // namespace loom::test
