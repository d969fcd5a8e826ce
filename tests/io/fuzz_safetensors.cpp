// libFuzzer target for the safetensors parser (built only with Clang: see tests/CMakeLists.txt).
//
//   cmake -S . -B build-fuzz -G Ninja -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DLOOM_CUDA=OFF
//   cmake --build build-fuzz --target fuzz_safetensors
//   build-fuzz/tests/fuzz_safetensors -max_total_time=300 new_corpus/ tests/io/corpus/
//
// Any input must either parse or raise loom::Error (FileError); anything else (a crash, a leak,
// undefined behaviour, another exception type) is a finding.
#include <cstddef>
#include <cstdint>

#include "io/tensor_file.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const loom::io::TensorFile f = loom::io::parse_safetensors(data, size, "fuzz.safetensors");
    // Touch what was parsed so that the copies are checked too.
    size_t total = 0;
    for (const auto& [name, t] : f.tensors) total += name.size() + size_t(t.numel()) * loom::itemsize(t.dtype());
    for (const auto& [k, v] : f.metadata) total += k.size() + v.size();
    if (total > size * 2 + 64) __builtin_trap();  // parsed data can never exceed the input
  } catch (const loom::Error&) {
  }
  return 0;
}
