// Orbit pairs with an index (plan_columns.h: kOrbitTable, kOrbitProduct): P(T) is the mean of T over
// each orbit, the orbit of every entry of a tile row given by a table (kOrbitTable) or by the two
// factor tables of a regular output field and a product input field f_1 ⊗ f_2 (kOrbitProduct, a grid
// convolution: the orbit of column (b, p) of row a is T1inv[a, b] d_2 + T2inv[a, p]). Included by
// tile_kernels.h before its dispatch (no include guard, includes nothing, like that file).
//
// The orbit of an entry depends on its row and column within the tile, not on the tile: four tiles
// of a row block are processed together, their entries j .. j + 3 loaded as four rows of a 4 x 4
// block and transposed, so that each vector holds one entry of the four tiles, and the orbit sums of
// four tiles are laid out [K][4] (one vector per orbit). Pass 1 is then one vector add per entry and
// four tiles, pass 2 transposes the four tiles' means back to rows and forms the residual and the
// gradient row-wise. With AVX2, two tiles left over (ci mod 4 >= 2) run as pairs of 128-bit lanes;
// the last one along its row: pass 1 converts and signs four entries at once and adds them one by
// one, pass 2 (float32 weights) takes eight entries at a time with their split means gathered (entry
// by entry, a single tile cost about four times a group's time per weight: C4 irreps k = 5 with one
// input copy 4.6 -> 2.6 ns per weight, with nine 1.41 -> 1.31). The entries of a group of four tiles
// past the last whole vector (a 3x3 kernel's ninth pixel) run as one vector of the four tiles' entry
// each. A signed table (p.sign: two monomial fields) multiplies each entry by its sign c(e) before
// pass 1 adds it, and each mean by it before pass 2 subtracts it (c = 0: mean 0).

#ifdef EQUIPROJ_AVX2
inline void transpose4(V4& r0, V4& r1, V4& r2, V4& r3) {
  const __m256d t0 = _mm256_unpacklo_pd(r0.v, r1.v), t1 = _mm256_unpackhi_pd(r0.v, r1.v);
  const __m256d t2 = _mm256_unpacklo_pd(r2.v, r3.v), t3 = _mm256_unpackhi_pd(r2.v, r3.v);
  r0.v = _mm256_permute2f128_pd(t0, t2, 0x20);
  r1.v = _mm256_permute2f128_pd(t1, t3, 0x20);
  r2.v = _mm256_permute2f128_pd(t0, t2, 0x31);
  r3.v = _mm256_permute2f128_pd(t1, t3, 0x31);
}
#else
inline void transpose4(V4& r0, V4& r1, V4& r2, V4& r3) {
  V4* r[4] = {&r0, &r1, &r2, &r3};
  for (int i = 0; i < 4; ++i)
    for (int j = i + 1; j < 4; ++j) {
      const double t = r[i]->v[j];
      r[i]->v[j] = r[j]->v[i];
      r[j]->v[i] = t;
    }
}
#endif

#ifdef EQUIPROJ_AVX2
// Two tiles: entries j .. j + 3 of tiles 0 and 1 (rows r0, r1) as four [2] pairs, entry j + i of both
// tiles at S2 + 2 o[j + i] (orbit sums laid out [K][2]; o4 = 4 o).
template <typename X>
inline void orbit_sum2(acc_t* S2, const int32_t* o4, const X* x0, const X* x1, const acc_t* sign) {
  __m256d r0 = load4(x0).v, r1 = load4(x1).v;
  if (sign) {  // the entries' signs, the same in both tiles
    const __m256d s = _mm256_loadu_pd(sign);
    r0 = _mm256_mul_pd(r0, s);
    r1 = _mm256_mul_pd(r1, s);
  }
  const __m256d lo = _mm256_unpacklo_pd(r0, r1), hi = _mm256_unpackhi_pd(r0, r1);  // entries j, j+2 | j+1, j+3
  acc_t* s[4] = {S2 + (o4[0] >> 1), S2 + (o4[1] >> 1), S2 + (o4[2] >> 1), S2 + (o4[3] >> 1)};
  _mm_storeu_pd(s[0], _mm_add_pd(_mm_loadu_pd(s[0]), _mm256_castpd256_pd128(lo)));
  _mm_storeu_pd(s[1], _mm_add_pd(_mm_loadu_pd(s[1]), _mm256_castpd256_pd128(hi)));
  _mm_storeu_pd(s[2], _mm_add_pd(_mm_loadu_pd(s[2]), _mm256_extractf128_pd(lo, 1)));
  _mm_storeu_pd(s[3], _mm_add_pd(_mm_loadu_pd(s[3]), _mm256_extractf128_pd(hi, 1)));
}

// The means of entries j .. j + 3 of tiles 0 and 1 as two rows.
inline void orbit_means2(const acc_t* M2, const int32_t* o4, V4& m0, V4& m1) {
  const __m256d a =
      _mm256_insertf128_pd(_mm256_castpd128_pd256(_mm_loadu_pd(M2 + (o4[0] >> 1))), _mm_loadu_pd(M2 + (o4[2] >> 1)), 1);
  const __m256d b =
      _mm256_insertf128_pd(_mm256_castpd128_pd256(_mm_loadu_pd(M2 + (o4[1] >> 1))), _mm_loadu_pd(M2 + (o4[3] >> 1)), 1);
  m0.v = _mm256_unpacklo_pd(a, b);
  m1.v = _mm256_unpackhi_pd(a, b);
}
#endif

// Tiles v .. v + 3 in one group, then (with AVX2) two in a pair; the rest one at a time.
inline int64_t group_width(int64_t v, int64_t ci) {
  if (v + 4 <= ci) return 4;
#ifdef EQUIPROJ_AVX2
  if (v + 2 <= ci) return 2;
#endif
  return 1;
}

