// Internal to tensor/cuda/: the flash attention launchers behind Backend::flash_attention_*
// (tensor/backend.h, SPEC §2) and their plain parameter struct. Host checks live in
// cuda_flash_host.cu; kernels in cuda_flash_{fwd,bwd,dq,exact,tf32,tf32_bwd}.cu.
//
// Three kernel families:
//   tensor-core  bf16 / f16 inputs, f32 accumulation (mma.sync m16n8k16), head dims
//                40, 64, 72, 80, 96, 128, 160 (d == dv), any Q and K;
//   tf32         f32 inputs when allow_tf32() (--precision tf32): the same shapes, layouts and
//                head dims on TF32 tensor cores (mma.sync m16n8k8, operands rounded to TF32,
//                f32 accumulation);
//   exact        f32 (allow_tf32() off) / f64 inputs, plain FMA in the input precision, head
//                dims up to 256.
// All: forward saves O and one log-sum-exp per query row; the backward computes
// D = rowsum(dO∘O) first, then recomputes P tile by tile from the log-sum-exp; no buffer
// of size Q×K exists. The tensor-core backward accumulates dQ, dK, dV in f32 buffers
// with atomics (any split of the work adds into them), then converts them once (or, with
// LOOM_FLASH_BWD_DQ=separate, writes dQ from a kernel of its own); the tf32
// backward adds into the (f32) gradients themselves.
#pragma once

#include <cstdint>
#include <string>

#include "tensor/backend.h"

