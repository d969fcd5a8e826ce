// The device and precision flags of the example programs (SPEC §7), as `loom train` has them:
//
//   --device cpu | cuda | cuda:N | auto    (default auto: cuda:0 when a GPU is usable, else cpu)
//   --precision f32 | tf32 | bf16 | f16    (default: bf16 on CUDA, f32 on the CPU)
//
// parse_example_flags() takes them out of argv (also as --device=D), leaves the positional
// arguments, and writes the run's first stderr line, the one `loom train` writes:
// "loom: device cpu, precision f32". A bad flag, or a device that is not there, is a usage
// error: "error: ..." naming it, then the usage line, and exit code 2.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "tensor/error.h"
#include "trainer/trainer.h"

namespace loom::examples {

struct ExampleFlags {
  trainer::Placement where;
  std::vector<std::string> positional;
};

[[noreturn]] inline void usage_error(const std::string& message, const char* usage) {
  std::fprintf(stderr, "error: %s\nusage: %s\n", message.c_str(), usage);
  std::exit(2);
}

inline ExampleFlags parse_example_flags(int argc, char** argv, const char* usage) {
  std::string device = "auto", precision;
  ExampleFlags flags;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    std::string* value = nullptr;
    std::string name = arg, inline_value;
    const size_t eq = arg.find('=');
    if (arg.rfind("--", 0) == 0 && eq != std::string::npos) name = arg.substr(0, eq), inline_value = arg.substr(eq + 1);
    if (name == "--device") value = &device;
    else if (name == "--precision") value = &precision;
    else if (arg == "--help" || arg == "-h") {
      std::printf("usage: %s\n", usage);
      std::exit(0);
    } else if (arg.rfind("--", 0) == 0) {
      usage_error("unknown flag " + arg, usage);
    } else {
      flags.positional.push_back(arg);
      continue;
    }
    if (eq != std::string::npos) *value = inline_value;
    else if (i + 1 < argc) *value = argv[++i];
    else usage_error(name + " needs a value", usage);
  }
  try {
    flags.where = trainer::placement_of(device, precision);
  } catch (const Error& e) {  // names --device / --precision and the value
    usage_error(e.what(), usage);
  }
  std::fprintf(stderr, "loom: %s\n", flags.where.describe().c_str());
  return flags;
}

// The relative error two runs of one computation may differ by in this precision when their
// rounding differs (e.g. a fused weight against the separate low-rank path).
inline double rounding_tolerance(Precision p) {
  switch (p) {
    case Precision::F32: return 1e-5;
    case Precision::TF32: return 1e-2;
    default: return 3e-2;  // bf16 / f16 storage
  }
}

}  // namespace loom::examples
