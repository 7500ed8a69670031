// Tile kernels: one field pair against one row block. Included twice by fused_energies.cpp, once
// for the baseline ISA and once under `#pragma GCC target("avx2,fma")` (chosen at run time), after
// simd4.h; so this file has no include guard, includes nothing and instantiates no standard-library
// function templates (an instantiation made under the pragma could be shared with baseline code).
//
// x[a] (a < d_out): row a of the row block from the pair's first column, ci*di entries of type X
// (float or double: weight rows read in place, or float64 staging rows); g[a]: the gradient rows
// (g == nullptr: no gradient). Arithmetic in float64. Every reduction has a fixed order, with
// several independent accumulators so that it is not bound by the add latency.

// One tile at column offset o (runtime shape, any basis): used for the tiles left over by the
// four-tile vector loops. add: the gradient is added to g (read after x, so g may alias x).
template <typename X>
inline void tile_scalar(const X* const* x, X* const* g, int64_t o, int64_t dout, int64_t di, int64_t r,
                        const acc_t* A, acc_t cp2, acc_t cg2, acc_t& sp, acc_t& sg, bool add) {
  acc_t coef[64];  // r <= 64 on this path (callers have d_out, d_in <= 5: r <= 25)
  for (int64_t k = 0; k < r; ++k) {
    acc_t c = 0;
    for (int64_t a = 0; a < dout; ++a)
      for (int64_t b = 0; b < di; ++b) c += A[(k * dout + a) * di + b] * acc_t(x[a][o + b]);
    coef[k] = c;
    sg += c * c;
  }
  for (int64_t a = 0; a < dout; ++a)
    for (int64_t b = 0; b < di; ++b) {
      const acc_t t = x[a][o + b];
      acc_t rv = t;
      for (int64_t k = 0; k < r; ++k) rv -= coef[k] * A[(k * dout + a) * di + b];
      sp += rv * rv;
      if (g) g[a][o + b] = static_cast<X>(cg2 * t + (cp2 - cg2) * rv + (add ? acc_t(g[a][o + b]) : 0));
    }
}

// ---- r = 0: sum of squares ------------------------------------------------------------------------

#ifdef EQUIPROJ_AVX2
// The squares of eight float32 entries added into two float64 accumulators (each entry converted, so
// a square below float32's normal range keeps its digits).
inline void add_squares8(__m256 v, __m256d& lo, __m256d& hi) {
  const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), b = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  lo = _mm256_fmadd_pd(a, a, lo);
  hi = _mm256_fmadd_pd(b, b, hi);
}

// float32 rows: the gradient scale x (+ g) as one float32 multiply-add (eight entries per instruction,
// where the float64 lanes took four with a conversion on every load and store), the squares in float64.
inline void zero_rows_f32(const float* const* x, float* const* g, int64_t rows, int64_t span, acc_t scale, acc_t& e,
                          bool add) {
  const __m256 sc = _mm256_set1_ps(static_cast<float>(scale));
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd(), s2 = _mm256_setzero_pd(), s3 = _mm256_setzero_pd();
  for (int64_t a = 0; a < rows; ++a) {
    const float* xa = x[a];
    float* ga = g ? g[a] : nullptr;
    const auto step = [&](int64_t k, __m256d& lo, __m256d& hi) {
      const __m256 v = _mm256_loadu_ps(xa + k);
      add_squares8(v, lo, hi);
      if (ga) _mm256_storeu_ps(ga + k, add ? _mm256_fmadd_ps(sc, v, _mm256_loadu_ps(ga + k)) : _mm256_mul_ps(sc, v));
    };
    int64_t j = 0;
    for (; j + 16 <= span; j += 16) {
      step(j, s0, s1);
      step(j + 8, s2, s3);
    }
    if (j + 8 <= span) {
      step(j, s0, s1);
      j += 8;
    }
    if (j < span) {  // the last 1..7 entries in one masked vector (short rows: scalar fields' spans of 20, 44)
      const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(span - j)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      const __m256 v = _mm256_maskload_ps(xa + j, m);  // zero in the lanes past the row
      add_squares8(v, s2, s3);
      if (ga)
        _mm256_maskstore_ps(ga + j, m, add ? _mm256_fmadd_ps(sc, v, _mm256_maskload_ps(ga + j, m)) : _mm256_mul_ps(sc, v));
    }
  }
  e += hsum(V4{_mm256_add_pd(_mm256_add_pd(s0, s1), _mm256_add_pd(s2, s3))});
}
#endif

