// CPU LayerNorm / RMSNorm over the last dimension of a contiguous (rows, N) tensor, with an
// optional fused residual add: the forward (norm_fwd) and its backward (norm_bwd). The math is
// fusedopt/reference.py::_norm; the ops' contract is in csrc/fusedopt.cpp.
//
// Forward, one row at a time (rows split over threads), every pass after the first reading the
// row from cache:
//   s = x + residual, rounded to residual_out's dtype: the statistics and y are computed from the
//   STORED value of s, exactly what the backward recomputes x_hat from, so forward and backward
//   see the same input (with a bf16/fp16 residual_out this differs from normalizing the unrounded
//   fp32 sum by s's rounding, below y's own rounding);
//   mean and var = mean((s - mean)^2) from one pass of shifted sums, sum(s - c) and
//   sum((s - c)^2) with c estimated from the row's first elements, checked for cancellation and
//   redone as an exact second pass when it could cost precision (kMaxShiftedCancellation); vector
//   partial sums in fp32, folded into doubles every kSumBlock elements;
//   rstd = 1 / sqrt(var + eps) (RMSNorm: 1 / sqrt(sum(s^2) / N + eps));
//   y = (s - mean) * rstd * w_eff + b, w_eff = 1 + weight when zero-centered.
// Backward, one row at a time: x_hat = (x - mean) * rstd, wdy = dy * w_eff,
//   dx = rstd * (wdy - mean(wdy) - x_hat * mean(wdy * x_hat)) + dresidual_out
//   (RMSNorm: no mean(wdy) term); dweight = sum_rows dy * x_hat, dbias = sum_rows dy, summed in
//   fp32 per group of kRowGroup rows, the groups per block of rows, then the blocks in a fixed
//   order.
//
// No implicit fp contraction in this file: the backward computes wdy = dy * w in two passes, and a
// product fused into an FMA in one pass but rounded in the other leaves rounding noise where
// wdy - mean(wdy) cancels exactly (N = 1: dx must be 0), amplified by rstd. Explicit
// at::vec::fmadd calls stay fused. Set before the includes, so inlined header code matches.
#pragma GCC optimize("fp-contract=off")

#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <utility>
#include <type_traits>

#include "multi_tensor.h"
#include "streaming_store.h"

namespace fusedopt::cpu {
namespace {

// Vector partial sums are fp32; every kSumBlock elements they are folded into a double, so a row's
// statistics lose no more than one short fp32 sum's precision whatever N is.
constexpr int64_t kSumBlock = 2048;
// Rows are handed to threads in runs of at least this many elements, so each thread gets many rows
// and the fork/join pays off.
constexpr int64_t kMinElementsPerTask = 65536;
inline double hsum(const Vec& v) {
  alignas(64) float lanes[Vec::size()];
  v.store(lanes);
  double total = 0.0;
  for (int64_t k = 0; k < Vec::size(); ++k) total += lanes[k];
  return total;
}

// Prefetches the cache lines of elements [0, count) at p.
template <typename scalar_t>
FUSEDOPT_INLINE void prefetch_elements(const scalar_t* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
    __builtin_prefetch(bytes + b);
  }
}

// The forward's prefetch of the next row: kLinesPerStep cache lines of each stream per vector
// step, over both passes of the current row, so that the next row is read from memory while this
// one is computed and written (prefetching the next row at all made the forward ~10% faster
// here). Prefetching in the last pass only would put all of memory's traffic (the next row's
// reads and the streamed writes) in that pass and leave memory idle in the other. The two passes
// take 2n / kVecStep steps, at least the row's n / 16 cache lines, so two lines per step are done
// by the middle of the second pass.
class RowPrefetcher {
 public:
  static constexpr int kLinesPerStep = 2;
  static constexpr int kMaxStreams = 3;

  // Adds the `elements` elements at p (none when p is null).
  template <typename scalar_t>
  void add(const scalar_t* p, int64_t elements) {
    if (p == nullptr || elements <= 0) return;
    next_[streams_] = reinterpret_cast<const char*>(p);
    end_[streams_] = next_[streams_] + elements * static_cast<int64_t>(sizeof(scalar_t));
    ++streams_;
  }

  FUSEDOPT_INLINE void step() {
    for (int s = 0; s < streams_; ++s) {
      for (int l = 0; l < kLinesPerStep && next_[s] < end_[s]; ++l, next_[s] += 64) {
        __builtin_prefetch(next_[s]);
      }
    }
  }

