// Columns of a row of a packed plan's meta tensor: the C++ mirror of PlanColumn in equiproj/_plan.py.
// The extension exports the names (plan_columns()); equiproj checks them against the Python enum
// when it loads the extension, so a change on one side without the other is an error, not a
// silent misread.
#pragma once

#include <cstdint>

namespace equiproj_cpu {

enum PlanColumn : int64_t {
  kOutOffset = 0,    // first structured row of the output field's copies
  kInOffset = 1,     // first structured column of the input field's copies
  kOutCopies = 2,
  kInCopies = 3,
  kDOut = 4,         // dimension of the output field
  kDIn = 5,
  kRank = 6,         // number of basis matrices (0: the whole tile is non-equivariant)
  kBasisOffset = 7,  // start of the pair's [r, d_out, d_in] basis (orbit pair: its orbit data) in the basis tensor
  kOrbits = 8,       // 0: a basis pair; K > 0: an orbit pair (two permutation fields) with K orbits
  kOrbitForm = 9,    // an orbit pair's OrbitForm (below)
  kPlanColumns = 10,  // number of columns
};

// How an orbit pair finds the orbit of tile entry (a, b) (equiproj/_plan.py, OrbitForm).
enum OrbitForm : int64_t {
  kOrbitTable = 0,     // the basis segment holds d_out * d_in orbit indices, then K inverse orbit sizes
  kOrbitCyclic = 1,    // regular fields of C_N: (b - a) mod N, orbits of size N
  kOrbitDihedral = 2,  // regular fields of D_N (element k + N s = R(k) F^s), orbits of size 2N
  kOrbitProduct = 3,   // regular output field, input f_1 ⊗ f_2: d_2, then the factor tables T1 [d_out, d_1], T2 [d_out, d_2]
  kOrbitPoints = 4,    // any two permutation fields: |G|, then sigma_out [|G|, d_out], sigma_in [|G|, d_in]
  kOrbitSigned = 5,    // two monomial fields: c(e) (k + 1) per entry (0: no equivariant part), then K inverse orbit sizes
};

inline constexpr const char* kPlanColumnNames[] = {"OUT_OFFSET", "IN_OFFSET", "OUT_COPIES", "IN_COPIES",
                                                   "D_OUT",      "D_IN",      "RANK",       "BASIS_OFFSET",
                                                   "ORBITS",     "ORBIT_FORM"};
static_assert(sizeof(kPlanColumnNames) / sizeof(kPlanColumnNames[0]) == kPlanColumns,
              "one name per plan column");
static_assert(kOrbitForm + 1 == kPlanColumns, "the columns are numbered 0 .. kPlanColumns - 1");

}  // namespace equiproj_cpu
