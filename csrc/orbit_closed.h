// Orbit pairs in closed form: two regular fields of C_N or D_N (docs/math.md §9). Included twice by
// fused_energies.cpp like tile_kernels.h (baseline ISA and AVX2+FMA), after simd4.h and before
// tile_kernels.h, whose run_pair dispatches the closed forms here; the same rules hold: no include
// guard, no includes, no standard-library function templates.
//
// Every tile row is a run of segments of L entries (C_N: one, L = N; D_N: two, L = N, one per
// reflection half t of the columns) whose orbits are a rotation (or, for the reflected rows of
// D_N, a reversed rotation) of L consecutive orbits. Each segment's orbits are therefore a
// contiguous slice of a doubled array, D[j] = orbit of (j mod L) (or of (L - 1 - j) mod L for the
// reversed ones), j < 2L, starting at an offset that depends on the row only: no index arithmetic
// per entry, and whole runs of L entries for the vector loops.
//
//   C_N, row a:            orbits (b - a) mod N        = D_fwd[N - a + b]
//   D_N, row k_a (s = 0):  (k_b - k_a) mod N + N t     = D_fwd,t[N - k_a + k_b]
//   D_N, row k_a + N:      (k_a - k_b) mod N + N (1-t) = D_rev,1-t[N - 1 - k_a + k_b]
//
// Pass 1 adds each segment into its doubled float64 array (the sums of an orbit are then the sum
// of its two or four positions); pass 2 reads the orbit means from the same positions. For float32
// weights (AVX2) pass 2 runs in float32, eight lanes, with the mean m computed in float64 and split
// m = m_hi + m_lo (m_hi = float(m), m_lo = float(m - m_hi)): R = (W - m_hi) - m_lo. W - m_hi is
// exact when W and m_hi are within a factor of two (Sterbenz), which is the case of every entry of a
// nearly equivariant weight, so R keeps its own float32 precision there, and loses at most one
// float32 rounding of W - m elsewhere. R^2 is summed in float32 lanes over at most kFlushVectors
// vectors, then in float64.
//
// Both passes walk the row block's rows start to end (rows outer, tiles inner), one memory stream
// at a time, prefetching kPrefetch entries ahead (W in pass 1, the gradient in pass 2: the hardware
// prefetchers alone left both passes stalled on those loads). Column strips of a few tiles, so that
// pass 2 would re-read W from L2, measured no faster (and slower for large tiles, whose rows then
// restart a stream every few KiB). The segment length is a compile-time constant for L = 4, 8, 16,
// where the per-segment loop overhead would otherwise dominate.

constexpr int kFlushVectors = 32;
constexpr int64_t kPrefetch = 1024;

template <typename X>
inline void prefetch(const X* p) {
#ifdef EQUIPROJ_X86
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
#else
  (void)p;
#endif
}

// S[j] += x[j], j < len; the entries ahead that are prefetched: those of pf (null: kPrefetch ahead in x)
template <typename X>
inline void orbit_sum_run(acc_t* S, const X* x, int64_t len, const X* pf = nullptr) {
  if (!pf) pf = x + kPrefetch;
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    prefetch(pf + j);
    const V4 s0 = load4(S + j) + load4(x + j), s1 = load4(S + j + 4) + load4(x + j + 4);
    store4(S + j, s0);
    store4(S + j + 4, s1);
  }
  for (; j + 4 <= len; j += 4) store4(S + j, load4(S + j) + load4(x + j));
  for (; j < len; ++j) S[j] += acc_t(x[j]);
}

// Four consecutive tile rows whose segments start one position apart in the same doubled array
// (row q at S - q): S[j] += x0[j] + x1[j + 1] + x2[j + 2] + x3[j + 3], one load and one store of the
// float64 sums for four rows' entries instead of one per row; the first and last three entries of
// the rows that the shifted vectors leave out are added one by one.
template <typename X>
inline void orbit_sum_run4(acc_t* S, const X* x0, const X* x1, const X* x2, const X* x3, int64_t len,
                           const X* const* pf = nullptr) {
  const X* xr[4] = {x0, x1, x2, x3};
  const X* ahead[4];  // the entries that are prefetched: pf's rows (null: kPrefetch ahead in each row)
  for (int q = 0; q < 4; ++q) ahead[q] = pf ? pf[q] : xr[q] + kPrefetch;
  int64_t j = 0;
  for (; j + 4 <= len - 3; j += 4) {
    if ((j & 15) == 0)
      for (int q = 0; q < 4; ++q) prefetch(ahead[q] + j);
    store4(S + j, ((load4(S + j) + load4(x0 + j)) + (load4(x1 + j + 1) + load4(x2 + j + 2))) + load4(x3 + j + 3));
  }
  for (; j < len - 3; ++j) S[j] += ((acc_t(x0[j]) + acc_t(x1[j + 1])) + acc_t(x2[j + 2])) + acc_t(x3[j + 3]);
  for (int64_t q = 0; q < 4; ++q) {  // len >= 4 (the caller's condition): the two ranges do not meet
    for (int64_t b = 0; b < q; ++b) S[b - q] += acc_t(xr[q][b]);
    for (int64_t b = len - 3 + q; b < len; ++b) S[b - q] += acc_t(xr[q][b]);
  }
}

