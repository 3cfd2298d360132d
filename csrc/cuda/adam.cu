// fusedopt::adam_ on CUDA: one Adam / AdamW step over many tensors in a few kernel launches.
//
// The math contract is fusedopt/reference.py:adam. Layout of the work (multi-tensor apply):
// every tensor is cut into chunks of kChunkSize elements, each CUDA block updates one chunk, and
// one launch carries the addresses of up to kMaxTensors tensors and kMaxBlocks chunks in its
// kernel arguments; the launcher launches as often as needed to cover every tensor.
//
// Nothing here reads a device value on the host: lr (tensor_lr overload), grad_scale, found_inf
// and the step counters are all read by the kernels, so the op is safe to capture in a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fusedopt {
namespace {

constexpr int64_t kChunkSize = 65536;  // elements per CUDA block
constexpr int kBlockThreads = 512;
constexpr int kMaxLists = 5;     // params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs
constexpr int kMaxTensors = 32;  // tensors per launch
constexpr int kMaxBlocks = 320;  // chunks (= CUDA blocks) per launch
constexpr int kVecBytes = 16;    // widest global load/store: 128 bits

// Everything one launch needs to find its chunks; passed by value as a kernel argument.
struct TensorListArgs {
  void* ptrs[kMaxLists][kMaxTensors];
  int64_t numels[kMaxTensors];
  const float* steps[kMaxTensors];  // step counters as they were before this call
  uint8_t block_tensor[kMaxBlocks];  // block b updates chunk block_chunk[b] of tensor block_tensor[b]
  int32_t block_chunk[kMaxBlocks];
};

// Hyper-parameters, and device pointers for the values that must not be read on the host.
struct AdamScalars {
  const float* lr_ptr;      // tensor_lr overload: lr lives on the device; else nullptr, use lr
  const float* grad_scale;  // nullptr: grads are not scaled
  const float* found_inf;   // nullptr: never skip
  double lr, beta1, beta2, weight_decay, eps;
  bool maximize, decoupled_weight_decay;
};

// Kernel parameters are limited to 4 KB on every CUDA version we may be built with.
static_assert(sizeof(TensorListArgs) + sizeof(AdamScalars) <= 4096, "kernel arguments too large");

// Round-to-nearest division and sqrt even when built with --use_fast_math (setup.py does), so the
// result tracks the reference's IEEE arithmetic instead of the approximate instructions.
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename scalar_t, bool kAmsgrad>
__global__ void __launch_bounds__(kBlockThreads)
    adam_kernel(const TensorListArgs args, const AdamScalars s) {
  // GradScaler found inf/nan in the grads: this step is skipped and nothing may change.
  if (s.found_inf != nullptr && *s.found_inf != 0.f) return;

  using opmath_t = at::opmath_type<scalar_t>;  // fp32 for fp32/fp16/bf16 storage, fp64 for fp64
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  using VecT = Vec<scalar_t, kVec>;

  const int t = args.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(args.block_chunk[blockIdx.x]) * kChunkSize;
  const int64_t left = args.numels[t] - begin;
  const int64_t n = left < kChunkSize ? left : kChunkSize;  // elements in this chunk
  scalar_t* p_ptr = static_cast<scalar_t*>(args.ptrs[0][t]) + begin;
  scalar_t* g_ptr = static_cast<scalar_t*>(args.ptrs[1][t]) + begin;
  scalar_t* m_ptr = static_cast<scalar_t*>(args.ptrs[2][t]) + begin;
  scalar_t* v_ptr = static_cast<scalar_t*>(args.ptrs[3][t]) + begin;
  scalar_t* vmax_ptr = kAmsgrad ? static_cast<scalar_t*>(args.ptrs[4][t]) + begin : nullptr;

  // Per-tensor scalars from this tensor's own step, in fp64 like the reference. This call counts
  // as step + 1; the counter itself is advanced later by increment_steps_kernel, so no block ever
  // sees a counter another block has already bumped. Every thread computes them itself: a few
  // flops against the ~128 elements each thread then updates, and no __syncthreads needed.
  const double lr = s.lr_ptr != nullptr ? static_cast<double>(*s.lr_ptr) : s.lr;
  const double step = static_cast<double>(*args.steps[t]) + 1.0;
  const opmath_t step_size = static_cast<opmath_t>(lr / (1.0 - pow(s.beta1, step)));
  const opmath_t bias_correction2_sqrt = static_cast<opmath_t>(sqrt(1.0 - pow(s.beta2, step)));
  const opmath_t decay = static_cast<opmath_t>(1.0 - lr * s.weight_decay);  // AdamW only
  const opmath_t weight_decay = static_cast<opmath_t>(s.weight_decay);
  const opmath_t lerp_weight = static_cast<opmath_t>(1.0 - s.beta1);
  const opmath_t beta2 = static_cast<opmath_t>(s.beta2);
  const opmath_t one_minus_beta2 = static_cast<opmath_t>(1.0 - s.beta2);
  const opmath_t eps = static_cast<opmath_t>(s.eps);
  const bool unscale = s.grad_scale != nullptr;
  const opmath_t grad_scale = unscale ? static_cast<opmath_t>(*s.grad_scale) : opmath_t(1);

  // One element of the update, in opmath_t registers. g is left holding the unscaled grad.
  auto update = [&](opmath_t& p, opmath_t& g, opmath_t& m, opmath_t& v, opmath_t& vmax) {
    if (unscale) g = div_rn(g, grad_scale);
    opmath_t d = s.maximize ? -g : g;
    if (weight_decay != opmath_t(0)) {
      if (s.decoupled_weight_decay) {
        p = p * decay;
      } else {
        d = d + weight_decay * p;
      }
    }
    // lerp(m, d, w), in the form that is exact at both ends (as torch.lerp computes it)
    const opmath_t diff = d - m;
    m = lerp_weight < opmath_t(0.5) ? m + lerp_weight * diff
                                    : d - diff * (opmath_t(1) - lerp_weight);
    v = v * beta2 + one_minus_beta2 * d * d;
    opmath_t v_used = v;
    if constexpr (kAmsgrad) {
      vmax = (vmax > v || vmax != vmax) ? vmax : v;  // NaN-propagating max, like torch.maximum
      v_used = vmax;
    }
    const opmath_t denom = div_rn(sqrt_rn(v_used), bias_correction2_sqrt) + eps;
    p = p - div_rn(step_size * m, denom);
  };

  // 128-bit loads/stores when every list's chunk start is aligned (chunk starts are multiples of
  // kChunkSize elements, so this is the tensors' own alignment); the rest goes element by element.
  auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0; };
  const bool vectorize = aligned(p_ptr) && aligned(g_ptr) && aligned(m_ptr) && aligned(v_ptr) &&
                         (!kAmsgrad || aligned(vmax_ptr));
  const int64_t n_vec = vectorize ? n / kVec : 0;
  for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
    VecT pv = reinterpret_cast<const VecT*>(p_ptr)[i];
    VecT gv = reinterpret_cast<const VecT*>(g_ptr)[i];
    VecT mv = reinterpret_cast<const VecT*>(m_ptr)[i];
    VecT vv = reinterpret_cast<const VecT*>(v_ptr)[i];
    VecT vmaxv;
    if constexpr (kAmsgrad) vmaxv = reinterpret_cast<const VecT*>(vmax_ptr)[i];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      opmath_t p = pv.v[k], g = gv.v[k], m = mv.v[k], v = vv.v[k], vmax = 0;
      if constexpr (kAmsgrad) vmax = vmaxv.v[k];
      update(p, g, m, v, vmax);
      pv.v[k] = static_cast<scalar_t>(p);
      gv.v[k] = static_cast<scalar_t>(g);
      mv.v[k] = static_cast<scalar_t>(m);
      vv.v[k] = static_cast<scalar_t>(v);
      if constexpr (kAmsgrad) vmaxv.v[k] = static_cast<scalar_t>(vmax);
    }
    reinterpret_cast<VecT*>(p_ptr)[i] = pv;
    if (unscale) reinterpret_cast<VecT*>(g_ptr)[i] = gv;
    reinterpret_cast<VecT*>(m_ptr)[i] = mv;
    reinterpret_cast<VecT*>(v_ptr)[i] = vv;
    if constexpr (kAmsgrad) reinterpret_cast<VecT*>(vmax_ptr)[i] = vmaxv;
  }
  for (int64_t i = n_vec * kVec + threadIdx.x; i < n; i += blockDim.x) {
    opmath_t p = p_ptr[i], g = g_ptr[i], m = m_ptr[i], v = v_ptr[i], vmax = 0;
    if constexpr (kAmsgrad) vmax = vmax_ptr[i];
    update(p, g, m, v, vmax);
    p_ptr[i] = static_cast<scalar_t>(p);
    if (unscale) g_ptr[i] = static_cast<scalar_t>(g);
    m_ptr[i] = static_cast<scalar_t>(m);
    v_ptr[i] = static_cast<scalar_t>(v);
    if constexpr (kAmsgrad) vmax_ptr[i] = static_cast<scalar_t>(vmax);
  }
}

