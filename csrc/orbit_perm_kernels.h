// Orbit pairs stored by the group's permutations (plan_columns.h: kOrbitPoints): two permutation fields
// of any kind (a large point set), P(T)[a, b] = (1/|G|) sum_g T[sigma_g(a), sigma_g(b)], nothing of
// size d_out d_in stored. Included by tile_kernels.h before its dispatch (no include guard, includes
// nothing, like that file).
//
// The rows of a tile fall into the orbits of G on the output points. For an orbit with representative
// a0, pass 1 forms the mean row m[b] = (1/|G|) sum_g T[g a0, g b] (|G| rows gathered through sigma^in,
// the orbit's rows stay in cache), which is row a0 of P(T). Every other row a = h a0 of the orbit is
// P(T)[h a0, b] = m[h^-1 b] (P(T) is equivariant), so pass 2 reads m through the inverse permutation of
// h and forms the residual, E_perp and the gradient row by row; E_G = |orbit| ||m||^2. The means are in
// float64 and every entry is read before it is written, so g may alias x (the decoupled step), and
// nearly equivariant weights keep their digits (the residual form).
//
// The host (fused_energies.cpp, build_groups) writes the pair's int32 data at p.orbit, with p.factor = |G|:
//   [0] R, the number of row orbits; then sigma^in [|G|, d_in]; its inverses [|G|, d_in];
//   sigma^out [|G|, d_out]; the start of each row orbit in the row list [R + 1]; the row list [d_out]
//   (each orbit's representative first); the element h with h a0 = a of each listed row [d_out].
// A call processes the row orbits [p.orbit_begin, p.orbit_end) (p.orbit_end < 0: all of them), so that
// the host can run the orbits of one large row block in parallel.

struct PointTables {
  int64_t R;
  const int32_t *sig_in, *sig_in_inv, *sig_out, *start, *rows, *elem;
};

inline PointTables point_tables(const Pair& p, int64_t dout) {
  const int64_t ng = p.factor, di = p.di;
  PointTables t;
  t.R = p.orbit[0];
  t.sig_in = p.orbit + 1;
  t.sig_in_inv = t.sig_in + ng * di;
  t.sig_out = t.sig_in_inv + ng * di;
  t.start = t.sig_out + ng * dout;
  t.rows = t.start + t.R + 1;
  t.elem = t.rows + dout;
  return t;
}

// int32 entries of the data of a kOrbitPoints pair with R row orbits
inline int64_t point_tables_size(int64_t ng, int64_t dout, int64_t din, int64_t R) {
  return 1 + ng * (2 * din + dout) + R + 1 + 2 * dout;
}

#ifdef EQUIPROJ_AVX2
// Eight entries base[idx[0..7]] by scalar loads: faster than vgatherdps on the CPUs measured (AMD EPYC),
// and it keeps the compiler from vectorising the plain loops into gathers.
inline __m256 gather8(const float* base, const int32_t* idx) {
  return _mm256_setr_ps(base[idx[0]], base[idx[1]], base[idx[2]], base[idx[3]], base[idx[4]], base[idx[5]],
                        base[idx[6]], base[idx[7]]);
}