 private:
  const char* next_[kMaxStreams] = {};
  const char* end_[kMaxStreams] = {};
  int streams_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Forward

// The row being normalized, s = x, loaded kVecStep (or count, zero-padded) elements at a time.
template <typename x_t>
struct PlainRow {
  static constexpr bool kResidual = false;
  const x_t* x;
  FUSEDOPT_INLINE void load(int64_t i, int64_t count, Vec& lo, Vec& hi) const {
    load_float(x + i, count, lo, hi);
  }
  // Prefetches the next row (n elements further on) over this row's passes.
  void prefetch_next(RowPrefetcher& ahead, int64_t n) const { ahead.add(x + n, n); }
};

// s = x + residual, rounded to residual_out's dtype o_t (what residual_out holds); recomputed from
// the cached x and residual rows in every pass, so residual_out is only written (streamed when
// large) and never read back.
template <typename x_t, typename r_t, typename o_t>
struct ResidualRow {
  static constexpr bool kResidual = true;
  const x_t* x;
  const r_t* residual;
  void prefetch_next(RowPrefetcher& ahead, int64_t n) const {
    ahead.add(x + n, n);
    ahead.add(residual + n, n);
  }
  FUSEDOPT_INLINE void load(int64_t i, int64_t count, Vec& lo, Vec& hi) const {
    Vec r0, r1;
    load_float(x + i, count, lo, hi);
    load_float(residual + i, count, r0, r1);
    lo = lo + r0;
    hi = hi + r1;
    if constexpr (!std::is_same_v<o_t, float>) {
      std::tie(lo, hi) =
          at::vec::convert_to_float<o_t>(pack_float<o_t>(lo, hi));
    }
  }
};

// Zeroes the lanes of (lo, hi) at and past count (a row's tail step), which load_float pads with
// zeros but which may be non-zero after a shift.
FUSEDOPT_INLINE void zero_tail(int64_t count, Vec& lo, Vec& hi) {
  if (count >= kVecStep) return;
  lo = count >= Vec::size() ? lo : Vec::set(Vec(0.f), lo, count);
  hi = count > Vec::size() ? Vec::set(Vec(0.f), hi, count - Vec::size()) : Vec(0.f);
}

// Over the row's n elements, with d = s - shift: sum(d^2), and sum(d) when kWithSum.
template <bool kWithSum, typename Row>
FUSEDOPT_INLINE std::pair<double, double> row_moments(const Row& row, int64_t n,
                                                      float shift_value, RowPrefetcher& ahead) {
  const Vec shift(shift_value);
  double sum = 0.0, sum_sq = 0.0;
  int64_t i = 0;
  while (i < n) {
    const int64_t block_end = std::min(n, i + kSumBlock);
    // Two vector steps per iteration: independent accumulators hide the add latency.
    Vec s0(0.f), s1(0.f), s2(0.f), s3(0.f), q0(0.f), q1(0.f), q2(0.f), q3(0.f);
    for (; i + 2 * kVecStep <= block_end; i += 2 * kVecStep) {
      ahead.step();
      ahead.step();
      Vec v0, v1, v2, v3;
      row.load(i, kVecStep, v0, v1);
      row.load(i + kVecStep, kVecStep, v2, v3);
      v0 = v0 - shift;
      v1 = v1 - shift;
      v2 = v2 - shift;
      v3 = v3 - shift;
      if constexpr (kWithSum) {
        s0 = s0 + v0;
        s1 = s1 + v1;
        s2 = s2 + v2;
        s3 = s3 + v3;
      }
      q0 = at::vec::fmadd(v0, v0, q0);
      q1 = at::vec::fmadd(v1, v1, q1);
      q2 = at::vec::fmadd(v2, v2, q2);
      q3 = at::vec::fmadd(v3, v3, q3);
    }
    for (; i < block_end; i += kVecStep) {
      const int64_t count = std::min(kVecStep, block_end - i);
      ahead.step();
      Vec v0, v1;
      row.load(i, count, v0, v1);
      v0 = v0 - shift;
      v1 = v1 - shift;
      zero_tail(count, v0, v1);
      if constexpr (kWithSum) {
        s0 = s0 + v0;
        s1 = s1 + v1;
      }
      q0 = at::vec::fmadd(v0, v0, q0);
      q1 = at::vec::fmadd(v1, v1, q1);
    }
    if constexpr (kWithSum) sum += hsum((s0 + s1) + (s2 + s3));
    sum_sq += hsum((q0 + q1) + (q2 + q3));
  }
  return {sum, sum_sq};
}

// LayerNorm's shift: the mean of the row's first vector step (lo, hi: count elements, zero-padded),
// rounded to a multiple of 2^-11 times their magnitude. On that grid, s - shift and its short
// partial sums stay exact for 16-bit data, where a shift with fine low bits (a 24-bit value, or
// a small one near 0) gets rounded away the same way in every sum, a bias that showed as a few
// ulps of error in the mean (fp16, N = 262144).
// Vector reductions (the lanes past count are zero): a scalar loop over the lanes cost ~15% of a
// bf16 LayerNorm forward at N = 1024.
inline float row_shift(const Vec& lo, const Vec& hi, int64_t count) {
  const float sum =
      at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, lo + hi);
  const float magnitude = at::vec::vec_reduce_all<float>(
      [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); },
      at::vec::maximum(lo.abs(), hi.abs()));
  if (!(magnitude > 0.f) || !std::isfinite(magnitude) || !std::isfinite(sum)) {
    return 0.f;  // any shift works; NaN / inf
  }
  int exponent;
  std::frexp(magnitude, &exponent);
  const double grid = std::ldexp(1.0, exponent - 11);
  return static_cast<float>(std::nearbyint(static_cast<double>(sum) / count / grid) * grid);
}

