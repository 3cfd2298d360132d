// The bandwidth probe: out[k] += src for every k, chunked and threaded exactly like the optimizer
// kernels, so "% of bandwidth" compares an optimizer step against the same access pattern.
#include <torch/library.h>

#include "multi_tensor.h"

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

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) { m.impl("stream_rmw_", &fusedopt::cpu::stream_rmw_cpu); }
