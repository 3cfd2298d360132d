// CPU Lion step over many tensors in one parallel region. The math is
// fusedopt/reference.py::lion; the op's contract is in csrc/fusedopt.cpp.
#include <torch/library.h>

#include "multi_tensor.h"

namespace fusedopt::cpu {
namespace {

// Hyperparameters as the op receives them (double); the kernel rounds them to its compute type.
struct LionHyper {
  double lr;
  double beta1;
  double beta2;
  double weight_decay;
  bool maximize;
  bool unscale;  // a grad_scale was given
  double inv_grad_scale;
};

// ptr: param, grad, exp_avg of one tensor. Math in fp32 registers (fp64 for fp64 storage): every
// constant is rounded to T first, then combined in T.
template <typename scalar_t>
void lion_range(scalar_t* const* ptr, int64_t begin, int64_t end, const LionHyper& h) {
  using Vec = ComputeVec<scalar_t>;
  using T = typename Vec::value_type;
  scalar_t* param = ptr[0];
  scalar_t* grad = ptr[1];
  scalar_t* exp_avg = ptr[2];
  const T lr_t = h.lr, beta1_t = h.beta1, beta2_t = h.beta2, weight_decay = h.weight_decay;
  const Vec beta1(beta1_t), one_minus_beta1(T(1) - beta1_t), beta2(beta2_t),
      one_minus_beta2(T(1) - beta2_t), lr(lr_t), decay(T(1) - lr_t * weight_decay),
      inv_grad_scale(T(h.inv_grad_scale)), sign_of_grad(T(h.maximize ? -1 : 1)), zero(T(0)),
      one(T(1));

  auto update = [&](Vec& p, Vec g, Vec& m) {
    g = g * sign_of_grad;
    const Vec c = at::vec::fmadd(beta1, m, one_minus_beta1 * g);
    // sign(c) with sign(0) = 0, as torch.sign: comparisons give all-ones masks.
    const Vec sign = ((c > zero) & one) - ((c < zero) & one);
    p = at::vec::fnmadd(lr, sign, p * decay);
    m = at::vec::fmadd(beta2, m, one_minus_beta2 * g);
  };

  // One pass: every stream is loaded once and stored once; the update runs in registers.
  auto step_at = [&](int64_t i, int64_t n) {
    Vec p0, p1, g0, g1, m0, m1;
    load_float(param + i, n, p0, p1);
    load_float(grad + i, n, g0, g1);
    load_float(exp_avg + i, n, m0, m1);
    if (h.unscale) {
      g0 = g0 * inv_grad_scale;
      g1 = g1 * inv_grad_scale;
      store_float(grad + i, n, g0, g1);  // as torch's fused steps, leave unscaled grads behind
    }
    update(p0, g0, m0);
    update(p1, g1, m1);
    store_float(param + i, n, p0, p1);
    store_float(exp_avg + i, n, m0, m1);
  };
  for_each_vector<kVecStepOf<scalar_t>>(begin, end, [&](int64_t i) {
    prefetch_ahead<true>(param, i);
    prefetch_ahead<false>(grad, i);
    prefetch_ahead<true>(exp_avg, i);
  }, step_at);
}

void lion_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, double lr,
              double beta1, double beta2, double weight_decay, bool maximize,
              const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const at::ScalarType dtype =
      check_param_lists("lion_", params, {{"grads", grads}, {"exp_avgs", exp_avgs}});
  if (skip_step(found_inf)) return;
  const LionHyper h{lr, beta1, beta2, weight_decay, maximize, grad_scale.has_value(),
                    inv_grad_scale(grad_scale)};
  for_each_chunk(dtype, {params, grads, exp_avgs},
                 [&](auto* const* ptr, int64_t, int64_t begin, int64_t end) {
                   lion_range(ptr, begin, end, h);
                 });
}

void lion_cpu_tensor_lr(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                        const at::Tensor& lr, double beta1, double beta2, double weight_decay,
                        bool maximize, const std::optional<at::Tensor>& grad_scale,
                        const std::optional<at::Tensor>& found_inf) {
  lion_cpu(params, grads, exp_avgs, read_lr(lr, "lion_"), beta1, beta2, weight_decay, maximize,
           grad_scale, found_inf);
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("lion_", &fusedopt::cpu::lion_cpu);
  m.impl("lion_.tensor_lr", &fusedopt::cpu::lion_cpu_tensor_lr);
}
