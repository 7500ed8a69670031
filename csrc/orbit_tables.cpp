// The means and pass 2 of the tables' kernel in AVX-512 float32 lanes for tiles of at most sixteen orbits
// (orbit_tables.h).
//
// The pivot pass (orbit_table_kernels.h) leaves, for each group of eight tiles of a row block, its K orbits'
// pivots and the sums of the differences from them as two [K][8] blocks. This pass loads them and forms the
// split means (m_hi = the pivots, m_lo = the difference sums times 1 / n_k, as the eight-lane pass's means
// step does) and E_G in registers. With K <= 16 each block fills at most 128 floats, eight 16-lane registers,
// and the mean of any entry of the group is one vpermt2ps away for K <= 4 (two registers), two and a blend
// for K <= 8, four and three blends for K <= 16. The eight tiles of a group are consecutive columns of each
// row, so a row of the group is one contiguous span of 8 d_in entries, read in whole vectors with no
// transpose: lane f = t d_in + j (tile t, entry j) takes mean 8 o(a, j) + t, times the entry's sign c(j) (0
// for an entry without an equivariant part: its mean is 0). That index and sign depend on the row only, so
// each row builds its lane pattern once and every group of the row reuses it; a span of 8 d_in entries is
// whole vectors plus, for odd d_in, 8 lanes, stored as one 256-bit store (no masked store: one would hold up
// the next span's loads until it retires, as in orbit_products.cpp).
//
// The residual, E_perp and the gradient follow the eight-lane pass exactly: R = (T - m_hi) - m_lo, the
// squares summed in float32 lanes and flushed to float64 every kFlushVectors vectors, the gradient
// cp (T - m_hi) + cg m_hi + (cg - cp) m_lo, written, added, or added into the weight itself (g may alias
// x: a span is read before it is written).

#include "orbit_tables.h"

#include <cstdint>

#include "avx512_region.h"

namespace equiproj_cpu {

#ifdef EQUIPROJ_AVX512_X86
EQUIPROJ_AVX512_BEGIN
namespace {
namespace tables_avx512 {

#include "avx512_split_lanes.h"

constexpr int kFlushVectors = 32;  // float32 vectors of squares summed per lane, at most, before float64

// Each vector prefetches its line of the weight (and of the gradient it adds to) this many entries ahead: a
// row of a pair is a few KB, too short for the hardware prefetchers to reach a large layer's memory in time.
// Measured (one thread, interleaved): 5 x 5 kernels on irreps of D4 2602 -> 2175 us at 384 entries, 2033 at 768
// (float32 C4 k = 5 2913 -> 2714 -> 2571), no gain at 1536; 3 x 3 kernels within the spread.
constexpr int64_t kAhead = 768;

inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u); }

// Row a's lane pattern over a group's span: idx[f] = 8 o(a, j) + t and sgn[f] = c(a, j) for f = t d_in + j;
// lanes past the span read mean 0 times 0. Built 16 lanes at a time: a row's pattern is 8 d_in lanes against
// the row's ci d_in entries of a call (1 in 8 to 1 in 12 for the grid convolutions' 64 and 96 copies).
void row_pattern(const Pair& p, int64_t a, int64_t lanes, int32_t* idx, float* sgn) {
  const int64_t di = p.di;
  const int32_t* o = p.orbit + a * di;
  const double* c = p.sign ? p.sign + a * di : nullptr;
  for (int64_t f = 0; f < lanes; f += 16) {  // zero first: the span's stores below overwrite all but its tail
    _mm512_store_si512(idx + f, _mm512_setzero_si512());
    _mm512_store_ps(sgn + f, _mm512_setzero_ps());
  }
  for (int64_t j = 0; j < di; j += 16) {
    const __mmask16 m = first_lanes(di - j);
    const __m512i base = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(m, o + j), 3);  // 8 o(a, j)
    __m512 sign = _mm512_set1_ps(1.0f);
    if (c)
      sign = _mm512_castpd_ps(_mm512_insertf64x4(
          _mm512_castps_pd(_mm512_castps256_ps512(_mm512_cvtpd_ps(_mm512_maskz_loadu_pd(__mmask8(m), c + j)))),
          _mm256_castps_pd(_mm512_cvtpd_ps(_mm512_maskz_loadu_pd(__mmask8(m >> 8), c + j + 8))), 1));
    for (int64_t t = 0; t < kPivotGroup; ++t) {
      _mm512_mask_storeu_epi32(idx + t * di + j, m, _mm512_add_epi32(base, _mm512_set1_epi32(int32_t(t))));
      _mm512_mask_storeu_ps(sgn + t * di + j, m, sign);
    }
  }
}

