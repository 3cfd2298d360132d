// fusedopt::adam_ on CUDA: one Adam / AdamW step over many tensors in a few kernel launches.
//
// The math contract is fusedopt/reference.py:adam. This file holds that math (AdamMath), the
// op's own checks and its registration; the step kernel and its launches, the step counters, the
// device scalars and the checks every op shares are multi_tensor.cuh's (launch_step).
//
// Nothing here reads a device value on the host: lr (tensor_lr overload), grad_scale, found_inf
// and the step counters are all read by the kernels, so the op is safe to capture in a CUDA graph.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "multi_tensor.cuh"

namespace fusedopt {
namespace {

// Lists: params, grads, exp_avgs, exp_avg_sqs (and max_exp_avg_sqs with amsgrad). Each tensor
// also has a step counter, which the driver advances after the update.
struct AdamMath {
  static constexpr int kMinLists = 4, kMaxLists = 5;
  static constexpr bool kCountsSteps = true;
  double beta1, beta2, weight_decay, eps;
  bool maximize, decoupled_weight_decay;

  template <typename opmath_t, int kLists>
  struct Update {
    static constexpr bool kAmsgrad = kLists == kMaxLists;
    opmath_t step_size, bias_correction2_sqrt, decay, weight_decay, lerp_weight, beta2,
        one_minus_beta2, eps;
    bool maximize, decoupled_weight_decay;

    // Per-tensor scalars from this tensor's own step (block.step counts this call), in fp64 like
    // the reference, rounded once.
    __device__ Update(const AdamMath& s, const cuda::BlockScalars& block)
        : step_size(static_cast<opmath_t>(block.lr / (1.0 - pow(s.beta1, block.step)))),
          bias_correction2_sqrt(static_cast<opmath_t>(sqrt(1.0 - pow(s.beta2, block.step)))),
          decay(static_cast<opmath_t>(1.0 - block.lr * s.weight_decay)),  // AdamW only
          weight_decay(static_cast<opmath_t>(s.weight_decay)),
          lerp_weight(static_cast<opmath_t>(1.0 - s.beta1)),
          beta2(static_cast<opmath_t>(s.beta2)),
          one_minus_beta2(static_cast<opmath_t>(1.0 - s.beta2)),
          eps(static_cast<opmath_t>(s.eps)),
          maximize(s.maximize),
          decoupled_weight_decay(s.decoupled_weight_decay) {}

    __device__ void operator()(opmath_t (&x)[kLists]) const {
      opmath_t& p = x[0];
      const opmath_t g = x[1];
      opmath_t& m = x[2];
      opmath_t& v = x[3];
      opmath_t d = maximize ? -g : g;
      if (weight_decay != opmath_t(0)) {
        if (decoupled_weight_decay) {
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
    }
  };
};

// Both overloads: Lr is double (adam_) or const at::Tensor& (adam_.tensor_lr).
template <typename Lr>
void adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
               at::TensorList state_steps, Lr lr, double beta1, double beta2,
               double weight_decay, double eps, bool amsgrad, bool maximize,
               bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
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
  std::vector<cuda::NamedList> lists = {
      {"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  if (amsgrad) lists.push_back({"max_exp_avg_sqs", max_exp_avg_sqs});
  const AdamMath math{beta1, beta2, weight_decay, eps, maximize, decoupled_weight_decay};
  cuda::launch_step(kOp, lists, math, lr, grad_scale, found_inf, state_steps);
}

}  // namespace
}  // namespace fusedopt

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("adam_", &fusedopt::adam_cuda<double>);
  m.impl("adam_.tensor_lr", &fusedopt::adam_cuda<const at::Tensor&>);
}