// add: the gradient is added to g (which may alias x: each vector is read before it is written).
template <typename X>
inline void zero_rows(const X* const* x, X* const* g, int64_t rows, int64_t span, acc_t scale, acc_t& e,
                      bool add = false) {
#ifdef EQUIPROJ_AVX2
  if constexpr (std::is_same<X, float>::value) {
    zero_rows_f32(x, g, rows, span, scale, e, add);
    return;
  }
#endif
  const V4 sc = splat(scale);
  for (int64_t a = 0; a < rows; ++a) {
    const X* xa = x[a];
    X* ga = g ? g[a] : nullptr;
    V4 s0 = zero4(), s1 = zero4(), s2 = zero4(), s3 = zero4();
    int64_t j = 0;
    if (ga && add) {
      for (; j + 16 <= span; j += 16) {
        const V4 v0 = load4(xa + j), v1 = load4(xa + j + 4), v2 = load4(xa + j + 8), v3 = load4(xa + j + 12);
        s0 = fmadd(v0, v0, s0);
        s1 = fmadd(v1, v1, s1);
        s2 = fmadd(v2, v2, s2);
        s3 = fmadd(v3, v3, s3);
        store4(ga + j, fmadd(v0, sc, load4(ga + j)));
        store4(ga + j + 4, fmadd(v1, sc, load4(ga + j + 4)));
        store4(ga + j + 8, fmadd(v2, sc, load4(ga + j + 8)));
        store4(ga + j + 12, fmadd(v3, sc, load4(ga + j + 12)));
      }
    } else if (ga) {
      for (; j + 16 <= span; j += 16) {
        const V4 v0 = load4(xa + j), v1 = load4(xa + j + 4), v2 = load4(xa + j + 8), v3 = load4(xa + j + 12);
        s0 = fmadd(v0, v0, s0);
        s1 = fmadd(v1, v1, s1);
        s2 = fmadd(v2, v2, s2);
        s3 = fmadd(v3, v3, s3);
        store4(ga + j, v0 * sc);
        store4(ga + j + 4, v1 * sc);
        store4(ga + j + 8, v2 * sc);
        store4(ga + j + 12, v3 * sc);
      }
    } else {
      for (; j + 16 <= span; j += 16) {
        const V4 v0 = load4(xa + j), v1 = load4(xa + j + 4), v2 = load4(xa + j + 8), v3 = load4(xa + j + 12);
        s0 = fmadd(v0, v0, s0);
        s1 = fmadd(v1, v1, s1);
        s2 = fmadd(v2, v2, s2);
        s3 = fmadd(v3, v3, s3);
      }
    }
    acc_t tail = 0;
    for (; j < span; ++j) {
      const acc_t v = xa[j];
      tail += v * v;
      if (ga) ga[j] = static_cast<X>(add ? acc_t(ga[j]) + scale * v : scale * v);
    }
    e += hsum((s0 + s1) + (s2 + s3)) + tail;
  }
}

// ---- r = 1, A = +-I/sqrt(D): coef^2 = tr(T)^2 / D, R = T - (tr T / D) I ----------------------------

