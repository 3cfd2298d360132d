// fusedopt::adam_ on CUDA: one Adam / AdamW step over many tensors in a few kernel launches.
//
// The math contract is fusedopt/reference.py:adam. The multi-tensor layout (chunks, argument
// tables, repeated launches), the element loop and the input checks live in multi_tensor.cuh.
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

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "multi_tensor.cuh"

namespace fusedopt {
namespace {

using cuda::kBlockThreads;

// Lists: params, grads, exp_avgs, exp_avg_sqs (and max_exp_avg_sqs with amsgrad). Each tensor
// also carries its step counter as it was before this call.
template <bool kAmsgrad>
using AdamArgs = cuda::TensorListArgs<kAmsgrad ? 5 : 4, /*kMaxTensors=*/32, /*kMaxBlocks=*/320,
                                      /*Meta=*/const float*>;

// Hyper-parameters; device pointers for the values that must not be read on the host.
struct AdamScalars {
  cuda::ScalarPointers ptrs;
  double lr, beta1, beta2, weight_decay, eps;
  bool maximize, decoupled_weight_decay;
};

static_assert(sizeof(AdamArgs<true>) + sizeof(AdamScalars) <= cuda::kMaxArgBytes,
              "kernel arguments too large");

template <typename scalar_t, bool kAmsgrad>
__global__ void __launch_bounds__(kBlockThreads)
    adam_kernel(const AdamArgs<kAmsgrad> args, const AdamScalars s) {
  if (cuda::skip_step(s.ptrs)) return;

  using opmath_t = at::opmath_type<scalar_t>;  // fp32 for fp32/fp16/bf16 storage, fp64 for fp64
  constexpr int kLists = AdamArgs<kAmsgrad>::kLists;
  const cuda::ChunkRange chunk = cuda::this_blocks_chunk(args);
  scalar_t* ptrs[kLists];
  cuda::chunk_pointers<scalar_t>(args, chunk, ptrs);

  // Per-tensor scalars from this tensor's own step, in fp64 like the reference. This call counts
  // as step + 1; the counter itself is advanced later by increment_steps_kernel, so no block ever
  // sees a counter another block has already bumped. Every thread computes them itself: a few
  // flops against the ~128 elements each thread then updates, and no __syncthreads needed.
  const double lr = cuda::read_lr(s.ptrs, s.lr);
  const double step = static_cast<double>(*args.meta[chunk.tensor]) + 1.0;
  const opmath_t step_size = static_cast<opmath_t>(lr / (1.0 - pow(s.beta1, step)));
  const opmath_t bias_correction2_sqrt = static_cast<opmath_t>(sqrt(1.0 - pow(s.beta2, step)));
  const opmath_t decay = static_cast<opmath_t>(1.0 - lr * s.weight_decay);  // AdamW only
  const opmath_t weight_decay = static_cast<opmath_t>(s.weight_decay);
  const opmath_t lerp_weight = static_cast<opmath_t>(1.0 - s.beta1);
  const opmath_t beta2 = static_cast<opmath_t>(s.beta2);
  const opmath_t one_minus_beta2 = static_cast<opmath_t>(1.0 - s.beta2);
  const opmath_t eps = static_cast<opmath_t>(s.eps);
  const bool unscale = s.ptrs.grad_scale != nullptr;
  const opmath_t grad_scale = unscale ? static_cast<opmath_t>(*s.ptrs.grad_scale) : opmath_t(1);

  // One element of the update, in opmath_t registers. x[1] is left holding the unscaled grad.
  auto update = [&](opmath_t (&x)[kLists]) {
    opmath_t& p = x[0];
    opmath_t& g = x[1];
    opmath_t& m = x[2];
    opmath_t& v = x[3];
    if (unscale) g = g / grad_scale;
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
      opmath_t& vmax = x[4];
      vmax = (vmax > v || vmax != vmax) ? vmax : v;  // NaN-propagating max, like torch.maximum
      v_used = vmax;
    }
    const opmath_t denom = sqrt(v_used) / bias_correction2_sqrt + eps;
    p = p - step_size * m / denom;
  };

  // Every list is read; the grads are written back only when they were unscaled.
  constexpr unsigned kAll = cuda::all_lists(kLists);
  const unsigned store_mask = unscale ? kAll : kAll & ~cuda::list_bit(1);
  cuda::for_each_element(ptrs, chunk.n, kAll, store_mask, update);
}

// Advances the step counters, launched after every adam_kernel of the call (same stream), so it
// cannot race with their reads. Like the update, it is a no-op when found_inf is set.
constexpr int kMaxSteps = 448;
struct StepListArgs {
  float* steps[kMaxSteps];
};
static_assert(sizeof(StepListArgs) + sizeof(int) + sizeof(cuda::ScalarPointers) <=
                  cuda::kMaxArgBytes,
              "kernel arguments too large");

__global__ void increment_steps_kernel(const StepListArgs args, int count,
                                       const cuda::ScalarPointers s) {
  if (cuda::skip_step(s)) return;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) *args.steps[i] += 1.f;
}

