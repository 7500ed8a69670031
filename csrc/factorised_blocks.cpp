// The factorised projection onto a steerable kernel space, one pass over the weight block by block
// (docs/math.md §6, equiproj/kernel_spaces/_factorised.py).
//
// A block is the tile of the weight between copy u of an output field (rows oo + u d_out .. + d_out) and
// copy v of an input field (columns oi + v d_in .. + d_in), all its P pixels: d_out d_in P weights. The
// factorised projection of a block is
//
//   a[b, j, :]  = K[b, j, :] Phi                  pixels -> band (D coefficients per row)
//   y[b', j, :] = sum_b Q[b, b'] a[b, j, :]       the output field to its irreps (Q^T a)
//   c_s = U_s y_s,  y'_s = U_s^T c_s              per output irrep slot s: the whitened equivariant maps,
//                                                 the input field's change of basis folded into them
//   h[b, j, :]  = sum_b' Q[b, b'] y'[b', j, :]    back from the irreps (Q y')
//   PK[b, j, :] = h[b, j, :] Phi^T                band -> pixels
//
// and in the same pass the residual R = K - PK: E_perp = ||R||^2 and E_G = sum_s ||c_s||^2 per batch item
// (float64 sums of the blocks, in block order), and the penalty's gradient 2 lambda_perp R + 2 lambda_G PK
// written into out or added to it (out may be K itself: every block is read before it is written). Each
// block is read once and carried through in a few KB of scratch; the blocks run in parallel.
//
// Rows and columns are addressed through index tables (structured order -> the weight's order), so fields
// stored in any order need no copy; the tables are checked to be permutations, so that no two blocks write
// the same entries. The float32 kernels use AVX2+FMA where the CPU has them; float64 and other CPUs run
// the plain loops.

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#define EQUIPROJ_BLOCKS_X86 1
#include <immintrin.h>
#endif

