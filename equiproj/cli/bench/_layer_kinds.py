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
table. ``quick`` takes small layers (about a second each, for ``equiproj bench``); the full sizes
are those of the performance targets (Linear 4096², Conv2d 384 -> 384 k=5, ...).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ...groups import O3, SO2, Cyclic, Dihedral, FullOctahedral, Octahedral, Rep
from ...nn import ProjectionPenalty, declare

__all__ = ["LayerKind", "layer_kinds", "layer_kind_rows", "format_layer_kinds", "measure_layer", "is_noisy", "NOISY_IQR"]

@dataclass(frozen=True)
class LayerKind:
    """One row: ``build()`` returns a declared module whose ``weight`` (and bias) the penalty reads."""

    name: str
    route: str  # "linear", "grid" or "steerable": which target applies
    build: Callable[[], nn.Module]

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


def layer_kinds(quick: bool) -> list[LayerKind]:
    """The kinds of the table, with quick (small) or full (target) sizes."""
    s = 4 if quick else 1  # the full sizes divided by s (channels, not kernel sizes)
    o3 = O3()
    kinds = [
        LayerKind(f"Linear {4096 // s}², O(3) {1024 // s}x0e+{1024 // s}x1o", "linear",
                  _linear(Rep.parse(o3, f"{1024 // s}x0e + {1024 // s}x1o"))),
    ]
    for N in ((4, 16, 64) if quick else (4, 8, 16, 64, 256, 1024, 4096)):
        copies = max(1, (4096 // s) // N)
        kinds.append(LayerKind(f"Linear {copies * N}², {copies} x C{N} regular", "linear",
                               _linear(copies * Cyclic(N).regular())))
    kinds.append(LayerKind(f"Linear {(4096 // s) // 16 * 16}², D8 regular", "linear",
                           _linear(((4096 // s) // 16) * Dihedral(8).regular())))
    if not quick:
        for G, label in ((Octahedral(), "O"), (FullOctahedral(), "O_h")):
            copies = 4096 // len(G.elements())
            kinds.append(LayerKind(f"Linear {copies * len(G.elements())}², {copies} x {label} regular", "linear",
                                   _linear(copies * G.regular())))
    c = 384 // s
    for G, label in ((Cyclic(4), "C4"), (Dihedral(4), "D4")):
        reg = G.regular()
        kinds.append(LayerKind(f"Conv2d {c}->{c} k=5, {label} regular (grid)", "grid",
                               _conv(2, (c // len(reg.group.elements())) * reg, (c // len(reg.group.elements())) * reg,
                                     5, "grid")))
    o = Octahedral()
    copies = 1 if quick else 4
    kinds.append(LayerKind(f"Conv3d {24 * copies}->{24 * copies} k=3, {copies} x O regular (grid)", "grid",
                           _conv(3, copies * o.regular(), copies * o.regular(), 3, "grid")))
    if not quick:
        oh = FullOctahedral()
        kinds.append(LayerKind("Conv3d 96->96 k=3, 2 x O_h regular (grid)", "grid",
                               _conv(3, 2 * oh.regular(), 2 * oh.regular(), 3, "grid")))
    c8 = Cyclic(8)
    kinds.append(LayerKind(f"Conv2d {c // 8 * 8}->{c // 8 * 8} k=5, C8 regular (steerable)", "steerable",
                           _conv(2, (c // 8) * c8.regular(), (c // 8) * c8.regular(), 5)))
    if not quick:
        c16 = Cyclic(16)
        kinds.append(LayerKind(f"Conv2d {c // 16 * 16}->{c // 16 * 16} k=5, C16 regular (steerable)", "steerable",
                               _conv(2, (c // 16) * c16.regular(), (c // 16) * c16.regular(), 5)))
    so2 = SO2()
    r = Rep.parse(so2, " + ".join(f"{max(1, c // 28)}x{f}" for f in range(4)))
    kinds.append(LayerKind(f"Conv2d {r.dim}->{r.dim} k=5, SO(2) irreps 0..3 (steerable)", "steerable",
                           _conv(2, r, r, 5)))
    n3 = 16 if not quick else 4
    r3 = Rep.parse(o3, f"{n3}x0e + {n3}x1o + {n3}x2e")
    kinds.append(LayerKind(f"Conv3d {r3.dim}->{r3.dim} k=5, O(3) {n3}x0e+{n3}x1o+{n3}x2e (steerable)", "steerable",
                           _conv(3, r3, r3, 5)))
    return kinds


def _median_times(fns: dict, rounds: int, device: torch.device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():  # warm: plans, the program, the allocator
        fn()
        fn()
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
    return out


def measure_layer(kind: LayerKind, threads: int, rounds: int, gen: torch.Generator, device="cpu") -> dict:
    """One row: medians of the floor, ``penalty.backward()`` into ``.grad`` and ``decay_``."""
    torch.set_num_threads(threads)
    device = torch.device(device)
    t0 = time.perf_counter()
    module = kind.build().to(device)
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.1)
    penalty = ProjectionPenalty(module, lambda_perp=1e-2)
    module.weight.grad = torch.zeros_like(module.weight)
    W = module.weight.detach()
    buf = torch.empty_like(W)
    penalty.backward()  # the program and the plans are built here
    build_s = time.perf_counter() - t0
    med = _median_times({"floor": lambda: torch.mul(W, 2, out=buf), "backward": penalty.backward,
                         "decay": lambda: penalty.decay_(1e-4)}, rounds, device)
    return {"kind": kind.name, "route": kind.route, "target": kind.target, "threads": threads,
            "weights": W.numel(), "build_s": build_s, **med}


def layer_kind_rows(threads=(1, 2), quick: bool = True, rounds: int | None = None, progress=None,
                    kinds: list[LayerKind] | None = None, device="cpu") -> list[dict]:
    """Every kind on every thread count: a list of rows for :func:`format_layer_kinds`. ``progress``
    is called with a short label before each measurement; ``device="cuda"`` times the layers there
    (the thread count then only concerns the host)."""
    rounds = rounds or (7 if quick else 15)
    gen = torch.Generator().manual_seed(0)
    previous = torch.get_num_threads()
    rows = []
    try:
        for kind in kinds or layer_kinds(quick):
            for t in threads:
                if progress is not None:
                    progress(f"layer kinds: {kind.name}, {t} thread(s)")
                rows.append(measure_layer(kind, t, rounds, gen, device))
    finally:
        torch.set_num_threads(previous)
    return rows


def format_layer_kinds(rows: list[dict]) -> str:
    """The markdown table: one row per kind and thread count."""
    head = ("| layer | route | weights | threads | floor µs | backward() into .grad | decay_ | target | met |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        xb, xd = r["backward"] / r["floor"], r["decay"] / r["floor"]
        met = "yes" if max(xb, xd) <= r["target"] else "no"
        if is_noisy(r):
            met = "noisy"
        lines.append(f"| {r['kind']} | {r['route']} | {r['weights']:,} | {r['threads']} | {1e6 * r['floor']:.0f} "
                     f"| {xb:.1f}x | {xd:.1f}x | <= {r['target']:.0f}x | {met} |")
    lines.append("\nfloor: warm `torch.mul(W, 2, out=buf)` of the same float32 weight, interleaved with the two "
                 "calls; medians. backward(): `penalty.backward()` adding into an existing `.grad`; "
                 "decay_: `penalty.decay_(rate)` in place. 'noisy': the interquartile range of one of the three "
                 f"times exceeded {NOISY_IQR:.0%} of its median, so the ratios are no finding.")
    return "\n".join(lines)


#: a row whose floor, backward or decay time spread more than this (interquartile range / median) is noisy
NOISY_IQR = 0.5


def is_noisy(row: dict) -> bool:
    """Whether noise made the row's ratios meaningless (a spread above :data:`NOISY_IQR`)."""
    return any(row.get(f"{k}_iqr", 0.0) > NOISY_IQR for k in ("floor", "backward", "decay"))
