// The add of a channels-last operand to a channels-first one, through shared-memory tiles.
//
// A spatial transformer's exit adds proj_out's output, stored [B, S, C] (S = H·W) and viewed as
// [B, C, H, W] by a permute, to the block's NCHW input. Merged, that is a binary problem over
// [B, C, S] where one operand has strides (bs, 1, C) and the other and the output are contiguous.
// The generic strided kernel reads the transposed operand 2 bytes at a time with a stride of C
// elements between neighbouring threads; here a 32 × 32 tile of it is read along C (coalesced),
// turned in shared memory, and added along S, where the other operand and the output are
// coalesced. Add only: a + b is the same float in either order, so the result is bit for bit the
// strided kernel's.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "tensor/cuda/cuda_common.h"
#include "tensor/cuda/cuda_device.cuh"

namespace loom::cuda {
namespace {

constexpr int kTile = 32;
constexpr int kRowsPerPass = 8;  // block (32, 8): each thread moves 4 elements each way

// out[b, c, s] = t[b·t_batch + s·C + c] + p[(b·C + c)·S + s]; out and p contiguous [B, C, S].
// Grid (ceil(S/32), ceil(C/32), B), block (32, 8).
template <typename T>
__global__ void add_transposed_kernel(T* __restrict__ out, const T* __restrict__ t, const T* __restrict__ p,
                                      int64_t C, int64_t S, int64_t t_batch) {
  __shared__ T tile[kTile][kTile + 1];  // [s - s0][c - c0]
  const int64_t b = blockIdx.z, c0 = int64_t(blockIdx.y) * kTile, s0 = int64_t(blockIdx.x) * kTile;
  const T* tb = t + b * t_batch;
  for (int j = threadIdx.y; j < kTile; j += kRowsPerPass) {
    const int64_t c = c0 + threadIdx.x, s = s0 + j;
    if (c < C && s < S) tile[j][threadIdx.x] = tb[s * C + c];
  }
  __syncthreads();
  for (int j = threadIdx.y; j < kTile; j += kRowsPerPass) {
    const int64_t c = c0 + j, s = s0 + threadIdx.x;
    if (c < C && s < S) {
      const int64_t i = (b * C + c) * S + s;
      out[i] = narrow<T>(widen(tile[threadIdx.x][j]) + widen(p[i]));
    }
  }
}

// The problem's [B, C, S] view, or false: after merging, [C, S] or [B, C, S] with one operand
// of strides (·, 1, C) and the other (C·S, S, 1), C and S ≥ 2.
struct TransposedAdd {
  int64_t batch = 1, channels = 0, spatial = 0, t_batch = 0;
  const void* transposed = nullptr;
  const void* plain = nullptr;
};

bool transposed_add_of(const BinaryParams& p, TransposedAdd& v) {
  if (p.op != BinaryOp::Add || (p.ndim != 2 && p.ndim != 3)) return false;
  const int o = p.ndim - 2;  // offset of the C dim
  v.batch = o ? p.shape[0] : 1;
  v.channels = p.shape[o];
  v.spatial = p.shape[o + 1];
  if (v.channels < 2 || v.spatial < 2 || v.batch > 65535 || (v.channels + kTile - 1) / kTile > 65535) return false;
  auto is_plain = [&](const int64_t* s) {
    return s[o] == v.spatial && s[o + 1] == 1 && (!o || s[0] == v.channels * v.spatial);
  };
  auto is_transposed = [&](const int64_t* s) { return s[o] == 1 && s[o + 1] == v.channels; };
  if (is_transposed(p.a_strides) && is_plain(p.b_strides)) {
    v.transposed = p.a;
    v.plain = p.b;
    v.t_batch = o ? p.a_strides[0] : 0;
  } else if (is_transposed(p.b_strides) && is_plain(p.a_strides)) {
    v.transposed = p.b;
    v.plain = p.a;
    v.t_batch = o ? p.b_strides[0] : 0;
  } else {
    return false;
  }
  return true;
}

}  // namespace

bool launch_add_transposed(const BinaryParams& p) {
  TransposedAdd v;
  if (p.numel == 0 || !transposed_add_of(p, v)) return false;
  dispatch_float(p.dtype, "cuda add (transposed)", [&](auto tag) {
    using T = decltype(tag);
    const dim3 grid(unsigned((v.spatial + kTile - 1) / kTile), unsigned((v.channels + kTile - 1) / kTile),
                    unsigned(v.batch));
    add_transposed_kernel<T><<<grid, dim3(kTile, kRowsPerPass), 0, compute_stream()>>>(
        static_cast<T*>(p.out), static_cast<const T*>(v.transposed), static_cast<const T*>(v.plain), v.channels,
        v.spatial, v.t_batch);
  });
  check_last_launch("binary_kernel add (transposed)");
  return true;
}

}  // namespace loom::cuda
