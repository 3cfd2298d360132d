// CPU Adam / AdamW step over many tensors in one parallel region. The math is
// fusedopt/reference.py::adam; the op's contract is in csrc/fusedopt.cpp.
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "lean_states.h"
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
// and the ~1e-4 of lean's hardware estimates): the same rule in the fewest vector ops, since the
// 8-bit step is compute-bound: fused multiply-adds, the square root and the division from
// lean::sqrt_estimate and divide_estimate.
template <bool kAmsgrad, typename Vec, bool kEstimate = false>
auto adam_rule(const AdamHyper& h, const AdamStepScalars& s) {
  using T = typename Vec::value_type;
  static_assert(!(kAmsgrad && kEstimate), "the 8-bit step has no amsgrad");
  // Options become neutral constants instead of branches: maximize is a sign, Adam's coupled
  // weight decay a zero for AdamW, AdamW's decay factor a one for Adam.
  const bool decoupled = h.decoupled_weight_decay;
  const T sign(h.maximize ? -1 : 1);
  const Vec one_minus_beta1(T(1.0 - h.beta1)), beta1(T(h.beta1)), beta2(T(h.beta2)),
      one_minus_beta2(T(1.0 - h.beta2)), eps(T(h.eps)), step_size(T(s.step_size)),
      inv_bc2_sqrt(T(s.inv_bias_correction2_sqrt)), signed_one_minus_beta1(sign * T(1.0 - h.beta1)),
      coupled_weight_decay(decoupled ? T(0) : T(h.weight_decay)),
      signed_coupled_weight_decay(decoupled ? T(0) : sign * T(h.weight_decay)),
      decay(decoupled ? decay_factor<T>(h.lr, h.weight_decay) : T(1));
  return [=](Vec& p, Vec g, Vec& m, Vec& v, Vec& v_max) FUSEDOPT_INLINE_LAMBDA {
    if constexpr (kEstimate) {
      // g + sign cwd p = sign (sign g + cwd p): the sign rides on (1 - beta1), and g * g drops it.
      g = at::vec::fmadd(signed_coupled_weight_decay, p, g);
      m = at::vec::fmadd(g, signed_one_minus_beta1, m * beta1);
      v = at::vec::fmadd(g, g * one_minus_beta2, v * beta2);
      const Vec denom = at::vec::fmadd(lean::sqrt_estimate(v), inv_bc2_sqrt, eps);
      p = at::vec::fnmadd(lean::divide_estimate(m, denom), step_size, p * decay);
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

template <typename T>
struct TypeTag {
  using type = T;
};

enum class ParamMode { kNearest, kMaster, kCompact, kKahan, kStochastic };

ParamMode parse_param_mode(c10::string_view mode) {
  if (mode == "nearest") return ParamMode::kNearest;
  if (mode == "master") return ParamMode::kMaster;
  if (mode == "compact") return ParamMode::kCompact;
  if (mode == "kahan") return ParamMode::kKahan;
  if (mode == "stochastic") return ParamMode::kStochastic;
  TORCH_CHECK(false, "fusedopt.adam_lean_: param_mode must be nearest, master, compact, kahan or "
              "stochastic, got ", mode);
}

// Checks that tensor i of `list` is a contiguous CPU tensor of `dtype` with param i's element
// count (per_block: its count of 8-bit blocks, one absmax each).
void check_list(at::TensorList params, at::TensorList list, const char* name,
                at::ScalarType dtype, bool per_block) {
  TORCH_CHECK(list.size() == params.size(), "fusedopt.adam_lean_: expected ", params.size(), " ",
              name, ", got ", list.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = per_block ? (params[i].numel() + lean::kQuantBlock - 1) /
                                          lean::kQuantBlock
                                    : params[i].numel();
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() &&
                    t.numel() == numel,
                "fusedopt.adam_lean_ (cpu): ", name, "[", i, "] must be a contiguous CPU ",
                dtype, " tensor of ", numel, " elements, got ", t.scalar_type(), " of ",
                t.numel(), " on ", t.device());
  }
}

// Runs the step on every chunk with the param codec make_param(tensor) and the states' codecs.
template <typename scalar_t, typename state_t, typename MakeParam>
void adam_lean_chunks(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList exp_avg_absmaxes,
                      at::TensorList exp_avg_sq_absmaxes, const AdamHyper& h,
                      const std::vector<AdamStepScalars>& scalars, const MakeParam& make_param) {
  std::vector<int64_t> numels(params.size());
  for (size_t i = 0; i < params.size(); ++i) numels[i] = params[i].numel();
  parallel_for_chunks(numels, [&](const Chunk& c) {
    auto rule = adam_rule<false, Vec, std::is_same_v<state_t, uint8_t>>(h, scalars[c.tensor]);
    auto update = [=](Vec& p, Vec& g, Vec& m, Vec& v) FUSEDOPT_INLINE_LAMBDA {
      Vec unused;
      rule(p, g, m, v, unused);
    };
    auto param = make_param(c.tensor);
    scalar_t* grad = grads[c.tensor].data_ptr<scalar_t>();
    if constexpr (std::is_same_v<state_t, uint8_t>) {
      lean::BlockwiseStream<true> m{exp_avgs[c.tensor].data_ptr<uint8_t>(),
                                    exp_avg_absmaxes[c.tensor].data_ptr<float>()};
      lean::BlockwiseStream<false> v{exp_avg_sqs[c.tensor].data_ptr<uint8_t>(),
                                     exp_avg_sq_absmaxes[c.tensor].data_ptr<float>()};
      lean::for_each_lean_step(c.begin, c.end, h.unscale, update, param, grad, m, v);
    } else {
      lean::PlainStream<state_t> m{exp_avgs[c.tensor].data_ptr<state_t>()};
      lean::PlainStream<state_t> v{exp_avg_sqs[c.tensor].data_ptr<state_t>()};
      lean::for_each_lean_step(c.begin, c.end, h.unscale, update, param, grad, m, v);
    }
  });
}

template <typename scalar_t, typename state_t>
void adam_lean_typed(ParamMode mode, at::TensorList params, at::TensorList grads,
                     at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList exp_avg_absmaxes, at::TensorList exp_avg_sq_absmaxes,
                     at::TensorList param_extras, const AdamHyper& h,
                     const std::vector<AdamStepScalars>& scalars) {
  const auto run = [&](const auto& make_param) {
    adam_lean_chunks<scalar_t, state_t>(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                                        exp_avg_sq_absmaxes, h, scalars, make_param);
  };
  const auto param_of = [&](int64_t t) { return params[t].data_ptr<scalar_t>(); };
  if (mode == ParamMode::kNearest) {
    return run([&](int64_t t) { return lean::PlainStream<scalar_t>{param_of(t)}; });
  }
  // The other modes keep bf16 / fp16 params (checked by the caller).
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (mode == ParamMode::kMaster) {
      return run([&](int64_t t) {
        return lean::MasterParam<scalar_t>{param_of(t), param_extras[t].data_ptr<float>()};
      });
    }
    if (mode == ParamMode::kKahan) {
      return run([&](int64_t t) {
        return lean::KahanParam<scalar_t>{param_of(t), param_extras[t].data_ptr<scalar_t>()};
      });
    }
  }
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (mode == ParamMode::kCompact) {
      return run([&](int64_t t) {
        return lean::CompactParam{param_of(t), param_extras[t].data_ptr<int8_t>()};
      });
    }
    return run([&](int64_t t) {
      return lean::StochasticParam{param_of(t), lean::stochastic_key(scalars[t].step, t)};
    });
  }
  TORCH_CHECK(false, "fusedopt.adam_lean_: param_mode compact and stochastic need bfloat16 "
              "params");
}

