// CPU kernel of the fused penalty op: E_perp, E_G (and on request the gradient) of many
// weights in one pass over each, executing the packed field-pair plan (equiproj/_plan.py).
//
//   W_struct[i, j] = W[perm_out[i], perm_in[j]]; per field pair and tile (u, v):
//   T = W_struct[out_offset + u d_out : +d_out, in_offset + v d_in : +d_in]
//   coef_k = <A_k, T>,  R = T - sum_k coef_k A_k,  E_perp += ||R||^2,  E_G += sum_k coef_k^2
//   grad = 2 lambda_perp R + 2 lambda_G (T - R)   (user coordinates, W's dtype)
//
// Work item = one row block (one copy of one output field of one matrix): its d_out rows are
// processed against every input field, so reads and writes stream along rows. Items run in
// parallel (at::parallel_for); each writes its own partial sums, which are then added in item
// order: the result does not depend on the thread count and uses no atomics.
// Tiles are computed in float64 whatever the weight dtype (exact residual form, so nearly
// equivariant fp32 weights keep their digits); the energies are returned in float32 for
// fp16/bf16/fp32 weights and float64 for float64 weights.
//
// Each field pair is classified once per call (plan_types.h, Kind): r = 0 (sum of squares), a
// basis spanning the tile (all of it equivariant), A = +-I/sqrt(d) (trace form), small square
// tiles, the generic kernel (two register-blocked products with the basis), or an orbit pair of two
// permutation fields (no basis: the mean over each orbit, from an orbit table or a closed form,
// docs/math.md §9). The kernels (tile_kernels.h) are compiled twice, for the baseline
// x86-64 ISA and for AVX2+FMA, and chosen at run time (isa(), set_isa() for tests).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <functional>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <atomic>
#include <string>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "plan_columns.h"
#include "orbit_products.h"
#include "orbit_tables.h"
#include "pixel_tiles.h"
#include "plan_types.h"
#include "work_cuts.h"

#if defined(__GNUC__) && defined(__x86_64__)
#define EQUIPROJ_X86 1
#include <immintrin.h>
#endif

