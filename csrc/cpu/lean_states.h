// The lean-state step driver of the CPU optimizers: states stored in fewer bytes (bf16, or 8-bit
// blockwise) and bf16 / fp16 params kept precise (an fp32 master, a compact master, Kahan
// compensation, stochastic rounding). The formats are fusedopt/reference.py's "Lean states"
// section, which is their specification; every stream here is read and written through a codec
// that decodes it to fp32 and encodes it back, so an algorithm's math stays the one lambda it
// runs with for_each_step.
#pragma once

#include <c10/util/bit_cast.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "multi_tensor.h"

namespace fusedopt::cpu::lean {

// Elements per absmax scale of an 8-bit state (reference.QUANT_BLOCK); a multiple of kVecStep, and
// chunks (kChunkElements) are whole blocks, so a block never spans two threads.
constexpr int64_t kQuantBlock = 256;
static_assert(kChunkElements % kQuantBlock == 0 && kQuantBlock % kVecStep == 0);

// The codes of a stream: uint8 (exp_avg_sq), int8 (a compact master's correction), or uint8
// holding 128 + an int8 value (exp_avg's signed code, "offset binary"): flipping its top bit
// gives the int8, so offset codes load and store as int8 ones with no vector add.
enum class Code { kUnsigned, kSigned, kOffset };

template <Code kCode>
using code_storage_t = std::conditional_t<kCode == Code::kSigned, int8_t, uint8_t>;

using IntVec = at::vec::Vectorized<int32_t>;

// kVecStep codes as two int32 vectors of their values (an offset code's minus 128); `count` fewer
// are zeros.
template <Code kCode>
FUSEDOPT_INLINE void load_code_ints(const code_storage_t<kCode>* src, int64_t count, IntVec& lo,
                                    IntVec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  if (count == kVecStep) {
    const auto widen = [](const code_storage_t<kCode>* p) {
      __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      if constexpr (kCode == Code::kUnsigned) return _mm512_cvtepu8_epi32(bytes);
      if constexpr (kCode == Code::kOffset) bytes = _mm_xor_si128(bytes, _mm_set1_epi8(-128));
      return _mm512_cvtepi8_epi32(bytes);
    };
    lo = widen(src);
    hi = widen(src + 16);
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  // AVX2 builds too (CPUs without AVX-512): the scalar loop below made their 8-bit step ~2.8x
  // slower in cache.
  if (count == kVecStep) {
    const auto widen = [](const code_storage_t<kCode>* p) {
      __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      if constexpr (kCode == Code::kUnsigned) return _mm256_cvtepu8_epi32(bytes);
      if constexpr (kCode == Code::kOffset) bytes = _mm_xor_si128(bytes, _mm_set1_epi8(-128));
      return _mm256_cvtepi8_epi32(bytes);
    };
    lo = widen(src);
    hi = widen(src + 8);
    return;
  }
#endif
  alignas(64) int32_t wide[kVecStep] = {};
  for (int64_t j = 0; j < count; ++j) {
    wide[j] = static_cast<int32_t>(src[j]) - (kCode == Code::kOffset ? 128 : 0);
  }
  lo = IntVec::loadu(wide);
  hi = IntVec::loadu(wide + IntVec::size());
}

// The same as fp32 vectors.
template <Code kCode>
FUSEDOPT_INLINE void load_codes(const code_storage_t<kCode>* src, int64_t count, Vec& lo,
                                Vec& hi) {
  IntVec lo_ints, hi_ints;
  load_code_ints<kCode>(src, count, lo_ints, hi_ints);
  lo = at::vec::convert_to_fp_of_same_size<float>(lo_ints);
  hi = at::vec::convert_to_fp_of_same_size<float>(hi_ints);
}

// int32 values into codes, saturating at the code's range (0 to 255 unsigned, -128 to 127
// signed and offset).
template <Code kCode>
FUSEDOPT_INLINE void store_code_ints(code_storage_t<kCode>* dst, int64_t count,
                                     const IntVec& lo, const IntVec& hi) {
#if defined(CPU_CAPABILITY_AVX512)
  if (count == kVecStep) {
    const auto narrow = [](const IntVec& wide) {
      if constexpr (kCode == Code::kUnsigned) return _mm512_cvtusepi32_epi8(wide);
      const __m128i bytes = _mm512_cvtsepi32_epi8(wide);
      return kCode == Code::kOffset ? _mm_xor_si128(bytes, _mm_set1_epi8(-128)) : bytes;
    };
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), narrow(lo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), narrow(hi));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (count == kVecStep) {
    // Saturating packs work within 128-bit lanes: the permute puts the words back in order.
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(lo, hi), 0xD8);
    const __m128i low = _mm256_castsi256_si128(words), high = _mm256_extracti128_si256(words, 1);
    __m128i bytes = kCode == Code::kUnsigned ? _mm_packus_epi16(low, high)
                                             : _mm_packs_epi16(low, high);
    if constexpr (kCode == Code::kOffset) bytes = _mm_xor_si128(bytes, _mm_set1_epi8(-128));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), bytes);
    return;
  }
