"""Every kind of layer as a multiple of its memory floor: the "x floor" table of ``equiproj bench``.

For each kind (linear layers on irreps and on permutation fields, grid convolutions, steerable
convolutions) one declared layer is built and its :class:`~equiproj.nn.ProjectionPenalty` timed:
``penalty.backward()`` adding into an existing ``.grad`` and ``penalty.decay_(rate)``, in float32.
The floor is a warm ``torch.mul(W, 2, out=buf)`` of the same weight tensor (one read and one write
of W, no allocation), timed in the same run, interleaved round by round with the two calls, so that
the machine's load hits all three alike; the table gives medians and the ratios to the floor,
against the targets (2x for linear layers and grid convolutions, whose traffic is one read of W and
a read and write of ``.grad``; 3x for steerable convolutions).

``layer_kind_rows(threads, quick)`` measures, ``format_layer_kinds(rows)`` writes the markdown
table. The kinds (:func:`layer_kinds`) are every kind of the performance targets: linear layers on
the irreps fields of all ten groups and on permutation fields (C_N and D_N regular for N up to 4096,
O and O_h regular, quotients ``G/H``, point sets of several orbits), grid convolutions (C4/D4 on 2-D
kernels k = 3 and 5, O/O_h on 3-D k = 3) with regular and with irreps fields, and steerable
convolutions (C8, C16, SO(2), O(2) on 2-D k = 5 and 7; SO(3), O(3) on 3-D k = 5) with regular or
band-limited and with irreps fields. ``quick`` takes small layers (a quarter of the channels: about
1 M weights per linear layer, for ``equiproj bench``), the full sizes are those of the targets
(Linear 4096², Conv2d 384 -> 384 k=5, ...); ``every=False`` keeps one or two kinds per family (for
``equiproj bench --quick``). Each row also names the computation the layer's fused CPU route runs
and the flops per weight the code states for it (:func:`route_of`), and a kind that raises is an
error row, not the end of the table.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..._caches import clear_caches
from ...grid import grid_points
from ...groups import (O2, O3, SO2, SO3, Cyclic, Dihedral, FullOctahedral, FullTetrahedral, Octahedral, Rep,
                       Tetrahedral)
from ..._plan import OrbitForm, PlanColumn, plan_for
from ...kernel_spaces._factorised import factorised_plan
from ...kernel_spaces._regular_band import kernel_available
from ...nn import ProjectionPenalty, declaration, declare
from ...testing import random_orthogonal

__all__ = ["LayerKind", "layer_kinds", "layer_kind_rows", "format_layer_kinds", "measure_layer", "route_of",
           "irreps_fields", "band_limited_field", "cyclic_quotient", "is_noisy", "NOISY_IQR"]


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
def _label(G) -> str:
    """The short name of a group in the row names (``C8``, ``O_h``, ``SO(2)``)."""
    name = type(G).__name__
    if name in ("Cyclic", "Dihedral"):
        return f"{name[0]}{G.N}"
    return {"SO2": "SO(2)", "O2": "O(2)", "SO3": "SO(3)", "O3": "O(3)", "Octahedral": "O", "FullOctahedral": "O_h",
            "Tetrahedral": "T", "FullTetrahedral": "T_d"}[name]


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
    to ``i + k mod M`` (given by its action, since no point set of the plane has this symmetry)."""

    def action(g):
        k = torch.round(torch.atan2(g[..., 1, 0], g[..., 0, 0]) * (N / (2 * math.pi))).long()
        return (torch.arange(M) + k[..., None]) % M

    return Rep.permutation(Cyclic(N), action=action, size=M, name=f"C{N}/C{N // M}")


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
    for G, L in ((Cyclic(8), None), (Dihedral(8), None), (SO2(), 3), (O2(), 3), (SO3(), 2), (O3(), 2),
                 (Octahedral(), None), (FullOctahedral(), None), (Tetrahedral(), None), (FullTetrahedral(), None)):
        rep = irreps_fields(G, n, L)
        degrees = "" if G.is_finite else f" up to {'l' if G.ambient_dim == 3 else 'frequency'} {L}"
        kinds.append(LayerKind(f"Linear {rep.dim}², {_label(G)} irreps{degrees} ({rep.segments[0][0]} x each)",
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
    for G in (Octahedral(), FullOctahedral()):
        copies = max(1, n // len(G.elements()))
        kinds.append(LayerKind(f"Linear {copies * len(G.elements())}², {copies} x {_label(G)} regular", "linear",
                               _linear(copies * G.regular()), smoke=_label(G) == "O"))
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
    for G in (Cyclic(4), Dihedral(4)):
        reg = (c // len(G.elements())) * G.regular()
        irr = irreps_fields(G, c)
        for k in (3, 5):
            kinds.append(LayerKind(f"Conv2d {c}->{c} k={k}, {_label(G)} regular (grid)", "grid", _conv(2, reg, reg, k),
                                   smoke=_label(G) == "C4" and k == 5))
            kinds.append(LayerKind(f"Conv2d {irr.dim}->{irr.dim} k={k}, {_label(G)} irreps (grid)", "grid",
                                   _conv(2, irr, irr, k), smoke=_label(G) == "D4" and k == 3))
    for G in (Octahedral(), FullOctahedral()):
        copies = max(1, 96 // s // len(G.elements()))
        reg = copies * G.regular()
        irr = irreps_fields(G, 96 // s)
        kinds.append(LayerKind(f"Conv3d {reg.dim}->{reg.dim} k=3, {copies} x {_label(G)} regular (grid)", "grid",
                               _conv(3, reg, reg, 3), smoke=_label(G) == "O"))
        kinds.append(LayerKind(f"Conv3d {irr.dim}->{irr.dim} k=3, {_label(G)} irreps (grid)", "grid",
                               _conv(3, irr, irr, 3)))
    # steerable convolutions: 2-D k = 5, 7 (384 and 256 channels), 3-D k = 5 (144 channels)
    for G in (Cyclic(8), Cyclic(16)):
        for k, ch in ((5, c), (7, 256 // s)):
            reg = (ch // len(G.elements())) * G.regular()
            irr = irreps_fields(G, ch)
            kinds.append(LayerKind(f"Conv2d {reg.dim}->{reg.dim} k={k}, {_label(G)} regular (steerable)", "steerable",
                                   _conv(2, reg, reg, k), smoke=_label(G) == "C8" and k == 5))
            kinds.append(LayerKind(f"Conv2d {irr.dim}->{irr.dim} k={k}, {_label(G)} irreps (steerable)", "steerable",
                                   _conv(2, irr, irr, k)))
    for G, L in ((SO2(), 3), (O2(), 3)):
        field = band_limited_field(G, L)
        for k, ch in ((5, c), (7, 256 // s)):
            irr = irreps_fields(G, ch, L)
            bl = (ch // field.dim) * field
            kinds.append(LayerKind(f"Conv2d {irr.dim}->{irr.dim} k={k}, {_label(G)} irreps up to frequency {L} "
                                   "(steerable)", "steerable", _conv(2, irr, irr, k),
                                   smoke=k == 5 and _label(G) == "SO(2)"))
            kinds.append(LayerKind(f"Conv2d {bl.dim}->{bl.dim} k={k}, {ch // field.dim} x {_label(G)} band-limited "
                                   f"regular, frequency <= {L} (steerable)", "steerable", _conv(2, bl, bl, k),
                                   smoke=k == 5 and _label(G) == "SO(2)"))
    c3 = 144 // s
    n3 = c3 // 9
    for G, irr in ((SO3(), irreps_fields(SO3(), c3, 2)),
                   (O3(), Rep.parse(O3(), f"{n3}x0e + {n3}x1o + {n3}x2e"))):
        field = band_limited_field(G, 1)
        bl = max(1, c3 // field.dim) * field
        kinds.append(LayerKind(f"Conv3d {irr.dim}->{irr.dim} k=5, {_label(G)} {_irreps_text(irr)} (steerable)",
                               "steerable", _conv(3, irr, irr, 5), smoke=_label(G) == "O(3)"))
        kinds.append(LayerKind(f"Conv3d {bl.dim}->{bl.dim} k=5, {bl.segments[0][0]} x {_label(G)} band-limited "
                               "regular, l <= 1 (steerable)", "steerable", _conv(3, bl, bl, 5)))
    return kinds


# ---- the route a layer takes, and its flops per weight -------------------------------------------
#: flops per weight of a field pair of the matrix plan: an orbit pair (two passes: the orbit sums,
#: then residual, energy and gradient), an r = 0 tile (sum of squares and the scaled gradient), a
#: tile with r basis matrices (r coefficients and the projection back, then residual and gradient)
_ORBIT_FLOPS, _ZERO_FLOPS = 6, 4
_ORBIT_NAMES = {int(OrbitForm.CYCLIC): "orbit closed form", int(OrbitForm.DIHEDRAL): "orbit closed form",
                int(OrbitForm.TABLE): "orbit table", int(OrbitForm.PRODUCT): "orbit product"}


def _matrix_route(rep_in: Rep, rep_out: Rep) -> tuple[str, float]:
    plan = plan_for(rep_in, rep_out, "cpu")
    share: dict[str, float] = {}
    flops = 0.0
    C = PlanColumn
    for row in plan.meta.tolist():
        n = row[C.OUT_COPIES] * row[C.IN_COPIES] * row[C.D_OUT] * row[C.D_IN]
        r = row[C.RANK]
        if row[C.ORBITS] > 0:
            name, f = _ORBIT_NAMES.get(row[C.ORBIT_FORM], "orbit pair"), _ORBIT_FLOPS
        elif r == 0:
            name, f = "tiles r=0", _ZERO_FLOPS
        else:
            name, f = f"tiles r={r}", 4 * r + 2
        share[name] = share.get(name, 0) + n
        flops += n * f
    total = plan.m * plan.n
    parts = sorted(share.items(), key=lambda kv: -kv[1])
    label = " + ".join(f"{name} {100 * n / total:.0f}%" if len(parts) > 1 else name for name, n in parts[:3])
    if len(parts) > 3:
        label += " + ..."
    if not plan.identity_perm:
        label += ", permuted"
    return label, flops / total


def route_of(module: nn.Module, weight: torch.Tensor) -> tuple[str, float | None]:
    """``(route, flops per weight)`` of a declared layer on the CPU's fused backend: for a matrix
    (linear layers, grid convolutions) the kinds of field pairs of its plan by their share of the
    weight (orbit closed forms, orbit tables or products, tiles with ``r`` basis matrices; "permuted"
    where the weight is gathered into the plan's order), for a kernel space the computation its fused
    route takes (pixel tiles, the closed form of regular fields, the factorised transforms) with the
    estimate its plan states. ``("-", None)`` where the declaration is of another kind."""
    decl = declaration(module)
    sp = getattr(decl, "kernel_space", None)
    if sp is None:
        rep_in = getattr(decl, "weight_rep_in", None)
        return ("-", None) if rep_in is None else _matrix_route(rep_in, decl.rep_out)
    if not hasattr(sp, "plan"):
        return "-", None
    plan = sp.plan(decl.rep_in, decl.rep_out)
    if plan.layout == "fields" and plan.packed.identity_perm:
        return "pixel tiles", plan.flops_per_weight
    fp = factorised_plan(sp, decl.rep_in, decl.rep_out)
    if fp.regular is not None and weight.device.type == "cpu" and kernel_available():
        return "regular-field closed form", fp.regular.flops_per_weight
    return "factorised", fp.flops_per_weight


#: seconds of timed rounds per row and thread count: a slow row takes fewer rounds (never under
#: MIN_ROUNDS), so that the full table stays a few minutes however far off target some rows are
ROW_BUDGET_S, MIN_ROUNDS = 1.5, 5


def _median_times(fns: dict, rounds: int, device: torch.device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for fn in fns.values():  # warm: plans, the program, the allocator
        fn()
        fn()
    sync()
    per_round = (time.perf_counter() - t0) / 2
    rounds = min(rounds, max(MIN_ROUNDS, int(ROW_BUDGET_S / max(per_round, 1e-9))))
    times: dict = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    out = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():  # the interquartile range, relative to the median
        q = statistics.quantiles(v, n=4) if len(v) >= 2 else [v[0], v[0], v[0]]
        out[f"{k}_iqr"] = (q[2] - q[0]) / out[k]
    out["rounds"] = rounds
    return out


def _prepared(kind: LayerKind, gen: torch.Generator, device: torch.device):
    """``(weight, penalty, build seconds, computation, flops per weight)``: the layer built and declared,
    a random weight, an existing ``.grad``, the penalty's program and plans made by a first
    ``backward()``, and :func:`route_of` the layer."""
    t0 = time.perf_counter()
    module = kind.build().to(device)
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.1)
    penalty = ProjectionPenalty(module, lambda_perp=1e-2)
    module.weight.grad = torch.zeros_like(module.weight)
    penalty.backward()  # the program and the plans are built here
    build_s = time.perf_counter() - t0
    route, flops = route_of(module, module.weight)
    return module.weight.detach(), penalty, build_s, route, flops


def _timed(kind: LayerKind, W: torch.Tensor, penalty, threads: int, rounds: int, build_s: float, path: str = "-",
           flops: float | None = None) -> dict:
    torch.set_num_threads(threads)
    buf = torch.empty_like(W)
    med = _median_times({"floor": lambda: torch.mul(W, 2, out=buf), "backward": penalty.backward,
                         "decay": lambda: penalty.decay_(1e-4)}, rounds, W.device)
    return {"kind": kind.name, "route": kind.route, "target": kind.target, "threads": threads,
            "weights": W.numel(), "build_s": build_s, "path": path, "flops_per_weight": flops, **med}


def measure_layer(kind: LayerKind, threads: int, rounds: int, gen: torch.Generator, device="cpu") -> dict:
    """One row: medians of the floor, ``penalty.backward()`` into ``.grad`` and ``decay_``."""
    torch.set_num_threads(threads)
    W, penalty, *info = _prepared(kind, gen, torch.device(device))
    return _timed(kind, W, penalty, threads, rounds, *info)


def layer_kind_rows(threads=(1, 2), quick: bool = True, rounds: int | None = None, progress=None,
                    kinds: list[LayerKind] | None = None, device="cpu") -> list[dict]:
    """Every kind on every thread count: a list of rows for :func:`format_layer_kinds`. ``progress``
    is called with a short label before each measurement; ``device="cuda"`` times the layers there
    (the thread count then only concerns the host).

    Each layer is built once (on the first thread count) and measured on every thread count; the
    caches of plans are emptied after each kind, so that the table's memory stays that of one layer.
    A kind that raises gives a row with its ``error`` (the exception's type and message) instead of
    times, and the table goes on."""
    rounds = rounds or (7 if quick else 15)
    gen = torch.Generator().manual_seed(0)
    previous = torch.get_num_threads()
    rows = []
    try:
        for kind in kinds or layer_kinds(quick):
            prepared = None
            for t in threads:
                if progress is not None:
                    progress(f"layer kinds: {kind.name}, {t} thread(s)")
                try:
                    if prepared is None:
                        torch.set_num_threads(t)
                        prepared = _prepared(kind, gen, torch.device(device))
                    rows.append(_timed(kind, *prepared[:2], t, rounds, *prepared[2:]))
                except Exception as err:  # noqa: BLE001 - a row of the table, not a crash of the run
                    rows.append({"kind": kind.name, "route": kind.route, "target": kind.target, "threads": t,
                                 "error": f"{type(err).__name__}: {err}"})
            del prepared
            clear_caches()
    finally:
        torch.set_num_threads(previous)
    return rows


def format_layer_kinds(rows: list[dict]) -> str:
    """The markdown table: one row per kind and thread count."""
    head = ("| layer | family | weights | threads | floor µs | backward() into .grad | decay_ | target | met "
            "| computation | flops/weight |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        if "error" in r:
            error = " ".join(r["error"].split()).replace("|", "/")
            lines.append(f"| {r['kind']} | {r['route']} | - | {r['threads']} | - | error: {error[:300]} | - "
                         f"| <= {r['target']:.0f}x | error | - | - |")
            continue
        xb, xd = r["backward"] / r["floor"], r["decay"] / r["floor"]
        met = "yes" if max(xb, xd) <= r["target"] else "no"
        if is_noisy(r):
            met = "noisy"
        flops = r.get("flops_per_weight")
        lines.append(f"| {r['kind']} | {r['route']} | {r['weights']:,} | {r['threads']} | {1e6 * r['floor']:.0f} "
                     f"| {xb:.1f}x | {xd:.1f}x | <= {r['target']:.0f}x | {met} | {r.get('path', '-')} "
                     f"| {'-' if flops is None else f'{flops:.0f}'} |")
    lines.append("\nfloor: warm `torch.mul(W, 2, out=buf)` of the same float32 weight, interleaved with the two "
                 "calls; medians. backward(): `penalty.backward()` adding into an existing `.grad`; "
                 "decay_: `penalty.decay_(rate)` in place. 'noisy': the interquartile range of one of the three "
                 f"times exceeded {NOISY_IQR:.0%} of its median, so the ratios are no finding. 'error': the kind "
                 "raised where it was built or timed. computation: what the CPU's fused route runs (for a "
                 "matrix, its field pairs by share of the weight); flops/weight: the estimate the code states "
                 "for it (docs/benchmarks.md has the bytes per weight of each route).")
    return "\n".join(lines)


#: a row whose floor, backward or decay time spread more than this (interquartile range / median) is noisy
NOISY_IQR = 0.5


def is_noisy(row: dict) -> bool:
    """Whether noise made the row's ratios meaningless (a spread above :data:`NOISY_IQR`)."""
    return any(row.get(f"{k}_iqr", 0.0) > NOISY_IQR for k in ("floor", "backward", "decay"))
