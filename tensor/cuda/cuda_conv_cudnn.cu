// Convolution through cuDNN's convolution API (cuda_conv_cudnn.h has the contract). Host code
// only: cuDNN launches its own kernels on loom's compute stream.
#include "tensor/cuda/cuda_conv_cudnn.h"

#include "tensor/cuda/cuda_common.h"
#include "tensor/determinism.h"

#if defined(LOOM_HAVE_CUDNN)

#include <cudnn.h>

#include <map>
#include <mutex>
#include <tuple>
#include <vector>

namespace loom::cuda {

namespace {

#define LOOM_CUDNN_CHECK(expr)                                                                         \
  do {                                                                                                 \
    const cudnnStatus_t loom_cudnn_status_ = (expr);                                                   \
    LOOM_CHECK(loom_cudnn_status_ == CUDNN_STATUS_SUCCESS, "cuDNN: ", #expr, " failed: ",              \
               cudnnGetErrorString(loom_cudnn_status_));                                               \
  } while (0)

constexpr int kMaxDevices = 64;

// One handle per device, made on first use; a device where cudnnCreate fails keeps the reason.
struct HandleSlot {
  bool tried = false;
  cudnnHandle_t handle = nullptr;
  std::string error;
};
std::mutex g_handles_mutex;
HandleSlot g_handles[kMaxDevices];

HandleSlot& handle_slot(int device) {
  LOOM_CHECK(device >= 0 && device < kMaxDevices, "cuDNN: device index ", device, " out of range");
  std::lock_guard<std::mutex> lock(g_handles_mutex);
  HandleSlot& s = g_handles[device];
  if (!s.tried) {
    s.tried = true;
    DeviceGuard guard(device);
    const cudnnStatus_t st = cudnnCreate(&s.handle);
    if (st != CUDNN_STATUS_SUCCESS) {
      s.handle = nullptr;
      s.error = std::string("cudnnCreate failed: ") + cudnnGetErrorString(st) + " (cuDNN " +
                std::to_string(cudnnGetVersion()) + ", built against " + std::to_string(CUDNN_VERSION) + ")";
    }
  }
  return s;
}

// The current device, or −1 where CUDA has none.
int current_device() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return -1;
  }
  return device;
}

// The handle of `device`, bound to its compute stream (the caller has made `device` current).
cudnnHandle_t handle_for(int device) {
  HandleSlot& s = handle_slot(device);
  LOOM_CHECK(s.handle, "cuDNN is not available on cuda:", device, ": ", s.error);
  LOOM_CUDNN_CHECK(cudnnSetStream(s.handle, compute_stream()));
  return s.handle;
}

cudnnDataType_t cudnn_dtype(const char* op, DType dt) {
  if (dt == DType::BF16) return CUDNN_DATA_BFLOAT16;
  if (dt == DType::F16) return CUDNN_DATA_HALF;
  LOOM_FAIL(op, ": dtype ", dt, " is not supported (bf16, f16)");
}

// The descriptors of one convolution: x [N, C, H, W], w [O, C, kh, kw], y [N, O, oh, ow].
struct ConvDescriptors {
  cudnnTensorDescriptor_t x = nullptr, y = nullptr;
  cudnnFilterDescriptor_t w = nullptr;
  cudnnConvolutionDescriptor_t conv = nullptr;