// Off-diagonal part of row A of the D-row tiles: sum of x[j]^2 over j % D != A as exact masked
// squares (never a difference of sums), vectorised along the row; with g, g[j] = cp2 x[j] for
// every j (the diagonal entries are overwritten afterwards), or with add, g[j] += cp2 x[j] for the
// off-diagonal j only (the diagonal entries are added to afterwards, from x: g may alias x).
template <int D, int A, typename X>
inline acc_t masked_row(const X* xa, X* ga, int64_t span, acc_t cp2, bool add) {
  V4 mask[D];
  for (int i = 0; i < D; ++i)
    mask[i] = make4((4 * i) % D != A, (4 * i + 1) % D != A, (4 * i + 2) % D != A, (4 * i + 3) % D != A);
  const V4 sc = splat(cp2);
  V4 s[4] = {zero4(), zero4(), zero4(), zero4()};
  constexpr int L = 4 * D;  // whole periods of the mask, whole vectors
  int64_t j = 0;
  if (ga && add) {
    for (; j + L <= span; j += L)
#pragma GCC unroll 8
      for (int i = 0; i < D; ++i) {
        const V4 w = load4(xa + j + 4 * i) * mask[i];
        s[i & 3] = fmadd(w, w, s[i & 3]);
        store4(ga + j + 4 * i, fmadd(w, sc, load4(ga + j + 4 * i)));
      }
  } else if (ga) {
    for (; j + L <= span; j += L)
#pragma GCC unroll 8
      for (int i = 0; i < D; ++i) {
        const V4 v = load4(xa + j + 4 * i), w = v * mask[i];
        s[i & 3] = fmadd(w, w, s[i & 3]);
        store4(ga + j + 4 * i, v * sc);
      }
  } else {
    for (; j + L <= span; j += L)
#pragma GCC unroll 8
      for (int i = 0; i < D; ++i) {
        const V4 w = load4(xa + j + 4 * i) * mask[i];
        s[i & 3] = fmadd(w, w, s[i & 3]);
      }
  }
  acc_t tail = 0;
  for (; j < span; ++j) {  // j % D is the tile column: the loop above advanced by whole periods
    const acc_t v = xa[j];
    if (j % D != A) tail += v * v;
    if (ga && add) {
      if (j % D != A) ga[j] = static_cast<X>(acc_t(ga[j]) + cp2 * v);
    } else if (ga) {
      ga[j] = static_cast<X>(cp2 * v);
    }
  }
  return hsum((s[0] + s[1]) + (s[2] + s[3])) + tail;
}

template <int D, typename X, int... A>
inline acc_t masked_rows(const X* const* x, X* const* g, int64_t span, acc_t cp2, bool add,
                         std::integer_sequence<int, A...>) {
  return (acc_t(0) + ... + masked_row<D, A, X>(x[A], g ? g[A] : nullptr, span, cp2, add));
}

// Off-diagonal entries row-wise (masked_row), then, four tiles at a time, the traces, the diagonal
// residuals and their gradient entries cp2 x_aa - (cp2 - cg2) mean (added to g with add).
template <int D, typename X>
void identity_pair(const X* const* x, X* const* g, int64_t ci, acc_t cp2, acc_t cg2, acc_t& ep, acc_t& eg,
                   bool add = false) {
  if (D == 1) {  // 1x1 tiles are entirely equivariant
    zero_rows<X>(x, g, 1, ci, cg2, eg, add);
    return;
  }
  const acc_t off = masked_rows<D, X>(x, g, ci * D, cp2, add, std::make_integer_sequence<int, D>{});
  const acc_t dc = cp2 - cg2;
  const V4 inv = splat(acc_t(1) / D), vcp = splat(cp2), vdc = splat(dc);
  V4 sd[D], sg = zero4();
  for (int a = 0; a < D; ++a) sd[a] = zero4();
  int64_t v = 0;
  for (; v + 4 <= ci; v += 4) {
    V4 t[D], tr = zero4();
    for (int a = 0; a < D; ++a) {
      t[a] = gather4(x[a] + v * D + a, D);
      tr = tr + t[a];
    }
    const V4 mean = tr * inv;
    sg = fmadd(tr, mean, sg);
    for (int a = 0; a < D; ++a) {
      const V4 rv = t[a] - mean;
      sd[a] = fmadd(rv, rv, sd[a]);
      if (g) {
        const V4 gv = fnmadd(vdc, mean, vcp * t[a]);
        scatter4(g[a] + v * D + a, D, add ? gather4(g[a] + v * D + a, D) + gv : gv);
      }
    }
  }
  acc_t sp_tail = 0, sg_tail = 0;
  for (; v < ci; ++v) {
    const int64_t o = v * D;
    acc_t t[D], tr = 0;
    for (int a = 0; a < D; ++a) {
      t[a] = x[a][o + a];
      tr += t[a];
    }
    const acc_t mean = tr / D;
    sg_tail += tr * mean;
    for (int a = 0; a < D; ++a) {
      sp_tail += (t[a] - mean) * (t[a] - mean);
      if (g) g[a][o + a] = static_cast<X>((add ? acc_t(g[a][o + a]) : acc_t(0)) + (cp2 * t[a] - dc * mean));
    }
  }
  V4 sds = zero4();
  for (int a = 0; a < D; ++a) sds = sds + sd[a];
  ep += off + hsum(sds) + sp_tail;
  eg += hsum(sg) + sg_tail;
}

