// CPU LayerNorm / RMSNorm backward (norm_bwd) over the last dimension of a contiguous (rows, N)
// tensor, recomputed from the normalized input (x, or the forward's residual_out). The math is
// fusedopt/reference.py::_norm_backward; the op's contract is in csrc/fusedopt.cpp; the tunables
// and shared row helpers are in norm_rows.h.
//
// One row at a time: x_hat = (x - mean) * rstd, wdy = dy * w_eff,
//   dx = rstd * (wdy - mean(wdy) - x_hat * mean(wdy * x_hat)) + dresidual_out
//   (RMSNorm: no mean(wdy) term); dweight = sum_rows dy * x_hat, dbias = sum_rows dy, summed in
//   fp32 per group of kRowGroup rows, the groups per block of rows, then the blocks in a fixed
//   order.
//
// The backward runs over groups of kRows consecutive rows, software-pipelined: one sweep over the
// columns does pass 1 of a group and pass 2 of the group before it, so that the first's reads
// from memory and the second's streamed writes (dx) overlap, as in a copy, rather than
// alternating (pass 1 alone runs at the read bandwidth, pass 2 alone at a copy's; one after the
// other they took ~30% longer than a copy of the same bytes). Pass 2 re-reads its rows from
// cache, where the previous sweep left them (the schedule: BackwardPipeline).
//   Pass 1: each row's sums of wdy and wdy * x_hat, and the per-column partial sums of dy * x_hat
//   and dy, loaded and stored once per group (each row's contribution still added in row order).
//   Pass 2: dx = rstd * (wdy - mean(wdy) - x_hat * mean(wdy * x_hat)) + dresidual_out.
//
// Contraction: nothing is contracted implicitly; -ffp-contract=off is a build flag of every CPU
// source (setup.py; docs/numerics.md). That matters here: wdy = dy * w is computed in both passes,
// and a product fused into an FMA in one pass but rounded in the other leaves rounding noise where
// wdy - mean(wdy) cancels exactly (N = 1: dx must be 0), amplified by rstd. The at::vec::fmadd
// calls written here are deliberate and stay fused: the sums of wdy * x_hat and dy * x_hat.
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>

#include "multi_tensor.h"
#include "norm_rows.h"
#include "streaming_store.h"

namespace fusedopt::cpu {
namespace {

struct BwdArgs {
  int64_t rows;
  int64_t n;
  bool rms;
  bool stream;         // stream dx
  const float* w;      // w_eff in fp32, or null
  const float* mean;   // (rows,), or null for RMSNorm
  const float* rstd;   // (rows,)
};

// Prefetches the cache lines of elements [0, count) at p.
template <typename scalar_t>
FUSEDOPT_INLINE void prefetch_elements(const scalar_t* p, int64_t count) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < count * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
    __builtin_prefetch(bytes + b);
  }
}

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

// The backward of one block of rows [begin, end), as a pipeline of named steps: dx of each row, and
// the block's dweight / dbias partial sums (partial_w / partial_b: the block's {total, row group}
// buffers, n floats each, or null).
//   run: groups of kBackwardRows rows from the block's start (so that none straddles a row
//     group), then the rows left over one at a time;
//   sweeps: sweep g does pass 1 of rows [from + g * kRows, + kRows) and pass 2 of the kRows rows
//     before them (backward_sweep); one more sweep ends the last group;
//   fold_after: every kRowGroup rows from the block's start, and at its end, the row group's sums
//     are added into the block's totals.
template <bool kWeight, typename x_t, typename dy_t>
class BackwardPipeline {
 public:
  BackwardPipeline(const BwdArgs& a, const BwdTensors<x_t, dy_t>& t, float* partial_w,
                   float* partial_b, int64_t begin, int64_t end)
      : a_(a),
        t_(t),
        total_w_(partial_w),
        total_b_(partial_b),
        group_w_(partial_w != nullptr ? partial_w + a.n : nullptr),
        group_b_(partial_b != nullptr ? partial_b + a.n : nullptr),
        begin_(begin),
        end_(end) {}

  void run() {
    clear_sums();
    const int64_t grouped =
        a_.n <= kBackwardRowsMaxN ? (end_ - begin_) / kBackwardRows * kBackwardRows : 0;
    sweeps<kBackwardRows>(begin_, begin_ + grouped);
    sweeps<1>(begin_ + grouped, end_);
  }

 private:
  // The block's totals and its row group's sums start at zero.
  void clear_sums() {
    if (total_w_ != nullptr) std::memset(total_w_, 0, 2 * a_.n * sizeof(float));
    if (total_b_ != nullptr) std::memset(total_b_, 0, 2 * a_.n * sizeof(float));
  }

  // Rows [from, to) in groups of kRows.
  template <int kRows>
  void sweeps(int64_t from, int64_t to) {
    GroupSums<kRows> sums[2];
    for (int64_t g = 0, r = from; from < to && r <= to; ++g, r += kRows) {
      const bool has_pass1 = r < to;
      backward_sweep<kRows, kWeight>(a_, t_, has_pass1 ? r : -1, sums[g % 2],
                                     g > 0 ? r - kRows : -1, sums[(g + 1) % 2], group_w_,
                                     group_b_);
      if (has_pass1) fold_after(r + kRows);
    }
  }

  // Folds the row group's sums into the block's totals after `done` rows (from the block's start).
  void fold_after(int64_t done) {
    if ((done - begin_) % kRowGroup == 0 || done == end_) {
      if (total_w_ != nullptr) fold_group(total_w_, group_w_, a_.n);
      if (total_b_ != nullptr) fold_group(total_b_, group_b_, a_.n);
    }
  }

  const BwdArgs& a_;
  const BwdTensors<x_t, dy_t>& t_;
  float* const total_w_;
  float* const total_b_;
  float* const group_w_;
  float* const group_b_;
  const int64_t begin_;
  const int64_t end_;
};

// The rows in `blocks` fixed blocks, one parallel task each at most; partial_w / partial_b:
// (blocks, 2, n), or null.
template <typename x_t, typename dy_t>
void norm_bwd_typed(const BwdArgs& a, const BwdTensors<x_t, dy_t>& t, int64_t blocks,
                    float* partial_w, float* partial_b) {
  const int64_t n = a.n;
  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t last_block) {
    for (int64_t block = first_block; block < last_block; ++block) {
      float* bw = partial_w != nullptr ? partial_w + block * 2 * n : nullptr;
      float* bb = partial_b != nullptr ? partial_b + block * 2 * n : nullptr;
      const int64_t begin = a.rows * block / blocks;
      const int64_t end = a.rows * (block + 1) / blocks;
      if (a.w != nullptr) {
        BackwardPipeline<true, x_t, dy_t>(a, t, bw, bb, begin, end).run();
      } else {
        BackwardPipeline<false, x_t, dy_t>(a, t, bw, bb, begin, end).run();
      }
    }
    if (a.stream) stream_fence();
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
    norm_bwd_typed(args, t, blocks, pw, pb);
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
  m.impl("norm_bwd", &fusedopt::cpu::norm_bwd_cpu);
}
