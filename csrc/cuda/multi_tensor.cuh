// Shared machinery of the CUDA multi-tensor optimizer ops (adam.cu, lion.cu, sgd.cu): one step
// kernel and one host launcher (launch_step, at the end), templated over an algorithm's math
// functor. An optimizer's .cu keeps only its functor, its input checks, its op entry points and
// its registration.
//
// Layout of the work (multi-tensor apply): every tensor is cut into chunks of kChunkSize elements,
// each CUDA block updates one chunk, and one launch carries the addresses of up to kMaxTensors
// tensors and kMaxBlocks chunks in its kernel arguments (TensorListArgs); multi_tensor_apply
// launches as often as needed to cover every tensor. Inside a kernel, for_each_element streams one
// chunk of every list through an element-wise update in opmath registers, with 128-bit loads and
// stores wherever the chunk is aligned.
//
// Rounding (docs/numerics.md): contraction is off by build flag. Every .cu is compiled with
// --fmad=false (setup.py, tests/test_cuda_build.py), so `a * b + c` rounds the product and the sum
// separately, as the reference's separate torch ops do; the functors write no FMA. Division and
// sqrt are IEEE round-to-nearest by nvcc's defaults (-prec-div=true -prec-sqrt=true -ftz=false,
// which only --use_fast_math changes, and nothing passes it): plain `/` and `sqrt` compile to the
// same div.rn / sqrt.rn instructions as __fdiv_rn / __fsqrt_rn, so no helper spells them out.
//
// Nothing here reads a device value on the host: lr (tensor_lr overloads), grad_scale,
// found_inf and step counters reach the kernels as device pointers, so the ops are safe to
// capture in a CUDA graph. Only a CPU lr tensor is read on the host, which needs no sync.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace fusedopt {
namespace cuda {

constexpr int64_t kChunkSize = 65536;  // elements per CUDA block
constexpr int kBlockThreads = 512;
constexpr int kVecBytes = 16;          // widest global load/store: 128 bits
constexpr int kMaxArgBytes = 4096;     // kernel parameter limit on every CUDA version we support

// ---------------------------------------------------------------------------------------------
// Kernel arguments

// Per-tensor metadata an op may carry beside the addresses (Adam: its step counter). NoMeta
// carries none and costs no argument bytes (the table below is an empty base then).
struct NoMeta {};

template <typename Meta, int kMaxTensors>
struct MetaTable {
  Meta meta[kMaxTensors];
};
template <int kMaxTensors>
struct MetaTable<NoMeta, kMaxTensors> {};

// Everything one launch needs to find its chunks; passed by value as a kernel argument.
// Block b updates chunk block_chunk[b] of slot block_tensor[b]; slot t has numels[t] elements and
// its tensor of list l starts at ptrs[l][t].
template <int kLists_, int kMaxTensors_, int kMaxBlocks_, typename Meta = NoMeta>
struct TensorListArgs : MetaTable<Meta, kMaxTensors_> {
  static constexpr int kLists = kLists_;
  static constexpr int kMaxTensors = kMaxTensors_;
  static constexpr int kMaxBlocks = kMaxBlocks_;
  using MetaType = Meta;
  static_assert(kLists >= 1 && kLists <= 8, "1 to 8 tensor lists");
  static_assert(kMaxTensors >= 1 && kMaxTensors <= 256, "block_tensor is a uint8_t");
  static_assert(kMaxBlocks >= 1, "at least one block per launch");

