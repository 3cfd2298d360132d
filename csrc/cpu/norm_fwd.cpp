// CPU LayerNorm / RMSNorm forward (norm_fwd) over the last dimension of a contiguous (rows, N)
// tensor, with an optional fused residual add. The math is fusedopt/reference.py::_norm; the op's
// contract is in csrc/fusedopt.cpp; the tunables and shared row helpers are in norm_rows.h.
//
// One row at a time (rows split over threads), every pass after the first reading the
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
//
// Contraction: nothing is contracted implicitly; -ffp-contract=off is a build flag of every CPU
// source (setup.py; docs/numerics.md). The at::vec::fmadd calls written here are deliberate and
// stay fused: the sums of squares (row_moments) and y = x_hat * w + b.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "multi_tensor.h"
#include "norm_rows.h"
#include "streaming_store.h"

namespace fusedopt::cpu {
namespace {

// The forward's prefetch of the next row: kRowPrefetchLinesPerStep cache lines of each stream per
// vector step, over both passes of the current row, so that the next row is read from memory while
// this one is computed and written (prefetching the next row at all made the forward ~10% faster
// here). Prefetching in the last pass only would put all of memory's traffic (the next row's
// reads and the streamed writes) in that pass and leave memory idle in the other.
class RowPrefetcher {
 public:
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
      for (int l = 0; l < kRowPrefetchLinesPerStep && next_[s] < end_[s]; ++l, next_[s] += 64) {
        __builtin_prefetch(next_[s]);
      }
    }
  }

 private:
  const char* next_[kMaxStreams] = {};
  const char* end_[kMaxStreams] = {};
  int streams_ = 0;
};

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

}  // namespace
}  // namespace fusedopt::cpu

TORCH_LIBRARY_IMPL(fusedopt, CPU, m) {
  m.impl("norm_fwd", &fusedopt::cpu::norm_fwd_cpu);
}