// Advances the step counters, launched after every adam_kernel of the call (same stream), so it
// cannot race with their reads. Like the update, it is a no-op when found_inf is set.
constexpr int kMaxSteps = 448;
struct StepListArgs {
  float* steps[kMaxSteps];
};
static_assert(sizeof(StepListArgs) + 2 * sizeof(void*) <= 4096, "kernel arguments too large");

__global__ void increment_steps_kernel(const StepListArgs args, int count, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.f) return;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) *args.steps[i] += 1.f;
}

// Launches adam_kernel over the tensors at `indices` (all of dtype scalar_t), packing as many
// tensors and chunks per launch as the argument struct holds.
template <typename scalar_t>
void launch_adam(const std::vector<size_t>& indices, const std::vector<at::TensorList>& lists,
                 at::TensorList state_steps, bool amsgrad, const AdamScalars& scalars,
                 cudaStream_t stream) {
  const int nlists = amsgrad ? 5 : 4;
  TensorListArgs args;
  int ntensors = 0;
  int nblocks = 0;
  auto launch = [&] {
    if (amsgrad) {
      adam_kernel<scalar_t, true><<<nblocks, kBlockThreads, 0, stream>>>(args, scalars);
    } else {
      adam_kernel<scalar_t, false><<<nblocks, kBlockThreads, 0, stream>>>(args, scalars);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };

  for (size_t i : indices) {
    const int64_t numel = lists[0][i].numel();
    if (numel == 0) continue;  // nothing to update; its step is still advanced
    int slot = ntensors++;
    for (int l = 0; l < nlists; ++l) args.ptrs[l][slot] = lists[l][i].data_ptr();
    args.numels[slot] = numel;
    args.steps[slot] = state_steps[i].data_ptr<float>();

    const int64_t nchunks = (numel + kChunkSize - 1) / kChunkSize;
    for (int64_t chunk = 0; chunk < nchunks; ++chunk) {
      args.block_tensor[nblocks] = static_cast<uint8_t>(slot);
      args.block_chunk[nblocks] = static_cast<int32_t>(chunk);
      ++nblocks;
      const bool last_chunk = chunk == nchunks - 1;
      if (nblocks == kMaxBlocks || (last_chunk && ntensors == kMaxTensors)) {
        launch();
        nblocks = 0;
        if (last_chunk) {
          ntensors = 0;
        } else {
          // This tensor still has chunks: it becomes slot 0 of the next launch.
          for (int l = 0; l < nlists; ++l) args.ptrs[l][0] = args.ptrs[l][slot];
          args.numels[0] = args.numels[slot];
          args.steps[0] = args.steps[slot];
          slot = 0;
          ntensors = 1;
        }
      }
    }
  }
  if (nblocks > 0) launch();
}

void launch_increment_steps(at::TensorList state_steps, const float* found_inf,
                            cudaStream_t stream) {
  constexpr int kThreads = 128;
  for (size_t begin = 0; begin < state_steps.size(); begin += kMaxSteps) {
    const int count = static_cast<int>(std::min<size_t>(kMaxSteps, state_steps.size() - begin));
    StepListArgs args;
    for (int k = 0; k < count; ++k) args.steps[k] = state_steps[begin + k].data_ptr<float>();
    increment_steps_kernel<<<(count + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        args, count, found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// A 1-element tensor on `device`, as float32 (GradScaler's own dtype; others are converted with
// an asynchronous copy on the current stream, never a host sync).
at::Tensor device_scalar_as_float(const at::Tensor& t, const char* name, c10::Device device) {
  TORCH_CHECK(t.numel() == 1, "fusedopt::adam_: ", name, " must have exactly one element, got ",
              t.numel());
  TORCH_CHECK(t.device() == device, "fusedopt::adam_: ", name, " must be on ", device,
              " like the params, got ", t.device());
  return t.to(at::kFloat);
}

void adam_cuda_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList state_steps, double lr, const std::optional<at::Tensor>& lr_tensor,
                    double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                    bool maximize, bool decoupled_weight_decay,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  state_steps.size() == n,
              "fusedopt::adam_: params, grads, exp_avgs, exp_avg_sqs and state_steps must have "
              "the same length, got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ",
              exp_avg_sqs.size(), " and ", state_steps.size());
  if (amsgrad) {
    TORCH_CHECK(max_exp_avg_sqs.size() == n, "fusedopt::adam_: amsgrad=True needs one "
                "max_exp_avg_sq per param, got ", max_exp_avg_sqs.size(), " for ", n, " params");
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), "fusedopt::adam_: max_exp_avg_sqs must be empty when "
                "amsgrad=False, got ", max_exp_avg_sqs.size(), " tensors");
  }
  if (n == 0) return;

  const c10::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "fusedopt::adam_ (CUDA): params must be CUDA tensors, got ",
              device);
  std::vector<at::TensorList> lists = {params, grads, exp_avgs, exp_avg_sqs};
  if (amsgrad) lists.push_back(max_exp_avg_sqs);
  const char* names[] = {"params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"};

  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const auto dtype = p.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                    dtype == at::kDouble,
                "fusedopt::adam_ (CUDA): params[", i, "] has dtype ", dtype,
                "; supported are float32, float16, bfloat16 and float64");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "fusedopt::adam_ (CUDA): params[", i,
                "] must be dense and non-overlapping (e.g. contiguous); call .contiguous() on it");
    for (size_t l = 0; l < lists.size(); ++l) {
      const at::Tensor& t = lists[l][i];
      TORCH_CHECK(t.device() == device, "fusedopt::adam_: ", names[l], "[", i, "] is on ",
                  t.device(), " but params[0] is on ", device, "; all tensors must share a device");
      TORCH_CHECK(t.scalar_type() == dtype, "fusedopt::adam_: ", names[l], "[", i, "] has dtype ",
                  t.scalar_type(), " but params[", i, "] has ", dtype,
                  "; states and grads must have their param's dtype");
      // Same sizes and strides make the flat storage orders agree element by element.
      TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), "fusedopt::adam_: ",
                  names[l], "[", i, "] has sizes ", t.sizes(), " and strides ", t.strides(),
                  " but params[", i, "] has ", p.sizes(), " and ", p.strides(),
                  "; make them the same layout (e.g. all contiguous)");
    }
    const at::Tensor& step = state_steps[i];
    TORCH_CHECK(step.scalar_type() == at::kFloat && step.numel() == 1 && step.device() == device,
                "fusedopt::adam_ (CUDA): state_steps[", i, "] must be a 1-element float32 tensor "
                "on ", device, ", got ", step.scalar_type(), " with ", step.numel(),
                " elements on ", step.device());
  }

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  // Keep the float32 copies alive until the launches are queued (the caching allocator orders
  // any reuse of their memory after this stream's work).
  at::Tensor lr_f, grad_scale_f, found_inf_f;
  AdamScalars scalars{};
  scalars.lr = lr;
  if (lr_tensor.has_value()) {
    if (lr_tensor->device().is_cpu()) {
      TORCH_CHECK(lr_tensor->numel() == 1, "fusedopt::adam_: lr must have exactly one element");
      scalars.lr = lr_tensor->item<double>();  // host memory: reading it does not sync
    } else {
      lr_f = device_scalar_as_float(*lr_tensor, "lr", device);
      scalars.lr_ptr = lr_f.data_ptr<float>();
    }
  }
  if (grad_scale.has_value()) {
    grad_scale_f = device_scalar_as_float(*grad_scale, "grad_scale", device);
    scalars.grad_scale = grad_scale_f.data_ptr<float>();
  }
  if (found_inf.has_value()) {
    found_inf_f = device_scalar_as_float(*found_inf, "found_inf", device);
    scalars.found_inf = found_inf_f.data_ptr<float>();
  }
  scalars.beta1 = beta1;
  scalars.beta2 = beta2;
  scalars.weight_decay = weight_decay;
  scalars.eps = eps;
  scalars.maximize = maximize;
  scalars.decoupled_weight_decay = decoupled_weight_decay;

  // One kernel instantiation per storage dtype: launch each dtype's tensors separately.
  for (const auto dtype : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
    std::vector<size_t> indices;
    for (size_t i = 0; i < n; ++i) {
      if (params[i].scalar_type() == dtype) indices.push_back(i);
    }
    if (indices.empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedopt::adam_", [&] {
      launch_adam<scalar_t>(indices, lists, state_steps, amsgrad, scalars, stream);
    });
  }
  launch_increment_steps(state_steps, scalars.found_inf, stream);
}

void adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, double lr, double beta1, double beta2,
               double weight_decay, double eps, bool amsgrad, bool maximize,
               bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  adam_cuda_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr,
                 std::nullopt, beta1, beta2, weight_decay, eps, amsgrad, maximize,
                 decoupled_weight_decay, grad_scale, found_inf);
}

void adam_tensor_lr_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                         at::TensorList state_steps, const at::Tensor& lr, double beta1,
                         double beta2, double weight_decay, double eps, bool amsgrad,
                         bool maximize, bool decoupled_weight_decay,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf) {
  adam_cuda_impl(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, 0.0, lr,
                 beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay,
                 grad_scale, found_inf);
}

}  // namespace
}  // namespace fusedopt

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("adam_", &fusedopt::adam_cuda);
  m.impl("adam_.tensor_lr", &fusedopt::adam_tensor_lr_cuda);
}