// Four times the orbit of every entry of tile row a, written into buf: from the table's row, or, for a
// product, from the factor tables (p.orbit: the block table [d_out, d_1], then the pixel table
// [d_out, d_2]). 4 o is where orbit o's sums sit in a group of four tiles ([K][4] float64 entries), so
// the kernels address them with one index load and no arithmetic.
inline const int32_t* orbit_row(const Pair& p, int64_t dout, int64_t a, int32_t* buf) {
  if (p.form != kOrbitProduct) {
    const int32_t* t = p.orbit + a * p.di;
    for (int64_t j = 0; j < p.di; ++j) buf[j] = 4 * t[j];
    return buf;
  }
  const int64_t d2 = p.factor, d1 = p.di / d2;
  const int32_t* blk = p.orbit + a * d1;
  const int32_t* pix = p.orbit + dout * d1 + a * d2;
  for (int64_t b = 0; b < d1; ++b) {
    const int32_t base = blk[b] * static_cast<int32_t>(d2);
    int32_t* ob = buf + b * d2;
    for (int64_t q = 0; q < d2; ++q) ob[q] = 4 * (base + pix[q]);
  }
  return buf;
}

enum class GradMode { kNone, kWrite, kAdd };

// Prefetching in the passes, which walk a block's rows one after the other (rows outer, groups of tiles
// inner; each group's tiles are four interleaved streams of d_in entries, too short for the hardware
// prefetchers). A group of more than kShortGroup entries prefetches the next group a line per step of its
// loops. A shorter one would prefetch too close to hide the latency of L3 (the cube faces' groups are 24
// entries, and the loops over whole vectors do not even run): it prefetches its own length kTableAhead
// entries ahead at its start, past a row's end in the rows that follow, none past the last row (rows: x
// or g, n entries each). Measured: the cube faces' O/C4 pairs 2.4x -> 1.7x the floor, O regular linear
// 1.7x -> 1.5x; the same for every group slowed the 144-entry groups of C4 regular grids by 5-8 %.
constexpr int64_t kShortGroup = 128, kTableAhead = 384;

template <typename X>
inline void prefetch_ahead(const X* const* rows, int64_t dout, int64_t n, int64_t a, int64_t e, int64_t len) {
  int64_t at = e + kTableAhead;
  for (; at >= n; at -= n)
    if (++a >= dout) return;
  const X* q = rows[a] + at;
  for (int64_t l = 0; l < len; l += 64 / int64_t(sizeof(X))) __builtin_prefetch(q + l);
}

// A group of len entries at entry e of row a: where it is short, its own entries kTableAhead ahead in x
// and (not null) in g are prefetched. Returns whether it is short (a longer one prefetches per step).
template <typename X>
inline bool prefetch_short_group(const X* const* x, const X* const* g, int64_t dout, int64_t n, int64_t a, int64_t e,
                                 int64_t len) {
  if (len > kShortGroup) return false;
  prefetch_ahead(x, dout, n, a, e, len);
  if (g) prefetch_ahead(g, dout, n, a, e, len);
  return true;
}

// The cache lines of four entries of the next group of tiles (one line of float, two of double).
template <typename X>
inline void prefetch_line(const X* p) {
  __builtin_prefetch(p);
  if constexpr (sizeof(X) == 8) __builtin_prefetch(p + 8);
}

// r = x - m for one row of four entries; E_perp and the gradient cg2 x + (cp2 - cg2) r
template <GradMode Mode, typename X>
inline void orbit_residual4(const X* x, X* g, V4 m, V4 vcg, V4 vdc, V4& e4) {
  const V4 t = load4(x), r = t - m;
  e4 = fmadd(r, r, e4);
  if constexpr (Mode != GradMode::kNone) {
    const V4 v = fmadd(vcg, t, vdc * r);
    store4(g, Mode == GradMode::kAdd ? load4(g) + v : v);
  }
}

template <GradMode Mode, typename X>
void table_orbit_residuals(const Pair& p, int64_t dout, const X* const* x, X* const* g, acc_t cp2, acc_t cg2,
                           const acc_t* M, int32_t* obuf, V4& e4, acc_t& e1) {
  const int64_t di = p.di, K = p.r, ci = p.ci, d4 = di - di % 4;
  V4 e[4] = {zero4(), zero4(), zero4(), zero4()};  // one accumulator per tile of a group: no add chain
  const bool acc = Mode == GradMode::kAdd;
  const V4 vcg = splat(cg2), vdc = splat(cp2 - cg2);
  for (int64_t a = 0; a < dout; ++a) {
    const int32_t* o4 = orbit_row(p, dout, a, obuf);
    const acc_t* sg = p.sign ? p.sign + a * di : nullptr;
    for (int64_t v = 0, w = 0; v < ci; v += w) {
      w = group_width(v, ci);
      const X* x0 = x[a] + v * di;
      X* g0 = Mode == GradMode::kNone ? nullptr : g[a] + v * di;
      const acc_t* Mw = M + v * K;  // [K][w]
      const bool short_group =
          prefetch_short_group<X>(x, Mode == GradMode::kAdd ? g : nullptr, dout, ci * di, a, v * di, w * di);
      int64_t j = 0;
      if (w == 4) {
        for (; j < d4; j += 4) {
          if (!short_group) {  // a step walks 4 entries of each of 4 tiles: one line of the next group
            prefetch_line<X>(x0 + 4 * di + 4 * j);
            if (Mode == GradMode::kAdd) prefetch_line<X>(g0 + 4 * di + 4 * j);
          }
          V4 m0 = load4(Mw + o4[j]), m1 = load4(Mw + o4[j + 1]), m2 = load4(Mw + o4[j + 2]), m3 = load4(Mw + o4[j + 3]);
          transpose4(m0, m1, m2, m3);  // m_l: the means of entries j .. j + 3 of tile l
          if (sg) {
            const V4 s = load4(sg + j);
            m0 = m0 * s, m1 = m1 * s, m2 = m2 * s, m3 = m3 * s;
          }
          orbit_residual4<Mode>(x0 + j, g0 ? g0 + j : nullptr, m0, vcg, vdc, e[0]);
          orbit_residual4<Mode>(x0 + di + j, g0 ? g0 + di + j : nullptr, m1, vcg, vdc, e[1]);
          orbit_residual4<Mode>(x0 + 2 * di + j, g0 ? g0 + 2 * di + j : nullptr, m2, vcg, vdc, e[2]);
          orbit_residual4<Mode>(x0 + 3 * di + j, g0 ? g0 + 3 * di + j : nullptr, m3, vcg, vdc, e[3]);
        }
      }
#ifdef EQUIPROJ_AVX2
      if (w == 2) {
        for (; j < d4; j += 4) {
          V4 m0, m1;
          orbit_means2(Mw, o4 + j, m0, m1);
          if (sg) {
            const V4 s = load4(sg + j);
            m0 = m0 * s, m1 = m1 * s;
          }
          orbit_residual4<Mode>(x0 + j, g0 ? g0 + j : nullptr, m0, vcg, vdc, e[0]);
          orbit_residual4<Mode>(x0 + di + j, g0 ? g0 + di + j : nullptr, m1, vcg, vdc, e[1]);
        }
      }
#endif
      for (; j < di; ++j)
        for (int64_t l = 0; l < w; ++l)
          orbit_residual_one(x0 + l * di + j, g0 ? g0 + l * di + j : nullptr,
                             sg ? sg[j] * Mw[(w * o4[j] >> 2) + l] : Mw[(w * o4[j] >> 2) + l], cp2, cg2, acc, e1);
    }
  }
  e4 = e4 + ((e[0] + e[1]) + (e[2] + e[3]));
}

