// Product orbit pairs (plan_columns.h: kOrbitProduct) in AVX-512 float32 lanes: a grid convolution from
// an input field f_1 ⊗ pixels to a regular output field. G acts freely on the tile's rows, so every orbit
// has |G| = d_out entries, one per row, and row a is a bijection onto the orbits: column (b, p) (column
// block b of f_1, pixel p) belongs to orbit T1[a, b] d_2 + T2[a, p], T1[a, .] and T2[a, .] permutations
// (the plan's factor tables: the inverses of docs/math.md §9's T_1[a], T_2[a]). A row thus maps each
// column block, whole, onto one orbit block, its pixels permuted by the same T2[a, .] for every block of
// the row. With a block's 17 .. 32 pixels in two 16-lane registers, that permutation is two vpermt2ps,
// and the orbit sums and means are vector adds and loads with no index per entry (the tables' kernel,
// orbit_table_kernels.h, forms and loads one orbit index per entry and runs the tiles of a row block in
// its lanes).
//
// Pass 1 sums, orbit block by orbit block, the block of every row that maps onto it, permuted into orbit
// order and converted, in float64 registers (the padding lanes past d_2 zero); E_G and the split means
// m_hi = float(m), m_lo = float(m - m_hi) follow as in the tables' kernel. Pass 2 walks the rows, permutes
// each block's means back into the row's pixel order and forms R = (T - m_hi) - m_lo, E_perp in float32
// lanes (flushed to float64 every kFlushBlocks blocks) and the gradient cp R + cg P(T), written, added,
// or added into the weight itself (g may alias x: a block is read before it is written).

#include "orbit_products.h"

#include <cstdint>

#include "avx512_region.h"
#include "plan_columns.h"

