// CPU Lion step over many tensors in one parallel region. The math is
// fusedopt/reference.py::lion; the op's contract is in csrc/fusedopt.cpp.
#include <torch/library.h>

#include "multi_tensor.h"

namespace fusedopt::cpu {
namespace {

// Hyperparameters as the op receives them (double); the kernel rounds them to its compute type.
struct LionHyper {
  LearningRate lr;
  double beta1;
  double beta2;
  double weight_decay;
  bool maximize;
  GradUnscale unscale;
};

// The streams of one tensor, in the op's order.
constexpr int kExpAvg = 2, kLionStreams = 3;

// Math in fp32 registers (fp64 for fp64 storage); each constant is formed as the reference forms
// it (in double from Python floats) and rounded to T once. Every product and sum rounds on its
// own, in the reference's order, so that the sign taken is the reference's.
template <typename scalar_t>
void lion_range(scalar_t* const* ptr, int64_t begin, int64_t end, const LionHyper& h) {
  using Vec = ComputeVec<scalar_t>;
  using T = typename Vec::value_type;
  const Vec beta1(T(h.beta1)), one_minus_beta1(T(1.0 - h.beta1)), beta2(T(h.beta2)),
      one_minus_beta2(T(1.0 - h.beta2)), lr(T(h.lr.value)),
      decay(decay_factor<T>(h.lr, h.weight_decay)), sign_of_grad(T(h.maximize ? -1 : 1)),
      zero(T(0)), one(T(1));

  constexpr unsigned kStates = kStreamMask<kParamStream, kExpAvg>;
  for_each_step<kLionStreams, kStates | kStreamMask<kGradStream>, kStates>(
      ptr, begin, end, h.unscale, [=](Vec& p, Vec g, Vec& m) {
        g = g * sign_of_grad;
        const Vec c = beta1 * m + one_minus_beta1 * g;
        // sign(c) with sign(0) = 0, as torch.sign: comparisons give all-ones masks.
        const Vec sign = ((c > zero) & one) - ((c < zero) & one);
        p = p * decay - lr * sign;
        m = beta2 * m + one_minus_beta2 * g;
      });
}

// Both overloads of the op: lr_t is double (lion_) or const at::Tensor& (lion_.tensor_lr).
template <typename lr_t>
void lion_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, lr_t lr_arg,
              double beta1, double beta2, double weight_decay, bool maximize,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  const LearningRate lr = learning_rate(lr_arg, "lion_");
  if (params.empty()) return;
  const at::ScalarType dtype =
      check_param_lists("lion_", params, {{"grads", grads}, {"exp_avgs", exp_avgs}});
  if (skip_step(found_inf)) return;
  const LionHyper h{lr, beta1, beta2, weight_decay, maximize, grad_unscale(grad_scale)};
  for_each_chunk(dtype, {params, grads, exp_avgs},
                 [&](auto* const* ptr, int64_t, int64_t begin, int64_t end) {
                   lion_range(ptr, begin, end, h);
                 });
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("lion_", &fusedopt::cpu::lion_cpu<double>);
  m.impl("lion_.tensor_lr", &fusedopt::cpu::lion_cpu<const at::Tensor&>);
}
