// Product orbit pairs in AVX-512 float32 lanes (orbit_products.cpp), for the fused op's CPU kernel: the
// grid convolutions whose output field is regular and whose input field is f_1 ⊗ pixels
// (plan_columns.h: kOrbitProduct), with float32 weights and kernels of 17 .. 32 pixels (5 x 5 and
// 3 x 3 x 3), whose column blocks fill two 16-lane registers.
#pragma once

#include <cstdint>

#include "plan_columns.h"
#include "plan_types.h"

namespace equiproj_cpu {

// A column block's lanes: two 16-lane registers, the most pixels the kernel takes, and the padded size of
// an orbit block's sums.
constexpr int64_t kProductLanes = 32;

using ProductPairFn32 = void (*)(const Pair& p, int64_t dout, const float* const* x, float* const* g, double cp2,
                                 double cg2, double* scratch, double& ep, double& eg);

// Whether the product kernel takes pair p: a product pair (no signs) of 17 .. 32 pixels. Smaller kernels
// (3 x 3: 9 pixels) half fill the registers: their blocks took 1.4-1.6 times the tables' kernel's time.
inline bool product_pair_fits(const Pair& p) {
  return p.form == kOrbitProduct && !p.sign && p.factor > 16 && p.factor <= kProductLanes;
}

// float64 scratch entries of one call on dout rows: the orbit sums of every tile (kProductLanes per orbit
// block), then room for dout (d_1 + kProductLanes) int32 (the rows' block offsets and lane indices).
inline int64_t product_pair_scratch(const Pair& p, int64_t dout) {
  const int64_t d1 = p.di / p.factor;
  return p.ci * d1 * kProductLanes + (dout * (d1 + kProductLanes) + 1) / 2;
}

// The AVX-512 kernel where the CPU has AVX-512 F and VL, else null (the tables' kernel of tile_kernels.h).
ProductPairFn32 product_pair_kernel();

}  // namespace equiproj_cpu