namespace equiproj_cpu {

static_assert(kMaxSmall == 5, "tile_kernels.h dispatches 1..5");

namespace base {
#include "simd4.h"
#include "orbit_closed.h"
#include "tile_kernels.h"
}  // namespace base

// The same kernels compiled for AVX2+FMA, used when the CPU has them (select_kernels).
#ifdef EQUIPROJ_X86
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
#define EQUIPROJ_AVX2 1
namespace avx2 {
#include "simd4.h"
#include "transpose8.h"
#include "orbit_closed.h"
#include "tile_kernels.h"
}  // namespace avx2
#undef EQUIPROJ_AVX2
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace {

using at::Tensor;

struct Kernels {
  void (*f32)(const Pair&, int64_t, const float* const*, float* const*, acc_t, acc_t, acc_t*, acc_t&, acc_t&,
              PivotResidualsFn32);
  void (*f64)(const Pair&, int64_t, const double* const*, double* const*, acc_t, acc_t, acc_t*, acc_t&, acc_t&);
  const char* isa;
  ClosedChunkKernels<float> c32;
  ClosedChunkKernels<double> c64;
  // the tiles of kGeneric pairs in eight float64 lanes (pixel_tiles.h), where the CPU has AVX-512: null, the
  // four-lane generic_pair of tile_kernels.h
  TilePairFn32 tiles32 = nullptr;
  TilePairFn64 tiles64 = nullptr;
  // float32 product orbit pairs with whole blocks of pixels in 16-lane registers (orbit_products.h), where
  // the CPU has AVX-512: null, the tables' kernel
  ProductPairFn32 products32 = nullptr;
  // the means and pass 2 of float32 orbit tables of at most sixteen orbits, the means in 16-lane registers
  // (orbit_tables.h), where the CPU has AVX-512: null, the tables' eight-lane passes
  PivotResidualsFn32 tables32 = nullptr;
  const ClosedChunkKernels<float>& chunks(float*) const { return c32; }
  const ClosedChunkKernels<double>& chunks(double*) const { return c64; }
};

const Kernels kBaseline{&base::run_pair_float, &base::run_pair_double, "baseline", base::closed_chunk_kernels_float(),
                        base::closed_chunk_kernels_double()};

bool has_avx2() {
#ifdef EQUIPROJ_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

// wide: the tiles of kGeneric pairs in the AVX-512 pair kernel of pixel tiles where the CPU has it
Kernels best_kernels(bool wide) {
#ifdef EQUIPROJ_X86
  if (has_avx2()) {
    Kernels k{&avx2::run_pair_float, &avx2::run_pair_double, "avx2", avx2::closed_chunk_kernels_float(),
              avx2::closed_chunk_kernels_double()};
    const TileKernels t = tile_kernels(false);
    if (wide && std::string(t.isa) == "avx512") {
      k.isa = "avx2+avx512";
      k.tiles32 = t.f32;
      k.tiles64 = t.f64;
      k.products32 = product_pair_kernel();
      k.tables32 = pivot_residuals_kernel();
    }
    return k;
  }
#endif
  return kBaseline;
}

std::atomic<const Kernels*> g_kernels{nullptr};

const Kernels& kernels() {
  static const Kernels best = best_kernels(true);
  const Kernels* k = g_kernels.load(std::memory_order_acquire);
  return k ? *k : best;
}

template <typename X>
inline void run_pair(const Pair& p, int64_t dout, const X* const* x, X* const* g, acc_t cp2, acc_t cg2, Scratch& s,
                     acc_t& ep, acc_t& eg) {
  const Kernels& k = kernels();
  if (p.kind == Kind::kGeneric && k.tiles32) {  // eight lanes: the rank's coefficients of one tile in registers
    s.coef.resize(std::max<int64_t>(p.r, 4));
    if constexpr (std::is_same<X, float>::value)
      k.tiles32(x, g, p.accumulate && g, dout, p.di, p.ci, p.r, p.Ap, cp2, cg2, s.coef.data(), ep, eg);
    else
      k.tiles64(x, g, p.accumulate && g, dout, p.di, p.ci, p.r, p.Ap, cp2, cg2, s.coef.data(), ep, eg);
    return;
  }
  if constexpr (std::is_same<X, float>::value) {
    if (p.kind == Kind::kOrbit && k.products32 && product_pair_fits(p)) {  // whole blocks of pixels in two registers
      s.coef.resize(std::max<int64_t>(product_pair_scratch(p, dout), 8));
      k.products32(p, dout, x, g, cp2, cg2, s.coef.data(), ep, eg);
      return;
    }
  }
  if (p.kind == Kind::kGeneric || p.kind == Kind::kSmall)  // kSmall runs generic_pair on the baseline ISA
    s.coef.resize(std::max<int64_t>(p.ci * ((p.r + 3) / 4 * 4), 4));
  else if (p.kind == Kind::kOrbit)  // the orbit sums, then (tables, products) room for one orbit row
    s.coef.resize(std::max<int64_t>(p.form == kOrbitPoints ? p.di  // one mean row
                                    : p.form == kOrbitCyclic || p.form == kOrbitDihedral
                                        ? orbit_closed_scratch(p.ci, p.r, p.form == kOrbitDihedral)
                                        : p.ci * p.r + p.di + p.r / 8 + 1  // + one byte per orbit
                                              + (permuted_means_fit(p) ? (permuted_means_scratch(p) + 1) / 2 : 0),
                                    4));
  if constexpr (std::is_same<X, float>::value)
    k.f32(p, dout, x, g, cp2, cg2, s.coef.data(), ep, eg, k.tables32);
  else
    k.f64(p, dout, x, g, cp2, cg2, s.coef.data(), ep, eg);
}

// ---- one row block of one matrix -------------------------------------------------------------------

// float32/float64 rows without a column permutation or stride are used in place; anything else
// (half types, permuted or strided columns) is staged through float64 buffers. To accumulate
// (out += gradient, e.g. the decoupled step W <- W - rate (W - P W) with out = W), a pair's gradient
// rows are staged and added once the pair is computed: the output may then alias the weight, since
// a pair only writes its own columns after it has read them.
template <typename scalar_t>
void process_item(const Layer& L, int64_t b, const OutGroup& G, int64_t u, Scratch& s, acc_t* part) {
  constexpr bool kNative = std::is_same<scalar_t, float>::value || std::is_same<scalar_t, double>::value;
  using X = typename std::conditional<kNative, scalar_t, acc_t>::type;
  const int64_t d = G.d_out;
  const scalar_t* base = static_cast<const scalar_t*>(L.data) + L.batch_off[b];
  scalar_t* gbase = L.grad ? static_cast<scalar_t*>(L.grad) + b * L.m * L.n : nullptr;
  const bool want_grad = gbase != nullptr;
  const acc_t cp2 = want_grad ? L.cp2[b] : 0, cg2 = want_grad ? L.cg2[b] : 0;
  const bool direct = kNative && L.sn == 1 && L.perm_in == nullptr;
  const bool accumulate = L.accumulate;
  s.urow.resize(d);
  for (int64_t a = 0; a < d; ++a) {
    const int64_t i = G.out_off + u * d + a;
    s.urow[a] = L.perm_out ? L.perm_out[i] : i;
  }
  acc_t ep = 0, eg = 0;
  if (direct) {
    std::vector<const X*>& xr = s.rows_in(static_cast<X*>(nullptr));
    std::vector<X*>& gr = s.rows_out(static_cast<X*>(nullptr));
    xr.resize(d);
    gr.resize(d);
    std::vector<X>& stage = s.stage(static_cast<X*>(nullptr));
    for (const Pair& p : G.pairs) {
      const int64_t span = p.ci * p.di;
      const bool staged = accumulate && !p.accumulate;  // pairs that add in place read before they write
      if (staged) stage.resize(d * span);
      for (int64_t a = 0; a < d; ++a) {
        xr[a] = reinterpret_cast<const X*>(base + s.urow[a] * L.sm + p.in_off);
        if (want_grad)
          gr[a] = staged ? stage.data() + a * span : reinterpret_cast<X*>(gbase + s.urow[a] * L.n + p.in_off);
      }
      run_pair<X>(p, d, xr.data(), want_grad ? gr.data() : nullptr, cp2, cg2, s, ep, eg);
      if (!staged) continue;
      for (int64_t a = 0; a < d; ++a) {
        X* dst = reinterpret_cast<X*>(gbase + s.urow[a] * L.n + p.in_off);
        const X* src = gr[a];
        for (int64_t j = 0; j < span; ++j) dst[j] += src[j];
      }
    }
  } else {
    std::vector<const acc_t*>& xr = s.rows_in(static_cast<acc_t*>(nullptr));
    std::vector<acc_t*>& gr = s.rows_out(static_cast<acc_t*>(nullptr));
    xr.resize(d);
    gr.resize(d);
    for (const Pair& p : G.pairs) {
      const int64_t span = p.ci * p.di;
      s.x.resize(d * span);
      if (want_grad) s.g.resize(d * span);
      for (int64_t a = 0; a < d; ++a) {
        const scalar_t* src = base + s.urow[a] * L.sm;
        acc_t* dst = s.x.data() + a * span;
        if (L.perm_in) {
          const int64_t* pi = L.perm_in + p.in_off;
          for (int64_t j = 0; j < span; ++j) dst[j] = static_cast<acc_t>(src[pi[j] * L.sn]);
        } else {
          const scalar_t* sr = src + p.in_off * L.sn;
          for (int64_t j = 0; j < span; ++j) dst[j] = static_cast<acc_t>(sr[j * L.sn]);
        }
        xr[a] = dst;
        gr[a] = want_grad ? s.g.data() + a * span : nullptr;
      }
      run_pair<acc_t>(p, d, xr.data(), want_grad ? gr.data() : nullptr, cp2, cg2, s, ep, eg);
      if (!want_grad) continue;
      for (int64_t a = 0; a < d; ++a) {
        scalar_t* dst = gbase + s.urow[a] * L.n;
        const acc_t* src = gr[a];
        if (L.perm_in) {
          const int64_t* pi = L.perm_in + p.in_off;
          if (accumulate)
            for (int64_t j = 0; j < span; ++j) dst[pi[j]] = static_cast<scalar_t>(static_cast<acc_t>(dst[pi[j]]) + src[j]);
          else
            for (int64_t j = 0; j < span; ++j) dst[pi[j]] = static_cast<scalar_t>(src[j]);
        } else {
          scalar_t* dr = dst + p.in_off;
          if (accumulate)
            for (int64_t j = 0; j < span; ++j) dr[j] = static_cast<scalar_t>(static_cast<acc_t>(dr[j]) + src[j]);
          else
            for (int64_t j = 0; j < span; ++j) dr[j] = static_cast<scalar_t>(src[j]);
        }
      }
    }
  }
  part[0] = ep;
  part[1] = eg;
}

// ---- one row block of large closed-form pairs, split into row chunks ------------------------------

// A row block of closed-form orbit pairs (C_N, D_N regular) with at least 2 kChunkRows rows (a C_4096
// layer is one such block) runs as chunks of kChunkRows rows in parallel: pass 1 of each chunk, the
// chunks' orbit sums added in chunk order, pass 2 of each chunk. The chunks depend on the block
// only, so the result does not depend on the thread count. Weights read in place only.
constexpr int64_t kChunkRows = 1024;

bool splits(const Layer& L, const OutGroup& G, bool direct) {
  if (!direct || G.d_out < 2 * kChunkRows) return false;
  for (const Pair& p : G.pairs)  // the closed forms only: the chunk kernels and their scratch are theirs
    if (p.kind != Kind::kOrbit || (p.form != kOrbitCyclic && p.form != kOrbitDihedral)) return false;
  return true;
}

// A row block of kOrbitPoints pairs with at least kPointRows rows (a 4096-point field) runs its orbits
// of output points in parallel, in chunks of about kChunkRows / 4 rows fixed by the plan, their
// partial sums added in chunk order (independent of the thread count); every orbit's two passes
// touch its own rows only. Weights read in place only.
constexpr int64_t kPointRows = 512;

bool points_splits(const OutGroup& G, bool direct) {
  if (!direct || G.d_out < kPointRows) return false;
  for (const Pair& p : G.pairs)
    if (p.kind != Kind::kOrbit || p.form != kOrbitPoints) return false;
  return true;
}

// The rows of pair p in row block u of a split group: where W's rows start (after the output
// permutation) and where their gradient rows start (null without a gradient).
template <typename X>
void split_rows(const Layer& L, const OutGroup& G, int64_t u, const Pair& p, const X* base, X* gbase,
                std::vector<const X*>& xr, std::vector<X*>& gr) {
  const int64_t d = G.d_out;
  for (int64_t a = 0; a < d; ++a) {
    const int64_t i = G.out_off + u * d + a, row = L.perm_out ? L.perm_out[i] : i;
    xr[a] = base + row * L.sm + p.in_off;
    gr[a] = gbase ? gbase + row * L.n + p.in_off : nullptr;
  }
}

template <typename X>
void process_points_split(const Layer& L, int64_t b, const OutGroup& G, int64_t u, acc_t* part) {
  const int64_t d = G.d_out;
  const X* base = static_cast<const X*>(L.data) + L.batch_off[b];
  X* gbase = L.grad ? static_cast<X*>(L.grad) + b * L.m * L.n : nullptr;
  const acc_t cp2 = gbase ? L.cp2[b] : 0, cg2 = gbase ? L.cg2[b] : 0;
  std::vector<const X*> xr(d);
  std::vector<X*> gr(d);
  acc_t ep = 0, eg = 0;
  for (const Pair& p : G.pairs) {
    split_rows(L, G, u, p, base, gbase, xr, gr);
    const int64_t R = p.orbit[0], per = std::max<int64_t>(1, kChunkRows / 4 / p.factor);
    const int64_t chunks = (R + per - 1) / per;
    std::vector<acc_t> e(2 * chunks, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> m(std::max<int64_t>(p.di, 4));  // one mean row
      for (int64_t c = c0; c < c1; ++c) {
        Pair q = p;
        q.orbit_begin = c * per;
        q.orbit_end = std::min(R, (c + 1) * per);
        if constexpr (std::is_same<X, float>::value)
          kernels().f32(q, d, xr.data(), gbase ? gr.data() : nullptr, cp2, cg2, m.data(), e[2 * c], e[2 * c + 1],
                        nullptr);
        else
          kernels().f64(q, d, xr.data(), gbase ? gr.data() : nullptr, cp2, cg2, m.data(), e[2 * c], e[2 * c + 1]);
      }
    });
    for (int64_t c = 0; c < chunks; ++c) {
      ep += e[2 * c];
      eg += e[2 * c + 1];
    }
  }
  part[0] = ep;
  part[1] = eg;
}

template <typename X>
void process_split(const Layer& L, int64_t b, const OutGroup& G, int64_t u, Scratch&, acc_t* part) {
  if (points_splits(G, true)) return process_points_split<X>(L, b, G, u, part);
  const int64_t d = G.d_out, chunks = (d + kChunkRows - 1) / kChunkRows;
  const X* base = static_cast<const X*>(L.data) + L.batch_off[b];
  X* gbase = L.grad ? static_cast<X*>(L.grad) + b * L.m * L.n : nullptr;
  const acc_t cp2 = gbase ? L.cp2[b] : 0, cg2 = gbase ? L.cg2[b] : 0;
  const ClosedChunkKernels<X>& k = kernels().chunks(static_cast<X*>(nullptr));
  std::vector<const X*> xr(d);
  std::vector<X*> gr(d);
  acc_t ep = 0, eg = 0;
  for (const Pair& p : G.pairs) {
    split_rows(L, G, u, p, base, gbase, xr, gr);
    const int64_t scratch = orbit_closed_scratch(p.ci, p.r, p.form == kOrbitDihedral);
    std::vector<acc_t> work(chunks * scratch, 0.0), ep_chunk(chunks, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        k.sums(p, c * kChunkRows, std::min(d, (c + 1) * kChunkRows), xr.data(), work.data() + c * scratch);
    });
    for (int64_t c = 1; c < chunks; ++c)
      for (int64_t j = 0; j < scratch; ++j) work[j] += work[c * scratch + j];
    k.prepare(p, work.data(), eg);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        k.residuals(p, c * kChunkRows, std::min(d, (c + 1) * kChunkRows), xr.data(), gbase ? gr.data() : nullptr,
                    cp2, cg2, work.data(), ep_chunk[c]);
    });
    for (int64_t c = 0; c < chunks; ++c) ep += ep_chunk[c];
  }
  part[0] = ep;
  part[1] = eg;
}

// ---- host-side preparation and checks --------------------------------------------------------------

// ---- host plans and permutations, cached across calls -------------------------------------------

// A weak reference to a tensor: it does not keep the tensor (nor its storage) alive, and says whether
// the tensor has been freed.
class WeakTensorRef {
 public:
  WeakTensorRef() = default;
  explicit WeakTensorRef(const Tensor& t) : ref_(t.getIntrusivePtr()) {}
  bool expired() const { return ref_.expired(); }

 private:
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> ref_{
      c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>::reclaim(c10::UndefinedTensorImpl::singleton())};
};

