// The narrow interface every device backend implements (cpu/ through Eigen and
// OpenMP, cuda/ through kernels and cuBLAS). tensor/ops.cpp (and, for the fused
// slots, tensor/ops_fused.cpp) is the only caller: it checks shapes, dtypes and
// devices, makes operands contiguous where a method's contract asks for it, and
// then calls exactly one backend method.
//
// A backend that cannot run an op for a dtype reports it through supports();
// the caller then throws an error naming op, device and dtype. No backend
// falls back to another device.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tensor/fused_args.h"
#include "tensor/tensor.h"

namespace loom {

enum class OpKind {
  Copy, Fill, Unary, Binary, Reduce, Gemm, Softmax,
  FlashAttention,                                               // attention (flash family)
  LayerNorm, GroupNorm, Geglu, OptimizerUpdate, BiasResidual,  // fused family (tensor/ops_fused.h)
  Random,                                                       // counter-based RNG (tensor/random.h)
  UnscaleCheckFinite,                                           // loss scaling (tensor/ops_fused.h)
  Conv2d,                                                       // direct convolution (tensor/conv.h)
  Conv2dLibrary,                                                // the device's convolution library (CUDA: cuDNN)
  GemmBias,                                                     // gemm with GemmBatch::bias (in its epilogue)
  Im2colNormed,                                                 // im2col of group-normed (+ SiLU) values
  LinearGeglu,                                                  // a Linear and GEGLU as one product
};
const char* op_kind_name(OpKind k);

// out = f(in, scalar). Grad forms take the forward input x and return f'(x).
enum class UnaryOp {
  Neg, Exp, Log, Sqrt, Rsqrt, Tanh, Sigmoid, Relu,
  Step,          // 1 where x > 0 else 0 (relu's derivative)
  GeluErf,       // x·Φ(x)
  GeluTanh,      // 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))
  GeluErfGrad,   // d/dx GeluErf
  GeluTanhGrad,  // d/dx GeluTanh
  Silu,          // x·σ(x)
  SiluGrad,      // d/dx Silu = σ(x)·(1 + x·(1 − σ(x)))
  Abs, Square, Reciprocal,
  AddScalar,     // x + s
  MulScalar,     // x · s
  PowScalar,     // x ^ s
};
enum class BinaryOp { Add, Sub, Mul, Div, Max, Min };
enum class ReduceOp { Sum, Max };

// Row-major batched GEMM:  C[i] = alpha · op(A[i]) · op(B[i]) + beta · C[i],  i < batch.
// op(A) is m×k: stored m×k (lda ≥ k) or, with trans_a, k×m (lda ≥ m). Likewise op(B) k×n.
// C is m×n with ldc ≥ n. A batch stride of 0 shares one matrix across the batch.
// A, B, C have the same dtype; f32 accumulates in f32 (no TF32), bf16/f16 accumulate in f32.
// bias: null, or n contiguous values in C's dtype added to every row of every C[i] after the
// product (a Linear's bias): C[i][r, j] = alpha·(op(A)·op(B))[r, j] + beta·C[i][r, j] + bias[j],
// rounded once. Only given where the backend supports(OpKind::GemmBias, dtype).
struct GemmBatch {
  Device device;
  DType dtype = DType::F32;
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0, batch = 1;
  const void* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  const void* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  void* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
  double alpha = 1.0, beta = 0.0;
  const void* bias = nullptr;
};

// Flash attention (SPEC §2), the arguments shared by forward and backward.
//   q [N, Q, d], k [N, K, d], v [N, K, dv]: contiguous, one dtype and device.
//   mask: undefined, or a contiguous additive bias [Bm, Qm, K] in q's dtype with Bm ∈ {1, N/heads},
//         Qm ∈ {1, Q}; problem row n reads mask batch n / heads (0 when Bm == 1).
//   causal: key j > query i is masked (top-left aligned); never together with a mask.
// Row statistics (the log-sum-exp `lse` [N, Q] of the scaled, masked scores) are f64 for f64
// inputs and f32 otherwise. Nothing of size Q×K is allocated by either pass.
// packed_heads: q [B, Q, heads·d], k [B, K, heads·d], v [B, K, heads·dv] (and out, grad_out and
// the gradients likewise) hold the heads side by side in the channels, as the projections write
// them; problem n = b·heads + h reads columns h·d … of batch b. Only where a backend's check
// accepts it (CUDA's tensor-core kernels); it saves the head split's and merge's copies.
struct FlashAttentionArgs {
  Tensor q, k, v, mask;
  int64_t heads = 1;
  bool packed_heads = false;
  double scale = 1.0;
  bool causal = false;
};

// The dtype of the row statistics of flash attention over inputs of `dtype`.
inline DType flash_stats_dtype(DType dtype) { return dtype == DType::F64 ? DType::F64 : DType::F32; }

// Geometry of im2col / col2im (see Backend::im2col). out_h, out_w follow from the others:
// out = (in + 2·pad − dilation·(k − 1) − 1) / stride + 1 (tensor/conv.h computes them).
struct Im2ColArgs {
  int64_t batch = 0, channels = 0, height = 0, width = 0;
  int64_t kernel_h = 1, kernel_w = 1;
  int64_t stride_h = 1, stride_w = 1;
  int64_t pad_h = 0, pad_w = 0;
  int64_t dilation_h = 1, dilation_w = 1;
  int64_t out_h = 0, out_w = 0;
};
// A group norm (+ SiLU) applied to the image as im2col reads it (Backend::im2col_normed), the
// values of ops::group_norm(image, groups, weight, bias, eps, silu, shift) with the statistics
// given: u = image[n, c, ·] (+ shift[n, c]), g = c / (C / groups),
//   v = (u − mean[n, g])·(rstd[n, g]·weight[c]) + bias[c],  silu(v) with `silu`,
// in f32 (f64 for f64), rounded once to the image's dtype; positions outside the image stay 0
// (the convolution pads the normed tensor). mean, rstd [N, groups] in the statistics dtype
// (ops::group_norm's); weight, bias [C] (or undefined: 1, 0) and shift [N, C] (or undefined) in the
// image's dtype; all contiguous.
struct Im2ColNorm {
  Tensor mean, rstd, weight, bias, shift;
  int64_t groups = 1;
  bool silu = false;
};
// Direct 2-D convolution (a device's own kernel, e.g. CUDA's implicit GEMM), groups = 1,
// dilation = 1 (geo.dilation_* must be 1):
//   y[n,o,oy,ox] = Σ_{c,i,j} w[o,c,i,j]·x[n, c, oy·stride_h + i − pad_h, ox·stride_w + j − pad_w] + bias[o]
// (x is 0 outside the image), kh, kw ≤ kConv2dMaxKernel. x [N, C, H, W], w [O, C, kh, kw], bias [O]
// or undefined, y [N, O, oh, ow] (output): contiguous, one dtype and device; geo is
// conv2d_geometry(x, kh, kw, ...) (tensor/conv.h). Products accumulate in f32; the bias is added
// before the one rounding to y's dtype.
constexpr int64_t kConv2dMaxKernel = 32;
struct Conv2dArgs {
  Tensor x, w, bias;
  Tensor y;  // output
  Im2ColArgs geo;
};
// The gradient of Conv2dArgs in x for stride 1 and pad_h ≤ kh − 1, pad_w ≤ kw − 1, as a convolution:
//   dx = conv(dy, w') with w'[c,o,i,j] = w[o,c,kh−1−i,kw−1−j] and padding (kh−1−pad_h, kw−1−pad_w).
// dy [N, O, oh, ow], w [O, C, kh, kw], dx [N, C, H, W] (output, overwritten); geo as for the forward.
struct Conv2dInputGradArgs {
  Tensor dy, w;
  Tensor dx;  // output
  Im2ColArgs geo;
};

// The gradient of Conv2dArgs in w: dw[o,c,i,j] = Σ_{n,oy,ox} dy[n,o,oy,ox]·x[n, c, oy·stride_h + i − pad_h,
// ox·stride_w + j − pad_w]. dy [N, O, oh, ow], x [N, C, H, W], dw [O, C, kh, kw] (output,
// overwritten); geo as for the forward. (The library slots below; the im2col path computes it as
// im2col + GEMM.)
struct Conv2dWeightGradArgs {
  Tensor dy, x;
  Tensor dw;  // output
  Im2ColArgs geo;
};

// Thrown by the default of a fused slot: "<op>: backend '<name>' has no kernel for this fused op".
[[noreturn]] inline void missing_fused_kernel(const char* op, const char* backend) {
  LOOM_FAIL(op, ": backend '", backend, "' has no kernel for this fused op");
}

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual bool supports(OpKind op, DType dtype) const = 0;