  ConvDescriptors(const Im2ColArgs& g, int64_t out_channels, cudnnDataType_t dt) {
    LOOM_CUDNN_CHECK(cudnnCreateTensorDescriptor(&x));
    LOOM_CUDNN_CHECK(cudnnCreateTensorDescriptor(&y));
    LOOM_CUDNN_CHECK(cudnnCreateFilterDescriptor(&w));
    LOOM_CUDNN_CHECK(cudnnCreateConvolutionDescriptor(&conv));
    LOOM_CUDNN_CHECK(cudnnSetTensor4dDescriptor(x, CUDNN_TENSOR_NCHW, dt, int(g.batch), int(g.channels),
                                                int(g.height), int(g.width)));
    LOOM_CUDNN_CHECK(cudnnSetTensor4dDescriptor(y, CUDNN_TENSOR_NCHW, dt, int(g.batch), int(out_channels),
                                                int(g.out_h), int(g.out_w)));
    LOOM_CUDNN_CHECK(cudnnSetFilter4dDescriptor(w, dt, CUDNN_TENSOR_NCHW, int(out_channels), int(g.channels),
                                                int(g.kernel_h), int(g.kernel_w)));
    LOOM_CUDNN_CHECK(cudnnSetConvolution2dDescriptor(conv, int(g.pad_h), int(g.pad_w), int(g.stride_h),
                                                     int(g.stride_w), 1, 1, CUDNN_CROSS_CORRELATION,
                                                     CUDNN_DATA_FLOAT));  // f32 accumulation
    LOOM_CUDNN_CHECK(cudnnSetConvolutionMathType(conv, CUDNN_TENSOR_OP_MATH));
  }
  ~ConvDescriptors() {
    if (conv) cudnnDestroyConvolutionDescriptor(conv);
    if (w) cudnnDestroyFilterDescriptor(w);
    if (y) cudnnDestroyTensorDescriptor(y);
    if (x) cudnnDestroyTensorDescriptor(x);
  }
  ConvDescriptors(const ConvDescriptors&) = delete;
  ConvDescriptors& operator=(const ConvDescriptors&) = delete;
};

// The checks every entry point makes: CUDA tensors of one device and dtype (bf16 / f16),
// contiguous, shapes of the geometry, dilation 1, sizes cuDNN's int descriptors hold.
int check_operands(const char* op, const Im2ColArgs& g, int64_t out_channels, const Tensor& x, const Tensor& w,
                   const Tensor& y, const Tensor& bias) {
  LOOM_CHECK(x.defined() && x.device().is_cuda(), op, ": input is not a CUDA tensor");
  for (const Tensor* t : {&x, &w, &y, &bias}) {
    if (!t->defined()) continue;
    LOOM_CHECK(t->device() == x.device() && t->dtype() == x.dtype(), op, ": tensor ", t->str(),
               " differs from ", x.str(), " in device or dtype");
    LOOM_CHECK(t->is_contiguous(), op, ": tensor ", t->str(), " is not contiguous");
  }
  (void)cudnn_dtype(op, x.dtype());
  LOOM_CHECK(g.dilation_h == 1 && g.dilation_w == 1, op, ": dilation ", g.dilation_h, ",", g.dilation_w,
             " is not supported (1 only)");
  LOOM_CHECK(x.shape() == Shape({g.batch, g.channels, g.height, g.width}) &&
                 w.shape() == Shape({out_channels, g.channels, g.kernel_h, g.kernel_w}) &&
                 y.shape() == Shape({g.batch, out_channels, g.out_h, g.out_w}) &&
                 (!bias.defined() || bias.shape() == Shape({out_channels})),
             op, ": shapes do not match the geometry (x ", x.shape(), ", w ", w.shape(), ", y ", y.shape(), ")");
  constexpr int64_t kIntMax = (int64_t(1) << 31) - 1;
  LOOM_CHECK(x.numel() <= kIntMax && y.numel() <= kIntMax && w.numel() <= kIntMax, op,
             ": tensors over 2^31 elements are not supported (x ", x.shape(), ", y ", y.shape(), ")");
  return x.device().index;
}

enum class Pass { Forward, InputGrad, WeightGrad };

// The algorithm, its math type and workspace of a (pass, dtype, geometry, out_channels), chosen
// once. Algorithms needing more than kMaxWorkspace bytes of workspace are passed over.
struct Choice {
  int algo = 0;
  cudnnMathType_t math = CUDNN_TENSOR_OP_MATH;
  size_t workspace = 0;
};
constexpr size_t kMaxWorkspace = size_t(1) << 30;
using ChoiceKey = std::tuple<int, int, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                             int64_t, int64_t, int64_t, bool>;  // …, deterministic_algorithms()
std::mutex g_choices_mutex;
std::map<ChoiceKey, Choice> g_choices;