// r = x[j] - M[j] in float64: E_perp and the gradient cg2 x + (cp2 - cg2) r, written or added; pf: the
// entries of the gradient prefetched alongside (closed_residuals says which)
template <typename X>
inline void orbit_residual_run(const X* x, X* g, const X* pf, const acc_t* M, int64_t len, acc_t cp2, acc_t cg2,
                               bool accumulate, V4& e4, acc_t& e1) {
  const V4 a4 = splat(cg2), b4 = splat(cp2 - cg2);
  int64_t j = 0;
  if (!g) {
    for (; j + 4 <= len; j += 4) {
      const V4 r = load4(x + j) - load4(M + j);
      e4 = fmadd(r, r, e4);
    }
  } else if (!accumulate) {
    for (; j + 4 <= len; j += 4) {
      prefetch(pf + j);
      const V4 t = load4(x + j), r = t - load4(M + j);
      e4 = fmadd(r, r, e4);
      store4(g + j, fmadd(b4, r, a4 * t));
    }
  } else {
    for (; j + 4 <= len; j += 4) {
      prefetch(pf + j);
      const V4 t = load4(x + j), r = t - load4(M + j);
      e4 = fmadd(r, r, e4);
      store4(g + j, load4(g + j) + fmadd(b4, r, a4 * t));
    }
  }
  for (; j < len; ++j) {
    const acc_t t = x[j], r = t - M[j];
    e1 += r * r;
    if (g) {
      const acc_t v = cg2 * t + (cp2 - cg2) * r;
      g[j] = static_cast<X>(accumulate ? acc_t(g[j]) + v : v);
    }
  }
}

#ifdef EQUIPROJ_AVX2

// float32 lanes of E_perp into the float64 sum
inline void flush_f32(__m256& e8, int& n8, acc_t& e1) {
  const __m256d s =
      _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(e8)), _mm256_cvtps_pd(_mm256_extractf128_ps(e8, 1)));
  e1 += hsum(V4{s});
  e8 = _mm256_setzero_ps();
  n8 = 0;
}

// R = (x - hi) - lo; E_perp in float32 lanes (e8, flushed into e1 every kFlushVectors vectors, count
// in n8), the gradient cg x + dc R written to g or added to it (g may alias x: each vector is read
// before it is written).
inline void closed_residual_run_f32(const float* x, float* g, const float* hi, const float* lo, int64_t len,
                                    __m256 cg, __m256 dc, bool accumulate, __m256& e8, int& n8, acc_t& e1,
                                    const float* pf) {
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    if (g) prefetch(pf + j);
    const __m256 t = _mm256_loadu_ps(x + j);
    const __m256 r = _mm256_sub_ps(_mm256_sub_ps(t, _mm256_loadu_ps(hi + j)), _mm256_loadu_ps(lo + j));
    e8 = _mm256_fmadd_ps(r, r, e8);
    if (g) {
      const __m256 base = accumulate ? _mm256_fmadd_ps(cg, t, _mm256_loadu_ps(g + j)) : _mm256_mul_ps(cg, t);
      _mm256_storeu_ps(g + j, _mm256_fmadd_ps(dc, r, base));
    }
    if (++n8 == kFlushVectors) flush_f32(e8, n8, e1);
  }
  if (j + 4 <= len) {  // D_4 and any L = 4 mod 8: half a vector
    const __m128 t = _mm_loadu_ps(x + j);
    const __m128 r = _mm_sub_ps(_mm_sub_ps(t, _mm_loadu_ps(hi + j)), _mm_loadu_ps(lo + j));
    e8 = _mm256_add_ps(e8, _mm256_zextps128_ps256(_mm_mul_ps(r, r)));
    if (++n8 == kFlushVectors) flush_f32(e8, n8, e1);
    if (g) {
      const __m128 cg4 = _mm256_castps256_ps128(cg), dc4 = _mm256_castps256_ps128(dc);
      const __m128 base = accumulate ? _mm_fmadd_ps(cg4, t, _mm_loadu_ps(g + j)) : _mm_mul_ps(cg4, t);
      _mm_storeu_ps(g + j, _mm_fmadd_ps(dc4, r, base));
    }
    j += 4;
  }
  const float cgs = _mm256_cvtss_f32(cg), dcs = _mm256_cvtss_f32(dc);
  for (; j < len; ++j) {
    const float r = (x[j] - hi[j]) - lo[j];
    e1 += acc_t(r) * acc_t(r);
    if (g) g[j] = dcs * r + (accumulate ? cgs * x[j] + g[j] : cgs * x[j]);
  }
}

