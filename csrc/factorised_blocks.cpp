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

// Phi split by the grid's reflections (equiproj/kernel_spaces/_factorised.py, parity_split): the pixels orbit by
// orbit (orbits of 2^L pixels, largest first), and per parity class its slots (positions in that order), its
// band coefficients and Phi_c [slots, coefficients]. z = the Walsh-Hadamard transform of the weight on each
// orbit; a[d] = sum over d's class of z[slot] Phi_c[slot, d], and back the same transform of
// w[slot] = sum over the class of h[d] Phi_c[slot, d].
struct ParityClass {
  int64_t n, m;          // slots, band coefficients
  const int64_t* slots;  // [n]
  const int64_t* cols;   // [m]
  const float* phi;      // [n, m]
};

struct Parity {
  int64_t s = 0;               // reflections (0: no split)
  int64_t counts[4] = {};      // orbits of 2^L pixels, L = 0 .. s
  const int64_t* order = nullptr;  // [P]: slot -> pixel
  std::vector<ParityClass> classes;
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

// a[r] for the block's rows r0 .. R.
template <int NV>
void to_band_rows(const Blocks& G, const float* K, const int64_t* off, float* a, int64_t r0) {
  constexpr int RB = NV <= 2 ? 4 : 2;
  const int64_t R = G.dout * G.din;
  const float* k[RB];
  int64_t r = r0;
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

// dst[r, 0 .. D) = src[r, 0 .. D) for R rows Dp apart in src, D apart in dst, in whole vectors: a row's last
// vector runs into the next row, which overwrites it, and the last row's into dst's 8 spare floats.
inline void compact_rows(const float* src, int64_t Dp, int64_t D, int64_t R, float* dst) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t d0 = 0; d0 < Dp; d0 += 8) _mm256_storeu_ps(dst + r * D + d0, _mm256_loadu_ps(src + r * Dp + d0));
}

// dst[r, 0 .. Dp) = src[r, 0 .. D) and zeros, the reverse of compact_rows (src holds 8 spare floats).
inline void padded_rows(const float* src, int64_t D, int64_t Dp, int64_t R, float* dst) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 tail = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(int(D - (Dp - 8))), lane));
  for (int64_t r = 0; r < R; ++r) {
    int64_t d0 = 0;
    for (; d0 + 8 < Dp; d0 += 8) _mm256_storeu_ps(dst + r * Dp + d0, _mm256_loadu_ps(src + r * D + d0));
    _mm256_storeu_ps(dst + r * Dp + d0, _mm256_and_ps(tail, _mm256_loadu_ps(src + r * D + d0)));
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
  compact_rows(src, Dp, D, R, y);
}

void to_band_from(const Blocks& G, const float* K, const int64_t* off, float* a, int64_t r0) {
  switch (G.Dp / 8) {
    case 1: to_band_rows<1>(G, K, off, a, r0); break;
    case 2: to_band_rows<2>(G, K, off, a, r0); break;
    case 3: to_band_rows<3>(G, K, off, a, r0); break;
    default: to_band_rows<4>(G, K, off, a, r0); break;
  }
}

