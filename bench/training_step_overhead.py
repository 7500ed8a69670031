"""What the projection penalty and the decoupled step add to a full training step, in one run.

Two models: the demo's C4 smoke CNN (``equiproj demo``: 6 -> 4 regular fields x 3 -> 3 channels, 3x3
circular convs, 64x64 grid, batch 8) and the benchmark's O(3) MLP (``equiproj bench``: 16x0e+8x1o+4x2e ->
64x0e+32x1o+16x2e (x2) -> 8x0e+4x1o, batch 256). For each, a full Adam step (forward, MSE loss,
backward, optimiser step) is timed plain, with the decoupled step ``penalty.decay_(rate)`` after it,
with ``loss + penalty()``, and with ``penalty.backward()`` (the one-pass gradient), interleaved so that a
change of load hits every variant alike. Prints the medians, their interquartile spread and the
ratio to the plain step; a ratio whose difference from 1 is smaller than the spread is marked
"within noise".

    python bench/training_step_overhead.py [--repeats 200] [--threads 1 2] [--clock wall|process]

The targets: each of the three penalty variants within 5 % of the plain step, on 1 and 2 threads,
with at least 200 interleaved repeats (on a quiet machine).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from equiproj.cli.bench import small_model
from equiproj.cli.experiments._smoke import C4SmokeNet
from equiproj.nn import ProjectionPenalty, declare


def models():
    torch.manual_seed(0)
    cnn = C4SmokeNet(hidden_fields=4, layers=4, kernel=3)
    mlp, reps, r_in, r_out = small_model()
    for layer, (ri, ro) in zip([m for m in mlp if isinstance(m, torch.nn.Linear)], reps):
        declare(layer, ri, ro)
    gen = torch.Generator().manual_seed(0)
    return {"demo C4 smoke CNN, batch 8, 64x64": (cnn, torch.randn(8, 6, 64, 64, generator=gen),
                                                   torch.randn(8, 3, 64, 64, generator=gen)),
            "bench O(3) MLP, batch 256": (mlp, torch.randn(256, r_in.dim, generator=gen),
                                          torch.randn(256, r_out.dim, generator=gen))}


def steps(model, x, y, rate: float = 1e-2, lam: float = 1e-2) -> dict:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    penalty = ProjectionPenalty(model, lambda_perp=lam)

    def plain():
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()

    def decoupled():
        plain()
        penalty.decay_(rate)

    def in_loss():
        opt.zero_grad(set_to_none=True)
        (F.mse_loss(model(x), y) + penalty()).backward()
        opt.step()

    def one_pass():
        opt.zero_grad(set_to_none=True)
        penalty.backward()
        F.mse_loss(model(x), y).backward()
        opt.step()

    return {"plain step": plain, "+ decay_(rate)": decoupled, "+ penalty() in the loss": in_loss,
            "+ penalty.backward()": one_pass}


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


def measure(fns: dict, repeats: int, clock=time.perf_counter) -> dict:
    for f in fns.values():  # warm-up: plans, caches, allocator
        for _ in range(3):
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = clock()
            f()
            times[k].append(clock() - t)
    out = {}
    for k, v in times.items():
        q = statistics.quantiles(v, n=4)
        out[k] = (statistics.median(v), q[2] - q[0])
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall time (the target), or the process's CPU time (all its threads: on a shared machine "
                        "other jobs disturb it less; an indication only)")
    a = p.parse_args(argv)
    print(f"torch {torch.__version__}, threads {a.threads}, {a.repeats} interleaved repeats, {a.clock} clock")
    print("\n| model | threads | step | median ms | IQR ms | vs plain step |")
    print("|---|---|---|---|---|---|")
    for threads in a.threads:
        torch.set_num_threads(threads)
        for name, (model, x, y) in models().items():
            res = measure(steps(model, x, y), a.repeats, CLOCKS[a.clock])
            base, base_iqr = res["plain step"]
            for k, (med, iqr) in res.items():
                if k == "plain step":
                    ratio = "1"
                else:
                    over = med / base - 1
                    noisy = abs(med - base) < max(iqr, base_iqr)
                    ratio = f"{over:+.1%}" + (" (within noise)" if noisy else "")
                print(f"| {name} | {threads} | {k} | {1e3 * med:.2f} | {1e3 * iqr:.2f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