#endif
  alignas(64) int32_t wide[kVecStep];
  lo.store(wide);
  hi.store(wide + IntVec::size());
  constexpr int32_t kMin = kCode == Code::kUnsigned ? 0 : -128;
  constexpr int32_t kMax = kCode == Code::kUnsigned ? 255 : 127;
  constexpr int32_t kOffset = kCode == Code::kOffset ? 128 : 0;
  for (int64_t j = 0; j < count; ++j) {
    dst[j] = static_cast<code_storage_t<kCode>>(std::clamp(wide[j], kMin, kMax) + kOffset);
  }
}

// fp32 values rounded to nearest (ties to even) into codes, saturating as store_code_ints does.
template <Code kCode>
FUSEDOPT_INLINE void store_codes(code_storage_t<kCode>* dst, int64_t count, const Vec& lo,
                                 const Vec& hi) {
  // cvtps rounds as MXCSR says: to nearest even unless someone changed it.
#if defined(CPU_CAPABILITY_AVX512)
  const auto round = [](const Vec& x) -> IntVec { return _mm512_cvtps_epi32(x); };
#elif defined(CPU_CAPABILITY_AVX2)
  const auto round = [](const Vec& x) -> IntVec { return _mm256_cvtps_epi32(x); };
#else
  // Clamped first: an out-of-range float has no int32 (the vector instructions saturate).
  const auto round = [](const Vec& x) {
    return at::vec::convert_to_int_of_same_size(
        at::vec::clamp(x, Vec(-256.0f), Vec(256.0f)).round());
  };
#endif
  store_code_ints<kCode>(dst, count, round(lo), round(hi));
}

#if defined(CPU_CAPABILITY_AVX512)
// 64 fp32 values (four vectors, in order) rounded to nearest even into codes, saturating as
// store_codes does. Two rounds of saturating packs and one permute: the same bytes as four
// store_codes halves, in a third of the shuffle work (each narrowing vpmov is two uops).
template <Code kCode>
FUSEDOPT_INLINE void store_codes_64(code_storage_t<kCode>* dst, const Vec& a, const Vec& b,
                                    const Vec& c, const Vec& d) {
  const __m512i wa = _mm512_cvtps_epi32(a), wb = _mm512_cvtps_epi32(b),
                wc = _mm512_cvtps_epi32(c), wd = _mm512_cvtps_epi32(d);
  // The packs work within 128-bit lanes: lane L ends with 4 values each of a, b, c, d, from
  // 4L on; the permute puts each source's four lanes' dwords back in order.
  __m512i bytes;
  if constexpr (kCode == Code::kUnsigned) {
    bytes = _mm512_packus_epi16(_mm512_packus_epi32(wa, wb), _mm512_packus_epi32(wc, wd));
  } else {
    bytes = _mm512_packs_epi16(_mm512_packs_epi32(wa, wb), _mm512_packs_epi32(wc, wd));
  }
  bytes = _mm512_permutexvar_epi32(
      _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), bytes);
  if constexpr (kCode == Code::kOffset) bytes = _mm512_xor_si512(bytes, _mm512_set1_epi8(-128));
  _mm512_storeu_si512(dst, bytes);
}
#endif