// The host form of one layer's plan: the basis in float64, the transposed basis copies of the small
// and generic pairs, the orbit tables, and the output groups whose pairs point into these vectors.
// groups_in_place differs from groups only in Pair::accumulate (set where the pair may add its
// gradient to an output that aliases the weight), so that a call never writes to a shared plan.
struct HostPlan {
  WeakTensorRef meta, basis;  // the caller's tensors, while they live (below)
  std::vector<acc_t> basis_f64, basis_t, basis_pad;  // basis_pad: the kGeneric pairs' rows padded to 8 columns
  std::vector<int32_t> orbit;  // orbit indices of the kOrbitTable pairs, inverse factor tables of kOrbitProduct
  std::vector<acc_t> sign;  // the entries' signs of the kOrbitSigned pairs
  std::vector<OutGroup> groups, groups_in_place;
  std::vector<int64_t> group_start;
  int64_t blocks = 0;
  HostPlan() = default;
  HostPlan(const HostPlan&) = delete;  // the pairs point into this object's vectors
  HostPlan& operator=(const HostPlan&) = delete;
  bool expired() const { return meta.expired() || basis.expired(); }
  size_t bytes() const {
    size_t b = (basis_f64.size() + basis_t.size() + basis_pad.size() + sign.size()) * sizeof(acc_t) +
               orbit.size() * sizeof(int32_t);
    for (const auto& G : groups) b += 2 * G.pairs.size() * sizeof(Pair);
    return b;
  }
};

// A checked permutation: null data for the identity, else a copy of its entries.
struct CheckedPerm {
  WeakTensorRef perm;  // the caller's tensor, while it lives
  std::vector<int64_t> entries;
  const int64_t* data = nullptr;
  bool expired() const { return perm.expired(); }
  size_t bytes() const { return entries.size() * sizeof(int64_t); }
};

// Tensors are identified by address, version counter (bumped by every in-place change made through
// torch), dtype, sizes and strides. An entry keeps a weak reference to the tensors it was built from:
// while they live, no other storage can have their address, so a key match is the same memory in the
// same version; once one of them is freed the entry is stale and dropped (on lookup, and on every
// insert, so that an entry never outlives its plan by more than one insert, nor holds its memory).
// Inference tensors have no version counter and are not cached. Writes that bypass torch (numpy
// views, .data_ptr() in C++) are not seen.
template <size_t N>
using Key = std::array<int64_t, N>;

template <size_t N>
struct KeyHash {
  size_t operator()(const Key<N>& k) const {
    size_t h = 0;
    for (int64_t v : k) h = (h ^ std::hash<int64_t>()(v)) * 1099511628211ull;
    return h;
  }
};

template <size_t N>
void push_tensor_key(Key<N>& k, size_t& i, const Tensor& t, int64_t dims) {
  k[i++] = reinterpret_cast<intptr_t>(t.data_ptr());
  k[i++] = t._version();
  k[i++] = static_cast<int64_t>(t.scalar_type());
  for (int64_t d = 0; d < dims; ++d) {
    k[i++] = t.size(d);
    k[i++] = t.stride(d);
  }
}

// A bounded map from key to shared entry: stale entries are dropped, and the map is emptied when it
// holds kCapacity entries or kMaxBytes (entries in use stay alive through the callers' shared_ptrs).
// An entry above kMaxEntryBytes is not kept: its copy would double the memory of a large plan that
// the Python caches bound by bytes, and rebuilding it costs little beside the call that uses it.
// Lookups and inserts are serialized by a mutex; entries are built outside it.
template <size_t N, typename Entry>
class BoundedCache {
 public:
  static constexpr size_t kCapacity = 256;
  static constexpr size_t kMaxBytes = size_t(64) << 20;
  static constexpr size_t kMaxEntryBytes = size_t(1) << 20;
  std::shared_ptr<const Entry> find(const Key<N>& k) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = map_.find(k);
    if (it == map_.end()) return nullptr;
    if (it->second->expired()) {
      bytes_ -= it->second->bytes();
      map_.erase(it);
      return nullptr;
    }
    return it->second;
  }
  void insert(const Key<N>& k, std::shared_ptr<const Entry> e) {
    if (e->bytes() > kMaxEntryBytes) return;
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = map_.begin(); it != map_.end();) {
      if (it->second->expired()) {
        bytes_ -= it->second->bytes();
        it = map_.erase(it);
      } else {
        ++it;
      }
    }
    if (map_.size() >= kCapacity || bytes_ + e->bytes() > kMaxBytes) {
      map_.clear();
      bytes_ = 0;
    }
    auto old = map_.find(k);
    if (old != map_.end()) bytes_ -= old->second->bytes();
    bytes_ += e->bytes();
    map_[k] = std::move(e);
  }
  int64_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return map_.size();
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    map_.clear();
    bytes_ = 0;
  }

 private:
  std::mutex mutex_;
  size_t bytes_ = 0;
  std::unordered_map<Key<N>, std::shared_ptr<const Entry>, KeyHash<N>> map_;
};

using PlanKey = Key<2 + 3 + 4 + 3 + 2>;  // m, n; meta (2-d); basis (1-d)
using PermKey = Key<1 + 3 + 2>;          // size; perm (1-d)

BoundedCache<std::tuple_size<PlanKey>::value, HostPlan>& plan_cache() {
  static auto* c = new BoundedCache<std::tuple_size<PlanKey>::value, HostPlan>();  // never destroyed: no exit-order issue
  return *c;
}

BoundedCache<std::tuple_size<PermKey>::value, CheckedPerm>& perm_cache() {
  static auto* c = new BoundedCache<std::tuple_size<PermKey>::value, CheckedPerm>();
  return *c;
}

// The permutation's entries (null for the identity), checked once per distinct tensor; `pins` keeps
// the cache entry (and so the entries) alive for the call.
const int64_t* checked_perm(const Tensor& perm, int64_t size, const char* name, int64_t layer,
                            std::vector<std::shared_ptr<const void>>& pins) {
  TORCH_CHECK_TYPE(perm.device().is_cpu() && perm.scalar_type() == at::kLong && perm.dim() == 1, "fused_energies: layer ",
                   layer, ": ", name, " must be a 1-d CPU int64 tensor, got ", perm.scalar_type(), " ", perm.sizes(),
                   " on ", perm.device());
  TORCH_CHECK_VALUE(perm.numel() == size, "fused_energies: layer ", layer, ": ", name, " has ", perm.numel(),
                    " entries but W has ", size, name[5] == 'o' ? " rows" : " columns");
  const bool cacheable = !perm.is_inference();
  PermKey key{};
  if (cacheable) {
    size_t k = 0;
    key[k++] = size;
    push_tensor_key(key, k, perm, 1);
    if (auto hit = perm_cache().find(key)) {
      pins.push_back(hit);
      return hit->data;
    }
  }
  auto entry = std::make_shared<CheckedPerm>();
  entry->perm = WeakTensorRef(perm);
  const Tensor contiguous = perm.contiguous();
  entry->entries.assign(contiguous.data_ptr<int64_t>(), contiguous.data_ptr<int64_t>() + size);
  const int64_t* d = entry->entries.data();
  std::vector<char> seen(size, 0);
  bool identity = true;
  for (int64_t i = 0; i < size; ++i) {
    TORCH_CHECK_VALUE(d[i] >= 0 && d[i] < size && !seen[d[i]], "fused_energies: layer ", layer, ": ", name,
                " is not a permutation of 0..", size - 1);
    seen[d[i]] = 1;
    identity = identity && d[i] == i;
  }
  entry->data = identity ? nullptr : d;
  if (cacheable) perm_cache().insert(key, entry);
  pins.push_back(entry);
  return entry->data;
}

bool is_scaled_identity(const acc_t* A, int64_t d) {
  const acc_t s = acc_t(1) / std::sqrt(acc_t(d));
  const acc_t sign = A[0] < 0 ? -1 : 1;
  for (int64_t a = 0; a < d; ++a)
    for (int64_t b = 0; b < d; ++b)
      if (std::abs(A[a * d + b] - (a == b ? sign * s : acc_t(0))) > 1e-12) return false;
  return true;
}

// Whether the r x s rows of A (a basis of the s-entry tiles) are orthonormal and span them (r = s), so
// that P(T) = sum_k <A_k, T> A_k = T: checked on the Gram matrix, for tiles of up to kMaxWhole entries.
constexpr int64_t kMaxWhole = 64;

bool spans_tiles(const acc_t* A, int64_t r, int64_t s) {
  if (r != s || s > kMaxWhole) return false;
  for (int64_t k = 0; k < r; ++k)
    for (int64_t l = 0; l <= k; ++l) {
      acc_t dot = 0;
      for (int64_t e = 0; e < s; ++e) dot += A[k * s + e] * A[l * s + e];
      if (std::abs(dot - (k == l ? 1 : 0)) > 1e-12) return false;
    }
  return true;
}

void check_plan_tensors(const Tensor& meta_in, const Tensor& basis_in, int64_t layer) {
  TORCH_CHECK_TYPE(meta_in.device().is_cpu() && meta_in.scalar_type() == at::kLong && meta_in.dim() == 2 &&
                  meta_in.size(1) == kPlanColumns,
              "fused_energies: layer ", layer, ": meta must be a CPU int64 tensor of shape [P, ", kPlanColumns, "], got ",
              meta_in.scalar_type(), " ", meta_in.sizes(), " on ", meta_in.device());
  TORCH_CHECK_TYPE(basis_in.device().is_cpu() && basis_in.is_floating_point() && basis_in.dim() == 1,
              "fused_energies: layer ", layer, ": basis must be a 1-d floating CPU tensor");
}

