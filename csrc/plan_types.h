// Host-side form of a packed plan (equiproj/_plan.py, PackedPlan) and per-thread scratch, shared
// by the host code (fused_energies.cpp) and the tile kernels (tile_kernels.h).
#pragma once

#include <cstdint>
#include <vector>

namespace equiproj_cpu {

using acc_t = double;  // tile arithmetic and partial sums, whatever the weight dtype

enum class Kind {
  kZero,      // r = 0: the whole tile is non-equivariant (sum of squares)
  kIdentity,  // r = 1, A = +-I/sqrt(d): coef^2 = tr^2/d, R = T - (tr/d) I
  kWhole,     // r = d_out d_in, an orthonormal basis of every tile: all of it is equivariant (R = 0)
  kSmall,     // any basis, d_out, d_in <= kMaxSmall (compile-time tile shape for square 2..5)
  kGeneric,   // any basis, runtime tile shape
  kOrbit,     // two permutation fields: P(T) is the mean over each orbit of G on the tile's entries
};

constexpr int kMaxSmall = 5;

struct Pair {
  int64_t in_off, ci, di, r;
  Kind kind;
  const acc_t* A;   // [r, d_out, d_in]
  const acc_t* At;  // [d_out, d_in, r rounded up to 4] (kGeneric and kSmall), zero-padded
  const acc_t* Ap = nullptr;  // [r, d_out, d_in rounded up to 8] (kGeneric), zero-padded: the eight-lane tiles
  // kOrbit: K = r orbits; form (plan_columns.h, OrbitForm); for kOrbitTable the orbit of each entry
  // [d_out * d_in] and the inverse orbit sizes [K], else every orbit has inverse size inv_size; for
  // kOrbitProduct (factor = d_2) orbit holds the orbit block of each column block [d_out, d_in / d_2],
  // then the orbit pixel of each pixel [d_out, d_2].
  int64_t form = 0, factor = 0;
  const int32_t* orbit = nullptr;
  const acc_t* inv = nullptr;
  acc_t inv_size = 0;
  // kOrbitPoints (factor = |G|, orbit: the tables of orbit_perm_kernels.h): the orbits of G on the output
  // points that a call processes, [orbit_begin, orbit_end) (orbit_end < 0: all)
  int64_t orbit_begin = 0, orbit_end = -1;
  // a kOrbitSigned plan row runs as a kOrbitTable pair whose entries carry a sign: sign [d_out * d_in] is c(e)
  // = +-1, or 0 for an entry without an equivariant part (its orbit index is then 0, and its mean 0)
  const acc_t* sign = nullptr;
  bool accumulate = false;  // add the gradient to g (which may alias x) instead of writing it (every kind but
                            // kIdentity with d > kMaxSmall)
};

// All pairs of one output field, in column order; they tile [0, n).
struct OutGroup {
  int64_t out_off, co, d_out;
  std::vector<Pair> pairs;
};

struct Scratch {
  std::vector<acc_t> x, g, coef;  // float64 staging rows; generic-kernel coefficients
  std::vector<float> gf_stage;    // gradient rows of a pair before they are added to the output
  std::vector<double> gd_stage;
  std::vector<int64_t> urow;           // user row of each row of the block
  std::vector<const float*> xf;
  std::vector<float*> gf;
  std::vector<const double*> xd;
  std::vector<double*> gd;
  std::vector<const float*>& rows_in(float*) { return xf; }
  std::vector<const double*>& rows_in(double*) { return xd; }
  std::vector<float*>& rows_out(float*) { return gf; }
  std::vector<double*>& rows_out(double*) { return gd; }
  std::vector<float>& stage(float*) { return gf_stage; }
  std::vector<double>& stage(double*) { return gd_stage; }
};

// float64 scratch of a closed-form orbit pair (tile_kernels.h, orbit_closed.h): the doubled orbit
// arrays of up to ci tiles (2 K entries per tile for C_N, 4 K for D_N), then one tile's K orbit sums
inline int64_t orbit_closed_scratch(int64_t ci, int64_t K, bool dihedral) { return ci * (dihedral ? 4 : 2) * K + K; }

// The passes of a closed-form orbit pair over a range of tile rows [a0, a1) (orbit_closed.h), for
// a pair too large for one thread: the host runs the row chunks in parallel.
template <typename X>
struct ClosedChunkKernels {
  void (*sums)(const Pair&, int64_t a0, int64_t a1, const X* const* x, acc_t* work);
  void (*prepare)(const Pair&, acc_t* work, acc_t& eg);
  void (*residuals)(const Pair&, int64_t a0, int64_t a1, const X* const* x, X* const* g, acc_t cp2, acc_t cg2,
                    const acc_t* work, acc_t& ep);
};

struct Layer;
// Processes row block u of output group G of matrix b; writes (E_perp, E_G) partials to part.
using ItemFn = void (*)(const Layer&, int64_t b, const OutGroup& G, int64_t u, Scratch&, acc_t* part);

struct Layer {
  const void* data = nullptr;
  void* grad = nullptr;               // contiguous [batch, m, n] or null
  bool accumulate = false;            // add the gradient to *grad (which may be the weight itself)
  int64_t m = 0, n = 0, sm = 0, sn = 0, batch = 0;
  std::vector<int64_t> batch_off;     // element offset of each matrix in data
  const int64_t* perm_out = nullptr;  // null: identity
  const int64_t* perm_in = nullptr;
  // the host form of the layer's plan (owned by a cached HostPlan, fused_energies.cpp, that the call holds)
  const std::vector<OutGroup>* groups = nullptr;
  const std::vector<int64_t>* group_start = nullptr;  // prefix sums of copies over groups
  int64_t blocks = 0;                 // row blocks per matrix
  std::vector<acc_t> cp2, cg2;        // 2 lambda_perp, 2 lambda_G per matrix (empty: no gradient)
  ItemFn fn = nullptr;
  ItemFn split_fn = nullptr;          // a row block of closed-form pairs split into row chunks (null: none)
};

}  // namespace equiproj_cpu
