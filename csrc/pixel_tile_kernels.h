// The pair kernel of pixel_tiles.cpp. Included twice, inside namespaces that define V8 (eight float64
// lanes: plain arrays, or AVX-512) with zero8, splat8, load8, load8_masked, store8, store8_masked,
// add8, mul8, fmadd8 (a b + c), fnmadd8 (c - a b) and hsum8; so this file has no include guard,
// includes nothing and instantiates no standard-library function templates (an instantiation made
// under the target pragma could be shared with the plain code).
//
// x[a] (a < d_out): row a of the row block from the pair's first column; g[a] likewise for the
// gradient (g == nullptr: none). A tile v is x[a][v n .. v n + n) for every a. The basis row k, a
// of the pair starts at A + (k d_out + a) np (np = n rounded up to 8, zero-padded).
//
// Q tiles at a time share every load of the basis (a 3-D pair's basis is too large for L1): the
// coefficients of Q tiles are Q r accumulators in registers, the residual rows Q independent
// chains. Q depends on r only (the tiles left over run in blocks of four, two, one), so the order of
// every sum is fixed by the plan.

template <typename X>
inline V8 loadn(const X* p, int64_t cnt) {
  return cnt >= 8 ? load8(p) : load8_masked(p, cnt);
}

template <typename X>
inline void storen(X* p, V8 v, int64_t cnt) {
  if (cnt >= 8)
    store8(p, v);
  else
    store8_masked(p, v, cnt);
}

// tiles per block for rank R: Q R accumulators, Q tile vectors and one basis vector in 32 registers
constexpr int tiles_per_block(int R) {
  return R <= 2 ? 8 : R <= 3 ? 6 : R <= 4 ? 5 : R <= 6 ? 4 : R <= 9 ? 3 : R <= 14 ? 2 : 1;
}

#define EQUIPROJ_INLINE inline __attribute__((always_inline))

// one vector of columns (j .. j + 8, or the cnt < 8 columns of the tail) of row a of Q tiles: the
// coefficients' multiply-adds
template <typename X, int R, int Q, bool Tail>
EQUIPROJ_INLINE void coef_chunk(const X* xa, int64_t n, const double* Aa, int64_t rowstride, int64_t j, int64_t cnt,
                                V8 (&acc)[Q][R]) {
  V8 t[Q];
#pragma GCC unroll 8
  for (int q = 0; q < Q; ++q) t[q] = Tail ? load8_masked(xa + q * n + j, cnt) : load8(xa + q * n + j);
#pragma GCC unroll 16
  for (int k = 0; k < R; ++k) {
    const V8 av = load8(Aa + k * rowstride + j);
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) acc[q][k] = fmadd8(av, t[q], acc[q][k]);
  }
}

// the same columns: residual, its squares, and the gradient written or added
template <typename X, int R, int Q, bool Tail>
EQUIPROJ_INLINE void residual_chunk(const X* xa, X* ga, bool add, int64_t n, const double* Aa, int64_t rowstride,
                                    int64_t j, int64_t cnt, const double (&c)[Q][R > 0 ? R : 1], V8 vcg, V8 vdc,
                                    V8 (&s)[Q]) {
  V8 t[Q], rv[Q];
#pragma GCC unroll 8
  for (int q = 0; q < Q; ++q) rv[q] = t[q] = Tail ? load8_masked(xa + q * n + j, cnt) : load8(xa + q * n + j);
#pragma GCC unroll 16
  for (int k = 0; k < R; ++k) {
    const V8 av = load8(Aa + k * rowstride + j);
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) rv[q] = fnmadd8(splat8(c[q][k]), av, rv[q]);
  }
#pragma GCC unroll 8
  for (int q = 0; q < Q; ++q) s[q] = fmadd8(rv[q], rv[q], s[q]);
  if (ga) {
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q) {
      X* gq = ga + q * n + j;
      V8 gv = fmadd8(vcg, t[q], mul8(vdc, rv[q]));
      if (add) gv = add8(gv, Tail ? load8_masked(gq, cnt) : load8(gq));
      if (Tail)
        store8_masked(gq, gv, cnt);
      else
        store8(gq, gv);
    }
  }
}

