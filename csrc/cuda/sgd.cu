// fusedopt::sgd_ on CUDA: one SGD step over many tensors in a few kernel launches.
//
// The math contract is fusedopt/reference.py:sgd; the multi-tensor layout, element loop, input
// checks and device scalars are multi_tensor.cuh's. Per element, in fp32 (fp64 for fp64 storage):
//
//   g = grad / grad_scale            (written back to grad when grad_scale is given)
//   g = -g if maximize
//   g += weight_decay * param        (when weight_decay != 0)
//   if momentum != 0:
//     buf = g  if is_first_step  else  momentum * buf + (1 - dampening) * g
//     g = g + momentum * buf  if nesterov  else  buf
//   param -= lr * g
//
// momentum_buffers is empty exactly when momentum == 0; on is_first_step the buffers are only
// written. A non-zero found_inf changes nothing. lr, grad_scale and found_inf on the device are
// read only by the kernel, so the op never syncs and can be captured in a CUDA graph.
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

// Lists: params, grads (and momentum_buffers with momentum).
template <bool kMomentum>
using SgdArgs = cuda::TensorListArgs<kMomentum ? 3 : 2, /*kMaxTensors=*/64, /*kMaxBlocks=*/320>;

struct SgdScalars {
  cuda::ScalarPointers ptrs;
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, is_first_step;
};

static_assert(sizeof(SgdArgs<true>) + sizeof(SgdScalars) <= cuda::kMaxArgBytes,
              "kernel arguments too large");

// One element of the update: x = {param, grad[, momentum_buffer]} in opmath_t registers; x[1] is
// left holding the unscaled grad. __host__ __device__ so host code can check it element by
// element.
template <typename opmath_t, bool kMomentum>
struct SgdUpdate {
  static constexpr int kLists = kMomentum ? 3 : 2;
  opmath_t lr, momentum, one_minus_dampening, weight_decay, grad_scale;
  bool decay, unscale, nesterov, maximize, is_first_step;

  // lr: this step's lr; grad_scale: nullptr when grads are not scaled.
  __host__ __device__ SgdUpdate(const SgdScalars& s, double lr_d, const float* grad_scale_ptr)
      : lr(static_cast<opmath_t>(lr_d)),
        momentum(static_cast<opmath_t>(s.momentum)),
        one_minus_dampening(static_cast<opmath_t>(1.0 - s.dampening)),
        weight_decay(static_cast<opmath_t>(s.weight_decay)),
        grad_scale(grad_scale_ptr != nullptr ? static_cast<opmath_t>(*grad_scale_ptr)
                                             : opmath_t(1)),
        decay(s.weight_decay != 0.0),
        unscale(grad_scale_ptr != nullptr),
        nesterov(s.nesterov),
        maximize(s.maximize),
        is_first_step(s.is_first_step) {}

  // Each product and sum rounds on its own (no FMA), as each op of the reference does.
  __host__ __device__ __forceinline__ void operator()(opmath_t (&x)[kLists]) const {
    opmath_t& p = x[0];
    opmath_t& g = x[1];
    if (unscale) g = g / grad_scale;
    opmath_t d = maximize ? -g : g;
    if (decay) d = d + weight_decay * p;
    if constexpr (kMomentum) {
      opmath_t& buf = x[2];
      buf = is_first_step ? d
                          : momentum * buf + one_minus_dampening * d;
      d = nesterov ? d + momentum * buf : buf;
    }
    p = p - lr * d;
  }
};

template <typename scalar_t, bool kMomentum>
__global__ void __launch_bounds__(kBlockThreads)
    sgd_kernel(const SgdArgs<kMomentum> args, const SgdScalars s) {
  if (cuda::skip_step(s.ptrs)) return;

  using opmath_t = at::opmath_type<scalar_t>;  // fp32 for fp32/fp16/bf16 storage, fp64 for fp64
  constexpr int kLists = SgdArgs<kMomentum>::kLists;
  const cuda::ChunkRange chunk = cuda::this_blocks_chunk(args);
  scalar_t* ptrs[kLists];
  cuda::chunk_pointers<scalar_t>(args, chunk, ptrs);
  const SgdUpdate<opmath_t, kMomentum> update(s, cuda::read_lr(s.ptrs, s.lr), s.ptrs.grad_scale);

  // The buffers are not read on the first step (they may hold anything, e.g. torch.empty);
  // the grads are written back only when they were unscaled.
  constexpr unsigned kAll = cuda::all_lists(kLists);
  constexpr unsigned kGrads = cuda::list_bit(1);
  constexpr unsigned kBuffers = kMomentum ? cuda::list_bit(2) : 0u;
  const unsigned load_mask = s.is_first_step ? kAll & ~kBuffers : kAll;
  const unsigned store_mask = update.unscale ? kAll : kAll & ~kGrads;
  cuda::for_each_element(ptrs, chunk.n, load_mask, store_mask, update);
}

