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
  kBasisOffset = 7,  // start of the pair's [r, d_out, d_in] basis in the plan's basis tensor
  kPlanColumns = 8,  // number of columns
};

inline constexpr const char* kPlanColumnNames[] = {"OUT_OFFSET", "IN_OFFSET", "OUT_COPIES", "IN_COPIES",
                                                   "D_OUT",      "D_IN",      "RANK",       "BASIS_OFFSET"};
static_assert(sizeof(kPlanColumnNames) / sizeof(kPlanColumnNames[0]) == kPlanColumns,
              "one name per plan column");
static_assert(kBasisOffset + 1 == kPlanColumns, "the columns are numbered 0 .. kPlanColumns - 1");

}  // namespace equiproj_cpu
