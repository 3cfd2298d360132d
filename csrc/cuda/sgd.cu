// fusedopt::sgd_ on CUDA: one SGD step over many tensors in a few kernel launches.
//
// The math contract is fusedopt/reference.py:sgd; this file holds that math (SgdMath), the op's
// own checks and its registration, and launch_step (multi_tensor.cuh) the rest. Per element, in
// fp32 (fp64 for fp64 storage):
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
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "multi_tensor.cuh"

namespace fusedopt {
namespace {

// Lists: params, grads (and momentum_buffers with momentum).
struct SgdMath {
  static constexpr int kMinLists = 2, kMaxLists = 3;
  double momentum, dampening, weight_decay;
  bool nesterov, maximize, is_first_step;

  template <typename opmath_t, int kLists>
  struct Update {
    static constexpr bool kMomentum = kLists == kMaxLists;
    opmath_t lr, momentum, one_minus_dampening, weight_decay;
    bool decay, nesterov, maximize, is_first_step;

    __device__ Update(const SgdMath& s, const cuda::BlockScalars& block)
        : lr(static_cast<opmath_t>(block.lr)),
          momentum(static_cast<opmath_t>(s.momentum)),
          one_minus_dampening(static_cast<opmath_t>(1.0 - s.dampening)),
          weight_decay(static_cast<opmath_t>(s.weight_decay)),
          decay(s.weight_decay != 0.0),
          nesterov(s.nesterov),
          maximize(s.maximize),
          is_first_step(s.is_first_step) {}

    // Each product and sum rounds on its own (no FMA), as each op of the reference does.
    __device__ void operator()(opmath_t (&x)[kLists]) const {
      opmath_t& p = x[0];
      const opmath_t g = x[1];
      opmath_t d = maximize ? -g : g;
      if (decay) d = d + weight_decay * p;
      if constexpr (kMomentum) {
        opmath_t& buf = x[2];
        buf = is_first_step ? d : momentum * buf + one_minus_dampening * d;
        d = nesterov ? d + momentum * buf : buf;
      }
      p = p - lr * d;
    }
  };
};

// Both overloads: Lr is double (sgd_) or const at::Tensor& (sgd_.tensor_lr).
template <typename Lr>
void sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
              Lr lr, double momentum, double dampening, double weight_decay, bool nesterov,
              bool maximize, bool is_first_step, const std::optional<at::Tensor>& grad_scale,
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
  std::vector<cuda::NamedList> lists = {{"params", params}, {"grads", grads}};
  if (use_momentum) lists.push_back({"momentum_buffers", momentum_buffers});
  const SgdMath math{momentum, dampening, weight_decay, nesterov, maximize, is_first_step};
  // The buffers (list 2) are not read on the first step: they may hold anything (torch.empty).
  const unsigned unread_lists = is_first_step ? cuda::list_bit(2) : 0u;
  cuda::launch_step(kOp, lists, math, lr, grad_scale, found_inf, /*state_steps=*/{},
                    unread_lists);
}

}  // namespace
}  // namespace fusedopt

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("sgd_", &fusedopt::sgd_cuda<double>);
  m.impl("sgd_.tensor_lr", &fusedopt::sgd_cuda<const at::Tensor&>);
}
