// Matrix-product throughput on the CPU, f32, n×n · n×n for n = 512, 1024, 2048:
//   Eigen_GEMM   plain Eigen `C.noalias() = A * B` on row-major matrices (the ceiling);
//   Loom_matmul  loom::ops::matmul(a, b) on loom tensors (checks, dispatch, output
//                allocation and the backend's GEMM included).
// Each reports GFLOP/s (2n³ flops per product). After the benchmarks, main prints
// one line comparing the two at n = 2048, computed from this same run's results.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "tensor/ops.h"
#include "tensor/random.h"
#include "tensor/tensor.h"

namespace {

using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

// 2n³ flops per iteration, reported as a rate (flop/s; the console prints e.g. "150G/s").
void report_gflops(benchmark::State& state, int64_t n) {
  state.counters["GFLOPS"] = benchmark::Counter(2.0 * double(n) * double(n) * double(n),
                                                benchmark::Counter::kIsIterationInvariantRate,
                                                benchmark::Counter::kIs1000);
}

// C [n, n] = A [n, n] · B [n, n], row-major, Eigen's own GEMM.
void Eigen_GEMM(benchmark::State& state) {
  const Eigen::Index n = state.range(0);
  const RowMatF A = RowMatF::Random(n, n), B = RowMatF::Random(n, n);
  RowMatF C(n, n);
  for (auto _ : state) {
    C.noalias() = A * B;
    benchmark::DoNotOptimize(C.data());
    benchmark::ClobberMemory();
  }
  report_gflops(state, n);
}

// c [n, n] = matmul(a [n, n], b [n, n]) through loom's op layer and CPU backend.
void Loom_matmul(benchmark::State& state) {
  const int64_t n = state.range(0);
  loom::Generator gen(0);
  const loom::Tensor a = loom::Tensor::randn({n, n}, gen);
  const loom::Tensor b = loom::Tensor::randn({n, n}, gen);
  for (auto _ : state) {
    loom::Tensor c = loom::ops::matmul(a, b);
    benchmark::DoNotOptimize(c.raw_data());
    benchmark::ClobberMemory();
  }
  report_gflops(state, n);
}

BENCHMARK(Eigen_GEMM)->Arg(512)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(Loom_matmul)->Arg(512)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();

// The console output as usual, plus the GFLOP/s of every run, keyed
// "function/arg" (e.g. "Eigen_GEMM/2048"). Counters reach ReportRuns already
// finished, i.e. as flop/s. Single runs are kept; of the aggregates only the
// median, which is all there is under --benchmark_report_aggregates_only.
class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  using benchmark::ConsoleReporter::ConsoleReporter;

  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      const bool single = r.run_type == Run::RT_Iteration;
      if (!single && r.aggregate_name != "median") continue;
      const auto it = r.counters.find("GFLOPS");
      if (it == r.counters.end()) continue;
      const std::string key = r.run_name.function_name + "/" + r.run_name.args;
      (single ? singles_ : medians_)[key].push_back(it->second.value / 1e9);
    }
    benchmark::ConsoleReporter::ReportRuns(runs);
  }

  // Median over the single runs (the reported median when only aggregates
  // were reported); NaN when the benchmark did not run (e.g. filtered out).
  double gflops(const std::string& key) const {
    for (const auto* table : {&singles_, &medians_}) {
      const auto it = table->find(key);
      if (it == table->end() || it->second.empty()) continue;
      std::vector<double> v = it->second;
      std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
      return v[v.size() / 2];
    }
    return std::numeric_limits<double>::quiet_NaN();
  }

 private:
  std::map<std::string, std::vector<double>> singles_, medians_;
};

benchmark::ConsoleReporter::OutputOptions console_options() {
  int opts = benchmark::ConsoleReporter::OO_Tabular;
  if (isatty(fileno(stdout))) opts |= benchmark::ConsoleReporter::OO_Color;
  return benchmark::ConsoleReporter::OutputOptions(opts);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  SummaryReporter reporter(console_options());
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();

  const double loom = reporter.gflops("Loom_matmul/2048");
  const double eigen = reporter.gflops("Eigen_GEMM/2048");
  if (std::isnan(loom) || std::isnan(eigen)) {
    std::printf("loom matmul 2048: not compared (Loom_matmul/2048 and Eigen_GEMM/2048 must both run)\n");
    return 0;
  }
  std::printf("loom matmul 2048: %.1f GFLOP/s = %.1f%% of Eigen GEMM (%.1f GFLOP/s) in this run\n", loom,
              100.0 * loom / eigen, eigen);
  return 0;
}