// The int32 data of a kOrbitPoints pair (layout in orbit_perm_kernels.h) from its segment T: sigma_out
// [ng, dout], then sigma_in [ng, din] as exact integers, each row checked to be a permutation; the
// orbits of the output points, each representative a0 first, and for each row a the element h with
// h a0 = a.
void append_point_tables(std::vector<int32_t>& out, const acc_t* T, int64_t ng, int64_t dout, int64_t din,
                         int64_t layer, int64_t row) {
  std::vector<int32_t> so(ng * dout), si(ng * din), si_inv(ng * din);
  for (int64_t f = 0; f < 2; ++f) {
    const int64_t d = f == 0 ? dout : din;
    const acc_t* src = T + (f == 0 ? 0 : ng * dout);
    for (int64_t e = 0; e < ng; ++e) {
      int32_t* inv = f == 0 ? nullptr : si_inv.data() + e * din;
      std::vector<char> seen(d, 0);
      for (int64_t c = 0; c < d; ++c) {
        const acc_t t = src[e * d + c];
        TORCH_CHECK_VALUE(t >= 0 && t < d && t == std::floor(t) && !seen[static_cast<int64_t>(t)],
                          "fused_energies: layer ", layer, ": malformed permutation table in plan row ", row);
        seen[static_cast<int64_t>(t)] = 1;
        (f == 0 ? so[e * dout + c] : si[e * din + c]) = static_cast<int32_t>(t);
        if (inv) inv[static_cast<int64_t>(t)] = static_cast<int32_t>(c);
      }
    }
  }
  std::vector<int32_t> start{0}, rows, elem;
  std::vector<char> done(dout, 0);
  for (int64_t a0 = 0; a0 < dout; ++a0) {
    if (done[a0]) continue;
    int64_t fix = -1;
    for (int64_t e = 0; e < ng && fix < 0; ++e)
      if (so[e * dout + a0] == a0) fix = e;
    TORCH_CHECK_VALUE(fix >= 0, "fused_energies: layer ", layer, ": the permutations of plan row ", row,
                      " have no identity");
    rows.push_back(static_cast<int32_t>(a0));
    elem.push_back(static_cast<int32_t>(fix));
    done[a0] = 1;
    for (int64_t e = 0; e < ng; ++e) {
      const int32_t a = so[e * dout + a0];
      if (done[a]) continue;
      done[a] = 1;
      rows.push_back(a);
      elem.push_back(static_cast<int32_t>(e));
    }
    start.push_back(static_cast<int32_t>(rows.size()));
  }
  out.push_back(static_cast<int32_t>(start.size() - 1));
  out.insert(out.end(), si.begin(), si.end());
  out.insert(out.end(), si_inv.begin(), si_inv.end());
  out.insert(out.end(), so.begin(), so.end());
  out.insert(out.end(), start.begin(), start.end());
  out.insert(out.end(), rows.begin(), rows.end());
  out.insert(out.end(), elem.begin(), elem.end());
}

// Pairs whose rows are independent of each other (r = 0, and kWhole: no coefficient mixes rows)
// need no tiling. Adjacent ones of one kind join into one pair over their columns, and a group of
// only such pairs runs about kJoinedRowWork entries of rows (many row blocks) as one row block. Why:
// on small fields (the 1-row blocks of scalar fields) the calls per item and per pair cost more
// than the entries they process (measured on an O(3) MLP: docs/benchmarks.md).
constexpr int64_t kJoinedRowWork = 4096;

inline bool separable(const Pair& p) { return p.kind == Kind::kZero || p.kind == Kind::kWhole; }

void join_separable_rows(std::vector<OutGroup>& groups, int64_t n) {
  std::vector<OutGroup> out;
  out.reserve(groups.size());
  for (OutGroup& G : groups) {
    std::vector<Pair> pairs;
    for (const Pair& p : G.pairs) {
      if (!pairs.empty() && separable(p) && pairs.back().kind == p.kind) {
        Pair& q = pairs.back();  // one span of columns: ci = 1 copy of di columns
        q.di = q.ci * q.di + p.ci * p.di;
        q.ci = 1;
      } else {
        pairs.push_back(p);
      }
    }
    G.pairs = std::move(pairs);
    const bool rows_free = std::all_of(G.pairs.begin(), G.pairs.end(), separable);
    const int64_t k = rows_free && G.co > 1
                          ? std::min(G.co, std::max<int64_t>(kJoinedRowWork / std::max<int64_t>(G.d_out * n, 1), 1))
                          : 1;
    if (k == 1) {  // also a field with no copies (a plan may hold one)
      out.push_back(std::move(G));
      continue;
    }
    const int64_t full = G.co / k, rest = G.co % k;
    out.push_back(OutGroup{G.out_off, full, k * G.d_out, G.pairs});
    if (rest) out.push_back(OutGroup{G.out_off + full * k * G.d_out, 1, rest * G.d_out, G.pairs});
  }
  groups = std::move(out);
}

// Builds the host form of one layer's plan from meta and basis and checks it against W's m x n
// (every row a well-formed plan row, the fields tiling the rows and the columns).
void build_groups(HostPlan& H, int64_t m, int64_t n, const Tensor& meta_in, const Tensor& basis_in, int64_t layer) {
  Tensor meta = meta_in.contiguous();
  Tensor basis = basis_in.to(at::kDouble).contiguous();
  H.basis_f64.assign(basis.data_ptr<double>(), basis.data_ptr<double>() + basis.numel());
  const int64_t P = meta.size(0), nb = basis.numel();
  const int64_t* M = meta.data_ptr<int64_t>();
  // group the pairs by output field; each output field's pairs must tile [0, n) and the
  // output fields must tile [0, m), so that every entry of W (and of the gradient) is visited once
  std::vector<int64_t> order(P);
  for (int64_t p = 0; p < P; ++p) order[p] = p;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const int64_t* A = M + a * kPlanColumns;
    const int64_t* B = M + b * kPlanColumns;
    return A[kOutOffset] != B[kOutOffset] ? A[kOutOffset] < B[kOutOffset] : A[kInOffset] < B[kInOffset];
  });
  int64_t row_end = 0;
  for (int64_t q = 0; q < P; ++q) {
    const int64_t* R = M + order[q] * kPlanColumns;
    const int64_t oo = R[kOutOffset], io = R[kInOffset], co = R[kOutCopies], ci = R[kInCopies], dout = R[kDOut],
                  din = R[kDIn], r = R[kRank], bo = R[kBasisOffset], orbits = R[kOrbits], form = R[kOrbitForm];
    // an orbit pair stores its orbit table and inverse orbit sizes (kOrbitTable), d_2 and the two factor
    // tables (kOrbitProduct) or nothing (closed forms)
    int64_t d2 = 0;
    if (orbits > 0 && form == kOrbitProduct && bo >= 0 && bo < nb) {
      const acc_t v = H.basis_f64[bo];
      if (v >= 1 && v <= din && v == std::floor(v)) d2 = static_cast<int64_t>(v);
    }
    const bool product_ok = d2 >= 1 && din % d2 == 0 && orbits == din;
    int64_t ng = 0;  // kOrbitPoints: |G|, then the two permutation tables
    if (orbits > 0 && form == kOrbitPoints && bo >= 0 && bo < nb) {
      const acc_t v = H.basis_f64[bo];
      if (v >= 1 && v <= nb && v == std::floor(v)) ng = static_cast<int64_t>(v);
    }
    const int64_t stored = orbits == 0              ? r * dout * din
                           : form == kOrbitTable || form == kOrbitSigned ? dout * din + orbits
                           : form == kOrbitProduct ? (product_ok ? 1 + dout * (din / d2 + d2) : nb + 1)
                           : form == kOrbitPoints  ? (ng >= 1 ? 1 + ng * (dout + din) : nb + 1)
                                                   : 0;
    const bool form_ok = orbits == 0 || (orbits == r && (((form == kOrbitTable || form == kOrbitSigned) &&
                                                          orbits <= dout * din) ||
                                                         (form == kOrbitProduct && product_ok) ||
                                                         (form == kOrbitPoints && ng >= 1 && orbits <= dout * din) ||
                                                         (form == kOrbitCyclic && dout == din && orbits == dout) ||
                                                         (form == kOrbitDihedral && dout == din && dout % 2 == 0 &&
                                                          orbits == dout)));
    TORCH_CHECK_VALUE(co >= 0 && ci >= 0 && dout >= 1 && din >= 1 && r >= 0 && bo >= 0 && orbits >= 0 && form_ok &&
                          bo + stored <= nb,
                "fused_energies: layer ", layer, ": malformed plan row ", order[q]);
    if (H.groups.empty() || H.groups.back().out_off != oo) {
      TORCH_CHECK_VALUE(oo == row_end, "fused_energies: layer ", layer, ": the plan's output fields do not tile the rows");
      H.groups.push_back(OutGroup{oo, co, dout, {}});
      row_end = oo + co * dout;
    } else {
      TORCH_CHECK_VALUE(H.groups.back().co == co && H.groups.back().d_out == dout, "fused_energies: layer ", layer,
                  ": inconsistent output field at offset ", oo);
    }
    auto& G = H.groups.back();
    const int64_t expect_in = G.pairs.empty() ? 0 : G.pairs.back().in_off + G.pairs.back().ci * G.pairs.back().di;
    TORCH_CHECK_VALUE(io == expect_in, "fused_energies: layer ", layer, ": the plan's field pairs do not tile the columns");
    const acc_t* A = H.basis_f64.data() + bo;
    if (orbits > 0) {
      Pair pr{io, ci, din, orbits, Kind::kOrbit, nullptr, nullptr};
      pr.form = form;
      pr.inv_size = acc_t(1) / acc_t(dout);
      if (form == kOrbitProduct) {
        // the factor tables give the column of each orbit; the kernel needs the orbit of each column:
        // their inverses, checked to be permutations
        pr.factor = d2;
        pr.orbit = reinterpret_cast<const int32_t*>(static_cast<intptr_t>(H.orbit.size()));
        const int64_t d1 = din / d2, start = H.orbit.size();
        H.orbit.resize(start + dout * (d1 + d2), -1);
        for (int64_t a = 0; a < dout; ++a)
          for (int64_t f = 0; f < 2; ++f) {
            const int64_t d = f == 0 ? d1 : d2;
            const acc_t* T = A + 1 + (f == 0 ? a * d1 : dout * d1 + a * d2);
            int32_t* inv = H.orbit.data() + start + (f == 0 ? a * d1 : dout * d1 + a * d2);
            for (int64_t c = 0; c < d; ++c) {
              const acc_t t = T[c];
              TORCH_CHECK_VALUE(t >= 0 && t < d && t == std::floor(t) && inv[static_cast<int64_t>(t)] < 0,
                                "fused_energies: layer ", layer, ": malformed factor table in plan row ", order[q]);
              inv[static_cast<int64_t>(t)] = static_cast<int32_t>(c);
            }
          }
      } else if (form == kOrbitPoints) {
        pr.factor = ng;
        pr.orbit = reinterpret_cast<const int32_t*>(static_cast<intptr_t>(H.orbit.size()));
        append_point_tables(H.orbit, A + 1, ng, dout, din, layer, order[q]);
      } else if (form == kOrbitSigned) {
        // signed orbits run as an orbit table with a sign per entry (plan_types.h): code c (k + 1), c = +-1,
        // is orbit k with sign c, code 0 sign 0 (orbit 0); offsets stored until the vectors stop growing
        pr.form = kOrbitTable;
        pr.orbit = reinterpret_cast<const int32_t*>(static_cast<intptr_t>(H.orbit.size()));
        pr.sign = reinterpret_cast<const acc_t*>(static_cast<intptr_t>(H.sign.size()) + 1);  // + 1: non-null
        pr.inv = A + dout * din;
        for (int64_t e = 0; e < dout * din; ++e) {
          const acc_t c = A[e];
          TORCH_CHECK_VALUE(std::abs(c) <= orbits && c == std::floor(c), "fused_energies: layer ", layer,
                            ": malformed signed orbit table in plan row ", order[q]);
          H.orbit.push_back(static_cast<int32_t>(c == 0 ? 0 : std::abs(c) - 1));
          H.sign.push_back(c > 0 ? 1.0 : c < 0 ? -1.0 : 0.0);
        }
      } else if (form == kOrbitTable) {
        // the orbit indices are stored as exact integers; their offset is stored until H.orbit stops growing
        pr.orbit = reinterpret_cast<const int32_t*>(static_cast<intptr_t>(H.orbit.size()));
        pr.inv = A + dout * din;
        for (int64_t e = 0; e < dout * din; ++e) {
          const acc_t k = A[e];
          TORCH_CHECK_VALUE(k >= 0 && k < orbits && k == std::floor(k), "fused_energies: layer ", layer,
                            ": malformed orbit table in plan row ", order[q]);
          H.orbit.push_back(static_cast<int32_t>(k));
        }
      }
      G.pairs.push_back(pr);
      continue;
    }
    Kind kind = r == 0                                                            ? Kind::kZero
                : spans_tiles(A, r, dout * din)                                   ? Kind::kWhole
                : (r == 1 && dout == din && is_scaled_identity(A, dout))          ? Kind::kIdentity
                : (dout <= kMaxSmall && din <= kMaxSmall)                         ? Kind::kSmall
                                                                                  : Kind::kGeneric;
    G.pairs.push_back(Pair{io, ci, din, r, kind, A, nullptr});  // H.basis_f64 is not resized after this point
    if (kind == Kind::kGeneric || kind == Kind::kSmall) {
      // transposed copy; its offset is stored until basis_t stops growing
      G.pairs.back().At = reinterpret_cast<const acc_t*>(static_cast<intptr_t>(H.basis_t.size()));
      const int64_t rp = (r + 3) / 4 * 4;  // zero-padded to whole vectors (tile_kernels.h, padded_rank)
      for (int64_t a = 0; a < dout; ++a)
        for (int64_t b = 0; b < din; ++b)
          for (int64_t k = 0; k < rp; ++k) H.basis_t.push_back(k < r ? A[(k * dout + a) * din + b] : 0.0);
    }
    if (kind == Kind::kGeneric) {
      // rows padded to whole vectors of eight (pixel_tiles.h); the offset is stored likewise
      G.pairs.back().Ap = reinterpret_cast<const acc_t*>(static_cast<intptr_t>(H.basis_pad.size()));
      const int64_t np = (din + 7) / 8 * 8;
      for (int64_t e = 0; e < r * dout; ++e)
        for (int64_t b = 0; b < np; ++b) H.basis_pad.push_back(b < din ? A[e * din + b] : 0.0);
    }
  }
  TORCH_CHECK_VALUE(row_end == m, "fused_energies: layer ", layer, ": the plan covers ", row_end, " rows, W has ", m);
  for (auto& G : H.groups) {
    const int64_t end = G.pairs.empty() ? 0 : G.pairs.back().in_off + G.pairs.back().ci * G.pairs.back().di;
    TORCH_CHECK_VALUE(end == n, "fused_energies: layer ", layer, ": the plan's field pairs cover ", end,
                " columns, W has ", n);
    for (auto& p : G.pairs) {
      if (p.kind == Kind::kGeneric || p.kind == Kind::kSmall) p.At = H.basis_t.data() + reinterpret_cast<intptr_t>(p.At);
      if (p.kind == Kind::kGeneric) p.Ap = H.basis_pad.data() + reinterpret_cast<intptr_t>(p.Ap);
      if (p.kind == Kind::kOrbit && (p.form == kOrbitTable || p.form == kOrbitProduct || p.form == kOrbitPoints))
        p.orbit = H.orbit.data() + reinterpret_cast<intptr_t>(p.orbit);
      if (p.sign) p.sign = H.sign.data() + (reinterpret_cast<intptr_t>(p.sign) - 1);
    }
  }
  join_separable_rows(H.groups, n);
  H.group_start.assign(1, 0);
  for (auto& G : H.groups) H.group_start.push_back(H.group_start.back() + G.co);
  H.blocks = H.group_start.back();
  // orbit pairs, r = 0 pairs, tiles with a basis and the trace form of fields up to kMaxSmall add in
  // place where the rows are read in place (process_item's direct path): their kernels read every
  // entry before writing it, so the output may alias the weight. Only the trace form of larger fields
  // (identity_pair_rt) writes, and is staged.
  H.groups_in_place = H.groups;
  for (auto& G : H.groups_in_place)
    for (auto& p : G.pairs)
      p.accumulate = p.kind != Kind::kIdentity || G.d_out <= kMaxSmall;
}

