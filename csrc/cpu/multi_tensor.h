// Shared pieces of the CPU multi-tensor kernels: how many tensors' elements are cut into chunks and
// spread over threads in one parallel region, and how fp32/bf16/fp16 storage is loaded as fp32.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(FUSEDOPT_AVX512_BF16)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

// The storage dtypes of norm inputs and of the bandwidth probes; math is fp32.
#define FUSEDOPT_DISPATCH_PARAM_TYPES(TYPE, NAME, ...)           \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
// The storage dtypes of optimizer params and states: those, plus fp64 with fp64 math.
#define FUSEDOPT_DISPATCH_OPTIMIZER_TYPES(TYPE, NAME, ...)       \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kDouble, __VA_ARGS__))

namespace fusedopt::cpu {

using Vec = at::vec::Vectorized<float>;
// Elements per vector step: two fp32 vectors, which is one vector of bf16/fp16 storage.
constexpr int64_t kVecStep = 2 * Vec::size();

// The registers a storage dtype is computed in: fp64 for fp64, fp32 for everything else.
template <typename scalar_t>
using ComputeVec =
    std::conditional_t<std::is_same_v<scalar_t, double>, at::vec::Vectorized<double>, Vec>;
// Elements per vector step of a storage dtype: two compute vectors (kVecStep but for fp64).
template <typename scalar_t>
constexpr int64_t kVecStepOf = 2 * ComputeVec<scalar_t>::size();

// One contiguous piece of one tensor, the unit of work handed to a thread.
struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// 16K elements per chunk: the few streams of a chunk stay in L2, and a large tensor yields enough
// chunks to split evenly over threads.
constexpr int64_t kChunkElements = 16384;
// Below this many elements in total, the fork/join of a parallel region costs more than it saves.
constexpr int64_t kMinParallelElements = 65536;

inline std::vector<Chunk> make_chunks(const std::vector<int64_t>& numels) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(numels.size()); ++t) {
    for (int64_t begin = 0; begin < numels[t]; begin += kChunkElements) {
      chunks.push_back({t, begin, std::min(begin + kChunkElements, numels[t])});
    }
  }
  return chunks;
}

// Runs fn(chunk) for every chunk of every tensor in one parallel region: contiguous runs of chunks
// per thread, so each thread streams through whole cache lines.
template <typename Fn>
void parallel_for_chunks(const std::vector<int64_t>& numels, const Fn& fn) {
  const std::vector<Chunk> chunks = make_chunks(numels);
  int64_t total = 0;
  for (int64_t n : numels) total += n;
  const int64_t count = static_cast<int64_t>(chunks.size());
  const int64_t grain = total < kMinParallelElements ? std::max<int64_t>(count, 1) : 1;
  at::parallel_for(0, count, grain, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) fn(chunks[c]);
  });
}

// Software prefetch distance, in elements ahead of the current vector step; 0 (the default) leaves
// the streams to the hardware prefetchers. Set it with FUSEDOPT_CPU_PREFETCH (read once, when the
// extension loads), since the best value differs between CPUs: on one 2-core machine, 512 took the
// 25M-param AdamW step from ~16.2 to ~14.6 ms (the long-latency sqrt and divide fill the reorder
// buffer, and too few misses stay in flight), while on a 2-core AMD EPYC (avx512_bf16,
// 2026-12-03) it made AdamW and SGD-momentum ~15% slower than without (three runs each).
inline const int64_t kPrefetchElements = [] {
  const char* value = std::getenv("FUSEDOPT_CPU_PREFETCH");
  return value ? std::max<int64_t>(0, std::atoll(value)) : int64_t{0};
}();

// Prefetches the cache lines that the vector step kPrefetchElements after element i will touch.
template <bool kWrite, typename scalar_t>
inline void prefetch_ahead(const scalar_t* base, int64_t i) {
  if (kPrefetchElements == 0) return;
  // Integer arithmetic: the address may lie past the tensor's end (prefetches never fault).
  const auto ahead = reinterpret_cast<const char*>(
      reinterpret_cast<uintptr_t>(base) + (i + kPrefetchElements) * sizeof(scalar_t));
  for (int64_t byte = 0; byte < kVecStepOf<scalar_t> * static_cast<int64_t>(sizeof(scalar_t));
       byte += 64) {
    __builtin_prefetch(ahead + byte, kWrite ? 1 : 0);
  }
}

