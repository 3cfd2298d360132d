// The lean-state ops' shared half (adam_lean_, lion_lean_): checking their lists, choosing the
// param's and the states' codecs from the dtypes and the param_mode, and running an algorithm's
// update over every chunk with them (lean_states.h's for_each_lean_step). An algorithm adds only
// its rule and its hyperparameters.
#pragma once

#include <array>
#include <tuple>
#include <vector>

#include "lean_states.h"
#include "multi_tensor.h"

namespace fusedopt::cpu::lean {

template <typename T>
struct TypeTag {
  using type = T;
};

enum class ParamMode { kNearest, kMaster, kCompact, kKahan, kStochastic };

inline ParamMode parse_param_mode(const char* op, c10::string_view mode) {
  if (mode == "nearest") return ParamMode::kNearest;
  if (mode == "master") return ParamMode::kMaster;
  if (mode == "compact") return ParamMode::kCompact;
  if (mode == "kahan") return ParamMode::kKahan;
  if (mode == "stochastic") return ParamMode::kStochastic;
  TORCH_CHECK(false, "fusedopt.", op, ": param_mode must be nearest, master, compact, kahan or "
              "stochastic, got ", mode);
}

// Checks that tensor i of `list` is a contiguous CPU tensor of `dtype` with param i's element
// count (per_block: its count of 8-bit blocks, one absmax each).
inline void check_list(const char* op, at::TensorList params, at::TensorList list,
                       const char* name, at::ScalarType dtype, bool per_block) {
  TORCH_CHECK(list.size() == params.size(), "fusedopt.", op, ": expected ", params.size(), " ",
              name, ", got ", list.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t numel = per_block ? (params[i].numel() + kQuantBlock - 1) / kQuantBlock
                                    : params[i].numel();
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous() &&
                    t.numel() == numel,
                "fusedopt.", op, " (cpu): ", name, "[", i, "] must be a contiguous CPU ", dtype,
                " tensor of ", numel, " elements, got ", t.scalar_type(), " of ", t.numel(),
                " on ", t.device());
  }
}

// One state of a lean op: its values (a float dtype, or uint8 codes) and, for uint8, the
// per-block absmaxes (empty otherwise). For uint8 states an algorithm may have its 8-bit rule see
// a state in other units, to leave multiplies out of a step that is compute-bound: the rule gets
// value * decode_factor / unit and gives back new value / unit (BlockwiseStream folds both into
// the block's scales; the stored format does not change). Adam's: exp_avg in units of 1 - beta1,
// times beta1, so its update is beta1 m / (1 - beta1) + g, one add.
struct StateList {
  const char* name;
  at::TensorList values;
  const char* absmax_name;
  at::TensorList absmaxes;
  float decode_factor = 1.0f;
  float unit = 1.0f;
};

// What a lean op's lists hold, once checked.
struct LeanSpec {
  at::ScalarType param_dtype;
  at::ScalarType state_dtype;
  ParamMode mode;
};

// Checks a lean op's lists (see csrc/fusedopt.cpp's adam_lean_ for the contract) and the
// state_steps' shape; params must not be empty.
template <size_t kStates>
LeanSpec check_lean_lists(const char* op, at::TensorList params, at::TensorList grads,
                          const std::array<StateList, kStates>& states,
                          at::TensorList param_extras, at::TensorList state_steps,
                          c10::string_view param_mode) {
  const ParamMode mode = parse_param_mode(op, param_mode);
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "fusedopt.",
              op, " (cpu): params must be float32, bfloat16 or float16, got ", dtype);
  check_list(op, params, params, "params", dtype, false);
  check_list(op, params, grads, "grads", dtype, false);
  // No states (SGD without momentum): the state dtype is moot.
  at::ScalarType state_dtype = at::kFloat;
  if constexpr (kStates > 0) {
    const StateList& first = states[0];
    TORCH_CHECK(!first.values.empty(), "fusedopt.", op, ": expected ", params.size(), " ",
                first.name, ", got 0");
    state_dtype = first.values[0].scalar_type();
  }
  TORCH_CHECK(state_dtype == at::kFloat || state_dtype == at::kBFloat16 ||
                  state_dtype == at::kHalf || state_dtype == at::kByte,
              "fusedopt.", op, " (cpu): states must be float32, bfloat16, float16 or uint8, got ",
              state_dtype);
  for (const StateList& state : states) {
    check_list(op, params, state.values, state.name, state_dtype, false);
    if (state_dtype == at::kByte) {
      check_list(op, params, state.absmaxes, state.absmax_name, at::kFloat, true);
    } else {
      TORCH_CHECK(state.absmaxes.empty(), "fusedopt.", op,
                  ": absmaxes are given only with uint8 states");
    }
  }
  TORCH_CHECK(mode == ParamMode::kNearest || dtype != at::kFloat, "fusedopt.", op,
              ": param_mode ", param_mode, " is for bfloat16 / float16 params");
  switch (mode) {
    case ParamMode::kMaster:
      check_list(op, params, param_extras, "param_extras", at::kFloat, false);
      break;
    case ParamMode::kCompact:
      check_list(op, params, param_extras, "param_extras", at::kChar, false);
      break;
    case ParamMode::kKahan:
      check_list(op, params, param_extras, "param_extras", dtype, false);
      break;
    default:
      TORCH_CHECK(param_extras.empty(), "fusedopt.", op, ": param_mode ", param_mode,
                  " takes no param_extras");
  }
  TORCH_CHECK(state_steps.size() == params.size(), "fusedopt.", op, ": expected ",
              params.size(), " state_steps, got ", state_steps.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(state_steps[i].device().is_cpu() && state_steps[i].numel() == 1, "fusedopt.",
                op, " (cpu): state_steps[", i, "] must be a 1-element CPU tensor");
  }
  return {dtype, state_dtype, mode};
}

