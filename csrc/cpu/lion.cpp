// CPU Lion step over many tensors in one parallel region. The math is
// fusedopt/reference.py::lion; the op's contract is in csrc/fusedopt.cpp.
#include <torch/library.h>

#include "lean_step.h"
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

// Lion's rule on one vector of each stream, in fp32 registers (fp64 for fp64 storage); each
// constant is formed as the reference forms it (in double from Python floats) and rounded to T
// once. Every product and sum rounds on its own, in the reference's order, so that the sign taken
// is the reference's. Two of its multiplies become exact equivalents: maximize's sign rides on
// the (1 - beta) factors ((-k) * g is exactly k * (-g)), and lr * sign(c) is lr masked by c's
// comparisons.
template <typename Vec>
auto lion_rule(const LionHyper& h) {
  using T = typename Vec::value_type;
  const T sign_of_grad(h.maximize ? -1 : 1);
  const Vec beta1(T(h.beta1)), beta2(T(h.beta2)), lr(T(h.lr.value)),
      signed_one_minus_beta1(sign_of_grad * T(1.0 - h.beta1)),
      signed_one_minus_beta2(sign_of_grad * T(1.0 - h.beta2)),
      decay(decay_factor<T>(h.lr, h.weight_decay)), zero(T(0));
  return [=](Vec& p, const Vec& g, Vec& m) FUSEDOPT_INLINE_LAMBDA {
    const Vec c = beta1 * m + signed_one_minus_beta1 * g;
    // lr * sign(c) with sign(0) = 0, as torch.sign: comparisons give all-ones masks.
    const Vec lr_signed = ((c > zero) & lr) - ((c < zero) & lr);
    p = p * decay - lr_signed;
    m = beta2 * m + signed_one_minus_beta2 * g;
  };
}

// Lion's rule for 8-bit momentum (its own error, ~1e-2, dwarfs the rounding order's), in the
// fewest multiplies, since the 8-bit step is bound by the multiply pipes: m arrives and leaves in
// units of 1 - beta2 (its codec's unit, set by lion_lean_cpu), so that with k = beta1 (1 - beta2)
// / (1 - beta1) >= 0, c = beta1 m + (1 - beta1) g has the sign of m k + g, and the new m is
// beta2 m + g: an fma each, where the reference's order takes two multiplies and an add. Needs
// beta1 < 1 and beta2 < 1. Maximize flips g's sign bit.
template <typename Vec>
auto lion_rule_in_units(const LionHyper& h) {
  using T = typename Vec::value_type;
  const Vec k(T(h.beta1 * (1.0 - h.beta2) / (1.0 - h.beta1))), beta2(T(h.beta2)),
      lr(T(h.lr.value)), decay(decay_factor<T>(h.lr, h.weight_decay)), zero(T(0)),
      sign_bit(T(h.maximize ? -0.0 : 0.0));
  return [=](Vec& p, const Vec& g, Vec& m) FUSEDOPT_INLINE_LAMBDA {
    const Vec signed_g = g ^ sign_bit;
    const Vec c = at::vec::fmadd(m, k, signed_g);
    const Vec lr_signed = ((c > zero) & lr) - ((c < zero) & lr);
    p = p * decay - lr_signed;
    m = at::vec::fmadd(m, beta2, signed_g);
  };
}

template <typename scalar_t>
void lion_range(scalar_t* const* ptr, int64_t begin, int64_t end, const LionHyper& h) {
  constexpr unsigned kStates = kStreamMask<kParamStream, kExpAvg>;
  for_each_step<kLionStreams, kStates | kStreamMask<kGradStream>, kStates>(
      ptr, begin, end, h.unscale, lion_rule<ComputeVec<scalar_t>>(h));
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

// lion_lean_ (csrc/fusedopt.cpp): Lion's rule through lean_step.h's codecs.
template <typename lr_t>
void lion_lean_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_absmaxes, at::TensorList param_extras,
                   at::TensorList state_steps, lr_t lr_arg, double beta1, double beta2,
                   double weight_decay, bool maximize, c10::string_view param_mode,
                   const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  const LearningRate lr = learning_rate(lr_arg, "lion_lean_");
  if (params.empty()) return;
  std::array<lean::StateList, 1> states{
      lean::StateList{"exp_avgs", exp_avgs, "exp_avg_absmaxes", exp_avg_absmaxes}};
  const lean::LeanSpec spec = lean::check_lean_lists("lion_lean_", params, grads, states,
                                                     param_extras, state_steps, param_mode);
  if (skip_step(found_inf)) return;
  const std::vector<double> steps = lean::advance_lean_steps(state_steps);
  const LionHyper h{lr, beta1, beta2, weight_decay, maximize, grad_unscale(grad_scale)};
  const bool in_units = spec.state_dtype == at::kByte && beta1 < 1.0 && beta2 < 1.0;
  if (in_units) states[0].unit = static_cast<float>(1.0 - beta2);
  lean::dispatch_lean_dtypes(spec, [&](auto param_type, auto state_type) {
    using scalar_t = typename decltype(param_type)::type;
    using state_t = typename decltype(state_type)::type;
    const auto run = [&](const auto& rule) {
      lean::run_lean_chunks<scalar_t, state_t, true>(spec, params, grads, states, param_extras,
                                                     steps, h.unscale,
                                                     [&](int64_t) { return rule; });
    };
    if constexpr (std::is_same_v<state_t, uint8_t>) {
      if (in_units) return run(lion_rule_in_units<Vec>(h));
    }
    run(lion_rule<Vec>(h));
  });
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("lion_", &fusedopt::cpu::lion_cpu<double>);
  m.impl("lion_.tensor_lr", &fusedopt::cpu::lion_cpu<const at::Tensor&>);
  m.impl("lion_lean_", &fusedopt::cpu::lion_lean_cpu<double>);
  m.impl("lion_lean_.tensor_lr", &fusedopt::cpu::lion_lean_cpu<const at::Tensor&>);
}