// Loads kVecStepOf<scalar_t> (or `count` fewer, zero-padded) elements as two compute vectors (fp32,
// or fp64 for fp64), and back.
template <typename scalar_t>
inline void load_float(const scalar_t* src, int64_t count, ComputeVec<scalar_t>& lo,
                       ComputeVec<scalar_t>& hi) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    using V = ComputeVec<scalar_t>;
    if (count == kVecStepOf<scalar_t>) {
      lo = V::loadu(src);
      hi = V::loadu(src + V::size());
    } else {
      lo = V::loadu(src, std::min<int64_t>(count, V::size()));
      hi = count > V::size() ? V::loadu(src + V::size(), count - V::size())
                             : V(typename V::value_type(0));
    }
  } else {
    using Storage = at::vec::Vectorized<scalar_t>;
    auto both = at::vec::convert_to_float<scalar_t>(
        count == kVecStep ? Storage::loadu(src) : Storage::loadu(src, count));
    lo = std::get<0>(both);
    hi = std::get<1>(both);
  }
}

// kVecStep fp32 values rounded (to nearest even) into a 16-bit dtype. Where the build machine has
// AVX512-BF16 (FUSEDOPT_AVX512_BF16), bf16 takes its one conversion instruction rather than
// at::vec's integer rounding sequence; the two differ only in that the instruction flushes
// denormals (below 1.2e-38) to zero.
template <typename scalar_t>
inline at::vec::Vectorized<scalar_t> pack_float(const Vec& lo, const Vec& hi) {
#if defined(FUSEDOPT_AVX512_BF16)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return at::vec::Vectorized<scalar_t>(
        reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(__m512(hi), __m512(lo))));
  }
#endif
  return at::vec::convert_from_float<scalar_t>(lo, hi);
}

template <typename scalar_t>
inline void store_float(scalar_t* dst, int64_t count, const ComputeVec<scalar_t>& lo,
                        const ComputeVec<scalar_t>& hi) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    using V = ComputeVec<scalar_t>;
    if (count == kVecStepOf<scalar_t>) {
      lo.store(dst);
      hi.store(dst + V::size());
    } else {
      lo.store(dst, std::min<int64_t>(count, V::size()));
      if (count > V::size()) hi.store(dst + V::size(), count - V::size());
    }
  } else {
    auto packed = pack_float<scalar_t>(lo, hi);
    if (count == kVecStep) {
      packed.store(dst);
    } else {
      packed.store(dst, count);
    }
  }
}

// Reads a 1-element floating-point CPU tensor without a dispatcher call per tensor.
inline double read_scalar(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return *t.const_data_ptr<float>();
    case at::kDouble:
      return *t.const_data_ptr<double>();
    default:
      return t.item<double>();
  }
}

inline void write_scalar(const at::Tensor& t, double value) {
  switch (t.scalar_type()) {
    case at::kFloat:
      *t.data_ptr<float>() = static_cast<float>(value);
      break;
    case at::kDouble:
      *t.data_ptr<double>() = value;
      break;
    default:
      t.fill_(value);
  }
}

// Forced inlining for the loops that take an algorithm's math as a lambda: as out-of-line
// functions, the lambdas' captured vector constants were re-read from memory in every step (the
// 25M-param AdamW step measured ~16.4 ms against ~15.0 ms inlined).
#define FUSEDOPT_INLINE __attribute__((always_inline)) inline
// The same for a lambda, written after its parameter list: [&](int64_t i) FUSEDOPT_INLINE_LAMBDA {.
#define FUSEDOPT_INLINE_LAMBDA __attribute__((always_inline))

// Runs step(i, n) over [begin, end) one vector step (kStep elements) at a time, calling
// prefetch(i) before each full step (n == kStep there).
template <int64_t kStep = kVecStep, typename PrefetchFn, typename StepFn>
FUSEDOPT_INLINE void for_each_vector(int64_t begin, int64_t end, const PrefetchFn& prefetch,
                                     const StepFn& step) {
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) {
    prefetch(i);
    step(i, kStep);
  }
  if (i < end) step(i, end - i);
}

// GradScaler's found_inf: a non-zero value means the whole step is skipped.
inline bool skip_step(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && read_scalar(*found_inf) != 0.0;
}

// GradScaler's grad_scale as an optimizer step applies it: when given, each grad is divided by it
// (rounded to the compute type, as the reference divides) and stored back unscaled, as torch's
// fused steps leave it.
struct GradUnscale {
  bool active;
  double scale;
};

inline GradUnscale grad_unscale(const std::optional<at::Tensor>& grad_scale) {
  if (!grad_scale.has_value()) return {false, 1.0};
  return {true, read_scalar(*grad_scale)};
}

// The learning rate as an op received it. Where it came from matters to the reference's rounding of
// 1 - lr * weight_decay: a float lr is Python arithmetic (double), a tensor lr is a tensor of the
// compute type (see decay_factor).
struct LearningRate {
  double value;
  bool from_tensor;
};

// The decoupled weight decay factor 1 - lr * weight_decay in the compute type T, formed as
// fusedopt/reference.py forms it: in double and rounded once from a float lr, in T from a tensor
// lr.
template <typename T>
T decay_factor(const LearningRate& lr, double weight_decay) {
  if (lr.from_tensor) return T(1) - T(lr.value) * T(weight_decay);
  return T(1.0 - lr.value * weight_decay);
}

