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
  GradUnscale unscale;
};

// The streams of one tensor, in the op's order.
constexpr int kMomentumBuffer = 2, kSgdStreams = 3;

// kMomentum: there is a momentum buffer; kFirstStep: it is written only (buf = g), not read.
// Math in fp32 registers (fp64 for fp64 storage); each constant is formed as the reference forms
// it (in double from Python floats) and rounded to T once. Every product and sum rounds on its
// own, in the reference's order.
template <bool kMomentum, bool kFirstStep, typename scalar_t>
void sgd_range(scalar_t* const* ptr, int64_t begin, int64_t end, const SgdHyper& h) {
  using Vec = ComputeVec<scalar_t>;
  using T = typename Vec::value_type;
  const Vec lr(T(h.lr)), momentum(T(h.momentum)), one_minus_dampening(T(1.0 - h.dampening)),
      weight_decay(T(h.weight_decay)), sign_of_grad(T(h.maximize ? -1 : 1));
  const bool nesterov = h.nesterov;

  constexpr unsigned kBuffer = kMomentum ? kStreamMask<kMomentumBuffer> : 0u;
  constexpr unsigned kStored = kStreamMask<kParamStream> | kBuffer;
  constexpr unsigned kLoaded = kStored | kStreamMask<kGradStream>;
  for_each_step<kSgdStreams, kFirstStep ? kLoaded & ~kBuffer : kLoaded, kStored>(
      ptr, begin, end, h.unscale, [=](Vec& p, Vec g, Vec& buf) {
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
      });
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

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("sgd_", &fusedopt::cpu::sgd_cpu<double>);
  m.impl("sgd_.tensor_lr", &fusedopt::cpu::sgd_cpu<const at::Tensor&>);
}