// sqrt(x), 1 / b and y^(1/4) for the 8-bit step, from the hardware's ~14-bit estimates when
// AVX-512 has them: their relative error (< 2^-14 each, ~1e-4 combined) is far below the 8-bit
// states' own (~1e-2), and vsqrtps / vdivps, or Newton steps on the estimates, made the step
// compute-bound.
FUSEDOPT_INLINE Vec sqrt_estimate(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  // x * rsqrt(max(x, 2^-126)): zeros stay zero (0 * rsqrt(0) = 0 * inf would be NaN), and
  // subnormal x (a square root < 2^-63, far below any eps) come out below 2^-62; the max runs on
  // a pipe that the step's many multiplies leave free, where a compare and mask would not.
  return _mm512_mul_ps(x, _mm512_rsqrt14_ps(_mm512_max_ps(x, _mm512_set1_ps(0x1p-126f))));
#else
  return x.sqrt();
#endif
}

FUSEDOPT_INLINE Vec reciprocal_estimate(const Vec& b) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_rcp14_ps(b);
#else
  return Vec(1.0f) / b;
#endif
}

// c - a * b in one rounding where the ISA fuses it (at::vec::fnmadd is missing from older torch
// headers, 2.6's among them).
FUSEDOPT_INLINE Vec fnmadd(const Vec& a, const Vec& b, const Vec& c) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_fnmadd_ps(a, b, c);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_fnmadd_ps(a, b, c);
#else
  return c - a * b;
#endif
}

// y^(1/4) for y in [0, 255^4], as rsqrt(rsqrt(y)); 0 maps to rsqrt(inf) = 0. Under 1% of codes
// round to the neighbour of the reference's (which takes exact roots).
FUSEDOPT_INLINE Vec fourth_root(const Vec& y) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_rsqrt14_ps(_mm512_rsqrt14_ps(y));
#else
  return y.sqrt().sqrt();
#endif
}

// A stream stored in its own dtype (fp32, bf16, fp16), rounded to nearest.
template <typename scalar_t>
struct PlainStream {
  scalar_t* data;
  FUSEDOPT_INLINE void load(int64_t i, int64_t n, Vec& lo, Vec& hi) const {
    load_float(data + i, n, lo, hi);
  }
  FUSEDOPT_INLINE void store(int64_t i, int64_t n, const Vec& lo, const Vec& hi) const {
    store_float(data + i, n, lo, hi);
  }
  void begin_block(int64_t) {}
  void end_block(int64_t, int64_t) {}
};

// A stream the update only writes (Muon's update to orthogonalize, in the param's place): load
// leaves the vectors as they are, unread.
template <typename scalar_t>
struct OutputStream {
  scalar_t* data;
  FUSEDOPT_INLINE void load(int64_t, int64_t, Vec&, Vec&) const {}
  FUSEDOPT_INLINE void store(int64_t i, int64_t n, const Vec& lo, const Vec& hi) const {
    store_float(data + i, n, lo, hi);
  }
  void begin_block(int64_t) {}
  void end_block(int64_t, int64_t) {}
};

// max(acc, |x|) lane by lane, NaN where x is (acc holds magnitudes). On AVX-512 an unsigned
// integer max of the bits without their sign, which orders magnitudes as their values and puts
// NaNs above infinity: it runs on the integer pipes, which the 8-bit step leaves idle, where
// vmaxps takes a busy pipe and drops NaNs (a compare to keep them cost the in-cache step 4-8%).
FUSEDOPT_INLINE Vec max_abs(const Vec& acc, const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512i magnitude =
      _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF));
  return _mm512_castsi512_ps(_mm512_max_epu32(_mm512_castps_si512(acc), magnitude));
#else
  return at::vec::maximum(acc, x.abs());
#endif
}

