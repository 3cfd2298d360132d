// CPU Adam / AdamW step over many tensors in one parallel region. The math is
// fusedopt/reference.py::adam; the op's contract is in csrc/fusedopt.cpp.
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "multi_tensor.h"

namespace fusedopt::cpu {
namespace {

struct AdamHyper {
  float lr;
  float beta1;
  float beta2;
  float weight_decay;
  float eps;
  bool amsgrad;
  bool maximize;
  bool decoupled_weight_decay;
  bool unscale;           // a grad_scale was given
  float inv_grad_scale;
};

// Per-tensor scalars that depend on that tensor's own step.
struct AdamStepScalars {
  float step_size;            // lr / (1 - beta1^step)
  float inv_bias_correction2_sqrt;  // 1 / sqrt(1 - beta2^step)
};

template <typename scalar_t>
struct AdamPointers {
  scalar_t* param;
  scalar_t* grad;
  scalar_t* exp_avg;
  scalar_t* exp_avg_sq;
  scalar_t* max_exp_avg_sq;  // nullptr unless amsgrad
};

template <typename scalar_t, bool kAmsgrad>
void adam_range(const AdamPointers<scalar_t>& ptr, int64_t begin, int64_t end, const AdamHyper& h,
                const AdamStepScalars& s) {
  // Options become neutral constants instead of branches: maximize is a sign, Adam's coupled
  // weight decay a zero for AdamW, AdamW's decay factor a one for Adam.
  const bool decoupled = h.decoupled_weight_decay;
  const Vec one_minus_beta1(1.f - h.beta1), beta2(h.beta2), one_minus_beta2(1.f - h.beta2),
      eps(h.eps), step_size(s.step_size), inv_bc2_sqrt(s.inv_bias_correction2_sqrt),
      inv_grad_scale(h.inv_grad_scale), sign(h.maximize ? -1.f : 1.f),
      coupled_weight_decay(decoupled ? 0.f : h.weight_decay),
      decay(decoupled ? 1.f - h.lr * h.weight_decay : 1.f);

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

  // One pass: every stream is loaded once and stored once; the update runs in fp32 registers.
  auto step_at = [&](int64_t i, int64_t n) {
    Vec p0, p1, g0, g1, m0, m1, v0, v1, x0(0.f), x1(0.f);
    load_float(ptr.param + i, n, p0, p1);
    load_float(ptr.grad + i, n, g0, g1);
    load_float(ptr.exp_avg + i, n, m0, m1);
    load_float(ptr.exp_avg_sq + i, n, v0, v1);
    if constexpr (kAmsgrad) load_float(ptr.max_exp_avg_sq + i, n, x0, x1);
    if (h.unscale) {
      g0 = g0 * inv_grad_scale;
      g1 = g1 * inv_grad_scale;
      store_float(ptr.grad + i, n, g0, g1);  // torch's fused step leaves unscaled grads behind
    }
    update(p0, g0, m0, v0, x0);
    update(p1, g1, m1, v1, x1);
    store_float(ptr.param + i, n, p0, p1);
    store_float(ptr.exp_avg + i, n, m0, m1);
    store_float(ptr.exp_avg_sq + i, n, v0, v1);
    if constexpr (kAmsgrad) store_float(ptr.max_exp_avg_sq + i, n, x0, x1);
  };
  int64_t i = begin;
  for (; i + kVecStep <= end; i += kVecStep) {
    prefetch_ahead<true>(ptr.param, i);
    prefetch_ahead<false>(ptr.grad, i);
    prefetch_ahead<true>(ptr.exp_avg, i);
    prefetch_ahead<true>(ptr.exp_avg_sq, i);
    if constexpr (kAmsgrad) prefetch_ahead<true>(ptr.max_exp_avg_sq, i);
    step_at(i, kVecStep);
  }
  if (i < end) step_at(i, end - i);
}

void adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
              at::TensorList state_steps, double lr, double beta1, double beta2,
              double weight_decay, double eps, bool amsgrad, bool maximize,
              bool decoupled_weight_decay, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  const size_t count = params.size();
  if (count == 0) return;
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fusedopt.adam_ (cpu): params must be float32, bfloat16 or float16, got ", dtype);
  for (size_t i = 0; i < count; ++i) {
    TORCH_CHECK(params[i].device().is_cpu() && params[i].scalar_type() == dtype,
                "fusedopt.adam_ (cpu): every param must be a CPU tensor of dtype ", dtype,
                "; param ", i, " is ", params[i].scalar_type(), " on ", params[i].device());
  }
  check_like_params(params, grads, "grads");
  check_like_params(params, exp_avgs, "exp_avgs");
  check_like_params(params, exp_avg_sqs, "exp_avg_sqs");
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
  if (found_inf.has_value() && read_scalar(*found_inf) != 0.0) return;  // GradScaler skip

  AdamHyper h{static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2),
              static_cast<float>(weight_decay), static_cast<float>(eps), amsgrad, maximize,
              decoupled_weight_decay, grad_scale.has_value(), 1.f};
  if (h.unscale) h.inv_grad_scale = static_cast<float>(1.0 / read_scalar(*grad_scale));

  std::vector<int64_t> numels(count);
  std::vector<AdamStepScalars> scalars(count);
  for (size_t i = 0; i < count; ++i) {
    numels[i] = params[i].numel();
    const double step = read_scalar(state_steps[i]) + 1.0;
    write_scalar(state_steps[i], step);
    scalars[i] = {static_cast<float>(lr / (1.0 - std::pow(beta1, step))),
                  static_cast<float>(1.0 / std::sqrt(1.0 - std::pow(beta2, step)))};
  }

  std::vector<at::TensorList> lists{params, grads, exp_avgs, exp_avg_sqs};
  if (amsgrad) lists.push_back(max_exp_avg_sqs);
  FlatLists flat(lists);
  FUSEDOPT_DISPATCH_PARAM_TYPES(dtype, "fusedopt_adam_cpu", [&] {
    std::vector<AdamPointers<scalar_t>> pointers(count);
    for (size_t i = 0; i < count; ++i) {
      pointers[i] = {flat[0][i].data_ptr<scalar_t>(), flat[1][i].data_ptr<scalar_t>(),
                     flat[2][i].data_ptr<scalar_t>(), flat[3][i].data_ptr<scalar_t>(),
                     amsgrad ? flat[4][i].data_ptr<scalar_t>() : nullptr};
    }
    parallel_for_chunks(numels, [&](const Chunk& c) {
      if (amsgrad) {
        adam_range<scalar_t, true>(pointers[c.tensor], c.begin, c.end, h, scalars[c.tensor]);
      } else {
        adam_range<scalar_t, false>(pointers[c.tensor], c.begin, c.end, h, scalars[c.tensor]);
      }
    });
  });
  flat.write_back();
}

void adam_cpu_tensor_lr(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                        at::TensorList state_steps, const at::Tensor& lr, double beta1,
                        double beta2, double weight_decay, double eps, bool amsgrad,
                        bool maximize, bool decoupled_weight_decay,
                        const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(lr.device().is_cpu() && lr.numel() == 1,
              "fusedopt.adam_ (cpu): a tensor lr must be a 1-element CPU tensor");
  adam_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, read_scalar(lr),
           beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale,
           found_inf);
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("adam_", &fusedopt::cpu::adam_cpu);
  m.impl("adam_.tensor_lr", &fusedopt::cpu::adam_cpu_tensor_lr);
}
