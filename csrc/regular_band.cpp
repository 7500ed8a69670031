// CPU kernel of the steerable projection between regular fields of a finite group, in one pass over
// the weight (docs/math.md §6, "Regular fields in closed form").
//
// A kernel K [m, n, P] between c_out and c_in copies of the regular field (N = |G| points, the
// group's elements) splits into tiles K[x, y, :] (x, y in 0..N-1) per copy pair. A coefficient map h
// is equivariant when h[x, y] = S(x) h[e, x^-1 y] (S the action on the band), so with
//   Phi_x = Phi S(x)                 [P, D], one per group element
//   t[z]  = sum_x K[x, xz] Phi_x     the band coefficients, folded along the orbits
//   h0[z] = Mbar^-1 t[z]             Mbar = sum_x Phi_x^T Phi_x
//   P K[x, xz] = Phi_x h0[z]
// the orthogonal projection onto V is computed per tile with no change of basis and no
// intermediate outside the tile: the tile is read, folded into t (N x D numbers), and read again
// while P K, the residual and the gradient are written. E_G = sum_z <t[z], h0[z]>,
// E_perp = ||K - P K||^2 from the explicit residual.
//
// Work item = one row block (one batch item, one copy of the output field) against every input
// copy; items run in parallel and write their own partial sums, added in item order (the result
// does not depend on the thread count). fp32 weights run in fp32 arithmetic with AVX2+FMA where
// the CPU has it; fp64 weights in fp64, fp16/bf16 in fp32 (a plain loop).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#define EQUIPROJ_REGULAR_X86 1
#include <immintrin.h>
#endif