// The largest lane of max_abs's accumulator, NaN if a lane is.
FUSEDOPT_INLINE float reduce_max_abs(const Vec& acc) {
#if defined(CPU_CAPABILITY_AVX512)
  return c10::bit_cast<float>(_mm512_reduce_max_epu32(_mm512_castps_si512(acc)));
#else
  return at::vec::vec_reduce_all<float>(
      [](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, acc);
#endif
}

// An 8-bit blockwise state (kSigned: exp_avg's code, 128 + round(127 z); else exp_avg_sq's,
// round(255 z); z = sign(x) |x / absmax|^(1/4)). Values are decoded with the block's stored absmax,
// times decode_factor / unit (StateList's), and come back in `unit`s; a block's new values wait in
// `pending` (L1) until the block ends and its new absmax (gathered as they are stored) is known,
// and are encoded then. A NaN value makes the absmax NaN, as the reference's amax does, so the
// whole block decodes to NaN: a blow-up stays visible rather than leaving a finite state. `pending`
// is the caller's buffer, not a member: a codec holding an array lived in memory, where any store
// (the vector stores may alias anything) could change its fields, so the absmax being gathered went
// through the stack every iteration; without one it stays in a register (the in-cache 8-bit AdamW
// step took ~22% less time).
template <bool kSigned>
struct BlockwiseStream {
  // The code's steps from 0 to the absmax: 127 each side of 128, or 255.
  static constexpr float kLevels = kSigned ? 127.0f : 255.0f;
  static constexpr Code kCode = kSigned ? Code::kOffset : Code::kUnsigned;
  uint8_t* codes;
  float* absmax;
  float* pending;  // kQuantBlock floats
  float decode_factor = 1.0f;
  float unit = 1.0f;
  float scale = 0;  // the block's stored absmax * decode_factor / (unit kLevels^4)
  int64_t block_begin = 0;
  Vec new_absmax = Vec(0.0f);

  // The block from `begin` (a multiple of kQuantBlock) starts.
  FUSEDOPT_INLINE void begin_block(int64_t begin) {
    const float levels_squared = kLevels * kLevels;
    scale = absmax[begin / kQuantBlock] *
            (decode_factor / (unit * levels_squared * levels_squared));
    new_absmax = Vec(0.0f);
    block_begin = begin;
  }
  FUSEDOPT_INLINE void load(int64_t i, int64_t n, Vec& lo, Vec& hi) const {
    load_codes<kCode>(codes + i, n, lo, hi);
    lo = decode(lo);
    hi = decode(hi);
  }
  // x = sign(d) d^4 * absmax / kLevels^4 (times decode_factor / unit) with d the code's steps
  // from zero: the reference's ((d / kLevels)^2)^2 * absmax up to rounding (a few ulp).
  FUSEDOPT_INLINE Vec decode(const Vec& d) const {
    const Vec w = d * d;
    const Vec x = w * w * Vec(scale);
    return kSigned ? x | (d & Vec(-0.0f)) : x;
  }
  FUSEDOPT_INLINE void store(int64_t i, int64_t n, const Vec& lo, const Vec& hi) {
    float* dst = pending + (i - block_begin);
    if (n == kVecStep) {
      lo.store(dst);
      hi.store(dst + Vec::size());
      gather_absmax(lo, hi);
    } else {
      // The lanes past n hold whatever the update made of the zero padding (a decay or an eps
      // can make it nonzero): only the stored ones count.
      store_float(dst, n, lo, hi);
      Vec stored_lo, stored_hi;
      load_float(dst, n, stored_lo, stored_hi);
      gather_absmax(stored_lo, stored_hi);
    }
  }
  FUSEDOPT_INLINE void gather_absmax(const Vec& lo, const Vec& hi) {
    new_absmax = max_abs(max_abs(new_absmax, lo), hi);
  }
  // Encodes the block [begin, begin + n) from `pending`.
  FUSEDOPT_INLINE void end_block(int64_t begin, int64_t n) {
    const float block_max = reduce_max_abs(new_absmax);  // in units
    absmax[begin / kQuantBlock] = block_max * unit;
    // kLevels^4 / absmax: the fourth root of |x| times it is the code's steps from zero.
    const float levels_squared = kLevels * kLevels;
    const Vec to_steps(block_max > 0 ? levels_squared * levels_squared / block_max : 0.0f);
#if defined(CPU_CAPABILITY_AVX512)
    if (n == kQuantBlock) {
      static_assert(Vec::size() == 16 && kQuantBlock % 64 == 0);
      for (int64_t j = 0; j < n; j += 64) {
        const float* x = pending + j;
        store_codes_64<kCode>(codes + begin + j, encode(Vec::loadu(x), to_steps),
                              encode(Vec::loadu(x + 16), to_steps),
                              encode(Vec::loadu(x + 32), to_steps),
                              encode(Vec::loadu(x + 48), to_steps));
      }
      return;
    }
#endif
    for (int64_t j = 0; j < n; j += kVecStep) {
      const int64_t count = std::min<int64_t>(kVecStep, n - j);
      Vec lo, hi;
      load_float(pending + j, count, lo, hi);
      store_codes<kCode>(codes + begin + j, count, encode(lo, to_steps), encode(hi, to_steps));
    }
  }
  // The code's steps from zero for x, unrounded (store_codes rounds and offsets them).
  FUSEDOPT_INLINE static Vec encode(const Vec& x, const Vec& to_steps) {
    if constexpr (kSigned) {
      return fourth_root(x.abs() * to_steps) | (x & Vec(-0.0f));
    } else {
      return fourth_root(x * to_steps);
    }
  }
};

// A bf16 / fp16 param with an fp32 master copy: the update reads the master and writes both.
template <typename scalar_t>
struct MasterParam {
  scalar_t* param;
  float* master;
  FUSEDOPT_INLINE void load(int64_t i, int64_t n, Vec& lo, Vec& hi) const {
    load_float(master + i, n, lo, hi);
  }
  FUSEDOPT_INLINE void store(int64_t i, int64_t n, const Vec& lo, const Vec& hi) const {
    store_float(master + i, n, lo, hi);
    store_float(param + i, n, lo, hi);
  }
  void begin_block(int64_t) {}
  void end_block(int64_t, int64_t) {}
};

// The bits of fp32 lanes as int32 lanes (at::vec::cast goes through memory for this direction).
FUSEDOPT_INLINE IntVec bits_of(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_castps_si512(x);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_castps_si256(x);
#else
  return at::vec::cast<int32_t>(x);
#endif
}

// A bf16 param plus an int8 correction c (param_mode "compact", a 24-bit master): the master's
// fp32 bits are the param's plus 256 c (reference.compact_master), so both ways are integer adds
// and shifts on the bits, exactly the reference's. (Counting c in 127ths of half a bf16 ulp, as
// an earlier format did, took ~0.4 ns per param of float work in cache, half the 8-bit AdamW
// step's own.)
struct CompactParam {
  c10::BFloat16* param;
  int8_t* correction;
  FUSEDOPT_INLINE void load(int64_t i, int64_t n, Vec& lo, Vec& hi) const {
    Vec p_lo, p_hi;
    IntVec c_lo, c_hi;
    load_float(param + i, n, p_lo, p_hi);
    load_code_ints<Code::kSigned>(correction + i, n, c_lo, c_hi);
    lo = at::vec::cast<float>(bits_of(p_lo) + (c_lo << IntVec(8)));
    hi = at::vec::cast<float>(bits_of(p_hi) + (c_hi << IntVec(8)));
  }
  FUSEDOPT_INLINE void store(int64_t i, int64_t n, const Vec& lo, const Vec& hi) const {
    const auto packed = pack_float<c10::BFloat16>(lo, hi);
    if (n == kVecStep) {
      packed.store(param + i);
    } else {
      packed.store(param + i, n);
    }
    auto [p_lo, p_hi] = at::vec::convert_to_float<c10::BFloat16>(packed);
    store_code_ints<Code::kSigned>(correction + i, n, steps_left_out(lo, p_lo),
                                   steps_left_out(hi, p_hi));
  }
  // The bits that rounding value to p left out, in steps of 2^8 rounded half up (saturated to
  // int8 as they are stored).
  FUSEDOPT_INLINE static IntVec steps_left_out(const Vec& value, const Vec& p) {
    return (bits_of(value) - bits_of(p) + IntVec(128)) >> IntVec(8);
  }
  void begin_block(int64_t) {}
  void end_block(int64_t, int64_t) {}
};

// A bf16 / fp16 param whose rounding error is carried, in a buffer of its dtype, into the next
// update (Kahan-compensated summation).
template <typename scalar_t>
struct KahanParam {
  scalar_t* param;
  scalar_t* compensation;
  FUSEDOPT_INLINE void load(int64_t i, int64_t n, Vec& lo, Vec& hi) const {
    Vec c_lo, c_hi;
    load_float(param + i, n, lo, hi);
    load_float(compensation + i, n, c_lo, c_hi);
    lo = lo + c_lo;
    hi = hi + c_hi;
  }
  FUSEDOPT_INLINE void store(int64_t i, int64_t n, const Vec& lo, const Vec& hi) const {
    const auto packed = pack_float<scalar_t>(lo, hi);
    auto [p_lo, p_hi] = at::vec::convert_to_float<scalar_t>(packed);
    store_float(param + i, n, p_lo, p_hi);
    store_float(compensation + i, n, lo - p_lo, hi - p_hi);
  }
  void begin_block(int64_t) {}
  void end_block(int64_t, int64_t) {}
};

// x >> k for uint32 values: on a scalar, and on the uint32 lanes that IntVecs hold (whose own
// >> is arithmetic).
inline uint32_t shift_right_logical(uint32_t x, int k) { return x >> k; }

FUSEDOPT_INLINE IntVec shift_right_logical(const IntVec& x, int k) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_srli_epi32(x, k);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_srli_epi32(x, k);
#else
  return (x >> IntVec(k)) & IntVec(static_cast<int32_t>(0xFFFFFFFFu >> k));
#endif
}

