// Shared pieces of the CPU LayerNorm / RMSNorm kernels (norm_fwd.cpp, norm_bwd.cpp): their
// tunables, in one block, the row helpers both use and the checks of their arguments. The math is
// fusedopt/reference.py::_norm; the ops' contract is in csrc/fusedopt.cpp.
//
// Contraction: nothing is contracted implicitly; -ffp-contract=off is a build flag of every CPU
// source (setup.py; docs/numerics.md). The at::vec::fmadd calls written here are deliberate and
// stay fused.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>

#include "multi_tensor.h"

namespace fusedopt::cpu {

// ---------------------------------------------------------------------------------------------
// Tunables of the norm kernels (measured on this project's 2-core machines). The threshold for
// streaming stores, kStreamingStoreBytes, is in streaming_store.h, shared with the bandwidth probe.

// Rows are handed to threads in runs of at least this many elements, so each thread gets many rows
// and the fork/join pays off (stream.cpp's stream_sum, the norms' bytes floor, splits its elements
// the same way).
constexpr int64_t kMinElementsPerTask = 65536;

// Vector partial sums are fp32; every kSumBlock elements they are folded into a double, so a row's
// statistics lose no more than one short fp32 sum's precision whatever N is.
constexpr int64_t kSumBlock = 2048;

// LayerNorm's one-pass shifted moments are used while (mean - shift)^2 <= this * var: the
// cancellation in var = E[d^2] - E[d]^2 then costs at most a factor 1 + this in relative error
// (fp32 sums), as good as the two-pass formula within a few ulps. Rarer rows (the shift, taken
// from the first elements, far from the mean in units of the spread, or var ~ 0) take the second,
// exact pass: var = mean((s - mean)^2), over the row in cache.
constexpr double kMaxShiftedCancellation = 8.0;

// The forward's prefetch of the next row (RowPrefetcher), in cache lines of each stream per vector
// step: its two passes over a row take 2n / kVecStep steps, at least the row's n / 16 cache lines,
// so two lines per step are done by the middle of the second pass.
constexpr int kRowPrefetchLinesPerStep = 2;

// The backward's rows in a group (a divisor of kRowGroup), while rows are at most
// kBackwardRowsMaxN wide (the three groups in flight then stay well inside L2); the rows left over,
// and wider rows, go in groups of one.
constexpr int kBackwardRows = 4;
constexpr int64_t kBackwardRowsMaxN = 8192;

// The backward's dweight / dbias are summed over rows in two levels, each in fp32: the rows of a
// group into one buffer, the groups of a block of rows into another. A plain running sum over a
// block's thousands of rows would carry that many roundings (relative errors ~1e-6 in fp32 with 300
// rows already); this carries ~kRowGroup + rows / kRowGroup, for one extra pass over N per group.
constexpr int64_t kRowGroup = 32;
static_assert(kRowGroup % kBackwardRows == 0, "a row group is a whole number of backward groups");

// ---------------------------------------------------------------------------------------------
// Row helpers

// The sum of v's lanes, in double.
inline double hsum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  double total = 0.0;
  for (int64_t k = 0; k < Vec::size(); ++k) total += lanes[k];
  return total;
}

// Rows per parallel task: at least kMinElementsPerTask elements each.
inline int64_t row_grain(int64_t n) {
  return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(n, 1));
}

inline bool is_norm_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Checks an optional weight / bias of a norm over rows of n elements; returns it as a contiguous
// fp32 tensor (1 + weight when zero-centered, as the reference computes it), or an undefined
// tensor when absent.
inline at::Tensor affine_as_float(const char* op, const std::optional<at::Tensor>& param,
                                  const char* name, int64_t n, bool add_one) {
  if (!param.has_value()) return at::Tensor();
  const at::Tensor& p = *param;
  TORCH_CHECK(p.device().is_cpu(), "fusedopt.", op, " (cpu): ", name, " is on ", p.device(),
              ", expected cpu like x");
  TORCH_CHECK(p.dim() == 1 && p.size(0) == n, "fusedopt.", op, " (cpu): ", name,
              " must have shape (", n, ",) (the size of x's last dimension), got ", p.sizes());
  TORCH_CHECK(is_norm_dtype(p.scalar_type()), "fusedopt.", op, " (cpu): ", name,
              " must be float32, bfloat16 or float16, got ", p.scalar_type());
  at::Tensor f = p.to(at::kFloat).contiguous();
  return add_one ? f + 1 : f;
}

inline void check_rows(const char* op, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fusedopt.", op, " (cpu): ", name, " is on ", t.device(),
              ", expected cpu");
  TORCH_CHECK(t.dim() == 2, "fusedopt.", op, " (cpu): ", name,
              " must be 2-D (rows, N) (flatten the leading dimensions first), got shape ",
              t.sizes());
  TORCH_CHECK(is_norm_dtype(t.scalar_type()), "fusedopt.", op, " (cpu): ", name,
              " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fusedopt.", op, " (cpu): ", name,
              " must be contiguous (call .contiguous() first), got strides ", t.strides());
}

}  // namespace fusedopt::cpu