  void* ptrs[kLists][kMaxTensors];
  int64_t numels[kMaxTensors];
  uint8_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

// The chunk this block updates: slot `tensor`, elements [begin, begin + n) of each of its lists.
struct ChunkRange {
  int tensor;
  int64_t begin;
  int64_t n;
};

template <typename Args>
__device__ __forceinline__ ChunkRange this_blocks_chunk(const Args& args) {
  const int t = args.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(args.block_chunk[blockIdx.x]) * kChunkSize;
  const int64_t left = args.numels[t] - begin;
  return {t, begin, left < kChunkSize ? left : kChunkSize};
}

// This chunk's start in every list, as scalar_t*.
template <typename scalar_t, typename Args>
__device__ __forceinline__ void chunk_pointers(const Args& args, const ChunkRange& chunk,
                                               scalar_t* (&ptrs)[Args::kLists]) {
#pragma unroll
  for (int l = 0; l < Args::kLists; ++l) {
    ptrs[l] = static_cast<scalar_t*>(args.ptrs[l][chunk.tensor]) + chunk.begin;
  }
}

// ---------------------------------------------------------------------------------------------
// Device-side memory helpers

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

__device__ __forceinline__ bool is_vec_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0;
}

template <typename VecT>
__device__ __forceinline__ VecT load_vec(const void* base, int64_t i) {
  return static_cast<const VecT*>(base)[i];
}

template <typename VecT>
__device__ __forceinline__ void store_vec(void* base, int64_t i, const VecT& value) {
  static_cast<VecT*>(base)[i] = value;
}

// Applies op(x) to every element of one chunk, the block's threads striding over it.
// x is an opmath_t[kLists] (fp32 for fp32/fp16/bf16 storage, fp64 for fp64) holding element i of
// every list; op updates it in place. Bit l of load_mask: list l is read (else x[l] starts at 0,
// for lists the update only writes); bit l of store_mask: x[l] is written back. The masks must be
// the same for every thread of the block.
//
// 128-bit loads/stores when every list's chunk start is aligned (chunk starts are multiples of
// kChunkSize elements, so this is the tensors' own alignment); the rest goes element by element.
template <typename scalar_t, int kLists, typename Op>
__device__ __forceinline__ void for_each_element(scalar_t* const (&ptrs)[kLists], int64_t n,
                                                 unsigned load_mask, unsigned store_mask,
                                                 const Op& op) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = kVecBytes / sizeof(scalar_t);
  using VecT = Vec<scalar_t, kVec>;

  bool vectorize = true;
#pragma unroll
  for (int l = 0; l < kLists; ++l) vectorize = vectorize && is_vec_aligned(ptrs[l]);
  const int64_t n_vec = vectorize ? n / kVec : 0;

  for (int64_t i = threadIdx.x; i < n_vec; i += blockDim.x) {
    VecT in[kLists];
#pragma unroll
    for (int l = 0; l < kLists; ++l) {
      if (load_mask & (1u << l)) in[l] = load_vec<VecT>(ptrs[l], i);
    }
    VecT out[kLists];
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      opmath_t x[kLists];
#pragma unroll
      for (int l = 0; l < kLists; ++l) {
        x[l] = (load_mask & (1u << l)) ? static_cast<opmath_t>(in[l].v[k]) : opmath_t(0);
      }
      op(x);
#pragma unroll
      for (int l = 0; l < kLists; ++l) out[l].v[k] = static_cast<scalar_t>(x[l]);
    }
#pragma unroll
    for (int l = 0; l < kLists; ++l) {
      if (store_mask & (1u << l)) store_vec<VecT>(ptrs[l], i, out[l]);
    }
  }
  for (int64_t i = n_vec * kVec + threadIdx.x; i < n; i += blockDim.x) {
    opmath_t x[kLists];
#pragma unroll
    for (int l = 0; l < kLists; ++l) {
      x[l] = (load_mask & (1u << l)) ? static_cast<opmath_t>(ptrs[l][i]) : opmath_t(0);
    }
    op(x);
#pragma unroll
    for (int l = 0; l < kLists; ++l) {
      if (store_mask & (1u << l)) ptrs[l][i] = static_cast<scalar_t>(x[l]);
    }
  }
}

// Bit mask with bits [0, count) set.
__host__ __device__ constexpr unsigned all_lists(int count) {
  return count >= 32 ? ~0u : (1u << count) - 1u;
}
__host__ __device__ constexpr unsigned list_bit(int l) { return 1u << l; }

// ---------------------------------------------------------------------------------------------
// Scalars that must not be read on the host