// murmur3's 32-bit finalizer (reference._mix32), on a uint32 or on each lane of an IntVec
// (its multiplies wrap as uint32 ones do).
template <typename T>
FUSEDOPT_INLINE T mix32(T x) {
  x = x ^ shift_right_logical(x, 16);
  x = x * T(static_cast<int32_t>(0x85EBCA6Bu));
  x = x ^ shift_right_logical(x, 13);
  x = x * T(static_cast<int32_t>(0xC2B2AE35u));
  return x ^ shift_right_logical(x, 16);
}

// The per-tensor key of stochastic rounding's random bits (reference.stochastic_round_bf16).
inline uint32_t stochastic_key(double step, int64_t tensor_index) {
  return mix32(static_cast<uint32_t>(static_cast<int64_t>(step)) +
               0x9E3779B9u * static_cast<uint32_t>(tensor_index + 1));
}

// The high 16 bits of each int32 lane as bf16 values, the first `count` (kVecStep at most).
FUSEDOPT_INLINE void store_high_halves(c10::BFloat16* dst, int64_t count, const IntVec& lo,
                                       const IntVec& hi) {
  alignas(64) uint16_t halves[kVecStep];
#if defined(CPU_CAPABILITY_AVX512)
  // vpmovdw keeps each lane's low 16 bits: after the shift, its high ones.
  const __m256i lo_halves = _mm512_cvtepi32_epi16(_mm512_srli_epi32(lo, 16));
  const __m256i hi_halves = _mm512_cvtepi32_epi16(_mm512_srli_epi32(hi, 16));
  if (count == kVecStep) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), lo_halves);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16), hi_halves);
    return;
  }
  _mm256_store_si256(reinterpret_cast<__m256i*>(halves), lo_halves);
  _mm256_store_si256(reinterpret_cast<__m256i*>(halves + 16), hi_halves);