namespace equiproj_cpu {
namespace {

using at::Tensor;

// The geometry of one pair of field segments and the tables of one call (pointers into contiguous tensors).
struct Blocks {
  int64_t m, n, P, D, Dp, Pp;         // weight [B, m, n, P]; band D (padded Dp, Pp: multiples of 8)
  int64_t oo, co, dout, oi, ci, din;  // output segment: offset, copies, field dim; the same for the input
  const int64_t* rows;                // [m]: structured row -> the weight's row
  const int64_t* cols;                // [n]: structured column -> the weight's column
  const void* phi;                    // [P, Dp]: Phi, columns zero-padded
  const void* phit;                   // [D, Pp]: Phi^T, columns zero-padded
  const void* q;                      // [dout, dout] or nullptr (identity)
};

// The equivariant maps of one pair of field segments, per output irrep slot s (rows ob_s .. ob_s + db_s of the
// output field): U_s [r_s, L_s] (L_s = db_s d_in D: the slot's part of a block's band coefficients, rotated
// into the output field's irreps) with rows padded to Lp_s (a multiple of 8), and U_s^T [L_s, rp_s] with rows
// padded to rp_s; both zero-padded, packed slot after slot.
struct Slots {
  int64_t count;
  const int64_t* table;  // [count, 3]: ob, db, r
  const void* maps;      // U_s, packed
  const void* maps_t;    // U_s^T, packed
};

inline int64_t round8(int64_t x) { return (x + 7) / 8 * 8; }

// The first element of row (b, j) of block (item, u, v) in the weight.
inline int64_t row_offset(const Blocks& G, int64_t item, int64_t u, int64_t v, int64_t b, int64_t j) {
  return ((item * G.m + G.rows[G.oo + u * G.dout + b]) * G.n + G.cols[G.oi + v * G.din + j]) * G.P;
}

// off[b d_in + j] = row_offset(b, j) for every row of the block (no division in the row loops).
inline void row_offsets(const Blocks& G, int64_t item, int64_t u, int64_t v, int64_t* off) {
  for (int64_t b = 0; b < G.dout; ++b) {
    const int64_t base = (item * G.m + G.rows[G.oo + u * G.dout + b]) * G.n;
    for (int64_t j = 0; j < G.din; ++j) off[b * G.din + j] = (base + G.cols[G.oi + v * G.din + j]) * G.P;
  }
}

// ---- plain loops (float64, and float32 without AVX2) ---------------------------------------------------
namespace plain {

// a[r, 0 .. Dp) = K row r times Phi for the block's d_out d_in rows; then y = Q^T a (D entries per row).
template <typename C>
void to_band_block(const Blocks& G, const C* K, int64_t item, int64_t u, int64_t v, C* a, C* y) {
  const C* phi = static_cast<const C*>(G.phi);
  const C* q = static_cast<const C*>(G.q);
  const int64_t Dp = G.Dp, D = G.D;
  for (int64_t b = 0; b < G.dout; ++b)
    for (int64_t j = 0; j < G.din; ++j) {
      const C* k = K + row_offset(G, item, u, v, b, j);
      C* ar = a + (b * G.din + j) * Dp;
      for (int64_t d = 0; d < Dp; ++d) ar[d] = 0;
      for (int64_t p = 0; p < G.P; ++p)
        for (int64_t d = 0; d < Dp; ++d) ar[d] += k[p] * phi[p * Dp + d];
    }
  for (int64_t bp = 0; bp < G.dout; ++bp)
    for (int64_t j = 0; j < G.din; ++j) {
      C* yr = y + (bp * G.din + j) * D;
      if (q == nullptr) {
        for (int64_t d = 0; d < D; ++d) yr[d] = a[(bp * G.din + j) * Dp + d];
        continue;
      }
      for (int64_t d = 0; d < D; ++d) yr[d] = 0;
      for (int64_t b = 0; b < G.dout; ++b) {
        const C w = q[b * G.dout + bp];
        const C* ar = a + (b * G.din + j) * Dp;
        for (int64_t d = 0; d < D; ++d) yr[d] += w * ar[d];
      }
    }
}

// y' = sum_s U_s^T U_s y on each slot's part of the block's band coefficients (zero on rows of no slot);
// returns ||c||^2 = sum_s ||U_s y||^2 (E_G of the block).
template <typename C>
double maps_block(const Blocks& G, const Slots& S, const C* y, C* yp, C* c) {
  const int64_t R = G.dout * G.din, D = G.D;
  for (int64_t i = 0; i < R * D; ++i) yp[i] = 0;
  const C* U = static_cast<const C*>(S.maps);
  double e = 0;
  for (int64_t s = 0; s < S.count; ++s) {
    const int64_t ob = S.table[3 * s], db = S.table[3 * s + 1], r = S.table[3 * s + 2];
    const int64_t L = db * G.din * D, Lp = round8(L), base = ob * G.din * D;
    for (int64_t t = 0; t < r; ++t) {
      C ct = 0;
      for (int64_t k = 0; k < L; ++k) ct += U[t * Lp + k] * y[base + k];
      c[t] = ct;
      e += double(ct) * double(ct);
    }
    for (int64_t k = 0; k < L; ++k) {
      C v = 0;
      for (int64_t t = 0; t < r; ++t) v += U[t * Lp + k] * c[t];
      yp[base + k] = v;
    }
    U += r * Lp;
  }
  return e;
}

// h = Q y' (or zero without y'), PK = h Phi^T, R = K - PK row by row: returns ||R||^2 and writes/adds
// cp2 R + cg2 PK to out.
template <typename C>
double from_band_block(const Blocks& G, const C* K, const C* y, C* out, int write, C cp2, C cg2, int64_t item,
                       int64_t u, int64_t v, C* h, C* pk) {
  const C* phit = static_cast<const C*>(G.phit);
  const C* q = static_cast<const C*>(G.q);
  const int64_t D = G.D, P = G.P, Pp = G.Pp;
  double e = 0;
  for (int64_t b = 0; b < G.dout; ++b)
    for (int64_t j = 0; j < G.din; ++j) {
      C* hr = h + (b * G.din + j) * D;
      for (int64_t d = 0; d < D; ++d) hr[d] = 0;
      if (y == nullptr) continue;
      if (q == nullptr) {
        for (int64_t d = 0; d < D; ++d) hr[d] = y[(b * G.din + j) * D + d];
        continue;
      }
      for (int64_t bp = 0; bp < G.dout; ++bp) {
        const C w = q[b * G.dout + bp];
        const C* yr = y + (bp * G.din + j) * D;
        for (int64_t d = 0; d < D; ++d) hr[d] += w * yr[d];
      }
    }
  for (int64_t b = 0; b < G.dout; ++b)
    for (int64_t j = 0; j < G.din; ++j) {
      const C* hr = h + (b * G.din + j) * D;
      for (int64_t p = 0; p < Pp; ++p) pk[p] = 0;
      if (y != nullptr)
        for (int64_t d = 0; d < D; ++d)
          for (int64_t p = 0; p < Pp; ++p) pk[p] += hr[d] * phit[d * Pp + p];
      const int64_t off = row_offset(G, item, u, v, b, j);
      const C* k = K + off;
      C* o = out ? out + off : nullptr;
      double er = 0;
      for (int64_t p = 0; p < P; ++p) {
        const C r = k[p] - pk[p];
        er += double(r) * double(r);
        if (write == 1)
          o[p] = cp2 * r + cg2 * pk[p];
        else if (write == 2)
          o[p] = o[p] + (cp2 * r + cg2 * pk[p]);
      }
      e += er;
    }
  return e;
}

}  // namespace plain

#ifdef EQUIPROJ_BLOCKS_X86
// ---- float32, AVX2+FMA ---------------------------------------------------------------------------------
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

namespace avx2 {

// RB rows of the block at once (independent accumulator chains): a[r, 0 .. 8 NV) = sum_p k_r[p] Phi[p, :].
template <int RB, int NV>
inline void rows_to_band(const float* const* k, int64_t P, const float* phi, float* a) {
  __m256 acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int w = 0; w < NV; ++w) acc[r][w] = _mm256_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m256 f[NV];
    for (int w = 0; w < NV; ++w) f[w] = _mm256_loadu_ps(phi + p * 8 * NV + 8 * w);
    for (int r = 0; r < RB; ++r) {
      const __m256 kp = _mm256_broadcast_ss(k[r] + p);
      for (int w = 0; w < NV; ++w) acc[r][w] = _mm256_fmadd_ps(kp, f[w], acc[r][w]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int w = 0; w < NV; ++w) _mm256_storeu_ps(a + r * 8 * NV + 8 * w, acc[r][w]);
}

template <int NV>
void to_band_rows(const Blocks& G, const float* K, const int64_t* off, float* a) {
  constexpr int RB = NV <= 2 ? 4 : 2;
  const int64_t R = G.dout * G.din;
  const float* k[RB];
  int64_t r = 0;
  for (; r + RB <= R; r += RB) {
    for (int i = 0; i < RB; ++i) k[i] = K + off[r + i];
    rows_to_band<RB, NV>(k, G.P, static_cast<const float*>(G.phi), a + r * 8 * NV);
  }
  for (; r < R; ++r) {
    k[0] = K + off[r];
    rows_to_band<1, NV>(k, G.P, static_cast<const float*>(G.phi), a + r * 8 * NV);
  }
}

// dst[b, j, :] = sum_c Q[b qr + c qc] src[c, j, :] on rows of 8 NV lanes, JB rows j at once (JB NV
// independent accumulator chains of length d_out).
template <int JB, int NV>
inline void rotate_rows_jb(const float* q, int64_t qr, int64_t qc, const float* src, float* dst, int64_t dout,
                           int64_t din, int64_t b, int64_t j) {
  __m256 acc[JB][NV];
  for (int i = 0; i < JB; ++i)
    for (int w = 0; w < NV; ++w) acc[i][w] = _mm256_setzero_ps();
  for (int64_t c = 0; c < dout; ++c) {
    const __m256 qv = _mm256_broadcast_ss(q + b * qr + c * qc);
    const float* sr = src + (c * din + j) * 8 * NV;
    for (int i = 0; i < JB; ++i)
      for (int w = 0; w < NV; ++w) acc[i][w] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(sr + i * 8 * NV + 8 * w), acc[i][w]);
  }
  float* dr = dst + (b * din + j) * 8 * NV;
  for (int i = 0; i < JB; ++i)
    for (int w = 0; w < NV; ++w) _mm256_storeu_ps(dr + i * 8 * NV + 8 * w, acc[i][w]);
}

template <int NV>
void rotate_rows_nv(const float* q, int64_t qr, int64_t qc, const float* src, float* dst, int64_t dout, int64_t din) {
  constexpr int JB = NV <= 2 ? 4 : 2;
  for (int64_t b = 0; b < dout; ++b) {
    int64_t j = 0;
    for (; j + JB <= din; j += JB) rotate_rows_jb<JB, NV>(q, qr, qc, src, dst, dout, din, b, j);
    for (; j < din; ++j) rotate_rows_jb<1, NV>(q, qr, qc, src, dst, dout, din, b, j);
  }
}

// dst = Q src (qr = d_out, qc = 1) or Q^T src (qr = 1, qc = d_out) on the rows (c, j) of a block, 8 NV lanes each.
inline void rotate_rows(const float* q, int64_t qr, int64_t qc, const float* src, float* dst, int64_t dout, int64_t din,
                        int64_t NV) {
  switch (NV) {
    case 1: rotate_rows_nv<1>(q, qr, qc, src, dst, dout, din); break;
    case 2: rotate_rows_nv<2>(q, qr, qc, src, dst, dout, din); break;
    case 3: rotate_rows_nv<3>(q, qr, qc, src, dst, dout, din); break;
    default: rotate_rows_nv<4>(q, qr, qc, src, dst, dout, din); break;
  }
}

// y[b', j, 0 .. D) = sum_b Q[b, b'] a[b, j, :] (a padded to Dp lanes, y not padded; rot: a block of scratch).
void rotate_to_y(const Blocks& G, const float* a, float* y, float* rot) {
  const float* q = static_cast<const float*>(G.q);
  const int64_t R = G.dout * G.din, D = G.D, Dp = G.Dp;
  const float* src = a;
  if (q != nullptr) {
    rotate_rows(q, 1, G.dout, a, rot, G.dout, G.din, Dp / 8);
    src = rot;
  }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d = 0; d < D; ++d) y[r * D + d] = src[r * Dp + d];
}

void to_band_block(const Blocks& G, const float* K, const int64_t* off, float* a, float* y, float* row) {
  switch (G.Dp / 8) {
    case 1: to_band_rows<1>(G, K, off, a); break;
    case 2: to_band_rows<2>(G, K, off, a); break;
    case 3: to_band_rows<3>(G, K, off, a); break;
    default: to_band_rows<4>(G, K, off, a); break;
  }
  rotate_to_y(G, a, y, row);
}

// pk[0 .. 8 NV) = sum_d h[d] Phi^T[d, p0 + :] for RB rows at once.
template <int RB, int NV>
inline void band_to_rows(const float* const* h, int64_t D, const float* phit, int64_t Pp, int64_t p0, float* pk) {
  __m256 acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int w = 0; w < NV; ++w) acc[r][w] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m256 f[NV];
    for (int w = 0; w < NV; ++w) f[w] = _mm256_loadu_ps(phit + d * Pp + p0 + 8 * w);
    for (int r = 0; r < RB; ++r) {
      const __m256 hd = _mm256_broadcast_ss(h[r] + d);
      for (int w = 0; w < NV; ++w) acc[r][w] = _mm256_fmadd_ps(hd, f[w], acc[r][w]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int w = 0; w < NV; ++w) _mm256_storeu_ps(pk + r * Pp + p0 + 8 * w, acc[r][w]);
}

// The squares of K - PK of one row added to e0, e1 in float64 lanes (the last P mod 8 entries, in scalars, to
// tail: squares of residuals below 1e-19 are subnormal in float32), and the gradient written or added. No
// masked store: they are slow on some CPUs.
inline void residual_row(const float* k, const float* pk, float* o, int64_t P, int write, __m256 cp2, __m256 cg2,
                         __m256d& e0, __m256d& e1, double& tail) {
  int64_t p = 0;
  for (; p + 8 <= P; p += 8) {
    const __m256 pv = _mm256_loadu_ps(pk + p);
    const __m256 r = _mm256_sub_ps(_mm256_loadu_ps(k + p), pv);
    const __m256d r0 = _mm256_cvtps_pd(_mm256_castps256_ps128(r)), r1 = _mm256_cvtps_pd(_mm256_extractf128_ps(r, 1));
    e0 = _mm256_fmadd_pd(r0, r0, e0);
    e1 = _mm256_fmadd_pd(r1, r1, e1);
    if (write) {
      __m256 g = _mm256_fmadd_ps(cp2, r, _mm256_mul_ps(cg2, pv));
      if (write == 2) g = _mm256_add_ps(_mm256_loadu_ps(o + p), g);
      _mm256_storeu_ps(o + p, g);
    }
  }
  if (p < P) {
    alignas(32) float c[16];
    _mm256_store_ps(c, cp2);
    _mm256_store_ps(c + 8, cg2);
    for (; p < P; ++p) {
      const float r = k[p] - pk[p];
      tail += double(r) * double(r);
      if (write == 1)
        o[p] = std::fma(c[0], r, c[8] * pk[p]);
      else if (write == 2)
        o[p] = o[p] + std::fma(c[0], r, c[8] * pk[p]);
    }
  }
}

template <int RB>
void rows_from_band(const Blocks& G, const float* const* h, float* pk) {
  const float* phit = static_cast<const float*>(G.phit);
  int64_t p0 = 0;
  for (; p0 + 32 <= G.Pp; p0 += 32) band_to_rows<RB, 4>(h, G.D, phit, G.Pp, p0, pk);
  switch ((G.Pp - p0) / 8) {
    case 1: band_to_rows<RB, 1>(h, G.D, phit, G.Pp, p0, pk); break;
    case 2: band_to_rows<RB, 2>(h, G.D, phit, G.Pp, p0, pk); break;
    case 3: band_to_rows<RB, 3>(h, G.D, phit, G.Pp, p0, pk); break;
    default: break;
  }
}

// c[0 .. 8 NV) = sum_k y[k] U^T[k, :] (rows of U^T rs apart; two chains per vector: even and odd k).
template <int NV>
inline void slot_coefficients(const float* y, const float* ut, int64_t rs, int64_t L, float* c) {
  __m256 a0[NV], a1[NV];
  for (int w = 0; w < NV; ++w) a0[w] = a1[w] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 2 <= L; k += 2) {
    const __m256 y0 = _mm256_broadcast_ss(y + k), y1 = _mm256_broadcast_ss(y + k + 1);
    for (int w = 0; w < NV; ++w) {
      a0[w] = _mm256_fmadd_ps(y0, _mm256_loadu_ps(ut + k * rs + 8 * w), a0[w]);
      a1[w] = _mm256_fmadd_ps(y1, _mm256_loadu_ps(ut + (k + 1) * rs + 8 * w), a1[w]);
    }
  }
  if (k < L) {
    const __m256 y0 = _mm256_broadcast_ss(y + k);
    for (int w = 0; w < NV; ++w) a0[w] = _mm256_fmadd_ps(y0, _mm256_loadu_ps(ut + k * rs + 8 * w), a0[w]);
  }
  for (int w = 0; w < NV; ++w) _mm256_storeu_ps(c + 8 * w, _mm256_add_ps(a0[w], a1[w]));
}