// The host plan of one layer, from the cache or built (and checked) on a miss.
std::shared_ptr<const HostPlan> host_plan(int64_t m, int64_t n, const Tensor& meta, const Tensor& basis, int64_t layer) {
  check_plan_tensors(meta, basis, layer);
  const bool cacheable = !meta.is_inference() && !basis.is_inference();
  PlanKey key{};
  if (cacheable) {
    size_t k = 0;
    key[k++] = m;
    key[k++] = n;
    push_tensor_key(key, k, meta, 2);
    push_tensor_key(key, k, basis, 1);
    if (auto hit = plan_cache().find(key)) return hit;
  }
  auto plan = std::make_shared<HostPlan>();
  plan->meta = WeakTensorRef(meta);
  plan->basis = WeakTensorRef(basis);
  build_groups(*plan, m, n, meta, basis, layer);
  if (cacheable) plan_cache().insert(key, plan);
  return plan;
}

std::vector<double> coefficients(const Tensor& c, int64_t batch, const char* name, int64_t layer) {
  TORCH_CHECK_VALUE(c.numel() == batch, "fused_energies: layer ", layer, ": ", name, " has ", c.numel(),
              " entries, expected one per matrix (", batch, ")");
  std::vector<double> out(batch);
  if (c.device().is_cpu() && c.scalar_type() == at::kDouble && c.is_contiguous()) {  // as the callers prepare them
    const double* d = c.const_data_ptr<double>();
    out.assign(d, d + batch);
  } else {
    Tensor h = c.detach().to(at::kCPU, at::kDouble).contiguous();
    out.assign(h.data_ptr<double>(), h.data_ptr<double>() + batch);
  }
  for (auto& v : out) v *= 2;
  return out;
}

// The layer's plan groups (those that add in place where the gradient is added to rows read in
// place), its item function for the weight dtype, and whether row blocks split into chunks.
void configure(Layer& L, const HostPlan& plan, at::ScalarType st) {
  const bool direct = (st == at::kFloat || st == at::kDouble) && L.sn == 1 && L.perm_in == nullptr;
  L.groups = L.accumulate && direct ? &plan.groups_in_place : &plan.groups;
  L.group_start = &plan.group_start;
  L.blocks = plan.blocks;
  bool split = false;
  for (auto& G : *L.groups) split = split || splits(L, G, direct) || points_splits(G, direct);
  L.split_fn = split ? (st == at::kFloat ? &process_split<float> : &process_split<double>) : nullptr;
  switch (st) {
    case at::kFloat: L.fn = &process_item<float>; break;
    case at::kDouble: L.fn = &process_item<double>; break;
    case at::kHalf: L.fn = &process_item<c10::Half>; break;
    default: L.fn = &process_item<c10::BFloat16>; break;
  }
}

std::vector<acc_t> run_items(const std::vector<Layer>& layers);
std::tuple<Tensor, Tensor, std::vector<Tensor>> run_layers(const std::vector<Layer>& layers, bool wide,
                                                           std::vector<Tensor> grads);