// Advances every state_steps[i] by one; returns the new steps (stochastic rounding's keys).
inline std::vector<double> advance_lean_steps(at::TensorList state_steps) {
  std::vector<double> steps(state_steps.size());
  for (size_t i = 0; i < state_steps.size(); ++i) {
    steps[i] = read_scalar(state_steps[i]) + 1.0;
    write_scalar(state_steps[i], steps[i]);
  }
  return steps;
}

// Calls fn(TypeTag<scalar_t>{}, TypeTag<state_t>{}) for the spec's (param, state) dtypes.
template <typename Fn>
void dispatch_lean_dtypes(const LeanSpec& spec, const Fn& fn) {
  const auto with_states = [&](auto param_type) {
    switch (spec.state_dtype) {
      case at::kFloat: return fn(param_type, TypeTag<float>{});
      case at::kBFloat16: return fn(param_type, TypeTag<c10::BFloat16>{});
      case at::kHalf: return fn(param_type, TypeTag<c10::Half>{});
      default: return fn(param_type, TypeTag<uint8_t>{});
    }
  };
  switch (spec.param_dtype) {
    case at::kFloat: return with_states(TypeTag<float>{});
    case at::kBFloat16: return with_states(TypeTag<c10::BFloat16>{});
    default: return with_states(TypeTag<c10::Half>{});
  }
}

// The codec of state k of tensor t: BlockwiseStream<kSigned> for uint8 codes (its block's new
// values wait in `pending`, kQuantBlock floats), else PlainStream.
template <typename state_t, bool kSigned>
auto state_codec(const StateList& state, int64_t t, float* pending) {
  if constexpr (std::is_same_v<state_t, uint8_t>) {
    return BlockwiseStream<kSigned>{state.values[t].data_ptr<uint8_t>(),
                                    state.absmaxes[t].data_ptr<float>(), pending,
                                    state.decode_factor, state.unit};
  } else {
    return PlainStream<state_t>{state.values[t].data_ptr<state_t>()};
  }
}

// Runs make_update(tensor)'s update(p, g, s_1, ..., s_k) over every chunk of every tensor, with
// the param's codec for spec.mode and state k's codec (signed: kSigned[k]); steps[t] is tensor
// t's new step (stochastic rounding's key).
template <typename scalar_t, typename state_t, bool... kSigned, typename MakeUpdate>
void run_lean_chunks(const LeanSpec& spec, at::TensorList params, at::TensorList grads,
                     const std::array<StateList, sizeof...(kSigned)>& states,
                     at::TensorList param_extras, const std::vector<double>& steps,
                     const GradUnscale& unscale, const MakeUpdate& make_update) {
  std::vector<int64_t> numels(params.size());
  for (size_t i = 0; i < params.size(); ++i) numels[i] = params[i].numel();
  const auto run = [&](const auto& make_param) {
    parallel_for_chunks(numels, [&](const Chunk& c) {
      const auto update = make_update(c.tensor);
      auto param = make_param(c.tensor);
      scalar_t* grad = grads[c.tensor].data_ptr<scalar_t>();
      // A braced list runs its initializers in order: codec k gets states[k] and pending[k].
      alignas(64) float pending[sizeof...(kSigned) + 1][kQuantBlock];
      [[maybe_unused]] size_t k = 0;
      std::tuple<decltype(state_codec<state_t, kSigned>(states[0], 0, nullptr))...> codecs{
          (++k, state_codec<state_t, kSigned>(states[k - 1], c.tensor, pending[k - 1]))...};
      std::apply(
          [&](auto&... codec) {
            for_each_lean_step(c.begin, c.end, unscale, update, param, grad, codec...);
          },
          codecs);
    });
  };
  const auto param_of = [&](int64_t t) { return params[t].data_ptr<scalar_t>(); };
  if (spec.mode == ParamMode::kNearest) {
    return run([&](int64_t t) { return PlainStream<scalar_t>{param_of(t)}; });
  }
  // The other modes keep bf16 / fp16 params (check_lean_lists).
  if constexpr (!std::is_same_v<scalar_t, float>) {
    if (spec.mode == ParamMode::kMaster) {
      return run([&](int64_t t) {
        return MasterParam<scalar_t>{param_of(t), param_extras[t].data_ptr<float>()};
      });
    }
    if (spec.mode == ParamMode::kKahan) {
      return run([&](int64_t t) {
        return KahanParam<scalar_t>{param_of(t), param_extras[t].data_ptr<scalar_t>()};
      });
    }
  }
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (spec.mode == ParamMode::kCompact) {
      return run([&](int64_t t) {
        return CompactParam{param_of(t), param_extras[t].data_ptr<int8_t>()};
      });
    }
    return run([&](int64_t t) {
      return StochasticParam{param_of(t), stochastic_key(steps[t], t)};
    });
  }
  TORCH_CHECK(false, "fusedopt: param_mode compact and stochastic need bfloat16 params");
}

}  // namespace fusedopt::cpu::lean