// Device pointers to the float32 copies of the step's device scalars; nullptr where absent.
struct ScalarPointers {
  const float* lr;          // tensor_lr overload with a CUDA lr; else nullptr: use the host lr
  const float* grad_scale;  // nullptr: grads are not scaled
  const float* found_inf;   // nullptr: never skip
};

// GradScaler found inf/nan in the grads: the step is skipped and nothing may change.
__device__ __forceinline__ bool skip_step(const ScalarPointers& s) {
  return s.found_inf != nullptr && *s.found_inf != 0.f;
}

__device__ __forceinline__ double read_lr(const ScalarPointers& s, double host_lr) {
  return s.lr != nullptr ? static_cast<double>(*s.lr) : host_lr;
}

// A 1-element tensor on `device`, as float32 (GradScaler's own dtype; others are converted with
// an asynchronous copy on the current stream, never a host sync).
inline at::Tensor device_scalar_as_float(const char* op, const at::Tensor& t, const char* name,
                                         c10::Device device) {
  TORCH_CHECK(t.numel() == 1, "fusedopt::", op, ": ", name,
              " must have exactly one element, got ", t.numel());
  TORCH_CHECK(t.device() == device, "fusedopt::", op, ": ", name, " must be on ", device,
              " like the params, got ", t.device(), "; move it with .to(", device, ")");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) || at::isIntegralType(t.scalar_type(), true),
              "fusedopt::", op, ": ", name, " must be a real number tensor, got dtype ",
              t.scalar_type());
  return t.to(at::kFloat);
}

// The lr of one step as its op received it: a Python float (the default overload) or a
// 1-element tensor (the tensor_lr overload). Converts from either, so that one templated entry
// point serves both overloads.
struct LrArg {
  double value = 0.0;
  const at::Tensor* tensor = nullptr;  // the tensor_lr overload's lr; outlives the call

  LrArg(double lr) : value(lr) {}               // NOLINT(google-explicit-constructor)
  LrArg(const at::Tensor& lr) : tensor(&lr) {}  // NOLINT(google-explicit-constructor)
};

// lr, grad_scale and found_inf of one step, resolved for the kernels. Owns the float32 copies
// until the launches are queued (the caching allocator orders any reuse of their memory after
// this stream's work). Construct it under the params' device guard.
struct StepScalars {
  double lr = 0.0;         // the host lr (float overload, or a CPU lr tensor)
  // The dtype the reference computes lr's own arithmetic in (e.g. 1 - lr * weight_decay): float64
  // for a Python float, else the lr tensor's dtype.
  at::ScalarType lr_dtype = at::kDouble;
  ScalarPointers ptrs{nullptr, nullptr, nullptr};
  at::Tensor lr_f, grad_scale_f, found_inf_f;