namespace equiproj_cpu {
namespace {

using at::Tensor;

// What one call works on (pointers into contiguous tensors).
template <typename C>
struct RegularTables {
  int64_t N, P, D;      // field dimension (group order), pixels, band dimension
  int64_t Dp, Pp;       // D and P rounded up to the vector width (8 for float, 8 for double in the plain loop)
  const int64_t* mult;  // [N, N]: column of x z in the regular field
  const C* phi;         // [N, P, Dp]: Phi_x, zero-padded columns
  const C* phiT;        // [N, D, Pp]: Phi_x^T, vector v = pixels min(8 v, P - 8) .. +8
  const C* minv;        // [D, Dp]: Mbar^-1, zero-padded columns
  const int64_t* col;   // [P]: where pixel p sits in a row of phiT
  // The rows of a tile grouped in classes whose Phi_x are pixel permutations of one Phi_x0 (the
  // elements that act on the grid): class c holds rows[cls[c] .. cls[c+1]) and its representative
  // reps[c]; the entry (x, y), pixel p, of a tile adds into u[c][z][idx[x][y P + p] - z P ...], i.e.
  // idx[x][y P + p] = z P + pi_x(p) with z = x^-1 y and Phi_x[p] = Phi_x0[pi_x(p)].
  int64_t ncls;
  const int64_t* rows;  // [N]
  const int64_t* cls;   // [ncls + 1]
  const int64_t* reps;  // [ncls]
  const int32_t* idx;   // [N, N P], or null: no lane kernel
};

struct Mode {
  int64_t m, n;   // rows, columns of one item
  int64_t co, ci; // copies of the field in the rows, in the columns
  int write;      // 0 energies only, 1 write the gradient, 2 add it
};

// ---- the plain loop (any dtype, any ISA) -------------------------------------------------------------
template <typename X, typename C>
void tile_plain(const RegularTables<C>& T, const X* Kt, X* Ot, int64_t n, C cp2, C cg2, int write, C* t, C* h0,
                C* pk, double& ep, double& eg) {
  const int64_t N = T.N, P = T.P, D = T.D;
  for (int64_t z = 0; z < N; ++z)
    for (int64_t d = 0; d < D; ++d) t[z * D + d] = 0;
  for (int64_t x = 0; x < N; ++x) {
    const C* phi = T.phi + x * P * T.Dp;
    for (int64_t z = 0; z < N; ++z) {
      const X* k = Kt + (x * n + T.mult[x * N + z]) * P;
      C* tz = t + z * D;
      for (int64_t p = 0; p < P; ++p) {
        const C kv = static_cast<C>(k[p]);
        for (int64_t d = 0; d < D; ++d) tz[d] += kv * phi[p * T.Dp + d];
      }
    }
  }
  double e_g = 0;
  for (int64_t z = 0; z < N; ++z)
    for (int64_t d = 0; d < D; ++d) {
      C s = 0;
      for (int64_t e = 0; e < D; ++e) s += t[z * D + e] * T.minv[e * T.Dp + d];
      h0[z * D + d] = s;
      e_g += static_cast<double>(s) * static_cast<double>(t[z * D + d]);
    }
  eg += e_g;
  double e_p = 0;
  for (int64_t x = 0; x < N; ++x) {
    const C* phiT = T.phiT + x * D * T.Pp;
    for (int64_t z = 0; z < N; ++z) {
      const int64_t off = (x * n + T.mult[x * N + z]) * P;
      const X* k = Kt + off;
      for (int64_t p = 0; p < P; ++p) pk[p] = 0;
      for (int64_t d = 0; d < D; ++d) {
        const C hv = h0[z * D + d];
        for (int64_t p = 0; p < P; ++p) pk[p] += hv * phiT[d * T.Pp + T.col[p]];
      }
      for (int64_t p = 0; p < P; ++p) {
        const C r = static_cast<C>(k[p]) - pk[p];
        e_p += static_cast<double>(r) * static_cast<double>(r);
        if (write) {
          const C g = cp2 * r + cg2 * pk[p];
          X* o = Ot + off + p;
          *o = static_cast<X>(write == 1 ? g : static_cast<C>(*o) + g);
        }
      }
    }
  }
  ep += e_p;
}

#ifdef EQUIPROJ_REGULAR_X86
// ---- fp32, AVX2+FMA: register-blocked products, the tile in L1 --------------------------------------
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

// t[z0 .. z0+ZB) for DV vectors of band columns: sum over x of K[x, x z] Phi_x.
template <int ZB, int DV>
inline void fold_block(const RegularTables<float>& T, const float* Kt, int64_t n, int64_t z0, float* t) {
  const int64_t N = T.N, P = T.P;
  __m256 acc[ZB][DV];
  for (int i = 0; i < ZB; ++i)
    for (int v = 0; v < DV; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t x = 0; x < N; ++x) {
    const float* phi = T.phi + x * P * T.Dp;
    const float* k[ZB];
    for (int i = 0; i < ZB; ++i) k[i] = Kt + (x * n + T.mult[x * N + z0 + i]) * P;
    for (int64_t p = 0; p < P; ++p) {
      __m256 ph[DV];
      for (int v = 0; v < DV; ++v) ph[v] = _mm256_loadu_ps(phi + p * T.Dp + 8 * v);
      for (int i = 0; i < ZB; ++i) {
        const __m256 kb = _mm256_broadcast_ss(k[i] + p);
        for (int v = 0; v < DV; ++v) acc[i][v] = _mm256_fmadd_ps(kb, ph[v], acc[i][v]);
      }
    }
  }
  for (int i = 0; i < ZB; ++i)
    for (int v = 0; v < DV; ++v) _mm256_storeu_ps(t + (z0 + i) * T.Dp + 8 * v, acc[i][v]);
}

template <int DV>
inline void fold(const RegularTables<float>& T, const float* Kt, int64_t n, float* t) {
  constexpr int ZB = DV == 1 ? 6 : DV == 2 ? 4 : DV == 3 ? 3 : 2;
  int64_t z = 0;
  for (; z + ZB <= T.N; z += ZB) fold_block<ZB, DV>(T, Kt, n, z, t);
  for (; z < T.N; ++z) fold_block<1, DV>(T, Kt, n, z, t);
}

// P K of the entries K[x, x z] (z in z0 .. z0+ZB) on pixel vectors [v0, v0 + NV), into the row
// buffer pk (entry y at y P). Vector v covers the pixels from min(8 v, P - 8): the last one
// overlaps its neighbour with the same values instead of running into the next entry (phiT is laid
// out that way), so no vector is partial.
template <int ZB, int NV>
inline void expand_block(const RegularTables<float>& T, int64_t x, int64_t z0, int64_t v0, const float* h0, float* pk) {
  const int64_t N = T.N, P = T.P, D = T.D;
  const float* phiT = T.phiT + x * D * T.Pp + 8 * v0;
  __m256 acc[ZB][NV];
  for (int i = 0; i < ZB; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    __m256 ph[NV];
    for (int v = 0; v < NV; ++v) ph[v] = _mm256_loadu_ps(phiT + d * T.Pp + 8 * v);
    for (int i = 0; i < ZB; ++i) {
      const __m256 hb = _mm256_broadcast_ss(h0 + (z0 + i) * T.Dp + d);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm256_fmadd_ps(hb, ph[v], acc[i][v]);
    }
  }
  for (int i = 0; i < ZB; ++i) {
    float* row = pk + T.mult[x * N + z0 + i] * P;
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(row + std::min<int64_t>(8 * (v0 + v), P - 8), acc[i][v]);
  }
}

template <int NV>
inline void expand_chunk(const RegularTables<float>& T, int64_t x, int64_t v0, const float* h0, float* pk) {
  constexpr int ZB = NV >= 4 ? 2 : NV == 3 ? 3 : 4;
  int64_t z = 0;
  for (; z + ZB <= T.N; z += ZB) expand_block<ZB, NV>(T, x, z, v0, h0, pk);
  for (; z < T.N; ++z) expand_block<1, NV>(T, x, z, v0, h0, pk);
}

// The residual of one row of the tile (N P contiguous floats): its energy, and the gradient.
inline void residual_row(const float* k, float* o, const float* pk, int64_t len, __m256 cp2, __m256 cg2, int write,
                         __m256& e, double& e_tail) {
  int64_t q = 0;
  for (; q + 8 <= len; q += 8) {
    const __m256 a = _mm256_loadu_ps(pk + q);
    const __m256 r = _mm256_sub_ps(_mm256_loadu_ps(k + q), a);
    e = _mm256_fmadd_ps(r, r, e);
    if (!write) continue;
    __m256 g = _mm256_fmadd_ps(cp2, r, _mm256_mul_ps(cg2, a));
    if (write == 2) g = _mm256_add_ps(_mm256_loadu_ps(o + q), g);
    _mm256_storeu_ps(o + q, g);
  }
  if (q == len) return;
  alignas(32) float c[8];
  _mm256_store_ps(c, cp2);
  const float cp = c[0];
  _mm256_store_ps(c, cg2);
  const float cg = c[0];
  for (; q < len; ++q) {
    const float r = k[q] - pk[q];
    e_tail += static_cast<double>(r) * r;
    if (write) o[q] = (write == 2 ? o[q] : 0.0f) + (cp * r + cg * pk[q]);
  }
}

inline double hsum(__m256 v) {
  alignas(32) float a[8];
  _mm256_store_ps(a, v);
  double s = 0;
  for (float f : a) s += f;
  return s;
}

// One tile (one copy pair): fold, solve, expand. t and h0 are [N, Dp] scratch.
inline void tile_avx2(const RegularTables<float>& T, const float* Kt, float* Ot, int64_t n, float cp2f, float cg2f,
                      int write, float* t, float* h0, float* pk, double& ep, double& eg) {
  const int64_t N = T.N, D = T.D, Dp = T.Dp;
  switch (Dp / 8) {
    case 1: fold<1>(T, Kt, n, t); break;
    case 2: fold<2>(T, Kt, n, t); break;
    case 3: fold<3>(T, Kt, n, t); break;
    default: fold<4>(T, Kt, n, t); break;
  }
  double e_g = 0;
  for (int64_t z = 0; z < N; ++z) {  // h0[z] = Mbar^-1 t[z] (rows of minv, padded columns zero)
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t d = 0; d < D; ++d) {
      const __m256 tb = _mm256_broadcast_ss(t + z * Dp + d);
      for (int64_t v = 0; v < Dp / 8; ++v)
        acc[v] = _mm256_fmadd_ps(tb, _mm256_loadu_ps(T.minv + d * Dp + 8 * v), acc[v]);
    }
    __m256 dot = _mm256_setzero_ps();
    for (int64_t v = 0; v < Dp / 8; ++v) {
      _mm256_storeu_ps(h0 + z * Dp + 8 * v, acc[v]);
      dot = _mm256_fmadd_ps(acc[v], _mm256_loadu_ps(t + z * Dp + 8 * v), dot);
    }
    e_g += hsum(dot);
  }
  eg += e_g;
  const __m256 cp2 = _mm256_set1_ps(cp2f), cg2 = _mm256_set1_ps(cg2f);
  __m256 e = _mm256_setzero_ps();
  double e_tail = 0;
  const int64_t PV = T.Pp / 8, P = T.P;
  for (int64_t x = 0; x < N; ++x) {
    int64_t v0 = 0;
    for (; v0 + 4 <= PV; v0 += 4) expand_chunk<4>(T, x, v0, h0, pk);
    switch (PV - v0) {
      case 1: expand_chunk<1>(T, x, v0, h0, pk); break;
      case 2: expand_chunk<2>(T, x, v0, h0, pk); break;
      case 3: expand_chunk<3>(T, x, v0, h0, pk); break;
      default: break;
    }
    residual_row(Kt + x * n * P, Ot ? Ot + x * n * P : nullptr, pk, N * P, cp2, cg2, write, e, e_tail);
  }
  ep += e_tail;
  ep += hsum(e);
}

// ---- fp32, AVX2+FMA, eight tiles at once: lane j of every vector is tile j --------------------------
// Eight tiles of one output copy (input copies v0 .. v0+7) are consecutive in each row of the weight, so
// an 8 x 8 block (8 floats of each tile) is transposed in registers into 8 vectors of one position each.
// In that layout every per-tile step is lane-parallel and a pixel permutation is only an address:
//   fold:   u[c][z][pi_x(p)] += K[x, x z][p] over the rows x of class c     (adds)
//           t[z] += sum_q u[c][z][q] Phi_x0[q]                             (2 D flops per |class| weights)
//   solve:  h0[z] = Mbar^-1 t[z]
//   expand: v[c][z][q] = Phi_x0[q] h0[z];  P K[x, x z][p] = v[c][z][pi_x(p)]  (2 D flops per |class| weights)
//   the residual back in the weight's layout (the block transposed again), its energy, the gradient.
// The grid's own symmetries (the rotations by 90 degrees of C8, C16, ...) make the classes |class| rows
// each, so the band products run on 1 / |class| of the weights.

#include "transpose8.h"

// acc[i] (i < DB) = init[i] + sum_q u[q] * c[q * cs + i]: DB accumulators of the band (fold, solve) or of
// the pixels (expand), the coefficients broadcast from the tables.
template <int DB>
inline void lane_product(const __m256* u, int64_t Q, const float* c, int64_t cs, __m256* out, bool add) {
  __m256 acc[DB];
  for (int i = 0; i < DB; ++i) acc[i] = add ? out[i] : _mm256_setzero_ps();
  for (int64_t q = 0; q < Q; ++q) {
    const __m256 uq = u[q];
    const float* cq = c + q * cs;
    for (int i = 0; i < DB; ++i) acc[i] = _mm256_fmadd_ps(uq, _mm256_broadcast_ss(cq + i), acc[i]);
  }
  for (int i = 0; i < DB; ++i) out[i] = acc[i];
}

// out[0 .. W) = (add ? out : 0) + sum_q u[q] c[q cs + 0 .. W), in blocks of at most 12 accumulators.
inline void lane_products(const __m256* u, int64_t Q, const float* c, int64_t cs, __m256* out, int64_t W, bool add) {
  int64_t i = 0;
  for (; i + 12 <= W; i += 12) lane_product<12>(u, Q, c + i, cs, out + i, add);
  switch (W - i) {
#define EQUIPROJ_LANE_CASE(n) \
    case n: lane_product<n>(u, Q, c + i, cs, out + i, add); break;
    EQUIPROJ_LANE_CASE(1) EQUIPROJ_LANE_CASE(2) EQUIPROJ_LANE_CASE(3) EQUIPROJ_LANE_CASE(4)
    EQUIPROJ_LANE_CASE(5) EQUIPROJ_LANE_CASE(6) EQUIPROJ_LANE_CASE(7) EQUIPROJ_LANE_CASE(8)
    EQUIPROJ_LANE_CASE(9) EQUIPROJ_LANE_CASE(10) EQUIPROJ_LANE_CASE(11)
#undef EQUIPROJ_LANE_CASE
    default: break;
  }
}

inline void hsum8_into(__m256 v, double* e) {  // e[j] += lane j, in float64
  alignas(32) float a[8];
  _mm256_store_ps(a, v);
  for (int j = 0; j < 8; ++j) e[j] += a[j];
}

// Scratch of one thread for tiles_avx2: u (N P vectors), t and h0 (N Dp vectors each), the band
// coefficients of the table transposed for the solve (D x D) and Phi_x0 transposed for the expansion.
struct LaneScratch {
  explicit LaneScratch(int64_t N, int64_t P, int64_t Dp) : n_u(N * P), n_t(N * Dp) {
    mem = static_cast<__m256*>(std::aligned_alloc(32, sizeof(__m256) * (n_u + 2 * n_t)));
    TORCH_CHECK(mem != nullptr, "regular_band_pass: out of memory for the scratch of a tile group");
    u = mem;
    t = mem + n_u;
    h0 = t + n_t;
  }
  ~LaneScratch() { std::free(mem); }
  LaneScratch(const LaneScratch&) = delete;
  LaneScratch& operator=(const LaneScratch&) = delete;
  int64_t n_u, n_t;
  __m256 *mem, *u, *t, *h0;
};

// Eight tiles (lanes) whose row x starts at Kg + x n P (tile j at + j N P): energies per tile added to
// ep[j], eg[j]; the gradient written or added at the same offsets from Og.
inline void tiles_avx2(const RegularTables<float>& T, const float* phiT0, const float* Kg, float* Og, int64_t n,
                       float cp2f, float cg2f, int write, LaneScratch& S, double* ep, double* eg,
                       const float* nextK, const float* nextO) {
  const int64_t N = T.N, P = T.P, D = T.D, Dp = T.Dp, L = N * P, row = n * P;
  __m256* u = S.u;
  __m256* t = S.t;
  __m256* h0 = S.h0;
  // fold, class by class
  for (int64_t c = 0; c < T.ncls; ++c) {
    for (int64_t q = 0; q < L; ++q) u[q] = _mm256_setzero_ps();
    for (int64_t r = T.cls[c]; r < T.cls[c + 1]; ++r) {
      const int64_t x = T.rows[r];
      const float* kr = Kg + x * row;
      const int32_t* ix = T.idx + x * L;
      const float* next = nextK ? nextK + x * row : nullptr;  // the same row of the next tiles, fetched meanwhile
      for (int64_t f = 0; f < L; f += 8) {
        if (next)
          for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(next + 8 * f + 16 * l), _MM_HINT_T1);
        __m256 b[8];
        for (int j = 0; j < 8; ++j) b[j] = _mm256_loadu_ps(kr + j * L + f);
        transpose8(b);
        for (int i = 0; i < 8; ++i) u[ix[f + i]] = _mm256_add_ps(u[ix[f + i]], b[i]);
      }
    }
    const float* phi0 = T.phi + T.reps[c] * P * Dp;
    for (int64_t z = 0; z < N; ++z) lane_products(u + z * P, P, phi0, Dp, t + z * Dp, D, c > 0);
  }
  // solve: h0[z] = Mbar^-1 t[z] (Mbar^-1 symmetric: its rows are its columns), E_G = sum <t, h0>
  __m256 e_g = _mm256_setzero_ps();
  for (int64_t z = 0; z < N; ++z) {
    lane_products(t + z * Dp, D, T.minv, Dp, h0 + z * Dp, D, false);
    for (int64_t d = 0; d < D; ++d) e_g = _mm256_fmadd_ps(t[z * Dp + d], h0[z * Dp + d], e_g);
  }
  hsum8_into(e_g, eg);
  // expand and the residual, class by class
  const __m256 cp2 = _mm256_set1_ps(cp2f), cg2 = _mm256_set1_ps(cg2f);
  for (int64_t c = 0; c < T.ncls; ++c) {
    const float* phiT = phiT0 + T.reps[c] * D * P;  // Phi_x0^T [D, P]
    for (int64_t z = 0; z < N; ++z) lane_products(h0 + z * Dp, D, phiT, P, u + z * P, P, false);
    for (int64_t r = T.cls[c]; r < T.cls[c + 1]; ++r) {
      const int64_t x = T.rows[r];
      const float* kr = Kg + x * row;
      float* orow = Og ? Og + x * row : nullptr;
      const int32_t* ix = T.idx + x * L;
      __m256 e[8];
      for (int j = 0; j < 8; ++j) e[j] = _mm256_setzero_ps();
      const float* next = nextO && write == 2 ? nextO + x * row : nullptr;  // the gradient of the next tiles
      for (int64_t f = 0; f < L; f += 8) {
        if (next)
          for (int l = 0; l < 4; ++l) _mm_prefetch(reinterpret_cast<const char*>(next + 8 * f + 16 * l), _MM_HINT_T1);
        __m256 b[8];
        for (int i = 0; i < 8; ++i) b[i] = u[ix[f + i]];
        transpose8(b);  // b[j]: P K of tile j at f .. f+8
        for (int j = 0; j < 8; ++j) {
          const __m256 res = _mm256_sub_ps(_mm256_loadu_ps(kr + j * L + f), b[j]);
          e[j] = _mm256_fmadd_ps(res, res, e[j]);
          if (!write) continue;
          __m256 g = _mm256_fmadd_ps(cp2, res, _mm256_mul_ps(cg2, b[j]));
          if (write == 2) g = _mm256_add_ps(_mm256_loadu_ps(orow + j * L + f), g);
          _mm256_storeu_ps(orow + j * L + f, g);
        }
      }
      for (int j = 0; j < 8; ++j) ep[j] += hsum(e[j]);
    }
  }
}