#endif

// Where segment t of tile row a reads its orbits: the doubled array (0, 1: forward arrays of the
// halves; 2, 3: reversed arrays of the halves) and the offset into it.
struct ClosedSegment {
  int64_t array, offset;
};

inline ClosedSegment closed_segment(bool dihedral, int64_t L, int64_t a, int64_t t) {
  if (!dihedral) return {0, L - a};
  const int64_t ka = a % L;
  return a < L ? ClosedSegment{t, L - ka} : ClosedSegment{2 + (1 - t), L - 1 - ka};
}

// The doubled arrays of one tile in place of their sums: the K orbit sums (into S), E_G, and each
// position j < 2L of each array set to the mean of its orbit, as float64 (means) or, when split,
// as float32 m_hi (the array's first 2L floats) and m_lo (the next 2L).
inline void closed_means(acc_t* D, bool dihedral, int64_t L, acc_t inv, bool split, acc_t* S, acc_t& eg) {
  const int64_t narr = dihedral ? 4 : 1, halves = dihedral ? 2 : 1;
  for (int64_t u = 0; u < halves; ++u) {
    const acc_t* F = D + u * 2 * L;
    const acc_t* Rv = D + (2 + u) * 2 * L;
    for (int64_t k = 0; k < L; ++k) {
      acc_t s = F[k] + F[k + L];
      if (dihedral) s += Rv[L - 1 - k] + Rv[2 * L - 1 - k];
      S[u * L + k] = s;
    }
  }
  for (int64_t k = 0; k < halves * L; ++k) {
    eg += S[k] * S[k] * inv;
    S[k] *= inv;
  }
  for (int64_t arr = 0; arr < narr; ++arr) {
    const acc_t* m = S + (arr & 1) * L;
    const bool reversed = arr >= 2;
    acc_t* M = D + arr * 2 * L;
    float* hi = reinterpret_cast<float*>(M);
    float* lo = hi + 2 * L;
    for (int64_t j = 0; j < 2 * L; ++j) {
      const int64_t k = reversed ? (j < L ? L - 1 - j : 2 * L - 1 - j) : (j < L ? j : j - L);
      if (split) {
        const float h = static_cast<float>(m[k]);
        hi[j] = h;
        lo[j] = static_cast<float>(m[k] - acc_t(h));
      } else {
        M[j] = m[k];
      }
    }
  }
}

// Float32 weights on AVX2 run pass 2 in float32 with split means; everything else in float64.
#ifdef EQUIPROJ_AVX2
template <typename X>
constexpr bool kSplitMeans = sizeof(X) == sizeof(float);
#else
template <typename X>
constexpr bool kSplitMeans = false;
#endif

struct ClosedShape {
  bool dihedral;
  int64_t L, nseg, tile_span;  // segment length, segments per tile row, float64 entries of a tile's doubled arrays
};

template <int LC>
inline ClosedShape closed_shape(const Pair& p) {
  const bool dihedral = p.form == kOrbitDihedral;
  const int64_t L = LC ? LC : dihedral ? p.di / 2 : p.di;
  return {dihedral, L, dihedral ? 2 : 1, (dihedral ? 4 : 1) * 2 * L};
}

// Pass 1 over tile rows a0 .. a1: the orbit sums added into the doubled arrays of `work`.
// LC: the segment length L when it is a compile-time constant, else 0. by_rows: prefetch the same
// entries of the rows ahead (a chunk of columns, whose rows end before kPrefetch entries) instead of
// kPrefetch entries ahead in the row.
template <typename X, int LC>
void closed_sums(const Pair& p, int64_t a0, int64_t a1, const X* const* x, acc_t* work, bool by_rows = false) {
  const ClosedShape c = closed_shape<LC>(p);
  const int64_t L = c.L, di = p.di, ci = p.ci;
  for (int64_t a = a0; a < a1;) {
    // rows a .. a + 3 of one half of a D_N tile (every row of a C_N tile) start their segments one
    // position apart in the same arrays (closed_segment): four rows per pass over the sums
    if (a + 4 <= a1 && L >= 4 && (!c.dihedral || (a < L) == (a + 3 < L))) {
      for (int64_t t = 0; t < c.nseg; ++t) {
        const ClosedSegment sg = closed_segment(c.dihedral, L, a, t);
        acc_t* D = work + sg.array * 2 * L + sg.offset;
        const X* xs[4] = {x[a] + t * L, x[a + 1] + t * L, x[a + 2] + t * L, x[a + 3] + t * L};
        const bool ahead = by_rows && a + 8 <= a1;
        for (int64_t v = 0; v < ci; ++v) {
          const X* pf[4];
          for (int q = 0; q < 4 && ahead; ++q) pf[q] = x[a + 4 + q] + t * L + v * di;
          orbit_sum_run4(D + v * c.tile_span, xs[0] + v * di, xs[1] + v * di, xs[2] + v * di, xs[3] + v * di, L,
                         ahead ? pf : nullptr);
        }
      }
      a += 4;
      continue;
    }
    for (int64_t t = 0; t < c.nseg; ++t) {
      const ClosedSegment sg = closed_segment(c.dihedral, L, a, t);
      acc_t* D = work + sg.array * 2 * L + sg.offset;
      const X* xs = x[a] + t * L;
      const bool ahead = by_rows && a + 1 < a1;
      for (int64_t v = 0; v < ci; ++v)
        orbit_sum_run(D + v * c.tile_span, xs + v * di, L, ahead ? x[a + 1] + t * L + v * di : nullptr);
    }
    ++a;
  }
}