// FFT and Winograd algorithms transform their operands and round the transforms to the tensor's
// dtype: in f16 the H200 measured a 5×5 forward 1.8× as far from f64 as im2col + cuBLAS
// (ConvLibrary, n2_c16_o9_13x10_k5x5). They are passed over; the GEMM-like algorithms remain.
bool transform_algorithm(cudnnConvolutionFwdAlgo_t a) {
  return a == CUDNN_CONVOLUTION_FWD_ALGO_FFT || a == CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING ||
         a == CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD || a == CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED;
}
bool transform_algorithm(cudnnConvolutionBwdDataAlgo_t a) {
  return a == CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT || a == CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING ||
         a == CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD || a == CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED;
}
bool transform_algorithm(cudnnConvolutionBwdFilterAlgo_t a) {
  return a == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT || a == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING ||
         a == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED;
}

// The first successful result of a heuristics query that is not an FFT / Winograd algorithm,
// preferring a deterministic one when asked; only a deterministic one under
// deterministic_algorithms() (tensor/determinism.h), else an error that says so.
template <typename Perf>
Choice first_usable(const char* op, const std::vector<Perf>& perfs, int returned, bool want_deterministic) {
  const bool only = deterministic_algorithms();
  for (int pass = want_deterministic || only ? 0 : 1; pass < (only ? 1 : 2); ++pass)
    for (int i = 0; i < returned; ++i) {
      const Perf& p = perfs[size_t(i)];
      if (p.status != CUDNN_STATUS_SUCCESS || p.memory > kMaxWorkspace || transform_algorithm(p.algo)) continue;
      if (pass == 0 && p.determinism != CUDNN_DETERMINISTIC) continue;
      return Choice{int(p.algo), p.mathType, p.memory};
    }
  LOOM_FAIL(op, ": cuDNN offers no ", only ? "deterministic algorithm (deterministic algorithms were asked for: "
            "--deterministic)" : "algorithm", " for this convolution");
}

Choice choose(const char* op, Pass pass, cudnnHandle_t h, const ConvDescriptors& d, DType dt, int device,
              const Im2ColArgs& g, int64_t out_channels) {
  const ChoiceKey key{int(pass), int(dt), device, g.batch, g.channels, g.height, g.width, out_channels,
                      g.kernel_h, g.kernel_w, g.stride_h, g.stride_w, g.pad_h, g.pad_w,
                      deterministic_algorithms()};
  {
    std::lock_guard<std::mutex> lock(g_choices_mutex);
    const auto it = g_choices.find(key);
    if (it != g_choices.end()) return it->second;
  }
  Choice c;
  int returned = 0;
  if (pass == Pass::Forward) {
    std::vector<cudnnConvolutionFwdAlgoPerf_t> perfs(CUDNN_CONVOLUTION_FWD_ALGO_COUNT);
    LOOM_CUDNN_CHECK(cudnnGetConvolutionForwardAlgorithm_v7(h, d.x, d.w, d.conv, d.y, int(perfs.size()), &returned,
                                                            perfs.data()));
    c = first_usable(op, perfs, returned, false);
    LOOM_CUDNN_CHECK(cudnnSetConvolutionMathType(d.conv, c.math));
    LOOM_CUDNN_CHECK(cudnnGetConvolutionForwardWorkspaceSize(h, d.x, d.w, d.conv, d.y,
                                                             cudnnConvolutionFwdAlgo_t(c.algo), &c.workspace));
  } else if (pass == Pass::InputGrad) {
    std::vector<cudnnConvolutionBwdDataAlgoPerf_t> perfs(CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT);
    LOOM_CUDNN_CHECK(cudnnGetConvolutionBackwardDataAlgorithm_v7(h, d.w, d.y, d.conv, d.x, int(perfs.size()),
                                                                 &returned, perfs.data()));
    c = first_usable(op, perfs, returned, true);
    LOOM_CUDNN_CHECK(cudnnSetConvolutionMathType(d.conv, c.math));
    LOOM_CUDNN_CHECK(cudnnGetConvolutionBackwardDataWorkspaceSize(h, d.w, d.y, d.conv, d.x,
                                                                  cudnnConvolutionBwdDataAlgo_t(c.algo), &c.workspace));
  } else {
    std::vector<cudnnConvolutionBwdFilterAlgoPerf_t> perfs(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT);
    LOOM_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, d.x, d.y, d.conv, d.w, int(perfs.size()),
                                                                   &returned, perfs.data()));
    c = first_usable(op, perfs, returned, true);
    LOOM_CUDNN_CHECK(cudnnSetConvolutionMathType(d.conv, c.math));
    LOOM_CUDNN_CHECK(cudnnGetConvolutionBackwardFilterWorkspaceSize(
        h, d.x, d.y, d.conv, d.w, cudnnConvolutionBwdFilterAlgo_t(c.algo), &c.workspace));
  }
  std::lock_guard<std::mutex> lock(g_choices_mutex);
  g_choices[key] = c;
  return c;
}