#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

bool regular_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
bool regular_has_avx2() { return false; }
#endif

template <typename X, typename C>
void run(const Tensor& K, const Tensor& out, const RegularTables<C>& T, const Mode& M, const double* lp,
         const double* lg, double* ep_items, double* eg_items, bool plain, const C* phit) {
  const int64_t B = K.size(0), items = B * M.co;
  const X* k0 = K.data_ptr<X>();
  X* o0 = M.write ? out.data_ptr<X>() : nullptr;
  const int64_t N = T.N;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<C> t(N * T.Dp + 8), h0(N * T.Dp + 8), pk(T.Pp), pkrow(N * T.P + 8);
#ifdef EQUIPROJ_REGULAR_X86
    const bool lanes = std::is_same<X, float>::value && std::is_same<C, float>::value && !plain && T.idx != nullptr &&
                       M.ci >= 8;
    std::unique_ptr<LaneScratch> scratch(lanes ? new LaneScratch(N, T.P, T.Dp) : nullptr);
#endif
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / M.co, u = it % M.co;
      const C cp2 = static_cast<C>(2 * lp[b]), cg2 = static_cast<C>(2 * lg[b]);
      double ep = 0, eg = 0;
      int64_t v = 0;
#ifdef EQUIPROJ_REGULAR_X86
      if constexpr (std::is_same<X, float>::value && std::is_same<C, float>::value) {
        if (lanes) {  // eight tiles at once, then the remaining tiles one by one
          for (; v + 8 <= M.ci; v += 8) {
            const int64_t off = (b * M.m + u * N) * M.n * T.P + v * N * T.P;
            // what this thread reads next: the following tiles of the row block, or the next row block
            const int64_t next = v + 8 < M.ci ? off + 8 * N * T.P : it + 1 < end ? (it + 1) * N * M.n * T.P : -1;
            double ep8[8] = {0, 0, 0, 0, 0, 0, 0, 0}, eg8[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            tiles_avx2(T, phit, k0 + off, o0 ? o0 + off : nullptr, M.n, cp2, cg2, M.write, *scratch, ep8, eg8,
                       next >= 0 ? k0 + next : nullptr, next >= 0 && o0 && o0 != k0 ? o0 + next : nullptr);
            for (int j = 0; j < 8; ++j) {
              ep += ep8[j];
              eg += eg8[j];
            }
          }
        }
      }
#endif
      for (; v < M.ci; ++v) {
        const int64_t off = (b * M.m + u * N) * M.n * T.P + v * N * T.P;
        const X* Kt = k0 + off;
        X* Ot = o0 ? o0 + off : nullptr;
#ifdef EQUIPROJ_REGULAR_X86
        if constexpr (std::is_same<X, float>::value && std::is_same<C, float>::value) {
          if (!plain) {
            tile_avx2(T, Kt, Ot, M.n, cp2, cg2, M.write, t.data(), h0.data(), pkrow.data(), ep, eg);
            continue;
          }
        }
#endif
        tile_plain<X, C>(T, Kt, Ot, M.n, cp2, cg2, M.write, t.data(), h0.data(), pk.data(), ep, eg);
      }
      ep_items[it] = ep;
      eg_items[it] = eg;
    }
  });
}

