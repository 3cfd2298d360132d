// CPU Adam / AdamW step over many tensors in one parallel region. The math is
// fusedopt/reference.py::adam; the op's contract is in csrc/fusedopt.cpp.
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "multi_tensor.h"

namespace fusedopt::cpu {
namespace {

// Hyperparameters as the op receives them (double); each kernel rounds them to its compute type.
struct AdamHyper {
  double lr;
  double beta1;
  double beta2;
  double weight_decay;
  double eps;
  bool amsgrad;
  bool maximize;
  bool decoupled_weight_decay;
  bool unscale;           // a grad_scale was given
  double inv_grad_scale;
};

// Per-tensor scalars that depend on that tensor's own step.
struct AdamStepScalars {
  double step_size;                 // lr / (1 - beta1^step)
  double inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^step)
};

// ptr: param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq] of one tensor. Math in fp32 registers
// (fp64 for fp64 storage): every constant is rounded to T first, then combined in T.
template <bool kAmsgrad, typename scalar_t>
void adam_range(scalar_t* const* ptr, int64_t begin, int64_t end, const AdamHyper& h,
                const AdamStepScalars& s) {
  using Vec = ComputeVec<scalar_t>;
  using T = typename Vec::value_type;
  scalar_t* param = ptr[0];
  scalar_t* grad = ptr[1];
  scalar_t* exp_avg = ptr[2];
  scalar_t* exp_avg_sq = ptr[3];
  scalar_t* max_exp_avg_sq = kAmsgrad ? ptr[4] : nullptr;
  // Options become neutral constants instead of branches: maximize is a sign, Adam's coupled
  // weight decay a zero for AdamW, AdamW's decay factor a one for Adam.
  const bool decoupled = h.decoupled_weight_decay;
  const T lr = h.lr, beta1 = h.beta1, weight_decay = h.weight_decay;
  const Vec one_minus_beta1(T(1) - beta1), beta2(T(h.beta2)), one_minus_beta2(T(1) - T(h.beta2)),
      eps(T(h.eps)), step_size(T(s.step_size)), inv_bc2_sqrt(T(s.inv_bias_correction2_sqrt)),
      inv_grad_scale(T(h.inv_grad_scale)), sign(T(h.maximize ? -1 : 1)),
      coupled_weight_decay(decoupled ? T(0) : weight_decay),
      decay(decoupled ? T(1) - lr * weight_decay : T(1));

  auto update = [&](Vec& p, Vec g, Vec& m, Vec& v, Vec& v_max) {
    g = at::vec::fmadd(coupled_weight_decay, p, g * sign);
    p = p * decay;
    m = at::vec::fmadd(one_minus_beta1, g - m, m);  // lerp(m, g, 1 - beta1)
    v = at::vec::fmadd(one_minus_beta2, g * g, beta2 * v);
    Vec v_used = v;
    if constexpr (kAmsgrad) {
      v_max = at::vec::maximum(v_max, v);
      v_used = v_max;
    }
    const Vec denom = at::vec::fmadd(v_used.sqrt(), inv_bc2_sqrt, eps);
    p = p - step_size * m / denom;
  };

  // One pass: every stream is loaded once and stored once; the update runs in registers.
  auto step_at = [&](int64_t i, int64_t n) {
    Vec p0, p1, g0, g1, m0, m1, v0, v1, x0(T(0)), x1(T(0));
    load_float(param + i, n, p0, p1);
    load_float(grad + i, n, g0, g1);
    load_float(exp_avg + i, n, m0, m1);
    load_float(exp_avg_sq + i, n, v0, v1);
    if constexpr (kAmsgrad) load_float(max_exp_avg_sq + i, n, x0, x1);
    if (h.unscale) {
      g0 = g0 * inv_grad_scale;
      g1 = g1 * inv_grad_scale;
      store_float(grad + i, n, g0, g1);  // torch's fused step leaves unscaled grads behind
    }
    update(p0, g0, m0, v0, x0);
    update(p1, g1, m1, v1, x1);
    store_float(param + i, n, p0, p1);
    store_float(exp_avg + i, n, m0, m1);
    store_float(exp_avg_sq + i, n, v0, v1);
    if constexpr (kAmsgrad) store_float(max_exp_avg_sq + i, n, x0, x1);
  };
  for_each_vector<kVecStepOf<scalar_t>>(begin, end, [&](int64_t i) {
    prefetch_ahead<true>(param, i);
    prefetch_ahead<false>(grad, i);
    prefetch_ahead<true>(exp_avg, i);
    prefetch_ahead<true>(exp_avg_sq, i);
    if constexpr (kAmsgrad) prefetch_ahead<true>(max_exp_avg_sq, i);
  }, step_at);
}

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
              at::TensorList state_steps, double lr, double beta1, double beta2,
              double weight_decay, double eps, bool amsgrad, bool maximize,
              bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  const size_t count = params.size();
  if (count == 0) return;
  const at::ScalarType dtype = check_param_lists(
      "adam_", params, {{"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}});
  if (amsgrad) {
    check_like_params(params, max_exp_avg_sqs, "max_exp_avg_sqs");
  } else {
    TORCH_CHECK(max_exp_avg_sqs.empty(), "fusedopt.adam_: max_exp_avg_sqs given without amsgrad");
  }
  TORCH_CHECK(state_steps.size() == count, "fusedopt.adam_: expected ", count,
              " state_steps, got ", state_steps.size());
  for (size_t i = 0; i < count; ++i) {
    TORCH_CHECK(state_steps[i].device().is_cpu() && state_steps[i].numel() == 1,
                "fusedopt.adam_ (cpu): state_steps[", i, "] must be a 1-element CPU tensor");
  }
  if (skip_step(found_inf)) return;

  const AdamHyper h{lr, beta1, beta2, weight_decay, eps, amsgrad, maximize,
                    decoupled_weight_decay, grad_scale.has_value(), inv_grad_scale(grad_scale)};

  std::vector<AdamStepScalars> scalars(count);
  for (size_t i = 0; i < count; ++i) {
    const double step = read_scalar(state_steps[i]) + 1.0;
    write_scalar(state_steps[i], step);
    scalars[i] = {lr / (1.0 - std::pow(beta1, step)),
                  1.0 / std::sqrt(1.0 - std::pow(beta2, step))};
  }

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

void adam_cpu_tensor_lr(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                        at::TensorList state_steps, const at::Tensor& lr, double beta1,
                        double beta2, double weight_decay, double eps, bool amsgrad,
                        bool maximize, bool decoupled_weight_decay,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  adam_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, read_lr(lr, "adam_"),
           beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale,
           found_inf);
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("adam_", &fusedopt::cpu::adam_cpu);
  m.impl("adam_.tensor_lr", &fusedopt::cpu::adam_cpu_tensor_lr);
}