// 1 / n_k, the inverse size of orbit k (a product's orbits all have |G| entries).
inline acc_t orbit_inv(const Pair& p, int64_t k) { return p.form == kOrbitProduct ? p.inv_size : p.inv[k]; }

// E_G = sum_k S_k^2 / n_k, and each orbit sum in place of its mean (float64). A product's orbits all
// have |G| entries: its ci K sums are one array; a table's group [K][w] takes the inverse size of each k.
inline void orbit_means(const Pair& p, acc_t* S, acc_t& eg) {
  const int64_t K = p.r, ci = p.ci;
  V4 e[4] = {zero4(), zero4(), zero4(), zero4()};  // independent accumulators: no add chain
  acc_t e1[4] = {0, 0, 0, 0};
  if (p.form == kOrbitProduct) {
    const int64_t n = ci * K;
    const V4 inv = splat(p.inv_size);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
      for (int q = 0; q < 4; ++q) {
        const V4 s = load4(S + j + 4 * q);
        e[q] = fmadd(s * s, inv, e[q]);
        store4(S + j + 4 * q, s * inv);
      }
    for (; j < n; ++j) {
      e1[j & 3] += S[j] * S[j] * p.inv_size;
      S[j] *= p.inv_size;
    }
  } else {
    for (int64_t v = 0, w = 0; v < ci; v += w) {
      w = group_width(v, ci);
      acc_t* Sw = S + v * K;
      for (int64_t k = 0; k < K; ++k) {
        const acc_t inv = p.inv[k];
        if (w == 4) {
          const V4 s = load4(Sw + 4 * k);
          e[k & 3] = fmadd(s * s, splat(inv), e[k & 3]);
          store4(Sw + 4 * k, s * splat(inv));
          continue;
        }
        for (int64_t l = 0; l < w; ++l) {
          acc_t& s = Sw[w * k + l];
          e1[k & 3] += s * s * inv;
          s *= inv;
        }
      }
    }
  }
  eg += hsum((e[0] + e[1]) + (e[2] + e[3])) + ((e1[0] + e1[1]) + (e1[2] + e1[3]));
}

#ifdef EQUIPROJ_AVX2
// ---- float32 weights: pass 2 in float32 lanes with split means -----------------------------------
// The orbit mean m (float64) is stored as m_hi = float(m), m_lo = float(m - m_hi), and the residual
// formed as R = (T - m_hi) - m_lo: T - m_hi is exact where T and m_hi are within a factor of two
// (Sterbenz), which holds for every entry of a nearly equivariant weight, so R keeps its float32
// precision where the residual form matters (the split of orbit_closed.h). In place of the [K][w]
// float64 sums of a group of w tiles, orbit k holds the w m_hi then the w m_lo as floats (the same
// bytes: 2 w floats at float offset 2 w k). Pass 2 then reads, for eight entries of a tile row, the
// eight orbits' quads and transposes them (4 x 4 within each 128-bit lane) into the means of eight
// consecutive entries of each tile: eight float32 lanes of residual and gradient per vector.

constexpr int kOrbitFlushVectors = 32;  // float32 lanes of E_perp summed at most this many times, then in float64

inline void split_mean(acc_t m, float& hi, float& lo) {
  hi = static_cast<float>(m);
  lo = static_cast<float>(m - acc_t(hi));
}

// E_G, and the sums of every group of w tiles from tile v0 in place of their split means.
inline void split_orbit_means(const Pair& p, acc_t* S, int64_t v0, acc_t& eg) {
  const int64_t K = p.r, ci = p.ci;
  V4 e[4] = {zero4(), zero4(), zero4(), zero4()};
  acc_t e1 = 0;
  for (int64_t v = v0, w = 0; v < ci; v += w) {
    w = group_width(v, ci);
    acc_t* Sw = S + v * K;
    int64_t k = 0;
    if (w == 4) {
      for (; k < K; ++k) {
        const V4 inv = splat(orbit_inv(p, k)), s = load4(Sw + 4 * k), m = s * inv;
        e[k & 3] = fmadd(s * s, inv, e[k & 3]);
        const __m128 hi = _mm256_cvtpd_ps(m.v);
        const __m128 lo = _mm256_cvtpd_ps(_mm256_sub_pd(m.v, _mm256_cvtps_pd(hi)));
        _mm256_storeu_ps(reinterpret_cast<float*>(Sw + 4 * k), _mm256_set_m128(lo, hi));
      }
    } else if (w == 2) {
      for (; k + 2 <= K; k += 2) {  // two orbits: [s_k0 s_k1 s_k+1,0 s_k+1,1]
        const acc_t i0 = orbit_inv(p, k), i1 = orbit_inv(p, k + 1);
        const V4 inv = make4(i0, i0, i1, i1), s = load4(Sw + 2 * k), m = s * inv;
        e[k & 3] = fmadd(s * s, inv, e[k & 3]);
        const __m128d hi = _mm_castps_pd(_mm256_cvtpd_ps(m.v));
        const __m128d lo = _mm_castps_pd(_mm256_cvtpd_ps(_mm256_sub_pd(m.v, _mm256_cvtps_pd(_mm_castpd_ps(hi)))));
        float* f = reinterpret_cast<float*>(Sw + 2 * k);
        _mm_storeu_ps(f, _mm_castpd_ps(_mm_unpacklo_pd(hi, lo)));
        _mm_storeu_ps(f + 4, _mm_castpd_ps(_mm_unpackhi_pd(hi, lo)));
      }
    }
    for (; k < K; ++k) {  // w == 1, and an odd last orbit of a pair of tiles
      const acc_t inv = orbit_inv(p, k);
      acc_t m[2];
      for (int64_t l = 0; l < w; ++l) {
        const acc_t s = Sw[w * k + l];
        e1 += s * s * inv;
        m[l] = s * inv;
      }
      float* f = reinterpret_cast<float*>(Sw + w * k);
      for (int64_t l = 0; l < w; ++l) split_mean(m[l], f[l], f[w + l]);
    }
  }
  eg += hsum((e[0] + e[1]) + (e[2] + e[3])) + e1;
}