// Runtime d (> 5): tile by tile.
template <typename X>
void identity_pair_rt(const X* const* x, X* const* g, int64_t d, int64_t ci, acc_t cp2, acc_t cg2, acc_t& ep,
                      acc_t& eg) {
  const acc_t dc = cp2 - cg2, inv_d = acc_t(1) / acc_t(d);
  acc_t sp = 0, sg = 0;
  for (int64_t v = 0; v < ci; ++v) {
    const int64_t o = v * d;
    acc_t tr = 0;
    for (int64_t a = 0; a < d; ++a) tr += x[a][o + a];
    const acc_t mean = tr * inv_d;
    sg += tr * mean;
    for (int64_t a = 0; a < d; ++a) {
      const X* xa = x[a] + o;
      acc_t s = 0;
      for (int64_t b = 0; b < d; ++b) {
        const acc_t rv = b == a ? xa[b] - mean : acc_t(xa[b]);
        s += rv * rv;
      }
      sp += s;
      if (g) {
        X* ga = g[a] + o;
        for (int64_t b = 0; b < d; ++b) {
          const acc_t rv = b == a ? xa[b] - mean : acc_t(xa[b]);
          ga[b] = static_cast<X>(cg2 * xa[b] + dc * rv);
        }
      }
    }
  }
  ep += sp;
  eg += sg;
}

// ---- any basis, square D x D tiles, four tiles per vector -----------------------------------------

template <int D, typename X>
void small_pair(const X* const* x, X* const* g, int64_t ci, int64_t r, const acc_t* A, acc_t cp2, acc_t cg2,
                acc_t& ep, acc_t& eg, bool add) {
  constexpr int E = D * D;
  const V4 vcg = splat(cg2), vdc = splat(cp2 - cg2);
  V4 sp[4] = {zero4(), zero4(), zero4(), zero4()}, sg[2] = {zero4(), zero4()};
  int64_t v = 0;
  for (; v + 4 <= ci; v += 4) {
    V4 t[E], rv[E];
    for (int a = 0; a < D; ++a)
      for (int b = 0; b < D; ++b) rv[a * D + b] = t[a * D + b] = gather4(x[a] + v * D + b, D);
    for (int64_t k = 0; k < r; ++k) {
      const acc_t* Ak = A + k * E;
      V4 c0 = splat(Ak[0]) * t[0], c1 = zero4();
      for (int e = 1; e < E; ++e) {
        if (e & 1)
          c1 = fmadd(splat(Ak[e]), t[e], c1);
        else
          c0 = fmadd(splat(Ak[e]), t[e], c0);
      }
      const V4 c = c0 + c1;
      sg[k & 1] = fmadd(c, c, sg[k & 1]);
      for (int e = 0; e < E; ++e) rv[e] = fnmadd(c, splat(Ak[e]), rv[e]);
    }
    for (int a = 0; a < D; ++a)
      for (int b = 0; b < D; ++b) {
        const int e = a * D + b;
        sp[e & 3] = fmadd(rv[e], rv[e], sp[e & 3]);
        if (g) {
          const V4 gv = fmadd(vcg, t[e], vdc * rv[e]);
          scatter4(g[a] + v * D + b, D, add ? gather4(g[a] + v * D + b, D) + gv : gv);
        }
      }
  }
  acc_t sp_tail = 0, sg_tail = 0;
  for (; v < ci; ++v) tile_scalar<X>(x, g, v * D, D, D, r, A, cp2, cg2, sp_tail, sg_tail, add);
  ep += hsum((sp[0] + sp[1]) + (sp[2] + sp[3])) + sp_tail;
  eg += hsum(sg[0] + sg[1]) + sg_tail;
}

// ---- any basis, runtime tile shape ----------------------------------------------------------------
// Two small matrix products per row block, register-blocked over four tiles:
//   coef[v, k] = sum_e X[v, e] At[e, k]          (e = a d_in + b runs over the tile's entries)
//   R[v, e]    = X[v, e] - sum_k coef[v, k] A[k, e]
// At: the basis as [d_out d_in, rp] (rp = r rounded up to 4, zero-padded); coef: ci * rp scratch.