// A workspace of at least `bytes` from the caching allocator (kept alive by the returned tensor
// until the call has been queued; the allocator orders reuse on the compute stream).
Tensor workspace(size_t bytes, Device device) {
  return Tensor::empty({int64_t((bytes + 7) / 8) + 1}, DType::I64, device);
}

// What one call needs once its operands are checked: `device` current, its handle on the compute
// stream, the descriptors set to the chosen algorithm's math type, the workspace.
struct PreparedConv {
  DeviceGuard guard;
  cudnnHandle_t h;
  ConvDescriptors d;
  Choice c;
  Tensor ws;
  PreparedConv(const char* op, Pass pass, int device, DType dt, const Im2ColArgs& g, int64_t out_channels)
      : guard(device),
        h(handle_for(device)),
        d(g, out_channels, cudnn_dtype(op, dt)),
        c(choose(op, pass, h, d, dt, device, g, out_channels)),
        ws(workspace(c.workspace, Device::cuda(device))) {
    LOOM_CUDNN_CHECK(cudnnSetConvolutionMathType(d.conv, c.math));
  }
};

}  // namespace

bool cudnn_conv_available() {
  const int device = current_device();
  return device >= 0 && device < kMaxDevices && handle_slot(device).handle != nullptr;
}

std::string cudnn_unavailable_reason() {
  const int device = current_device();
  if (device < 0 || device >= kMaxDevices) return "no current CUDA device";
  return handle_slot(device).error;
}

void cudnn_conv2d(const Conv2dArgs& a) {
  constexpr const char* op = "cuda conv2d (cuDNN)";
  const int64_t O = a.w.defined() ? a.w.size(0) : 0;
  LOOM_CHECK(a.y.defined(), op, ": output undefined");
  const int device = check_operands(op, a.geo, O, a.x, a.w, a.y, a.bias);
  const PreparedConv p(op, Pass::Forward, device, a.x.dtype(), a.geo, O);
  const cudnnHandle_t h = p.h;
  const ConvDescriptors& d = p.d;
  const float one = 1.f, zero = 0.f;
  LOOM_CUDNN_CHECK(cudnnConvolutionForward(h, &one, d.x, a.x.raw_data(), d.w, a.w.raw_data(), d.conv,
                                           cudnnConvolutionFwdAlgo_t(p.c.algo), p.ws.raw_data(), p.c.workspace,
                                           &zero, d.y, a.y.raw_data()));
  if (kernel_profile_enabled()) kernel_profile_mark("cudnn conv forward");
  if (a.bias.defined()) {
    cudnnTensorDescriptor_t b = nullptr;
    LOOM_CUDNN_CHECK(cudnnCreateTensorDescriptor(&b));
    const cudnnStatus_t st = cudnnSetTensor4dDescriptor(b, CUDNN_TENSOR_NCHW, cudnn_dtype(op, a.x.dtype()), 1,
                                                        int(O), 1, 1);
    const cudnnStatus_t add = st == CUDNN_STATUS_SUCCESS
                                  ? cudnnAddTensor(h, &one, b, a.bias.raw_data(), &one, d.y, a.y.raw_data())
                                  : st;
    cudnnDestroyTensorDescriptor(b);
    LOOM_CUDNN_CHECK(add);
    if (kernel_profile_enabled()) kernel_profile_mark("cudnn add bias");
  }
}