// ---- float32 weights, eight tiles in the lanes: pass 1 by differences from a pivot -----------------
// The tiles of a row block in groups of eight (the rest as above): eight entries of each tile are
// loaded as eight rows and transposed (transpose8.h), so that each float32 vector holds one entry of
// the eight tiles. Each orbit is summed as its pivot (its first entry in the pass's order, rows in
// order) plus the differences of its other entries from the pivot: y_e - y_pivot is exact where the
// two are within a factor of two (Sterbenz), which holds in every orbit of a nearly equivariant weight,
// so the float32 sum of the differences keeps the digits of the residual, with eight tiles per vector
// and no conversions. The split mean of pass 2 is then m_hi = the pivot, m_lo = (the sum of the
// differences) / n (pivot_orbit_means8). Its rounding is relative to the orbit's residual, not to each
// entry's: an entry whose own residual is far below its orbit's is off by up to ~100 of its own ulps,
// where the float64 sums keep it to one; measured on nearly equivariant C4 irreps tiles, every entry
// stays within 0.7 float32 ulps of its tile's largest gradient entry.

// Tiles of up to 32 orbits of up to 8 entries each (grid convolutions on irreps fields of C4 and D4, small
// fields of groups of order <= 8) take the pivot pass: measured 3-12 % faster on them. Tiles of 120
// orbits (a 64-point field) ran 16 % slower (their groups' pivots and sums, two lines per orbit, no longer
// stay in L1 across a row); and the float32 sum of an orbit's differences rounds once per entry, so the
// mean of a large orbit of a weight far from equivariant drifts by several ulps (O_h's orbits of 48: 5 ulps
// of the gradient, against 0.3 with the float64 sums).
constexpr int64_t kPivotMaxOrbits = 32, kPivotMaxOrbitSize = 8;

// Whether a float32 pair takes the pivot pass.
inline bool pivot_pass_fits(const Pair& p) {
  if (p.r > kPivotMaxOrbits) return false;
  for (int64_t k = 0; k < p.r; ++k) {
    const acc_t inv = orbit_inv(p, k);
    if (inv * kPivotMaxOrbitSize < 1) return false;  // n_k = 1 / inv > 8
  }
  return true;
}

// The pivots of a row's orbits, marked in bit 0 of o4 (free: o4 = 4 o), and the entries of sign 0 in
// bit 1: a signed table files them under orbit 0 (plan_types.h), where the other passes add their zeros,
// but here a zero would enter as a difference from orbit 0's pivot. sg: the row's signs, or null;
// seen: a byte per orbit, zero before the block's first row. Returns whether the row has any mark.
inline bool mark_pivots(int32_t* o4, int64_t di, const acc_t* sg, uint8_t* seen) {
  bool marked = false;
  for (int64_t j = 0; j < di; ++j) {
    if (sg && sg[j] == 0) {
      o4[j] |= 2;
      marked = true;
      continue;
    }
    uint8_t& s = seen[o4[j] >> 2];
    marked |= s == 0;
    o4[j] |= int32_t(s == 0);
    s = 1;
  }
  return marked;
}

// one (signed) entry y of the eight tiles into its orbit: the pivots P and the difference sums D of a
// group ([K][8] floats each; orbit o at 8 o = 2 (o4 & ~3))
template <bool Marked>
inline void pivot_add8(float* P, float* D, int32_t o4, __m256 y) {
  if (Marked && (o4 & 2)) return;  // sign 0
  const int64_t at = 2 * int64_t(o4 & ~3);
  if (Marked && (o4 & 1)) {
    _mm256_storeu_ps(P + at, y);
    return;
  }
  _mm256_storeu_ps(D + at, _mm256_add_ps(_mm256_loadu_ps(D + at), _mm256_sub_ps(y, _mm256_loadu_ps(P + at))));
}

// Row a of the tiles [0, v8) of the block's rows x; sgf: the row's signs as floats, or null.
template <bool Marked>
inline void pivot_row8(const Pair& p, const float* const* x, int64_t dout, int64_t a, acc_t* S, int64_t v8,
                       const int32_t* o4, const float* sgf) {
  const int64_t di = p.di, K = p.r, d8 = di - di % 8;
  for (int64_t v = 0; v < v8; v += 8) {
    const float* x0 = x[a] + v * di;
    prefetch_short_group<float>(x, nullptr, dout, p.ci * di, a, v * di, 8 * di);
    float* P = reinterpret_cast<float*>(S + v * K);
    float* D = P + 8 * K;
    int64_t j = 0;
    for (; j < d8; j += 8) {
      __m256 r[8];
      for (int t = 0; t < 8; ++t) r[t] = _mm256_loadu_ps(x0 + t * di + j);
      if (sgf) {  // the signs of entries j .. j + 7, the same in every tile
        const __m256 s = _mm256_loadu_ps(sgf + j);
        for (int t = 0; t < 8; ++t) r[t] = _mm256_mul_ps(r[t], s);
      }
      transpose8(r);  // r[i]: entry j + i of the eight tiles
      for (int i = 0; i < 8; ++i) pivot_add8<Marked>(P, D, o4[j + i], r[i]);
    }
    for (; j < di; ++j) {  // the entries past the last whole vector: entry j of the eight tiles
      const __m256 y = _mm256_setr_ps(x0[j], x0[di + j], x0[2 * di + j], x0[3 * di + j], x0[4 * di + j],
                                      x0[5 * di + j], x0[6 * di + j], x0[7 * di + j]);
      pivot_add8<Marked>(P, D, o4[j], sgf ? _mm256_mul_ps(y, _mm256_set1_ps(sgf[j])) : y);
    }
  }
}