// The orbits' sizes n_k and 1 / n_k on the lanes of a [K][8] block (slot s: orbit s / 8), zero past it up to
// the block's whole registers (lanes: 32 R).
struct OrbitLanes {
  alignas(64) float inv[kPermutedMeansLanes];
  alignas(64) double size[kPermutedMeansLanes];

  OrbitLanes(const Pair& p, int64_t lanes) {
    int64_t s = 0;
    for (int64_t k = 0; k < p.r; ++k, s += kPivotGroup) {
      _mm256_store_ps(inv + s, _mm256_set1_ps(static_cast<float>(p.inv[k])));
      _mm512_store_pd(size + s, _mm512_set1_pd(double(int64_t(1 / p.inv[k] + 0.5))));
    }
    for (; s < lanes; s += kPivotGroup) {
      _mm256_store_ps(inv + s, _mm256_setzero_ps());
      _mm512_store_pd(size + s, _mm512_setzero_pd());
    }
  }
};

// The split means of one group, m_hi and m_lo of its K orbits x 8 tiles, each in 2 R registers (R = 1, 2, 4:
// K <= 4, 8, 16), zero past the 8 K floats of its block: m_hi the pivots, m_lo the sums of the differences
// from them times 1 / n_k, in float32 (as the eight-lane pass's means, pivot_orbit_means8).
template <int R>
struct GroupMeans {
  __m512 hi[2 * R], lo[2 * R];

  GroupMeans(const float* pivots, const float* differences, int64_t used, const OrbitLanes& o) {
    for (int i = 0; i < 2 * R; ++i) {
      const int64_t n = used - 16 * i;
      const __mmask16 m = n >= 16 ? __mmask16(0xFFFF) : n > 0 ? __mmask16((1u << n) - 1u) : __mmask16(0);
      hi[i] = _mm512_maskz_loadu_ps(m, pivots + 16 * i);
      lo[i] = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, differences + 16 * i), _mm512_load_ps(o.inv + 16 * i));
    }
  }

  // E_G of the group's orbits into e: n_k m_k^2, the mean m_k = m_hi + m_lo taken in float64, for the eight
  // lanes that hold any of the used slots.
  void add_eg(const OrbitLanes& o, int64_t used, __m512d& e) const {
    for (int i = 0; i < 2 * R && 16 * i < used; ++i) {
      const __m512d m0 = _mm512_add_pd(low_pd(hi[i]), low_pd(lo[i]));
      e = _mm512_fmadd_pd(_mm512_mul_pd(m0, m0), _mm512_load_pd(o.size + 16 * i), e);
      if (16 * i + 8 >= used) break;
      const __m512d m1 = _mm512_add_pd(high_pd(hi[i]), high_pd(lo[i]));
      e = _mm512_fmadd_pd(_mm512_mul_pd(m1, m1), _mm512_load_pd(o.size + 16 * i + 8), e);
    }
  }
};

// Entry at[l] of the 32 R floats in t, for each lane l: one vpermt2ps per 32 floats, then the bits of at
// above the fifth choose between their results.
template <int R>
inline __m512 lookup(const __m512* t, __m512i at) {
  if constexpr (R == 1) {
    return _mm512_permutex2var_ps(t[0], at, t[1]);
  } else {
    const __m512 low = lookup<R / 2>(t, at), high = lookup<R / 2>(t + R, at);
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(at, _mm512_set1_epi32(32 * R / 2)), low, high);
  }
}

// 16 entries of a span (Tail: 8, whose lanes 8 .. 15 are zero, whatever the mean at their index 0): the
// residual's squares into e, the gradient into g.
template <Mode M, bool Tail, int R>
inline void span_vector(const float* x, float* g, const int32_t* idx, const float* sgn, const GroupMeans<R>& m,
                        const SplitCoefs& c, __m512& e) {
  _mm_prefetch(reinterpret_cast<const char*>(x + kAhead), _MM_HINT_T0);
  if constexpr (M == Mode::kAdd) _mm_prefetch(reinterpret_cast<const char*>(g + kAhead), _MM_HINT_T0);
  const __m512i at = _mm512_load_si512(idx);
  const __m512 s = _mm512_load_ps(sgn);
  const __mmask16 lanes = Tail ? __mmask16(0xFF) : __mmask16(0xFFFF);
  const __m512 hi = _mm512_maskz_mul_ps(lanes, lookup<R>(m.hi, at), s);
  const __m512 lo = _mm512_maskz_mul_ps(lanes, lookup<R>(m.lo, at), s);
  const __m512 t = _mm512_maskz_loadu_ps(lanes, x);
  const __m512 d = _mm512_sub_ps(t, hi), r = _mm512_sub_ps(d, lo);
  e = _mm512_fmadd_ps(r, r, e);
  if constexpr (M != Mode::kNone) {
    const __m512 old = M == Mode::kAdd ? _mm512_maskz_loadu_ps(lanes, g) : _mm512_setzero_ps();
    const __m512 out = split_gradient(d, hi, lo, old, c);
    if constexpr (Tail)
      _mm256_storeu_ps(g, _mm512_castps512_ps256(out));
    else
      _mm512_storeu_ps(g, out);
  }
}