namespace equiproj_cpu {

#ifdef EQUIPROJ_AVX512_X86
EQUIPROJ_AVX512_BEGIN
namespace {
namespace products_avx512 {

#include "avx512_split_lanes.h"

constexpr int64_t kLanes = kProductLanes;  // a block's lanes: two registers (orbit_products.h)
constexpr int kFlushBlocks = 16;    // blocks whose squares a float32 lane sums before they go to float64

// Pass 2 prefetches the gradient this many entries ahead: a row of one field's tiles is a few KB, too
// short for the hardware prefetchers to reach a large layer's memory in time (as in the tables' kernel).
constexpr int64_t kAhead = 384;

inline void prefetch_block(const float* x) {  // the two or three cache lines of a block
  _mm_prefetch(reinterpret_cast<const char*>(x), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(x + 16), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(x + 31), _MM_HINT_T0);
}

// The d2 (17 .. 32) entries at x, zero past d2.
inline void load_block(const float* x, int64_t d2, __m512* v) {
  v[0] = _mm512_loadu_ps(x);
  v[1] = _mm512_maskz_loadu_ps(__mmask16((1u << (d2 - 16)) - 1u), x + 16);
}

// The first n (1 .. 16) lanes of v at x, in stores of 8, 4, 2 and 1 lanes: a masked store blocks the next
// block's loads, which overlap its 64 bytes though not its lanes, until it retires (measured: the whole
// call took 1.45 times as long with masked stores, at 27 pixels and at 9).
inline void store_lanes(float* x, __m512 v, int64_t n) {
  if (n == 16) {
    _mm512_storeu_ps(x, v);
    return;
  }
  __m256 h = _mm512_castps512_ps256(v);
  if (n >= 8) {
    _mm256_storeu_ps(x, h);
    if ((n -= 8) == 0) return;
    x += 8;
    h = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  }
  __m128 q = _mm256_castps256_ps128(h);
  if (n >= 4) {
    _mm_storeu_ps(x, q);
    x += 4, n -= 4;
    q = _mm256_extractf128_ps(h, 1);
  }
  if (n >= 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(x), q);
    x += 2, n -= 2;
    q = _mm_movehl_ps(q, q);
  }
  if (n) _mm_store_ss(x, q);
}

inline void store_block(float* x, int64_t d2, const __m512* v) {
  _mm512_storeu_ps(x, v[0]);
  store_lanes(x + 16, v[1], d2 - 16);
}

// out[i] = in[idx[i]] over the 32 lanes of two registers
inline void permute(const __m512* in, const __m512i* idx, __m512* out) {
  out[0] = _mm512_permutex2var_ps(in[0], idx[0], in[1]);
  out[1] = _mm512_permutex2var_ps(in[0], idx[1], in[1]);
}

// Row a's pixel permutation T2[a, .] as lane indices into pixel order (from[p] = T2[a, p]) or, with
// inverse, into orbit order (the pixel p with T2[a, p] = q in lane q); lanes past d2 map to themselves
// (the zero lanes of the loads and of the sums).
inline void lane_indices(const int32_t* t2, int64_t d2, bool inverse, int32_t* out) {
  for (int64_t q = 0; q < kLanes; ++q) out[q] = static_cast<int32_t>(q);
  for (int64_t p = 0; p < d2; ++p) {
    if (inverse)
      out[t2[p]] = static_cast<int32_t>(p);
    else
      out[p] = t2[p];
  }
}

// S: the orbit sums of every tile, tile v's orbit block o at S + (v d1 + o) kLanes (float64). Orbit block
// by orbit block: the block that each row maps onto it (its offset in row a at at[o dout + a]), permuted by
// the row's lane indices, summed in registers and stored once; adding each row's blocks into sums kept in
// memory instead (a load, an add and a store of 32 float64 sums per block of d2 entries) measured slower.
// work: room for d1 dout + kLanes dout int32.
void orbit_sums(const Pair& p, int64_t dout, const float* const* x, double* S, int32_t* work) {
  const int64_t d2 = p.factor, di = p.di, d1 = di / d2, ci = p.ci;
  const int32_t* T1 = p.orbit;
  const int32_t* T2 = p.orbit + dout * d1;
  int32_t* at = work;
  int32_t* to = work + d1 * dout;  // [dout, kLanes]
  for (int64_t a = 0; a < dout; ++a) {
    for (int64_t b = 0; b < d1; ++b) at[T1[a * d1 + b] * dout + a] = static_cast<int32_t>(b * d2);
    lane_indices(T2 + a * d2, d2, true, to + a * kLanes);
  }
  for (int64_t v = 0; v < ci; ++v)
    for (int64_t o = 0; o < d1; ++o) {
      // the blocks of the next orbit block (or of the next tile's first), prefetched a sweep of the rows ahead
      const bool last = o + 1 == d1;
      const int32_t* next = at + (last ? 0 : (o + 1) * dout);
      const int64_t next_v = last ? v + 1 : v;
      __m512d acc[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
      for (int64_t a = 0; a < dout; ++a) {
        if (next_v < ci) prefetch_block(x[a] + next_v * di + next[a]);
        __m512 y[2], z[2];
        const __m512i idx[2] = {_mm512_loadu_si512(to + a * kLanes), _mm512_loadu_si512(to + a * kLanes + 16)};
        load_block(x[a] + v * di + at[o * dout + a], d2, y);
        permute(y, idx, z);
        for (int i = 0; i < 2; ++i) {
          acc[2 * i] = _mm512_add_pd(acc[2 * i], low_pd(z[i]));
          acc[2 * i + 1] = _mm512_add_pd(acc[2 * i + 1], high_pd(z[i]));
        }
      }
      double* s = S + (v * d1 + o) * kLanes;
      for (int i = 0; i < 4; ++i) _mm512_storeu_pd(s + 8 * i, acc[i]);
    }
}

// E_G = sum_k S_k^2 / |G|, and each orbit block's sums in place of its split means: kLanes m_hi floats,
// then kLanes m_lo floats, in the block's bytes.
void split_means(const Pair& p, double* S, double& eg) {
  const int64_t blocks = p.ci * (p.di / p.factor);
  const __m512d inv = _mm512_set1_pd(p.inv_size);
  __m512d e = _mm512_setzero_pd();
  for (int64_t k = 0; k < blocks; ++k) {
    double* s = S + k * kLanes;
    __m256 hi[4], lo[4];
    for (int i = 0; i < 4; ++i) {
      const __m512d sum = _mm512_loadu_pd(s + 8 * i), m = _mm512_mul_pd(sum, inv);
      e = _mm512_fmadd_pd(_mm512_mul_pd(sum, sum), inv, e);
      hi[i] = _mm512_cvtpd_ps(m);
      lo[i] = _mm512_cvtpd_ps(_mm512_sub_pd(m, _mm512_cvtps_pd(hi[i])));
    }
    float* f = reinterpret_cast<float*>(s);
    for (int i = 0; i < 4; ++i) {
      _mm256_storeu_ps(f + 8 * i, hi[i]);
      _mm256_storeu_ps(f + kLanes + 8 * i, lo[i]);
    }
  }
  eg += _mm512_reduce_add_pd(e);
}

template <Mode M>
void residuals(const Pair& p, int64_t dout, const float* const* x, float* const* g, double cp2, double cg2,
               const double* S, double& ep) {
  const int64_t d2 = p.factor, di = p.di, d1 = di / d2, ci = p.ci;
  const int32_t* T1 = p.orbit;
  const int32_t* T2 = p.orbit + dout * d1;
  const SplitCoefs c(cp2, cg2);
  __m512 e[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  __m512d e64 = _mm512_setzero_pd();
  int n = 0;
  alignas(64) int32_t from[kLanes];
  for (int64_t a = 0; a < dout; ++a) {
    lane_indices(T2 + a * d2, d2, false, from);
    const __m512i idx[2] = {_mm512_load_si512(from), _mm512_load_si512(from + 16)};
    const int32_t* t1 = T1 + a * d1;
    for (int64_t v = 0; v < ci; ++v) {
      const float* xv = x[a] + v * di;
      float* gv = M == Mode::kNone ? nullptr : g[a] + v * di;
      const float* Mv = reinterpret_cast<const float*>(S + v * d1 * kLanes);
      for (int64_t b = 0; b < d1; ++b) {
        const float* m = Mv + 2 * kLanes * t1[b];
        const __m512 mh[2] = {_mm512_loadu_ps(m), _mm512_loadu_ps(m + 16)};
        const __m512 ml[2] = {_mm512_loadu_ps(m + kLanes), _mm512_loadu_ps(m + kLanes + 16)};
        __m512 hi[2], lo[2], t[2], out[2], old[2];
        permute(mh, idx, hi);
        permute(ml, idx, lo);
        load_block(xv + b * d2, d2, t);
        if constexpr (M == Mode::kAdd) {
          prefetch_block(gv + b * d2 + kAhead);
          load_block(gv + b * d2, d2, old);
        }
        for (int i = 0; i < 2; ++i) {
          const __m512 d = _mm512_sub_ps(t[i], hi[i]), r = _mm512_sub_ps(d, lo[i]);
          e[i] = _mm512_fmadd_ps(r, r, e[i]);
          if constexpr (M != Mode::kNone)
            out[i] = split_gradient(d, hi[i], lo[i], M == Mode::kAdd ? old[i] : _mm512_setzero_ps(), c);
        }
        if constexpr (M != Mode::kNone) store_block(gv + b * d2, d2, out);
        if (++n == kFlushBlocks) {
          for (int i = 0; i < 2; ++i) {
            e64 = _mm512_add_pd(e64, widened(e[i]));
            e[i] = _mm512_setzero_ps();
          }
          n = 0;
        }
      }
    }
  }
  for (int i = 0; i < 2; ++i) e64 = _mm512_add_pd(e64, widened(e[i]));
  ep += _mm512_reduce_add_pd(e64);
}

void run_pair(const Pair& p, int64_t dout, const float* const* x, float* const* g, double cp2, double cg2, double* S,
              double& ep, double& eg) {
  orbit_sums(p, dout, x, S, reinterpret_cast<int32_t*>(S + p.ci * (p.di / p.factor) * kLanes));
  split_means(p, S, eg);
  if (!g)
    residuals<Mode::kNone>(p, dout, x, g, cp2, cg2, S, ep);
  else if (p.accumulate)
    residuals<Mode::kAdd>(p, dout, x, g, cp2, cg2, S, ep);
  else
    residuals<Mode::kWrite>(p, dout, x, g, cp2, cg2, S, ep);
}

}  // namespace products_avx512
}  // namespace
EQUIPROJ_AVX512_END
#endif

ProductPairFn32 product_pair_kernel() {
#ifdef EQUIPROJ_AVX512_X86
  static const bool avx512 = cpu_has_avx512();
  if (avx512) return &products_avx512::run_pair;
#endif
  return nullptr;
}

}  // namespace equiproj_cpu