  // ---- memory ------------------------------------------------------------
  virtual void* allocate(size_t nbytes, int device_index) = 0;
  virtual void deallocate(void* ptr, size_t nbytes, int device_index) = 0;
  virtual void copy_from_host(void* dst, const void* src, size_t nbytes, int device_index) = 0;
  virtual void copy_to_host(void* dst, const void* src, size_t nbytes, int device_index) = 0;
  virtual void synchronize(int device_index) = 0;

  // ---- kernels (all tensors on this backend's device) ------------------------
  // dst[idx] = cast(src[idx]) for every index of dst.shape(); src.shape() == dst.shape();
  // both may have any strides (0 included for src); dtypes may differ.
  virtual void copy(const Tensor& dst, const Tensor& src) = 0;
  // Every element of the contiguous dst set to value.
  virtual void fill(const Tensor& dst, double value) = 0;
  // out, in: contiguous, same shape and dtype.
  virtual void unary(UnaryOp op, const Tensor& out, const Tensor& in, double scalar) = 0;
  // out contiguous; a, b have out's shape and dtype with any strides (stride 0 = broadcast).
  virtual void binary(BinaryOp op, const Tensor& out, const Tensor& a, const Tensor& b) = 0;
  // in contiguous, viewed as [outer, n, inner]; out contiguous [outer, inner]; same dtype.
  virtual void reduce(ReduceOp op, const Tensor& out, const Tensor& in, int64_t outer, int64_t n,
                      int64_t inner) = 0;
  virtual void gemm(const GemmBatch& g) = 0;
  // Along the last dim of contiguous [rows, n]: out = softmax(in) or log_softmax(in);
  // statistics (max, sum of exps) are accumulated in at least f32.
  virtual void softmax(const Tensor& out, const Tensor& in, int64_t rows, int64_t n, bool log) = 0;
  // Softmax's backward along the last dim of contiguous [rows, n], y = softmax(x) given:
  // dx = y∘(dy − Σ_j dy∘y), the row sums accumulated in at least f32. dx may alias dy.
  virtual void softmax_backward(const Tensor& dx, const Tensor& y, const Tensor& dy, int64_t rows, int64_t n);