// out[8 w .. 8 w + 8 WB) = sum_t c[t] U[t, 8 w ..] for WB vectors of the slot's coefficients at once.
template <int WB>
inline void slot_expand(const float* c, int64_t r, const float* u, int64_t Lp, float* out) {
  __m256 acc[WB];
  for (int w = 0; w < WB; ++w) acc[w] = _mm256_setzero_ps();
  for (int64_t t = 0; t < r; ++t) {
    const __m256 ct = _mm256_broadcast_ss(c + t);
    for (int w = 0; w < WB; ++w) acc[w] = _mm256_fmadd_ps(ct, _mm256_loadu_ps(u + t * Lp + 8 * w), acc[w]);
  }
  for (int w = 0; w < WB; ++w) _mm256_storeu_ps(out + 8 * w, acc[w]);
}

// As plain::maps_block; y and yp hold R D entries and 8 more of scratch (a vector may run past a slot's end:
// yp is written slot by slot in order, past the end only into what a later slot or the padding overwrites,
// and U's padding makes those lanes zero).
double maps_block(const Blocks& G, const Slots& S, const float* y, float* yp, float* c) {
  const int64_t R = G.dout * G.din, D = G.D;
  std::fill(yp, yp + R * D + 8, 0.0f);
  const float* U = static_cast<const float*>(S.maps);
  const float* UT = static_cast<const float*>(S.maps_t);
  double e = 0;
  for (int64_t s = 0; s < S.count; ++s) {
    const int64_t ob = S.table[3 * s], db = S.table[3 * s + 1], r = S.table[3 * s + 2];
    const int64_t L = db * G.din * D, Lp = round8(L), rp = round8(r), base = ob * G.din * D;
    int64_t w = 0;
    for (; w + 4 <= rp / 8; w += 4) slot_coefficients<4>(y + base, UT + 8 * w, rp, L, c + 8 * w);
    switch (rp / 8 - w) {
      case 1: slot_coefficients<1>(y + base, UT + 8 * w, rp, L, c + 8 * w); break;
      case 2: slot_coefficients<2>(y + base, UT + 8 * w, rp, L, c + 8 * w); break;
      case 3: slot_coefficients<3>(y + base, UT + 8 * w, rp, L, c + 8 * w); break;
      default: break;
    }
    for (int64_t t = 0; t < r; ++t) e += double(c[t]) * double(c[t]);
    int64_t v = 0;
    for (; v + 4 <= Lp / 8; v += 4) slot_expand<4>(c, r, U + 8 * v, Lp, yp + base + 8 * v);
    switch (Lp / 8 - v) {
      case 1: slot_expand<1>(c, r, U + 8 * v, Lp, yp + base + 8 * v); break;
      case 2: slot_expand<2>(c, r, U + 8 * v, Lp, yp + base + 8 * v); break;
      case 3: slot_expand<3>(c, r, U + 8 * v, Lp, yp + base + 8 * v); break;
      default: break;
    }
    U += r * Lp;
    UT += L * rp;
  }
  return e;
}

