// V4: four float64 lanes, the vector type of tile_kernels.h. Included inside each ISA namespace
// of fused_energies.cpp (no include guard): AVX2+FMA intrinsics when EQUIPROJ_AVX2 is defined
// (the includer has switched the target on), plain arrays otherwise. Loads and stores convert
// from and to the weight's type (float or double).

#ifdef EQUIPROJ_AVX2

struct V4 {
  __m256d v;
};
inline V4 splat(double a) { return {_mm256_set1_pd(a)}; }
inline V4 make4(double a, double b, double c, double d) { return {_mm256_setr_pd(a, b, c, d)}; }
inline V4 load4(const double* p) { return {_mm256_loadu_pd(p)}; }
inline V4 load4(const float* p) { return {_mm256_cvtps_pd(_mm_loadu_ps(p))}; }
inline void store4(double* p, V4 a) { _mm256_storeu_pd(p, a.v); }
inline void store4(float* p, V4 a) { _mm_storeu_ps(p, _mm256_cvtpd_ps(a.v)); }
inline V4 operator+(V4 a, V4 b) { return {_mm256_add_pd(a.v, b.v)}; }
inline V4 operator-(V4 a, V4 b) { return {_mm256_sub_pd(a.v, b.v)}; }
inline V4 operator*(V4 a, V4 b) { return {_mm256_mul_pd(a.v, b.v)}; }
inline V4 fmadd(V4 a, V4 b, V4 c) { return {_mm256_fmadd_pd(a.v, b.v, c.v)}; }   // a b + c
inline V4 fnmadd(V4 a, V4 b, V4 c) { return {_mm256_fnmadd_pd(a.v, b.v, c.v)}; }  // c - a b
inline double hsum(V4 a) {
  alignas(32) double t[4];
  _mm256_store_pd(t, a.v);
  return (t[0] + t[1]) + (t[2] + t[3]);
}

#else

struct V4 {
  double v[4];
};
inline V4 splat(double a) { return {{a, a, a, a}}; }
inline V4 make4(double a, double b, double c, double d) { return {{a, b, c, d}}; }
template <typename X>
inline V4 load4(const X* p) {
  return {{double(p[0]), double(p[1]), double(p[2]), double(p[3])}};
}
template <typename X>
inline void store4(X* p, V4 a) {
  for (int q = 0; q < 4; ++q) p[q] = static_cast<X>(a.v[q]);
}
inline V4 operator+(V4 a, V4 b) { return {{a.v[0] + b.v[0], a.v[1] + b.v[1], a.v[2] + b.v[2], a.v[3] + b.v[3]}}; }
inline V4 operator-(V4 a, V4 b) { return {{a.v[0] - b.v[0], a.v[1] - b.v[1], a.v[2] - b.v[2], a.v[3] - b.v[3]}}; }
inline V4 operator*(V4 a, V4 b) { return {{a.v[0] * b.v[0], a.v[1] * b.v[1], a.v[2] * b.v[2], a.v[3] * b.v[3]}}; }
inline V4 fmadd(V4 a, V4 b, V4 c) { return a * b + c; }
inline V4 fnmadd(V4 a, V4 b, V4 c) { return c - a * b; }
inline double hsum(V4 a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }

#endif

inline V4 zero4() { return splat(0.0); }

// p[0], p[s], p[2s], p[3s]
template <typename X>
inline V4 gather4(const X* p, int64_t s) {
  return make4(double(p[0]), double(p[s]), double(p[2 * s]), double(p[3 * s]));
}

template <typename X>
inline void scatter4(X* p, int64_t s, V4 a) {
  alignas(32) double t[4];
  store4(t, a);
  p[0] = static_cast<X>(t[0]);
  p[s] = static_cast<X>(t[1]);
  p[2 * s] = static_cast<X>(t[2]);
  p[3 * s] = static_cast<X>(t[3]);
}