// Pass 1 over the tiles [0, v8) of every row (v8 a multiple of 8). The group of tiles v .. v + 7 keeps its
// pivots, then its difference sums, in the bytes of the [K][4] float64 sums of tiles v .. v + 3 and of
// v + 4 .. v + 7 (S + v K, zero on entry). seen: K bytes; sgf: d_in floats (a row's signs).
inline void pivot_orbit_sums8(const Pair& p, int64_t dout, const float* const* x, acc_t* S, int64_t v8,
                              int32_t* obuf, uint8_t* seen, float* sgf) {
  const int64_t di = p.di, K = p.r;
  for (int64_t k = 0; k < K; ++k) seen[k] = 0;
  for (int64_t a = 0; a < dout; ++a) {
    const acc_t* sg = p.sign ? p.sign + a * di : nullptr;
    orbit_row(p, dout, a, obuf);  // into obuf
    const bool marked = mark_pivots(obuf, di, sg, seen);
    const int32_t* o4 = obuf;
    if (sg)
      for (int64_t j = 0; j < di; ++j) sgf[j] = static_cast<float>(sg[j]);
    if (marked)
      pivot_row8<true>(p, x, dout, a, S, v8, o4, sg ? sgf : nullptr);
    else  // no pivot and no sign 0 in the row: every entry a difference, no branch
      pivot_row8<false>(p, x, dout, a, S, v8, o4, sg ? sgf : nullptr);
  }
}

// rows r0 .. r3 -> their transpose, within each 128-bit lane
inline void transpose4_f32(__m256& r0, __m256& r1, __m256& r2, __m256& r3) {
  const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
  const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
  r0 = _mm256_shuffle_ps(t0, t2, 0x44);
  r1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  r2 = _mm256_shuffle_ps(t1, t3, 0x44);
  r3 = _mm256_shuffle_ps(t1, t3, 0xEE);
}

// The gradient cp R + cg P(T), from D = T - m_hi (exact) and the split mean, as cp D + cg m_hi + (cg - cp)
// m_lo: the two large terms meet in one FMA, so that where they cancel (cp R ~ -cg P(T)) the result keeps
// its own precision; cp (D - m_lo) would round R first, half an ulp of R. cp = 2 lambda_perp, cg = 2 lambda_G.
struct SplitCoefs {
  __m256 cp, cg, cgp;  // cgp = cg - cp (it multiplies m_lo only)
};

inline __m256 split_grad8(__m256 d, __m256 hi, __m256 lo, __m256 add, const SplitCoefs& c) {
  return _mm256_fmadd_ps(c.cp, d, _mm256_add_ps(_mm256_fmadd_ps(c.cg, hi, _mm256_mul_ps(c.cgp, lo)), add));
}

inline __m128 split_grad4(__m128 d, __m128 hi, __m128 lo, __m128 add, const SplitCoefs& c) {
  const __m128 cp = _mm256_castps256_ps128(c.cp), cg = _mm256_castps256_ps128(c.cg), cgp = _mm256_castps256_ps128(c.cgp);
  return _mm_fmadd_ps(cp, d, _mm_add_ps(_mm_fmadd_ps(cg, hi, _mm_mul_ps(cgp, lo)), add));
}

// Eight entries: R = (T - hi) - lo, E_perp in float32 lanes, the gradient written or added.
template <GradMode Mode>
inline void split_residual8(const float* x, float* g, __m256 hi, __m256 lo, const SplitCoefs& c, __m256& e8) {
  const __m256 t = _mm256_loadu_ps(x), d = _mm256_sub_ps(t, hi), r = _mm256_sub_ps(d, lo);
  e8 = _mm256_fmadd_ps(r, r, e8);
  if constexpr (Mode != GradMode::kNone)
    _mm256_storeu_ps(g, split_grad8(d, hi, lo, Mode == GradMode::kAdd ? _mm256_loadu_ps(g) : _mm256_setzero_ps(), c));
}

// Four entries, the means as [hi | lo] lanes.
template <GradMode Mode>
inline void split_residual4(const float* x, float* g, __m256 m, const SplitCoefs& c, __m256& e8) {
  const __m128 t = _mm_loadu_ps(x), hi = _mm256_castps256_ps128(m), lo = _mm256_extractf128_ps(m, 1);
  const __m128 d = _mm_sub_ps(t, hi), r = _mm_sub_ps(d, lo);
  e8 = _mm256_add_ps(e8, _mm256_zextps128_ps256(_mm_mul_ps(r, r)));
  if constexpr (Mode != GradMode::kNone)
    _mm_storeu_ps(g, split_grad4(d, hi, lo, Mode == GradMode::kAdd ? _mm_loadu_ps(g) : _mm_setzero_ps(), c));
}

// the signs of eight consecutive entries as float32 lanes
inline __m256 signs8(const acc_t* sign) {
  return _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(sign + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(sign)));
}

inline void flush_lanes_f32(__m256* e8, int n, acc_t& e1) {
  for (int l = 0; l < n; ++l) {
    const __m256d s = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(e8[l])),
                                    _mm256_cvtps_pd(_mm256_extractf128_ps(e8[l], 1)));
    e1 += hsum(V4{s});
    e8[l] = _mm256_setzero_ps();
  }
}

