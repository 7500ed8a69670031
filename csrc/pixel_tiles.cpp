// CPU kernel of the steerable projection on pixel tiles (docs/math.md §6, "Pixel tiles"), for
// weights whose fields are in their own order (the "fields" layout of kernel_spaces/_pixel_plan.py).
//
// The weight W [B, m, n] (n = c_in k^s: input channel v owns the k^s contiguous columns v k^s ..)
// splits into tiles per field pair: copy u of an output field (d_out rows) against copy v of an
// input field (the d_in k^s contiguous columns of those channels). V's part in every tile of one
// field pair is spanned by an orthonormal A [r, d_out, d_in k^s] (float64), so per tile T
//   c_k = <A_k, T>,  R = T - sum_k c_k A_k,  E_G += |c|^2,  E_perp += |R|^2,
//   grad = 2 lambda_perp R + 2 lambda_G (T - R),
// with R formed explicitly (never a difference of norms: nearly equivariant weights keep their
// digits). Each tile is read twice from L1 (coefficients, then residual and gradient) and W once
// from memory; the gradient is written once, or added into `out` (which may be W itself: the
// decoupled step), every element read before it is written.
//
// Arithmetic in float64 for every weight dtype. The vectors run along a tile row (8 columns at a
// time, the tail masked; each basis row is zero-padded to a multiple of 8 columns), the r
// coefficient accumulators stay in registers (r <= kMaxUnrolled; larger ranks in blocks of 8).
// Compiled twice: AVX-512 (F, VL) chosen at run time where the CPU has it, and a plain loop
// otherwise (also what `plain=true` runs, for tests).
//
// Work item = one row block (one batch item, one copy of one output field) against every input
// field; items run in parallel, cut by cost into one contiguous range per thread (work_cuts.h), and
// write their own partial sums, added in item order (the result does not depend on the thread count).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "avx512_region.h"
#include "pixel_tiles.h"
#include "work_cuts.h"

