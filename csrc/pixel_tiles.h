// The pair kernel of pixel tiles (pixel_tiles.cpp, pixel_tile_kernels.h) for the other CPU kernels: every
// tile of one field pair against one row block, float64 arithmetic in eight lanes, any basis given as
// padded rows (A_k row a of the pair at A + (k d_out + a) np, np = the tile's columns rounded up to 8,
// zero-padded), the gradient written or added (add; g may alias x).
#pragma once

#include <cstdint>

namespace equiproj_cpu {

using TilePairFn32 = void (*)(const float* const* x, float* const* g, bool add, int64_t dout, int64_t n, int64_t ci,
                              int64_t r, const double* A, double cp2, double cg2, double* coef, double& ep,
                              double& eg);
using TilePairFn64 = void (*)(const double* const* x, double* const* g, bool add, int64_t dout, int64_t n,
                              int64_t ci, int64_t r, const double* A, double cp2, double cg2, double* coef,
                              double& ep, double& eg);

struct TileKernels {
  TilePairFn32 f32;
  TilePairFn64 f64;
  const char* isa;  // "avx512" or "plain"
};

// The AVX-512 kernels where the CPU has AVX-512 F and VL (and not plain), else the plain loops. coef: room
// for r coefficients (ranks above the unrolled ones).
TileKernels tile_kernels(bool plain);

}  // namespace equiproj_cpu