// E_G of the groups of eight, and their pivots and difference sums in place of the split means pass 2
// reads from two groups of four: orbit k of tiles v .. v + 3 at float 8 k of S + v K (four m_hi, four
// m_lo), of tiles v + 4 .. v + 7 at float 8 k of S + (v + 4) K. E_G = sum_k n_k m_k^2, the mean m_k =
// y_pivot + D_k / n_k taken in float64 (no float32 overflow or subnormal square where the energy itself
// is in range).
inline void pivot_orbit_means8(const Pair& p, acc_t* S, int64_t v8, acc_t& eg) {
  const int64_t K = p.r;
  if (v8 == 0) return;  // no group of eight (and K may pass kPivotMaxOrbits)
  acc_t sizes[kPivotMaxOrbits];  // n_k, and 1 / n_k in float32: once per pair, not once per group
  float invs[kPivotMaxOrbits];
  for (int64_t k = 0; k < K; ++k) {
    const acc_t inv = orbit_inv(p, k);
    sizes[k] = acc_t(int64_t(1 / inv + 0.5));
    invs[k] = static_cast<float>(inv);
  }
  // E_G of orbit k of the eight tiles into e0 (tiles 0 .. 3), e1 (4 .. 7); and the split means stored
  const auto orbit = [&](float* P, float* D, int64_t k, V4& e0, V4& e1) {
    const V4 n = splat(sizes[k]);
    const __m256 pk = _mm256_loadu_ps(P + 8 * k), lo = _mm256_mul_ps(_mm256_loadu_ps(D + 8 * k),
                                                                    _mm256_set1_ps(invs[k]));
    const V4 m0 = V4{_mm256_cvtps_pd(_mm256_castps256_ps128(pk))} + V4{_mm256_cvtps_pd(_mm256_castps256_ps128(lo))};
    const V4 m1 = V4{_mm256_cvtps_pd(_mm256_extractf128_ps(pk, 1))} + V4{_mm256_cvtps_pd(_mm256_extractf128_ps(lo, 1))};
    e0 = fmadd(m0 * m0, n, e0);
    e1 = fmadd(m1 * m1, n, e1);
    _mm256_storeu_ps(P + 8 * k, _mm256_permute2f128_ps(pk, lo, 0x20));
    _mm256_storeu_ps(D + 8 * k, _mm256_permute2f128_ps(pk, lo, 0x31));
  };
  V4 e0 = zero4(), e1 = zero4(), e2 = zero4(), e3 = zero4();  // orbits in pairs: no add chain across them
  for (int64_t v = 0; v < v8; v += 8) {
    float* P = reinterpret_cast<float*>(S + v * K);
    float* D = P + 8 * K;
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
      orbit(P, D, k, e0, e1);
      orbit(P, D, k + 1, e2, e3);
    }
    if (k < K) orbit(P, D, k, e0, e1);
  }
  eg += hsum((e0 + e1) + (e2 + e3));
}