void to_band_block(const Blocks& G, const float* K, const int64_t* off, float* a, float* y, float* row) {
  to_band_from(G, K, off, a, 0);
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

// h = Q y' on rows padded to Dp lanes (y' copied into the zero-padded yp first).
void band_h(const Blocks& G, const float* y, float* h, float* yp) {
  const float* q = static_cast<const float*>(G.q);
  const int64_t D = G.D, Dp = G.Dp, R = G.dout * G.din;
  const float* src = y;
  if (D != Dp || q != nullptr) {
    padded_rows(y, D, Dp, R, yp);
    src = yp;
  }
  if (q == nullptr)
    std::copy(src, src + R * Dp, h);
  else
    rotate_rows(q, G.dout, 1, src, h, G.dout, G.din, Dp / 8);
}

// PK = h Phi^T (zero without mapped) and the residual's squares and gradient of the block's rows r0 .. R, two
// rows at a time.
void rows_residual(const Blocks& G, const float* K, const float* h, bool mapped, float* out, int write, __m256 c2p,
                   __m256 c2g, const int64_t* off, int64_t r0, float* pk, __m256d& e0, __m256d& e1, double& tail) {
  const int64_t R = G.dout * G.din, Dp = G.Dp;
  if (!mapped) std::fill(pk, pk + 2 * G.Pp, 0.0f);
  const float* hs[2];
  for (int64_t r = r0; r < R; r += 2) {
    const int rb = r + 1 < R ? 2 : 1;
    hs[0] = h + r * Dp;
    hs[1] = h + (r + rb - 1) * Dp;
    if (mapped) {
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
}

inline double sum_lanes(__m256d e0, __m256d e1) {
  alignas(32) double t[4];
  _mm256_store_pd(t, _mm256_add_pd(e0, e1));
  return (t[0] + t[1]) + (t[2] + t[3]);
}

double from_band_block(const Blocks& G, const float* K, const float* y, float* out, int write, float cp2,
                       float cg2, const int64_t* off, float* h, float* yp, float* pk) {
  if (y != nullptr) band_h(G, y, h, yp);
  __m256d e0 = _mm256_setzero_pd(), e1 = _mm256_setzero_pd();
  double tail = 0;
  rows_residual(G, K, h, y != nullptr, out, write, _mm256_set1_ps(cp2), _mm256_set1_ps(cg2), off, 0, pk, e0, e1,
                tail);
  return sum_lanes(e0, e1) + tail;
}

// ---- the parity split (struct Parity): the block's rows in the lanes, 8 rows per vector ------------------

#include "transpose8.h"

// The unnormalised Walsh-Hadamard transform of 2^L vectors in place (its own inverse up to 2^L).
template <int L>
inline void hadamard(__m256* x) {
  for (int h = 1; h < (1 << L); h <<= 1)
    for (int i = 0; i < (1 << L); ++i)
      if (!(i & h)) {
        const __m256 a = x[i], b = x[i + h];
        x[i] = _mm256_add_ps(a, b);
        x[i + h] = _mm256_sub_ps(a, b);
      }
}

// kt[p, 0 .. 8) = pixel p of the 8 rows (a masked load for the last P mod 8 pixels: the row may end the tensor).
inline void pixels_in_lanes(const float* const* row, int64_t P, float* kt) {
  for (int64_t p0 = 0; p0 < P; p0 += 8) {
    if (P - p0 <= 3) {  // a few last pixels: a scalar copy costs less than a transpose of mostly padding
      for (int64_t p = p0; p < P; ++p)
        for (int i = 0; i < 8; ++i) kt[p * 8 + i] = row[i][p];
      break;
    }
    __m256 v[8];
    if (p0 + 8 <= P) {
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(row[i] + p0);
    } else {
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(P - p0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      for (int i = 0; i < 8; ++i) v[i] = _mm256_maskload_ps(row[i] + p0, mask);
    }
    transpose8(v);
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(kt + (p0 + j) * 8, v[j]);
  }
}

// z[slot] for the count orbits of 2^L pixels starting at order: the transform of kt on each.
template <int L>
inline void orbits_forward(const float* kt, const int64_t* order, int64_t count, float* z) {
  constexpr int n = 1 << L;
  for (int64_t o = 0; o < count; ++o, order += n, z += 8 * n) {
    __m256 x[n];
    for (int i = 0; i < n; ++i) x[i] = _mm256_loadu_ps(kt + order[i] * 8);
    hadamard<L>(x);
    for (int i = 0; i < n; ++i) _mm256_storeu_ps(z + 8 * i, x[i]);
  }
}

void to_slots(const Parity& X, const float* kt, float* z) {
  const int64_t* order = X.order;
  for (int64_t L = X.s; L >= 0; --L) {
    const int64_t count = X.counts[L];
    switch (L) {
      case 3: orbits_forward<3>(kt, order, count, z); break;
      case 2: orbits_forward<2>(kt, order, count, z); break;
      case 1: orbits_forward<1>(kt, order, count, z); break;
      default: orbits_forward<0>(kt, order, count, z); break;
    }
    order += count << L;
    z += 8 * (count << L);
  }
}

// band[cols[m0 + m]] = sum_j z[slots[j]] Phi_c[j, m0 + m] for MM coefficients of a class (J interleaved chains
// over j: a class has only a few coefficients, and one chain per coefficient would wait on the FMA latency).
template <int MM>
inline void class_to_band(const ParityClass& C, int64_t m0, const float* z, float* band) {
  constexpr int J = MM <= 2 ? 4 : MM <= 7 ? 2 : 1;
  __m256 acc[J][MM];
  for (int u = 0; u < J; ++u)
    for (int m = 0; m < MM; ++m) acc[u][m] = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + J <= C.n; j += J)
    for (int u = 0; u < J; ++u) {
      const __m256 zj = _mm256_loadu_ps(z + C.slots[j + u] * 8);
      const float* f = C.phi + (j + u) * C.m + m0;
      for (int m = 0; m < MM; ++m) acc[u][m] = _mm256_fmadd_ps(zj, _mm256_broadcast_ss(f + m), acc[u][m]);
    }
  for (; j < C.n; ++j) {
    const __m256 zj = _mm256_loadu_ps(z + C.slots[j] * 8);
    const float* f = C.phi + j * C.m + m0;
    for (int m = 0; m < MM; ++m) acc[0][m] = _mm256_fmadd_ps(zj, _mm256_broadcast_ss(f + m), acc[0][m]);
  }
  for (int m = 0; m < MM; ++m) {
    __m256 t = acc[0][m];
    for (int u = 1; u < J; ++u) t = _mm256_add_ps(t, acc[u][m]);
    _mm256_storeu_ps(band + C.cols[m0 + m] * 8, t);
  }
}

// w[slots[j]] (+)= sum_m band[cols[m0 + m]] Phi_c[j, m0 + m], four slots at once.
template <int MM>
inline void class_from_band(const ParityClass& C, int64_t m0, const float* band, float* w, bool add) {
  __m256 hv[MM];
  for (int m = 0; m < MM; ++m) hv[m] = _mm256_loadu_ps(band + C.cols[m0 + m] * 8);
  int64_t j = 0;
  for (; j + 4 <= C.n; j += 4) {
    __m256 acc[4];
    for (int u = 0; u < 4; ++u) {
      acc[u] = add ? _mm256_loadu_ps(w + C.slots[j + u] * 8) : _mm256_setzero_ps();
      const float* f = C.phi + (j + u) * C.m + m0;
      for (int m = 0; m < MM; ++m) acc[u] = _mm256_fmadd_ps(hv[m], _mm256_broadcast_ss(f + m), acc[u]);
    }
    for (int u = 0; u < 4; ++u) _mm256_storeu_ps(w + C.slots[j + u] * 8, acc[u]);
  }
  for (; j < C.n; ++j) {
    __m256 acc = add ? _mm256_loadu_ps(w + C.slots[j] * 8) : _mm256_setzero_ps();
    const float* f = C.phi + j * C.m + m0;
    for (int m = 0; m < MM; ++m) acc = _mm256_fmadd_ps(hv[m], _mm256_broadcast_ss(f + m), acc);
    _mm256_storeu_ps(w + C.slots[j] * 8, acc);
  }
}

#define EQUIPROJ_BY_WIDTH(F, width, ...) \
  switch (width) {                        \
    case 1: F<1>(__VA_ARGS__); break;     \
    case 2: F<2>(__VA_ARGS__); break;     \
    case 3: F<3>(__VA_ARGS__); break;     \
    case 4: F<4>(__VA_ARGS__); break;     \
    case 5: F<5>(__VA_ARGS__); break;     \
    case 6: F<6>(__VA_ARGS__); break;     \
    case 7: F<7>(__VA_ARGS__); break;     \
    default: F<8>(__VA_ARGS__); break;    \
  }

void slots_to_band(const Parity& X, const float* z, float* band) {
  for (const ParityClass& C : X.classes)
    for (int64_t m0 = 0; m0 < C.m; m0 += 8) EQUIPROJ_BY_WIDTH(class_to_band, std::min<int64_t>(8, C.m - m0), C, m0, z, band)
}

void band_to_slots(const Parity& X, const float* band, float* w) {
  for (const ParityClass& C : X.classes) {
    if (C.m == 0)
      for (int64_t j = 0; j < C.n; ++j) _mm256_storeu_ps(w + C.slots[j] * 8, _mm256_setzero_ps());
    for (int64_t m0 = 0; m0 < C.m; m0 += 8)
      EQUIPROJ_BY_WIDTH(class_from_band, std::min<int64_t>(8, C.m - m0), C, m0, band, w, m0 > 0)
  }
}
#undef EQUIPROJ_BY_WIDTH

// rows[i, d0 .. d0 + 8) <- band[d0 .. d0 + 8, i] for the 8 rows (Dp apart), and back.
inline void band_to_row_major(const float* band, int64_t Dp, float* rows) {
  for (int64_t d0 = 0; d0 < Dp; d0 += 8) {
    __m256 v[8];
    for (int j = 0; j < 8; ++j) v[j] = _mm256_loadu_ps(band + (d0 + j) * 8);
    transpose8(v);
    for (int i = 0; i < 8; ++i) _mm256_storeu_ps(rows + i * Dp + d0, v[i]);
  }
}

inline void row_major_to_band(const float* rows, int64_t Dp, float* band) {
  for (int64_t d0 = 0; d0 < Dp; d0 += 8) {
    __m256 v[8];
    for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(rows + i * Dp + d0);
    transpose8(v);
    for (int j = 0; j < 8; ++j) _mm256_storeu_ps(band + (d0 + j) * 8, v[j]);
  }
}

// Per orbit of 2^L slots: v = z 2^-L - w (the transform of the residual K - PK, divided by 2^L: ||K - PK||^2
// = 2^L ||v||^2 on the orbit) squared into e0, e1 in float64; with grad, the gradient's transform cp2 v + cg2 w
// taken back to the pixels (the same transform) into gt.
template <int L>
inline void orbits_back(const float* z, const float* w, const int64_t* order, int64_t count, bool grad, __m256 cp2,
                        __m256 cg2, float* gt, __m256d& e0, __m256d& e1) {
  constexpr int n = 1 << L;
  const __m256 scale = _mm256_set1_ps(1.0f / n);
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  for (int64_t o = 0; o < count; ++o, order += n, z += 8 * n, w += 8 * n) {
    __m256 u[n];
    for (int i = 0; i < n; ++i) {
      const __m256 wi = _mm256_loadu_ps(w + 8 * i);
      const __m256 v = _mm256_fmsub_ps(_mm256_loadu_ps(z + 8 * i), scale, wi);
      const __m256d v0 = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), v1 = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
      s0 = _mm256_fmadd_pd(v0, v0, s0);
      s1 = _mm256_fmadd_pd(v1, v1, s1);
      u[i] = _mm256_fmadd_ps(cp2, v, _mm256_mul_ps(cg2, wi));
    }
    if (grad) {
      hadamard<L>(u);
      for (int i = 0; i < n; ++i) _mm256_storeu_ps(gt + order[i] * 8, u[i]);
    }
  }
  const __m256d weight = _mm256_set1_pd(double(n));
  e0 = _mm256_fmadd_pd(s0, weight, e0);
  e1 = _mm256_fmadd_pd(s1, weight, e1);
}

// The gradient's pixels gt (8 rows in the lanes) written into (write 1) or added to (write 2) the 8 rows; the
// last P mod 8 pixels through a scalar copy (no masked store: they are slow on some CPUs), without the
// transpose where they are a few.
inline void gradient_to_rows(const float* gt, int64_t P, float* const* row, int write) {
  for (int64_t p0 = 0; p0 < P; p0 += 8) {
    const int64_t np = std::min<int64_t>(8, P - p0);
    if (np <= 3) {
      for (int64_t p = p0; p < P; ++p)
        for (int i = 0; i < 8; ++i) row[i][p] = write == 2 ? row[i][p] + gt[p * 8 + i] : gt[p * 8 + i];
      break;
    }
    __m256 v[8];
    for (int j = 0; j < 8; ++j) v[j] = _mm256_loadu_ps(gt + (p0 + j) * 8);
    transpose8(v);
    for (int i = 0; i < 8; ++i) {
      float* o = row[i] + p0;
      if (np == 8) {
        _mm256_storeu_ps(o, write == 2 ? _mm256_add_ps(_mm256_loadu_ps(o), v[i]) : v[i]);
        continue;
      }
      alignas(32) float t[8];
      _mm256_store_ps(t, v[i]);
      for (int64_t q = 0; q < np; ++q) o[q] = write == 2 ? o[q] + t[q] : t[q];
    }
  }
}

// Scratch of the parity pass of one block (floats): z [groups, P, 8], kt and gt [Pp, 8], w [P, 8], the band in
// the lanes [Dp, 8].
struct ParityScratch {
  float *z, *kt, *gt, *w, *band;
  static int64_t floats(const Blocks& G) {
    const int64_t groups = G.dout * G.din / 8;
    return groups * G.P * 8 + 2 * G.Pp * 8 + G.P * 8 + G.Dp * 8;
  }
  ParityScratch(const Blocks& G, float* at) : z(at), kt(nullptr), gt(nullptr), w(nullptr), band(nullptr) {
    if (at == nullptr) return;
    kt = z + G.dout * G.din / 8 * G.P * 8;
    gt = kt + G.Pp * 8;
    w = gt + G.Pp * 8;
    band = w + G.P * 8;
  }
};

// One block through the parity split: the pixels of 8 rows at a time to their orbits' transforms and the band
// (a), the band projection as in maps_block (y', h), then per 8 rows the band back to the slots (w), the
// residual's squares and the gradient. Returns ||K - PK||^2; eg = ||c||^2.
double parity_block(const Blocks& G, const Parity& X, const Slots& S, const float* K, float* out, int write,
                    float cp2, float cg2, const int64_t* off, bool mapped, double& eg, float* a, float* y,
                    float* yp, float* h, float* c, float* pk, const ParityScratch& W) {
  // whole groups of 8 rows in the lanes; the last R mod 8 rows through the band-in-the-lanes row kernels
  const int64_t R = G.dout * G.din, P = G.P, Dp = G.Dp, groups = R / 8, rest = 8 * groups;
  const float* rows[8];
  float* orow[8];
  std::fill(W.band + G.D * 8, W.band + Dp * 8, 0.0f);  // the padded coefficients (the way back wrote h's)
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = 0; i < 8; ++i) rows[i] = K + off[8 * g + i];
    pixels_in_lanes(rows, P, W.kt);
    float* z = W.z + g * P * 8;
    to_slots(X, W.kt, z);
    if (mapped) {
      slots_to_band(X, z, W.band);
      band_to_row_major(W.band, Dp, a + 8 * g * Dp);
    }
  }
  eg = 0;
  if (mapped) {
    to_band_from(G, K, off, a, rest);
    rotate_to_y(G, a, y, a + R * Dp);
    eg = maps_block(G, S, y, yp, c);
    band_h(G, yp, h, h + R * Dp);
  }
  const __m256 c2p = _mm256_set1_ps(cp2), c2g = _mm256_set1_ps(cg2);
  __m256d e0 = _mm256_setzero_pd(), e1 = _mm256_setzero_pd();
  if (!mapped) std::fill(W.w, W.w + P * 8, 0.0f);
  for (int64_t g = 0; g < groups; ++g) {
    if (mapped) {
      row_major_to_band(h + 8 * g * Dp, Dp, W.band);
      band_to_slots(X, W.band, W.w);
    }
    const float* z = W.z + g * P * 8;
    const float* w = W.w;
    const int64_t* order = X.order;
    for (int64_t L = X.s; L >= 0; --L) {
      const int64_t count = X.counts[L];
      switch (L) {
        case 3: orbits_back<3>(z, w, order, count, write != 0, c2p, c2g, W.gt, e0, e1); break;
        case 2: orbits_back<2>(z, w, order, count, write != 0, c2p, c2g, W.gt, e0, e1); break;
        case 1: orbits_back<1>(z, w, order, count, write != 0, c2p, c2g, W.gt, e0, e1); break;
        default: orbits_back<0>(z, w, order, count, write != 0, c2p, c2g, W.gt, e0, e1); break;
      }
      order += count << L;
      z += 8 * (count << L);
      w += 8 * (count << L);
    }
    if (write) {
      for (int64_t i = 0; i < 8; ++i) orow[i] = out + off[8 * g + i];
      gradient_to_rows(W.gt, P, orow, write);
    }
  }
  double tail = 0;
  rows_residual(G, K, h, mapped, out, write, c2p, c2g, off, rest, pk, e0, e1, tail);
  return sum_lanes(e0, e1) + tail;
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

Parity parity_tables(const Blocks& G, const Tensor& K, const Tensor& table, const Tensor& phi) {
  Parity X;
  if (table.numel() == 0) return X;
  const char* op = "factorised_pass";
  TORCH_CHECK(table.device().is_cpu() && phi.device().is_cpu() && table.scalar_type() == at::kLong &&
                  table.is_contiguous() && phi.is_contiguous() && phi.scalar_type() == K.scalar_type(),
              op, ": the parity tables must be a contiguous int64 table and Phi's classes in K's dtype, on the CPU");
  const int64_t* t = table.data_ptr<int64_t>();
  const int64_t len = table.numel();
  int64_t at = 0;
  auto next = [&]() {
    TORCH_CHECK(at < len, op, ": the parity table ends early");
    return t[at++];
  };
  X.s = next();
  TORCH_CHECK(X.s >= 1 && X.s <= 3, op, ": 1 to 3 reflections in the parity table");
  int64_t pixels = 0;
  for (int64_t L = 0; L <= X.s; ++L) {
    X.counts[L] = next();
    TORCH_CHECK(X.counts[L] >= 0, op, ": negative orbit count");
    pixels += X.counts[L] << L;
  }
  TORCH_CHECK(pixels == G.P, op, ": the orbits hold ", pixels, " pixels, the weight ", G.P);
  TORCH_CHECK(at + G.P <= len, op, ": the parity table ends early");
  X.order = t + at;
  std::vector<char> seen(G.P, 0), slot_seen(G.P, 0), col_seen(G.D, 0);
  for (int64_t i = 0; i < G.P; ++i) {
    const int64_t p = t[at + i];
    TORCH_CHECK(p >= 0 && p < G.P && !seen[p], op, ": the parity table's pixel order is not a permutation");
    seen[p] = 1;
  }
  at += G.P;
  const int64_t classes = next();
  const bool f32 = K.scalar_type() == at::kFloat;
  const float* f = f32 ? phi.data_ptr<float>() : nullptr;
  int64_t entries = 0;
  for (int64_t k = 0; k < classes; ++k) {
    ParityClass C;
    C.n = next();
    C.m = next();
    TORCH_CHECK(C.n >= 0 && C.m >= 0 && at + C.n + C.m <= len, op, ": a parity class runs past the table");
    C.slots = t + at;
    C.cols = t + at + C.n;
    for (int64_t j = 0; j < C.n; ++j) {
      TORCH_CHECK(C.slots[j] >= 0 && C.slots[j] < G.P && !slot_seen[C.slots[j]], op,
                  ": the parity classes' slots must cover each pixel slot once");
      slot_seen[C.slots[j]] = 1;
    }
    for (int64_t m = 0; m < C.m; ++m) {
      TORCH_CHECK(C.cols[m] >= 0 && C.cols[m] < G.D && !col_seen[C.cols[m]], op,
                  ": the parity classes' coefficients must cover each band coefficient once");
      col_seen[C.cols[m]] = 1;
    }
    at += C.n + C.m;
    C.phi = f ? f + entries : nullptr;
    entries += C.n * C.m;
    X.classes.push_back(C);
  }
  TORCH_CHECK(at == len, op, ": the parity table is longer than its classes");
  TORCH_CHECK(std::all_of(slot_seen.begin(), slot_seen.end(), [](char c) { return c != 0; }) &&
                  std::all_of(col_seen.begin(), col_seen.end(), [](char c) { return c != 0; }),
              op, ": the parity classes must cover every pixel slot and every band coefficient");
  TORCH_CHECK(phi.numel() == entries, op, ": Phi's classes hold ", phi.numel(), " entries, the table ", entries);
  return X;
}

// factorised_pass(K [B, m, n, P], rows [m], cols [n], phi [P, Dp], phiT [D, Pp], q [d_out, d_out] or empty,
//                 oo, co, d_out, oi, ci, d_in, slots [S, 3], maps, maps_t, parity, phi_parity, lambda_perp [B] f64,
//                 lambda_G [B] f64, out or None, write, plain) -> (E_perp [B] f64, E_G [B] f64)
//   Per block: y = Q^T (K Phi), y' = sum_s U_s^T U_s y, PK = (Q y') Phi^T, R = K - PK; ||R||^2 and ||U y||^2
//   summed per batch item (in block order: the same on any number of threads); out written (write = 1) or added
//   to (write = 2) with 2 lambda_perp R + 2 lambda_G PK (out may be K). No slots: P K = 0. plain: the plain
//   loops also for float32 (the tests compare both). parity, phi_parity: Phi split by the grid's reflections
//   (struct Parity; empty: none), which the float32 AVX2 kernels take for the two band products.
std::tuple<Tensor, Tensor> factorised_pass(const Tensor& K, const Tensor& rows, const Tensor& cols, const Tensor& phi,
                                           const Tensor& phit, const Tensor& q, int64_t oo, int64_t co, int64_t dout,
                                           int64_t oi, int64_t ci, int64_t din, const Tensor& slots,
                                           const Tensor& maps, const Tensor& maps_t, const Tensor& parity,
                                           const Tensor& phi_parity, const Tensor& lambda_perp,
                                           const Tensor& lambda_G, const std::optional<Tensor>& out, int64_t write,
                                           bool plain) {
  const Blocks G = geometry(K, rows, cols, phi, phit, q, oo, co, dout, oi, ci, din, "factorised_pass");
  const Slots S = slot_tables(G, K, slots, maps, maps_t);
  const Parity X = parity_tables(G, K, parity, phi_parity);
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
#ifdef EQUIPROJ_BLOCKS_X86
    const bool split = lanes && X.s > 0;
    std::vector<float> lanes_scratch(split ? avx2::ParityScratch::floats(G) : 0);
    const avx2::ParityScratch W(G, split ? lanes_scratch.data() : nullptr);
#endif
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
      if (split) {
        row_offsets(G, item, u, v, off.data());
        ep[it] = avx2::parity_block(G, X, S, K.data_ptr<float>(), o, int(write), float(cp2), float(cg2), off.data(),
                                    mapped, eg[it], a, y, yp, h, c, pk, W);
        continue;
      }
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
        "int d_out, int oi, int ci, int d_in, Tensor slots, Tensor maps, Tensor maps_t, Tensor parity, "
        "Tensor phi_parity, Tensor lambda_perp, "
        "Tensor lambda_G, Tensor(a!)? out, int write, bool plain) -> (Tensor, Tensor)",
        &factorised_pass);
}

}  // namespace equiproj_cpu