  StepScalars(const char* op, const LrArg& lr_arg, const std::optional<at::Tensor>& grad_scale,
              const std::optional<at::Tensor>& found_inf, c10::Device device)
      : lr(lr_arg.value) {
    if (lr_arg.tensor != nullptr) {
      const at::Tensor& lr_tensor = *lr_arg.tensor;
      lr_dtype = lr_tensor.scalar_type();
      if (lr_tensor.device().is_cpu()) {
        TORCH_CHECK(lr_tensor.numel() == 1, "fusedopt::", op,
                    ": lr must have exactly one element, got ", lr_tensor.numel());
        lr = lr_tensor.item<double>();  // host memory: reading it does not sync
      } else {
        lr_f = device_scalar_as_float(op, lr_tensor, "lr", device);
        ptrs.lr = lr_f.data_ptr<float>();
      }
    }
    if (grad_scale.has_value()) {
      grad_scale_f = device_scalar_as_float(op, *grad_scale, "grad_scale", device);
      ptrs.grad_scale = grad_scale_f.data_ptr<float>();
    }
    if (found_inf.has_value()) {
      found_inf_f = device_scalar_as_float(op, *found_inf, "found_inf", device);
      ptrs.found_inf = found_inf_f.data_ptr<float>();
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Input checks

struct NamedList {
  const char* name;
  at::TensorList tensors;
};

// Every list has as many tensors as the first (the params).
inline void check_same_lengths(const char* op, const std::vector<NamedList>& lists) {
  const size_t n = lists[0].tensors.size();
  for (size_t l = 1; l < lists.size(); ++l) {
    TORCH_CHECK(lists[l].tensors.size() == n, "fusedopt::", op, ": ", lists[l].name, " has ",
                lists[l].tensors.size(), " tensors but ", lists[0].name, " has ", n,
                "; pass exactly one per param");
  }
}

// Checks what the kernels assume of non-empty lists of equal length, lists[0] being the params:
// CUDA tensors on one device, of float32/float16/bfloat16/float64, each param dense and
// non-overlapping, and tensor i of every list with param i's dtype, sizes and strides (so their
// flat storage orders agree element by element). Returns the device.
inline c10::Device check_tensor_lists(const char* op, const std::vector<NamedList>& lists) {
  const at::TensorList params = lists[0].tensors;
  const char* pname = lists[0].name;
  TORCH_INTERNAL_ASSERT(!params.empty());
  const c10::Device device = params[0].device();
  TORCH_CHECK(device.is_cuda(), "fusedopt::", op, " (CUDA): ", pname,
              " must be CUDA tensors, got ", device);
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), "fusedopt::", op, ": ", pname, "[", i, "] is undefined");
    const auto dtype = p.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                    dtype == at::kDouble,
                "fusedopt::", op, " (CUDA): ", pname, "[", i, "] has dtype ", dtype,
                "; supported are float32, float16, bfloat16 and float64");
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "fusedopt::", op, " (CUDA): ", pname, "[", i,
                "] must be dense and non-overlapping (e.g. contiguous); call .contiguous() on it");
    for (const NamedList& list : lists) {
      const at::Tensor& t = list.tensors[i];
      TORCH_CHECK(t.defined(), "fusedopt::", op, ": ", list.name, "[", i, "] is undefined");
      TORCH_CHECK(t.device() == device, "fusedopt::", op, ": ", list.name, "[", i, "] is on ",
                  t.device(), " but ", pname, "[0] is on ", device,
                  "; all tensors must share a device");
      TORCH_CHECK(t.scalar_type() == dtype, "fusedopt::", op, ": ", list.name, "[", i,
                  "] has dtype ", t.scalar_type(), " but ", pname, "[", i, "] has ", dtype,
                  "; states and grads must have their param's dtype");
      TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), "fusedopt::", op, ": ",
                  list.name, "[", i, "] has sizes ", t.sizes(), " and strides ", t.strides(),
                  " but ", pname, "[", i, "] has ", p.sizes(), " and ", p.strides(),
                  "; make them the same layout (e.g. all contiguous)");
    }
  }
  return device;
}

// Per-tensor step counters (Adam's state_steps): one 1-element float32 tensor per param, on the
// params' device.
inline void check_step_counters(const char* op, at::TensorList state_steps, c10::Device device) {
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const at::Tensor& step = state_steps[i];
    TORCH_CHECK(step.defined() && step.scalar_type() == at::kFloat && step.numel() == 1 &&
                    step.device() == device,
                "fusedopt::", op, " (CUDA): state_steps[", i, "] must be a 1-element float32 "
                "tensor on ", device, ", got ", step.scalar_type(), " with ", step.numel(),
                " elements on ", step.device());
  }
}

// The indices of the params of each storage dtype: one kernel instantiation per dtype, so each
// dtype's tensors are launched separately.
inline std::vector<std::pair<at::ScalarType, std::vector<size_t>>> group_by_dtype(
    at::TensorList params) {
  std::vector<std::pair<at::ScalarType, std::vector<size_t>>> groups;
  for (const auto dtype : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
    std::vector<size_t> indices;
    for (size_t i = 0; i < params.size(); ++i) {
      if (params[i].scalar_type() == dtype) indices.push_back(i);
    }
    if (!indices.empty()) groups.emplace_back(dtype, std::move(indices));
  }
  return groups;
}

// ---------------------------------------------------------------------------------------------
// The launch loop

