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

import statistics
import time

import torch
from torch import nn

from ..._caches import clear_caches
from ..._plan import OrbitForm, PlanColumn, plan_for
from ...groups import Rep
from ...kernel_spaces._factorised import factorised_plan
from ...kernel_spaces._regular_band import kernel_available
from ...nn import ProjectionPenalty, declaration
from ._kinds import LayerKind, band_limited_field, cyclic_quotient, irreps_fields, layer_kinds

__all__ = ["LayerKind", "layer_kinds", "layer_kind_rows", "format_layer_kinds", "measure_layer", "route_of",
           "irreps_fields", "band_limited_field", "cyclic_quotient", "is_noisy", "NOISY_IQR"]


# ---- the route a layer takes, and its flops per weight -------------------------------------------
#: flops per weight of a field pair of the matrix plan: an orbit pair (two passes: the orbit sums,
#: then residual, energy and gradient), an r = 0 tile (sum of squares and the scaled gradient), a
#: tile with r basis matrices (r coefficients and the projection back, then residual and gradient)
_ORBIT_FLOPS, _ZERO_FLOPS = 6, 4
_ORBIT_NAMES = {int(OrbitForm.CYCLIC): "orbit closed form", int(OrbitForm.DIHEDRAL): "orbit closed form",
                int(OrbitForm.TABLE): "orbit table", int(OrbitForm.PRODUCT): "orbit product",
                int(OrbitForm.SIGNED): "signed orbit table"}


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
    route takes (pixel tiles, the closed form of regular fields, the factorised transforms, with their
    band products split by the grid's reflections where the pass takes the split) with the estimate
    its plan states. ``("-", None)`` where the declaration is of another kind."""
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
    split = fp.split_flops_per_weight(weight)
    return ("factorised", fp.flops_per_weight) if split is None else ("factorised, split by reflections", split)


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