// Q tiles from tile v: coefficients, residual, energies, gradient.
template <typename X, int R, int Q>
inline void tile_block(const X* const* x, X* const* g, bool add, int64_t dout, int64_t n, int64_t np, int64_t v,
                       const double* A, V8 vcg, V8 vdc, V8& sp, double& sg) {
  const int64_t rowstride = dout * np, full = n - n % 8;
  double c[Q][R > 0 ? R : 1];
  if constexpr (R > 0) {
    V8 acc[Q][R];
#pragma GCC unroll 8
    for (int q = 0; q < Q; ++q)
#pragma GCC unroll 16
      for (int k = 0; k < R; ++k) acc[q][k] = zero8();
    for (int64_t a = 0; a < dout; ++a) {
      const X* xa = x[a] + v * n;
      const double* Aa = A + a * np;
      for (int64_t j = 0; j < full; j += 8) coef_chunk<X, R, Q, false>(xa, n, Aa, rowstride, j, 8, acc);
      if (full < n) coef_chunk<X, R, Q, true>(xa, n, Aa, rowstride, full, n - full, acc);
    }
    // the Q R horizontal sums, eight at a time (a transposing reduction)
    const V8* flat = &acc[0][0];
    double* cf = &c[0][0];
    int i = 0;
    for (; i + 8 <= Q * R; i += 8) hsum8x8(flat + i, cf + i);
    for (; i < Q * R; ++i) cf[i] = hsum8(flat[i]);
    for (i = 0; i < Q * R; ++i) sg += cf[i] * cf[i];
  }
  V8 s[Q];
#pragma GCC unroll 8
  for (int q = 0; q < Q; ++q) s[q] = zero8();
  for (int64_t a = 0; a < dout; ++a) {
    const X* xa = x[a] + v * n;
    X* ga = g ? g[a] + v * n : nullptr;
    const double* Aa = A + a * np;
    for (int64_t j = 0; j < full; j += 8)
      residual_chunk<X, R, Q, false>(xa, ga, add, n, Aa, rowstride, j, 8, c, vcg, vdc, s);
    if (full < n) residual_chunk<X, R, Q, true>(xa, ga, add, n, Aa, rowstride, full, n - full, c, vcg, vdc, s);
  }
  for (int q = 0; q < Q; ++q) sp = add8(sp, s[q]);
}

// every tile of a pair of rank R
template <typename X, int R>
void pair_tiles(const X* const* x, X* const* g, bool add, int64_t dout, int64_t n, int64_t ci, const double* A,
                double cp2, double cg2, double& ep, double& eg) {
  constexpr int Q = tiles_per_block(R);
  const int64_t np = (n + 7) / 8 * 8;
  const V8 vcg = splat8(cg2), vdc = splat8(cp2 - cg2);
  V8 sp = zero8();
  double sg = 0;
  int64_t v = 0;
  for (; v + Q <= ci; v += Q) tile_block<X, R, Q>(x, g, add, dout, n, np, v, A, vcg, vdc, sp, sg);
  // the tiles left over in blocks of four and two where Q is larger (fields of few copies: a block of one
  // tile is bound by the loads of the basis)
  if constexpr (Q > 4)
    for (; v + 4 <= ci; v += 4) tile_block<X, R, 4>(x, g, add, dout, n, np, v, A, vcg, vdc, sp, sg);
  if constexpr (Q > 2)
    for (; v + 2 <= ci; v += 2) tile_block<X, R, 2>(x, g, add, dout, n, np, v, A, vcg, vdc, sp, sg);
  for (; v < ci; ++v) tile_block<X, R, 1>(x, g, add, dout, n, np, v, A, vcg, vdc, sp, sg);
  ep += hsum8(sp);
  eg += sg;
}