// Covers the tensors at `indices` of `lists` (Args::kLists lists, all of one dtype) with as few
// launches as the argument table allows: launch(args, nblocks) queues one kernel over the first
// nblocks entries of args; meta_of(i) gives tensor i's per-tensor metadata (ignored with NoMeta).
// Empty tensors get no block.
template <typename Args, typename LaunchFn, typename MetaFn>
void multi_tensor_apply(const std::vector<at::TensorList>& lists,
                        const std::vector<size_t>& indices, const LaunchFn& launch,
                        const MetaFn& meta_of) {
  constexpr bool kHasMeta = !std::is_same_v<typename Args::MetaType, NoMeta>;
  TORCH_INTERNAL_ASSERT(static_cast<int>(lists.size()) == Args::kLists);
  Args args;
  int ntensors = 0;
  int nblocks = 0;
  for (size_t i : indices) {
    const int64_t numel = lists[0][i].numel();
    if (numel == 0) continue;
    int slot = ntensors++;
    for (int l = 0; l < Args::kLists; ++l) args.ptrs[l][slot] = lists[l][i].data_ptr();
    args.numels[slot] = numel;
    if constexpr (kHasMeta) args.meta[slot] = meta_of(i);

    const int64_t nchunks = (numel + kChunkSize - 1) / kChunkSize;
    TORCH_CHECK(nchunks <= std::numeric_limits<int32_t>::max(), "fusedopt: tensor ", i,
                " has too many elements (", numel, ")");
    for (int64_t chunk = 0; chunk < nchunks; ++chunk) {
      args.block_tensor[nblocks] = static_cast<uint8_t>(slot);
      args.block_chunk[nblocks] = static_cast<int32_t>(chunk);
      ++nblocks;
      const bool last_chunk = chunk == nchunks - 1;
      if (nblocks == Args::kMaxBlocks || (last_chunk && ntensors == Args::kMaxTensors)) {
        launch(args, nblocks);
        nblocks = 0;
        if (last_chunk) {
          ntensors = 0;
        } else {
          // This tensor still has chunks: it becomes slot 0 of the next launch.
          for (int l = 0; l < Args::kLists; ++l) args.ptrs[l][0] = args.ptrs[l][slot];
          args.numels[0] = args.numels[slot];
          if constexpr (kHasMeta) args.meta[0] = args.meta[slot];
          slot = 0;
          ntensors = 1;
        }
      }
    }
  }
  if (nblocks > 0) launch(args, nblocks);
}

// ---------------------------------------------------------------------------------------------
// The step kernel and its launcher, shared by every optimizer
//
// An optimizer's math is a functor type (AdamMath, LionMath, SgdMath) of this shape:
//
//   struct SomeMath {
//     // Lists streamed: params, grads, then states; kMaxLists = kMinLists + 1 when the last
//     // one is optional (Adam's max_exp_avg_sqs, SGD's momentum_buffers).
//     static constexpr int kMinLists = 3, kMaxLists = 3;
//     static constexpr bool kCountsSteps = true;  // optional (default false): one step counter
//                                                 // per tensor (Adam's state_steps)
//     double beta1, ...;                          // this call's hyper-parameters (host values)
//
//     template <typename opmath_t, int kLists>
//     struct Update {
//       // This block's scalars, from the hyper-parameters and the driver's BlockScalars.
//       __device__ Update(const SomeMath& math, const BlockScalars& block);
//       // One element: x[l] is element i of list l, in opmath_t, updated in place.
//       __device__ void operator()(opmath_t (&x)[kLists]) const;
//     };
//   };
//
// The functor is the algorithm's arithmetic and nothing else. launch_step owns the rest: the
// checks every list shares, the device guard and stream, grouping by dtype and dispatch, the
// lr tensor, grad_scale and found_inf pointers, chunking and repeated launches, aligned 128-bit
// loads and stores and the element tails, the found_inf skip, the step counters, and unscaling:
// x[1] (the grads) reaches the functor already divided by grad_scale, and is written back only
// when it was.