// The lr of an op's two overloads: a float (`adam_`) or a 1-element tensor (`adam_.tensor_lr`).
inline LearningRate learning_rate(double lr, const char*) { return {lr, false}; }

inline LearningRate learning_rate(const at::Tensor& lr, const char* op) {
  TORCH_CHECK(lr.device().is_cpu() && lr.numel() == 1, "fusedopt.", op,
              " (cpu): a tensor lr must be a 1-element CPU tensor");
  return {read_scalar(lr), true};
}

// Checks that tensor i of every list sits on the CPU with param i's dtype and shape.
inline void check_like_params(at::TensorList params, at::TensorList others, const char* name) {
  TORCH_CHECK(others.size() == params.size(), "fusedopt: expected ", params.size(), " ", name,
              ", got ", others.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& t = others[i];
    TORCH_CHECK(t.device().is_cpu(), "fusedopt: ", name, "[", i, "] is on ", t.device(),
                ", expected cpu like its param");
    TORCH_CHECK(t.scalar_type() == p.scalar_type(), "fusedopt: ", name, "[", i, "] has dtype ",
                t.scalar_type(), ", expected ", p.scalar_type(), " like its param");
    TORCH_CHECK(t.sizes() == p.sizes(), "fusedopt: ", name, "[", i, "] has shape ", t.sizes(),
                ", expected ", p.sizes(), " like its param");
  }
}

// Checks the params of one optimizer op (CPU tensors of one float32/bfloat16/float16/float64
// dtype) and every other list against them; returns the params' dtype.
inline at::ScalarType check_param_lists(
    const char* op, at::TensorList params,
    std::initializer_list<std::pair<const char*, at::TensorList>> others) {
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                  dtype == at::kDouble,
              "fusedopt.", op, " (cpu): params must be float32, bfloat16, float16 or float64, got ",
              dtype);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device().is_cpu() && params[i].scalar_type() == dtype, "fusedopt.", op,
                " (cpu): every param must be a CPU tensor of dtype ", dtype, "; param ", i,
                " is ", params[i].scalar_type(), " on ", params[i].device());
  }
  for (const auto& [name, list] : others) check_like_params(params, list, name);
  return dtype;
}

// The kernels stream tensor i of every list as one flat array, which is right when param i is dense
// and the others share its strides. Any other tensor i is updated through contiguous copies,
// written back by write_back().
class FlatLists {
 public:
  explicit FlatLists(std::vector<at::TensorList> lists) : lists_(lists.size()) {
    const at::TensorList params = lists[0];
    for (size_t i = 0; i < params.size(); ++i) {
      bool flat = params[i].is_non_overlapping_and_dense();
      for (const at::TensorList list : lists) {
        flat = flat && list[i].strides() == params[i].strides();
      }
      for (size_t k = 0; k < lists.size(); ++k) {
        at::Tensor t = flat ? lists[k][i] : lists[k][i].contiguous();
        if (!t.is_same(lists[k][i])) copies_.emplace_back(lists[k][i], t);
        lists_[k].push_back(std::move(t));
      }
    }
  }
  const std::vector<at::Tensor>& operator[](size_t k) const { return lists_[k]; }
  void write_back() {
    for (auto& [original, copy] : copies_) original.copy_(copy);
  }

 private:
  std::vector<std::vector<at::Tensor>> lists_;
  std::vector<std::pair<at::Tensor, at::Tensor>> copies_;
};

// Streams every chunk of every tensor through fn(ptrs, tensor, begin, end), in one parallel region:
// ptrs[k] is the data of tensor `tensor` of lists[k], as scalar_t* of the dtype dispatched on.
// Layouts the kernels cannot stream flat go through contiguous copies (FlatLists).
template <typename Fn>
void for_each_chunk(at::ScalarType dtype, const std::vector<at::TensorList>& lists, const Fn& fn) {
  const size_t count = lists[0].size();
  const size_t width = lists.size();
  std::vector<int64_t> numels(count);
  for (size_t i = 0; i < count; ++i) numels[i] = lists[0][i].numel();
  FlatLists flat(lists);
  FUSEDOPT_DISPATCH_OPTIMIZER_TYPES(dtype, "fusedopt_for_each_chunk", [&] {
    std::vector<scalar_t*> ptrs(count * width);
    for (size_t i = 0; i < count; ++i) {
      for (size_t k = 0; k < width; ++k) ptrs[i * width + k] = flat[k][i].data_ptr<scalar_t>();
    }
    parallel_for_chunks(numels, [&](const Chunk& c) {
      fn(ptrs.data() + c.tensor * width, c.tensor, c.begin, c.end);
    });
  });
  flat.write_back();
}

