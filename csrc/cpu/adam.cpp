// CPU Adam / AdamW step over many tensors in one parallel region. The math is
// fusedopt/reference.py::adam; the op's contract is in csrc/fusedopt.cpp.
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>

#include "lean_step.h"
#include "multi_tensor.h"

namespace fusedopt::cpu {
namespace {

// Hyperparameters as the op receives them (double); each kernel rounds them to its compute type.
struct AdamHyper {
  LearningRate lr;
  double beta1;
  double beta2;
  double weight_decay;
  double eps;
  bool amsgrad;
  bool maximize;
  bool decoupled_weight_decay;
  GradUnscale unscale;
};

// Per-tensor scalars that depend on that tensor's own step.
struct AdamStepScalars {
  double step_size;                 // lr / (1 - beta1^step)
  double inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^step)
  double step;                       // the new step
};

// The streams of one tensor, in the op's order.
constexpr int kExpAvg = 2, kExpAvgSq = 3, kMaxExpAvgSq = 4, kAdamStreams = 5;

// Adam's rule on one vector of each stream, in fp32 registers (fp64 for fp64 storage): each
// constant is formed in double as the reference forms it (Python floats) and rounded to T once.
// Every product and sum rounds on its own, in the reference's order. v_max is read and written
// only with kAmsgrad. kEstimate (8-bit states, whose own error, ~1e-2, dwarfs the rounding order's
// and the ~1e-4 of lean's hardware estimates): the same rule in the fewest multiplies, since the
// 8-bit step is bound by the multiply pipes: fused multiply-adds, the square root and the
// reciprocal from lean::sqrt_estimate and reciprocal_estimate, and exp_avg and exp_avg_sq in
// units of 1 - beta1 and 1 - beta2, already multiplied by beta1 and beta2 (their codecs' unit
// and decode_factor, set by adam_lean_cpu), so that m takes g with an add and v g * g with one
// fma. In units, values are 1 / (1 - beta) times larger: with the default betas m overflows fp32
// past 3e37 and v past 3e35 (|g| 6e17) instead of 3e38.
template <bool kAmsgrad, typename Vec, bool kEstimate = false>
auto adam_rule(const AdamHyper& h, const AdamStepScalars& s) {
  using T = typename Vec::value_type;
  static_assert(!(kAmsgrad && kEstimate), "the 8-bit step has no amsgrad");
  // Options become neutral constants instead of branches: maximize is a sign, Adam's coupled
  // weight decay a zero for AdamW, AdamW's decay factor a one for Adam.
  const bool decoupled = h.decoupled_weight_decay;
  const bool coupled = !decoupled && h.weight_decay != 0;
  const T sign(h.maximize ? -1 : 1);
  const Vec one_minus_beta1(T(1.0 - h.beta1)), beta1(T(h.beta1)), beta2(T(h.beta2)),
      one_minus_beta2(T(1.0 - h.beta2)), eps(T(h.eps)), step_size(T(s.step_size)),
      inv_bc2_sqrt(T(s.inv_bias_correction2_sqrt)),
      coupled_weight_decay(decoupled ? T(0) : T(h.weight_decay)),
      signed_coupled_weight_decay(decoupled ? T(0) : sign * T(h.weight_decay)),
      decay(decoupled ? decay_factor<T>(h.lr, h.weight_decay) : T(1));
  // kEstimate: step_size m / (sqrt(v) inv_bc2 + eps) with m and v in their units is m / denom,
  // denom = sqrt(v) * sqrt_factor + unit_eps: one reciprocal and no multiply by step_size. Where
  // the factors overflow (lr 0, or within ~1e-30 of it) the update is 0 (denom inf), not NaN.
  Vec sqrt_factor_vec(T(0)), unit_eps_vec(T(0)), sign_bit(T(0));  // set for kEstimate only
  if constexpr (kEstimate) {
    const double unit_step = s.step_size * (1.0 - h.beta1);
    T sqrt_factor = T(s.inv_bias_correction2_sqrt * std::sqrt(1.0 - h.beta2) / unit_step);
    T unit_eps = T(h.eps / unit_step);
    if (!std::isfinite(sqrt_factor) || !std::isfinite(unit_eps)) {
      sqrt_factor = T(0);
      unit_eps = std::numeric_limits<T>::infinity();
    }
    sqrt_factor_vec = Vec(sqrt_factor);
    unit_eps_vec = Vec(unit_eps);
    sign_bit = Vec(T(h.maximize ? -0.0 : 0.0));
  }
  return [=](Vec& p, Vec g, Vec& m, Vec& v, Vec& v_max) FUSEDOPT_INLINE_LAMBDA {
    if constexpr (kEstimate) {
      // g + sign cwd p = sign (sign g + cwd p): the sign flips m's increment (a bit, on no
      // multiply pipe), and g * g drops it.
      if (coupled) g = at::vec::fmadd(signed_coupled_weight_decay, p, g);
      m = m + (g ^ sign_bit);
      v = at::vec::fmadd(g, g, v);
      const Vec denom = at::vec::fmadd(lean::sqrt_estimate(v), sqrt_factor_vec, unit_eps_vec);
      p = lean::fnmadd(m, lean::reciprocal_estimate(denom), p * decay);
      return;
    }
    g = g * Vec(sign) + coupled_weight_decay * p;
    p = p * decay;
    // lerp(m, g, 1 - beta1), unfused; torch's CPU lerp is one fma (up to 1 ulp apart).
    m = m + one_minus_beta1 * (g - m);
    v = v * beta2 + one_minus_beta2 * g * g;
    Vec v_used = v;
    if constexpr (kAmsgrad) {
      v_max = at::vec::maximum(v_max, v);
      v_used = v_max;
    }
    // The reference divides by sqrt(1 - beta2^step); one divide per step is enough here.
    const Vec denom = v_used.sqrt() * inv_bc2_sqrt + eps;
    p = p - step_size * m / denom;
  };
}

template <bool kAmsgrad, typename scalar_t>
void adam_range(scalar_t* const* ptr, int64_t begin, int64_t end, const AdamHyper& h,
                const AdamStepScalars& s) {
  constexpr unsigned kStates = kStreamMask<kParamStream, kExpAvg, kExpAvgSq> |
                               (kAmsgrad ? kStreamMask<kMaxExpAvgSq> : 0u);
  for_each_step<kAdamStreams, kStates | kStreamMask<kGradStream>, kStates>(
      ptr, begin, end, h.unscale, adam_rule<kAmsgrad, ComputeVec<scalar_t>>(h, s));
}

// Advances every state_steps[i] by one; returns each tensor's scalars at its new step.
std::vector<AdamStepScalars> advance_steps(at::TensorList state_steps, const LearningRate& lr,
                                           double beta1, double beta2) {
  std::vector<AdamStepScalars> scalars(state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const double step = read_scalar(state_steps[i]) + 1.0;
    write_scalar(state_steps[i], step);
    scalars[i] = {lr.value / (1.0 - std::pow(beta1, step)),
                  1.0 / std::sqrt(1.0 - std::pow(beta2, step)), step};
  }
  return scalars;
}

void check_state_steps(const char* op, at::TensorList state_steps, size_t count) {
  TORCH_CHECK(state_steps.size() == count, "fusedopt.", op, ": expected ", count,
              " state_steps, got ", state_steps.size());
  for (size_t i = 0; i < count; ++i) {
    TORCH_CHECK(state_steps[i].device().is_cpu() && state_steps[i].numel() == 1, "fusedopt.", op,
                " (cpu): state_steps[", i, "] must be a 1-element CPU tensor");
  }
}

// Both overloads of the op: lr_t is double (adam_) or const at::Tensor& (adam_.tensor_lr).
template <typename lr_t>
void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
              at::TensorList state_steps, lr_t lr_arg, double beta1, double beta2,
              double weight_decay, double eps, bool amsgrad, bool maximize,
              bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  const LearningRate lr = learning_rate(lr_arg, "adam_");
  const size_t count = params.size();
  if (count == 0) return;
  const at::ScalarType dtype = check_param_lists(
      "adam_", params, {{"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}});
  if (amsgrad) {
    check_like_params(params, max_exp_avg_sqs, "max_exp_avg_sqs");
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), "fusedopt.adam_: max_exp_avg_sqs given without amsgrad");
  }
  check_state_steps("adam_", state_steps, count);
  if (skip_step(found_inf)) return;

  const AdamHyper h{lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
                    decoupled_weight_decay, grad_unscale(grad_scale)};

  const std::vector<AdamStepScalars> scalars = advance_steps(state_steps, lr, beta1, beta2);

  std::vector<at::TensorList> lists{params, grads, exp_avgs, exp_avg_sqs};
  if (amsgrad) lists.push_back(max_exp_avg_sqs);
  for_each_chunk(dtype, lists, [&](auto* const* ptr, int64_t tensor, int64_t begin, int64_t end) {
    if (amsgrad) {
      adam_range<true>(ptr, begin, end, h, scalars[tensor]);
    } else {
      adam_range<false>(ptr, begin, end, h, scalars[tensor]);
    }
  });
}


// ---------------------------------------------------------------------------------------------
// adam_lean_: Adam / AdamW without amsgrad, with lean states (csrc/fusedopt.cpp; the formats are
// fusedopt/reference.py's "Lean states", and lean_states.h's codecs).

template <typename lr_t>
void adam_lean_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList exp_avg_absmaxes,
                   at::TensorList exp_avg_sq_absmaxes, at::TensorList param_extras,
                   at::TensorList state_steps, lr_t lr_arg, double beta1, double beta2,
                   double weight_decay, double eps, bool maximize, bool decoupled_weight_decay,
                   c10::string_view param_mode, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  const LearningRate lr = learning_rate(lr_arg, "adam_lean_");
  if (params.empty()) return;
  std::array<lean::StateList, 2> states{
      lean::StateList{"exp_avgs", exp_avgs, "exp_avg_absmaxes", exp_avg_absmaxes},
      lean::StateList{"exp_avg_sqs", exp_avg_sqs, "exp_avg_sq_absmaxes", exp_avg_sq_absmaxes}};
  const lean::LeanSpec spec = lean::check_lean_lists("adam_lean_", params, grads, states,
                                                     param_extras, state_steps, param_mode);
  if (skip_step(found_inf)) return;
  if (spec.state_dtype == at::kByte) {  // adam_rule's 8-bit rule takes m and v in these units
    TORCH_CHECK(beta1 < 1.0 && beta2 < 1.0, "fusedopt.adam_lean_: 8-bit states need betas below "
                "1, got (", beta1, ", ", beta2, ")");
    states[0].unit = static_cast<float>(1.0 - beta1);
    states[0].decode_factor = static_cast<float>(beta1);
    states[1].unit = static_cast<float>(1.0 - beta2);
    states[1].decode_factor = static_cast<float>(beta2);
  }

