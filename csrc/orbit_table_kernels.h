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
// the last one entry by entry.

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
// tiles at S2 + 2 o[j + i] (orbit sums laid out [K][2]).
template <typename X>
inline void orbit_sum2(acc_t* S2, const int32_t* o, const X* x0, const X* x1) {
  const __m256d r0 = load4(x0).v, r1 = load4(x1).v;
  const __m256d lo = _mm256_unpacklo_pd(r0, r1), hi = _mm256_unpackhi_pd(r0, r1);  // entries j, j+2 | j+1, j+3
  acc_t* s[4] = {S2 + 2 * o[0], S2 + 2 * o[1], S2 + 2 * o[2], S2 + 2 * o[3]};
  _mm_storeu_pd(s[0], _mm_add_pd(_mm_loadu_pd(s[0]), _mm256_castpd256_pd128(lo)));
  _mm_storeu_pd(s[1], _mm_add_pd(_mm_loadu_pd(s[1]), _mm256_castpd256_pd128(hi)));
  _mm_storeu_pd(s[2], _mm_add_pd(_mm_loadu_pd(s[2]), _mm256_extractf128_pd(lo, 1)));
  _mm_storeu_pd(s[3], _mm_add_pd(_mm_loadu_pd(s[3]), _mm256_extractf128_pd(hi, 1)));
}

// The means of entries j .. j + 3 of tiles 0 and 1 as two rows.
inline void orbit_means2(const acc_t* M2, const int32_t* o, V4& m0, V4& m1) {
  const __m256d a = _mm256_insertf128_pd(_mm256_castpd128_pd256(_mm_loadu_pd(M2 + 2 * o[0])), _mm_loadu_pd(M2 + 2 * o[2]), 1);
  const __m256d b = _mm256_insertf128_pd(_mm256_castpd128_pd256(_mm_loadu_pd(M2 + 2 * o[1])), _mm_loadu_pd(M2 + 2 * o[3]), 1);
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

// The orbit of every entry of tile row a: the table's row, or, for a product, written into buf from
// the factor tables (p.orbit: the block table [d_out, d_1], then the pixel table [d_out, d_2]).
inline const int32_t* orbit_row(const Pair& p, int64_t dout, int64_t a, int32_t* buf) {
  if (p.form != kOrbitProduct) return p.orbit + a * p.di;
  const int64_t d2 = p.factor, d1 = p.di / d2;
  const int32_t* blk = p.orbit + a * d1;
  const int32_t* pix = p.orbit + dout * d1 + a * d2;
  for (int64_t b = 0; b < d1; ++b) {
    const int32_t base = blk[b] * static_cast<int32_t>(d2);
    int32_t* ob = buf + b * d2;
    for (int64_t q = 0; q < d2; ++q) ob[q] = base + pix[q];
  }
  return buf;
}

enum class GradMode { kNone, kWrite, kAdd };

// The cache lines of four entries of the next group of tiles (one line of float, two of double):
// four interleaved streams of d_in entries each are too short for the hardware prefetchers.
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
    const int32_t* o = orbit_row(p, dout, a, obuf);
    for (int64_t v = 0, w = 0; v < ci; v += w) {
      w = group_width(v, ci);
      const X* x0 = x[a] + v * di;
      X* g0 = Mode == GradMode::kNone ? nullptr : g[a] + v * di;
      const acc_t* Mw = M + v * K;  // [K][w]
      int64_t j = 0;
      if (w == 4) {
        for (; j < d4; j += 4) {
          // a step walks 4 entries of each of 4 tiles: one line of the next group (4 d_in contiguous entries)
          prefetch_line<X>(x0 + 4 * di + 4 * j);
          if (Mode == GradMode::kAdd) prefetch_line<X>(g0 + 4 * di + 4 * j);
          V4 m0 = load4(Mw + 4 * o[j]), m1 = load4(Mw + 4 * o[j + 1]), m2 = load4(Mw + 4 * o[j + 2]),
             m3 = load4(Mw + 4 * o[j + 3]);
          transpose4(m0, m1, m2, m3);  // m_l: the means of entries j .. j + 3 of tile l
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
          orbit_means2(Mw, o + j, m0, m1);
          orbit_residual4<Mode>(x0 + j, g0 ? g0 + j : nullptr, m0, vcg, vdc, e[0]);
          orbit_residual4<Mode>(x0 + di + j, g0 ? g0 + di + j : nullptr, m1, vcg, vdc, e[1]);
        }
      }
#endif
      for (; j < di; ++j)
        for (int64_t l = 0; l < w; ++l)
          orbit_residual_one(x0 + l * di + j, g0 ? g0 + l * di + j : nullptr, Mw[w * o[j] + l], cp2, cg2, acc, e1);
    }
  }
  e4 = e4 + ((e[0] + e[1]) + (e[2] + e[3]));
}