// regular_band_pass(K [B, m, n, P], mult [N, N] int64, phi [N, P, Dp], phiT [N, D, Pp], minv [D, Dp],
//                   lambda_perp [B] f64, lambda_G [B] f64, out [B, m, n, P] or None, write, plain,
//                   rows [N] int64, cls [C + 1] int64, reps [C] int64, idx [N, N P] int32)
//   -> (E_perp [B] f64, E_G [B] f64); out written (write = 1) or added to (write = 2) with
//   2 lambda_perp (K - P K) + 2 lambda_G P K; out may be K itself. rows, cls, reps, idx: the classes of
//   rows (RegularTables); an empty idx runs the tiles one by one.
std::tuple<Tensor, Tensor> regular_band_pass(const Tensor& K, const Tensor& mult, const Tensor& phi,
                                             const Tensor& phiT, const Tensor& minv, const Tensor& lambda_perp,
                                             const Tensor& lambda_G, const std::optional<Tensor>& out,
                                             int64_t write, bool plain, const Tensor& rows, const Tensor& cls,
                                             const Tensor& reps, const Tensor& idx) {
  TORCH_CHECK(K.device().is_cpu() && K.dim() == 4 && K.is_contiguous(), "regular_band_pass: K must be a contiguous "
              "CPU tensor [B, m, n, P]");
  const int64_t B = K.size(0), m = K.size(1), n = K.size(2), P = K.size(3);
  TORCH_CHECK(mult.dim() == 2 && mult.size(0) == mult.size(1) && mult.scalar_type() == at::kLong &&
              mult.is_contiguous(), "regular_band_pass: mult must be a contiguous [N, N] int64 table");
  const int64_t N = mult.size(0);
  TORCH_CHECK(N > 0 && m % N == 0 && n % N == 0, "regular_band_pass: rows and columns must be copies of the field");
  TORCH_CHECK(phi.dim() == 3 && phi.size(0) == N && phi.size(1) == P && phi.is_contiguous() && phiT.dim() == 3 &&
              phiT.size(0) == N && phiT.is_contiguous() && minv.dim() == 2 && minv.is_contiguous(),
              "regular_band_pass: phi [N, P, Dp], phiT [N, D, Pp], minv [D, Dp] contiguous");
  const int64_t D = phiT.size(1), Dp = phi.size(2), Pp = phiT.size(2);
  TORCH_CHECK(Dp % 8 == 0 && Pp % 8 == 0 && Dp >= D && Pp >= P && Dp <= 32 && minv.size(0) == D &&
              minv.size(1) == Dp, "regular_band_pass: padded widths must be multiples of 8 (Dp <= 32)");
  TORCH_CHECK(write >= 0 && write <= 2, "regular_band_pass: write is 0, 1 or 2");
  TORCH_CHECK(lambda_perp.numel() == B && lambda_G.numel() == B && lambda_perp.scalar_type() == at::kDouble &&
              lambda_G.scalar_type() == at::kDouble, "regular_band_pass: one float64 lambda per batch item");
  if (write) {
    TORCH_CHECK(out.has_value() && out->sizes() == K.sizes() && out->scalar_type() == K.scalar_type() &&
                out->is_contiguous(), "regular_band_pass: out must be contiguous, of K's shape and dtype");
  }
  const bool f64 = K.scalar_type() == at::kDouble;
  TORCH_CHECK(phi.scalar_type() == (f64 ? at::kDouble : at::kFloat) && phiT.scalar_type() == phi.scalar_type() &&
              minv.scalar_type() == phi.scalar_type(), "regular_band_pass: tables in float64 for float64 weights, "
              "float32 otherwise");
  const bool classes = idx.numel() > 0;
  if (classes) {
    TORCH_CHECK(idx.scalar_type() == at::kInt && idx.is_contiguous() && idx.dim() == 2 && idx.size(0) == N &&
                idx.size(1) == N * P && (N * P) % 8 == 0, "regular_band_pass: idx must be a contiguous [N, N P] int32 "
                "table (N P a multiple of 8)");
    TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.numel() == N &&
                cls.scalar_type() == at::kLong && cls.is_contiguous() && reps.scalar_type() == at::kLong &&
                reps.is_contiguous() && cls.numel() == reps.numel() + 1, "regular_band_pass: rows [N], cls [C + 1], "
                "reps [C] int64");
    const int32_t* ix = idx.data_ptr<int32_t>();
    for (int64_t i = 0; i < N * N * P; ++i)
      TORCH_CHECK(ix[i] >= 0 && ix[i] < N * P, "regular_band_pass: idx out of range");
    const int64_t* cl = cls.data_ptr<int64_t>();
    TORCH_CHECK(cl[0] == 0 && cl[reps.numel()] == N, "regular_band_pass: the classes must cover the N rows");
    for (int64_t c = 0; c < reps.numel(); ++c)
      TORCH_CHECK(cl[c] < cl[c + 1] && reps.data_ptr<int64_t>()[c] >= 0 && reps.data_ptr<int64_t>()[c] < N,
                  "regular_band_pass: empty class or representative out of range");
    for (int64_t r = 0; r < N; ++r)
      TORCH_CHECK(rows.data_ptr<int64_t>()[r] >= 0 && rows.data_ptr<int64_t>()[r] < N, "regular_band_pass: rows out "
                  "of range");
  }
  Mode M{m, n, m / N, n / N, static_cast<int>(write)};
  Tensor lp = lambda_perp.contiguous(), lg = lambda_G.contiguous();
  Tensor ep_items = at::zeros({B * M.co}, K.options().dtype(at::kDouble));
  Tensor eg_items = at::zeros({B * M.co}, K.options().dtype(at::kDouble));
  Tensor o = write ? *out : Tensor();
  const bool use_plain = plain || !regular_has_avx2() || P < 8;
  std::vector<int64_t> col(P);  // the layout of phiT's rows (see RegularTables)
  for (int64_t p = 0; p < P; ++p) col[p] = p;
  if (P >= 8)
    for (int64_t v = 0; v < Pp / 8; ++v)
      for (int64_t l = 0; l < 8; ++l) col[std::min<int64_t>(8 * v, P - 8) + l] = 8 * v + l;
  if (f64) {
    RegularTables<double> T{N, P, D, Dp, Pp, mult.data_ptr<int64_t>(), phi.data_ptr<double>(),
                            phiT.data_ptr<double>(), minv.data_ptr<double>(), col.data(), 0, nullptr, nullptr,
                            nullptr, nullptr};
    run<double, double>(K, o, T, M, lp.data_ptr<double>(), lg.data_ptr<double>(), ep_items.data_ptr<double>(),
                        eg_items.data_ptr<double>(), true, nullptr);
  } else {
    RegularTables<float> T{N, P, D, Dp, Pp, mult.data_ptr<int64_t>(), phi.data_ptr<float>(), phiT.data_ptr<float>(),
                           minv.data_ptr<float>(), col.data(), classes ? reps.numel() : 0,
                           classes ? rows.data_ptr<int64_t>() : nullptr, classes ? cls.data_ptr<int64_t>() : nullptr,
                           classes ? reps.data_ptr<int64_t>() : nullptr, classes ? idx.data_ptr<int32_t>() : nullptr};
    std::vector<float> phit(N * D * P);  // Phi_x^T [N, D, P], unpadded: the expansion's coefficients
    const float* ph = phi.data_ptr<float>();
    for (int64_t x = 0; x < N; ++x)
      for (int64_t d = 0; d < D; ++d)
        for (int64_t p = 0; p < P; ++p) phit[(x * D + d) * P + p] = ph[(x * P + p) * Dp + d];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, K.scalar_type(), "regular_band_pass", [&] {
      run<scalar_t, float>(K, o, T, M, lp.data_ptr<double>(), lg.data_ptr<double>(), ep_items.data_ptr<double>(),
                           eg_items.data_ptr<double>(), use_plain, phit.data());
    });
  }
  // partial sums in item order: independent of the thread count
  return {ep_items.view({B, M.co}).sum(1), eg_items.view({B, M.co}).sum(1)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(equiproj_cpu, m) {
  m.def("regular_band_pass(Tensor K, Tensor mult, Tensor phi, Tensor phiT, Tensor minv, Tensor lambda_perp, "
        "Tensor lambda_G, Tensor(a!)? out, int write, bool plain, Tensor rows, Tensor cls, Tensor reps, Tensor idx) "
        "-> (Tensor, Tensor)",
        &regular_band_pass);
}

}  // namespace equiproj_cpu