// Launches adam_kernel over the tensors at `indices` (all of dtype scalar_t).
template <typename scalar_t, bool kAmsgrad>
void launch_adam(const std::vector<size_t>& indices, const std::vector<at::TensorList>& lists,
                 at::TensorList state_steps, const AdamScalars& scalars, cudaStream_t stream) {
  using Args = AdamArgs<kAmsgrad>;
  cuda::multi_tensor_apply<Args>(
      lists, indices,
      [&](const Args& args, int nblocks) {
        adam_kernel<scalar_t, kAmsgrad><<<nblocks, kBlockThreads, 0, stream>>>(args, scalars);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      [&](size_t i) -> const float* { return state_steps[i].data_ptr<float>(); });
}

void launch_increment_steps(at::TensorList state_steps, const cuda::ScalarPointers& s,
                            cudaStream_t stream) {
  constexpr int kThreads = 128;
  for (size_t begin = 0; begin < state_steps.size(); begin += kMaxSteps) {
    const int count = static_cast<int>(std::min<size_t>(kMaxSteps, state_steps.size() - begin));
    StepListArgs args;
    for (int k = 0; k < count; ++k) args.steps[k] = state_steps[begin + k].data_ptr<float>();
    increment_steps_kernel<<<(count + kThreads - 1) / kThreads, kThreads, 0, stream>>>(args, count,
                                                                                       s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void adam_cuda_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList state_steps, double lr, const std::optional<at::Tensor>& lr_tensor,
                    double beta1, double beta2, double weight_decay, double eps, bool amsgrad,
                    bool maximize, bool decoupled_weight_decay,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  constexpr const char* kOp = "adam_";
  const size_t n = params.size();
  cuda::check_same_lengths(kOp, {{"params", params},
                                 {"grads", grads},
                                 {"exp_avgs", exp_avgs},
                                 {"exp_avg_sqs", exp_avg_sqs},
                                 {"state_steps", state_steps}});
  if (amsgrad) {
    TORCH_CHECK(max_exp_avg_sqs.size() == n, "fusedopt::adam_: amsgrad=True needs one "
                "max_exp_avg_sq per param, got ", max_exp_avg_sqs.size(), " for ", n, " params");
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), "fusedopt::adam_: max_exp_avg_sqs must be empty when "
                "amsgrad=False, got ", max_exp_avg_sqs.size(), " tensors");
  }
  if (n == 0) return;

  std::vector<cuda::NamedList> named = {
      {"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) named.push_back({"max_exp_avg_sqs", max_exp_avg_sqs});
  const c10::Device device = cuda::check_tensor_lists(kOp, named);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& step = state_steps[i];
    TORCH_CHECK(step.defined() && step.scalar_type() == at::kFloat && step.numel() == 1 &&
                    step.device() == device,
                "fusedopt::adam_ (CUDA): state_steps[", i, "] must be a 1-element float32 tensor "
                "on ", device, ", got ", step.scalar_type(), " with ", step.numel(),
                " elements on ", step.device());
  }
  std::vector<at::TensorList> lists;
  for (const auto& list : named) lists.push_back(list.tensors);

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const cuda::StepScalars step_scalars(kOp, lr, lr_tensor, grad_scale, found_inf, device);
  AdamScalars scalars{};
  scalars.ptrs = step_scalars.ptrs;
  scalars.lr = step_scalars.lr;
  scalars.beta1 = beta1;
  scalars.beta2 = beta2;
  scalars.weight_decay = weight_decay;
  scalars.eps = eps;
  scalars.maximize = maximize;
  scalars.decoupled_weight_decay = decoupled_weight_decay;

  for (const auto& group : cuda::group_by_dtype(params)) {
    const std::vector<size_t>& indices = group.second;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.first, "fusedopt::adam_", [&] {
      if (amsgrad) {
        launch_adam<scalar_t, true>(indices, lists, state_steps, scalars, stream);
      } else {
        launch_adam<scalar_t, false>(indices, lists, state_steps, scalars, stream);
      }
    });
  }
  launch_increment_steps(state_steps, scalars.ptrs, stream);
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