// The sums of every tile in place of their means (split for float32 on AVX2), and E_G.
template <typename X>
void closed_prepare(const Pair& p, acc_t* work, acc_t& eg) {
  const ClosedShape c = closed_shape<0>(p);
  acc_t* S = work + p.ci * c.tile_span;
  for (int64_t v = 0; v < p.ci; ++v) closed_means(work + v * c.tile_span, c.dihedral, c.L, p.inv_size, kSplitMeans<X>, S, eg);
}

// Pass 2 over tile rows a0 .. a1: E_perp and the gradient, from the means of closed_prepare (by_rows:
// as in closed_sums, for the gradient).
template <typename X, int LC>
void closed_residuals(const Pair& p, int64_t a0, int64_t a1, const X* const* x, X* const* g, acc_t cp2, acc_t cg2,
                      const acc_t* work, acc_t& ep, bool by_rows = false) {
  const ClosedShape c = closed_shape<LC>(p);
  const int64_t L = c.L, di = p.di, ci = p.ci;
  const bool acc = p.accumulate;
#ifdef EQUIPROJ_AVX2
  const __m256 cg8 = _mm256_set1_ps(static_cast<float>(cg2)), dc8 = _mm256_set1_ps(static_cast<float>(cp2 - cg2));
  __m256 e8 = _mm256_setzero_ps();
  int n8 = 0;
#endif
  V4 e4 = zero4();
  acc_t e1 = 0;
  for (int64_t a = a0; a < a1; ++a)
    for (int64_t t = 0; t < c.nseg; ++t) {
      const ClosedSegment sg = closed_segment(c.dihedral, L, a, t);
      const acc_t* M = work + sg.array * 2 * L;
      const X* xs = x[a] + t * L;
      X* gs = g ? g[a] + t * L : nullptr;
      for (int64_t v = 0; v < ci; ++v) {
        X* gv = gs ? gs + v * di : nullptr;
        const X* pf = !gv ? nullptr : by_rows && a + 1 < a1 ? g[a + 1] + t * L + v * di : gv + kPrefetch;
#ifdef EQUIPROJ_AVX2
        if constexpr (kSplitMeans<X>) {
          const float* hi = reinterpret_cast<const float*>(M + v * c.tile_span) + sg.offset;
          closed_residual_run_f32(reinterpret_cast<const float*>(xs + v * di), reinterpret_cast<float*>(gv), hi,
                                  hi + 2 * L, L, cg8, dc8, acc, e8, n8, e1, reinterpret_cast<const float*>(pf));
          continue;
        }
#endif
        orbit_residual_run(xs + v * di, gv, pf, M + v * c.tile_span + sg.offset, L, cp2, cg2, acc, e4, e1);
      }
    }
#ifdef EQUIPROJ_AVX2
  flush_f32(e8, n8, e1);
#endif
  ep += hsum(e4) + e1;
}

// A row block of more than kClosedBlockBytes of W whose tiles fit in L2 (at most kClosedChunkBytes
// each) runs them in chunks of copies of about kClosedChunkBytes, each chunk's two passes one after
// the other, so that pass 2 finds the chunk's rows in L2: the 8 MB row block of 1 MB D256 tiles
// (512 rows of 4096 columns) left the cache between its passes, and W was read twice from memory
// (3.4-3.5x the floor, 2.4-2.7x in chunks; measured). A chunk's rows end after a tile row (2 KiB for
// D256), so its passes prefetch the same entries of the rows ahead instead of kPrefetch entries ahead in
// the row, which lay in the next chunk's columns (D256: 2.1x -> 1.6x, one and two threads). Other blocks
// run whole, their rows long streams for the prefetchers: chunks of 256 KB slowed the 1-4 MB blocks of
// C64, C256 and D64, and one 4 MB C1024 tile per chunk slowed C1024 (2.2-2.4x to 2.8x).
constexpr int64_t kClosedBlockBytes = int64_t(4) << 20;
constexpr int64_t kClosedChunkBytes = int64_t(1) << 20;