void cudnn_conv2d_input_grad(const Conv2dInputGradArgs& a) {
  constexpr const char* op = "cuda conv2d_input_grad (cuDNN)";
  const int64_t O = a.w.defined() ? a.w.size(0) : 0;
  LOOM_CHECK(a.dx.defined() && a.dy.defined(), op, ": dx or dy undefined");
  const int device = check_operands(op, a.geo, O, a.dx, a.w, a.dy, Tensor());
  const PreparedConv p(op, Pass::InputGrad, device, a.dx.dtype(), a.geo, O);
  const float one = 1.f, zero = 0.f;
  LOOM_CUDNN_CHECK(cudnnConvolutionBackwardData(p.h, &one, p.d.w, a.w.raw_data(), p.d.y, a.dy.raw_data(), p.d.conv,
                                                cudnnConvolutionBwdDataAlgo_t(p.c.algo), p.ws.raw_data(),
                                                p.c.workspace, &zero, p.d.x, a.dx.raw_data()));
  if (kernel_profile_enabled()) kernel_profile_mark("cudnn conv input grad");
}

void cudnn_conv2d_weight_grad(const Conv2dWeightGradArgs& a) {
  constexpr const char* op = "cuda conv2d_weight_grad (cuDNN)";
  LOOM_CHECK(a.dw.defined() && a.dw.dim() == 4, op, ": dw must be a defined [O, C, kh, kw] tensor");
  const int64_t O = a.dw.size(0);
  const int device = check_operands(op, a.geo, O, a.x, a.dw, a.dy, Tensor());
  const PreparedConv p(op, Pass::WeightGrad, device, a.x.dtype(), a.geo, O);
  const float one = 1.f, zero = 0.f;
  LOOM_CUDNN_CHECK(cudnnConvolutionBackwardFilter(p.h, &one, p.d.x, a.x.raw_data(), p.d.y, a.dy.raw_data(), p.d.conv,
                                                  cudnnConvolutionBwdFilterAlgo_t(p.c.algo), p.ws.raw_data(),
                                                  p.c.workspace, &zero, p.d.w, a.dw.raw_data()));
  if (kernel_profile_enabled()) kernel_profile_mark("cudnn conv weight grad");
}

}  // namespace loom::cuda

#else  // built without cuDNN

namespace loom::cuda {

bool cudnn_conv_available() { return false; }
std::string cudnn_unavailable_reason() {
  return "this build has no cuDNN (CMake found no cudnn.h / libcudnn: set CUDNN_ROOT)";
}
void cudnn_conv2d(const Conv2dArgs&) { LOOM_FAIL("cuda conv2d (cuDNN): ", cudnn_unavailable_reason()); }
void cudnn_conv2d_input_grad(const Conv2dInputGradArgs&) {
  LOOM_FAIL("cuda conv2d_input_grad (cuDNN): ", cudnn_unavailable_reason());
}
void cudnn_conv2d_weight_grad(const Conv2dWeightGradArgs&) {
  LOOM_FAIL("cuda conv2d_weight_grad (cuDNN): ", cudnn_unavailable_reason());
}

}  // namespace loom::cuda

#endif
