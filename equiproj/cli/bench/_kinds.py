"""The kinds of layer of the "x floor" table (:mod:`._layer_kinds`): one declared layer per kind of
the performance targets, at quick or full size, and the fields they are made of (irreps fields of
every group, band-limited regular fields, quotients given by their action)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...grid import grid_points
from ...groups import (O2, O3, SO2, SO3, Cyclic, Dihedral, FullOctahedral, FullTetrahedral, Octahedral, Rep,
                       Tetrahedral)
from ...nn import declare
from ...testing import random_orthogonal, rotated_points

__all__ = ["LayerKind", "layer_kinds", "irreps_fields", "band_limited_field", "cyclic_quotient"]


@dataclass(frozen=True)
class LayerKind:
    """One row: ``build()`` returns a declared module whose ``weight`` (and bias) the penalty reads."""

    name: str
    route: str  # "linear", "grid" or "steerable": which target applies
    build: Callable[[], nn.Module]
    smoke: bool = False  # one of the few kinds that represent their family in a short run

    @property
    def target(self) -> float:
        return 3.0 if self.route == "steerable" else 2.0


def _linear(rep: Rep) -> Callable[[], nn.Module]:
    return lambda: declare(nn.Linear(rep.dim, rep.dim, bias=False), rep, rep)


def _conv(dims: int, rep_in: Rep, rep_out: Rep, k: int, kernel_space=None) -> Callable[[], nn.Module]:
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[dims]

    def build():
        m = conv(rep_in.dim, rep_out.dim, k, bias=False)
        return declare(m, rep_in, rep_out) if kernel_space is None else declare(m, rep_in, rep_out,
                                                                                 kernel_space=kernel_space)

    return build


# ---- the fields of the rows -------------------------------------------------------------------
def _irreps(G, band_limit: int | None):
    return G.irreps(band_limit=None if G.is_finite else band_limit)


def irreps_fields(G, dim: int, band_limit: int | None = None) -> Rep:
    """Every irrep of ``G`` (of degree/frequency ``<= band_limit`` for a continuous group), the same
    number of copies of each, about ``dim`` coordinates: a layer on irreps fields in their own basis."""
    irreps = _irreps(G, band_limit)
    copies = max(1, dim // sum(p.dim for p in irreps))
    return _sum([copies * p for p in irreps])


def band_limited_field(G, band_limit: int) -> Rep:
    """One band-limited regular field of a continuous group: every irrep of degree/frequency ``<=
    band_limit`` as often as in the regular representation (``d_psi / r_psi`` times: once for the
    frequencies of SO(2), twice for O(2)'s two-dimensional irreps, ``2 l + 1`` times for degree ``l``
    of SO(3)/O(3)), in one fixed dense orthogonal basis (escnn's ``bl_regular_representation`` fields
    are sampled in such a basis): one field whose change of basis mixes all of its irreps."""
    parts = [(p.dim // p.endomorphism_basis.shape[0]) * p for p in G.irreps(band_limit=band_limit)]
    rep = _sum(parts)
    return rep.change_basis(random_orthogonal(rep.dim, torch.Generator().manual_seed(rep.dim)))


def _irreps_text(rep: Rep) -> str:
    """``16x0e+16x1o+16x2e``: the segments of a rep of irreps."""
    return "+".join(f"{c}x{f.name}" for c, f in rep.segments)


def _sum(reps: list[Rep]) -> Rep:
    out = reps[0]
    for r in reps[1:]:
        out = out + r
    return out


def _polygon(n: int, offset: float) -> torch.Tensor:
    a = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n) + offset
    return torch.stack([a.cos(), a.sin()], 1)


def _cube_vertices() -> torch.Tensor:
    return torch.tensor([[x, y, z] for x in (-1.0, 1.0) for y in (-1.0, 1.0) for z in (-1.0, 1.0)], dtype=torch.float64)


def _face_centres() -> torch.Tensor:
    return torch.cat([torch.eye(3, dtype=torch.float64), -torch.eye(3, dtype=torch.float64)])


def cyclic_quotient(N: int, M: int) -> Rep:
    """C_N acting on the cosets of its subgroup C_(N/M): the rotation by ``2 pi k / N`` moves coset ``i``
    to ``i + k mod M`` (given by its action: no set of M points of the plane is permuted so by the
    rotations)."""
    return rotated_points(N, M, name=f"C{N}/C{N // M}")


def layer_kinds(quick: bool, every: bool = True) -> list[LayerKind]:
    """The kinds of the table, with quick (small) or full (target) sizes: every kind of layer of the
    performance targets (linear layers on the irreps fields of every group and on permutation fields:
    C_N and D_N regular, O and O_h regular, quotients, point sets; grid convolutions with regular and
    with irreps fields; steerable convolutions with regular, band-limited and irreps fields), or with
    ``every=False`` one or two kinds of each family (``LayerKind.smoke``: a run of a few seconds)."""
    kinds = _all_kinds(quick)
    return kinds if every else [k for k in kinds if k.smoke]


def _all_kinds(quick: bool) -> list[LayerKind]:
    s = 4 if quick else 1  # the full sizes divided by s (channels, not kernel sizes)
    n = 4096 // s  # the side of a linear layer's weight
    kinds = [LayerKind(f"Linear {n}², O(3) {n // 4}x0e+{n // 4}x1o", "linear",
                       _linear(Rep.parse(O3(), f"{n // 4}x0e + {n // 4}x1o")), smoke=True)]
    # linear layers on irreps fields, every group
    for G, label, L in ((Cyclic(8), "C8", None), (Dihedral(8), "D8", None), (SO2(), "SO(2)", 3), (O2(), "O(2)", 3),
                        (SO3(), "SO(3)", 2), (O3(), "O(3)", 2), (Octahedral(), "O", None),
                        (FullOctahedral(), "O_h", None), (Tetrahedral(), "T", None), (FullTetrahedral(), "T_d", None)):
        rep = irreps_fields(G, n, L)
        degrees = "" if G.is_finite else f" up to {'l' if G.ambient_dim == 3 else 'frequency'} {L}"
        kinds.append(LayerKind(f"Linear {rep.dim}², {label} irreps{degrees} ({rep.segments[0][0]} x each)",
                               "linear", _linear(rep)))
    # regular fields
    ns = (4, 16, 64) if quick else (4, 8, 16, 64, 256, 1024, 4096)
    for N in ns:
        copies = max(1, n // N)
        kinds.append(LayerKind(f"Linear {copies * N}², {copies} x C{N} regular", "linear",
                               _linear(copies * Cyclic(N).regular()), smoke=N == 16))
    for N in ns:
        copies = max(1, n // (2 * N))
        kinds.append(LayerKind(f"Linear {copies * 2 * N}², {copies} x D{N} regular", "linear",
                               _linear(copies * Dihedral(N).regular()), smoke=N == 16))
    for G, label in ((Octahedral(), "O"), (FullOctahedral(), "O_h")):
        copies = max(1, n // len(G.elements()))
        kinds.append(LayerKind(f"Linear {copies * len(G.elements())}², {copies} x {label} regular", "linear",
                               _linear(copies * G.regular()), smoke=label == "O"))
    # quotients G/H: the group permuting the cosets (points of one orbit)
    D16, O, Oh = Dihedral(16), Octahedral(), FullOctahedral()
    for rep, what in ((cyclic_quotient(16, 4), "C16/C4 (4 cosets)"),
                      (Rep.permutation(D16, points=_polygon(16, math.pi / 16)), "D16/D1 (16-gon vertices)"),
                      (Rep.permutation(O, points=_face_centres()), "O/C4 (cube faces)"),
                      (Rep.permutation(Oh, points=_cube_vertices()), "O_h/D3d (cube vertices)")):
        copies = max(1, n // rep.dim)
        kinds.append(LayerKind(f"Linear {copies * rep.dim}², {copies} x {what}", "linear", _linear(copies * rep),
                               smoke="O_h" in what))
    # Rep.permutation of point sets of several orbits
    D4 = Dihedral(4)
    side = 64 // (2 if quick else 1)  # one field of side² points
    kinds.append(LayerKind(f"Linear {side * side}², D4 on the {side}x{side} grid points (one field)", "linear",
                           _linear(Rep.permutation(D4, points=grid_points((side, side))))))
    pix = Rep.permutation(D4, points=grid_points((5, 5)))
    kinds.append(LayerKind(f"Linear {n // 25 * 25}², {n // 25} x D4 on the 5x5 grid points", "linear",
                           _linear((n // 25) * pix), smoke=True))
    cube = Rep.permutation(Oh, points=grid_points((4, 4, 4)))
    kinds.append(LayerKind(f"Linear {n // 64 * 64}², {n // 64} x O_h on the 4x4x4 grid points", "linear",
                           _linear((n // 64) * cube)))
    # grid convolutions: 2-D C4/D4 on k = 3, 5, 3-D O/O_h on k = 3; regular and irreps fields
    c = 384 // s
    for G, label in ((Cyclic(4), "C4"), (Dihedral(4), "D4")):
        reg = (c // len(G.elements())) * G.regular()
        irr = irreps_fields(G, c)
        for k in (3, 5):
            kinds.append(LayerKind(f"Conv2d {c}->{c} k={k}, {label} regular (grid)", "grid", _conv(2, reg, reg, k),
                                   smoke=label == "C4" and k == 5))
            kinds.append(LayerKind(f"Conv2d {irr.dim}->{irr.dim} k={k}, {label} irreps (grid)", "grid",
                                   _conv(2, irr, irr, k), smoke=label == "D4" and k == 3))
    for G, label in ((Octahedral(), "O"), (FullOctahedral(), "O_h")):
        copies = max(1, 96 // s // len(G.elements()))
        reg = copies * G.regular()
        irr = irreps_fields(G, 96 // s)
        kinds.append(LayerKind(f"Conv3d {reg.dim}->{reg.dim} k=3, {copies} x {label} regular (grid)", "grid",
                               _conv(3, reg, reg, 3), smoke=label == "O"))
        kinds.append(LayerKind(f"Conv3d {irr.dim}->{irr.dim} k=3, {label} irreps (grid)", "grid",
                               _conv(3, irr, irr, 3)))
    # steerable convolutions: 2-D k = 5, 7 (384 and 256 channels), 3-D k = 5 (144 channels)
    for G, label in ((Cyclic(8), "C8"), (Cyclic(16), "C16")):
        for k, ch in ((5, c), (7, 256 // s)):
            reg = (ch // len(G.elements())) * G.regular()
            irr = irreps_fields(G, ch)
            kinds.append(LayerKind(f"Conv2d {reg.dim}->{reg.dim} k={k}, {label} regular (steerable)", "steerable",
                                   _conv(2, reg, reg, k), smoke=label == "C8" and k == 5))
            kinds.append(LayerKind(f"Conv2d {irr.dim}->{irr.dim} k={k}, {label} irreps (steerable)", "steerable",
                                   _conv(2, irr, irr, k)))
    for G, label, L in ((SO2(), "SO(2)", 3), (O2(), "O(2)", 3)):
        field = band_limited_field(G, L)
        for k, ch in ((5, c), (7, 256 // s)):
            irr = irreps_fields(G, ch, L)
            bl = (ch // field.dim) * field
            kinds.append(LayerKind(f"Conv2d {irr.dim}->{irr.dim} k={k}, {label} irreps up to frequency {L} "
                                   "(steerable)", "steerable", _conv(2, irr, irr, k),
                                   smoke=k == 5 and label == "SO(2)"))
            kinds.append(LayerKind(f"Conv2d {bl.dim}->{bl.dim} k={k}, {ch // field.dim} x {label} band-limited "
                                   f"regular, frequency <= {L} (steerable)", "steerable", _conv(2, bl, bl, k),
                                   smoke=k == 5 and label == "SO(2)"))
    c3 = 144 // s
    n3 = c3 // 9
    for G, label, irr in ((SO3(), "SO(3)", irreps_fields(SO3(), c3, 2)),
                          (O3(), "O(3)", Rep.parse(O3(), f"{n3}x0e + {n3}x1o + {n3}x2e"))):
        field = band_limited_field(G, 1)
        bl = max(1, c3 // field.dim) * field
        kinds.append(LayerKind(f"Conv3d {irr.dim}->{irr.dim} k=5, {label} {_irreps_text(irr)} (steerable)",
                               "steerable", _conv(3, irr, irr, 5), smoke=label == "O(3)"))
        kinds.append(LayerKind(f"Conv3d {bl.dim}->{bl.dim} k=5, {bl.segments[0][0]} x {label} band-limited "
                               "regular, l <= 1 (steerable)", "steerable", _conv(3, bl, bl, 5)))
    return kinds