constexpr int64_t padded_rank(int64_t r) { return (r + 3) / 4 * 4; }

// coef for Q tiles starting at v0, columns k0 .. k0 + 4 NK.
template <int Q, int NK, typename X>
inline void coef_block(const X* const* x, int64_t dout, int64_t di, int64_t v0, int64_t k0, int64_t rp,
                       const acc_t* At, acc_t* coef) {
  V4 acc[Q][NK];
  for (int q = 0; q < Q; ++q)
    for (int j = 0; j < NK; ++j) acc[q][j] = zero4();
  for (int64_t a = 0; a < dout; ++a) {
    const X* xr = x[a] + v0 * di;
    const acc_t* Ata = At + a * di * rp + k0;
    for (int64_t b = 0; b < di; ++b) {
      V4 at[NK];
      for (int j = 0; j < NK; ++j) at[j] = load4(Ata + b * rp + 4 * j);
      for (int q = 0; q < Q; ++q) {
        const V4 xv = splat(acc_t(xr[q * di + b]));
        for (int j = 0; j < NK; ++j) acc[q][j] = fmadd(xv, at[j], acc[q][j]);
      }
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int j = 0; j < NK; ++j) store4(coef + (v0 + q) * rp + k0 + 4 * j, acc[q][j]);
}

// Residual and gradient of Q tiles starting at v0, tile row a, columns b0 .. b0 + 4 NB.
template <int Q, int NB, bool Add, typename X>
inline void residual_block(const X* const* x, X* const* g, int64_t dout, int64_t di, int64_t v0, int64_t a,
                           int64_t b0, int64_t r, int64_t rp, const acc_t* A, const acc_t* coef, V4 vcg, V4 vdc,
                           V4* sp) {
  V4 t[Q][NB], rv[Q][NB];
  for (int q = 0; q < Q; ++q)
    for (int j = 0; j < NB; ++j) rv[q][j] = t[q][j] = load4(x[a] + (v0 + q) * di + b0 + 4 * j);
  const acc_t* Aa = A + a * di + b0;
  for (int64_t k = 0; k < r; ++k) {
    V4 av[NB];
    for (int j = 0; j < NB; ++j) av[j] = load4(Aa + k * dout * di + 4 * j);
    for (int q = 0; q < Q; ++q) {
      const V4 c = splat(coef[(v0 + q) * rp + k]);
      for (int j = 0; j < NB; ++j) rv[q][j] = fnmadd(c, av[j], rv[q][j]);
    }
  }
  for (int q = 0; q < Q; ++q)
    for (int j = 0; j < NB; ++j) {
      sp[j] = fmadd(rv[q][j], rv[q][j], sp[j]);
      if (g) {
        X* gp = g[a] + (v0 + q) * di + b0 + 4 * j;
        const V4 gv = fmadd(vcg, t[q][j], vdc * rv[q][j]);
        store4(gp, Add ? load4(gp) + gv : gv);
      }
    }
}

// Loop order: a block of the basis (At columns k0 .. k0 + 8, or A[:, a, b0 .. b0 + 8]) is applied to
// every tile of the row block before the next block, so that it stays in cache for large fields. Add:
// the gradient is added to g; every tile is read (its coefficients) before any is written, and each
// residual block reads its entries before it writes them, so g may alias x.
template <bool Add, typename X>
void generic_pair_impl(const X* const* x, X* const* g, int64_t dout, int64_t di, int64_t ci, int64_t r, const acc_t* A,
                       const acc_t* At, acc_t cp2, acc_t cg2, acc_t* coef, acc_t& ep, acc_t& eg) {
  const int64_t rp = padded_rank(r), c4 = ci - ci % 4;
  for (int64_t k0 = 0; k0 < rp; k0 += 8) {
    if (k0 + 8 <= rp) {
      for (int64_t v = 0; v < c4; v += 4) coef_block<4, 2, X>(x, dout, di, v, k0, rp, At, coef);
      for (int64_t v = c4; v < ci; ++v) coef_block<1, 2, X>(x, dout, di, v, k0, rp, At, coef);
    } else {
      for (int64_t v = 0; v < c4; v += 4) coef_block<4, 1, X>(x, dout, di, v, k0, rp, At, coef);
      for (int64_t v = c4; v < ci; ++v) coef_block<1, 1, X>(x, dout, di, v, k0, rp, At, coef);
    }
  }
  V4 sg4 = zero4();
  for (int64_t j = 0; j < ci * rp; j += 4) {  // the padding columns are zero
    const V4 c = load4(coef + j);
    sg4 = fmadd(c, c, sg4);
  }
  const V4 vcg = splat(cg2), vdc = splat(cp2 - cg2);
  V4 sp[3] = {zero4(), zero4(), zero4()};
  acc_t sp_tail = 0;
  const int64_t d4 = di - di % 4;
  for (int64_t a = 0; a < dout; ++a) {
    for (int64_t b0 = 0; b0 < d4; b0 += 8) {
      if (b0 + 8 <= d4) {
        for (int64_t v = 0; v < c4; v += 4)
          residual_block<4, 2, Add, X>(x, g, dout, di, v, a, b0, r, rp, A, coef, vcg, vdc, sp);
        for (int64_t v = c4; v < ci; ++v)
          residual_block<1, 2, Add, X>(x, g, dout, di, v, a, b0, r, rp, A, coef, vcg, vdc, sp);
      } else {
        for (int64_t v = 0; v < c4; v += 4)
          residual_block<4, 1, Add, X>(x, g, dout, di, v, a, b0, r, rp, A, coef, vcg, vdc, sp + 2);
        for (int64_t v = c4; v < ci; ++v)
          residual_block<1, 1, Add, X>(x, g, dout, di, v, a, b0, r, rp, A, coef, vcg, vdc, sp + 2);
      }
    }
    for (int64_t b = d4; b < di; ++b)  // columns past the last whole vector
      for (int64_t v = 0; v < ci; ++v) {
        const acc_t t = x[a][v * di + b];
        acc_t rv = t;
        for (int64_t k = 0; k < r; ++k) rv -= coef[v * rp + k] * A[(k * dout + a) * di + b];
        sp_tail += rv * rv;
        if (g) {
          X& gv = g[a][v * di + b];
          gv = static_cast<X>(cg2 * t + (cp2 - cg2) * rv + (Add ? acc_t(gv) : 0));
        }
      }
  }
  ep += hsum((sp[0] + sp[1]) + sp[2]) + sp_tail;
  eg += hsum(sg4);
}

template <typename X>
void generic_pair(const X* const* x, X* const* g, int64_t dout, int64_t di, int64_t ci, int64_t r, const acc_t* A,
                  const acc_t* At, acc_t cp2, acc_t cg2, acc_t* coef, acc_t& ep, acc_t& eg, bool add) {
  if (add && g)
    generic_pair_impl<true, X>(x, g, dout, di, ci, r, A, At, cp2, cg2, coef, ep, eg);
  else
    generic_pair_impl<false, X>(x, g, dout, di, ci, r, A, At, cp2, cg2, coef, ep, eg);
}

// ---- orbit pairs: two permutation fields, P(T) = the mean of T over each orbit ---------------------
// Pass 1 sums every orbit over the tile, pass 2 subtracts the orbit means. Every entry is read
// before it is written, so g may alias x (the decoupled step writes into the weight). The closed
// forms (C_N, D_N regular) run orbit_closed_pair (orbit_closed.h); pairs with an orbit index
// (tables, products) run table_orbit_pair (orbit_table_kernels.h).

// one entry
template <typename X>
inline void orbit_residual_one(const X* x, X* g, acc_t m, acc_t cp2, acc_t cg2, bool accumulate, acc_t& e1) {
  const acc_t t = *x, r = t - m;
  e1 += r * r;
  if (g) {
    const acc_t v = cg2 * t + (cp2 - cg2) * r;
    *g = static_cast<X>(accumulate ? acc_t(*g) + v : v);
  }
}

#include "orbit_table_kernels.h"
#include "orbit_perm_kernels.h"
#include "trace_form_kernels.h"

// ---- dispatch -------------------------------------------------------------------------------------

// coef: ci * padded_rank(r) scratch (kSmall and kGeneric), ci * K orbit sums and one orbit row (kOrbit,
// tables and products, then the lane pattern of permuted where it is given: orbit_tables.h), orbit_closed_scratch
// (kOrbit, closed forms).
template <typename X>
void run_pair(const Pair& p, int64_t dout, const X* const* x, X* const* g, acc_t cp2, acc_t cg2, acc_t* coef,
              acc_t& ep, acc_t& eg, PivotResidualsFn32 permuted) {
  switch (p.kind) {
    case Kind::kZero:
      zero_rows<X>(x, g, dout, p.ci * p.di, cp2, ep, p.accumulate);
      return;
    case Kind::kWhole:  // the same pass, into E_G with lambda_G
      zero_rows<X>(x, g, dout, p.ci * p.di, cg2, eg, p.accumulate);
      return;
    case Kind::kIdentity:
#ifdef EQUIPROJ_AVX2
      if constexpr (std::is_same<X, float>::value) switch (dout) {
          case 2: trace_pair_f32<2>(x, g, p.ci, cp2, cg2, ep, eg, p.accumulate); return;
          case 3: trace_pair_f32<3>(x, g, p.ci, cp2, cg2, ep, eg, p.accumulate); return;
          case 4: trace_pair_f32<4>(x, g, p.ci, cp2, cg2, ep, eg, p.accumulate); return;
          case 5: trace_pair_f32<5>(x, g, p.ci, cp2, cg2, ep, eg, p.accumulate); return;
          default: break;
        }
#endif
      switch (dout) {
        case 1: identity_pair<1, X>(x, g, p.ci, cp2, cg2, ep, eg, p.accumulate); return;
        case 2: identity_pair<2, X>(x, g, p.ci, cp2, cg2, ep, eg, p.accumulate); return;
        case 3: identity_pair<3, X>(x, g, p.ci, cp2, cg2, ep, eg, p.accumulate); return;
        case 4: identity_pair<4, X>(x, g, p.ci, cp2, cg2, ep, eg, p.accumulate); return;
        case 5: identity_pair<5, X>(x, g, p.ci, cp2, cg2, ep, eg, p.accumulate); return;
        default: identity_pair_rt<X>(x, g, dout, p.ci, cp2, cg2, ep, eg); return;
      }
    case Kind::kSmall:
#ifdef EQUIPROJ_AVX2
      if (dout == p.di) switch (dout) {
          case 2: small_pair<2, X>(x, g, p.ci, p.r, p.A, cp2, cg2, ep, eg, p.accumulate); return;
          case 3: small_pair<3, X>(x, g, p.ci, p.r, p.A, cp2, cg2, ep, eg, p.accumulate); return;
          case 4: small_pair<4, X>(x, g, p.ci, p.r, p.A, cp2, cg2, ep, eg, p.accumulate); return;
          case 5: small_pair<5, X>(x, g, p.ci, p.r, p.A, cp2, cg2, ep, eg, p.accumulate); return;
          default: break;
        }
#endif
      [[fallthrough]];
    case Kind::kGeneric:
      generic_pair<X>(x, g, dout, p.di, p.ci, p.r, p.A, p.At, cp2, cg2, coef, ep, eg, p.accumulate);
      return;
    case Kind::kOrbit:
      if (p.form == kOrbitPoints)
        points_orbit_pair<X>(p, dout, x, g, cp2, cg2, coef, ep, eg);
      else if (p.form == kOrbitTable || p.form == kOrbitProduct)
        table_orbit_pair<X>(p, dout, x, g, cp2, cg2, coef, ep, eg, permuted);
      else
        orbit_closed_pair<X>(p, dout, x, g, cp2, cg2, coef, ep, eg);
      return;
  }
}

void run_pair_float(const Pair& p, int64_t dout, const float* const* x, float* const* g, acc_t cp2, acc_t cg2,
                    acc_t* coef, acc_t& ep, acc_t& eg, PivotResidualsFn32 permuted) {
  run_pair<float>(p, dout, x, g, cp2, cg2, coef, ep, eg, permuted);
}

void run_pair_double(const Pair& p, int64_t dout, const double* const* x, double* const* g, acc_t cp2, acc_t cg2,
                     acc_t* coef, acc_t& ep, acc_t& eg) {
  run_pair<double>(p, dout, x, g, cp2, cg2, coef, ep, eg, nullptr);
}
