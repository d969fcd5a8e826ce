// The CUDA backend's entry points, seen by the one registration point
// (tensor/backend_registry.cpp). Without CUDA, cuda_stub.cpp provides them.
#pragma once

namespace loom {
class Backend;
struct GemmBatch;
// The process-wide CUDA backend, or nullptr when loom was built without CUDA.
Backend* cuda_backend();
// Number of CUDA devices the runtime reports (0 when built without CUDA, when
// no driver is present, or when the runtime reports an error).
int cuda_runtime_device_count();
// A pair of CUDA events on `device` (tensor/device_timer.h uses them): record(which = 0 start,
// 1 stop) on the device's stream; elapsed_ms synchronizes on the stop event.
void* cuda_timer_create(int device);
void cuda_timer_record(void* timer, int which);
double cuda_timer_elapsed_ms(void* timer);
void cuda_timer_destroy(void* timer);
// LOOM_CUDA_PROFILE=1 (cuda_profile.cu): print the per-kernel table of the launches since the last
// print or start under `title` to stderr and start a new one (no-op when profiling is off).
void cuda_profile_print_section(const char* title);
// Whether the CUDA gemm runs `g` with its thin kernels (tensor/cuda/cuda_gemm_thin.cu) instead of
// cuBLAS: f32 / bf16 / f16, one problem (batch 1), and either
//   A not transposed, B not too big: 1 ≤ n ≤ 16, m ≥ 64, k ≥ 32, op(B) staged in shared memory
//     (n rounded up to 4/8/16, times k, ≤ 96 KiB): LoRA's down Z = X·Aᵀ and its dZ = dY·B; or
//   A transposed, B not: 1 ≤ min(m, n) ≤ 16, k ≥ 256 (a sum over k rows): dA = dZᵀ·X, dB = dYᵀ·Z.
// Off by default (cuBLAS measured faster on the UNet step); LOOM_THIN_GEMM=1 in the environment
// or set_cuda_thin_gemm(true) turns them on. False without CUDA.
bool cuda_thin_gemm_fits(const GemmBatch& g);
void set_cuda_thin_gemm(bool on);
// Runs g on loom's own Hopper GEMM and returns true where LOOM_GEMM_WGMMA asks for it and g fits
// (tensor/cuda/cuda_gemm_wgmma.h: gemm_wgmma); false, nothing launched, otherwise and without
// CUDA. The backend's gemm asks it first; tests call it to know the kernel ran.
bool cuda_gemm_wgmma(const GemmBatch& g);
}  // namespace loom