// ---------------------------------------------------------------------------------------------
// The optimizer step driver

// The streams of one optimizer step are tensor i of each of the op's lists, in the op's order:
// the param is stream 0, the grad stream 1, the algorithm's states follow. A stream mask has bit k
// set for stream k.
constexpr int kParamStream = 0;
constexpr int kGradStream = 1;
template <int... kStreams>
constexpr unsigned kStreamMask = (0u | ... | (1u << kStreams));

// Calls fn(std::integral_constant<int, k>{}) for every stream k of K... whose bit is in kMask.
template <unsigned kMask, typename Fn, int... K>
FUSEDOPT_INLINE void for_each_stream(const Fn& fn, std::integer_sequence<int, K...>) {
  (
      [&]() FUSEDOPT_INLINE_LAMBDA {
        if constexpr ((kMask >> K & 1u) != 0) fn(std::integral_constant<int, K>{});
      }(),
      ...);
}

// update(v[0], ..., v[kStreams - 1]).
template <typename Fn, typename V, int... K>
FUSEDOPT_INLINE void apply_to_streams(const Fn& fn, V* v, std::integer_sequence<int, K...>) {
  fn(v[K]...);
}

// The one vector loop of every optimizer step. Over elements [begin, end) of one tensor's streams
// (ptr[k]: the data of stream k), kVecStepOf<scalar_t> elements at a time, it
//   prefetches kPrefetchElements ahead (when set) every stream it loads or stores (for writing
//     if it stores),
//   loads each stream in kLoaded as two compute vectors (fp32, fp64 for fp64 storage); the others
//     are zeros,
//   unscales the grad and stores it back unscaled (unscale.active),
//   runs update(v_0, ..., v_{kStreams - 1}) on the first vector of every stream, then on the
//     second, in place,
//   stores each stream in kStored.
// A stream in neither mask is never touched, ptr[k] included (Adam without amsgrad, SGD without
// momentum); one stored but not loaded is written only (SGD's first momentum step). The masks are
// template arguments, so that which streams move costs no branch in the loop. Forced inline, with
// the update inlined into its loop (see FUSEDOPT_INLINE); an update lambda captures its vector
// constants by value ([=]): captured by reference, GCC re-read some of them from the stack in every
// step (Lion's).
template <int kStreams, unsigned kLoaded, unsigned kStored, typename scalar_t, typename UpdateFn>
FUSEDOPT_INLINE void for_each_step(scalar_t* const* ptr, int64_t begin, int64_t end,
                                   const GradUnscale& unscale, const UpdateFn& update) {
  static_assert(((kLoaded | kStored) >> kStreams) == 0, "a mask names a stream past kStreams");
  static_assert((kLoaded >> kGradStream & 1u) != 0 && (kStored >> kGradStream & 1u) == 0,
                "every step loads its grad and stores it only unscaled");
  using V = ComputeVec<scalar_t>;
  using T = typename V::value_type;
  constexpr auto kAll = std::make_integer_sequence<int, kStreams>{};
  scalar_t* data[kStreams] = {};
  for_each_stream<kLoaded | kStored>([&](auto k) FUSEDOPT_INLINE_LAMBDA { data[k] = ptr[k]; },
                                     kAll);
  const bool unscale_grad = unscale.active;
  const V grad_scale(T(unscale.scale));

  for_each_vector<kVecStepOf<scalar_t>>(begin, end, [&](int64_t i) FUSEDOPT_INLINE_LAMBDA {
    for_each_stream<kLoaded | kStored>([&](auto k) FUSEDOPT_INLINE_LAMBDA {
      prefetch_ahead<(kStored >> decltype(k)::value & 1u) != 0>(data[k], i);
    }, kAll);
  }, [&](int64_t i, int64_t n) FUSEDOPT_INLINE_LAMBDA {
    V lo[kStreams], hi[kStreams];
    for_each_stream<kLoaded>([&](auto k) FUSEDOPT_INLINE_LAMBDA {
      load_float(data[k] + i, n, lo[k], hi[k]);
    }, kAll);
    for_each_stream<~kLoaded>([&](auto k) FUSEDOPT_INLINE_LAMBDA { lo[k] = hi[k] = V(T(0)); },
                              kAll);
    if (unscale_grad) {
      lo[kGradStream] = lo[kGradStream] / grad_scale;
      hi[kGradStream] = hi[kGradStream] / grad_scale;
      store_float(data[kGradStream] + i, n, lo[kGradStream], hi[kGradStream]);
    }
    apply_to_streams(update, lo, kAll);
    apply_to_streams(update, hi, kAll);
    for_each_stream<kStored>([&](auto k) FUSEDOPT_INLINE_LAMBDA {
      store_float(data[k] + i, n, lo[k], hi[k]);
    }, kAll);
  });
}

}  // namespace fusedopt::cpu
