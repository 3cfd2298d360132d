// CPU SGD step (momentum, dampening, Nesterov, weight decay) over many tensors in one parallel
// region. The math is fusedopt/reference.py::sgd; the op's contract is in csrc/fusedopt.cpp.
#include <torch/library.h>

#include "lean_step.h"
#include "multi_tensor.h"

namespace fusedopt::cpu {
namespace {

// Hyperparameters as the op receives them (double); the kernel rounds them to its compute type.
struct SgdHyper {
  double lr;
  double momentum;
  double dampening;
  double weight_decay;
  bool nesterov;
  bool maximize;
  GradUnscale unscale;
};

// The streams of one tensor, in the op's order.
constexpr int kMomentumBuffer = 2, kSgdStreams = 3;

// SGD's rule on one vector of each stream. kMomentum: there is a momentum buffer; kFirstStep: it
// is written only (buf = g), not read. Math in fp32 registers (fp64 for fp64 storage); each
// constant is formed as the reference forms it (in double from Python floats) and rounded to T
// once. Every product and sum rounds on its own, in the reference's order.
template <bool kMomentum, bool kFirstStep, typename Vec>
auto sgd_rule(const SgdHyper& h) {
  using T = typename Vec::value_type;
  const Vec lr(T(h.lr)), momentum(T(h.momentum)), one_minus_dampening(T(1.0 - h.dampening)),
      weight_decay(T(h.weight_decay)), sign_of_grad(T(h.maximize ? -1 : 1));
  const bool nesterov = h.nesterov;
  return [=](Vec& p, Vec g, Vec& buf) FUSEDOPT_INLINE_LAMBDA {
    g = g * sign_of_grad + weight_decay * p;
    if constexpr (kMomentum) {
      if constexpr (kFirstStep) {
        buf = g;
      } else {
        buf = momentum * buf + one_minus_dampening * g;
      }
      g = nesterov ? g + momentum * buf : buf;
    }
    p = p - lr * g;
  };
}

// SGD's rule after the first step for an 8-bit momentum buffer (its own error, ~1e-2, dwarfs the
// rounding order's), in the fewest multiplies, since the 8-bit step is bound by the multiply
// pipes: the buffer arrives and leaves in units of 1 - dampening (its codec's unit, set by
// sgd_lean_cpu), so that its update is one fma, buf momentum + g, and the step takes lr (1 -
// dampening) times it (Nesterov: g + momentum (1 - dampening) buf, one more fma). Needs
// dampening < 1. Maximize flips g's sign bit.
template <typename Vec>
auto sgd_rule_in_units(const SgdHyper& h) {
  using T = typename Vec::value_type;
  const double unit = 1.0 - h.dampening;
  const Vec lr(T(h.lr)), unit_lr(T(h.lr * unit)), momentum(T(h.momentum)),
      unit_momentum(T(h.momentum * unit)), weight_decay(T(h.weight_decay)),
      sign_bit(T(h.maximize ? -0.0 : 0.0));
  const bool decay = h.weight_decay != 0, nesterov = h.nesterov;
  return [=](Vec& p, Vec g, Vec& buf) FUSEDOPT_INLINE_LAMBDA {
    g = g ^ sign_bit;
    if (decay) g = at::vec::fmadd(weight_decay, p, g);
    buf = at::vec::fmadd(buf, momentum, g);
    p = nesterov ? lean::fnmadd(at::vec::fmadd(buf, unit_momentum, g), lr, p)
                 : lean::fnmadd(buf, unit_lr, p);
  };
}

template <bool kMomentum, bool kFirstStep, typename scalar_t>
void sgd_range(scalar_t* const* ptr, int64_t begin, int64_t end, const SgdHyper& h) {
  constexpr unsigned kBuffer = kMomentum ? kStreamMask<kMomentumBuffer> : 0u;
  constexpr unsigned kStored = kStreamMask<kParamStream> | kBuffer;
  constexpr unsigned kLoaded = kStored | kStreamMask<kGradStream>;
  for_each_step<kSgdStreams, kFirstStep ? kLoaded & ~kBuffer : kLoaded, kStored>(
      ptr, begin, end, h.unscale, sgd_rule<kMomentum, kFirstStep, ComputeVec<scalar_t>>(h));
}

// Both overloads of the op: lr_t is double (sgd_) or const at::Tensor& (sgd_.tensor_lr).
template <typename lr_t>
void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             lr_t lr, double momentum, double dampening, double weight_decay, bool nesterov,
             bool maximize, bool is_first_step, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf) {
  const LearningRate rate = learning_rate(lr, "sgd_");
  if (params.empty()) return;
  const bool has_momentum = momentum != 0.0;
  const at::ScalarType dtype = check_param_lists("sgd_", params, {{"grads", grads}});
  if (has_momentum) {
    check_like_params(params, momentum_buffers, "momentum_buffers");
  } else {
    TORCH_CHECK(momentum_buffers.empty(),
                "fusedopt.sgd_: momentum_buffers must be empty when momentum is 0");
  }
  if (skip_step(found_inf)) return;
  const SgdHyper h{rate.value, momentum, dampening, weight_decay, nesterov, maximize,
                   grad_unscale(grad_scale)};
  std::vector<at::TensorList> lists{params, grads};
  if (has_momentum) lists.push_back(momentum_buffers);
  for_each_chunk(dtype, lists, [&](auto* const* ptr, int64_t, int64_t begin, int64_t end) {
    if (!has_momentum) {
      sgd_range<false, false>(ptr, begin, end, h);
    } else if (is_first_step) {
      sgd_range<true, true>(ptr, begin, end, h);
    } else {
      sgd_range<true, false>(ptr, begin, end, h);
    }
  });
}

// sgd_lean_ (csrc/fusedopt.cpp): SGD's rule through lean_step.h's codecs. On a first step the
// buffer's codec still loads (zeros, as the Python side creates them), and the rule ignores it.
template <typename lr_t>
void sgd_lean_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  at::TensorList momentum_buffer_absmaxes, at::TensorList param_extras,
                  at::TensorList state_steps, lr_t lr_arg, double momentum, double dampening,
                  double weight_decay, bool nesterov, bool maximize, bool is_first_step,
                  c10::string_view param_mode, const std::optional<at::Tensor>& grad_scale,
                  const std::optional<at::Tensor>& found_inf) {
  const LearningRate lr = learning_rate(lr_arg, "sgd_lean_");
  if (params.empty()) return;
  const bool has_momentum = momentum != 0.0;
  lean::StateList buffers{"momentum_buffers", momentum_buffers, "momentum_buffer_absmaxes",
                          momentum_buffer_absmaxes};
  const lean::LeanSpec spec =
      has_momentum ? lean::check_lean_lists("sgd_lean_", params, grads,
                                            std::array<lean::StateList, 1>{buffers},
                                            param_extras, state_steps, param_mode)
                   : lean::check_lean_lists("sgd_lean_", params, grads,
                                            std::array<lean::StateList, 0>{}, param_extras,
                                            state_steps, param_mode);
  TORCH_CHECK(has_momentum || (momentum_buffers.empty() && momentum_buffer_absmaxes.empty()),
              "fusedopt.sgd_lean_: momentum_buffers must be empty when momentum is 0");
  if (skip_step(found_inf)) return;
  const std::vector<double> steps = lean::advance_lean_steps(state_steps);
  const SgdHyper h{lr.value, momentum, dampening, weight_decay, nesterov, maximize,
                   grad_unscale(grad_scale)};
  const bool in_units =
      spec.state_dtype == at::kByte && has_momentum && !is_first_step && dampening < 1.0;
  if (in_units) buffers.unit = static_cast<float>(1.0 - dampening);
  lean::dispatch_lean_dtypes(spec, [&](auto param_type, auto state_type) {
    using scalar_t = typename decltype(param_type)::type;
    using state_t = typename decltype(state_type)::type;
    const auto run = [&](auto rule) {
      lean::run_lean_chunks<scalar_t, state_t, true>(
          spec, params, grads, {buffers}, param_extras, steps, h.unscale,
          [&](int64_t) { return rule; });
    };
    if (!has_momentum) {
      // No buffer stream: the rule's is a scratch vector.
      const auto rule = sgd_rule<false, false, Vec>(h);
      lean::run_lean_chunks<scalar_t, float>(
          spec, params, grads, {}, param_extras, steps, h.unscale, [&](int64_t) {
            return [rule](Vec& p, Vec& g) FUSEDOPT_INLINE_LAMBDA {
              Vec unused;
              rule(p, g, unused);
            };
          });
    } else if (is_first_step) {
      run(sgd_rule<true, true, Vec>(h));
    } else {
      if constexpr (std::is_same_v<state_t, uint8_t>) {
        if (in_units) return run(sgd_rule_in_units<Vec>(h));
      }
      run(sgd_rule<true, false, Vec>(h));
    }
  });
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("sgd_", &fusedopt::cpu::sgd_cpu<double>);
  m.impl("sgd_.tensor_lr", &fusedopt::cpu::sgd_cpu<const at::Tensor&>);
  m.impl("sgd_lean_", &fusedopt::cpu::sgd_lean_cpu<double>);
  m.impl("sgd_lean_.tensor_lr", &fusedopt::cpu::sgd_lean_cpu<const at::Tensor&>);
}
