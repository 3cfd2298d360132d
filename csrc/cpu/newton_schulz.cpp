// CPU Newton-Schulz iteration of Muon over a batch of matrices. The math is
// fusedopt/reference.py::newton_schulz; the op's contract is in csrc/fusedopt.cpp.
//
// Two of each iteration's three products are symmetric: A = X X^T, and b A + c A A (A is
// symmetric, so A A = A A^T). Where the GEMMs stay large enough to run at full speed, each is
// computed as its top half of rows and its bottom-right block, the bottom-left block mirrored
// (3/4 of the multiply-adds); the third product, a X + B X = (B + a I) X, is one GEMM. The GEMMs
// are ATen's (oneDNN for bf16, MKL for fp32), in the requested dtype with fp32 accumulation.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>


namespace fusedopt::cpu {
namespace {

// Whether a symmetric product left @ left^T (left: m x k) is split: small GEMMs run below peak.
// one_thread: the product runs on one thread of a parallel region (see newton_schulz_cpu).
// On a 2-core AMD EPYC (avx512_bf16; oneDNN bf16 GEMMs at ~350 GFLOPS) the split below took
// 1024 x 1024 x 1024 from 5.37 to 4.44 ms, 384 x 1536 x 384 from 1.13 to 1.00 and 512^3 from
// 0.69 to 0.64, but 384^3 from 0.32 to 0.34 and 256^3 from 0.12 to 0.18. So it is split when the
// top half's GEMM keeps at least 2^26 multiply-adds. On one core, where small GEMMs keep their
// speed (384^3 at 196 GFLOPS, 192 x 384 x 384 at 185), 384^3 split went from 0.58 to 0.47 ms: 2^24.
bool split_symmetric(int64_t m, int64_t k, bool one_thread) {
  return (m / 2) * m * k >= (int64_t{1} << (one_thread ? 24 : 26));
}

// Writes block (rows x cols, row stride ld) of `data` at (row, col) as the transpose of the block
// at (col, row): the mirror half of a symmetric matrix. ATen's strided copy_ ran this at ~2 GB/s;
// square tiles keep both sides in cache lines.
template <typename T>
void mirror(T* data, int64_t ld, int64_t row, int64_t col, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 32;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      for (int64_t i = i0; i < std::min(i0 + kTile, rows); ++i) {
        for (int64_t j = j0; j < std::min(j0 + kTile, cols); ++j) {
          data[(row + i) * ld + col + j] = data[(col + j) * ld + row + i];
        }
      }
    }
  }
}

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
  if (!split_symmetric(m, left.size(1), at::in_parallel_region())) {
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
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, out.scalar_type(), "fusedopt_mirror", [&] {
    mirror(out.data_ptr<scalar_t>(), out.stride(0), h, 0, m - h, h);
  });
}

// The buffers of one matrix's iteration: the Gram matrix, b A + c A A, and X twice (iteration s
// writes buffers[s % 2] from the other one).
struct Workspace {
  explicit Workspace(const at::Tensor& normalized) {
    const int64_t m = normalized.size(1), n = normalized.size(2);
    gram = at::empty({m, m}, normalized.options());
    gram_update = at::empty({m, m}, normalized.options());
    buffers[0] = at::empty({m, n}, normalized.options());
    buffers[1] = at::empty({m, n}, normalized.options());
  }
  at::Tensor gram, gram_update, buffers[2];
};

// The iteration of one normalized matrix (rows <= cols), its result written into out (the
// matrix's own layout: transposed back when it was tall).
void iterate(const at::Tensor& normalized, at::Tensor out, bool transposed,
             at::ArrayRef<double> coefficients, Workspace& w) {
  const size_t steps = coefficients.size() / 3;
  for (size_t s = 0; s < steps; ++s) {
    const double a = coefficients[3 * s], b = coefficients[3 * s + 1], c = coefficients[3 * s + 2];
    const at::Tensor ortho = s == 0 ? normalized : w.buffers[(s - 1) % 2];
    symmetric_product(ortho, w.gram, at::Tensor(), 0.0, 1.0);
    symmetric_product(w.gram, w.gram_update, w.gram, b, c);  // gram @ gram = gram @ gram^T
    // a X + B X = (B + a I) X: one GEMM with no added term (addmm's term costs a pass, and a
    // strided one for a tall matrix).
    w.gram_update.diagonal().add_(a);
    if (s + 1 < steps) {
      at::mm_out(w.buffers[s % 2], w.gram_update, ortho);
    } else if (transposed) {
      // The last product straight into the result in its layout; a tall one as
      // X^T (B + a I) (B is symmetric), so that it needs no transposing copy.
      at::mm_out(out, ortho.t(), w.gram_update);
    } else {
      at::mm_out(out, w.gram_update, ortho);
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
  // One pass, computed in `compute` and written in dtype (no full-size temporary).
  at::Tensor normalized = at::empty(wide.sizes(), wide.options().dtype(dtype));
  at::div_out(normalized, wide, norm.clamp_min(eps));
  const size_t steps = coefficients.size() / 3;
  if (steps == 0) return transposed ? normalized.transpose(1, 2).contiguous() : normalized;

  // Matrix by matrix, with 2-D GEMMs (at these sizes ATen's CPU bmm ran up to ~1.8x slower than
  // mm per matrix), each writing into preallocated buffers.
  const int64_t batch = x.size(0);
  at::Tensor result = at::empty(x.sizes(), normalized.options());
  // Whole matrices per thread where the batch allows: a GEMM of a few hundred rows keeps two cores
  // below their peak, and more so for the halves that the symmetric split leaves (on a 2-core AMD
  // EPYC, 192 x 384 x 192 ran at 290 GFLOPS on both cores, 178 on one). A remainder smaller than
  // the thread count runs one matrix at a time on all of them. Inside the parallel region ATen's
  // GEMMs run on the calling thread.
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread =
      threads > 1 && !at::in_parallel_region() ? batch / threads * threads : 0;
  if (per_thread > 0) {
    at::parallel_for(0, per_thread, 1, [&](int64_t begin, int64_t end) {
      Workspace workspace(normalized);
      for (int64_t i = begin; i < end; ++i) {
        iterate(normalized[i], result[i], transposed, coefficients, workspace);
      }
    });
  }
  if (per_thread < batch) {
    Workspace workspace(normalized);
    for (int64_t i = per_thread; i < batch; ++i) {
      iterate(normalized[i], result[i], transposed, coefficients, workspace);
    }
  }
  return result;
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("newton_schulz", &fusedopt::cpu::newton_schulz_cpu);
}
