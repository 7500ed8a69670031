// The trace form (r = 1, A = +-I/sqrt(D): two copies of one irrep of real type, D = 2..5) for float32
// rows read in place, AVX2. Included by tile_kernels.h after orbit_table_kernels.h (split_grad8,
// GradMode), inside the AVX2 namespace only; the same rules hold (no include guard, no includes).
//
// The equivariant part of a D x D tile is its mean diagonal entry m = tr T / D on the diagonal. The
// row block runs in chunks of columns, in two passes:
//   A. for every column p of the chunk, sum_a x[a][p + a] (D shifted loads, float64 lanes): the
//      trace of the tile that starts at p. It is kept where p starts a tile and zeroed elsewhere,
//      and stored as the mean split m = hi + lo (two float32 buffers, as split_mean does);
//   B. every row a, eight float32 lanes at a time, reads the buffers at p = j - a: the mean of the
//      tile whose diagonal entry is j (then p starts that tile), zero for every other entry. So the
//      residual R = (T - hi) - lo, its squares (in float64: a square below float32's normal range
//      keeps its digits) and the gradient (split_grad8: cancellation-safe) need no mask and no
//      gather; the old kernel took the diagonal four tiles at a time through scalar loads and
//      stores, more instructions than the whole rest of the row.
// Pass B re-reads the chunk from L1 (D rows of kTraceChunk floats: at most 19 KiB). The columns past
// the last whole group of 8 D (whose shifted loads would leave the row) run through identity_pair.

#ifdef EQUIPROJ_AVX2

constexpr int64_t kTraceChunk = 960;  // columns per chunk: a multiple of 8 D for D = 2..5

template <int D, GradMode Mode>
void trace_pair_f32(const float* const* x, float* const* g, int64_t ci, acc_t cp2, acc_t cg2, acc_t& ep,
                    acc_t& eg) {
  static_assert(D >= 2 && D <= 5, "the trace form of fields up to five dimensions");
  const int64_t span = ci * D;
  // whole groups of 8 D columns whose last shifted load (column p + D - 1 + 3, p = nv - 4) stays in the row
  const int64_t nv = span >= D - 1 ? (span - (D - 1)) / (8 * D) * (8 * D) : 0;
  alignas(32) float hi[8 + kTraceChunk], lo[8 + kTraceChunk];  // column p of the chunk at 8 + p - c0
  for (int q = 0; q < 8; ++q) hi[q] = lo[q] = 0.f;           // row a reads 8 - a.. for its first a entries
  __m256d starts[D];  // lanes of the i-th vector of a group of D (4 D columns) that start a tile
  for (int i = 0; i < D; ++i)
    starts[i] = _mm256_castsi256_pd(_mm256_setr_epi64x((4 * i) % D == 0 ? -1 : 0, (4 * i + 1) % D == 0 ? -1 : 0,
                                                       (4 * i + 2) % D == 0 ? -1 : 0, (4 * i + 3) % D == 0 ? -1 : 0));
  const __m256d inv = _mm256_set1_pd(acc_t(1) / D);
  const SplitCoefs c{_mm256_set1_ps(static_cast<float>(cp2)), _mm256_set1_ps(static_cast<float>(cg2)),
                     _mm256_set1_ps(static_cast<float>(cg2 - cp2))};
  __m256d eg4 = _mm256_setzero_pd(), ep_lo = _mm256_setzero_pd(), ep_hi = _mm256_setzero_pd();
  acc_t e1 = 0;
  for (int64_t c0 = 0; c0 < nv; c0 += kTraceChunk) {
    const int64_t c1 = c0 + kTraceChunk < nv ? c0 + kTraceChunk : nv;
    for (int64_t p = c0; p < c1; p += 4 * D) {
      for (int a = 0; a < D; ++a) {  // the rows ahead, and the chunk's gradient rows for pass B
        prefetch(x[a] + p + kPrefetch);
        if constexpr (Mode == GradMode::kAdd) prefetch(g[a] + p);
      }
#pragma GCC unroll 5
      for (int i = 0; i < D; ++i) {
        const int64_t q = p + 4 * i;
        __m256d s = _mm256_cvtps_pd(_mm_loadu_ps(x[0] + q));
        for (int a = 1; a < D; ++a) s = _mm256_add_pd(s, _mm256_cvtps_pd(_mm_loadu_ps(x[a] + q + a)));
        s = _mm256_and_pd(s, starts[i]);
        const __m256d m = _mm256_mul_pd(s, inv);
        eg4 = _mm256_fmadd_pd(s, m, eg4);
        const __m128 h = _mm256_cvtpd_ps(m);
        _mm_store_ps(hi + 8 + (q - c0), h);
        _mm_store_ps(lo + 8 + (q - c0), _mm256_cvtpd_ps(_mm256_sub_pd(m, _mm256_cvtps_pd(h))));
      }
    }
    for (int a = 0; a < D; ++a) {
      const float* xa = x[a];
      float* ga = Mode == GradMode::kNone ? nullptr : g[a];
      const float* ha = hi + 8 - a - c0;
      const float* la = lo + 8 - a - c0;
      for (int64_t j = c0; j < c1; j += 8) {  // R = (T - hi) - lo, its squares in float64
        const __m256 t = _mm256_loadu_ps(xa + j), hi8 = _mm256_loadu_ps(ha + j), lo8 = _mm256_loadu_ps(la + j);
        const __m256 d = _mm256_sub_ps(t, hi8), r = _mm256_sub_ps(d, lo8);
        add_squares8(r, ep_lo, ep_hi);
        if constexpr (Mode != GradMode::kNone)
          _mm256_storeu_ps(ga + j, split_grad8(d, hi8, lo8, Mode == GradMode::kAdd ? _mm256_loadu_ps(ga + j)
                                                                                 : _mm256_setzero_ps(), c));
      }
    }
  }
  e1 += hsum(V4{_mm256_add_pd(ep_lo, ep_hi)});
  acc_t sg = hsum(V4{eg4});
  if (nv < span) {  // the last tiles (all of a row of fewer than 9 D - 1 columns): the gather kernel, in float64
    const float* xt[D];
    float* gt[D];
    for (int a = 0; a < D; ++a) {
      xt[a] = x[a] + nv;
      gt[a] = Mode == GradMode::kNone ? nullptr : g[a] + nv;
    }
    identity_pair<D, float>(xt, Mode == GradMode::kNone ? nullptr : gt, (span - nv) / D, cp2, cg2, e1, sg,
                            Mode == GradMode::kAdd);
  }
  ep += e1;
  eg += sg;
}

template <int D>
void trace_pair_f32(const float* const* x, float* const* g, int64_t ci, acc_t cp2, acc_t cg2, acc_t& ep, acc_t& eg,
                    bool add) {
  if (!g)
    trace_pair_f32<D, GradMode::kNone>(x, g, ci, cp2, cg2, ep, eg);
  else if (add)
    trace_pair_f32<D, GradMode::kAdd>(x, g, ci, cp2, cg2, ep, eg);
  else
    trace_pair_f32<D, GradMode::kWrite>(x, g, ci, cp2, cg2, ep, eg);
}

#endif