namespace loom::cuda {

// Host side (cuda_flash_host.cu): checks the arguments, allocates the scratch, fills
// FlashParams and launches on the operands' device. Errors name the feature.
void flash_check(const FlashAttentionArgs& a);
void flash_forward(const FlashAttentionArgs& a, const Tensor& out, const Tensor& lse);
void flash_backward(const FlashAttentionArgs& a, const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                    const Tensor& dq, const Tensor& dk, const Tensor& dv);

// Pointers to device memory at element (0,...,0); every tensor contiguous. Two layouts of
// q, k, v, out, grad_out, dq, dk, dv (lse, delta and the f32 accumulators are always [n, len, ·]):
//   plain   [n, len, width]: problem n's row r at (n·len + r)·width;
//   packed  [n / heads, len, heads·width]: the heads side by side in the channels, as the
//           projections write them (diffusers' layout before its head split); problem n =
//           b·heads + h's row r at (b·len + r)·heads·width + h·width. Tensor-core family only.
struct FlashParams {
  DType dtype = DType::BF16;     // of q, k, v, mask, out, grad_out, dq, dk, dv
  const void* q = nullptr;       // [n, q_len, d]
  const void* k = nullptr;       // [n, k_len, d]
  const void* v = nullptr;       // [n, k_len, dv]
  const void* mask = nullptr;    // [mask_batches, mask_rows, k_len] additive, or null
  int64_t n = 0, q_len = 0, k_len = 0, d = 0, dv = 0;
  int64_t heads = 1, mask_batches = 0, mask_rows = 0;
  bool packed = false;           // the packed layout above (tensor-core and tf32 families)
  bool tf32 = false;             // f32 inputs on the tf32 family (allow_tf32() at the call)
  double scale = 1.0;
  bool causal = false;
  // forward outputs / backward inputs
  void* out = nullptr;           // [n, q_len, dv]
  void* lse = nullptr;           // [n, q_len]: f64 for f64 inputs, f32 otherwise (natural log)
  // backward
  const void* grad_out = nullptr;  // [n, q_len, dv]
  void* dq = nullptr;            // [n, q_len, d], or null when not needed
  void* dk = nullptr;            // [n, k_len, d], or null
  void* dv_out = nullptr;        // [n, k_len, dv], or null
  void* delta = nullptr;         // scratch [n, q_len] in the lse dtype
  // f32 accumulators of the tensor-core path (unused by the tf32 and exact families)
  float* dq_accum = nullptr;     // scratch [n, q_len, d] f32 (tensor-core path)
  float* dk_accum = nullptr;     // scratch [n, k_len, d] f32 (tensor-core path)
  float* dv_accum = nullptr;     // scratch [n, k_len, dv] f32 (tensor-core path)
};

// Whether the tensor-core (and tf32) kernels cover head dim d (== dv).
bool flash_tensor_core_head_dim(int64_t d);
// The largest head dim of the exact (f32 / f64) kernels.
constexpr int64_t kFlashExactMaxHeadDim = 256;

void launch_flash_forward(const FlashParams& p);

// The families behind the launchers (each checks its dtypes).
void flash_tc_forward(const FlashParams& p);             // cuda_flash_fwd.cu
void flash_tc_backward(const FlashParams& p);            // cuda_flash_bwd.cu
// Whether flash_tc_backward(p) writes dK and dV itself (the wgmma kernel with one block per key
// range), so that p.dk_accum / p.dv_accum may stay null (cuda_flash_bwd.cu).
bool flash_tc_backward_writes_kv(const FlashParams& p);
void flash_tf32_forward(const FlashParams& p);           // cuda_flash_tf32.cu
void flash_tf32_backward(const FlashParams& p);          // cuda_flash_tf32_bwd.cu
void flash_exact(const FlashParams& p, bool backward);   // cuda_flash_exact.cu
// The Hopper kernels (wgmma, sm_90a) for bf16 / f16 at head dims 40 and 64: used by
// flash_tc_forward / flash_tc_backward when flash_wgmma_available() (built for sm_90a, device of
// compute capability 9.0) where they were measured faster (forward: ≥ 128 keys; backward: always),
// or as LOOM_FLASH_FWD / LOOM_FLASH_BWD (mma | wgmma) say (wgmma where missing is an error). The
// block-synchronous forward (cuda_flash_wgmma.cu): LOOM_FLASH_FWD_TILE picks its block (3x128: 3
// warpgroups of 64 queries, 128-key tiles; 2x128; 2x64; 4x64; 2x128p: P·V of one tile overlapping
// the softmax of the next); the warp-specialised one's ws… blocks below are the default. All
// variables are read at every call.
bool flash_wgmma_available();
bool flash_wgmma_head_dim(int64_t d);
// Whether p runs on wgmma (cuda_flash.cu): `variable` (LOOM_FLASH_FWD / LOOM_FLASH_BWD) = mma or
// wgmma forces either (wgmma where it is missing, or another value, is an error); unset, wgmma
// where it is available, covers p's head dim and measured_faster.
bool flash_wgmma_chosen(const FlashParams& p, const char* variable, bool measured_faster);
void flash_wgmma_forward(const FlashParams& p);
// The warp-specialised forward (cuda_flash_wgmma_ws.cu: a producer warpgroup fills a ring of K / V
// stages by TMA, the consumer warpgroups never wait for each other): LOOM_FLASH_FWD_TILE =
// wsp3x128 (the default: 3 consumer warpgroups, 128-key tiles, 2 stages, one persistent block per
// SM), wsp3x128i (the same, a warpgroup with no query row in an item passing it at once),
// ws3x128 (one block per query tile), ws3x128s3 (3 stages), ws2x128; `sync` asks
// for the block-synchronous kernel with its own choice of block.
// Returns false, launching nothing, where it cannot run (q, k or v not 16-byte aligned, a driver
// without cuTensorMapEncodeTiled): flash_wgmma_forward then takes the block-synchronous kernel.
bool flash_wgmma_ws_forward(const FlashParams& p, const std::string& tile);
// The backward's kernel (cuda_flash_wgmma_bwd.cu): grid (key_blocks of keys_per_block =
// flash_wgmma_backward_keys(d) keys, p.n, splits of query_tiles_per_block 64-query tiles), adding dQ into its f32 accumulator as
// the mma.sync kernel does (run_bwd in cuda_flash_bwd.cu does the rest); dK, dV likewise, or, with
// direct_kv (splits == 1: one block per key), written as p.dk = dK·scale and p.dv_out by the kernel.
// Keys per block: 128 (2 warpgroups) at d = 64, 64 (1 warpgroup, 3 blocks per SM) at d = 40, or
// as LOOM_FLASH_BWD_WGMMA_KEYS = 64 | 128 says (read at every call).
int flash_wgmma_backward_keys(int64_t d);
// flash_wgmma_backward_launch reads LOOM_FLASH_BWD_DQ_BULK (dQ by bulk reductions) and
// LOOM_FLASH_BWD_PIPE (the pipelined loop) at every call: cuda_flash_wgmma_bwd.cu.
void flash_wgmma_backward_launch(const FlashParams& p, int keys_per_block, int64_t key_blocks, int64_t splits,
                                 int query_tiles_per_block, bool direct_kv);
// dQ of the tensor-core backward by a query-stationary kernel of its own, written straight into
// p.dq (cuda_flash_dq.cu), instead of f32 atomics from the key-stationary kernel; chosen by
// LOOM_FLASH_BWD_DQ=separate (default atomic), read at every call.
void flash_tc_dq_separate(const FlashParams& p);
bool flash_dq_separate();
int flash_sm_count();                                    // of the current device
// The forward for few keys (cuda_flash_short.cu): bf16 / f16, 1 ≤ k_len ≤ kShortKeys, no mask,
// not causal (Stable Diffusion's cross-attention on CLIP's 77 tokens). Chosen where it fits unless
// LOOM_FLASH_FWD_SHORT=0; =1 makes a call it does not fit an error (read at every call).
constexpr int64_t kShortKeys = 80;
bool flash_short_forward_chosen(const FlashParams& p);
void flash_short_forward(const FlashParams& p);
// Needs delta (and the f32 accumulators on the tensor-core path: dQ's, and dK's / dV's unless
// flash_tc_backward_writes_kv) allocated by the caller; the tf32 family zeroes dq, dk, dv itself
// and adds into them.
void launch_flash_backward(const FlashParams& p);

}  // namespace loom::cuda