// LayerNorm's one-pass shifted moments are used while (mean - shift)^2 <= this * var: the
// cancellation in var = E[d^2] - E[d]^2 then costs at most a factor 1 + this in relative error
// (fp32 sums), as good as the two-pass formula within a few ulps. Rarer rows (the shift, taken
// from the first elements, far from the mean in units of the spread, or var ~ 0) take the second,
// exact pass: var = mean((s - mean)^2), over the row in cache.
constexpr double kMaxShiftedCancellation = 8.0;

struct FwdArgs {
  int64_t rows;
  int64_t n;
  double eps;
  bool rms;
  bool stream;     // stream y and residual_out
  const float* w;  // w_eff in fp32 (1 + weight when zero-centered), or null
  const float* b;  // bias in fp32, or null
  float* mean;     // (rows,), or null for RMSNorm
  float* rstd;     // (rows,)
};

// Statistics, y and residual_out (with a residual) of one row.
template <bool kWeight, bool kBias, typename Row, typename x_t, typename o_t>
FUSEDOPT_INLINE void forward_row(const FwdArgs& a, int64_t r, const Row& row, x_t* y,
                                 o_t* residual_out) {
  const int64_t n = a.n;
  const double inv_n = 1.0 / static_cast<double>(n);
  float mean_value = 0.f;
  double second_moment;  // var, or mean(s^2) for RMSNorm
  RowPrefetcher ahead;
  if (r + 1 < a.rows) row.prefetch_next(ahead, n);
  if (a.rms) {
    second_moment = row_moments<false>(row, n, 0.f, ahead).second * inv_n;
  } else {
    // Shift by the mean of the first vector step (an estimate of the row's mean), then one pass.
    Vec f0, f1;
    const int64_t first = std::min(n, kVecStep);
    row.load(0, first, f0, f1);
    const float shift = row_shift(f0, f1, first);
    const auto [sum, sum_sq] = row_moments<true>(row, n, shift, ahead);
    const double mean_shifted = sum * inv_n;
    const double var = sum_sq * inv_n - mean_shifted * mean_shifted;
    mean_value = static_cast<float>(shift + mean_shifted);
    if (mean_shifted * mean_shifted <= kMaxShiftedCancellation * var) {
      second_moment = var;
    } else {  // also when var <= 0 or NaN
      second_moment = row_moments<false>(row, n, mean_value, ahead).second * inv_n;
    }
  }
  const float rstd_value = static_cast<float>(1.0 / std::sqrt(second_moment + a.eps));
  if (!a.rms) a.mean[r] = mean_value;
  a.rstd[r] = rstd_value;

  const Vec mean(mean_value), rstd(rstd_value);
  const float* w = a.w;
  const float* b = a.b;
  // residual_out is streamed along with y when its full steps are aligned where y's are (always
  // when both have one dtype; with an fp32 residual_out and a 16-bit y, when N % 32 == 0).
  bool stream_residual = false;
  if constexpr (Row::kResidual) {
    stream_residual = a.stream && reinterpret_cast<uintptr_t>(residual_out + stream_head(y, n)) %
                                          kStreamAlign == 0;
  }
  write_row(y, n, a.stream, [&](int64_t i, int64_t count, bool streamed, Vec& v0, Vec& v1) {
    ahead.step();
    row.load(i, count, v0, v1);
    if constexpr (Row::kResidual) {
      if (streamed && stream_residual) {
        stream_float(residual_out + i, v0, v1);
      } else {
        store_float(residual_out + i, count, v0, v1);
      }
    }
    v0 = (v0 - mean) * rstd;
    v1 = (v1 - mean) * rstd;
    if constexpr (kWeight) {
      Vec w0, w1;
      load_float(w + i, count, w0, w1);
      if constexpr (kBias) {
        Vec b0, b1;
        load_float(b + i, count, b0, b1);
        v0 = at::vec::fmadd(v0, w0, b0);
        v1 = at::vec::fmadd(v1, w1, b1);
      } else {
        v0 = v0 * w0;
        v1 = v1 * w1;
      }
    } else if constexpr (kBias) {
      Vec b0, b1;
      load_float(b + i, count, b0, b1);
      v0 = v0 + b0;
      v1 = v1 + b1;
    }
  });
}

