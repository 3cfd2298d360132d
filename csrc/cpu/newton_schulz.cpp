// CPU Newton-Schulz iteration of Muon over a batch of matrices. The math is
// fusedopt/reference.py::newton_schulz; the op's contract is in csrc/fusedopt.cpp.
//
// Two of each iteration's three products are symmetric: A = X X^T, and b A + c A A (A is
// symmetric, so A A = A A^T). Each is computed on a grid of row blocks, only the blocks on and
// above the diagonal (3 of 4 GEMMs for a 2 x 2 grid), each mirrored below; the third product,
// a X + B X, is one batched GEMM. The GEMMs are ATen's (oneDNN / MKL), in the requested dtype
// with fp32 accumulation.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace fusedopt::cpu {
namespace {

// Row blocks per side of the symmetric products, by the side m of A. Smaller GEMMs run below
// peak, so small matrices are not split: on a 2-core AMD EPYC (avx512_bf16), 2 x 2 blocks took
// a 1024 x 1024 bf16 X X^T from ~5.0 to ~3.7 ms, and 4 x 4 gained little more in the whole
// iteration; at m = 384 the 2 x 2 grid still gained, less.
int symmetric_blocks(int64_t m) { return m >= 256 ? 2 : 1; }

// out = alpha * left @ left^T + beta * c (c undefined: no term), for left (batch, m, k) and
// out, c (batch, m, m); only the upper blocks are multiplied, each mirrored below.
void symmetric_product(const at::Tensor& left, const at::Tensor& out, const at::Tensor& c,
                       double beta, double alpha) {
  const int64_t m = left.size(1);
  const int blocks = symmetric_blocks(m);
  std::vector<int64_t> edges(blocks + 1);
  for (int i = 0; i <= blocks; ++i) edges[i] = m * i / blocks;
  for (int i = 0; i < blocks; ++i) {
    const at::Tensor left_i = left.narrow(1, edges[i], edges[i + 1] - edges[i]);
    for (int j = i; j < blocks; ++j) {
      const at::Tensor right_j =
          left.narrow(1, edges[j], edges[j + 1] - edges[j]).transpose(1, 2);
      at::Tensor block = out.narrow(1, edges[i], edges[i + 1] - edges[i])
                             .narrow(2, edges[j], edges[j + 1] - edges[j]);
      if (c.defined()) {
        const at::Tensor c_block = c.narrow(1, edges[i], edges[i + 1] - edges[i])
                                       .narrow(2, edges[j], edges[j + 1] - edges[j]);
        block.copy_(at::baddbmm(c_block, left_i, right_j, beta, alpha));
      } else {
        block.copy_(at::bmm(left_i, right_j));
      }
      if (j > i) {
        out.narrow(1, edges[j], edges[j + 1] - edges[j])
            .narrow(2, edges[i], edges[i + 1] - edges[i])
            .copy_(block.transpose(1, 2));
      }
    }
  }
}

at::Tensor newton_schulz_cpu(const at::Tensor& x, at::ArrayRef<double> coefficients, double eps,
                             at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 3 && x.device().is_cpu() && at::isFloatingType(x.scalar_type()),
              "fusedopt.newton_schulz (cpu): x must be a (batch, rows, cols) floating-point CPU "
              "tensor, got ", x.sizes(), " ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble,
              "fusedopt.newton_schulz (cpu): dtype must be float32, bfloat16 or float64, got ",
              dtype);
  TORCH_CHECK(coefficients.size() % 3 == 0,
              "fusedopt.newton_schulz: coefficients must be (a, b, c) triples, flattened; got ",
              coefficients.size(), " values");
  // A tall matrix is iterated as its transpose (rows <= cols), as the reference does.
  const bool transposed = x.size(1) > x.size(2);
  const at::Tensor wide = transposed ? x.transpose(1, 2) : x;
  // The norm and the division in fp32, or fp64 when x or dtype is fp64.
  const at::ScalarType compute =
      at::promote_types(at::promote_types(x.scalar_type(), at::kFloat), dtype);
  const at::Tensor norm = at::linalg_vector_norm(wide, 2, at::IntArrayRef{1, 2}, true, compute);
  at::Tensor ortho =
      (wide.to(compute) / norm.clamp_min(eps)).to(dtype, false, false, at::MemoryFormat::Contiguous);
  const int64_t batch = ortho.size(0), m = ortho.size(1);
  const at::Tensor gram = at::empty({batch, m, m}, ortho.options());
  const at::Tensor gram_update = at::empty({batch, m, m}, ortho.options());
  const size_t steps = coefficients.size() / 3;
  for (size_t s = 0; s < steps; ++s) {
    const double a = coefficients[3 * s], b = coefficients[3 * s + 1], c = coefficients[3 * s + 2];
    symmetric_product(ortho, gram, at::Tensor(), 0.0, 1.0);
    symmetric_product(gram, gram_update, gram, b, c);
    if (transposed && s + 1 == steps) {
      // The last product written in the tall layout: X^T = a X^T + X^T B (B is symmetric), so
      // the result needs no transposing copy.
      return at::baddbmm(ortho.transpose(1, 2), ortho.transpose(1, 2), gram_update, a, 1.0);
    }
    ortho = at::baddbmm(ortho, gram_update, ortho, a, 1.0);
  }
  return transposed ? ortho.transpose(1, 2).contiguous() : ortho;
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("newton_schulz", &fusedopt::cpu::newton_schulz_cpu);
}
