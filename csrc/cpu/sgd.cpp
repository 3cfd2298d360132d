// CPU SGD step (momentum, dampening, Nesterov, weight decay) over many tensors in one parallel
// region. The math is fusedopt/reference.py::sgd; the op's contract is in csrc/fusedopt.cpp.
#include <torch/library.h>

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
  bool is_first_step;
  bool unscale;  // a grad_scale was given
  double inv_grad_scale;
};

// ptr: param, grad[, momentum_buffer] of one tensor. Math in fp32 registers (fp64 for fp64
// storage): every constant is rounded to T first, then combined in T.
template <bool kMomentum, typename scalar_t>
void sgd_range(scalar_t* const* ptr, int64_t begin, int64_t end, const SgdHyper& h) {
  using Vec = ComputeVec<scalar_t>;
  using T = typename Vec::value_type;
  scalar_t* param = ptr[0];
  scalar_t* grad = ptr[1];
  scalar_t* buffer = kMomentum ? ptr[2] : nullptr;
  const Vec lr(T(h.lr)), momentum(T(h.momentum)), one_minus_dampening(T(1) - T(h.dampening)),
      weight_decay(T(h.weight_decay)), inv_grad_scale(T(h.inv_grad_scale)),
      sign_of_grad(T(h.maximize ? -1 : 1));

  auto update = [&](Vec& p, Vec g, Vec& buf) {
    g = at::vec::fmadd(weight_decay, p, g * sign_of_grad);
    if constexpr (kMomentum) {
      buf = h.is_first_step ? g : at::vec::fmadd(momentum, buf, one_minus_dampening * g);
      g = h.nesterov ? at::vec::fmadd(momentum, buf, g) : buf;
    }
    p = at::vec::fnmadd(lr, g, p);
  };

  // One pass: every stream is loaded once and stored once; the update runs in registers.
  auto step_at = [&](int64_t i, int64_t n) {
    Vec p0, p1, g0, g1, b0(T(0)), b1(T(0));
    load_float(param + i, n, p0, p1);
    load_float(grad + i, n, g0, g1);
    if (kMomentum && !h.is_first_step) load_float(buffer + i, n, b0, b1);
    if (h.unscale) {
      g0 = g0 * inv_grad_scale;
      g1 = g1 * inv_grad_scale;
      store_float(grad + i, n, g0, g1);  // as torch's fused steps, leave unscaled grads behind
    }
    update(p0, g0, b0);
    update(p1, g1, b1);
    store_float(param + i, n, p0, p1);
    if constexpr (kMomentum) store_float(buffer + i, n, b0, b1);
  };
  for_each_vector<kVecStepOf<scalar_t>>(begin, end, [&](int64_t i) {
    prefetch_ahead<true>(param, i);
    prefetch_ahead<false>(grad, i);
    if constexpr (kMomentum) prefetch_ahead<true>(buffer, i);
  }, step_at);
}

void sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
             double lr, double momentum, double dampening, double weight_decay, bool nesterov,
             bool maximize, bool is_first_step, const std::optional<at::Tensor>& grad_scale,
             const std::optional<at::Tensor>& found_inf) {
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
  const SgdHyper h{lr, momentum, dampening, weight_decay, nesterov, maximize, is_first_step,
                   grad_scale.has_value(), inv_grad_scale(grad_scale)};
  std::vector<at::TensorList> lists{params, grads};
  if (has_momentum) lists.push_back(momentum_buffers);
  for_each_chunk(dtype, lists, [&](auto* const* ptr, int64_t, int64_t begin, int64_t end) {
    if (has_momentum) {
      sgd_range<true>(ptr, begin, end, h);
    } else {
      sgd_range<false>(ptr, begin, end, h);
    }
  });
}

void sgd_cpu_tensor_lr(at::TensorList params, at::TensorList grads,
                       at::TensorList momentum_buffers, const at::Tensor& lr, double momentum,
                       double dampening, double weight_decay, bool nesterov, bool maximize,
                       bool is_first_step, const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf) {
  sgd_cpu(params, grads, momentum_buffers, read_lr(lr, "sgd_"), momentum, dampening,
          weight_decay, nesterov, maximize, is_first_step, grad_scale, found_inf);
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("sgd_", &fusedopt::cpu::sgd_cpu);
  m.impl("sgd_.tensor_lr", &fusedopt::cpu::sgd_cpu_tensor_lr);
}
