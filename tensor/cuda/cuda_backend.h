// The CUDA backend's entry points, seen by the one registration point
// (tensor/backend_registry.cpp). Without CUDA, cuda_stub.cpp provides them.
#pragma once

namespace loom {
class Backend;
// The process-wide CUDA backend, or nullptr when loom was built without CUDA.
Backend* cuda_backend();
// Number of CUDA devices the runtime reports (0 when built without CUDA, when
// no driver is present, or when the runtime reports an error).
int cuda_runtime_device_count();
}  // namespace loom
