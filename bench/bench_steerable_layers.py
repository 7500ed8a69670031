"""Steerable convolutions at the memory floor: ``penalty.backward()`` into an existing ``.grad`` and
``penalty.decay_(0.01)`` as multiples of a warm ``torch.mul(W, 2, out=buf)`` of the same weight.

One declared conv per row (float32, no bias), its :class:`~equiproj.nn.ProjectionPenalty`, and the
floor, timed interleaved in the same run (``torch.utils.benchmark.Timer`` per call, rounds of all
methods in turn, medians), on 1 and 2 intra-op threads. The route is the factorised projection
(docs/math.md §6) for fields with a change of basis (regular fields): pixels to the band, each field
to its irreps, the whitened equivariant maps per irrep tile, back; the fused op on the pixel tiles
for fields that need none (irreps fields), in place. The "route" and "flops/weight" columns say
which, and its estimated flops per weight of the kernel.

``python bench/bench_steerable_layers.py`` prints the table (``--quick``: smaller layers, fewer
rounds; ``--threads 1``: one thread count). On a shared machine the ratios are indications: the
floor and the penalty are measured alternately so that load affects both alike.

CI runs this file with ``--benchmark-disable``: each row on a small layer once, the stepped weight
checked against the float64 projection.
"""

from __future__ import annotations

import argparse
import statistics

import pytest
import torch
from torch.utils.benchmark import Timer

import equiproj
from equiproj.kernel_spaces import default_kernel_space
from equiproj.kernel_spaces._factorised import factorised_plan


def _reps(group, kind: str, channels: int):
    """(rep, label) with about ``channels`` channels: ``regular`` fields, or irreps ``0..3`` (2-D) / ``0+1+2``."""
    if kind == "regular":
        reg = group.regular()
        return max(1, channels // reg.dim) * reg
    ids = {"SO2": ["0", "1", "2", "3"], "O2": ["(0,0)", "(1,0)", "(1,1)", "(1,2)", "(1,3)"],
           "SO3": ["0", "1", "2"], "O3": ["0e", "1o", "2e"]}[type(group).__name__]
    one = equiproj.Rep.parse(group, " + ".join(ids))
    c = max(1, channels // one.dim)
    return equiproj.Rep.parse(group, " + ".join(f"{c}x{i}" for i in ids))  # copies of one irrep together


#: (label, group, kernel size, field kind, channels), the rows of the table
LAYERS = [
    ("C8 regular, k=5", lambda: equiproj.Cyclic(8), 5, "regular", 384),
    ("C8 regular, k=7", lambda: equiproj.Cyclic(8), 7, "regular", 256),
    ("C16 regular, k=5", lambda: equiproj.Cyclic(16), 5, "regular", 384),
    ("SO(2) irreps 0..3, k=5", lambda: equiproj.SO2(), 5, "irreps", 384),
    ("SO(2) irreps 0..3, k=7", lambda: equiproj.SO2(), 7, "irreps", 256),
    ("O(2) irreps 0..3, k=5", lambda: equiproj.O2(), 5, "irreps", 384),
    ("SO(3) 0+1+2, k=5 (3-D)", lambda: equiproj.SO3(), 5, "irreps", 144),
    ("O(3) 0e+1o+2e, k=5 (3-D)", lambda: equiproj.O3(), 5, "irreps", 144),
]


def make_layer(group, k: int, kind: str, channels: int, seed: int = 0):
    """(conv declared in its default steerable kernel space, rep_in, rep_out, space); float32, no bias."""
    rep = _reps(group, kind, channels)
    conv_t = torch.nn.Conv2d if group.ambient_dim == 2 else torch.nn.Conv3d
    torch.manual_seed(seed)
    conv = conv_t(rep.dim, rep.dim, k, bias=False)
    space = default_kernel_space(group, k)
    equiproj.nn.declare(conv, rep, rep, kernel_space=space)
    return conv, rep, rep, space


def route_of(space, rep_in, rep_out) -> tuple[str, float]:
    """Which one-pass route the layer takes on the CPU and its flops per weight: the fused op on the pixel
    plan where that plan runs on the weight as it is, else the factorised transforms."""
    plan = space.plan(rep_in, rep_out)
    if plan.layout == "fields" and plan.packed.identity_perm:
        return "pixel tiles", plan.flops_per_weight
    fact = factorised_plan(space, rep_in, rep_out)
    if fact.runs_closed_form(torch.empty(0)):  # regular fields on the CPU: one pass per tile in C++
        return "closed form", fact.regular.flops_per_weight
    return "factorised", fact.flops_per_weight


def measure(conv, rounds: int, number: int) -> dict:
    """Medians (seconds per call) of the floor, ``penalty.backward()`` into an existing ``.grad`` and
    ``penalty.decay_(0.01)``, interleaved."""
    penalty = equiproj.nn.ProjectionPenalty(conv, lambda_perp=1e-3)
    W = conv.weight
    buf = torch.empty_like(W)
    W.grad = torch.zeros_like(W)
    saved = W.detach().clone()
    timers = {
        "floor": Timer("torch.mul(w, 2, out=buf)", globals={"torch": torch, "w": W.detach(), "buf": buf}),
        "backward": Timer("penalty.backward()", globals={"penalty": penalty}),
        "decay_": Timer("penalty.decay_(0.01)", globals={"penalty": penalty}),
    }
    for t in timers.values():  # warm: plans, caches
        t.timeit(1)
    times: dict = {k: [] for k in timers}
    for _ in range(rounds):
        for name, t in timers.items():
            times[name].append(t.timeit(number).median)
    with torch.no_grad():
        W.copy_(saved)
    return {k: statistics.median(v) for k, v in times.items()}


def table(rows, threads, rounds: int, number: int, scale: float = 1.0) -> str:
    lines = ["| layer | weights | route | flops/weight | threads | floor (ms) | backward (ms) | x floor | decay_ (ms) "
             "| x floor |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, make_group, k, kind, channels in rows:
        conv, ri, ro, space = make_layer(make_group(), k, kind, max(1, int(channels * scale)))
        route, fpw = route_of(space, ri, ro)
        for nt in threads:
            torch.set_num_threads(nt)
            m = measure(conv, rounds, number)
            lines.append(f"| {label} | {conv.weight.numel() / 1e6:.2f} M | {route} | {fpw:.0f} | {nt} | {m['floor'] * 1e3:.2f} | "
                         f"{m['backward'] * 1e3:.2f} | {m['backward'] / m['floor']:.1f} | {m['decay_'] * 1e3:.2f} | "
                         f"{m['decay_'] / m['floor']:.1f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# CI: every row on a small layer, the step checked against the float64 projection
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", LAYERS, ids=[r[0] for r in LAYERS])
def test_row_steps_like_the_projection(row):
    label, make_group, k, kind, _ = row
    conv, ri, ro, space = make_layer(make_group(), k, kind, 8 if kind == "irreps" else 16, seed=1)
    W0 = conv.weight.detach().double()
    PW = space.project(W0, ri, ro)
    penalty = equiproj.nn.ProjectionPenalty(conv, lambda_perp=1.0)
    penalty.decay_(0.25)
    want = W0 - 0.25 * (W0 - PW)
    torch.testing.assert_close(conv.weight.detach().double(), want, rtol=0, atol=1e-5 * float(W0.abs().max()))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="quarter-width layers, fewer rounds")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts (default 1 2)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9, --quick 5)")
    args = p.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 9)
    print(table(LAYERS, args.threads, rounds, number=3, scale=0.25 if args.quick else 1.0))


if __name__ == "__main__":
    main()