template <typename lr_t>
void adam_lean_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList exp_avg_absmaxes,
                   at::TensorList exp_avg_sq_absmaxes, at::TensorList param_extras,
                   at::TensorList state_steps, lr_t lr_arg, double beta1, double beta2,
                   double weight_decay, double eps, bool maximize, bool decoupled_weight_decay,
                   c10::string_view param_mode, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  const LearningRate lr = learning_rate(lr_arg, "adam_lean_");
  const ParamMode mode = parse_param_mode(param_mode);
  const size_t count = params.size();
  if (count == 0) return;
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fusedopt.adam_lean_ (cpu): params must be float32, bfloat16 or float16, got ",
              dtype);
  check_list(params, params, "params", dtype, false);
  check_list(params, grads, "grads", dtype, false);
  TORCH_CHECK(!exp_avgs.empty(), "fusedopt.adam_lean_: expected ", count, " exp_avgs, got 0");
  const at::ScalarType state_dtype = exp_avgs[0].scalar_type();
  TORCH_CHECK(state_dtype == at::kFloat || state_dtype == at::kBFloat16 ||
                  state_dtype == at::kHalf || state_dtype == at::kByte,
              "fusedopt.adam_lean_ (cpu): states must be float32, bfloat16, float16 or uint8, "
              "got ", state_dtype);
  check_list(params, exp_avgs, "exp_avgs", state_dtype, false);
  check_list(params, exp_avg_sqs, "exp_avg_sqs", state_dtype, false);
  const bool quantized = state_dtype == at::kByte;
  if (quantized) {
    check_list(params, exp_avg_absmaxes, "exp_avg_absmaxes", at::kFloat, true);
    check_list(params, exp_avg_sq_absmaxes, "exp_avg_sq_absmaxes", at::kFloat, true);
  } else {
    TORCH_CHECK(exp_avg_absmaxes.empty() && exp_avg_sq_absmaxes.empty(),
                "fusedopt.adam_lean_: absmaxes are given only with uint8 states");
  }
  TORCH_CHECK(mode == ParamMode::kNearest || dtype != at::kFloat,
              "fusedopt.adam_lean_: param_mode ", param_mode, " is for bfloat16 / float16 params");
  switch (mode) {
    case ParamMode::kMaster:
      check_list(params, param_extras, "param_extras", at::kFloat, false);
      break;
    case ParamMode::kCompact:
      check_list(params, param_extras, "param_extras", at::kChar, false);
      break;
    case ParamMode::kKahan:
      check_list(params, param_extras, "param_extras", dtype, false);
      break;
    default:
      TORCH_CHECK(param_extras.empty(), "fusedopt.adam_lean_: param_mode ", param_mode,
                  " takes no param_extras");
  }
  check_state_steps("adam_lean_", state_steps, count);
  if (skip_step(found_inf)) return;

  const AdamHyper h{lr, beta1, beta2, weight_decay, eps, false, maximize,
                    decoupled_weight_decay, grad_unscale(grad_scale)};
  const std::vector<AdamStepScalars> scalars = advance_steps(state_steps, lr, beta1, beta2);
  // The (param dtype, state dtype) pair, both checked above.
  const auto with_states = [&](auto param_type) {
    using scalar_t = typename decltype(param_type)::type;
    const auto run = [&](auto state_type) {
      adam_lean_typed<scalar_t, typename decltype(state_type)::type>(
          mode, params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes, exp_avg_sq_absmaxes,
          param_extras, h, scalars);
    };
    switch (state_dtype) {
      case at::kFloat: return run(TypeTag<float>{});
      case at::kBFloat16: return run(TypeTag<c10::BFloat16>{});
      case at::kHalf: return run(TypeTag<c10::Half>{});
      default: return run(TypeTag<uint8_t>{});
    }
  };
  switch (dtype) {
    case at::kFloat: return with_states(TypeTag<float>{});
    case at::kBFloat16: return with_states(TypeTag<c10::BFloat16>{});
    default: return with_states(TypeTag<c10::Half>{});
  }
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("adam_", &fusedopt::cpu::adam_cpu<double>);
  m.impl("adam_.tensor_lr", &fusedopt::cpu::adam_cpu<const at::Tensor&>);
  m.impl("adam_lean_", &fusedopt::cpu::adam_lean_cpu<double>);
  m.impl("adam_lean_.tensor_lr", &fusedopt::cpu::adam_lean_cpu<const at::Tensor&>);
}