  const AdamHyper h{lr, beta1, beta2, weight_decay, eps, false, maximize,
                    decoupled_weight_decay, grad_unscale(grad_scale)};
  const std::vector<AdamStepScalars> scalars = advance_steps(state_steps, lr, beta1, beta2);
  std::vector<double> steps(scalars.size());
  for (size_t i = 0; i < scalars.size(); ++i) steps[i] = scalars[i].step;
  lean::dispatch_lean_dtypes(spec, [&](auto param_type, auto state_type) {
    using scalar_t = typename decltype(param_type)::type;
    using state_t = typename decltype(state_type)::type;
    const auto make_update = [&](int64_t t) {
      auto rule = adam_rule<false, Vec, std::is_same_v<state_t, uint8_t>>(h, scalars[t]);
      return [=](Vec& p, Vec& g, Vec& m, Vec& v) FUSEDOPT_INLINE_LAMBDA {
        Vec unused;
        rule(p, g, m, v, unused);
      };
    };
    // exp_avg's 8-bit code is signed, exp_avg_sq's not.
    lean::run_lean_chunks<scalar_t, state_t, true, false>(spec, params, grads, states,
                                                          param_extras, steps, h.unscale,
                                                          make_update);
  });
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("adam_", &fusedopt::cpu::adam_cpu<double>);
  m.impl("adam_.tensor_lr", &fusedopt::cpu::adam_cpu<const at::Tensor&>);
  m.impl("adam_lean_", &fusedopt::cpu::adam_lean_cpu<double>);
  m.impl("adam_lean_.tensor_lr", &fusedopt::cpu::adam_lean_cpu<const at::Tensor&>);
}