// What the driver resolves for a block before its elements.
struct BlockScalars {
  double lr;       // this step's lr: read through the lr tensor's device pointer, or the host's
  bool lr_single;  // lr came as a float32 tensor: the reference does lr's own arithmetic
                   // (e.g. 1 - lr * weight_decay) in float32 then, in float64 for a Python float
  double step;     // with step counters: the step this call counts as (counter + 1); else 0
};

// The call's constants, passed to every launch beside the tensor table.
struct CallArgs {
  ScalarPointers ptrs;
  double lr;              // the host lr; ptrs.lr, when set, replaces it on the device
  bool lr_single;         // see BlockScalars
  unsigned unread_lists;  // bit l: list l is only written by this call, never read
};

// Math::kCountsSteps where Math declares it, else false.
template <typename Math, typename = void>
constexpr bool kCountsStepsOf = false;
template <typename Math>
constexpr bool kCountsStepsOf<Math, std::void_t<decltype(Math::kCountsSteps)>> =
    Math::kCountsSteps;

constexpr int kStepMaxBlocks = 320;

template <typename Math, int kLists, int kMaxTensors>
using StepArgsOf =
    TensorListArgs<kLists, kMaxTensors, kStepMaxBlocks,
                   std::conditional_t<kCountsStepsOf<Math>, const float*, NoMeta>>;

template <typename Math, int kLists, int kMaxTensors>
constexpr bool step_args_fit() {
  return sizeof(StepArgsOf<Math, kLists, kMaxTensors>) + sizeof(Math) + sizeof(CallArgs) <=
         static_cast<size_t>(kMaxArgBytes);
}

// One launch's table: 64 tensors where the kernel arguments have room for them, else 32.
template <typename Math, int kLists>
using StepArgs = StepArgsOf<Math, kLists, step_args_fit<Math, kLists, 64>() ? 64 : 32>;

template <typename scalar_t, typename Math, typename Args>
__global__ void __launch_bounds__(kBlockThreads)
    step_kernel(const Args args, const Math math, const CallArgs call) {
  if (skip_step(call.ptrs)) return;

  using opmath_t = at::opmath_type<scalar_t>;  // fp32 for fp32/fp16/bf16 storage, fp64 for fp64
  constexpr int kLists = Args::kLists;
  const ChunkRange chunk = this_blocks_chunk(args);
  scalar_t* ptrs[kLists];
  chunk_pointers<scalar_t>(args, chunk, ptrs);

  // The counters are advanced only after every block of the call (increment_steps_kernel), so no
  // block sees a counter another one has bumped. Every thread computes the block's scalars
  // itself: a few flops against the ~128 elements each then updates, and no __syncthreads.
  BlockScalars block{read_lr(call.ptrs, call.lr), call.lr_single, 0.0};
  if constexpr (kCountsStepsOf<Math>) {
    block.step = static_cast<double>(*args.meta[chunk.tensor]) + 1.0;
  }
  const typename Math::template Update<opmath_t, kLists> update(math, block);
  const bool unscale = call.ptrs.grad_scale != nullptr;
  const opmath_t grad_scale = unscale ? static_cast<opmath_t>(*call.ptrs.grad_scale) : opmath_t(1);

  constexpr unsigned kAll = all_lists(kLists);
  const unsigned load_mask = kAll & ~call.unread_lists;
  const unsigned store_mask = unscale ? kAll : kAll & ~list_bit(1);
  for_each_element(ptrs, chunk.n, load_mask, store_mask, [&](opmath_t (&x)[kLists]) {
    if (unscale) x[1] = x[1] / grad_scale;
    update(x);
  });
}

// A kernel that is not a template has internal linkage here, and so has its launcher: each .cu
// gets its own copy, where one definition in several objects of the library would not link.
namespace {

constexpr int kMaxStepCounters = 448;
struct StepCounterArgs {
  float* steps[kMaxStepCounters];
};
static_assert(sizeof(StepCounterArgs) + sizeof(int) + sizeof(ScalarPointers) <= kMaxArgBytes,
              "kernel arguments too large");

// Advances the step counters; launched after every step_kernel of the call (same stream), so it
// cannot race with their reads. Like the update, it is a no-op when found_inf is set.
__global__ void increment_steps_kernel(const StepCounterArgs args, int count,
                                       const ScalarPointers s) {
  if (skip_step(s)) return;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < count) *args.steps[i] += 1.f;
}