template <typename X, int LC>
void orbit_closed_tiles(const Pair& p, int64_t dout, const X* const* x, X* const* g, acc_t cp2, acc_t cg2, acc_t* work,
                        acc_t& ep, acc_t& eg) {
  const int64_t per_copy = dout * p.di * int64_t(sizeof(X));
  const int64_t chunk = std::max<int64_t>(1, kClosedChunkBytes / per_copy);
  const auto run = [&](const Pair& q, const X* const* xq, X* const* gq, bool by_rows) {
    const int64_t n = q.ci * closed_shape<LC>(q).tile_span;
    for (int64_t k = 0; k < n; ++k) work[k] = 0;
    closed_sums<X, LC>(q, 0, dout, xq, work, by_rows);
    closed_prepare<X>(q, work, eg);
    closed_residuals<X, LC>(q, 0, dout, xq, gq, cp2, cg2, work, ep, by_rows);
  };
  if (per_copy * p.ci <= kClosedBlockBytes || per_copy > kClosedChunkBytes || chunk >= p.ci) {
    run(p, x, g, false);
    return;
  }
  std::vector<const X*> xs(dout);
  std::vector<X*> gs(g ? dout : 0);
  for (int64_t v0 = 0; v0 < p.ci; v0 += chunk) {
    Pair q = p;
    q.ci = std::min(chunk, p.ci - v0);
    for (int64_t a = 0; a < dout; ++a) {
      xs[a] = x[a] + v0 * p.di;
      if (g) gs[a] = g[a] + v0 * p.di;
    }
    run(q, xs.data(), g ? gs.data() : nullptr, true);
  }
}

#ifdef EQUIPROJ_AVX2

// ---- tiles of 4, 8 or 16 columns, float32 weights: one pass, deviations from the tile's first row ---
// Each orbit of a regular pair meets every row of a tile once, and row 0 holds orbit k in column k
// (o(0, b) = b for both forms). So a tile is handled while it is in registers or L1, W read from
// memory once: D_a = T_a - T_0[o(a, .)] (the deviation of each entry from its orbit's entry in row
// 0), md_k = mean over the rows of D on orbit k, R_a = D_a - md[o(a, .)], R_0 = -md, mean
// m_k = T_0[k] + md_k. All of it in float32, and still exact to float32 rounding relative to the
// tile's residual: a float32 difference is rounded relative to itself, |D| <= 2 max|R|, so D, md and
// R carry errors of a few units of max|R|, never of |W| (a nearly equivariant weight keeps its
// digits with no float64 and no split mean). The tile size d is a power of two, so 1 / d is exact.
// A group of 8 NC columns is processed at once: two 4x4 tiles side by side (C_4, D_2), or one tile
// of 8 (C_8, D_4) or 16 (D_8) columns. Every 8-column chunk c of a group row a takes its orbits from
// one block of 8 consecutive orbits of the group (8 sb + idx[l], idx a permutation): the pivot is
// row 0's chunk sb permuted by idx, and the deviations are added to the block's sums permuted by
// idx^-1. C_16 rows do not map chunks to blocks: rotations below.
// A group's rows are d_in x 4 bytes apart, a multiple of 4 KiB for the usual widths, so they all fall
// in one set of the 8-way L1: each row is read once (W, and the gradient before any of it is
// written) into small local copies that the second half of the group reads instead. No software
// prefetch: with d up to 16 row streams it measured no faster than the hardware prefetchers.

// the orbit of entry (a, b) of a C_N (N = di) or D_N (N = di / 2) tile, docs/math.md §9
inline int64_t closed_orbit(bool dihedral, int64_t di, int64_t a, int64_t b) {
  if (!dihedral) return ((b - a) % di + di) % di;
  const int64_t N = di / 2, ka = a % N, kb = b % N, t = b / N;
  return a < N ? (kb - ka + N) % N + N * t : (ka - kb + N) % N + N * (1 - t);
}

struct ChunkOrbits {
  int64_t block;
  __m256i idx, inv;
};

// Chunk c of row a of a group (8 columns: two 4-column tiles, numbered 4 q + orbit, or one 8-column
// chunk of a tile); false when its orbits are not a permutation of one block (C_16).
inline bool chunk_orbits(bool dihedral, int64_t di, int64_t a, int64_t c, ChunkOrbits& out) {
  alignas(32) int32_t idx[8], inv[8];
  const auto orbit = [&](int64_t b) { return b / di * di + closed_orbit(dihedral, di, a, b % di); };
  const int64_t block = orbit(8 * c) / 8;
  int seen = 0;
  for (int l = 0; l < 8; ++l) {
    const int64_t o = orbit(8 * c + l);
    if (o / 8 != block || (seen >> (o % 8)) & 1) return false;
    seen |= 1 << (o % 8);
    idx[l] = static_cast<int32_t>(o % 8);
    inv[o % 8] = l;
  }
  out.block = block;
  out.idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(idx));
  out.inv = _mm256_load_si256(reinterpret_cast<const __m256i*>(inv));
  return true;
}

