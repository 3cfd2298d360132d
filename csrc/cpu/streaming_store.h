// Streaming (non-temporal) stores for large outputs, shared by the norm kernels and the bytes-floor
// probe (stream.cpp), so that the probe writes its output exactly as the kernels write theirs.
#pragma once

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "multi_tensor.h"

namespace fusedopt::cpu {

// Outputs larger than this are written with streaming (non-temporal) stores: no read-for-ownership
// of the destination and no eviction of the rows being worked on. Measured here (2 cores, fp32):
// a 128 MiB copy into reused memory takes 9.6 ms with ordinary stores and 6.4 ms streamed, while
// up to 64 MiB the ordinary stores win once the output is read back (it is still in the
// last-level cache). Into fresh pages (an allocator that returns large blocks to the OS) streaming
// is much slower (47 against 33 ms): every first touch faults, the kernel zeroes the page through
// the cache, and each streamed line must then be evicted first; see memory_is_fresh.
constexpr int64_t kStreamingStoreBytes = int64_t{64} << 20;

// A streamed vector step must start at this byte alignment (one vector register).
constexpr int64_t kStreamAlign = Vec::size() * sizeof(float);
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kCanStream = true;
#else
constexpr bool kCanStream = false;
#endif

// Stores one full vector step (kVecStep elements) at a kStreamAlign-aligned dst, bypassing caches.
template <typename scalar_t>
FUSEDOPT_INLINE void stream_float(scalar_t* dst, const Vec& lo, const Vec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm512_stream_ps(dst, lo);
    _mm512_stream_ps(dst + Vec::size(), hi);
  } else {
    const __m512i packed = pack_float<scalar_t>(lo, hi);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), packed);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    _mm256_stream_ps(dst, lo);
    _mm256_stream_ps(dst + Vec::size(), hi);
  } else {
    const __m256i packed = pack_float<scalar_t>(lo, hi);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), packed);
  }
#else
  store_float(dst, kVecStep, lo, hi);
#endif
}

// Orders this thread's streaming stores before whatever follows (the end of a parallel task).
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Whether the page holding p was never touched (not resident): a large output freshly mapped by the
// allocator. One mincore call; the middle of an output is sampled, because an allocator's own
// header may share the first page (and a neighbour's the last).
inline bool memory_is_fresh(const void* p) {
#if defined(__linux__)
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t start = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  unsigned char resident = 1;
  if (mincore(reinterpret_cast<void*>(start), page, &resident) != 0) return false;
  return (resident & 1) == 0;
#else
  (void)p;
  return false;
#endif
}

inline bool should_stream(const at::Tensor& out) {
  const int64_t bytes = out.numel() * static_cast<int64_t>(out.element_size());
  return kCanStream && bytes > kStreamingStoreBytes &&
         !memory_is_fresh(static_cast<const char*>(out.const_data_ptr()) + bytes / 2);
}

// Elements before dst + head is kStreamAlign-aligned (at most n).
template <typename scalar_t>
inline int64_t stream_head(const scalar_t* dst, int64_t n) {
  const int64_t misaligned = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dst) % kStreamAlign);
  return misaligned == 0 ? 0
                         : std::min<int64_t>(n, (kStreamAlign - misaligned) / sizeof(scalar_t));
}

// Writes one row of n elements to dst: value(i, count, streamed, lo, hi) computes elements
// [i, i + count) as fp32 (lo, hi), and they are stored in dst's dtype; `streamed` says that this
// is a full step streamed to an aligned dst + i (a value function that writes a second output
// may stream that one too). With stream, full steps after an unaligned head are streamed.
template <typename scalar_t, typename ValueFn>
FUSEDOPT_INLINE void write_row(scalar_t* dst, int64_t n, bool stream, const ValueFn& value) {
  int64_t i = 0;
  Vec lo, hi;
  if (stream) {
    const int64_t head = stream_head(dst, n);
    if (head > 0) {
      value(0, head, false, lo, hi);
      store_float(dst, head, lo, hi);
      i = head;
    }
    for (; i + kVecStep <= n; i += kVecStep) {
      value(i, kVecStep, true, lo, hi);
      stream_float(dst + i, lo, hi);
    }
  } else {
    for (; i + kVecStep <= n; i += kVecStep) {
      value(i, kVecStep, false, lo, hi);
      store_float(dst + i, kVecStep, lo, hi);
    }
  }
  if (i < n) {
    value(i, n - i, false, lo, hi);
    store_float(dst + i, n - i, lo, hi);
  }
}

}  // namespace fusedopt::cpu