// outs: empty (the gradients are returned as fresh tensors) or one contiguous tensor per weight, of
// its dtype and number of elements, to which the gradient is added in place (add) or written
// (!add); nothing is returned for them. The energies of all matrices of all weights come in two flat
// tensors, float64 if a weight is float64, else float32 (a float32 weight's energies are rounded to
// float32 first, whatever the flat dtype).
std::tuple<Tensor, Tensor, std::vector<Tensor>> fused_energies(
    at::TensorList weights, at::TensorList meta, at::TensorList basis, at::TensorList perm_out,
    at::TensorList perm_in, at::TensorList lambda_perp, at::TensorList lambda_G, at::TensorList outs, bool add) {
  const int64_t nl = weights.size();
  TORCH_CHECK_VALUE(meta.size() == weights.size() && basis.size() == weights.size() && perm_out.size() == weights.size() &&
                  perm_in.size() == weights.size(),
              "fused_energies: got ", nl, " weights but ", meta.size(), " meta, ", basis.size(), " basis, ",
              perm_out.size(), " perm_out, ", perm_in.size(), " perm_in tensors");
  const bool want_grad = !lambda_perp.empty();
  TORCH_CHECK_VALUE(lambda_perp.size() == lambda_G.size() && (!want_grad || (int64_t)lambda_perp.size() == nl),
              "fused_energies: lambda_perp and lambda_G must both be empty or both have one tensor per weight");
  const bool accumulate = !outs.empty();
  TORCH_CHECK_VALUE(!accumulate || (want_grad && (int64_t)outs.size() == nl),
                    "fused_energies: outs must be empty or hold one tensor per weight (with coefficients)");
  std::vector<Layer> layers(nl);
  std::vector<Tensor> grads;
  bool wide = false;
  for (const auto& W : weights) wide = wide || W.scalar_type() == at::kDouble;
  std::vector<std::shared_ptr<const void>> pins;  // the cached plans and permutations this call uses
  for (int64_t i = 0; i < nl; ++i) {
    const Tensor& W = weights[i];
    Layer& L = layers[i];
    const auto st = W.scalar_type();
    TORCH_CHECK_VALUE(W.device().is_cpu(), "fused_energies: layer ", i, ": W must be a CPU tensor, got ", W.device());
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16,
                "fused_energies: layer ", i, ": W must be float16, bfloat16, float32 or float64, got ", st);
    TORCH_CHECK_VALUE(W.dim() >= 2, "fused_energies: layer ", i, ": W must have shape [..., m, n], got ", W.sizes());
    L.m = W.size(-2);
    L.n = W.size(-1);
    L.sm = W.stride(-2);
    L.sn = W.stride(-1);
    L.batch = 1;
    for (int64_t k = 0; k + 2 < W.dim(); ++k) L.batch *= W.size(k);
    L.data = W.data_ptr();
    L.batch_off.resize(L.batch);
    // element offsets of the matrices, leading dims in row-major order
    for (int64_t b = 0; b < L.batch; ++b) {
      int64_t rem = b, off = 0;
      for (int64_t k = W.dim() - 3; k >= 0; --k) {
        off += (rem % W.size(k)) * W.stride(k);
        rem /= W.size(k);
      }
      L.batch_off[b] = off;
    }
    L.perm_out = checked_perm(perm_out[i], L.m, "perm_out", i, pins);
    L.perm_in = checked_perm(perm_in[i], L.n, "perm_in", i, pins);
    auto plan = host_plan(L.m, L.n, meta[i], basis[i], i);
    if (want_grad) {
      L.cp2 = coefficients(lambda_perp[i], L.batch, "lambda_perp", i);
      L.cg2 = coefficients(lambda_G[i], L.batch, "lambda_G", i);
      if (accumulate) {
        const Tensor& out = outs[i];
        TORCH_CHECK_VALUE(out.device().is_cpu() && out.scalar_type() == st && out.numel() == W.numel() &&
                              out.is_contiguous(),
                          "fused_energies: layer ", i, ": outs[", i, "] must be a contiguous CPU tensor with the ",
                          W.numel(), " elements of W ", W.sizes(), " and its dtype ", st, ", got ", out.scalar_type(),
                          " ", out.sizes());
        L.grad = out.data_ptr();
        L.accumulate = add;
      } else {
        grads.push_back(at::empty(W.sizes(), W.options().memory_format(at::MemoryFormat::Contiguous)));
        L.grad = grads.back().data_ptr();
      }
    }
    configure(L, *plan, st);
    pins.push_back(std::move(plan));
  }
  return run_layers(layers, wide, std::move(grads));
}

// Runs the items of `layers` (each configured, with its data, gradient and coefficients set): the
// energies (E_perp, E_G) of all their matrices, interleaved, rounded to float32 below float64 weights.
std::vector<acc_t> run_items(const std::vector<Layer>& layers) {
  const int64_t nl = layers.size();
  // items: (layer, matrix, row block), layer-major
  std::vector<int64_t> layer_start(nl + 1, 0);
  for (int64_t i = 0; i < nl; ++i) layer_start[i + 1] = layer_start[i] + layers[i].batch * layers[i].blocks;
  const int64_t items = layer_start[nl];
  std::vector<acc_t> part(2 * items, 0);
  // items of split row blocks: one at a time, each running its row chunks in parallel
  std::vector<char> done(items, 0);
  for (int64_t i = 0; i < nl; ++i) {
    const Layer& L = layers[i];
    if (!L.split_fn) continue;
    const bool direct = L.sn == 1 && L.perm_in == nullptr;
    for (int64_t b = 0; b < L.batch; ++b)
      for (size_t g = 0; g < L.groups->size(); ++g) {
        const OutGroup& G = (*L.groups)[g];
        if (!splits(L, G, direct) && !points_splits(G, direct)) continue;
        for (int64_t u = 0; u < G.co; ++u) {
          const int64_t it = layer_start[i] + b * L.blocks + (*L.group_start)[g] + u;
          Scratch s;
          L.split_fn(L, b, G, u, s, part.data() + 2 * it);
          done[it] = 1;
        }
      }
  }
  if (items > 0) {
    // one range of consecutive items per thread, cut by work and not by count (work_cuts.h): the row
    // blocks of one matrix can differ in size (a 1-row and a 3-row field: an even split by count left
    // one of two threads three times the other's work). A call of less than kPartWork entries per
    // thread runs on fewer threads. Each item writes its own sums: the result does not depend on the cut.
    constexpr double kPartWork = double(int64_t(1) << 12);
    std::vector<double> cost(items, 0.0);
    for (int64_t i = 0, it = 0; i < nl; ++i) {
      const Layer& L = layers[i];
      const std::vector<int64_t>& gs = *L.group_start;
      for (int64_t b = 0; b < L.batch; ++b)
        for (size_t g = 0; g < L.groups->size(); ++g) {
          const double size = double((*L.groups)[g].d_out * L.n);
          for (int64_t u = gs[g]; u < gs[g + 1]; ++u, ++it) cost[it] = done[it] ? 0.0 : size;
        }
    }
    parallel_by_cost(cost, [&](int64_t begin, int64_t end) {
      Scratch s;
      for (int64_t it = begin; it < end; ++it) {
        if (done[it]) continue;
        const int64_t i = std::upper_bound(layer_start.begin(), layer_start.end(), it) - layer_start.begin() - 1;
        const Layer& L = layers[i];
        const int64_t local = it - layer_start[i];
        const int64_t b = local / L.blocks, blk = local % L.blocks;
        const std::vector<int64_t>& gs = *L.group_start;
        const int64_t g = std::upper_bound(gs.begin(), gs.end(), blk) - gs.begin() - 1;
        L.fn(L, b, (*L.groups)[g], blk - gs[g], s, part.data() + 2 * it);
      }
    }, kPartWork);
  }
  std::vector<acc_t> energies;  // E_perp, E_G of each matrix, interleaved
  energies.reserve(2 * items);
  for (int64_t i = 0; i < nl; ++i) {
    const Layer& L = layers[i];
    const bool narrow = L.fn != &process_item<double>;  // float32 energies of a weight below float64
    for (int64_t b = 0; b < L.batch; ++b) {
      acc_t sp = 0, sg = 0;
      const acc_t* pp = part.data() + 2 * (layer_start[i] + b * L.blocks);
      for (int64_t k = 0; k < L.blocks; ++k) {
        sp += pp[2 * k];
        sg += pp[2 * k + 1];
      }
      energies.push_back(narrow ? static_cast<float>(sp) : sp);
      energies.push_back(narrow ? static_cast<float>(sg) : sg);
    }
  }
  return energies;
}

// run_items, the energies in two flat tensors (float64 if `wide`, else float32).
std::tuple<Tensor, Tensor, std::vector<Tensor>> run_layers(const std::vector<Layer>& layers, bool wide,
                                                           std::vector<Tensor> grads) {
  const std::vector<acc_t> energies = run_items(layers);
  const int64_t total = energies.size() / 2;
  const auto dt = wide ? at::kDouble : at::kFloat;
  Tensor e_perp = at::empty({total}, at::TensorOptions().dtype(dt)), e_g = at::empty({total}, at::TensorOptions().dtype(dt));
  for (int64_t row = 0; row < total; ++row) {
    if (wide) {
      e_perp.data_ptr<double>()[row] = energies[2 * row];
      e_g.data_ptr<double>()[row] = energies[2 * row + 1];
    } else {
      e_perp.data_ptr<float>()[row] = static_cast<float>(energies[2 * row]);
      e_g.data_ptr<float>()[row] = static_cast<float>(energies[2 * row + 1]);
    }
  }
  return {e_perp, e_g, grads};
}

// The CPU implementation of equiproj::fused_energies (schema in equiproj/ops/_op.py): the energies of
// all matrices of all weights in two flat tensors (float64 if a weight is float64, else float32);
// the gradients (with coefficients) written or added (accumulate) into `grads`.
std::tuple<Tensor, Tensor> fused_energies_op(at::TensorList weights, at::TensorList meta, at::TensorList basis,
                                             at::TensorList perm_out, at::TensorList perm_in,
                                             at::TensorList lambda_perp, at::TensorList lambda_G,
                                             at::TensorList grads, bool accumulate) {
  TORCH_CHECK_VALUE(lambda_perp.empty() || grads.size() == weights.size(),
                    "fused_energies: with lambda_perp and lambda_G, grads must hold one tensor per weight");
  TORCH_CHECK_VALUE(!lambda_perp.empty() || grads.empty(), "fused_energies: grads without lambda_perp and lambda_G");
  auto out = fused_energies(weights, meta, basis, perm_out, perm_in, lambda_perp, lambda_G, grads, accumulate);
  return {std::get<0>(out), std::get<1>(out)};
}

// ---- a prepared program: the op's CPU kernel on fixed weights, with nothing to convert per call -----