double from_band_block(const Blocks& G, const float* K, const float* y, float* out, int write, float cp2,
                       float cg2, const int64_t* off, float* h, float* yp, float* pk) {
  const float* q = static_cast<const float*>(G.q);
  const int64_t D = G.D, Dp = G.Dp, R = G.dout * G.din, NV = Dp / 8;
  if (y != nullptr) {
    // h = Q y' on rows padded to Dp lanes (y' copied into the zero-padded yp first)
    const float* src = y;
    if (D != Dp || q != nullptr) {
      for (int64_t r = 0; r < R; ++r) {
        std::copy(y + r * D, y + (r + 1) * D, yp + r * Dp);
        std::fill(yp + r * Dp + D, yp + (r + 1) * Dp, 0.0f);
      }
      src = yp;
    }
    if (q == nullptr)
      std::copy(src, src + R * Dp, h);
    else
      rotate_rows(q, G.dout, 1, src, h, G.dout, G.din, NV);
  }
  const __m256 c2p = _mm256_set1_ps(cp2), c2g = _mm256_set1_ps(cg2);
  __m256d e0 = _mm256_setzero_pd(), e1 = _mm256_setzero_pd();
  double tail = 0;
  if (y == nullptr) std::fill(pk, pk + 2 * G.Pp, 0.0f);
  const float* hs[2];
  for (int64_t r = 0; r < R; r += 2) {
    const int rb = r + 1 < R ? 2 : 1;
    hs[0] = h + r * Dp;
    hs[1] = h + (r + rb - 1) * Dp;
    if (y != nullptr) {
      if (rb == 2)
        rows_from_band<2>(G, hs, pk);
      else
        rows_from_band<1>(G, hs, pk);
    }
    for (int i = 0; i < rb; ++i) {
      residual_row(K + off[r + i], pk + i * G.Pp, out ? out + off[r + i] : nullptr, G.P, write, c2p, c2g, e0, e1,
                   tail);
    }
  }
  alignas(32) double t[4];
  _mm256_store_pd(t, _mm256_add_pd(e0, e1));
  return (t[0] + t[1]) + (t[2] + t[3]) + tail;
}

}  // namespace avx2

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