#else
  alignas(64) int32_t bits[kVecStep];
  lo.store(bits);
  hi.store(bits + IntVec::size());
  for (int64_t j = 0; j < count; ++j) {
    halves[j] = static_cast<uint16_t>(static_cast<uint32_t>(bits[j]) >> 16);
  }
#endif
  std::memcpy(dst, halves, count * sizeof(uint16_t));
}

// A bf16 param rounded up or down at random, unbiased (param_mode "stochastic"): 16 random bits,
// hashed from the key and the element's index, added to the fp32 value's, which then drops its
// low 16 (reference.stochastic_round_bf16), lane by lane.
struct StochasticParam {
  c10::BFloat16* param;
  uint32_t key;
  FUSEDOPT_INLINE void load(int64_t i, int64_t n, Vec& lo, Vec& hi) const {
    load_float(param + i, n, lo, hi);
  }
  FUSEDOPT_INLINE void store(int64_t i, int64_t n, const Vec& lo, const Vec& hi) const {
    // Element indices as uint32 (they wrap as the reference's do), then their random bits.
    const IntVec first(static_cast<int32_t>(static_cast<uint32_t>(i)));
    const IntVec index = first + IntVec::arange(0, 1);
    const IntVec key_lanes(static_cast<int32_t>(key)), spread(static_cast<int32_t>(0x9E3779B1u));
    const auto noise = [&](const IntVec& element) {
      return mix32((element * spread) ^ key_lanes) & IntVec(0xFFFF);
    };
    const IntVec next = index + IntVec(IntVec::size());
    store_high_halves(param + i, n, bits_of(lo) + noise(index), bits_of(hi) + noise(next));
  }
  void begin_block(int64_t) {}
  void end_block(int64_t, int64_t) {}
};

