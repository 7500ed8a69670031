// Orbit pairs stored by the group's permutations (plan_columns.h: kOrbitPoints): two permutation fields
// of any kind (a large point set), P(T)[a, b] = (1/|G|) sum_g T[sigma_g(a), sigma_g(b)], nothing of
// size d_out d_in stored. Included by tile_kernels.h before its dispatch (no include guard, includes
// nothing, like that file).
//
// The rows of a tile fall into the orbits of G on the output points. For an orbit with representative
// a0, pass 1 forms the mean row m[b] = (1/|G|) sum_g T[g a0, g b] (|G| rows gathered through sigma^in,
// the orbit's rows stay in cache), which is row a0 of P(T). Every other row a = h a0 of the orbit is
// P(T)[h a0, b] = m[h^-1 b] (P(T) is equivariant), so pass 2 reads m through the inverse permutation of
// h and forms the residual, E_perp and the gradient row by row; E_G = |orbit| ||m||^2. The means are in
// float64 and every entry is read before it is written, so g may alias x (the decoupled step), and
// nearly equivariant weights keep their digits (the residual form).
//
// The host (fused_energies.cpp, build_groups) writes the pair's int32 data at p.orbit, with p.factor = |G|:
//   [0] R, the number of row orbits; then sigma^in [|G|, d_in]; its inverses [|G|, d_in];
//   sigma^out [|G|, d_out]; the start of each row orbit in the row list [R + 1]; the row list [d_out]
//   (each orbit's representative first); the element h with h a0 = a of each listed row [d_out].
// A call processes the row orbits [p.orbit_begin, p.orbit_end) (p.orbit_end < 0: all of them), so that
// the host can run the orbits of one large row block in parallel.

struct PointTables {
  int64_t R;
  const int32_t *sig_in, *sig_in_inv, *sig_out, *start, *rows, *elem;
};

inline PointTables point_tables(const Pair& p, int64_t dout) {
  const int64_t ng = p.factor, di = p.di;
  PointTables t;
  t.R = p.orbit[0];
  t.sig_in = p.orbit + 1;
  t.sig_in_inv = t.sig_in + ng * di;
  t.sig_out = t.sig_in_inv + ng * di;
  t.start = t.sig_out + ng * dout;
  t.rows = t.start + t.R + 1;
  t.elem = t.rows + dout;
  return t;
}

// int32 entries of the data of a kOrbitPoints pair with R row orbits
inline int64_t point_tables_size(int64_t ng, int64_t dout, int64_t din, int64_t R) {
  return 1 + ng * (2 * din + dout) + R + 1 + 2 * dout;
}

// m: d_in scratch entries (the mean row of one orbit and tile).
template <typename X>
void points_orbit_pair(const Pair& p, int64_t dout, const X* const* x, X* const* g, acc_t cp2, acc_t cg2, acc_t* m,
                       acc_t& ep, acc_t& eg) {
  const PointTables t = point_tables(p, dout);
  const int64_t ng = p.factor, di = p.di, ci = p.ci;
  const int64_t o0 = p.orbit_begin, o1 = p.orbit_end < 0 ? t.R : p.orbit_end;
  const acc_t inv_ng = acc_t(1) / acc_t(ng);
  const bool add = p.accumulate;
  acc_t sp[4] = {0, 0, 0, 0}, sg = 0;
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t r0 = t.start[o], r1 = t.start[o + 1];
    const int64_t a0 = t.rows[r0];
    for (int64_t v = 0; v < ci; ++v) {
      const int64_t col = v * di;
      // pass 1: m[b] = (1/|G|) sum_g T[g a0, g b]
      for (int64_t b = 0; b < di; ++b) m[b] = 0;
      for (int64_t e = 0; e < ng; ++e) {
        const X* xr = x[t.sig_out[e * dout + a0]] + col;
        const int32_t* s = t.sig_in + e * di;
        for (int64_t b = 0; b < di; ++b) m[b] += acc_t(xr[s[b]]);
      }
      acc_t mm = 0;
      for (int64_t b = 0; b < di; ++b) {
        m[b] *= inv_ng;
        mm += m[b] * m[b];
      }
      sg += acc_t(r1 - r0) * mm;
      // pass 2: row a = h a0 of the orbit, P(T)[a, b] = m[h^-1 b]
      for (int64_t q = r0; q < r1; ++q) {
        const int64_t a = t.rows[q];
        const int32_t* hinv = t.sig_in_inv + int64_t(t.elem[q]) * di;
        const X* xa = x[a] + col;
        X* ga = g ? g[a] + col : nullptr;
        int64_t b = 0;
        for (; b + 4 <= di; b += 4)
          for (int l = 0; l < 4; ++l) {
            const acc_t tv = xa[b + l], r = tv - m[hinv[b + l]];
            sp[l] += r * r;
            if (ga) {
              const acc_t gv = cg2 * tv + (cp2 - cg2) * r;
              ga[b + l] = static_cast<X>(add ? acc_t(ga[b + l]) + gv : gv);
            }
          }
        for (; b < di; ++b) orbit_residual_one(xa + b, ga ? ga + b : nullptr, m[hinv[b]], cp2, cg2, add, sp[0]);
      }
    }
  }
  ep += (sp[0] + sp[1]) + (sp[2] + sp[3]);
  eg += sg;
}
