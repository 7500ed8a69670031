// The means and pass 2 of the tables' kernel (orbit_table_kernels.h) in AVX-512 float32 lanes, for orbit
// tables of at most sixteen orbits per tile: the grid convolutions on irreps fields of C4 and D4, whose
// tiles (one field of each side, every pixel) have 9 or 18 entries a row and 1 .. 10 orbits on 3 x 3
// kernels, 25 or 50 and 6 .. 26 on 5 x 5.
#pragma once

#include <cstdint>

#include "plan_columns.h"
#include "plan_types.h"

namespace equiproj_cpu {

// The pivot pass's group of tiles, and the most lanes that hold a group's means: the K orbits of eight
// tiles, [K][8] floats, in up to eight 16-lane registers (K <= 16).
constexpr int64_t kPivotGroup = 8;
constexpr int64_t kPermutedMeansLanes = 128;

// The means (E_G into eg) and pass 2 (E_perp into ep, the gradient into g) of the tiles [0, v8) of every row:
// sums = what the pivot pass leaves per group of eight tiles at float 16 K of the group ([K][8] pivots, then
// [K][8] sums of the differences from them); pattern: permuted_means_scratch(p) floats, 64-byte aligned.
using PivotResidualsFn32 = void (*)(const Pair& p, int64_t dout, const float* const* x, float* const* g, double cp2,
                                    double cg2, const float* sums, int64_t v8, float* pattern, double& ep,
                                    double& eg);

// Whether pass 2 of a float32 table pair (that takes the pivot pass) can take the permuted means.
inline bool permuted_means_fit(const Pair& p) {
  return p.kind == Kind::kOrbit && p.form == kOrbitTable && p.r > 0 && kPivotGroup * p.r <= kPermutedMeansLanes;
}

// The floats of one row's lane pattern (an index and a sign per entry of a group of eight tiles, whole
// vectors), plus 16 for the alignment.
inline int64_t permuted_means_scratch(const Pair& p) { return 2 * ((kPivotGroup * p.di + 15) / 16 * 16) + 16; }

// The AVX-512 pass where the CPU has AVX-512 F and VL, else null (the tables' eight-lane pass 2).
PivotResidualsFn32 pivot_residuals_kernel();

}  // namespace equiproj_cpu
