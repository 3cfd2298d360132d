// CPU Muon step, the elementwise halves around the Newton-Schulz iteration (newton_schulz.cpp):
// muon_momentum_ (momentum buffer, Nesterov, the update to orthogonalize) and muon_update_
// (decoupled weight decay and the orthogonalized update). The math is
// fusedopt/reference.py::muon_momentum and muon_update; the ops' contracts are in
// csrc/fusedopt.cpp.
#include <torch/library.h>

#include "lean_step.h"
#include "multi_tensor.h"

namespace fusedopt::cpu {
namespace {

// torch.lerp(start, end, weight) with torch's two formulas (exact at weight 0 and at weight 1),
// unfused: torch's CPU lerp is one fma, so the two may be 1 ulp apart. The formula is chosen on the
// host (weight < 0.5), so the loop holds no branch.
template <typename V>
FUSEDOPT_INLINE V lerp(const V& start, const V& end, const V& weight, const V& one_minus_weight,
                       bool small_weight) {
  const V diff = end - start;
  return small_weight ? start + weight * diff : end - diff * one_minus_weight;
}

// The streams of muon_momentum_, in the op's order: the update is written only; the grad is
// read; the buffer is read and written.
constexpr int kUpdate = 0, kMomentumBuffer = 2, kMomentumStreams = 3;
static_assert(kUpdate == kParamStream, "the update takes the param's place in the driver");

template <typename scalar_t>
void momentum_range(scalar_t* const* ptr, int64_t begin, int64_t end, double momentum,
                    bool nesterov) {
  using Vec = ComputeVec<scalar_t>;
  using T = typename Vec::value_type;
  // buf = lerp(buf, g, 1 - momentum); update = lerp(g, buf, momentum) with Nesterov.
  // Each weight and its complement as torch's lerp forms them: the weight rounded to T, then
  // 1 - weight in T.
  const Vec to_grad{T(1.0 - momentum)}, to_grad_rest{T(1) - T(1.0 - momentum)},
      to_buffer{T(momentum)}, to_buffer_rest{T(1) - T(momentum)};
  const bool small_to_grad = 1.0 - momentum < 0.5, small_to_buffer = momentum < 0.5;

  constexpr unsigned kBuffer = kStreamMask<kMomentumBuffer>;
  for_each_step<kMomentumStreams, kBuffer | kStreamMask<kGradStream>, kBuffer | kStreamMask<kUpdate>>(
      ptr, begin, end, GradUnscale{false, 1.0}, [=](Vec& update, Vec g, Vec& buf) {
        buf = lerp(buf, g, to_grad, to_grad_rest, small_to_grad);
        update = nesterov ? lerp(g, buf, to_buffer, to_buffer_rest, small_to_buffer) : buf;
      });
}

void muon_momentum_cpu(at::TensorList updates, at::TensorList grads,
                       at::TensorList momentum_buffers, double momentum, bool nesterov) {
  if (updates.empty()) return;
  const at::ScalarType dtype = check_param_lists(
      "muon_momentum_", updates, {{"grads", grads}, {"momentum_buffers", momentum_buffers}});
  for_each_chunk(dtype, {updates, grads, momentum_buffers},
                 [&](auto* const* ptr, int64_t, int64_t begin, int64_t end) {
                   momentum_range(ptr, begin, end, momentum, nesterov);
                 });
}

// muon_momentum_lean_ (csrc/fusedopt.cpp): muon_momentum_'s rule with the buffer in another
// float dtype, or 8-bit blockwise (signed code), through lean_step.h's codecs; the update is
// written in the grads' dtype.
void muon_momentum_lean_cpu(at::TensorList updates, at::TensorList grads,
                            at::TensorList momentum_buffers,
                            at::TensorList momentum_buffer_absmaxes, double momentum,
                            bool nesterov) {
  if (updates.empty()) return;
  const char* op = "muon_momentum_lean_";
  const at::ScalarType dtype = updates[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "fusedopt.",
              op, " (cpu): updates must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(!momentum_buffers.empty(), "fusedopt.", op, ": expected ", updates.size(),
              " momentum_buffers, got 0");
  const at::ScalarType buffer_dtype = momentum_buffers[0].scalar_type();
  TORCH_CHECK(buffer_dtype == at::kFloat || buffer_dtype == at::kBFloat16 ||
                  buffer_dtype == at::kHalf || buffer_dtype == at::kByte,
              "fusedopt.", op, " (cpu): momentum_buffers must be float32, bfloat16, float16 or "
              "uint8, got ", buffer_dtype);
  lean::check_list(op, updates, updates, "updates", dtype, false);
  lean::check_list(op, updates, grads, "grads", dtype, false);
  lean::check_list(op, updates, momentum_buffers, "momentum_buffers", buffer_dtype, false);
  if (buffer_dtype == at::kByte) {
    lean::check_list(op, updates, momentum_buffer_absmaxes, "momentum_buffer_absmaxes",
                     at::kFloat, true);
  } else {
    TORCH_CHECK(momentum_buffer_absmaxes.empty(), "fusedopt.", op,
                ": absmaxes are given only with uint8 momentum_buffers");
  }
  const lean::StateList buffers{"momentum_buffers", momentum_buffers,
                                "momentum_buffer_absmaxes", momentum_buffer_absmaxes};
  const Vec to_grad{static_cast<float>(1.0 - momentum)},
      to_grad_rest{1.0f - static_cast<float>(1.0 - momentum)},
      to_buffer{static_cast<float>(momentum)}, to_buffer_rest{1.0f - static_cast<float>(momentum)};
  const bool small_to_grad = 1.0 - momentum < 0.5, small_to_buffer = momentum < 0.5;
  const auto rule = [=](Vec& update, Vec& g, Vec& buf) FUSEDOPT_INLINE_LAMBDA {
    buf = lerp(buf, g, to_grad, to_grad_rest, small_to_grad);
    update = nesterov ? lerp(g, buf, to_buffer, to_buffer_rest, small_to_buffer) : buf;
  };
  std::vector<int64_t> numels(updates.size());
  for (size_t i = 0; i < updates.size(); ++i) numels[i] = updates[i].numel();
  const lean::LeanSpec spec{dtype, buffer_dtype, lean::ParamMode::kNearest};
  lean::dispatch_lean_dtypes(spec, [&](auto update_type, auto buffer_type) {
    using scalar_t = typename decltype(update_type)::type;
    using state_t = typename decltype(buffer_type)::type;
    parallel_for_chunks(numels, [&](const Chunk& c) {
      lean::OutputStream<scalar_t> update{updates[c.tensor].data_ptr<scalar_t>()};
      alignas(64) float pending[lean::kQuantBlock];
      auto buffer = lean::state_codec<state_t, true>(buffers, c.tensor, pending);
      lean::for_each_lean_step(c.begin, c.end, GradUnscale{false, 1.0}, rule, update,
                               grads[c.tensor].data_ptr<scalar_t>(), buffer);
    });
  });
}

// param = param * (1 - lr * weight_decay) - adjusted_lr * ortho, over [begin, end) of one
// tensor. ortho may be stored in another dtype than the param (the Newton-Schulz dtype, bf16 or
// fp32), read as the param's compute type; both are loaded as fp32 vectors (or both fp64).
template <typename scalar_t, typename ortho_t>
void update_range(scalar_t* param, const ortho_t* ortho, int64_t begin, int64_t end,
                  double decay, double adjusted_lr) {
  using Vec = ComputeVec<scalar_t>;
  using T = typename Vec::value_type;
  static_assert(std::is_same_v<Vec, ComputeVec<ortho_t>>, "one compute type for both");
  static_assert(kVecStepOf<scalar_t> == kVecStepOf<ortho_t>, "one vector step for both");
  const Vec decay_v{T(decay)}, adjusted_lr_v{T(adjusted_lr)};
  for_each_vector<kVecStepOf<scalar_t>>(begin, end, [&](int64_t i) FUSEDOPT_INLINE_LAMBDA {
    prefetch_ahead<true>(param, i);
    prefetch_ahead<false>(ortho, i);
  }, [&](int64_t i, int64_t n) FUSEDOPT_INLINE_LAMBDA {
    Vec p_lo, p_hi, o_lo, o_hi;
    load_float(param + i, n, p_lo, p_hi);
    load_float(ortho + i, n, o_lo, o_hi);
    p_lo = p_lo * decay_v - adjusted_lr_v * o_lo;
    p_hi = p_hi * decay_v - adjusted_lr_v * o_hi;
    store_float(param + i, n, p_lo, p_hi);
  });
}

void muon_update_cpu(at::TensorList params, at::TensorList orthogonalized, double lr,
                     double weight_decay, double adjusted_lr) {
  if (params.empty()) return;
  const at::ScalarType dtype = check_param_lists("muon_update_", params, {});
  TORCH_CHECK(orthogonalized.size() == params.size(), "fusedopt.muon_update_: expected ",
              params.size(), " orthogonalized updates, got ", orthogonalized.size());
  const at::ScalarType ortho_dtype = orthogonalized[0].scalar_type();
  TORCH_CHECK(ortho_dtype == dtype || (dtype != at::kDouble && (ortho_dtype == at::kBFloat16 ||
                                                                ortho_dtype == at::kFloat)),
              "fusedopt.muon_update_ (cpu): orthogonalized updates must be ", dtype,
              " like the params, or bfloat16 / float32 for non-float64 params; got ", ortho_dtype);
  std::vector<int64_t> numels(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& o = orthogonalized[i];
    TORCH_CHECK(p.is_contiguous() && o.is_contiguous() && o.device().is_cpu() &&
                    o.scalar_type() == ortho_dtype && o.numel() == p.numel(),
                "fusedopt.muon_update_ (cpu): param ", i, " and its update must be contiguous CPU "
                "tensors of as many elements, the updates of one dtype");
    numels[i] = p.numel();
  }
  const double decay = 1.0 - lr * weight_decay;  // formed as the reference forms it
  FUSEDOPT_DISPATCH_OPTIMIZER_TYPES(dtype, "muon_update_", [&] {
    using param_t = scalar_t;
    auto run = [&](auto ortho_tag) {
      using ortho_t = decltype(ortho_tag);
      if constexpr (std::is_same_v<ComputeVec<param_t>, ComputeVec<ortho_t>>) {
        parallel_for_chunks(numels, [&](const Chunk& c) {
          update_range(params[c.tensor].data_ptr<param_t>(),
                       orthogonalized[c.tensor].const_data_ptr<ortho_t>(), c.begin, c.end, decay,
                       adjusted_lr);
        });
      }
    };
    if (ortho_dtype == dtype) {
      run(param_t{});
    } else if (ortho_dtype == at::kBFloat16) {
      run(c10::BFloat16{});
    } else {
      run(float{});
    }
  });
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("muon_momentum_", &fusedopt::cpu::muon_momentum_cpu);
  m.impl("muon_momentum_lean_", &fusedopt::cpu::muon_momentum_lean_cpu);
  m.impl("muon_update_", &fusedopt::cpu::muon_update_cpu);
}
