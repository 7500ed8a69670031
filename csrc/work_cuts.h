// Contiguous ranges of work items of about equal cost, one per thread.
//
// at::parallel_for splits a range by count, one contiguous part per thread. Where items differ in
// cost (the row block of a scalar field against that of a five-dimensional one, bases of rank 1
// against 30), an even split by count leaves one thread with most of the work: the pixel tiles of an
// O(2) irreps layer ran no faster on two threads than on one (measured). Cutting the items by their
// summed cost instead bounds a thread's excess by one item. The cut changes which thread runs an item,
// never what it computes: each item writes its own partial sums, added in item order afterwards.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace equiproj_cpu {

// starts[k] .. starts[k + 1], k < parts: the items (cost[i] >= 0 each) cut where the running cost
// first reaches k / parts of the total. parts = at::get_num_threads() when not given (at least 1), and
// no more than total / min_part where min_part > 0 (so that a small call stays on one thread: waking
// the others costs more than its work); empty ranges are possible when a few items carry the cost.
inline std::vector<int64_t> cuts_by_cost(const std::vector<double>& cost, int64_t parts = 0, double min_part = 0) {
  if (parts <= 0) parts = std::max<int64_t>(1, at::get_num_threads());
  const int64_t n = static_cast<int64_t>(cost.size());
  std::vector<double> prefix(n + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost[i];
  if (min_part > 0) parts = std::max<int64_t>(1, std::min<int64_t>(parts, static_cast<int64_t>(prefix[n] / min_part)));
  std::vector<int64_t> starts(parts + 1, n);
  starts[0] = 0;
  for (int64_t k = 1; k < parts; ++k) {
    const double target = prefix[n] * static_cast<double>(k) / static_cast<double>(parts);
    // the boundary whose running cost is nearest the target
    int64_t i = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
    if (i > 0 && target - prefix[i - 1] < prefix[i] - target) --i;
    starts[k] = std::max(starts[k - 1], std::min(i, n));
  }
  return starts;
}

// f(begin, end) over the items, cut by cost into one contiguous range per thread of at least min_part
// (as at::parallel_for's f: a thread's scratch lives for its range).
template <typename F>
inline void parallel_by_cost(const std::vector<double>& cost, const F& f, double min_part = 0) {
  const std::vector<int64_t> starts = cuts_by_cost(cost, 0, min_part);
  const int64_t parts = static_cast<int64_t>(starts.size()) - 1;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    if (starts[p0] < starts[p1]) f(starts[p0], starts[p1]);
  });
}

}  // namespace equiproj_cpu