template <Mode M, int R>
void residuals(const Pair& p, int64_t dout, const float* const* x, float* const* g, double cp2, double cg2,
               const float* sums, int64_t v8, float* pattern, double& ep, double& eg) {
  const int64_t di = p.di, K = p.r, span = kPivotGroup * di, whole = span / 16, lanes = (span + 15) / 16 * 16;
  const bool tail = span % 16 != 0;  // 8 lanes: span is a multiple of 8
  int32_t* idx = reinterpret_cast<int32_t*>(pattern);
  float* sgn = pattern + lanes;
  const int64_t used = kPivotGroup * K;  // the floats of a [K][8] block
  const SplitCoefs c(cp2, cg2);
  __m512 e[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  __m512d e64 = _mm512_setzero_pd(), eg64 = _mm512_setzero_pd();
  const OrbitLanes orbits(p, 32 * R);
  int n = 0;  // vectors added into e since the last flush
  const auto flush = [&]() {
    for (int i = 0; i < 2; ++i) {
      e64 = _mm512_add_pd(e64, widened(e[i]));
      e[i] = _mm512_setzero_ps();
    }
    n = 0;
  };
  for (int64_t a = 0; a < dout; ++a) {
    row_pattern(p, a, lanes, idx, sgn);
    for (int64_t v = 0; v < v8; v += kPivotGroup) {
      const float* pivots = sums + 2 * v * K;  // the group's [K][8] pivots, then its [K][8] difference sums
      const GroupMeans<R> m(pivots, pivots + used, used, orbits);
      if (a == 0) m.add_eg(orbits, used, eg64);
      const float* x0 = x[a] + v * di;
      float* g0 = M == Mode::kNone ? nullptr : g[a] + v * di;
      if (n + whole + 1 > 2 * kFlushVectors) flush();
      int64_t q = 0;
      for (; q + 2 <= whole; q += 2) {  // two accumulators: no add chain across a span's vectors
        span_vector<M, false, R>(x0 + 16 * q, g0 + 16 * q, idx + 16 * q, sgn + 16 * q, m, c, e[0]);
        span_vector<M, false, R>(x0 + 16 * q + 16, g0 + 16 * q + 16, idx + 16 * q + 16, sgn + 16 * q + 16, m, c, e[1]);
      }
      if (q < whole) span_vector<M, false, R>(x0 + 16 * q, g0 + 16 * q, idx + 16 * q, sgn + 16 * q, m, c, e[0]);
      if (tail) span_vector<M, true, R>(x0 + 16 * whole, g0 + 16 * whole, idx + 16 * whole, sgn + 16 * whole, m, c, e[1]);
      n += static_cast<int>(whole + 1);
    }
  }
  flush();
  ep += _mm512_reduce_add_pd(e64);
  eg += _mm512_reduce_add_pd(eg64);
}

template <int R>
void run_mode(const Pair& p, int64_t dout, const float* const* x, float* const* g, double cp2, double cg2,
              const float* sums, int64_t v8, float* pattern, double& ep, double& eg) {
  if (!g)
    residuals<Mode::kNone, R>(p, dout, x, g, cp2, cg2, sums, v8, pattern, ep, eg);
  else if (p.accumulate)
    residuals<Mode::kAdd, R>(p, dout, x, g, cp2, cg2, sums, v8, pattern, ep, eg);
  else
    residuals<Mode::kWrite, R>(p, dout, x, g, cp2, cg2, sums, v8, pattern, ep, eg);
}

void run(const Pair& p, int64_t dout, const float* const* x, float* const* g, double cp2, double cg2,
         const float* sums, int64_t v8, float* pattern, double& ep, double& eg) {
  const int64_t used = kPivotGroup * p.r;
  if (used <= 32)
    run_mode<1>(p, dout, x, g, cp2, cg2, sums, v8, pattern, ep, eg);
  else if (used <= 64)
    run_mode<2>(p, dout, x, g, cp2, cg2, sums, v8, pattern, ep, eg);
  else
    run_mode<4>(p, dout, x, g, cp2, cg2, sums, v8, pattern, ep, eg);
}

}  // namespace tables_avx512
}  // namespace
EQUIPROJ_AVX512_END
#endif

PivotResidualsFn32 pivot_residuals_kernel() {
#ifdef EQUIPROJ_AVX512_X86
  static const bool avx512 = cpu_has_avx512();
  if (avx512) return &tables_avx512::run;
#endif
  return nullptr;
}

}  // namespace equiproj_cpu
