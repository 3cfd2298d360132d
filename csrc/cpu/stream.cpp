// Bandwidth probes. stream_rmw_: out[k] += src for every k, chunked and threaded exactly like the
// optimizer kernels, so "% of bandwidth" compares an optimizer step against the same access
// pattern. stream_sum: a fresh output = the sum of its inputs, written as the norm kernels write
// theirs, the bytes floor of an op that reads those inputs and returns a new tensor.
#include <torch/library.h>

#include <vector>

#include "multi_tensor.h"
#include "norm_rows.h"  // kMinElementsPerTask: threads take runs of elements as the norms take rows
#include "streaming_store.h"

namespace fusedopt::cpu {
namespace {

void stream_rmw_cpu(at::TensorList outs, const at::Tensor& src) {
  TORCH_CHECK(src.device().is_cpu() && src.scalar_type() == at::kFloat && src.is_contiguous(),
              "fusedopt.stream_rmw_ (cpu): src must be a contiguous float32 CPU tensor");
  for (const at::Tensor& out : outs) {
    TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                    out.sizes() == src.sizes(),
                "fusedopt.stream_rmw_ (cpu): every out must be a contiguous float32 CPU tensor "
                "shaped like src");
  }
  const float* in = src.const_data_ptr<float>();
  std::vector<float*> dst;
  for (const at::Tensor& out : outs) dst.push_back(out.data_ptr<float>());
  // One "tensor" of src.numel() elements; every out is streamed over the same chunk.
  parallel_for_chunks({src.numel()}, [&](const Chunk& c) {
    for_each_vector(c.begin, c.end, [&](int64_t i) {
      prefetch_ahead<false>(in, i);  // as the optimizer kernels do
      for (float* d : dst) prefetch_ahead<true>(d, i);
    }, [&](int64_t i, int64_t n) {
      Vec s0, s1, o0, o1;
      load_float(in + i, n, s0, s1);
      for (float* d : dst) {
        load_float(d + i, n, o0, o1);
        store_float(d + i, n, o0 + s0, o1 + s1);
      }
    });
  });
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