bool blocks_have_avx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
#else
bool blocks_have_avx2() { return false; }
#endif

Blocks geometry(const Tensor& K, const Tensor& rows, const Tensor& cols, const Tensor& phi, const Tensor& phit,
                const Tensor& q, int64_t oo, int64_t co, int64_t dout, int64_t oi, int64_t ci, int64_t din,
                const char* op) {
  TORCH_CHECK(K.device().is_cpu() && K.dim() == 4 && K.is_contiguous() &&
                  (K.scalar_type() == at::kFloat || K.scalar_type() == at::kDouble),
              op, ": K must be a contiguous float32 or float64 CPU tensor [B, m, n, P]");
  const int64_t m = K.size(1), n = K.size(2), P = K.size(3);
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.numel() == m &&
                  cols.scalar_type() == at::kLong && cols.is_contiguous() && cols.numel() == n,
              op, ": rows [m] and cols [n] must be contiguous int64 index tables");
  for (const Tensor* t : {&rows, &cols, &phi, &phit, &q})
    TORCH_CHECK(t->device().is_cpu(), op, ": the tables must be CPU tensors, like K");
  TORCH_CHECK(phi.dim() == 2 && phi.size(0) == P && phi.is_contiguous() && phit.dim() == 2 && phit.size(0) >= 1 &&
                  phi.size(1) == (phit.size(0) + 7) / 8 * 8 && phit.size(1) == (P + 7) / 8 * 8 &&
                  phit.is_contiguous() && phi.scalar_type() == K.scalar_type() &&
                  phit.scalar_type() == K.scalar_type(),
              op, ": phi [P, Dp] and phiT [D, Pp] in K's dtype, contiguous, D >= 1; Dp and Pp: D and P rounded up to "
              "multiples of 8");
  TORCH_CHECK(phi.size(1) <= 32, op, ": at most 32 band coefficients (padded) per pixel row");
  TORCH_CHECK(co >= 0 && ci >= 0 && dout > 0 && din > 0 && oo >= 0 && oi >= 0 && oo + co * dout <= m &&
                  oi + ci * din <= n,
              op, ": the field segments lie outside the weight");
  TORCH_CHECK(q.numel() == 0 || (q.dim() == 2 && q.size(0) == dout && q.size(1) == dout && q.is_contiguous() &&
                                 q.scalar_type() == K.scalar_type()),
              op, ": q must be empty or a contiguous [d_out, d_out] matrix in K's dtype");
  const int64_t* rr = rows.data_ptr<int64_t>();
  const int64_t* cc = cols.data_ptr<int64_t>();
  // each a permutation: a repeated row or column would have two blocks (two threads) write the same entries
  for (const auto& [idx, len, what] : {std::tuple{rr, m, "row"}, std::tuple{cc, n, "column"}}) {
    std::vector<char> seen(len, 0);
    for (int64_t i = 0; i < len; ++i) {
      TORCH_CHECK(idx[i] >= 0 && idx[i] < len, op, ": ", what, " index out of range");
      TORCH_CHECK(!seen[idx[i]], op, ": ", what, " index ", idx[i], " appears twice (the tables must be permutations)");
      seen[idx[i]] = 1;
    }
  }
  return Blocks{m, n, P, phit.size(0), phi.size(1), phit.size(1), oo, co, dout, oi, ci, din, rr, cc,
                phi.data_ptr(), phit.data_ptr(), q.numel() ? q.data_ptr() : nullptr};
}