// float32 lane sums of E_perp (two chains) and of the squared means, flushed into float64
struct PivotSums {
  __m256 ep0, ep1, mm;
  int vectors;
  acc_t ep, m2;
  static acc_t lanes(__m256 v) {
    const __m256d s =
        _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    return hsum(V4{s});
  }
  void flush() {
    ep += lanes(_mm256_add_ps(ep0, ep1));
    m2 += lanes(mm);
    ep0 = ep1 = mm = _mm256_setzero_ps();
    vectors = 0;
  }
};

// One group of R rows x 8 NC columns at column o. g may alias x: the group's W and gradient entries
// are all read (into registers or the local copies) before any is written.
template <int R, int NC>
inline void pivot_group(const float* const* x, float* const* g, int64_t o, const ChunkOrbits (*orb)[NC],
                        __m256 cg, __m256 dc, __m256 inv, bool acc, PivotSums& s) {
  alignas(32) float dev[R][8 * NC], xs[R][8 * NC], gs[R][8 * NC];
  __m256 t0[NC], sum[NC];
  for (int c = 0; c < NC; ++c) {
    t0[c] = _mm256_loadu_ps(x[0] + o + 8 * c);
    sum[c] = _mm256_setzero_ps();
  }
  if (g && acc)
    for (int a = 0; a < R; ++a)
      for (int c = 0; c < NC; ++c) _mm256_store_ps(gs[a] + 8 * c, _mm256_loadu_ps(g[a] + o + 8 * c));
  for (int a = 1; a < R; ++a)
    for (int c = 0; c < NC; ++c) {
      const ChunkOrbits& co = orb[a][c];
      const __m256 t = _mm256_loadu_ps(x[a] + o + 8 * c);
      const __m256 d = _mm256_sub_ps(t, _mm256_permutevar8x32_ps(t0[co.block], co.idx));
      _mm256_store_ps(dev[a] + 8 * c, d);
      _mm256_store_ps(xs[a] + 8 * c, t);
      sum[co.block] = _mm256_add_ps(sum[co.block], _mm256_permutevar8x32_ps(d, co.inv));
    }
  __m256 md[NC];
  for (int c = 0; c < NC; ++c) {
    md[c] = _mm256_mul_ps(sum[c], inv);
    const __m256 m = _mm256_add_ps(t0[c], md[c]);
    s.mm = _mm256_fmadd_ps(m, m, s.mm);
    s.ep0 = _mm256_fmadd_ps(md[c], md[c], s.ep0);  // row 0: R = -md
    if (g) {
      const __m256 base = acc ? _mm256_fmadd_ps(cg, t0[c], _mm256_load_ps(gs[0] + 8 * c)) : _mm256_mul_ps(cg, t0[c]);
      _mm256_storeu_ps(g[0] + o + 8 * c, _mm256_fnmadd_ps(dc, md[c], base));
    }
  }
  for (int a = 1; a < R; ++a)
    for (int c = 0; c < NC; ++c) {
      const ChunkOrbits& co = orb[a][c];
      const __m256 r = _mm256_sub_ps(_mm256_load_ps(dev[a] + 8 * c), _mm256_permutevar8x32_ps(md[co.block], co.idx));
      if (a & 1)
        s.ep1 = _mm256_fmadd_ps(r, r, s.ep1);
      else
        s.ep0 = _mm256_fmadd_ps(r, r, s.ep0);
      if (g) {
        const __m256 t = _mm256_load_ps(xs[a] + 8 * c);
        const __m256 base = acc ? _mm256_fmadd_ps(cg, t, _mm256_load_ps(gs[a] + 8 * c)) : _mm256_mul_ps(cg, t);
        _mm256_storeu_ps(g[a] + o + 8 * c, _mm256_fmadd_ps(dc, r, base));
      }
    }
  if ((s.vectors += R * NC) >= kFlushVectors) s.flush();
}

template <int R, int NC>
void pivot_tiles_f32(const Pair& p, const float* const* x, float* const* g, acc_t cp2, acc_t cg2,
                     const ChunkOrbits (*orb)[NC], acc_t& ep, acc_t& eg) {
  constexpr int64_t kGroup = 8 * NC;
  const int64_t span = p.ci * p.di, whole = span - span % kGroup;
  const __m256 cg = _mm256_set1_ps(static_cast<float>(cg2)), dc = _mm256_set1_ps(static_cast<float>(cp2 - cg2));
  const __m256 inv = _mm256_set1_ps(static_cast<float>(p.inv_size));
  const bool acc = p.accumulate;
  PivotSums s{_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), 0, 0, 0};
  for (int64_t o = 0; o < whole; o += kGroup)
    pivot_group<R, NC>(x, g, o, orb, cg, dc, inv, acc, s);
  if (whole < span) {  // one 4x4 tile left (odd copies of a 4-dimensional field): padded with a zero tile
    const int64_t rest = span - whole;
    alignas(32) float xt[R][kGroup] = {}, gt[R][kGroup] = {};
    const float* xp[R];
    float* gp[R];
    for (int a = 0; a < R; ++a) {
      for (int64_t j = 0; j < rest; ++j) {
        xt[a][j] = x[a][whole + j];
        if (g && acc) gt[a][j] = g[a][whole + j];
      }
      xp[a] = xt[a];
      gp[a] = gt[a];
    }
    pivot_group<R, NC>(xp, g ? gp : nullptr, 0, orb, cg, dc, inv, acc, s);
    if (g)
      for (int a = 0; a < R; ++a)
        for (int64_t j = 0; j < rest; ++j) g[a][whole + j] = gt[a][j];
  }
  s.flush();
  ep += s.ep;
  eg += s.m2 * acc_t(R);  // each orbit has R entries in its tile
}