// Pass 1 on a float row: eight gathered entries per step, added to the float64 sums.
inline void points_sums_f32(const float* xr, const int32_t* s, int64_t di, acc_t* m) {
  int64_t b = 0;
  for (; b + 8 <= di; b += 8) {
    const __m256 v = gather8(xr, s + b);
    _mm256_storeu_pd(m + b, _mm256_add_pd(_mm256_loadu_pd(m + b), _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
    _mm256_storeu_pd(m + b + 4, _mm256_add_pd(_mm256_loadu_pd(m + b + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
  }
  for (; b < di; ++b) m[b] += acc_t(xr[s[b]]);
}

// Pass 2 on the whole vectors of a float row: each entry's mean by one scalar load of the float64 mean
// row (half the loads of a float32 split m_hi + m_lo), the residual, r^2 and the gradient in float64,
// the gradient rounded to float once. Returns the entries done (a multiple of 8). pf: nf rows of the
// next pass 1 (d_in entries each), prefetched alongside.
template <GradMode Mode>
inline int64_t points_residuals_f32(const float* xa, float* ga, const int32_t* hinv, const acc_t* m, int64_t di,
                                    acc_t cp2, acc_t cg2, __m256d& e0, __m256d& e1, const float* const* pf, int nf) {
  const __m256d vcg = _mm256_set1_pd(cg2), vdc = _mm256_set1_pd(cp2 - cg2);
  int64_t b = 0;
  for (; b + 8 <= di; b += 8) {
    if ((b & 15) == 0)
      for (int f = 0; f < nf; ++f) _mm_prefetch(reinterpret_cast<const char*>(pf[f] + b), _MM_HINT_T0);
    const int32_t* h = hinv + b;
    const __m256 t = _mm256_loadu_ps(xa + b);
    const __m256d tl = _mm256_cvtps_pd(_mm256_castps256_ps128(t)), th = _mm256_cvtps_pd(_mm256_extractf128_ps(t, 1));
    const __m256d rl = _mm256_sub_pd(tl, _mm256_setr_pd(m[h[0]], m[h[1]], m[h[2]], m[h[3]]));
    const __m256d rh = _mm256_sub_pd(th, _mm256_setr_pd(m[h[4]], m[h[5]], m[h[6]], m[h[7]]));
    e0 = _mm256_fmadd_pd(rl, rl, e0);
    e1 = _mm256_fmadd_pd(rh, rh, e1);
    if constexpr (Mode != GradMode::kNone) {
      const __m128 vl = _mm256_cvtpd_ps(_mm256_fmadd_pd(vcg, tl, _mm256_mul_pd(vdc, rl)));
      const __m128 vh = _mm256_cvtpd_ps(_mm256_fmadd_pd(vcg, th, _mm256_mul_pd(vdc, rh)));
      __m256 v = _mm256_set_m128(vh, vl);
      if constexpr (Mode == GradMode::kAdd) v = _mm256_add_ps(_mm256_loadu_ps(ga + b), v);
      _mm256_storeu_ps(ga + b, v);
    }
  }
  return b;
}
#endif

// m: d_in scratch entries (the mean row of one orbit and tile).
template <typename X>
void points_orbit_pair(const Pair& p, int64_t dout, const X* const* x, X* const* g, acc_t cp2, acc_t cg2, acc_t* m,
                       acc_t& ep, acc_t& eg) {
  const PointTables t = point_tables(p, dout);
  const int64_t ng = p.factor, di = p.di, ci = p.ci;
  const int64_t o0 = p.orbit_begin, o1 = p.orbit_end < 0 ? t.R : p.orbit_end;
  const acc_t inv_ng = acc_t(1) / acc_t(ng);
  const bool add = p.accumulate;
  acc_t sp[4] = {0, 0, 0, 0}, sg = 0;
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t r0 = t.start[o], r1 = t.start[o + 1];
    const int64_t a0 = t.rows[r0];
    for (int64_t v = 0; v < ci; ++v) {
      const int64_t col = v * di;
      // pass 1: m[b] = (1/|G|) sum_g T[g a0, g b]
      for (int64_t b = 0; b < di; ++b) m[b] = 0;
      for (int64_t e = 0; e < ng; ++e) {
        const X* xr = x[t.sig_out[e * dout + a0]] + col;
        const int32_t* s = t.sig_in + e * di;
#ifdef EQUIPROJ_AVX2
        if constexpr (sizeof(X) == 4) {
          points_sums_f32(reinterpret_cast<const float*>(xr), s, di, m);
          continue;
        }
#endif
        for (int64_t b = 0; b < di; ++b) m[b] += acc_t(xr[s[b]]);
      }
      acc_t mm = 0;
      for (int64_t b = 0; b < di; ++b) {
        m[b] *= inv_ng;
        mm += m[b] * m[b];
      }
      sg += acc_t(r1 - r0) * mm;

#ifdef EQUIPROJ_AVX2
      // the rows pass 1 gathers next (the next tile of the orbit, or the next orbit's first), prefetched
      // during pass 2: they are |G| rows in any order, which the prefetchers do not foresee
      const int64_t on = v + 1 < ci ? o : o + 1, an = on < o1 ? t.rows[t.start[on]] : -1;
      const int64_t coln = v + 1 < ci ? col + di : 0;
#endif
      // pass 2: row a = h a0 of the orbit, P(T)[a, b] = m[h^-1 b]
      for (int64_t q = r0; q < r1; ++q) {
        const int64_t a = t.rows[q];
        const int32_t* hinv = t.sig_in_inv + int64_t(t.elem[q]) * di;
        const X* xa = x[a] + col;
        X* ga = g ? g[a] + col : nullptr;
        int64_t b = 0;
#ifdef EQUIPROJ_AVX2
        if constexpr (sizeof(X) == 4) {
          const float* xf = reinterpret_cast<const float*>(xa);
          float* gf = reinterpret_cast<float*>(ga);
          __m256d e0 = _mm256_setzero_pd(), e1 = _mm256_setzero_pd();
          const float* pf[9];  // the next gather rows e = q - r0, q - r0 + (r1 - r0), ... (at most eight)
          int nf = 0;
          for (int64_t e = q - r0; an >= 0 && e < ng && nf < 8; e += r1 - r0)
            pf[nf++] = reinterpret_cast<const float*>(x[t.sig_out[e * dout + an]] + coln);
          if (ga && q + 1 < r1) pf[nf++] = reinterpret_cast<const float*>(g[t.rows[q + 1]] + col);
          if (!ga)
            b = points_residuals_f32<GradMode::kNone>(xf, gf, hinv, m, di, cp2, cg2, e0, e1, pf, nf);
          else if (add)
            b = points_residuals_f32<GradMode::kAdd>(xf, gf, hinv, m, di, cp2, cg2, e0, e1, pf, nf);
          else
            b = points_residuals_f32<GradMode::kWrite>(xf, gf, hinv, m, di, cp2, cg2, e0, e1, pf, nf);
          sp[1] += hsum(V4{_mm256_add_pd(e0, e1)});
        }
#endif
        for (; b + 4 <= di; b += 4)
          for (int l = 0; l < 4; ++l) {
            const acc_t tv = xa[b + l], r = tv - m[hinv[b + l]];
            sp[l] += r * r;
            if (ga) {
              const acc_t gv = cg2 * tv + (cp2 - cg2) * r;
              ga[b + l] = static_cast<X>(add ? acc_t(ga[b + l]) + gv : gv);
            }
          }
        for (; b < di; ++b) orbit_residual_one(xa + b, ga ? ga + b : nullptr, m[hinv[b]], cp2, cg2, add, sp[0]);
      }
    }
  }
  ep += (sp[0] + sp[1]) + (sp[2] + sp[3]);
  eg += sg;
}