Slots slot_tables(const Blocks& G, const Tensor& K, const Tensor& slots, const Tensor& maps, const Tensor& maps_t) {
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.dim() == 2 && slots.size(1) == 3,
              "factorised_pass: slots must be a contiguous [S, 3] int64 table (ob, db, r)");
  const int64_t* t = slots.data_ptr<int64_t>();
  int64_t u = 0, ut = 0, end = 0;
  for (int64_t s = 0; s < slots.size(0); ++s) {
    const int64_t ob = t[3 * s], db = t[3 * s + 1], r = t[3 * s + 2];
    TORCH_CHECK(ob >= end && db > 0 && ob + db <= G.dout && r > 0, "factorised_pass: the slots must lie in the "
                "output field, in increasing order, without overlap");
    end = ob + db;
    const int64_t L = db * G.din * G.D;
    u += r * round8(L);
    ut += L * round8(r);
  }
  TORCH_CHECK(slots.device().is_cpu() && maps.device().is_cpu() && maps_t.device().is_cpu(),
              "factorised_pass: slots, maps and maps_t must be CPU tensors, like K");
  TORCH_CHECK(maps.is_contiguous() && maps_t.is_contiguous() && maps.scalar_type() == K.scalar_type() &&
                  maps_t.scalar_type() == K.scalar_type() && maps.numel() == u && maps_t.numel() == ut,
              "factorised_pass: maps and maps_t must hold the slots' padded U and U^T, contiguous, in K's dtype");
  return Slots{slots.size(0), t, maps.data_ptr(), maps_t.data_ptr()};
}