// update(p, g, s[0], ..., s[K - 1]).
template <typename UpdateFn, size_t... K>
FUSEDOPT_INLINE void apply_update(const UpdateFn& update, Vec& p, Vec& g, Vec* s,
                                  std::index_sequence<K...>) {
  update(p, g, s[K]...);
}

// The lean twin of for_each_step: runs update(p, g, s_1, ..., s_k) (in place, fp32 vectors) over
// elements [begin, end) of one tensor, kVecStep elements at a time. [begin, end) is a whole number
// of kQuantBlock blocks from the tensor's start, or runs up to its end. The param is read and
// written through its codec, the grad is loaded (and, when unscale.active, unscaled and stored
// back) and each state goes through its codec. Each block starts with every state codec's
// begin_block and ends with its end_block (where 8-bit states are encoded).
template <typename scalar_t, typename ParamCodec, typename UpdateFn, typename... StateCodecs>
FUSEDOPT_INLINE void for_each_lean_step(int64_t begin, int64_t end, const GradUnscale& unscale,
                                        const UpdateFn& update, ParamCodec& param,
                                        scalar_t* grad, StateCodecs&... states) {
  constexpr size_t kStates = sizeof...(StateCodecs);
  const bool unscale_grad = unscale.active;
  const Vec grad_scale(static_cast<float>(unscale.scale));
  // One vector of every stream from i: n elements, kVecStep but at a tensor's end.
  const auto step_vector = [&](int64_t i, int64_t n) FUSEDOPT_INLINE_LAMBDA {
    Vec p_lo, p_hi, g_lo, g_hi, s_lo[kStates], s_hi[kStates];
    param.load(i, n, p_lo, p_hi);
    load_float(grad + i, n, g_lo, g_hi);
    if (unscale_grad) {
      g_lo = g_lo / grad_scale;
      g_hi = g_hi / grad_scale;
      store_float(grad + i, n, g_lo, g_hi);
    }
    size_t k = 0;
    ((states.load(i, n, s_lo[k], s_hi[k]), ++k), ...);
    apply_update(update, p_lo, g_lo, s_lo, std::make_index_sequence<kStates>{});
    apply_update(update, p_hi, g_hi, s_hi, std::make_index_sequence<kStates>{});
    param.store(i, n, p_lo, p_hi);
    k = 0;
    ((states.store(i, n, s_lo[k], s_hi[k]), ++k), ...);
  };
  for (int64_t block = begin; block < end; block += kQuantBlock) {
    const int64_t block_end = std::min(block + kQuantBlock, end);
    (states.begin_block(block), ...);
    if (block_end - block == kQuantBlock) {
      // Every block but a tensor's last: with n a constant the codecs' partial-vector branches
      // fold away, and the loop is straight-line code (1-2% of the in-cache 8-bit step).
      for (int64_t i = block; i < block_end; i += kVecStep) step_vector(i, kVecStep);
    } else {
      for (int64_t i = block; i < block_end; i += kVecStep) {
        step_vector(i, std::min(kVecStep, block_end - i));
      }
    }
    (states.end_block(block, block_end - block), ...);
  }
}

}  // namespace fusedopt::cpu::lean