inline void launch_increment_steps(at::TensorList state_steps, const ScalarPointers& s,
                                   cudaStream_t stream) {
  constexpr int kThreads = 128;
  for (size_t begin = 0; begin < state_steps.size(); begin += kMaxStepCounters) {
    const int count =
        static_cast<int>(std::min<size_t>(kMaxStepCounters, state_steps.size() - begin));
    StepCounterArgs args;
    for (int k = 0; k < count; ++k) args.steps[k] = state_steps[begin + k].data_ptr<float>();
    increment_steps_kernel<<<(count + kThreads - 1) / kThreads, kThreads, 0, stream>>>(args, count,
                                                                                       s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

// Queues step_kernel over the tensors at `indices` (all of dtype scalar_t) of kLists lists.
template <typename scalar_t, typename Math, int kLists>
void launch_step_kernels(const std::vector<at::TensorList>& lists,
                         const std::vector<size_t>& indices, const Math& math,
                         const CallArgs& call, at::TensorList state_steps, cudaStream_t stream) {
  using Args = StepArgs<Math, kLists>;
  static_assert(step_args_fit<Math, kLists, Args::kMaxTensors>(), "kernel arguments too large");
  multi_tensor_apply<Args>(
      lists, indices,
      [&](const Args& args, int nblocks) {
        step_kernel<scalar_t><<<nblocks, kBlockThreads, 0, stream>>>(args, math, call);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      },
      [&](size_t i) -> typename Args::MetaType {
        if constexpr (kCountsStepsOf<Math>) {
          return state_steps[i].data_ptr<float>();
        } else {
          return NoMeta{};
        }
      });
}

// One optimizer step of `math` over `lists` (params first, grads second, then the states; the
// optional last list present or not), as op `op`. The caller has checked what is particular to
// its op, including that every list (and state_steps, with step counters) has one tensor per
// param. unread_lists: lists this call only writes (bit l for list l), e.g. SGD's buffers on its
// first step.
template <typename Math>
void launch_step(const char* op, const std::vector<NamedList>& lists, const Math& math,
                 const LrArg& lr, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf, at::TensorList state_steps = {},
                 unsigned unread_lists = 0u) {
  static_assert(Math::kMinLists >= 2 &&
                    (Math::kMaxLists == Math::kMinLists || Math::kMaxLists == Math::kMinLists + 1),
                "params, grads, then states, of which only the last may be optional");
  const at::TensorList params = lists[0].tensors;
  if (params.empty()) return;
  const c10::Device device = check_tensor_lists(op, lists);
  if constexpr (kCountsStepsOf<Math>) {
    TORCH_INTERNAL_ASSERT(state_steps.size() == params.size());
    check_step_counters(op, state_steps, device);
  }
  const int nlists = static_cast<int>(lists.size());
  TORCH_INTERNAL_ASSERT(nlists == Math::kMinLists || nlists == Math::kMaxLists);
  std::vector<at::TensorList> tensor_lists;
  for (const NamedList& list : lists) tensor_lists.push_back(list.tensors);

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const StepScalars scalars(op, lr, grad_scale, found_inf, device);
  const CallArgs call{scalars.ptrs, scalars.lr, scalars.lr_dtype != at::kDouble, unread_lists};

  for (const auto& group : group_by_dtype(params)) {
    const std::vector<size_t>& indices = group.second;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.first, "fusedopt step", [&] {
      if (nlists == Math::kMaxLists) {
        launch_step_kernels<scalar_t, Math, Math::kMaxLists>(tensor_lists, indices, math, call,
                                                             state_steps, stream);
      } else {
        launch_step_kernels<scalar_t, Math, Math::kMinLists>(tensor_lists, indices, math, call,
                                                             state_steps, stream);
      }
    });
  }
  if constexpr (kCountsStepsOf<Math>) launch_increment_steps(state_steps, call.ptrs, stream);
}

}  // namespace cuda
}  // namespace fusedopt