// Rows per parallel task: at least kMinElementsPerTask elements each.
inline int64_t row_grain(int64_t n) {
  return std::max<int64_t>(1, kMinElementsPerTask / std::max<int64_t>(n, 1));
}

// residual: null without one (r_t, o_t are then unused).
template <typename x_t, typename r_t, typename o_t>
void norm_fwd_typed(const FwdArgs& a, const x_t* x, const r_t* residual, o_t* residual_out,
                    x_t* y) {
  auto run = [&](auto weight_tag, auto bias_tag) {
    constexpr bool kWeight = decltype(weight_tag)::value;
    constexpr bool kBias = decltype(bias_tag)::value;
    at::parallel_for(0, a.rows, row_grain(a.n), [&](int64_t begin, int64_t end) {
      const int64_t n = a.n;
      for (int64_t r = begin; r < end; ++r) {
        if (residual != nullptr) {
          const ResidualRow<x_t, r_t, o_t> row{x + r * n, residual + r * n};
          forward_row<kWeight, kBias>(a, r, row, y + r * n, residual_out + r * n);
        } else {
          forward_row<kWeight, kBias>(a, r, PlainRow<x_t>{x + r * n}, y + r * n,
                                      static_cast<o_t*>(nullptr));
        }
      }
      if (a.stream) stream_fence();
    });
  };
  using T = std::true_type;
  using F = std::false_type;
  if (a.w != nullptr) {
    a.b != nullptr ? run(T{}, T{}) : run(T{}, F{});
  } else {
    a.b != nullptr ? run(F{}, T{}) : run(F{}, F{});
  }
}