// The fused matrices of a penalty (equiproj/nn/_program.py), prepared once: the 2-D matrix views of
// the parameters, the parameters themselves (whose .grad it reads and writes), their host plans and
// checked permutations, and 2 lambda per weight. Each run is the op's CPU kernel on these layers
// (the same items, kernels and fixed-order sums as equiproj::fused_energies, so the same results
// bit for bit) without the per-call conversion of eight tensor lists and the plan-cache lookups.
// Runs on one object are serialized.
class Prepared : public torch::CustomClassHolder {
 public:
  Prepared(std::vector<Tensor> weights, std::vector<Tensor> params, std::vector<Tensor> meta, std::vector<Tensor> basis,
           std::vector<Tensor> perm_out, std::vector<Tensor> perm_in)
      : weights_(std::move(weights)), params_(std::move(params)) {
    const int64_t nl = weights_.size();
    TORCH_CHECK_VALUE(params_.size() == weights_.size() && meta.size() == weights_.size() &&
                          basis.size() == weights_.size() && perm_out.size() == weights_.size() &&
                          perm_in.size() == weights_.size(),
                      "Prepared: one parameter, meta, basis, perm_out and perm_in per weight");
    layers_.resize(nl);
    for (int64_t i = 0; i < nl; ++i) {
      const Tensor& W = weights_[i];
      const Tensor& P = params_[i];
      const auto st = W.scalar_type();
      TORCH_CHECK_VALUE(W.device().is_cpu() && W.dim() == 2 &&
                            (st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16),
                        "Prepared: weight ", i, " must be a 2-d float16, bfloat16, float32 or float64 CPU tensor");
      TORCH_CHECK_VALUE(P.device().is_cpu() && P.scalar_type() == st && P.numel() == W.numel() &&
                            P.unsafeGetTensorImpl()->unsafe_storage().data() == W.unsafeGetTensorImpl()->unsafe_storage().data(),
                        "Prepared: parameter ", i, " must hold the elements of weight ", i, " (a view of it, its dtype)");
      param_layouts_.emplace_back(P.sizes().vec(), P.strides().vec());
      Layer& L = layers_[i];
      L.m = W.size(0);
      L.n = W.size(1);
      L.sm = W.stride(0);
      L.sn = W.stride(1);
      L.batch = 1;
      L.batch_off.assign(1, 0);
      L.cp2.assign(1, 0.0);
      L.cg2.assign(1, 0.0);
      L.perm_out = checked_perm(perm_out[i], L.m, "perm_out", i, pins_);
      L.perm_in = checked_perm(perm_in[i], L.n, "perm_in", i, pins_);
      auto plan = host_plan(L.m, L.n, meta[i], basis[i], i);
      plans_.push_back(plan);
      configure(L, *plan, st);
      wide_ = wide_ || st == at::kDouble;
    }
    lambda_perp_.assign(nl, 0.0);
    lambda_G_.assign(nl, 0.0);
  }

  // lambda_perp, lambda_G per weight (the gradient is 2 lambda_perp (W - P W) + 2 lambda_G P W)
  void set_lambdas(std::vector<double> lambda_perp, std::vector<double> lambda_G) {
    TORCH_CHECK_VALUE(lambda_perp.size() == layers_.size() && lambda_G.size() == layers_.size(),
                      "Prepared.set_lambdas: one lambda_perp and one lambda_G per weight");
    std::lock_guard<std::mutex> lock(mutex_);
    lambda_perp_ = std::move(lambda_perp);
    lambda_G_ = std::move(lambda_G);
  }

  // The energies alone, in two flat tensors as the op returns them.
  std::tuple<Tensor, Tensor> energies() {
    refuse_tangents();
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < layers_.size(); ++i) set(i, nullptr, false, 0, 0);
    return energies_of(run_layers(layers_, wide_, {}));
  }

  // sum lambda_perp E_perp + lambda_G E_G in float64, from the energies alone.
  double value() {
    refuse_tangents();
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < layers_.size(); ++i) set(i, nullptr, false, 0, 0);
    return weighted(run_items(layers_));
  }

  // The gradients of sum lambda_perp E_perp + lambda_G E_G added to the parameters' .grad, or set as
  // a fresh .grad where there is none (parameters that do not require grad get none), as a
  // backward of that sum would leave them. ok is false, and nothing runs, where a .grad cannot be
  // written directly (another dtype or device, non-contiguous, a tensor subclass): the caller takes
  // its general route then.
  std::tuple<bool, double> backward() {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t nl = layers_.size();
    std::vector<Tensor> fresh(nl);
    for (size_t i = 0; i < nl; ++i) {
      const Tensor& P = params_[i];
      if (!P.requires_grad()) {
        set(i, nullptr, false, 0, 0);
        continue;
      }
      const Tensor& g = P.grad();
      if (!g.defined()) {
        fresh[i] = at::empty(P.sizes(), P.options());
        set(i, fresh[i].data_ptr(), false, lambda_perp_[i], lambda_G_[i]);
      } else if (writable(g, i)) {
        set(i, g.data_ptr(), true, lambda_perp_[i], lambda_G_[i]);
      } else {
        return {false, 0.0};
      }
    }
    const double v = weighted(run_items(layers_));
    for (size_t i = 0; i < nl; ++i)
      if (fresh[i].defined()) params_[i].mutable_grad() = std::move(fresh[i]);
    return {true, v};
  }

  // The gradients written into new tensors shaped like the parameters (one allocation each, so that
  // autograd may add another gradient into one in place), returned with the energies.
  std::tuple<double, std::vector<Tensor>> fresh() {
    std::lock_guard<std::mutex> lock(mutex_);
    return fresh_locked(lambda_perp_, lambda_G_);
  }

  // fresh() with these lambdas (penalty()'s node keeps its forward's for a second backward).
  std::tuple<double, std::vector<Tensor>> fresh_with(const std::vector<double>& lambda_perp,
                                                     const std::vector<double>& lambda_G) {
    std::lock_guard<std::mutex> lock(mutex_);
    return fresh_locked(lambda_perp, lambda_G);
  }

  std::vector<double> lambdas(bool perp) {
    std::lock_guard<std::mutex> lock(mutex_);
    return perp ? lambda_perp_ : lambda_G_;
  }

  // Whether every parameter still holds, in the dtype, sizes and strides it had, the storage its
  // weight's view was made on (model.to(...) or a .data assignment replaces or re-lays it; the views
  // would then read what is no longer the parameter).
  bool bound() const {
    for (size_t i = 0; i < params_.size(); ++i) {
      const Tensor& P = params_[i];
      const Tensor& W = weights_[i];
      if (P.scalar_type() != W.scalar_type() ||
          P.unsafeGetTensorImpl()->unsafe_storage().data() != W.unsafeGetTensorImpl()->unsafe_storage().data() ||
          P.sizes() != c10::IntArrayRef(param_layouts_[i].first) ||
          P.strides() != c10::IntArrayRef(param_layouts_[i].second))
        return false;
    }
    return true;
  }

  // The parameters' version counters (an in-place change bumps them).
  std::vector<int64_t> versions() const {
    std::vector<int64_t> v;
    v.reserve(params_.size());
    for (const Tensor& P : params_) v.push_back(P._version());
    return v;
  }

  // sum lambda_perp E_perp + lambda_G E_G as a 0-dim tensor (float64 if `wide`, else float32),
  // differentiable in the parameters: the run writes the gradient into fresh tensors, which the
  // autograd node (PenaltyBackward, below) hands over in the backward. Node and run are C++: in a
  // training step a Python autograd.Function cost about as much as the run itself (measured,
  // docs/benchmarks.md).
  Tensor penalty(bool wide);

  // The decoupled step W += 2 c_perp (W - P W) + 2 c_G P W on every weight in place (c = -rate / 2).
  void step(double c_perp, double c_G) {
    for (const Tensor& W : weights_)
      TORCH_CHECK_VALUE(W.is_contiguous(), "Prepared.step: the weights must be contiguous to be stepped in place");
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < layers_.size(); ++i) set(i, weights_[i].data_ptr(), true, c_perp, c_G);
    run_items(layers_);
  }

 private:
  std::vector<std::pair<std::vector<int64_t>, std::vector<int64_t>>> param_layouts_;  // sizes, strides
  // Forward-mode AD: the kernels read the parameters' values only, so a value computed from dual
  // parameters would carry no tangent (read as zero): refused instead.
  void refuse_tangents() const {
    for (const Tensor& P : params_)
      TORCH_CHECK(!P._fw_grad(/*level=*/0).defined(),
                  "the fused penalty does not support forward-mode AD (a parameter is a dual tensor): its value "
                  "would carry no tangent; compute it with the 'reference' backend (EQUIPROJ_BACKEND=reference) "
                  "or differentiate it with reverse-mode autograd");
  }

  std::tuple<double, std::vector<Tensor>> fresh_locked(const std::vector<double>& lambda_perp,
                                                       const std::vector<double>& lambda_G) {
    const size_t nl = layers_.size();
    std::vector<Tensor> grads(nl);
    for (size_t i = 0; i < nl; ++i) {
      grads[i] = at::empty(params_[i].sizes(), params_[i].options());
      set(i, grads[i].data_ptr(), false, lambda_perp[i], lambda_G[i]);
    }
    return {weighted(run_items(layers_), lambda_perp, lambda_G), grads};
  }

  // The layer's data (read again: the weight's storage offset is fixed, its data pointer too, but a
  // caller may have swapped storage under a view, which the program checks) and its output.
  void set(size_t i, void* grad, bool accumulate, double c_perp, double c_G) {
    Layer& L = layers_[i];
    L.data = weights_[i].data_ptr();
    L.grad = grad;
    L.cp2[0] = 2 * c_perp;
    L.cg2[0] = 2 * c_G;
    if (L.accumulate != accumulate) {
      L.accumulate = accumulate;
      configure(L, *plans_[i], weights_[i].scalar_type());
    }
  }

  bool writable(const Tensor& g, size_t i) const {
    const Tensor& W = weights_[i];
    return g.device().is_cpu() && g.layout() == at::kStrided && g.scalar_type() == W.scalar_type() &&
           g.numel() == W.numel() && g.is_contiguous() && !g.is_inference() &&
           !g.key_set().has_any(c10::DispatchKeySet(c10::DispatchKey::Python)) && !g.is_neg() && !g.is_conj();
  }

  // sum_i lambda_perp_i E_perp_i, plus sum_i lambda_G_i E_G_i, each summed in weight order
  double weighted(const std::vector<acc_t>& energies) const { return weighted(energies, lambda_perp_, lambda_G_); }

  static double weighted(const std::vector<acc_t>& energies, const std::vector<double>& lambda_perp,
                         const std::vector<double>& lambda_G) {
    double sp = 0, sg = 0;
    for (size_t i = 0; i < lambda_perp.size(); ++i) {
      sp += lambda_perp[i] * energies[2 * i];
      sg += lambda_G[i] * energies[2 * i + 1];
    }
    return sp + sg;
  }

  static std::tuple<Tensor, Tensor> energies_of(std::tuple<Tensor, Tensor, std::vector<Tensor>> out) {
    return {std::move(std::get<0>(out)), std::move(std::get<1>(out))};
  }

  std::mutex mutex_;
  std::vector<Tensor> weights_, params_;
  std::vector<Layer> layers_;
  std::vector<std::shared_ptr<const HostPlan>> plans_;
  std::vector<std::shared_ptr<const void>> pins_;  // the checked permutations
  std::vector<double> lambda_perp_, lambda_G_;
  bool wide_ = false;
};