template <GradMode Mode>
void split_orbit_residuals(const Pair& p, int64_t dout, const float* const* x, float* const* g, acc_t cp2, acc_t cg2,
                           const acc_t* S, int32_t* obuf, int64_t v0, acc_t& ep) {
  const int64_t di = p.di, K = p.r, ci = p.ci;
  const float cps = static_cast<float>(cp2), cgs = static_cast<float>(cg2), cgps = static_cast<float>(cg2 - cp2);
  const SplitCoefs c{_mm256_set1_ps(cps), _mm256_set1_ps(cgs), _mm256_set1_ps(cgps)};
  __m256 e8[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // two accumulators: the step's other registers fit
  int n8 = 0;  // vectors added into each lane of e8 since the last flush
  acc_t e1 = 0;
  for (int64_t a = 0; a < dout; ++a) {
    const int32_t* o4 = orbit_row(p, dout, a, obuf);
    const acc_t* sg = p.sign ? p.sign + a * di : nullptr;
    for (int64_t v = v0, w = 0; v < ci; v += w) {
      w = group_width(v, ci);
      const float* x0 = x[a] + v * di;
      float* g0 = Mode == GradMode::kNone ? nullptr : g[a] + v * di;
      const acc_t* Md = S + v * K;  // orbit k: w m_hi, then w m_lo (floats) in the bytes of Md + w k
      const bool short_group =
          prefetch_short_group<float>(x, Mode == GradMode::kAdd ? g : nullptr, dout, ci * di, a, v * di, w * di);
      int64_t j = 0;
      if (w == 4) {
        for (; j + 8 <= di; j += 8) {
          if (!short_group) {  // a step walks 8 entries of each of 4 tiles: two lines of the next group
            prefetch_line<float>(x0 + 4 * di + 4 * j);
            prefetch_line<float>(x0 + 4 * di + 4 * j + 16);
            if (Mode == GradMode::kAdd) {
              prefetch_line<float>(g0 + 4 * di + 4 * j);
              prefetch_line<float>(g0 + 4 * di + 4 * j + 16);
            }
          }
          __m256 h[4], l[4];  // row i: the quad of entry j + i (low lane) and of entry j + i + 4 (high lane)
          for (int i = 0; i < 4; ++i) {
            const float* lo_q = reinterpret_cast<const float*>(Md + o4[j + i]);
            const float* hi_q = reinterpret_cast<const float*>(Md + o4[j + i + 4]);
            h[i] = _mm256_loadu2_m128(hi_q, lo_q);
            l[i] = _mm256_loadu2_m128(hi_q + 4, lo_q + 4);
          }
          transpose4_f32(h[0], h[1], h[2], h[3]);  // h[t]: m_hi of entries j .. j + 7 of tile t
          transpose4_f32(l[0], l[1], l[2], l[3]);
          if (sg) {
            const __m256 s = signs8(sg + j);
            for (int t = 0; t < 4; ++t) h[t] = _mm256_mul_ps(h[t], s), l[t] = _mm256_mul_ps(l[t], s);
          }
          for (int t = 0; t < 4; ++t)
            split_residual8<Mode>(x0 + t * di + j, g0 ? g0 + t * di + j : nullptr, h[t], l[t], c, e8[t & 1]);
          if ((n8 += 2) >= kOrbitFlushVectors) {
            flush_lanes_f32(e8, 2, e1);
            n8 = 0;
          }
        }
        if (j + 4 <= di) {
          __m256 m[4];  // row i: [m_hi | m_lo] quads of entry j + i; transposed: [m_hi | m_lo] of tile t
          for (int i = 0; i < 4; ++i) m[i] = _mm256_loadu_ps(reinterpret_cast<const float*>(Md + o4[j + i]));
          transpose4_f32(m[0], m[1], m[2], m[3]);
          if (sg) {
            const __m128 s4 = _mm256_cvtpd_ps(_mm256_loadu_pd(sg + j));
            const __m256 s = _mm256_set_m128(s4, s4);
            for (int t = 0; t < 4; ++t) m[t] = _mm256_mul_ps(m[t], s);
          }
          for (int t = 0; t < 4; ++t)
            split_residual4<Mode>(x0 + t * di + j, g0 ? g0 + t * di + j : nullptr, m[t], c, e8[t & 1]);
          if ((n8 += 2) >= kOrbitFlushVectors) {
            flush_lanes_f32(e8, 2, e1);
            n8 = 0;
          }
          j += 4;
        }
      } else if (w == 2) {
        for (; j + 8 <= di; j += 8) {
          __m256 m[4];  // row i: [hi0 hi1 lo0 lo1] of entry j + i (low lane) and j + i + 4 (high lane)
          for (int i = 0; i < 4; ++i)
            m[i] = _mm256_loadu2_m128(reinterpret_cast<const float*>(Md + (o4[j + i + 4] >> 1)),
                                      reinterpret_cast<const float*>(Md + (o4[j + i] >> 1)));
          transpose4_f32(m[0], m[1], m[2], m[3]);  // m_hi of tile 0, of tile 1, m_lo of tile 0, of tile 1
          if (sg) {
            const __m256 s = signs8(sg + j);
            for (int t = 0; t < 4; ++t) m[t] = _mm256_mul_ps(m[t], s);
          }
          split_residual8<Mode>(x0 + j, g0 ? g0 + j : nullptr, m[0], m[2], c, e8[0]);
          split_residual8<Mode>(x0 + di + j, g0 ? g0 + di + j : nullptr, m[1], m[3], c, e8[1]);
          if (++n8 >= kOrbitFlushVectors) {
            flush_lanes_f32(e8, 2, e1);
            n8 = 0;
          }
        }
      } else {  // one tile (ci = 1, or the last of an odd count): eight entries of its row, the means gathered
        const float* Mf = reinterpret_cast<const float*>(Md);  // orbit k: m_hi at float 2 k, m_lo at 2 k + 1
        for (; j + 8 <= di; j += 8) {
          const __m256i at = _mm256_srli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(o4 + j)), 1);
          __m256 hi = _mm256_i32gather_ps(Mf, at, 4), lo = _mm256_i32gather_ps(Mf + 1, at, 4);
          if (sg) {
            const __m256 s = signs8(sg + j);
            hi = _mm256_mul_ps(hi, s), lo = _mm256_mul_ps(lo, s);
          }
          split_residual8<Mode>(x0 + j, g0 ? g0 + j : nullptr, hi, lo, c, e8[0]);
          if (++n8 >= kOrbitFlushVectors) {
            flush_lanes_f32(e8, 2, e1);
            n8 = 0;
          }
        }
      }
      if (w == 4)  // the entries past the last whole vector: entry j of the four tiles in four lanes
        for (; j < di; ++j) {
          const float* q = reinterpret_cast<const float*>(Md + o4[j]);  // the tiles' m_hi, then m_lo
          __m128 hi = _mm_loadu_ps(q), lo = _mm_loadu_ps(q + 4);
          if (sg) {
            const __m128 s = _mm_set1_ps(static_cast<float>(sg[j]));
            hi = _mm_mul_ps(hi, s), lo = _mm_mul_ps(lo, s);
          }
          const __m128 t = _mm_setr_ps(x0[j], x0[di + j], x0[2 * di + j], x0[3 * di + j]);
          const __m128 d = _mm_sub_ps(t, hi), r = _mm_sub_ps(d, lo);
          e8[0] = _mm256_add_ps(e8[0], _mm256_zextps128_ps256(_mm_mul_ps(r, r)));
          if (++n8 >= kOrbitFlushVectors) {
            flush_lanes_f32(e8, 2, e1);
            n8 = 0;
          }
          if constexpr (Mode != GradMode::kNone) {
            const __m128 add = Mode == GradMode::kAdd ? _mm_setr_ps(g0[j], g0[di + j], g0[2 * di + j], g0[3 * di + j])
                                                      : _mm_setzero_ps();
            alignas(16) float v[4];
            _mm_store_ps(v, split_grad4(d, hi, lo, add, c));
            for (int l = 0; l < 4; ++l) g0[l * di + j] = v[l];
          }
        }
      for (; j < di; ++j)  // entries past the last whole vector of a pair of tiles, and a single tile
        for (int64_t t = 0; t < w; ++t) {
          const float* q = reinterpret_cast<const float*>(Md + (w * o4[j] >> 2));
          const float s = sg ? static_cast<float>(sg[j]) : 1.0f, hi = s * q[t], lo = s * q[w + t];
          const float xv = x0[t * di + j], d = xv - hi, r = d - lo;
          e1 += acc_t(r) * acc_t(r);
          if constexpr (Mode != GradMode::kNone) {
            float& gv = g0[t * di + j];
            gv = __builtin_fmaf(cps, d, __builtin_fmaf(cgs, hi, cgps * lo) + (Mode == GradMode::kAdd ? gv : 0.0f));
          }
        }
    }
  }
  flush_lanes_f32(e8, 2, e1);
  ep += e1;
}

template <typename X>
inline void table_orbit_residuals_f32(const Pair& p, int64_t dout, const X* const* x, X* const* g, acc_t cp2, acc_t cg2,
                                      const acc_t* S, int32_t* obuf, int64_t v0, acc_t& ep) {
  if (v0 == p.ci) return;
  if (!g)
    split_orbit_residuals<GradMode::kNone>(p, dout, x, g, cp2, cg2, S, obuf, v0, ep);
  else if (p.accumulate)
    split_orbit_residuals<GradMode::kAdd>(p, dout, x, g, cp2, cg2, S, obuf, v0, ep);
  else
    split_orbit_residuals<GradMode::kWrite>(p, dout, x, g, cp2, cg2, S, obuf, v0, ep);
}

template <typename X>
constexpr bool kSplitOrbitMeans = sizeof(X) == sizeof(float);
#endif