// any rank: the coefficients in blocks of eight basis rows, the residual with a runtime loop
template <typename X>
void pair_tiles_any(const X* const* x, X* const* g, bool add, int64_t dout, int64_t n, int64_t ci, int64_t r,
                    const double* A, double cp2, double cg2, double* c, double& ep, double& eg) {
  const int64_t np = (n + 7) / 8 * 8, rowstride = dout * np;
  const V8 vcg = splat8(cg2), vdc = splat8(cp2 - cg2);
  V8 sp = zero8();
  double sg = 0;
  for (int64_t v = 0; v < ci; ++v) {
    const int64_t o = v * n;
    for (int64_t k0 = 0; k0 < r; k0 += 8) {
      const int64_t kb = r - k0 < 8 ? r - k0 : 8;
      V8 acc[8];
      for (int k = 0; k < 8; ++k) acc[k] = zero8();
      for (int64_t a = 0; a < dout; ++a) {
        const X* xa = x[a] + o;
        const double* Aa = A + k0 * rowstride + a * np;
        for (int64_t j = 0; j < n; j += 8) {
          const V8 t = loadn(xa + j, n - j);
          for (int64_t k = 0; k < kb; ++k) acc[k] = fmadd8(load8(Aa + k * rowstride + j), t, acc[k]);
        }
      }
      for (int64_t k = 0; k < kb; ++k) {
        c[k0 + k] = hsum8(acc[k]);
        sg += c[k0 + k] * c[k0 + k];
      }
    }
    for (int64_t a = 0; a < dout; ++a) {
      const X* xa = x[a] + o;
      X* ga = g ? g[a] + o : nullptr;
      const double* Aa = A + a * np;
      for (int64_t j = 0; j < n; j += 8) {
        const int64_t cnt = n - j;
        const V8 t = loadn(xa + j, cnt);
        V8 rv = t;
        for (int64_t k = 0; k < r; ++k) rv = fnmadd8(splat8(c[k]), load8(Aa + k * rowstride + j), rv);
        sp = fmadd8(rv, rv, sp);
        if (ga) {
          V8 gv = fmadd8(vcg, t, mul8(vdc, rv));
          if (add) gv = add8(gv, loadn(ga + j, cnt));
          storen(ga + j, gv, cnt);
        }
      }
    }
  }
  ep += hsum8(sp);
  eg += sg;
}

template <typename X, int R>
bool dispatch_rank(const X* const* x, X* const* g, bool add, int64_t dout, int64_t n, int64_t ci, int64_t r,
                   const double* A, double cp2, double cg2, double& ep, double& eg) {
  if constexpr (R > kMaxUnrolled) {
    return false;
  } else {
    if (r == R) {
      pair_tiles<X, R>(x, g, add, dout, n, ci, A, cp2, cg2, ep, eg);
      return true;
    }
    return dispatch_rank<X, R + 1>(x, g, add, dout, n, ci, r, A, cp2, cg2, ep, eg);
  }
}

template <typename X>
void run_pair(const X* const* x, X* const* g, bool add, int64_t dout, int64_t n, int64_t ci, int64_t r,
              const double* A, double cp2, double cg2, double* c, double& ep, double& eg) {
  if (!dispatch_rank<X, 0>(x, g, add, dout, n, ci, r, A, cp2, cg2, ep, eg))
    pair_tiles_any<X>(x, g, add, dout, n, ci, r, A, cp2, cg2, c, ep, eg);
}

void run_pair_f32(const float* const* x, float* const* g, bool add, int64_t dout, int64_t n, int64_t ci, int64_t r,
                  const double* A, double cp2, double cg2, double* c, double& ep, double& eg) {
  run_pair<float>(x, g, add, dout, n, ci, r, A, cp2, cg2, c, ep, eg);
}

void run_pair_f64(const double* const* x, double* const* g, bool add, int64_t dout, int64_t n, int64_t ci, int64_t r,
                  const double* A, double cp2, double cg2, double* c, double& ep, double& eg) {
  run_pair<double>(x, g, add, dout, n, ci, r, A, cp2, cg2, c, ep, eg);
}

#undef EQUIPROJ_INLINE