inline bool is_norm_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Checks an optional weight / bias of a norm over rows of n elements; returns it as a contiguous
// fp32 tensor (1 + weight when zero-centered, as the reference computes it), or an undefined
// tensor when absent.
at::Tensor affine_as_float(const char* op, const std::optional<at::Tensor>& param, const char* name,
                           int64_t n, bool add_one) {
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

void check_rows(const char* op, const at::Tensor& t, const char* name) {
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

// Calls fn(tag) with a value of type float when is_float, else of type scalar_t.
template <typename scalar_t, typename Fn>
void with_float_or(bool is_float, const Fn& fn) {
  if (is_float || std::is_same_v<scalar_t, float>) {
    fn(float{});
  } else {
    fn(scalar_t{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> norm_fwd_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool rms, bool zero_centered_weight, bool residual_in_fp32) {
  check_rows("norm_fwd", x, "x");
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  TORCH_CHECK(!(rms && bias.has_value()),
              "fusedopt.norm_fwd (cpu): RMSNorm (rms=True) takes no bias; pass bias=None");
  if (residual.has_value()) {
    check_rows("norm_fwd", *residual, "residual");
    TORCH_CHECK(residual->sizes() == x.sizes(), "fusedopt.norm_fwd (cpu): residual has shape ",
                residual->sizes(), ", expected ", x.sizes(), " like x");
    TORCH_CHECK(residual->scalar_type() == x.scalar_type() ||
                    residual->scalar_type() == at::kFloat,
                "fusedopt.norm_fwd (cpu): residual must have x's dtype (", x.scalar_type(),
                ") or float32, got ", residual->scalar_type());
  }
  const at::Tensor w = affine_as_float("norm_fwd", weight, "weight", n, zero_centered_weight);
  const at::Tensor b = affine_as_float("norm_fwd", bias, "bias", n, false);

  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  at::Tensor y = at::empty({rows, n}, x.options());
  at::Tensor residual_out =
      residual.has_value()
          ? at::empty({rows, n}, x.options().dtype(residual_in_fp32 ? at::kFloat : x.scalar_type()))
          : at::empty({0}, x.options());
  at::Tensor mean = at::empty({rms ? 0 : rows}, f32);
  at::Tensor rstd = at::empty({rows}, f32);
  if (rows == 0) return {y, residual_out, mean, rstd};

  const FwdArgs args{rows,
                     n,
                     eps,
                     rms,
                     should_stream(y),
                     w.defined() ? w.const_data_ptr<float>() : nullptr,
                     b.defined() ? b.const_data_ptr<float>() : nullptr,
                     rms ? nullptr : mean.data_ptr<float>(),
                     rstd.data_ptr<float>()};
  FUSEDOPT_DISPATCH_PARAM_TYPES(x.scalar_type(), "fusedopt_norm_fwd", [&] {
    using x_t = scalar_t;
    if (!residual.has_value()) {
      norm_fwd_typed<x_t, x_t, x_t>(args, x.const_data_ptr<x_t>(), nullptr, nullptr,
                                    y.data_ptr<x_t>());
      return;
    }
    with_float_or<x_t>(residual->scalar_type() == at::kFloat, [&](auto r_tag) {
      using r_t = decltype(r_tag);
      with_float_or<x_t>(residual_in_fp32, [&](auto o_tag) {
        using o_t = decltype(o_tag);
        norm_fwd_typed<x_t, r_t, o_t>(args, x.const_data_ptr<x_t>(),
                                      residual->const_data_ptr<r_t>(),
                                      residual_out.data_ptr<o_t>(), y.data_ptr<x_t>());
      });
    });
  });
  return {y, residual_out, mean, rstd};
}

// ---------------------------------------------------------------------------------------------
// Backward

struct BwdArgs {
  int64_t rows;
  int64_t n;
  bool rms;
  bool stream;         // stream dx
  const float* w;      // w_eff in fp32, or null
  const float* mean;   // (rows,), or null for RMSNorm
  const float* rstd;   // (rows,)
};

// The backward runs over groups of kRows consecutive rows, software-pipelined: one sweep over the
// columns does pass 1 of a group and pass 2 of the group before it, so that the first's reads
// from memory and the second's streamed writes (dx) overlap, as in a copy, rather than
// alternating (pass 1 alone runs at the read bandwidth, pass 2 alone at a copy's; one after the
// other they took ~30% longer than a copy of the same bytes). Pass 2 re-reads its rows from
// cache, where the previous sweep left them.
//   Pass 1: each row's sums of wdy and wdy * x_hat, and the per-column partial sums of dy * x_hat
//   and dy, loaded and stored once per group (each row's contribution still added in row order).
//   Pass 2: dx = rstd * (wdy - mean(wdy) - x_hat * mean(wdy * x_hat)) + dresidual_out.

// Rows in a group (a divisor of kRowGroup), while rows are at most kBackwardRowsMaxN wide (the
// three groups in flight then stay well inside L2); the rows left over, and wider rows, go in
// groups of one.
constexpr int kBackwardRows = 4;
constexpr int64_t kBackwardRowsMaxN = 8192;

// A group's pass-1 results, which its pass 2 needs.
template <int kRows>
struct GroupSums {
  double wdy[kRows];
  double wdy_xhat[kRows];
};

// The backward's tensors, whole (rows, n).
template <typename x_t, typename dy_t>
struct BwdTensors {
  const x_t* x;
  const dy_t* dy;
  const x_t* dres;  // or null
  x_t* dx;
};

// One sweep: pass 1 of rows [first, first + kRows) into first_sums, unless first < 0, and pass 2
// of rows [second, second + kRows) from second_sums, unless second < 0. dweight_acc / dbias_acc:
// the row group's fp32 partial sums (or null).
template <int kRows, bool kWeight, typename x_t, typename dy_t>
FUSEDOPT_INLINE void backward_sweep(const BwdArgs& a, const BwdTensors<x_t, dy_t>& t,
                                    int64_t first, GroupSums<kRows>& first_sums, int64_t second,
                                    const GroupSums<kRows>& second_sums, float* dweight_acc,
                                    float* dbias_acc) {
  const int64_t n = a.n;
  const float* w = a.w;
  const bool pass1 = first >= 0;
  const bool pass2 = second >= 0;
  const int64_t o1 = pass1 ? first * n : 0;
  const int64_t o2 = pass2 ? second * n : 0;
  // The group after pass 1's, prefetched column by column as pass 1 reads its own.
  const int64_t ahead_rows = pass1 ? std::clamp<int64_t>(a.rows - first - kRows, 0, kRows) : 0;
  // dx is streamed when every row of pass 2 starts aligned; then so does every full step.
  const bool stream = pass2 && a.stream && stream_head(t.dx + o2, n) == 0 &&
                      (n * static_cast<int64_t>(sizeof(x_t))) % kStreamAlign == 0;
  Vec mean1[kRows], rstd1[kRows], mean2[kRows], rstd2[kRows], mean_wdy[kRows],
      mean_wdy_xhat[kRows];
  for (int k = 0; k < kRows; ++k) {
    if (pass1) {
      mean1[k] = Vec(a.rms ? 0.f : a.mean[first + k]);
      rstd1[k] = Vec(a.rstd[first + k]);
    }
    if (pass2) {
      mean2[k] = Vec(a.rms ? 0.f : a.mean[second + k]);
      rstd2[k] = Vec(a.rstd[second + k]);
      mean_wdy[k] = Vec(a.rms ? 0.f : static_cast<float>(second_sums.wdy[k] / n));
      mean_wdy_xhat[k] = Vec(static_cast<float>(second_sums.wdy_xhat[k] / n));
    }
  }

  double sum_wdy[kRows] = {}, sum_wdy_xhat[kRows] = {};
  int64_t i = 0;
  while (i < n) {
    const int64_t block_end = std::min(n, i + kSumBlock);
    Vec s0[kRows], s1[kRows], t0[kRows], t1[kRows];
    for (int k = 0; k < kRows; ++k) s0[k] = s1[k] = t0[k] = t1[k] = Vec(0.f);
    for (; i < block_end; i += kVecStep) {
      const int64_t count = std::min(kVecStep, block_end - i);
      Vec w0, w1;
      if constexpr (kWeight) load_float(w + i, count, w0, w1);
      if (pass1) {
        for (int64_t k = 0; k < ahead_rows; ++k) {
          const int64_t ahead = o1 + (kRows + k) * n + i;
          prefetch_elements(t.x + ahead, count);
          prefetch_elements(t.dy + ahead, count);
        }
        // dresidual_out is read by pass 2 only, one sweep later.
        if (t.dres != nullptr) {
          for (int k = 0; k < kRows; ++k) prefetch_elements(t.dres + o1 + k * n + i, count);
        }
        Vec pw0(0.f), pw1(0.f), pb0(0.f), pb1(0.f);
        if (dweight_acc != nullptr) load_float(dweight_acc + i, count, pw0, pw1);
        if (dbias_acc != nullptr) load_float(dbias_acc + i, count, pb0, pb1);
        for (int k = 0; k < kRows; ++k) {
          Vec x0, x1, g0, g1;
          load_float(t.x + o1 + k * n + i, count, x0, x1);
          load_float(t.dy + o1 + k * n + i, count, g0, g1);
          x0 = (x0 - mean1[k]) * rstd1[k];
          x1 = (x1 - mean1[k]) * rstd1[k];
          Vec wg0 = g0, wg1 = g1;
          if constexpr (kWeight) {
            wg0 = g0 * w0;
            wg1 = g1 * w1;
          }
          s0[k] = s0[k] + wg0;
          s1[k] = s1[k] + wg1;
          t0[k] = at::vec::fmadd(wg0, x0, t0[k]);
          t1[k] = at::vec::fmadd(wg1, x1, t1[k]);
          if (dweight_acc != nullptr) {
            pw0 = at::vec::fmadd(g0, x0, pw0);
            pw1 = at::vec::fmadd(g1, x1, pw1);
          }
          if (dbias_acc != nullptr) {
            pb0 = pb0 + g0;
            pb1 = pb1 + g1;
          }
        }
        if (dweight_acc != nullptr) store_float(dweight_acc + i, count, pw0, pw1);
        if (dbias_acc != nullptr) store_float(dbias_acc + i, count, pb0, pb1);
      }
      if (pass2) {
        for (int k = 0; k < kRows; ++k) {
          const int64_t at = o2 + k * n + i;
          Vec x0, x1, g0, g1;
          load_float(t.x + at, count, x0, x1);
          load_float(t.dy + at, count, g0, g1);
          x0 = (x0 - mean2[k]) * rstd2[k];
          x1 = (x1 - mean2[k]) * rstd2[k];
          if constexpr (kWeight) {
            g0 = g0 * w0;
            g1 = g1 * w1;
          }
          Vec d0 = (g0 - mean_wdy[k] - x0 * mean_wdy_xhat[k]) * rstd2[k];
          Vec d1 = (g1 - mean_wdy[k] - x1 * mean_wdy_xhat[k]) * rstd2[k];
          if (t.dres != nullptr) {
            Vec r0, r1;
            load_float(t.dres + at, count, r0, r1);
            d0 = d0 + r0;
            d1 = d1 + r1;
          }
          if (stream && count == kVecStep) {
            stream_float(t.dx + at, d0, d1);
          } else {
            store_float(t.dx + at, count, d0, d1);
          }
        }
      }
    }
    if (pass1) {
      for (int k = 0; k < kRows; ++k) {
        sum_wdy[k] += hsum(s0[k] + s1[k]);
        sum_wdy_xhat[k] += hsum(t0[k] + t1[k]);
      }
    }
  }
  if (!pass1) return;
  for (int k = 0; k < kRows; ++k) {
    first_sums.wdy[k] = sum_wdy[k];
    first_sums.wdy_xhat[k] = sum_wdy_xhat[k];
  }
}

// dweight / dbias are summed over rows in two levels, each in fp32: the rows of a group into one
// buffer, the groups of a block of rows into another. A plain running sum over a block's thousands
// of rows would carry that many roundings (relative errors ~1e-6 in fp32 with 300 rows already);
// this carries ~kRowGroup + rows / kRowGroup, for one extra pass over N per group.
constexpr int64_t kRowGroup = 32;
static_assert(kRowGroup % kBackwardRows == 0, "a row group is a whole number of backward groups");

// total += group; group = 0 (n elements each).
inline void fold_group(float* total, float* group, int64_t n) {
  for_each_vector(0, n, [](int64_t) {}, [&](int64_t j, int64_t count) {
    Vec t0, t1, g0, g1;
    load_float(total + j, count, t0, t1);
    load_float(group + j, count, g0, g1);
    store_float(total + j, count, t0 + g0, t1 + g1);
    store_float(group + j, count, Vec(0.f), Vec(0.f));
  });
}

// Writes out[j] = sum over blocks of partial[block * stride + j], blocks in order, in out's dtype.
void reduce_partials(const float* partial, int64_t stride, int64_t blocks, int64_t n,
                     const at::Tensor& out) {
  FUSEDOPT_DISPATCH_PARAM_TYPES(out.scalar_type(), "fusedopt_norm_bwd_reduce", [&] {
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, std::max<int64_t>(1, kMinElementsPerTask / blocks),
                     [&](int64_t begin, int64_t end) {
      for_each_vector(begin, end, [](int64_t) {}, [&](int64_t j, int64_t count) {
        Vec s0(0.f), s1(0.f);
        for (int64_t k = 0; k < blocks; ++k) {
          Vec p0, p1;
          load_float(partial + k * stride + j, count, p0, p1);
          s0 = s0 + p0;
          s1 = s1 + p1;
        }
        store_float(dst + j, count, s0, s1);
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_bwd_cpu(
    const at::Tensor& dy, const std::optional<at::Tensor>& dresidual_out, const at::Tensor& x,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& mean, const at::Tensor& rstd, bool rms, bool zero_centered_weight) {
  check_rows("norm_bwd", x, "x");
  check_rows("norm_bwd", dy, "dy");
  const int64_t rows = x.size(0);
  const int64_t n = x.size(1);
  TORCH_CHECK(dy.sizes() == x.sizes(), "fusedopt.norm_bwd (cpu): dy has shape ", dy.sizes(),
              ", expected ", x.sizes(), " like x");
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() || x.scalar_type() == at::kFloat,
              "fusedopt.norm_bwd (cpu): dy must have x's dtype (", x.scalar_type(),
              "), or x must be float32 (a residual_out kept in fp32); got dy ", dy.scalar_type());
  TORCH_CHECK(!(rms && bias.has_value()),
              "fusedopt.norm_bwd (cpu): RMSNorm (rms=True) takes no bias; pass bias=None");
  at::Tensor dres;
  if (dresidual_out.has_value()) {
    const at::Tensor& d = *dresidual_out;
    TORCH_CHECK(d.device().is_cpu() && d.sizes() == x.sizes() && d.scalar_type() == x.scalar_type(),
                "fusedopt.norm_bwd (cpu): dresidual_out must be a CPU tensor shaped and typed like "
                "x (", x.sizes(), ", ", x.scalar_type(), "), got ", d.sizes(), ", ",
                d.scalar_type(), " on ", d.device());
    dres = d.contiguous();  // a grad from autograd may come with any layout
  }
  auto check_stat = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 1 &&
                    t.size(0) == rows && t.is_contiguous(),
                "fusedopt.norm_bwd (cpu): ", name, " must be a contiguous float32 CPU tensor of "
                "shape (", rows, ",) as norm_fwd returned it, got ", t.scalar_type(), " ",
                t.sizes(), " on ", t.device());
  };
  if (!rms) check_stat(mean, "mean");
  check_stat(rstd, "rstd");
  const at::Tensor w = affine_as_float("norm_bwd", weight, "weight", n, zero_centered_weight);
  if (bias.has_value()) affine_as_float("norm_bwd", bias, "bias", n, false);  // checks only

  at::Tensor dx = at::empty({rows, n}, x.options());
  at::Tensor dweight = weight.has_value() ? at::empty({n}, weight->options())
                                          : at::empty({0}, x.options());
  at::Tensor dbias = bias.has_value() ? at::empty({n}, bias->options())
                                      : at::empty({0}, x.options());
  if (rows == 0) {
    if (weight.has_value()) dweight.zero_();  // a sum over no rows
    if (bias.has_value()) dbias.zero_();
    return {dx, dweight, dbias};
  }

  // Fixed blocks of rows, one per thread at most: each block sums dweight / dbias over its rows
  // in order into its own fp32 buffers (partial[block] = {block total, group sum}), and the
  // totals are added in block order, so the result depends only on the shapes and the thread
  // count, never on scheduling.
  const int64_t blocks = std::clamp<int64_t>(rows / row_grain(n), 1,
                                             std::min<int64_t>(at::get_num_threads(), rows));
  at::Tensor partial_w, partial_b;
  if (weight.has_value()) partial_w = at::empty({blocks, 2, n}, x.options().dtype(at::kFloat));
  if (bias.has_value()) partial_b = at::empty({blocks, 2, n}, x.options().dtype(at::kFloat));
  float* pw = partial_w.defined() ? partial_w.data_ptr<float>() : nullptr;
  float* pb = partial_b.defined() ? partial_b.data_ptr<float>() : nullptr;

  const BwdArgs args{rows,
                     n,
                     rms,
                     should_stream(dx),
                     w.defined() ? w.const_data_ptr<float>() : nullptr,
                     rms ? nullptr : mean.const_data_ptr<float>(),
                     rstd.const_data_ptr<float>()};
  auto run = [&](auto x_tag, auto dy_tag) {
    using x_t = decltype(x_tag);
    using dy_t = decltype(dy_tag);
    const BwdTensors<x_t, dy_t> t{x.const_data_ptr<x_t>(), dy.const_data_ptr<dy_t>(),
                                  dres.defined() ? dres.const_data_ptr<x_t>() : nullptr,
                                  dx.data_ptr<x_t>()};
    // backward_sweep<kRows, kWeight> with kWeight from whether there is a weight.
    auto sweep = [&](auto rows_tag, int64_t first, auto& first_sums, int64_t second,
                     const auto& second_sums, float* gw, float* gb) {
      constexpr int kRows = decltype(rows_tag)::value;
      if (args.w != nullptr) {
        backward_sweep<kRows, true>(args, t, first, first_sums, second, second_sums, gw, gb);
      } else {
        backward_sweep<kRows, false>(args, t, first, first_sums, second, second_sums, gw, gb);
      }
    };
    using Group = std::integral_constant<int, kBackwardRows>;
    using One = std::integral_constant<int, 1>;
    at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t last_block) {
      for (int64_t block = first_block; block < last_block; ++block) {
        float* bw = pw != nullptr ? pw + block * 2 * n : nullptr;  // {total, group}
        float* bb = pb != nullptr ? pb + block * 2 * n : nullptr;
        if (bw != nullptr) std::memset(bw, 0, 2 * n * sizeof(float));
        if (bb != nullptr) std::memset(bb, 0, 2 * n * sizeof(float));
        const int64_t begin = rows * block / blocks;
        const int64_t end = rows * (block + 1) / blocks;
        float* gw = bw != nullptr ? bw + n : nullptr;  // the row group's sums
        float* gb = bb != nullptr ? bb + n : nullptr;
        // Folds the row group's sums into the block's after `done` rows (from the block's start).
        auto fold_after = [&](int64_t done) {
          if ((done - begin) % kRowGroup == 0 || done == end) {
            if (bw != nullptr) fold_group(bw, gw, n);
            if (bb != nullptr) fold_group(bb, gb, n);
          }
        };
        // Sweep g does pass 1 of rows [from + g * kRows, + kRows) and pass 2 of the kRows rows
        // before them; one more sweep ends the last group.
        auto pipeline = [&](auto rows_tag, int64_t from, int64_t to) {
          constexpr int kRows = decltype(rows_tag)::value;
          GroupSums<kRows> sums[2];
          for (int64_t g = 0, r = from; from < to && r <= to; ++g, r += kRows) {
            const bool has_pass1 = r < to;
            sweep(rows_tag, has_pass1 ? r : -1, sums[g % 2], g > 0 ? r - kRows : -1,
                  sums[(g + 1) % 2], gw, gb);
            if (has_pass1) fold_after(r + kRows);
          }
        };
        // Groups of kBackwardRows from the block's start (so none straddles a row group), then
        // the rows left over one at a time.
        const int64_t grouped =
            n <= kBackwardRowsMaxN ? (end - begin) / kBackwardRows * kBackwardRows : 0;
        pipeline(Group{}, begin, begin + grouped);
        pipeline(One{}, begin + grouped, end);
      }
      if (args.stream) stream_fence();
    });
  };
  FUSEDOPT_DISPATCH_PARAM_TYPES(x.scalar_type(), "fusedopt_norm_bwd", [&] {
    if (dy.scalar_type() == x.scalar_type()) {
      run(scalar_t{}, scalar_t{});
    } else if (dy.scalar_type() == at::kBFloat16) {  // x is float32 (checked above)
      run(float{}, c10::BFloat16{});
    } else {
      run(float{}, c10::Half{});
    }
  });
  if (pw != nullptr) reduce_partials(pw, 2 * n, blocks, n, dweight);
  if (pb != nullptr) reduce_partials(pb, 2 * n, blocks, n, dbias);
  return {dx, dweight, dbias};
}

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("norm_fwd", &fusedopt::cpu::norm_fwd_cpu);
  m.impl("norm_bwd", &fusedopt::cpu::norm_bwd_cpu);
}
