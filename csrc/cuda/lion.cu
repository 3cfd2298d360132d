// fusedopt::lion_ on CUDA: one Lion step over many tensors in a few kernel launches.
//
// The math contract is fusedopt/reference.py:lion; the multi-tensor layout, element loop, input
// checks and device scalars are multi_tensor.cuh's. Per element, in fp32 (fp64 for fp64 storage):
//
//   g = grad / grad_scale            (written back to grad when grad_scale is given)
//   g = -g if maximize
//   param = param * (1 - lr * weight_decay) - lr * sign(beta1 * exp_avg + (1 - beta1) * g)
//   exp_avg = beta2 * exp_avg + (1 - beta2) * g
//
// with sign(0) = 0 (and sign(nan) = 0, as torch.sign computes it). A non-zero found_inf changes
// nothing. lr, grad_scale and found_inf on the device are read only by the kernel, so the op never
// syncs and can be captured in a CUDA graph.
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

#include "multi_tensor.cuh"

namespace fusedopt {
namespace {

using cuda::kBlockThreads;

// Lists: params, grads, exp_avgs.
using LionArgs = cuda::TensorListArgs<3, /*kMaxTensors=*/64, /*kMaxBlocks=*/320>;

struct LionScalars {
  cuda::ScalarPointers ptrs;
  double lr, beta1, beta2, weight_decay;
  bool maximize;
  // lr came as a tensor (float32 in practice): the reference forms 1 - lr * weight_decay in its
  // dtype, so in float32 here rather than float64.
  bool lr_single;
};

static_assert(sizeof(LionArgs) + sizeof(LionScalars) <= cuda::kMaxArgBytes,
              "kernel arguments too large");

// One element of the update: x = {param, grad, exp_avg} in opmath_t registers; x[1] is left
// holding the unscaled grad. __host__ __device__ so host code can check it element by element.
template <typename opmath_t>
struct LionUpdate {
  opmath_t lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, grad_scale;
  bool unscale, maximize;

  // Scalars as the reference's torch ops see them: Python floats combined in fp64, then rounded
  // once to the compute dtype. lr: this step's lr; grad_scale: nullptr when grads are not scaled.
  __host__ __device__ LionUpdate(const LionScalars& s, double lr_d, const float* grad_scale_ptr)
      : lr(static_cast<opmath_t>(lr_d)),
        decay(s.lr_single ? static_cast<opmath_t>(1.f - static_cast<float>(lr_d) *
                                                                 static_cast<float>(s.weight_decay))
                          : static_cast<opmath_t>(1.0 - lr_d * s.weight_decay)),
        beta1(static_cast<opmath_t>(s.beta1)),
        one_minus_beta1(static_cast<opmath_t>(1.0 - s.beta1)),
        beta2(static_cast<opmath_t>(s.beta2)),
        one_minus_beta2(static_cast<opmath_t>(1.0 - s.beta2)),
        grad_scale(grad_scale_ptr != nullptr ? static_cast<opmath_t>(*grad_scale_ptr)
                                             : opmath_t(1)),
        unscale(grad_scale_ptr != nullptr),
        maximize(s.maximize) {}

  // Every product and sum rounds on its own (no FMA), so the sign is taken of the very sum the
  // reference computes.
  __host__ __device__ __forceinline__ void operator()(opmath_t (&x)[3]) const {
    opmath_t& p = x[0];
    opmath_t& g = x[1];
    opmath_t& m = x[2];
    if (unscale) g = g / grad_scale;
    const opmath_t d = maximize ? -g : g;
    const opmath_t c = beta1 * m + one_minus_beta1 * d;
    // sign(c): +1, -1, or 0 for zero and nan (torch.sign's (0 < c) - (c < 0)).
    const opmath_t sign = static_cast<opmath_t>(static_cast<int>(opmath_t(0) < c) -
                                                static_cast<int>(c < opmath_t(0)));
    p = p * decay - lr * sign;
    m = beta2 * m + one_minus_beta2 * d;
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    lion_kernel(const LionArgs args, const LionScalars s) {
  if (cuda::skip_step(s.ptrs)) return;

  using opmath_t = at::opmath_type<scalar_t>;  // fp32 for fp32/fp16/bf16 storage, fp64 for fp64
  const cuda::ChunkRange chunk = cuda::this_blocks_chunk(args);
  scalar_t* ptrs[LionArgs::kLists];
  cuda::chunk_pointers<scalar_t>(args, chunk, ptrs);
  const LionUpdate<opmath_t> update(s, cuda::read_lr(s.ptrs, s.lr), s.ptrs.grad_scale);

  // Every list is read; the grads are written back only when they were unscaled.
  constexpr unsigned kAll = cuda::all_lists(LionArgs::kLists);
  const unsigned store_mask = update.unscale ? kAll : kAll & ~cuda::list_bit(1);
  cuda::for_each_element(ptrs, chunk.n, kAll, store_mask, update);
}

void lion_cuda_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                    double beta2, double weight_decay, bool maximize,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  constexpr const char* kOp = "lion_";
  const std::vector<cuda::NamedList> named = {
      {"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}};
  cuda::check_same_lengths(kOp, named);
  if (params.empty()) return;
  const c10::Device device = cuda::check_tensor_lists(kOp, named);
  const std::vector<at::TensorList> lists = {params, grads, exp_avgs};

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const cuda::StepScalars step_scalars(kOp, lr, lr_tensor, grad_scale, found_inf, device);
  LionScalars scalars{};
  scalars.ptrs = step_scalars.ptrs;
  scalars.lr = step_scalars.lr;
  scalars.beta1 = beta1;
  scalars.beta2 = beta2;
  scalars.weight_decay = weight_decay;
  scalars.maximize = maximize;
  scalars.lr_single = step_scalars.lr_dtype != at::kDouble;

  for (const auto& group : cuda::group_by_dtype(params)) {
    const std::vector<size_t>& indices = group.second;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.first, "fusedopt::lion_", [&] {
      cuda::multi_tensor_apply<LionArgs>(lists, indices, [&](const LionArgs& args, int nblocks) {
        lion_kernel<scalar_t><<<nblocks, kBlockThreads, 0, stream>>>(args, scalars);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
}

void lion_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, double lr,
               double beta1, double beta2, double weight_decay, bool maximize,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  lion_cuda_impl(params, grads, exp_avgs, lr, std::nullopt, beta1, beta2, weight_decay, maximize,
                 grad_scale, found_inf);
}

void lion_tensor_lr_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         const at::Tensor& lr, double beta1, double beta2, double weight_decay,
                         bool maximize, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf) {
  lion_cuda_impl(params, grads, exp_avgs, 0.0, lr, beta1, beta2, weight_decay, maximize,
                 grad_scale, found_inf);
}

}  // namespace
}  // namespace fusedopt

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("lion_", &fusedopt::lion_cuda);
  m.impl("lion_.tensor_lr", &fusedopt::lion_tensor_lr_cuda);
}