namespace equiproj_cpu {
namespace {

using at::Tensor;

// One field pair as the kernel reads it (rows of the `pairs` table, in column order per output field).
struct TilePair {
  int64_t out_off, in_off, co, ci, d_out, n, r, basis_off;  // n: columns of a tile (d_in k^s)
};

enum Pair { kOutOff, kInOff, kOutCopies, kInCopies, kDOut, kTileCols, kRank, kBasisOff, kPairColumns };

constexpr int kMaxUnrolled = 16;

// What an item needs besides its indices.
template <typename X>
struct Call {
  const X* w;
  X* out;       // null: no gradient
  bool add;     // add the gradient into out instead of writing it
  int64_t m, n;
  const double* basis;  // padded rows: A_k row a of a pair at basis_off + (k d_out + a) np, np = n rounded up to 8
  const double* cp2;    // [B] 2 lambda_perp
  const double* cg2;    // [B] 2 lambda_G
};

inline int64_t padded(int64_t n) { return (n + 7) / 8 * 8; }

}  // namespace

// ---- the vector type (eight float64 lanes) and the pair kernel (pixel_tile_kernels.h) ---------------

namespace {
namespace tiles_plain {
struct V8 {
  double v[8];
};
inline V8 zero8() { return V8{{0, 0, 0, 0, 0, 0, 0, 0}}; }
inline V8 splat8(double a) { return V8{{a, a, a, a, a, a, a, a}}; }
template <typename X>
inline V8 load8(const X* p) {
  V8 r;
  for (int q = 0; q < 8; ++q) r.v[q] = double(p[q]);
  return r;
}
template <typename X>
inline V8 load8_masked(const X* p, int64_t cnt) {
  V8 r = zero8();
  for (int64_t q = 0; q < cnt; ++q) r.v[q] = double(p[q]);
  return r;
}
template <typename X>
inline void store8(X* p, V8 a) {
  for (int q = 0; q < 8; ++q) p[q] = static_cast<X>(a.v[q]);
}
template <typename X>
inline void store8_masked(X* p, V8 a, int64_t cnt) {
  for (int64_t q = 0; q < cnt; ++q) p[q] = static_cast<X>(a.v[q]);
}
inline V8 add8(V8 a, V8 b) {
  for (int q = 0; q < 8; ++q) a.v[q] += b.v[q];
  return a;
}
inline V8 mul8(V8 a, V8 b) {
  for (int q = 0; q < 8; ++q) a.v[q] *= b.v[q];
  return a;
}
inline V8 fmadd8(V8 a, V8 b, V8 c) {  // a b + c
  for (int q = 0; q < 8; ++q) c.v[q] += a.v[q] * b.v[q];
  return c;
}
inline V8 fnmadd8(V8 a, V8 b, V8 c) {  // c - a b
  for (int q = 0; q < 8; ++q) c.v[q] -= a.v[q] * b.v[q];
  return c;
}
inline double hsum8(V8 a) {
  return ((a.v[0] + a.v[4]) + (a.v[2] + a.v[6])) + ((a.v[1] + a.v[5]) + (a.v[3] + a.v[7]));
}
// out[i] = the sum of a[i]'s lanes, paired as ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7))
inline void hsum8x8(const V8* a, double* out) {
  for (int i = 0; i < 8; ++i) {
    const double* x = a[i].v;
    out[i] = ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
  }
}
#include "pixel_tile_kernels.h"
}  // namespace tiles_plain
}  // namespace

#ifdef EQUIPROJ_AVX512_X86
EQUIPROJ_AVX512_BEGIN
namespace {
namespace tiles_avx512 {
struct V8 {
  __m512d v;
};
inline V8 zero8() { return {_mm512_setzero_pd()}; }
inline V8 splat8(double a) { return {_mm512_set1_pd(a)}; }
inline V8 load8(const double* p) { return {_mm512_loadu_pd(p)}; }
inline V8 load8(const float* p) { return {_mm512_cvtps_pd(_mm256_loadu_ps(p))}; }
inline __mmask8 tail_mask(int64_t cnt) { return static_cast<__mmask8>((1u << cnt) - 1u); }
inline V8 load8_masked(const double* p, int64_t cnt) { return {_mm512_maskz_loadu_pd(tail_mask(cnt), p)}; }
inline V8 load8_masked(const float* p, int64_t cnt) {
  return {_mm512_cvtps_pd(_mm256_maskz_loadu_ps(tail_mask(cnt), p))};
}
inline void store8(double* p, V8 a) { _mm512_storeu_pd(p, a.v); }
inline void store8(float* p, V8 a) { _mm256_storeu_ps(p, _mm512_cvtpd_ps(a.v)); }
inline void store8_masked(double* p, V8 a, int64_t cnt) { _mm512_mask_storeu_pd(p, tail_mask(cnt), a.v); }
inline void store8_masked(float* p, V8 a, int64_t cnt) {
  _mm256_mask_storeu_ps(p, tail_mask(cnt), _mm512_cvtpd_ps(a.v));
}
inline V8 add8(V8 a, V8 b) { return {_mm512_add_pd(a.v, b.v)}; }
inline V8 mul8(V8 a, V8 b) { return {_mm512_mul_pd(a.v, b.v)}; }
inline V8 fmadd8(V8 a, V8 b, V8 c) { return {_mm512_fmadd_pd(a.v, b.v, c.v)}; }
inline V8 fnmadd8(V8 a, V8 b, V8 c) { return {_mm512_fnmadd_pd(a.v, b.v, c.v)}; }
// out[i] = the sum of a[i]'s lanes, paired as in the plain loop: a transposing reduction (21 operations
// for eight sums)
inline void hsum8x8(const V8* a, double* out) {
  __m512d t[4];
  for (int i = 0; i < 4; ++i)  // lanes (a_2i, a_2i+1) of element pairs (0, 1), (2, 3), (4, 5), (6, 7)
    t[i] = _mm512_add_pd(_mm512_unpacklo_pd(a[2 * i].v, a[2 * i + 1].v), _mm512_unpackhi_pd(a[2 * i].v, a[2 * i + 1].v));
  __m512d u[2];
  for (int i = 0; i < 2; ++i)  // 128-bit lanes: (a_4i, a_4i+1) over elements 0-3, 4-7, then (a_4i+2, a_4i+3)
    u[i] = _mm512_add_pd(_mm512_shuffle_f64x2(t[2 * i], t[2 * i + 1], 0x88),
                         _mm512_shuffle_f64x2(t[2 * i], t[2 * i + 1], 0xDD));
  _mm512_storeu_pd(out, _mm512_add_pd(_mm512_shuffle_f64x2(u[0], u[1], 0x88), _mm512_shuffle_f64x2(u[0], u[1], 0xDD)));
}
inline double hsum8(V8 a) {  // the same pairing as the plain loop
  const __m256d lo = _mm512_castpd512_pd256(a.v), hi = _mm512_extractf64x4_pd(a.v, 1);
  const __m256d s = _mm256_add_pd(lo, hi);  // (0+4, 1+5, 2+6, 3+7)
  alignas(32) double t[4];
  _mm256_store_pd(t, s);
  return (t[0] + t[2]) + (t[1] + t[3]);
}
#include "pixel_tile_kernels.h"
}  // namespace tiles_avx512
}  // namespace
EQUIPROJ_AVX512_END
#endif

TileKernels tile_kernels(bool plain) {
#ifdef EQUIPROJ_AVX512_X86
  static const bool avx512 = cpu_has_avx512();
  if (avx512 && !plain) return {&tiles_avx512::run_pair_f32, &tiles_avx512::run_pair_f64, "avx512"};
#endif
  return {&tiles_plain::run_pair_f32, &tiles_plain::run_pair_f64, "plain"};
}

namespace {

template <typename X>
void run(const Call<X>& C, const std::vector<TilePair>& pairs, const std::vector<int64_t>& group_first,
         const std::vector<int64_t>& item_group, const std::vector<int64_t>& item_copy, int64_t B,
         const TileKernels& K, double* ep_items, double* eg_items) {
  const int64_t per_batch = static_cast<int64_t>(item_group.size()), items = B * per_batch;
  int64_t max_rank = 1, max_dout = 1;
  for (const TilePair& p : pairs) {
    max_rank = p.r > max_rank ? p.r : max_rank;
    max_dout = p.d_out > max_dout ? p.d_out : max_dout;
  }
  // an item's cost: its weights times the flops per weight of each pair (a rank-0 pair still reads
  // and writes its entries)
  std::vector<double> group_cost(group_first.size() - 1, 0.0);
  for (size_t gi = 0; gi + 1 < group_first.size(); ++gi)
    for (int64_t pi = group_first[gi]; pi < group_first[gi + 1]; ++pi) {
      const TilePair& p = pairs[pi];
      group_cost[gi] += double(p.d_out * p.ci * p.n) * double(4 * p.r + 4);
    }
  std::vector<double> cost(items);
  for (int64_t it = 0; it < items; ++it) cost[it] = group_cost[item_group[it % per_batch]];
  parallel_by_cost(cost, [&](int64_t i0, int64_t i1) {
    std::vector<const X*> xr(max_dout);
    std::vector<X*> gr(max_dout);
    std::vector<double> coef(max_rank);  // the coefficients of one tile (ranks above kMaxUnrolled)
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t b = it / per_batch, gi = item_group[it % per_batch], u = item_copy[it % per_batch];
      const X* wb = C.w + b * C.m * C.n;
      X* ob = C.out ? C.out + b * C.m * C.n : nullptr;
      const double cp2 = C.out ? C.cp2[b] : 0, cg2 = C.out ? C.cg2[b] : 0;
      double ep = 0, eg = 0;
      for (int64_t pi = group_first[gi]; pi < group_first[gi + 1]; ++pi) {
        const TilePair& p = pairs[pi];
        for (int64_t a = 0; a < p.d_out; ++a) {
          const int64_t row = p.out_off + u * p.d_out + a;
          xr[a] = wb + row * C.n + p.in_off;
          if (ob) gr[a] = ob + row * C.n + p.in_off;
        }
        const double* A = C.basis + p.basis_off;
        if constexpr (std::is_same<X, float>::value)
          K.f32(xr.data(), ob ? gr.data() : nullptr, C.add, p.d_out, p.n, p.ci, p.r, A, cp2, cg2, coef.data(), ep, eg);
        else
          K.f64(xr.data(), ob ? gr.data() : nullptr, C.add, p.d_out, p.n, p.ci, p.r, A, cp2, cg2, coef.data(), ep, eg);
      }
      ep_items[it] = ep;
      eg_items[it] = eg;
    }
  });
}

// pixel_tile_pass(W, pairs [Q, 8] int64, basis f64, lambda_perp [B] f64, lambda_G [B] f64, out or None,
//                 write, plain, batch) -> (E_perp, E_G), each of shape `batch` (B = its product):
// W contiguous, B matrices [m, n] in order (any shape with B m n elements: a conv weight as it
// is); float64 energies for float64 weights, else float32.
// pairs: (out_off, in_off, out copies, in copies, d_out, tile columns, r, basis offset) per field
// pair, those of one output field consecutive and in column order, tiling [0, m) x [0, n); the
// basis of a pair: [r, d_out, tile columns rounded up to 8], zero-padded. write: 0 energies only,
// 1 write the gradient 2 lambda_perp (W - P W) + 2 lambda_G P W into out, 2 add it to out (out may be W).
std::tuple<Tensor, Tensor> pixel_tile_pass(const Tensor& W, const Tensor& pairs_t, const Tensor& basis,
                                           const Tensor& lambda_perp, const Tensor& lambda_G,
                                           const std::optional<Tensor>& out, int64_t write, bool plain,
                                           at::IntArrayRef batch) {
  TORCH_CHECK(W.device().is_cpu() && W.is_contiguous() &&
                  (W.scalar_type() == at::kFloat || W.scalar_type() == at::kDouble),
              "pixel_tile_pass: W must be a contiguous float32 or float64 CPU tensor");
  TORCH_CHECK(pairs_t.dim() == 2 && pairs_t.size(1) == kPairColumns && pairs_t.scalar_type() == at::kLong &&
                  pairs_t.is_contiguous() && pairs_t.device().is_cpu() && pairs_t.size(0) > 0,
              "pixel_tile_pass: pairs must be a contiguous int64 CPU table [Q, ", int64_t(kPairColumns), "]");
  TORCH_CHECK(basis.dim() == 1 && basis.scalar_type() == at::kDouble && basis.is_contiguous() && basis.device().is_cpu(),
              "pixel_tile_pass: basis must be a contiguous float64 CPU vector");
  TORCH_CHECK(write >= 0 && write <= 2, "pixel_tile_pass: write is 0, 1 or 2");
  int64_t B = 1;
  for (int64_t s : batch) {
    TORCH_CHECK(s >= 0, "pixel_tile_pass: negative batch size");
    B *= s;
  }
  // m: the rows the output fields cover; n: the columns of the first output field's pairs
  int64_t m = 0, n = 0;
  {
    const int64_t* r = pairs_t.data_ptr<int64_t>();
    for (int64_t q = 0; q < pairs_t.size(0); ++q) {
      const int64_t* c = r + q * kPairColumns;
      if (q == 0 || c[kOutOff] != r[(q - 1) * kPairColumns + kOutOff]) m += c[kOutCopies] * c[kDOut];
      if (c[kOutOff] == r[kOutOff]) n += c[kInCopies] * c[kTileCols];
    }
  }
  TORCH_CHECK(W.numel() == B * m * n, "pixel_tile_pass: W has ", W.numel(), " elements, not the ", B, " x ", m,
              " x ", n, " of the batch and the pairs");
  TORCH_CHECK(lambda_perp.numel() == B && lambda_G.numel() == B && lambda_perp.scalar_type() == at::kDouble &&
                  lambda_G.scalar_type() == at::kDouble && lambda_perp.is_contiguous() && lambda_G.is_contiguous(),
              "pixel_tile_pass: one float64 lambda per batch item");
  if (write) {
    TORCH_CHECK(out.has_value() && out->numel() == W.numel() && out->scalar_type() == W.scalar_type() &&
                    out->is_contiguous(),
                "pixel_tile_pass: out must be contiguous, of W's size and dtype");
  }
  // the pairs, checked: they must tile the matrix and their bases must lie in `basis`
  const int64_t Q = pairs_t.size(0), nb = basis.numel();
  const int64_t* rows = pairs_t.data_ptr<int64_t>();
  std::vector<TilePair> pairs(Q);
  std::vector<int64_t> group_first, item_group, item_copy;
  int64_t covered_rows = 0, col = 0, covered = 0;
  for (int64_t q = 0; q < Q; ++q) {
    const int64_t* c = rows + q * kPairColumns;
    TilePair p{c[kOutOff], c[kInOff], c[kOutCopies], c[kInCopies], c[kDOut], c[kTileCols], c[kRank], c[kBasisOff]};
    TORCH_CHECK(p.co > 0 && p.ci > 0 && p.d_out > 0 && p.n > 0 && p.r >= 0 && p.basis_off >= 0 &&
                    p.basis_off + p.r * p.d_out * padded(p.n) <= nb,
                "pixel_tile_pass: pair ", q, " is malformed or its basis lies outside `basis`");
    const bool first = q == 0 || rows[(q - 1) * kPairColumns + kOutOff] != p.out_off;
    if (first) {
      TORCH_CHECK(p.out_off == covered_rows && col == 0, "pixel_tile_pass: the output fields must tile the rows");
      group_first.push_back(q);
      for (int64_t u = 0; u < p.co; ++u) {
        item_group.push_back(static_cast<int64_t>(group_first.size()) - 1);
        item_copy.push_back(u);
      }
      covered_rows += p.co * p.d_out;
    } else {
      const TilePair& prev = pairs[q - 1];
      TORCH_CHECK(prev.co == p.co && prev.d_out == p.d_out, "pixel_tile_pass: pairs of one output field disagree");
    }
    TORCH_CHECK(p.in_off == col, "pixel_tile_pass: the pairs of an output field must tile the columns in order");
    col += p.ci * p.n;
    covered += p.co * p.d_out * p.ci * p.n;
    if (q + 1 == Q || rows[(q + 1) * kPairColumns + kOutOff] != p.out_off) {
      TORCH_CHECK(col == n, "pixel_tile_pass: the pairs of an output field must cover all ", n, " columns");
      col = 0;
    }
    pairs[q] = p;
  }
  group_first.push_back(Q);
  TORCH_CHECK(covered_rows == m && covered == m * n, "pixel_tile_pass: the pairs must tile the ", m, " x ", n,
              " matrix");
  const int64_t items = B * static_cast<int64_t>(item_group.size());
  Tensor ep_items = at::zeros({items}, W.options().dtype(at::kDouble));
  Tensor eg_items = at::zeros({items}, W.options().dtype(at::kDouble));
  const TileKernels K = tile_kernels(plain);
  const double* lp = lambda_perp.data_ptr<double>();
  const double* lg = lambda_G.data_ptr<double>();
  std::vector<double> cp2(B), cg2(B);
  for (int64_t b = 0; b < B; ++b) {
    cp2[b] = 2 * lp[b];
    cg2[b] = 2 * lg[b];
  }
  if (W.scalar_type() == at::kFloat) {
    Call<float> C{W.data_ptr<float>(), write ? out->data_ptr<float>() : nullptr, write == 2, m, n,
                  basis.data_ptr<double>(), cp2.data(), cg2.data()};
    run<float>(C, pairs, group_first, item_group, item_copy, B, K, ep_items.data_ptr<double>(),
               eg_items.data_ptr<double>());
  } else {
    Call<double> C{W.data_ptr<double>(), write ? out->data_ptr<double>() : nullptr, write == 2, m, n,
                   basis.data_ptr<double>(), cp2.data(), cg2.data()};
    run<double>(C, pairs, group_first, item_group, item_copy, B, K, ep_items.data_ptr<double>(),
                eg_items.data_ptr<double>());
  }
  // partial sums in item order: independent of the thread count
  const int64_t per = static_cast<int64_t>(item_group.size());
  const bool f64 = W.scalar_type() == at::kDouble;
  Tensor ep = at::empty(batch, W.options().dtype(f64 ? at::kDouble : at::kFloat));
  Tensor eg = at::empty(batch, ep.options());
  const double* epi = ep_items.data_ptr<double>();
  const double* egi = eg_items.data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) {
    double sp = 0, sg = 0;
    for (int64_t i = 0; i < per; ++i) {
      sp += epi[b * per + i];
      sg += egi[b * per + i];
    }
    if (f64) {
      ep.data_ptr<double>()[b] = sp;
      eg.data_ptr<double>()[b] = sg;
    } else {
      ep.data_ptr<float>()[b] = static_cast<float>(sp);
      eg.data_ptr<float>()[b] = static_cast<float>(sg);
    }
  }
  return {ep, eg};
}

std::string pixel_tile_isa() { return tile_kernels(false).isa; }

// Test hook: the item ranges of cuts_by_cost for these costs, parts and least cost per part.
std::vector<int64_t> cost_cuts(std::vector<double> cost, int64_t parts, double min_part) {
  TORCH_CHECK_VALUE(parts >= 1, "cost_cuts: parts must be at least 1");
  return cuts_by_cost(cost, parts, min_part);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(equiproj_cpu, m) {
  m.def("pixel_tile_pass(Tensor W, Tensor pairs, Tensor basis, Tensor lambda_perp, Tensor lambda_G, "
        "Tensor(a!)? out, int write, bool plain, int[] batch) -> (Tensor, Tensor)",
        &pixel_tile_pass);
  m.def("pixel_tile_isa() -> str", &pixel_tile_isa);
  m.def("cost_cuts(float[] cost, int parts, float min_part=0) -> int[]", &cost_cuts);
}

}  // namespace equiproj_cpu
