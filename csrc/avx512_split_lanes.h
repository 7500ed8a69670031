// The float32 lanes that the AVX-512 orbit kernels (orbit_products.cpp, orbit_tables.cpp) share: the gradient
// from a split mean, as the eight-lane pass of orbit_table_kernels.h forms it (split_grad8), and the float32
// squares widened into float64 lanes. Included inside an EQUIPROJ_AVX512_BEGIN region (avx512_region.h) and
// the kernel's own namespace: no include guard, no includes (like transpose8.h).

// What a pass writes: nothing (the energies only), the gradient, or the gradient added to g (which may be
// the weight itself).
enum class Mode { kNone, kWrite, kAdd };

// 2 lambda_perp, 2 lambda_G, and their difference (it multiplies m_lo only), in every lane.
struct SplitCoefs {
  __m512 cp, cg, cgp;
  SplitCoefs(double cp2, double cg2)
      : cp(_mm512_set1_ps(static_cast<float>(cp2))),
        cg(_mm512_set1_ps(static_cast<float>(cg2))),
        cgp(_mm512_set1_ps(static_cast<float>(cg2 - cp2))) {}
};

// The gradient cp R + cg P(T) = cp D + cg m_hi + (cg - cp) m_lo, D = T - m_hi, plus old (the gradient it is
// added to, or zero): the two large terms meet in one FMA, so that where they cancel the result keeps its
// own precision. Adding a zero old turns a -0 sum into +0, as the eight-lane pass does, whose bits the
// AVX-512 kernels keep.
inline __m512 split_gradient(__m512 d, __m512 hi, __m512 lo, __m512 old, const SplitCoefs& c) {
  return _mm512_fmadd_ps(c.cp, d, _mm512_add_ps(_mm512_fmadd_ps(c.cg, hi, _mm512_mul_ps(c.cgp, lo)), old));
}

// The low and the high eight float32 lanes of v in float64, and the two added.
inline __m512d low_pd(__m512 v) { return _mm512_cvtps_pd(_mm512_castps512_ps256(v)); }
inline __m512d high_pd(__m512 v) {
  return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
inline __m512d widened(__m512 v) { return _mm512_add_pd(low_pd(v), high_pd(v)); }
