"""What the projection penalty and the decoupled step add to a full training step, in one run.

Two models: the demo's C4 smoke CNN (``equiproj demo``: 6 -> 4 regular fields x 3 -> 3 channels, 3x3
circular convs, 64x64 grid, batch 8) and the benchmark's O(3) MLP (``equiproj bench``: 16x0e+8x1o+4x2e ->
64x0e+32x1o+16x2e (x2) -> 8x0e+4x1o, batch 256). For each, a full Adam step (forward, MSE loss,
backward, optimiser step) is timed plain, with the decoupled step ``penalty.decay_(rate)`` after it,
with ``loss + penalty()``, and with ``penalty.backward()`` (the one-pass gradient) called before the
loss's backward (it writes ``.grad``, autograd adds the task gradient) and after it (it adds into the
task gradient in its own pass), interleaved so that a
change of load hits every variant alike: each round runs every variant once, in an order shuffled
per round (a fixed order would give each variant the caches its predecessor left). Prints the
medians, their interquartile spread, and the overhead over the plain step: the median of the
per-round differences (variant minus the plain step of the same round, which cancels load that
changes slower than a round) relative to the plain step's median, with its 95 % confidence
interval (distribution-free, from the order statistics of the differences); an interval that
contains 0 is marked "within noise". The isolated cost of the penalty call made in the step (timed
inside the step) is printed next to it: the part of the overhead that is the call itself, the rest
being what it changes around it (autograd adding its gradient to the task gradient, caches).

    python bench/training_step_overhead.py [--repeats 200] [--threads 1 2] [--clock wall|process] [--models cnn mlp]

The targets: each penalty variant within 5 % of the plain step, on 1 and 2 threads,
with at least 200 interleaved repeats (on a quiet machine).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F

from equiproj.cli.bench import small_model
from equiproj.cli.experiments._smoke import C4SmokeNet
from equiproj.nn import ProjectionPenalty, declare


MODELS = {"cnn": "demo C4 smoke CNN, batch 8, 64x64", "mlp": "bench O(3) MLP, batch 256"}


def models():
    torch.manual_seed(0)
    cnn = C4SmokeNet(hidden_fields=4, layers=4, kernel=3)
    mlp, reps, r_in, r_out = small_model()
    for layer, (ri, ro) in zip([m for m in mlp if isinstance(m, torch.nn.Linear)], reps):
        declare(layer, ri, ro)
    gen = torch.Generator().manual_seed(0)
    return {MODELS["cnn"]: (cnn, torch.randn(8, 6, 64, 64, generator=gen), torch.randn(8, 3, 64, 64, generator=gen)),
            MODELS["mlp"]: (mlp, torch.randn(256, r_in.dim, generator=gen),
                            torch.randn(256, r_out.dim, generator=gen))}


def steps(model, x, y, rate: float = 1e-2, lam: float = 1e-2, clock=time.perf_counter) -> tuple[dict, dict]:
    """The step variants, and for each the list that collects the time of its penalty call."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    penalty = ProjectionPenalty(model, lambda_perp=lam)
    inner = {"+ decay_(rate)": [], "+ penalty() in the loss": [], "+ penalty.backward()": [],
             "+ penalty.backward() after the loss's": []}

    def plain():
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()

    def decoupled():
        plain()
        t = clock()
        penalty.decay_(rate)
        inner["+ decay_(rate)"].append(clock() - t)

    def in_loss():
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        t = clock()
        value = penalty()
        inner["+ penalty() in the loss"].append(clock() - t)  # the forward part (its backward runs with the loss's)
        (loss + value).backward()
        opt.step()

    def one_pass():
        opt.zero_grad(set_to_none=True)
        t = clock()
        penalty.backward()
        inner["+ penalty.backward()"].append(clock() - t)
        F.mse_loss(model(x), y).backward()
        opt.step()

    def one_pass_after():  # adds into the task gradient in the kernel's own pass
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        t = clock()
        penalty.backward()
        inner["+ penalty.backward() after the loss's"].append(clock() - t)
        opt.step()

    return ({"plain step": plain, "+ decay_(rate)": decoupled, "+ penalty() in the loss": in_loss,
             "+ penalty.backward()": one_pass, "+ penalty.backward() after the loss's": one_pass_after}, inner)


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def median_interval(values: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """``(median, low, high)``: the median and its distribution-free confidence interval (the order
    statistics ``n/2 -+ z sqrt(n)/2``; 95 % for ``z = 1.96``)."""
    v = sorted(values)
    n = len(v)
    half = z * math.sqrt(n) / 2
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half))
    return statistics.median(v), v[lo], v[hi]


def measure(fns: dict, repeats: int, clock=time.perf_counter, seed: int = 0) -> dict:
    """``{variant: times}``, ``repeats`` rounds, each running every variant once in a shuffled order."""
    for f in fns.values():  # warm-up: plans, caches, allocator
        for _ in range(3):
            f()
    times = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for k in order:
            t = clock()
            fns[k]()
            times[k].append(clock() - t)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall time (the target), or the process's CPU time (all its threads: on a shared machine "
                        "other jobs disturb it less; an indication only)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    a = p.parse_args(argv)
    print(f"torch {torch.__version__}, threads {a.threads}, {a.repeats} interleaved repeats, {a.clock} clock")
    print("\n| model | threads | step | median ms | IQR ms | overhead (95 % CI) | penalty call alone |")
    print("|---|---|---|---|---|---|---|")
    for threads in a.threads:
        torch.set_num_threads(threads)
        for name, (model, x, y) in models().items():
            if name not in [MODELS[m] for m in a.models]:
                continue
            fns, inner = steps(model, x, y, clock=CLOCKS[a.clock])
            times = measure(fns, a.repeats, CLOCKS[a.clock])
            base = statistics.median(times["plain step"])
            for k, v in times.items():
                q = statistics.quantiles(v, n=4)
                med, iqr = statistics.median(v), q[2] - q[0]
                if k == "plain step":
                    over = alone = "-"
                else:
                    d, lo, hi = median_interval([t - b for t, b in zip(v, times["plain step"])])
                    over = f"{d / base:+.1%} ({lo / base:+.1%} .. {hi / base:+.1%})" + (
                        " within noise" if lo <= 0 <= hi else "")
                    alone = f"{statistics.median(inner[k][-a.repeats:]) / base:.1%}"
                print(f"| {name} | {threads} | {k} | {1e3 * med:.2f} | {1e3 * iqr:.2f} | {over} | {alone} |",
                      flush=True)
    print(f"\nload average after the run: {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min)")


if __name__ == "__main__":
    main()
