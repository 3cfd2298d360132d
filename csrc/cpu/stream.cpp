// Bandwidth probes. stream_rmw_: out[k] += src for every k (a 1-byte out: += 1), chunked and
// threaded exactly like the optimizer kernels, so "% of bandwidth" compares an optimizer step
// against the same access pattern; outs of mixed dtypes make a lean step's pattern (say fp32
// params with 8-bit moments: an fp32 out, two uint8 outs, an fp32 src). stream_sum: a fresh
// output = the sum of its inputs, written as the norm kernels write theirs, the bytes floor of an
// op that reads those inputs and returns a new tensor.
#include <torch/library.h>

#include <vector>

#include "multi_tensor.h"
#include "norm_rows.h"  // kMinElementsPerTask: threads take runs of elements as the norms take rows
#include "streaming_store.h"

namespace fusedopt::cpu {
namespace {

// A stream_rmw_ out: its data and how its elements are read and written.
struct RmwStream {
  void* data;
  at::ScalarType dtype;  // float32, bfloat16, or a 1-byte dtype
};

template <typename src_t>
void stream_rmw_typed(const std::vector<RmwStream>& dst, const src_t* in, int64_t numel) {
  // One "tensor" of numel elements; every out is streamed over the same chunk.
  parallel_for_chunks({numel}, [&](const Chunk& c) {
    for_each_vector(c.begin, c.end, [&](int64_t i) {
      prefetch_ahead<false>(in, i);  // as the optimizer kernels do
      for (const RmwStream& d : dst) {
        if (d.dtype == at::kFloat) prefetch_ahead<true>(static_cast<float*>(d.data), i);
      }
    }, [&](int64_t i, int64_t n) {
      Vec s0, s1;
      load_float(in + i, n, s0, s1);
      const auto add_src = [&](auto* out) {
        Vec o0, o1;
        load_float(out, n, o0, o1);
        store_float(out, n, o0 + s0, o1 + s1);
      };
      for (const RmwStream& d : dst) {
        if (d.dtype == at::kFloat) {
          add_src(static_cast<float*>(d.data) + i);
        } else if (d.dtype == at::kBFloat16) {
          add_src(static_cast<c10::BFloat16*>(d.data) + i);
        } else {
          // Codes: a plain loop, which the compiler vectorizes (at::vec's partial byte vectors,
          // kVecStep of Vectorized<uint8_t>::size(), go through memcpy on AVX2 and made this
          // probe slower than the steps it bounds).
          uint8_t* out = static_cast<uint8_t*>(d.data) + i;
          for (int64_t j = 0; j < n; ++j) out[j] = static_cast<uint8_t>(out[j] + 1);
        }
      }
    });
  });
}

void stream_rmw_cpu(at::TensorList outs, const at::Tensor& src) {
  TORCH_CHECK(src.device().is_cpu() && src.is_contiguous() &&
                  (src.scalar_type() == at::kFloat || src.scalar_type() == at::kBFloat16),
              "fusedopt.stream_rmw_ (cpu): src must be a contiguous float32 or bfloat16 CPU "
              "tensor");
  std::vector<RmwStream> dst;
  for (const at::Tensor& out : outs) {
    const at::ScalarType dtype = out.scalar_type();
    TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.sizes() == src.sizes() &&
                    (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kByte ||
                     dtype == at::kChar),
                "fusedopt.stream_rmw_ (cpu): every out must be a contiguous float32, bfloat16, "
                "uint8 or int8 CPU tensor shaped like src");
    dst.push_back({out.data_ptr(), dtype});
  }
  if (src.scalar_type() == at::kFloat) {
    stream_rmw_typed(dst, src.const_data_ptr<float>(), src.numel());
  } else {
    stream_rmw_typed(dst, src.const_data_ptr<c10::BFloat16>(), src.numel());
  }
}

at::Tensor stream_sum_cpu(at::TensorList inputs) {
  TORCH_CHECK(!inputs.empty(), "fusedopt.stream_sum (cpu): needs at least one input");
  const at::Tensor& first = inputs[0];
  for (const at::Tensor& t : inputs) {
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.sizes() == first.sizes() &&
                    t.scalar_type() == first.scalar_type() &&
                    (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                     t.scalar_type() == at::kHalf),
                "fusedopt.stream_sum (cpu): inputs must be contiguous CPU tensors of one shape "
                "and one dtype (float32, bfloat16 or float16)");
  }
  at::Tensor out = at::empty_like(first, at::MemoryFormat::Contiguous);
  const int64_t numel = out.numel();
  if (numel == 0) return out;
  const bool stream = should_stream(out);
  FUSEDOPT_DISPATCH_PARAM_TYPES(first.scalar_type(), "fusedopt_stream_sum", [&] {
    std::vector<const scalar_t*> src;
    for (const at::Tensor& t : inputs) src.push_back(t.const_data_ptr<scalar_t>());
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, numel, kMinElementsPerTask, [&](int64_t begin, int64_t end) {
      write_row(dst + begin, end - begin, stream,
                [&](int64_t i, int64_t count, bool, Vec& lo, Vec& hi) {
                  load_float(src[0] + begin + i, count, lo, hi);
                  for (size_t k = 1; k < src.size(); ++k) {
                    Vec a, b;
                    load_float(src[k] + begin + i, count, a, b);
                    lo = lo + a;
                    hi = hi + b;
                  }
                });
      if (stream) stream_fence();
    });
  });
  return out;
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("stream_rmw_", &fusedopt::cpu::stream_rmw_cpu);
  m.impl("stream_sum", &fusedopt::cpu::stream_sum_cpu);
}
