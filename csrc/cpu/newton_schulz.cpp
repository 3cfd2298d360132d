// CPU Newton-Schulz iteration of Muon over a batch of matrices. The math is
// fusedopt/reference.py::newton_schulz; the op's contract is in csrc/fusedopt.cpp.
//
// Two of each iteration's three products are symmetric: A = X X^T, and b A + c A A (A is
// symmetric, so A A = A A^T). Where the GEMMs stay large enough to run at full speed, each is
// computed as its top half of rows and its bottom-right block, the bottom-left block mirrored
// (3/4 of the multiply-adds); the third product, a X + B X, is one GEMM. The GEMMs are ATen's
// (oneDNN for bf16, MKL for fp32), in the requested dtype with fp32 accumulation.
#include <ATen/ATen.h>
#include <torch/library.h>


namespace fusedopt::cpu {
namespace {

// Whether a symmetric product left @ left^T (left: m x k) is split: small GEMMs run below peak.
// On a 2-core AMD EPYC (avx512_bf16; oneDNN bf16 GEMMs at ~350 GFLOPS) the split below took
// 1024 x 1024 x 1024 from 5.37 to 4.44 ms, 384 x 1536 x 384 from 1.13 to 1.00 and 512^3 from
// 0.69 to 0.64, but 384^3 from 0.32 to 0.34 and 256^3 from 0.12 to 0.18. So it is split when the
// top half's GEMM keeps at least 2^26 multiply-adds.
bool split_symmetric(int64_t m, int64_t k) { return (m / 2) * m * k >= (int64_t{1} << 26); }

// out = alpha * left @ left^T + beta * c (c undefined: no term), for one matrix left (m, k) and
// out, c (m, m). Split, it is two GEMMs: the top h rows whole, and the bottom-right block; the
// bottom-left block is the mirror of the top-right one (3/4 of the multiply-adds, and out is
// symmetric bit for bit).
void symmetric_product(const at::Tensor& left, const at::Tensor& out, const at::Tensor& c,
                       double beta, double alpha) {
  const int64_t m = left.size(0);
  const auto product = [&](at::Tensor result, const at::Tensor& rows, const at::Tensor& cols,
                           const at::Tensor& term) {
    if (c.defined()) {
      at::addmm_out(result, term, rows, cols.t(), beta, alpha);
    } else {
      at::mm_out(result, rows, cols.t());
    }
  };
  if (!split_symmetric(m, left.size(1))) {
    product(out, left, left, c);
    return;
  }
  const int64_t h = m / 2;
  const auto top = [&](const at::Tensor& t) { return t.narrow(0, 0, h); };
  const auto bottom_right = [&](const at::Tensor& t) {
    return t.narrow(0, h, m - h).narrow(1, h, m - h);
  };
  product(top(out), top(left), left, c.defined() ? top(c) : c);
  product(bottom_right(out), left.narrow(0, h, m - h), left.narrow(0, h, m - h),
          c.defined() ? bottom_right(c) : c);
  out.narrow(0, h, m - h).narrow(1, 0, h).copy_(out.narrow(0, 0, h).narrow(1, h, m - h).t());
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
  // One pass, computed in `compute` and written in dtype (no full-size temporary).
  at::Tensor normalized = at::empty(wide.sizes(), wide.options().dtype(dtype));
  at::div_out(normalized, wide, norm.clamp_min(eps));
  const size_t steps = coefficients.size() / 3;
  if (steps == 0) return transposed ? normalized.transpose(1, 2).contiguous() : normalized;

  // Matrix by matrix, with 2-D GEMMs (at these sizes ATen's CPU bmm ran up to ~1.8x slower than
  // mm per matrix), each writing into preallocated buffers.
  const int64_t batch = x.size(0), m = normalized.size(1), n = normalized.size(2);
  at::Tensor result = at::empty(x.sizes(), normalized.options());
  const at::Tensor gram = at::empty({m, m}, normalized.options());
  const at::Tensor gram_update = at::empty({m, m}, normalized.options());
  // Iteration s writes X into buffers[s % 2], from normalized[i] or the other buffer.
  at::Tensor buffers[2] = {at::empty({m, n}, normalized.options()),
                          at::empty({m, n}, normalized.options())};
  for (int64_t i = 0; i < batch; ++i) {
    for (size_t s = 0; s < steps; ++s) {
      const double a = coefficients[3 * s], b = coefficients[3 * s + 1],
                   c = coefficients[3 * s + 2];
      const at::Tensor ortho = s == 0 ? normalized[i] : buffers[(s - 1) % 2];
      symmetric_product(ortho, gram, at::Tensor(), 0.0, 1.0);
      symmetric_product(gram, gram_update, gram, b, c);  // gram @ gram = gram @ gram^T
      if (s + 1 < steps) {
        at::addmm_out(buffers[s % 2], ortho, gram_update, ortho, a, 1.0);
      } else if (at::Tensor out = result[i]; transposed) {
        // The last product straight into the result in its layout; a tall one as
        // X^T = a X^T + X^T B (B is symmetric), so that it needs no transposing copy.
        at::addmm_out(out, ortho.t(), ortho.t(), gram_update, a, 1.0);
      } else {
        at::addmm_out(out, ortho, gram_update, ortho, a, 1.0);
      }
    }
  }
  return result;
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("newton_schulz", &fusedopt::cpu::newton_schulz_cpu);
}