  // ---- fused ops: attention (flash family) --------------------------------------------------
  // Throws "attention backend 'flash' does not support <feature> on <device>" when this device's
  // kernel cannot run `a` (a dtype, a head dim, a size); returns normally otherwise.
  virtual void flash_attention_check(const FlashAttentionArgs& a) const;
  // out [N, Q, dv] (q's dtype) and lse [N, Q] (flash_stats_dtype), both contiguous.
  virtual void flash_attention_forward(const FlashAttentionArgs& a, const Tensor& out, const Tensor& lse);
  // Recomputes P tile by tile from lse: D = rowsum(dO∘O), dV = Pᵀ·dO, dS = P∘(dO·Vᵀ − D),
  // dQ = scale·dS·K, dK = scale·dSᵀ·Q. grad_out [N, Q, dv] contiguous; dq / dk / dv are
  // contiguous outputs shaped like q / k / v, or undefined when not needed.
  virtual void flash_attention_backward(const FlashAttentionArgs& a, const Tensor& out, const Tensor& lse,
                                        const Tensor& grad_out, const Tensor& dq, const Tensor& dk,
                                        const Tensor& dv);

  // ---- convolution: im2col / col2im (cpu/cpu_conv.cpp, cuda/cuda_conv.cu) ------------------
  // image [N, C, H, W] and cols [N, C·kh·kw, oh·ow], both contiguous, same dtype (f32/f64 on the
  // CPU; f32/f64/bf16/f16 on CUDA). Row (c·kh + i)·kw + j of cols holds, at column oy·ow + ox,
  // image[c, oy·stride_h − pad_h + i·dilation_h, ox·stride_w − pad_w + j·dilation_w], 0 outside.
  // im2col fills cols; col2im is its adjoint: image = Σ of cols scattered back (overwrites image).
  virtual void im2col(const Tensor& cols, const Tensor& image, const Im2ColArgs& args) = 0;
  virtual void col2im(const Tensor& image, const Tensor& cols, const Im2ColArgs& args) = 0;
  // im2col of the normed image (Im2ColNorm), where supports(OpKind::Im2colNormed, dtype): one pass
  // instead of a norm pass writing the normed image and im2col reading it (tensor/conv.h,
  // conv2d_normed). CUDA: cuda/cuda_conv.cu.
  virtual void im2col_normed(const Tensor& cols, const Tensor& image, const Im2ColArgs& args, const Im2ColNorm& norm) {
    (void)cols, (void)image, (void)args, (void)norm;
    missing_fused_kernel("im2col_normed", name());
  }
  // ---- fused ops: direct convolution (contracts: Conv2dArgs, Conv2dInputGradArgs above) ----
  // Where supports(OpKind::Conv2d, dtype) holds, tensor/conv.cpp calls these instead of
  // im2col + GEMM (+ bias add) and GEMM + col2im (CUDA bf16/f16: cuda/cuda_conv_igemm.cu).
  virtual void conv2d(const Conv2dArgs&) { missing_fused_kernel("conv2d", name()); }
  virtual void conv2d_input_grad(const Conv2dInputGradArgs&) { missing_fused_kernel("conv2d_input_grad", name()); }
  // ---- convolution by the device's library (CUDA: cuDNN), where supports(OpKind::Conv2dLibrary) ----
  // Same contracts as the direct slots above, with any stride and padding for the input gradient
  // (dilation 1, groups 1), plus the weight gradient. The bias is added after the convolution's
  // rounding to y's dtype (two roundings, as im2col + GEMM + add).
  virtual void library_conv2d(const Conv2dArgs&) { missing_fused_kernel("library_conv2d", name()); }
  virtual void library_conv2d_input_grad(const Conv2dInputGradArgs&) {
    missing_fused_kernel("library_conv2d_input_grad", name());
  }
  virtual void library_conv2d_weight_grad(const Conv2dWeightGradArgs&) {
    missing_fused_kernel("library_conv2d_weight_grad", name());
  }
  // ---- fused ops: norms, GEGLU, optimizer update (fused family) ----
  // Contracts: the parameter structs of tensor/fused_args.h. The defaults throw
  // naming op and backend, so a backend without a kernel says so (its supports()
  // is false for the kind, and tensor/ops_fused.cpp checks that first).
  virtual void layer_norm(const LayerNormArgs&) { missing_fused_kernel("layer_norm", name()); }
  virtual void layer_norm_backward(const LayerNormGradArgs&) { missing_fused_kernel("layer_norm_backward", name()); }
  virtual void group_norm(const GroupNormArgs&) { missing_fused_kernel("group_norm", name()); }
  virtual void group_norm_backward(const GroupNormGradArgs&) { missing_fused_kernel("group_norm_backward", name()); }
  virtual void geglu(const GegluArgs&) { missing_fused_kernel("geglu", name()); }
  // A Linear and GEGLU as one product (LinearGegluArgs; tensor/ops_fused.h, linear_geglu), asked
  // only where supports(OpKind::LinearGeglu, dtype): true when done; false, touching nothing,
  // where the kernel does not take these operands (a shape, an alignment: the caller then runs
  // linear and geglu). CUDA: cuda/cuda_gemm_wgmma.cu (Hopper, bf16 / f16).
  virtual bool linear_geglu(const LinearGegluArgs&) { return false; }
  virtual void geglu_backward(const GegluGradArgs&) { missing_fused_kernel("geglu_backward", name()); }
  virtual void optimizer_update(const OptimizerUpdateArgs&) { missing_fused_kernel("optimizer_update", name()); }
  virtual void bias_residual(const BiasResidualArgs&) { missing_fused_kernel("bias_residual", name()); }
  // ---- counter-based random numbers and loss scaling (contracts in tensor/fused_args.h) ----
  virtual void random(const RandomArgs&) { missing_fused_kernel("random", name()); }
  virtual void unscale_check_finite(const UnscaleArgs&) { missing_fused_kernel("unscale_check_finite", name()); }
};

// The backend for a device; throws if loom was built without that device type.
Backend& backend_for(Device device);
// backend_for(device), after checking supports(kind, dtype); the error names op, device, dtype.
Backend& backend_for(const char* op, OpKind kind, Device device, DType dtype);

// Number of CUDA devices usable by this build (0 when built without CUDA or none present).
int cuda_device_count();
inline bool cuda_available() { return cuda_device_count() > 0; }
// Whether this build has the CUDA backend (nvcc was found at build time).
bool cuda_backend_built();

}  // namespace loom
