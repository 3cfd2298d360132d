// fusedopt::lion_ on CUDA: one Lion step over many tensors in a few kernel launches.
//
// The math contract is fusedopt/reference.py:lion; this file holds that math (LionMath), the op's
// own checks and its registration, and launch_step (multi_tensor.cuh) the rest. Per element, in
// fp32 (fp64 for fp64 storage):
//
//   g = grad / grad_scale            (written back to grad when grad_scale is given)
//   g = -g if maximize
//   param = param * (1 - lr * weight_decay) - lr * sign(beta1 * exp_avg + (1 - beta1) * g)
//   exp_avg = beta2 * exp_avg + (1 - beta2) * g
//
// with sign(0) = 0 (and sign(nan) = 0, as torch.sign computes it). A non-zero found_inf changes
// nothing. lr, grad_scale and found_inf on the device are read only by the kernel, so the op never
// syncs and can be captured in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "multi_tensor.cuh"

namespace fusedopt {
namespace {

// Lists: params, grads, exp_avgs.
struct LionMath {
  static constexpr int kMinLists = 3, kMaxLists = 3;
  double beta1, beta2, weight_decay;
  bool maximize;

  template <typename opmath_t, int kLists>
  struct Update {
    opmath_t lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2;
    bool maximize;

    // Scalars as the reference's torch ops see them: Python floats combined in fp64, then rounded
    // once to the compute dtype; 1 - lr * weight_decay in lr's own dtype (float32 for an lr
    // tensor).
    __device__ Update(const LionMath& s, const cuda::BlockScalars& block)
        : lr(static_cast<opmath_t>(block.lr)),
          decay(block.lr_single
                    ? static_cast<opmath_t>(1.f - static_cast<float>(block.lr) *
                                                      static_cast<float>(s.weight_decay))
                    : static_cast<opmath_t>(1.0 - block.lr * s.weight_decay)),
          beta1(static_cast<opmath_t>(s.beta1)),
          one_minus_beta1(static_cast<opmath_t>(1.0 - s.beta1)),
          beta2(static_cast<opmath_t>(s.beta2)),
          one_minus_beta2(static_cast<opmath_t>(1.0 - s.beta2)),
          maximize(s.maximize) {}

    // Every product and sum rounds on its own (no FMA), so the sign is taken of the very sum the
    // reference computes.
    __device__ void operator()(opmath_t (&x)[kLists]) const {
      opmath_t& p = x[0];
      const opmath_t g = x[1];
      opmath_t& m = x[2];
      const opmath_t d = maximize ? -g : g;
      const opmath_t c = beta1 * m + one_minus_beta1 * d;
      // sign(c): +1, -1, or 0 for zero and nan (torch.sign's (0 < c) - (c < 0)).
      const opmath_t sign = static_cast<opmath_t>(static_cast<int>(opmath_t(0) < c) -
                                                  static_cast<int>(c < opmath_t(0)));
      p = p * decay - lr * sign;
      m = beta2 * m + one_minus_beta2 * d;
    }
  };
};

// Both overloads: Lr is double (lion_) or const at::Tensor& (lion_.tensor_lr).
template <typename Lr>
void lion_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, Lr lr,
               double beta1, double beta2, double weight_decay, bool maximize,
               const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  constexpr const char* kOp = "lion_";
  const std::vector<cuda::NamedList> lists = {
      {"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}};
  cuda::check_same_lengths(kOp, lists);
  const LionMath math{beta1, beta2, weight_decay, maximize};
  cuda::launch_step(kOp, lists, math, lr, grad_scale, found_inf);
}

}  // namespace
}  // namespace fusedopt

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("lion_", &fusedopt::lion_cuda<double>);
  m.impl("lion_.tensor_lr", &fusedopt::lion_cuda<const at::Tensor&>);
}