// factorised_pass(K [B, m, n, P], rows [m], cols [n], phi [P, Dp], phiT [D, Pp], q [d_out, d_out] or empty,
//                 oo, co, d_out, oi, ci, d_in, slots [S, 3], maps, maps_t, lambda_perp [B] f64, lambda_G [B] f64,
//                 out or None, write, plain) -> (E_perp [B] f64, E_G [B] f64)
//   Per block: y = Q^T (K Phi), y' = sum_s U_s^T U_s y, PK = (Q y') Phi^T, R = K - PK; ||R||^2 and ||U y||^2
//   summed per batch item (in block order: the same on any number of threads); out written (write = 1) or added
//   to (write = 2) with 2 lambda_perp R + 2 lambda_G PK (out may be K). No slots: P K = 0. plain: the plain
//   loops also for float32 (the tests compare both).
std::tuple<Tensor, Tensor> factorised_pass(const Tensor& K, const Tensor& rows, const Tensor& cols, const Tensor& phi,
                                           const Tensor& phit, const Tensor& q, int64_t oo, int64_t co, int64_t dout,
                                           int64_t oi, int64_t ci, int64_t din, const Tensor& slots,
                                           const Tensor& maps, const Tensor& maps_t, const Tensor& lambda_perp,
                                           const Tensor& lambda_G, const std::optional<Tensor>& out, int64_t write,
                                           bool plain) {
  const Blocks G = geometry(K, rows, cols, phi, phit, q, oo, co, dout, oi, ci, din, "factorised_pass");
  const Slots S = slot_tables(G, K, slots, maps, maps_t);
  const int64_t B = K.size(0), items = B * co * ci, R = dout * din;
  TORCH_CHECK(write >= 0 && write <= 2, "factorised_pass: write is 0, 1 or 2");
  TORCH_CHECK(lambda_perp.numel() == B && lambda_G.numel() == B && lambda_perp.scalar_type() == at::kDouble &&
                  lambda_G.scalar_type() == at::kDouble,
              "factorised_pass: one float64 lambda per batch item");
  if (write) {
    TORCH_CHECK(out.has_value() && out->device().is_cpu() && out->sizes() == K.sizes() &&
                    out->scalar_type() == K.scalar_type() && out->is_contiguous(),
                "factorised_pass: out must be a contiguous CPU tensor of K's shape and dtype");
    // out may be K itself (the step in place: each block is read before it is written), not part of it
    TORCH_CHECK(out->data_ptr() == K.data_ptr() || at::get_overlap_status(*out, K) == at::MemOverlapStatus::No,
                "factorised_pass: out must be K itself or not overlap it");
  }
  Tensor lp = lambda_perp.contiguous(), lg = lambda_G.contiguous();
  const double* lpp = lp.data_ptr<double>();
  const double* lgp = lg.data_ptr<double>();
  Tensor ep_items = at::zeros({items}, K.options().dtype(at::kDouble));
  Tensor eg_items = at::zeros({items}, K.options().dtype(at::kDouble));
  double* ep = ep_items.data_ptr<double>();
  double* eg = eg_items.data_ptr<double>();
  int64_t rmax = 8;
  for (int64_t s = 0; s < S.count; ++s) rmax = std::max(rmax, round8(S.table[3 * s + 2]));
  const bool f64 = K.scalar_type() == at::kDouble;
  const bool lanes = !f64 && !plain && blocks_have_avx2();
  const bool mapped = S.count > 0;
  at::parallel_for(0, items, 16, [&](int64_t begin, int64_t end) {
    // a (and its rotation), y and y' (compact, 8 spare), h and y' padded, pk (two rows), c: in doubles
    std::vector<double> scratch(4 * R * G.Dp + 2 * (R * G.D + 8) + 2 * G.Pp + rmax + 16);
    std::vector<int64_t> off(R);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t item = it / (co * ci), u = (it / ci) % co, v = it % ci;
      const double cp2 = 2 * lpp[item], cg2 = 2 * lgp[item];
      if (f64) {
        double* a = scratch.data();
        double* y = a + R * G.Dp;
        double* yp = y + R * G.D + 8;
        double* h = yp + R * G.D + 8;
        double* pk = h + R * G.Dp;
        double* c = pk + 2 * G.Pp;
        if (mapped) {
          plain::to_band_block<double>(G, K.data_ptr<double>(), item, u, v, a, y);
          eg[it] = plain::maps_block<double>(G, S, y, yp, c);
        }
        ep[it] = plain::from_band_block<double>(G, K.data_ptr<double>(), mapped ? yp : nullptr,
                                                write ? out->data_ptr<double>() : nullptr, int(write), cp2, cg2,
                                                item, u, v, h, pk);
        continue;
      }
      float* a = reinterpret_cast<float*>(scratch.data());  // 2 R Dp floats: a and its rotation
      float* y = a + 2 * R * G.Dp;
      float* yp = y + R * G.D + 8;
      float* h = yp + R * G.D + 8;  // R Dp, then R Dp for y' padded
      float* pk = h + 2 * R * G.Dp;
      float* c = pk + 2 * G.Pp;
      float* o = write ? out->data_ptr<float>() : nullptr;
#ifdef EQUIPROJ_BLOCKS_X86
      if (lanes) {
        row_offsets(G, item, u, v, off.data());
        if (mapped) {
          avx2::to_band_block(G, K.data_ptr<float>(), off.data(), a, y, a + R * G.Dp);
          eg[it] = avx2::maps_block(G, S, y, yp, c);
        }
        ep[it] = avx2::from_band_block(G, K.data_ptr<float>(), mapped ? yp : nullptr, o, int(write), float(cp2),
                                       float(cg2), off.data(), h, h + R * G.Dp, pk);
        continue;
      }
#endif
      if (mapped) {
        plain::to_band_block<float>(G, K.data_ptr<float>(), item, u, v, a, y);
        eg[it] = plain::maps_block<float>(G, S, y, yp, c);
      }
      ep[it] = plain::from_band_block<float>(G, K.data_ptr<float>(), mapped ? yp : nullptr, o, int(write),
                                             float(cp2), float(cg2), item, u, v, h, pk);
    }
  });
  (void)lanes;
  // partial sums in block order: independent of the thread count
  return {ep_items.view({B, co * ci}).sum(1), eg_items.view({B, co * ci}).sum(1)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(equiproj_cpu, m) {
  m.def("factorised_pass(Tensor K, Tensor rows, Tensor cols, Tensor phi, Tensor phiT, Tensor q, int oo, int co, "
        "int d_out, int oi, int ci, int d_in, Tensor slots, Tensor maps, Tensor maps_t, Tensor lambda_perp, "
        "Tensor lambda_G, Tensor(a!)? out, int write, bool plain) -> (Tensor, Tensor)",
        &factorised_pass);
}

}  // namespace equiproj_cpu