// ---- C_16 tiles, float32 weights: the same one pass, with rotations --------------------------------
// Row a of a C_N tile holds orbit (b - a) mod N in column b, row 0 rotated by a, and its chunks span
// two blocks of orbits (no permutes). The pivot of row a is one unaligned load from a doubled copy of
// row 0 (x0d[N - a + b]); the deviations D_a are stored twice in a row, so that orbit k of row a,
// D_a[(k + a) mod N], is one unaligned load at a + k; the means are doubled the same way for the
// residuals (md[(b - a) mod N] = mdd[N - a + b]). The loads from the doubled copies come a row after
// the stores that filled them. Local copies: 5 N^2 floats (5 KiB). C_32 measured slower this way than
// with the doubled arrays (its 32 rows and their gradient rows crowd the L2 sets), C_64 would not fit L1.
template <int N>
inline void rotation_tile(const float* const* x, float* const* g, int64_t o, __m256 cg, __m256 dc, __m256 inv,
                          bool acc, PivotSums& s) {
  constexpr int NC = N / 8;
  alignas(32) float x0d[2 * N], mdd[2 * N], dd[N][2 * N], xs[N][N], gs[N][N];
  __m256 t0[NC], sum[NC], md[NC];
  for (int c = 0; c < NC; ++c) {
    t0[c] = _mm256_loadu_ps(x[0] + o + 8 * c);
    _mm256_store_ps(x0d + 8 * c, t0[c]);
    _mm256_store_ps(x0d + N + 8 * c, t0[c]);
    sum[c] = _mm256_setzero_ps();
  }
  if (g && acc)
    for (int a = 0; a < N; ++a)
      for (int c = 0; c < NC; ++c) _mm256_store_ps(gs[a] + 8 * c, _mm256_loadu_ps(g[a] + o + 8 * c));
  for (int a = 1; a < N; ++a)
    for (int c = 0; c < NC; ++c) {
      const __m256 t = _mm256_loadu_ps(x[a] + o + 8 * c);
      const __m256 d = _mm256_sub_ps(t, _mm256_loadu_ps(x0d + N - a + 8 * c));
      _mm256_store_ps(dd[a] + 8 * c, d);
      _mm256_store_ps(dd[a] + N + 8 * c, d);
      _mm256_store_ps(xs[a] + 8 * c, t);
    }
  for (int a = 1; a < N; ++a)
    for (int c = 0; c < NC; ++c) sum[c] = _mm256_add_ps(sum[c], _mm256_loadu_ps(dd[a] + a + 8 * c));
  for (int c = 0; c < NC; ++c) {
    md[c] = _mm256_mul_ps(sum[c], inv);
    _mm256_store_ps(mdd + 8 * c, md[c]);
    _mm256_store_ps(mdd + N + 8 * c, md[c]);
    const __m256 m = _mm256_add_ps(t0[c], md[c]);
    s.mm = _mm256_fmadd_ps(m, m, s.mm);
    s.ep0 = _mm256_fmadd_ps(md[c], md[c], s.ep0);  // row 0: R = -md
    if (g) {
      const __m256 base = acc ? _mm256_fmadd_ps(cg, t0[c], _mm256_load_ps(gs[0] + 8 * c)) : _mm256_mul_ps(cg, t0[c]);
      _mm256_storeu_ps(g[0] + o + 8 * c, _mm256_fnmadd_ps(dc, md[c], base));
    }
  }
  for (int a = 1; a < N; ++a) {
    for (int c = 0; c < NC; ++c) {
      const __m256 r = _mm256_sub_ps(_mm256_load_ps(dd[a] + 8 * c), _mm256_loadu_ps(mdd + N - a + 8 * c));
      if (c & 1)
        s.ep1 = _mm256_fmadd_ps(r, r, s.ep1);
      else
        s.ep0 = _mm256_fmadd_ps(r, r, s.ep0);
      if (g) {
        const __m256 t = _mm256_load_ps(xs[a] + 8 * c);
        const __m256 base = acc ? _mm256_fmadd_ps(cg, t, _mm256_load_ps(gs[a] + 8 * c)) : _mm256_mul_ps(cg, t);
        _mm256_storeu_ps(g[a] + o + 8 * c, _mm256_fmadd_ps(dc, r, base));
      }
    }
    if ((s.vectors += NC) >= kFlushVectors) s.flush();
  }
}