template <typename scalar_t, bool kMomentum>
void launch_sgd(const std::vector<size_t>& indices, const std::vector<at::TensorList>& lists,
                const SgdScalars& scalars, cudaStream_t stream) {
  using Args = SgdArgs<kMomentum>;
  cuda::multi_tensor_apply<Args>(lists, indices, [&](const Args& args, int nblocks) {
    sgd_kernel<scalar_t, kMomentum><<<nblocks, kBlockThreads, 0, stream>>>(args, scalars);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void sgd_cuda_impl(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   double lr, const std::optional<at::Tensor>& lr_tensor, double momentum,
                   double dampening, double weight_decay, bool nesterov, bool maximize,
                   bool is_first_step, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  constexpr const char* kOp = "sgd_";
  const size_t n = params.size();
  cuda::check_same_lengths(kOp, {{"params", params}, {"grads", grads}});
  const bool use_momentum = momentum != 0.0;
  if (use_momentum) {
    TORCH_CHECK(momentum_buffers.size() == n, "fusedopt::sgd_: momentum=", momentum,
                " needs one momentum buffer per param, got ", momentum_buffers.size(), " for ", n,
                " params (allocate them, e.g. torch.empty_like(param), and pass "
                "is_first_step=True on the first step)");
  } else {
    TORCH_CHECK(momentum_buffers.empty(), "fusedopt::sgd_: momentum_buffers must be empty when "
                "momentum=0 (plain SGD keeps no buffers), got ", momentum_buffers.size(),
                " tensors");
  }
  if (n == 0) return;

  std::vector<cuda::NamedList> named = {{"params", params}, {"grads", grads}};
  if (use_momentum) named.push_back({"momentum_buffers", momentum_buffers});
  const c10::Device device = cuda::check_tensor_lists(kOp, named);
  std::vector<at::TensorList> lists;
  for (const auto& list : named) lists.push_back(list.tensors);

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const cuda::StepScalars step_scalars(kOp, lr, lr_tensor, grad_scale, found_inf, device);
  SgdScalars scalars{};
  scalars.ptrs = step_scalars.ptrs;
  scalars.lr = step_scalars.lr;
  scalars.momentum = momentum;
  scalars.dampening = dampening;
  scalars.weight_decay = weight_decay;
  scalars.nesterov = nesterov;
  scalars.maximize = maximize;
  scalars.is_first_step = is_first_step;

  for (const auto& group : cuda::group_by_dtype(params)) {
    const std::vector<size_t>& indices = group.second;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.first, "fusedopt::sgd_", [&] {
      if (use_momentum) {
        launch_sgd<scalar_t, true>(indices, lists, scalars, stream);
      } else {
        launch_sgd<scalar_t, false>(indices, lists, scalars, stream);
      }
    });
  }
}

void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              double lr, double momentum, double dampening, double weight_decay, bool nesterov,
              bool maximize, bool is_first_step, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  sgd_cuda_impl(params, grads, momentum_buffers, lr, std::nullopt, momentum, dampening,
                weight_decay, nesterov, maximize, is_first_step, grad_scale, found_inf);
}

void sgd_tensor_lr_cuda(at::TensorList params, at::TensorList grads,
                        at::TensorList momentum_buffers, const at::Tensor& lr, double momentum,
                        double dampening, double weight_decay, bool nesterov, bool maximize,
                        bool is_first_step, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  sgd_cuda_impl(params, grads, momentum_buffers, 0.0, lr, momentum, dampening, weight_decay,
                nesterov, maximize, is_first_step, grad_scale, found_inf);
}

}  // namespace
}  // namespace fusedopt

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("sgd_", &fusedopt::sgd_cuda);
  m.impl("sgd_.tensor_lr", &fusedopt::sgd_tensor_lr_cuda);
}