// S: ci * K + di scratch entries: the orbit sums (then means) of every tile, a group of w tiles
// starting at tile v (group_width) as the [K][w] block at S + v K; then room for the orbit row of a
// product.
template <typename X>
void table_orbit_pair(const Pair& p, int64_t dout, const X* const* x, X* const* g, acc_t cp2, acc_t cg2, acc_t* S,
                      acc_t& ep, acc_t& eg) {
  const int64_t di = p.di, K = p.r, ci = p.ci, d4 = di - di % 4;
  int32_t* obuf = reinterpret_cast<int32_t*>(S + ci * K);
  for (int64_t k = 0; k < ci * K; ++k) S[k] = 0;
  // pass 1: the orbit sums of every tile
  for (int64_t a = 0; a < dout; ++a) {
    const int32_t* o = orbit_row(p, dout, a, obuf);
    for (int64_t v = 0, w = 0; v < ci; v += w) {
      w = group_width(v, ci);
      const X* x0 = x[a] + v * di;
      acc_t* Sw = S + v * K;  // [K][w]
      int64_t j = 0;
      if (w == 4) {
        for (; j < d4; j += 4) {
          prefetch_line<X>(x0 + 4 * di + 4 * j);  // as in pass 2: the next group, a line per step
          V4 r0 = load4(x0 + j), r1 = load4(x0 + di + j), r2 = load4(x0 + 2 * di + j), r3 = load4(x0 + 3 * di + j);
          transpose4(r0, r1, r2, r3);  // r_i: entry j + i of the four tiles
          acc_t* s0 = Sw + 4 * o[j];
          acc_t* s1 = Sw + 4 * o[j + 1];
          acc_t* s2 = Sw + 4 * o[j + 2];
          acc_t* s3 = Sw + 4 * o[j + 3];
          store4(s0, load4(s0) + r0);
          store4(s1, load4(s1) + r1);
          store4(s2, load4(s2) + r2);
          store4(s3, load4(s3) + r3);
        }
      }
#ifdef EQUIPROJ_AVX2
      if (w == 2)
        for (; j < d4; j += 4) orbit_sum2(Sw, o + j, x0 + j, x0 + di + j);
#endif
      for (; j < di; ++j)
        for (int64_t l = 0; l < w; ++l) Sw[w * o[j] + l] += acc_t(x0[l * di + j]);
    }
  }
  // E_G = sum_k S_k^2 / n_k; S becomes the orbit means
  acc_t sg = 0;
  for (int64_t v = 0, w = 0; v < ci; v += w) {
    w = group_width(v, ci);
    acc_t* Sw = S + v * K;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t inv = p.form == kOrbitProduct ? p.inv_size : p.inv[k];
      for (int64_t l = 0; l < w; ++l) {
        acc_t& s = Sw[w * k + l];
        sg += s * s * inv;
        s *= inv;
      }
    }
  }
  eg += sg;
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