template <int N>
void rotation_tiles_f32(const Pair& p, const float* const* x, float* const* g, acc_t cp2, acc_t cg2, acc_t& ep,
                        acc_t& eg) {
  const __m256 cg = _mm256_set1_ps(static_cast<float>(cg2)), dc = _mm256_set1_ps(static_cast<float>(cp2 - cg2));
  const __m256 inv = _mm256_set1_ps(static_cast<float>(p.inv_size));
  PivotSums s{_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), 0, 0, 0};
  for (int64_t v = 0; v < p.ci; ++v) rotation_tile<N>(x, g, v * N, cg, dc, inv, p.accumulate, s);
  s.flush();
  ep += s.ep;
  eg += s.m2 * acc_t(N);
}

template <int R, int NC>
inline bool try_pivot_tiles_f32(const Pair& p, const float* const* x, float* const* g, acc_t cp2, acc_t cg2,
                                acc_t& ep, acc_t& eg) {
  ChunkOrbits orb[R][NC];
  for (int a = 0; a < R; ++a)
    for (int c = 0; c < NC; ++c)
      if (!chunk_orbits(p.form == kOrbitDihedral, p.di, a, c, orb[a][c])) return false;
  pivot_tiles_f32<R, NC>(p, x, g, cp2, cg2, orb, ep, eg);
  return true;
}

// false when the pair is neither a 4-, 8- or 16-column closed form whose chunks map to blocks nor C_16
inline bool orbit_pivot_tiles_f32(const Pair& p, int64_t dout, const float* const* x, float* const* g, acc_t cp2,
                                  acc_t cg2, acc_t& ep, acc_t& eg) {
  if (dout != p.di) return false;
  switch (p.di) {
    case 4: return try_pivot_tiles_f32<4, 1>(p, x, g, cp2, cg2, ep, eg);
    case 8: return try_pivot_tiles_f32<8, 1>(p, x, g, cp2, cg2, ep, eg);
    case 16:
      if (try_pivot_tiles_f32<16, 2>(p, x, g, cp2, cg2, ep, eg)) return true;
      if (p.form != kOrbitCyclic) return false;
      rotation_tiles_f32<16>(p, x, g, cp2, cg2, ep, eg);
      return true;
    default: return false;
  }
}

#endif

// work: orbit_closed_scratch (plan_types.h) float64 entries.
template <typename X>
void orbit_closed_pair(const Pair& p, int64_t dout, const X* const* x, X* const* g, acc_t cp2, acc_t cg2, acc_t* work,
                       acc_t& ep, acc_t& eg) {
#ifdef EQUIPROJ_AVX2
  if constexpr (sizeof(X) == sizeof(float))
    if (orbit_pivot_tiles_f32(p, dout, x, g, cp2, cg2, ep, eg)) return;
#endif
  switch (p.form == kOrbitDihedral ? p.di / 2 : p.di) {
    case 4: orbit_closed_tiles<X, 4>(p, dout, x, g, cp2, cg2, work, ep, eg); return;
    case 8: orbit_closed_tiles<X, 8>(p, dout, x, g, cp2, cg2, work, ep, eg); return;
    case 16: orbit_closed_tiles<X, 16>(p, dout, x, g, cp2, cg2, work, ep, eg); return;
    default: orbit_closed_tiles<X, 0>(p, dout, x, g, cp2, cg2, work, ep, eg); return;
  }
}

// ---- one large pair split into row chunks (fused_energies.cpp runs the chunks in parallel) --------
// Pass 1 of each chunk into its own zeroed scratch, the chunks' scratch added in chunk order into
// the first, closed_prepare, then pass 2 of each chunk: the same sums in an order that does not
// depend on the thread count. The chunks run the doubled-array kernel (large tiles only).

template <typename X>
void closed_chunk_sums(const Pair& p, int64_t a0, int64_t a1, const X* const* x, acc_t* work) {
  closed_sums<X, 0>(p, a0, a1, x, work);
}

template <typename X>
void closed_chunk_residuals(const Pair& p, int64_t a0, int64_t a1, const X* const* x, X* const* g, acc_t cp2, acc_t cg2,
                            const acc_t* work, acc_t& ep) {
  closed_residuals<X, 0>(p, a0, a1, x, g, cp2, cg2, work, ep);
}

ClosedChunkKernels<float> closed_chunk_kernels_float() {
  return {&closed_chunk_sums<float>, &closed_prepare<float>, &closed_chunk_residuals<float>};
}

ClosedChunkKernels<double> closed_chunk_kernels_double() {
  return {&closed_chunk_sums<double>, &closed_prepare<double>, &closed_chunk_residuals<double>};
}