// The refusal of a second backward once a parameter no longer holds what the program's views read.
constexpr const char* kReplacedSincePenalty =
    "a parameter of the penalty was replaced or laid out anew (model.to(...), a .data assignment) since "
    "penalty() was called: call penalty() again";

// The autograd node of Prepared::penalty. The forward's run has the coefficients, so it writes the
// gradient too; the backward hands those tensors over (autograd makes each the parameter's .grad
// or adds into it), scaled in place by the incoming gradient where that is not 1. A second backward
// through a retained graph (the tensors were given away) runs again with the forward's lambdas, on
// the weights as they are: it refuses if one was changed in place since the forward (by its version
// counter, which saved-tensor hooks that copy what is saved do not hide), if a parameter was replaced
// or laid out anew since (Prepared::bound), or if the graph was freed.
// A plain Node with C++ members rather than a torch::autograd::Function: the Function's saved_data
// (IValues under string keys), saved variables and output wrapping cost more than the rest of the
// node in a training step, where every call meets cold caches (docs/benchmarks.md).
struct PenaltyBackward : torch::autograd::Node {
  PenaltyBackward(torch::autograd::edge_list&& next, c10::intrusive_ptr<Prepared> program,
                  std::vector<double> lambda_perp, std::vector<double> lambda_G, std::vector<Tensor> grads,
                  std::vector<int64_t> versions)
      : Node(std::move(next)),
        program_(std::move(program)),
        lambda_perp_(std::move(lambda_perp)),
        lambda_G_(std::move(lambda_G)),
        grads_(std::move(grads)),
        versions_(std::move(versions)) {}

  std::string name() const override { return "PenaltyBackward"; }

  void release_variables() override {
    grads_.clear();
    released_ = true;
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grad_value) override {
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "the fused penalty's backward is not differentiable: no double backward (create_graph=True, or "
                "the node called with grad mode on); for higher derivatives use the 'torch' backend "
                "(EQUIPROJ_BACKEND=torch)");
    const Tensor& g = grad_value[0];
    if (!g.defined())  // no gradient flows into the value (e.g. a Function that returned None): none out
      return torch::autograd::variable_list(num_outputs());
    std::vector<Tensor> grads;
    if (!grads_.empty()) {
      grads = std::move(grads_);  // given away: autograd may take each as the .grad without a copy
      grads_.clear();
    } else {
      TORCH_CHECK(!released_, torch::autograd::ERR_BACKWARD_TWICE);
      TORCH_CHECK(program_->versions() == versions_,
                  "one of the variables needed for gradient computation has been modified by an inplace "
                  "operation: a weight of the penalty changed since penalty() was called; call penalty() again");
      TORCH_CHECK(program_->bound(), kReplacedSincePenalty);
      grads = std::get<1>(program_->fresh_with(lambda_perp_, lambda_G_));
    }
    if (plain(g)) {
      const double s = g.scalar_type() == at::kFloat ? double(*g.const_data_ptr<float>()) : *g.const_data_ptr<double>();
      if (s != 1.0)
        for (Tensor& t : grads) t.mul_(s);
    } else {  // any other tensor (another dtype, a subclass, batched under is_grads_batched): torch's product
      for (Tensor& t : grads) t = t.mul(g);
    }
    return grads;
  }

  // Whether the incoming gradient is a plain CPU float or double, whose value is read in place.
  static bool plain(const Tensor& g) {
    return g.device().is_cpu() && g.layout() == at::kStrided && g.has_storage() && !g.is_neg() && !g.is_conj() &&
           !g.key_set().has_any(c10::DispatchKeySet(c10::DispatchKey::Python)) &&
           (g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble);
  }

 private:
  c10::intrusive_ptr<Prepared> program_;
  std::vector<double> lambda_perp_, lambda_G_;
  std::vector<Tensor> grads_;
  std::vector<int64_t> versions_;
  bool released_ = false;
};

Tensor Prepared::penalty(bool wide) {
  refuse_tangents();
  // The gradients and the value are made below torch.func's transforms, whose factory functions return
  // wrappers without storage: inside a transform the value is a constant of the transformed function
  // (the penalty reads the model's parameters, not the transform's inputs; a transform of the parameters
  // themselves is refused where the program is prepared).
  c10::impl::ExcludeDispatchKeyGuard below_functorch(c10::DispatchKeySet(
      {c10::DispatchKey::FuncTorchDynamicLayerFrontMode, c10::DispatchKey::FuncTorchDynamicLayerBackMode}));
  std::vector<double> lambda_perp = lambdas(true), lambda_G = lambdas(false);
  auto [value, grads] = fresh_with(lambda_perp, lambda_G);
  // written directly: a fill through the dispatcher costs more than the rest of the node
  Tensor out = at::empty({}, at::TensorOptions().dtype(wide ? at::kDouble : at::kFloat));
  if (wide)
    *out.data_ptr<double>() = value;
  else
    *out.data_ptr<float>() = static_cast<float>(value);
  if (!at::GradMode::is_enabled() || !torch::autograd::compute_requires_grad(params_)) return out;
  auto node = c10::make_intrusive<PenaltyBackward>(
      torch::autograd::collect_next_edges(params_), c10::intrusive_ptr<Prepared>::unsafe_reclaim_from_nonowning(this),
      std::move(lambda_perp), std::move(lambda_G), std::move(grads), versions());
  torch::autograd::set_history(out, node);
  return out;
}

int64_t num_threads() { return at::get_num_threads(); }

std::vector<std::string> plan_columns() { return {std::begin(kPlanColumnNames), std::end(kPlanColumnNames)}; }

// How many threads at::parallel_for actually uses in this extension: the distinct thread ids seen
// over `items` busy single-item chunks. 1 when the extension is built without OpenMP (the
// parallel_for template then runs serially, silently).
int64_t parallel_threads(int64_t items) {
  std::vector<int64_t> tid(std::max<int64_t>(items, 1), -1);
  at::parallel_for(0, items, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      volatile double x = 0;
      for (int k = 0; k < 200000; ++k) x = x + 1.0;  // keep each chunk busy long enough to spread
      tid[i] = at::get_thread_num();
    }
  });
  std::sort(tid.begin(), tid.end());
  return std::unique(tid.begin(), tid.end()) - tid.begin();
}

std::string isa() { return kernels().isa; }

// Test hooks: the number of cached host plans, and emptying both caches.
int64_t plan_cache_size() { return plan_cache().size(); }

void clear_plan_caches() {
  plan_cache().clear();
  perm_cache().clear();
}

// Test hook: run the baseline kernels ("baseline"), AVX2 with the kGeneric pairs in four lanes ("avx2":
// what a CPU with AVX2 but not AVX-512 runs; the baseline on a CPU without AVX2) or the best for this CPU
// ("best", or "avx2+avx512", the name isa() gives it on a CPU with AVX-512); returns the previous choice as
// isa() names it, which it accepts back. Not for use while another call is running.
std::string set_isa(const std::string& which) {
  TORCH_CHECK_VALUE(which == "baseline" || which == "avx2" || which == "best" || which == "avx2+avx512",
                    "set_isa: expected 'baseline', 'avx2' or 'best', got '", which, "'");
  static const Kernels narrow = best_kernels(false);
  const std::string previous = kernels().isa;
  g_kernels.store(which == "baseline" ? &kBaseline : which == "avx2" ? &narrow : nullptr, std::memory_order_release);
  return previous;
}

}  // namespace

// The helpers of the extension. The op itself, equiproj::fused_energies, has one schema, declared in
// equiproj/ops/_op.py with its fake and autograd implementations; this is its CPU implementation.
TORCH_LIBRARY(equiproj_cpu, m) {
  m.def("num_threads() -> int", &num_threads);
  m.def("plan_columns() -> str[]", &plan_columns);
  m.def("isa() -> str", &isa);
  m.def("set_isa(str which) -> str", &set_isa);
  m.def("parallel_threads(int items) -> int", &parallel_threads);
  m.def("plan_cache_size() -> int", &plan_cache_size);
  m.def("clear_plan_caches() -> ()", &clear_plan_caches);
  m.class_<Prepared>("Prepared")
      .def(torch::init<std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                       std::vector<Tensor>, std::vector<Tensor>>())
      .def("set_lambdas", &Prepared::set_lambdas)
      .def("energies", &Prepared::energies)
      .def("value", &Prepared::value)
      .def("backward", &Prepared::backward)
      .def("fresh", &Prepared::fresh)
      .def("penalty", &Prepared::penalty)
      .def("step", &Prepared::step);
}

TORCH_LIBRARY_IMPL(equiproj, CPU, m) { m.impl("fused_energies", &fused_energies_op); }

}  // namespace equiproj_cpu
