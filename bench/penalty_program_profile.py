"""The Python cost of a penalty call beyond its kernels, on a model of many small layers.

A model of ``--layers`` declared ``nn.Linear`` layers (O(3) fields ``4x0e + 2x1o + 2e``, 15 x 15,
with bias: two terms per layer) is so small that a penalty call is almost all host-side work. For
``penalty.backward()`` (into existing ``.grad``s and into fresh ones), ``penalty.decay_`` and
``penalty()`` (without and with its backward), the median time of the call is compared with the
median time of the kernel run it issues, made directly: the C++ kernel's prepared program of the
fused matrices (``ops.cpu_program``: the same kernel as the op, with the buffers it allocates), or,
where it is not available, the op call with the same prepared arguments; the difference is the
Python cost of the call (for ``penalty().backward()``, the autograd engine's as well). Times are the calling thread's CPU time (``time.thread_time_ns``), run
with one intra-op thread, so that other jobs on a shared machine disturb them less. ``--profile`` prints the cProfile of the backward call as well.

    python bench/penalty_program_profile.py [--layers 50] [--threads 1] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from torch import nn

import equiproj as ep
from equiproj.nn import ProjectionPenalty, declare


def model(layers: int) -> nn.Module:
    r = ep.Rep.parse(ep.O3(), "4x0e + 2x1o + 2e")
    return nn.Sequential(*[declare(nn.Linear(r.dim, r.dim), r, r) for _ in range(layers)])


def median_us(fn, repeats: int = 400) -> float:
    """Median CPU time of this thread per call (with one intra-op thread, the kernel runs on it too):
    other processes on the cores stretch wall-clock times, much less the thread's own CPU time."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        t = time.thread_time_ns()
        fn()
        times.append(time.thread_time_ns() - t)
    return statistics.median(times) / 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    m = model(a.layers)
    pen = ProjectionPenalty(m, lambda_perp=1e-2)
    for p_ in m.parameters():
        p_.grad = torch.zeros_like(p_)
    pen.backward()  # the program is built
    (g,) = pen._program.groups
    params = list(m.parameters())
    grads = [q.grad for q in g.params]
    cp, cg = g._coefs
    kernel = lambda: g.kernel(g.weights, *g.plan_args, cp, cg, grads, True)  # noqa: E731
    energies_only = lambda: g.kernel(g.weights, *g.plan_args, [], [], [], False)  # noqa: E731
    pen.decay_(1e-3)
    dp, dg = g._decay_coefs[(1e-3, 0.0)]
    decay_kernel = lambda: g.kernel(g.weights, *g.plan_args, dp, dg, g.weights, True)  # noqa: E731

    def clear():
        for q in params:
            q.grad = None

    def fresh_kernel():  # the kernel writing new buffers, as the call does where there is no .grad
        clear()
        flat = torch.empty(sum(w.numel() for w in g.weights))
        g.kernel(g.weights, *g.plan_args, cp, cg, list(torch._utils._unflatten_dense_tensors(flat, g.params)), False)

    prepared = g._prepared
    if prepared is not None:  # the kernel runs as the call issues them
        kernel = prepared.backward
        energies_only = prepared.value
        decay_kernel = lambda: prepared.step(-5e-4, 0.0)  # noqa: E731

        def fresh_kernel():
            clear()
            prepared.backward()

        in_loss_kernel = prepared.fresh
    else:
        in_loss_kernel = fresh_kernel

    def fresh():
        clear()
        pen.backward()

    def in_loss():
        clear()
        pen().backward()

    rows = [("penalty.backward() into existing .grad", median_us(pen.backward), median_us(kernel)),
            ("penalty.backward() into fresh .grad (incl. clearing .grad)", median_us(fresh), median_us(fresh_kernel)),
            ("penalty.decay_(1e-3)", median_us(lambda: pen.decay_(1e-3)), median_us(decay_kernel)),
            ("penalty().backward() into fresh .grad (incl. clearing .grad)", median_us(in_loss),
             median_us(in_loss_kernel))]
    with torch.no_grad():
        rows.append(("penalty() (no_grad)", median_us(pen), median_us(energies_only)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {a.layers} layers "
          f"({2 * a.layers} terms), medians of the thread's CPU time per call")
    print("\n| call | call µs | kernel alone µs | Python beyond the kernel µs |")
    print("|---|---|---|---|")
    for name, call, kern in rows:
        print(f"| {name} | {call:.1f} | {kern:.1f} | {call - kern:.1f} |")
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            pen.backward()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