// S: ci * K + di + K / 8 + 1 scratch entries: the orbit sums (then means) of every tile, a group of w
// tiles starting at tile v (group_width) as the [K][w] block at S + v K (float32 groups of eight: the
// pivot pass's two blocks); then room for the orbit row (and a row of signs), then a byte per orbit; then,
// where permuted is given (AVX-512, orbit_tables.h: the means and pass 2 of the pivot pass's groups, for the
// float32 pairs it fits), the lane pattern.
template <typename X>
void table_orbit_pair(const Pair& p, int64_t dout, const X* const* x, X* const* g, acc_t cp2, acc_t cg2, acc_t* S,
                      acc_t& ep, acc_t& eg, [[maybe_unused]] PivotResidualsFn32 permuted) {
  const int64_t di = p.di, K = p.r, ci = p.ci, d4 = di - di % 4;
  int32_t* obuf = reinterpret_cast<int32_t*>(S + ci * K);
  for (int64_t k = 0; k < ci * K; ++k) S[k] = 0;
  int64_t v8 = 0;  // float32 on AVX2: pass 1 of the tiles [0, v8) by differences from a pivot, eight at a time
#ifdef EQUIPROJ_AVX2
  if constexpr (kSplitOrbitMeans<X>) {
    v8 = ci >= 8 && pivot_pass_fits(p) ? ci - ci % 8 : 0;
    if (v8 > 0)  // the orbit row's d_in int32, then d_in floats of signs; then K bytes past the row
      pivot_orbit_sums8(p, dout, x, S, v8, obuf, reinterpret_cast<uint8_t*>(S + ci * K + di),
                        reinterpret_cast<float*>(obuf + di));
  }
#endif
  // pass 1: the orbit sums of every other tile
  for (int64_t a = 0; a < dout && v8 < ci; ++a) {
    const int32_t* o4 = orbit_row(p, dout, a, obuf);
    const acc_t* sg = p.sign ? p.sign + a * di : nullptr;
    for (int64_t v = v8, w = 0; v < ci; v += w) {
      w = group_width(v, ci);
      const X* x0 = x[a] + v * di;
      acc_t* Sw = S + v * K;  // [K][w]
      const bool short_group = prefetch_short_group<X>(x, nullptr, dout, ci * di, a, v * di, w * di);
      int64_t j = 0;
      if (w == 4) {
        for (; j < d4; j += 4) {
          if (!short_group) prefetch_line<X>(x0 + 4 * di + 4 * j);  // the next group, a line per step
          V4 r0 = load4(x0 + j), r1 = load4(x0 + di + j), r2 = load4(x0 + 2 * di + j), r3 = load4(x0 + 3 * di + j);
          transpose4(r0, r1, r2, r3);  // r_i: entry j + i of the four tiles
          if (sg) r0 = r0 * splat(sg[j]), r1 = r1 * splat(sg[j + 1]), r2 = r2 * splat(sg[j + 2]), r3 = r3 * splat(sg[j + 3]);
          acc_t* s0 = Sw + o4[j];
          acc_t* s1 = Sw + o4[j + 1];
          acc_t* s2 = Sw + o4[j + 2];
          acc_t* s3 = Sw + o4[j + 3];
          store4(s0, load4(s0) + r0);
          store4(s1, load4(s1) + r1);
          store4(s2, load4(s2) + r2);
          store4(s3, load4(s3) + r3);
        }
      }
#ifdef EQUIPROJ_AVX2
      if (w == 2)
        for (; j < d4; j += 4) orbit_sum2(Sw, o4 + j, x0 + j, x0 + di + j, sg ? sg + j : nullptr);
#endif
      if (w == 4)  // the entries past the last whole vector: entry j of the four tiles as one vector
        for (; j < di; ++j) {
          const V4 t = gather4(x0 + j, di);
          acc_t* s = Sw + o4[j];
          store4(s, load4(s) + (sg ? t * splat(sg[j]) : t));
        }
      if (w == 1) {  // one tile: four entries converted and signed at once, then added one by one
        for (; j + 4 <= di; j += 4) {
          alignas(32) acc_t y[4];
          store4(y, sg ? load4(x0 + j) * load4(sg + j) : load4(x0 + j));
          for (int i = 0; i < 4; ++i) Sw[o4[j + i] >> 2] += y[i];
        }
      }
      for (; j < di; ++j)
        for (int64_t l = 0; l < w; ++l) Sw[(w * o4[j] >> 2) + l] += sg ? sg[j] * acc_t(x0[l * di + j]) : acc_t(x0[l * di + j]);
    }
  }
  // E_G = sum_k S_k^2 / n_k; S becomes the orbit means (float64, or split into float32 m_hi, m_lo)
#ifdef EQUIPROJ_AVX2
  if constexpr (kSplitOrbitMeans<X>) {
    const bool blocks = v8 > 0 && permuted && permuted_means_fit(p);  // the groups' means and pass 2 there
    if (blocks) {
      const uintptr_t end = reinterpret_cast<uintptr_t>(S + ci * K + di + K / 8 + 1);
      float* pattern = reinterpret_cast<float*>((end + 63) & ~uintptr_t(63));  // 64-byte aligned
      permuted(p, dout, x, g, cp2, cg2, reinterpret_cast<const float*>(S), v8, pattern, ep, eg);
    } else {
      pivot_orbit_means8(p, S, v8, eg);
    }
    split_orbit_means(p, S, v8, eg);
    table_orbit_residuals_f32<X>(p, dout, x, g, cp2, cg2, S, obuf, blocks ? v8 : 0, ep);
    return;
  }
#endif
  orbit_means(p, S, eg);
  // pass 2: the residual and the gradient
  V4 e4 = zero4();
  acc_t e1 = 0;
  if (!g)
    table_orbit_residuals<GradMode::kNone, X>(p, dout, x, g, cp2, cg2, S, obuf, e4, e1);
  else if (p.accumulate)
    table_orbit_residuals<GradMode::kAdd, X>(p, dout, x, g, cp2, cg2, S, obuf, e4, e1);
  else
    table_orbit_residuals<GradMode::kWrite, X>(p, dout, x, g, cp2, cg2, S, obuf, e4, e1);
  ep += hsum(e4) + e1;
}
