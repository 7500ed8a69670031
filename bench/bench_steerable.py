"""Steerable conv kernels: the structured energy against the dense-basis baseline and a
plain per-field-pair torch computation, energy + gradient, float32, same run.

Methods (each computes E_perp and E_G of every layer and the gradient of sum E_perp + 0.5 E_G):

* ``structured``: :func:`equiproj.kernel_spaces.kernel_energies_many` (K B, out-of-band residual,
  coefficient energies through ``equiproj.energies_many``, hence the fused op where it is
  dispatched) + ``backward``;
* ``per_pair``: one small pixel-space basis ``[R, d_out, d_in k^s]`` per field-pair type, a
  projection per field pair with ``einsum`` and autograd (what a user would write in torch);
* ``one pass``: :func:`~equiproj.kernel_spaces.kernel_energies_and_grads_many` (the same computation,
  the gradient formed in the forward pass from the known weights 1 and ``C_G``, no autograd graph);
* ``dense``: the paper's approach, the ``[N, D']`` orthonormal basis of equivariant kernels
  (:class:`~equiproj.kernel_spaces.DenseKernelBasis`, QR) and ``Q Q^T w`` with autograd. Its build
  time and memory are reported; where the basis exceeds ``EQUIPROJ_BENCH_DENSE_MIB`` (default
  256 MiB) only its size is given.

``python bench/bench_steerable.py`` prints the table: one SO(3) layer ``c x (0+1+2) -> same``
for c in {2, 6, 16} and k in {3, 5, 7}, then the stack of the paper's 3-D experiment (9 convs:
kernels 7, 5, 3, 3, 3, 1 and three 1x1 skips, c copies of l = 0+1+2). ``--quick`` runs a subset.
"Memory" of the structured path is what it keeps for backward (saved tensors, the weights
themselves excluded), from ``saved_tensors_hooks``. Timings taken on a shared machine are noisy:
compare ratios from one run. CI runs this file with ``--benchmark-disable`` (each method once,
checked against the others).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pytest
import torch

import equiproj
from equiproj.kernel_spaces import (DenseKernelBasis, default_kernel_space, kernel_energies_and_grads_many,
                                kernel_energies_many)

DENSE_LIMIT = int(os.environ.get("EQUIPROJ_BENCH_DENSE_MIB", "256")) * 2**20
C_G = 0.5  # weight of E_G in the benchmarked objective


# ---------------------------------------------------------------------------------------
# layers
# ---------------------------------------------------------------------------------------
def make_layers(group, c: int, kernel_sizes, seed: int = 0):
    """``[(weight float32 [m, n, k, k, k] requiring grad, space, rep_in, rep_out)]`` with ``c x (0+1+2)`` fields."""
    terms = ["0e", "1o", "2e"] if isinstance(group, equiproj.O3) else ["0", "1", "2"]
    rep = equiproj.Rep.parse(group, " + ".join(f"{c}x{t}" for t in terms))
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in kernel_sizes:
        w = torch.randn(rep.dim, rep.dim, k, k, k, generator=gen) / (rep.dim * k**1.5)
        out.append((w.requires_grad_(), default_kernel_space(group, k), rep, rep))
    return out


STACK_KERNELS = (7, 5, 3, 3, 3, 1, 1, 1, 1)  # 6 convs + 3 skip 1x1 convs


# ---------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------
def structured(layers):
    e_perp, e_g = kernel_energies_many([w for w, *_ in layers], [sp for _, sp, *_ in layers],
                                       [(ri, ro) for *_, ri, ro in layers])
    return e_perp, e_g


def one_pass(layers):
    """:func:`kernel_energies_and_grads_many`: the energies and the gradient of ``E_perp + C_G E_G``
    without an autograd graph (the coefficient energies and gradients of all layers from one call
    of the fused op); sets ``w.grad``."""
    L = len(layers)
    e_perp, e_g, grads = kernel_energies_and_grads_many([w for w, *_ in layers], [sp for _, sp, *_ in layers],
                                                        [(ri, ro) for *_, ri, ro in layers],
                                                        lambda_perp=[1.0] * L, lambda_G=[C_G] * L)
    for (w, *_), g in zip(layers, grads):
        w.grad = g
    return e_perp, e_g


one_pass.sets_grad = True


class PerPair:
    """Pixel-space projection per field pair with one shared basis per field-pair type (autograd)."""

    def __init__(self, layers):
        self.plans = []
        bases: dict = {}
        for w, sp, ri, ro in layers:
            pairs, oo = [], 0
            for co, fo in ro.segments:
                oi = 0
                for ci, fi in ri.segments:
                    key = (sp, fo, fi)
                    if key not in bases:
                        r1i, r1o = equiproj.Rep(ri.group, [(1, fi)]), equiproj.Rep(ro.group, [(1, fo)])
                        Q = DenseKernelBasis(sp, r1i, r1o, method="hom", dtype=torch.float32).Q  # [d_o d_i P, R]
                        bases[key] = Q.reshape(fo.dim, fi.dim * sp.num_pixels, Q.shape[1])
                    pairs.append((oo, co, fo.dim, oi, ci, fi.dim, bases[key]))
                    oi += ci * fi.dim
                oo += co * fo.dim
            self.plans.append((sp.num_pixels, pairs))

    def __call__(self, layers):
        eps, egs = [], []
        for (w, *_), (P, pairs) in zip(layers, self.plans):
            W = w.reshape(w.shape[0], -1)
            ep = eg = 0.0
            for oo, co, do, oi, ci, di, F in pairs:
                T = W[oo : oo + co * do, oi * P : (oi + ci * di) * P].reshape(co, do, ci, di * P)
                coef = torch.einsum("uavb,abr->uvr", T, F)
                PT = torch.einsum("uvr,abr->uavb", coef, F)
                ep = ep + (T - PT).square().sum()
                eg = eg + coef.square().sum()
            eps.append(ep)
            egs.append(eg)
        return torch.stack(eps), torch.stack(egs)


class Dense:
    """``Q Q^T w`` per layer with the ``[N, D']`` basis (float32); ``None`` if a basis exceeds the limit."""

    def __init__(self, layers, limit=DENSE_LIMIT):
        self.sizes = [DenseKernelBasis.size(sp, ri, ro) for _, sp, ri, ro in layers]
        self.nbytes = sum(N * D * 4 for N, D in self.sizes)
        self.fits = self.nbytes <= limit
        self.bases, self.build_seconds = [], 0.0
        if self.fits:
            t0 = time.perf_counter()
            for _, sp, ri, ro in layers:
                self.bases.append(DenseKernelBasis(sp, ri, ro, method="hom", dtype=torch.float32).Q)
            self.build_seconds = time.perf_counter() - t0

    def __call__(self, layers):
        eps, egs = [], []
        for (w, *_), Q in zip(layers, self.bases):
            v = w.reshape(-1)
            c = v @ Q
            eps.append((v - Q @ c).square().sum())
            egs.append(c.square().sum())
        return torch.stack(eps), torch.stack(egs)


def step(method, layers):
    """Energy + gradient: returns (E_perp [L], E_G [L]) detached; gradients land in the weights.
    (``one_pass`` sets them itself.)"""
    for w, *_ in layers:
        w.grad = None
    e_perp, e_g = method(layers)
    if not getattr(method, "sets_grad", False):
        (e_perp.sum() + C_G * e_g.sum()).backward()
    return e_perp.detach(), e_g.detach()


def saved_bytes(method, layers) -> int:
    """Bytes kept for backward by ``method``: distinct floating-point saved tensors, the weights
    excluded (integer index tensors belong to the cached plans)."""
    weights = {w.data_ptr() for w, *_ in layers}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in weights and t.is_floating_point():
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        e_perp, e_g = method(layers)
    (e_perp.sum() + C_G * e_g.sum()).backward()
    for w, *_ in layers:
        w.grad = None
    return sum(seen.values())


def timeit(fn, repeat: int = 5, min_time: float = 0.2) -> float:
    fn()
    times = []
    t_end = time.perf_counter() + min_time
    while len(times) < repeat or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50:
            break
    return statistics.median(times)


# ---------------------------------------------------------------------------------------
# pytest-benchmark (CI: --benchmark-disable runs each once and checks agreement)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_stack():
    layers = make_layers(equiproj.SO3(), 1, (3, 3, 1))
    reference = step(Dense(layers), layers)
    return layers, reference


def _check(out, reference):
    for a, b in zip(out, reference):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.benchmark(group="steerable")
def test_structured(benchmark, small_stack):
    layers, reference = small_stack
    _check(benchmark(step, structured, layers), reference)


@pytest.mark.benchmark(group="steerable")
def test_one_pass(benchmark, small_stack):
    layers, reference = small_stack
    _check(benchmark(step, one_pass, layers), reference)
    grads = [w.grad.clone() for w, *_ in layers]
    step(structured, layers)
    for g, (w, *_) in zip(grads, layers):
        torch.testing.assert_close(g, w.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.benchmark(group="steerable")
def test_per_pair(benchmark, small_stack):
    layers, reference = small_stack
    _check(benchmark(step, PerPair(layers), layers), reference)


@pytest.mark.benchmark(group="steerable")
def test_dense(benchmark, small_stack):
    layers, reference = small_stack
    dense = Dense(layers)
    assert dense.fits and dense.nbytes == sum(Q.numel() * 4 for Q in dense.bases)
    _check(benchmark(step, dense, layers), reference)


def test_structured_memory_is_proportional_to_the_weights():
    layers = make_layers(equiproj.SO3(), 2, (5, 3, 1))
    weight_bytes = sum(w.numel() * w.element_size() for w, *_ in layers)
    assert saved_bytes(structured, layers) <= 2 * weight_bytes


# ---------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------
def _row(label, layers, with_dense=True):
    weight_bytes = sum(w.numel() * w.element_size() for w, *_ in layers)
    t0 = time.perf_counter()
    step(structured, layers)  # first call: kernel spaces, Clebsch-Gordan blocks, plans
    first = time.perf_counter() - t0
    t_struct = timeit(lambda: step(structured, layers))
    mem = saved_bytes(structured, layers)
    t_one = timeit(lambda: step(one_pass, layers))
    pp = PerPair(layers)
    t_pp = timeit(lambda: step(pp, layers))
    t_rw = timeit(lambda: [w.detach().mul(2) for w, *_ in layers])
    dense = Dense(layers) if with_dense else None
    if dense is not None and dense.fits:
        t_dense = timeit(lambda: step(dense, layers), repeat=3, min_time=0.0)
        best = min(t_struct, t_one)
        dense_cols = (f"{dense.nbytes / 2**20:.0f} MiB", f"{dense.build_seconds:.2f} s", f"{t_dense * 1e3:.1f} ms",
                      f"{t_dense / best:.0f}x")
    else:
        nbytes = dense.nbytes if dense is not None else sum(N * D * 4 for N, D in Dense(layers, limit=0).sizes)
        dense_cols = (f"{nbytes / 2**30:.1f} GiB (not built)", "-", "-", "-")
    one = f"{t_one * 1e3:.2f} ({t_pp / t_one:.1f}x)"
    return (f"| {label} | {weight_bytes / 2**20:.2f} | {t_struct * 1e3:.2f} | {one} | {mem / weight_bytes:.2f} | "
            f"{first:.2f} | {t_pp * 1e3:.2f} | {t_pp / t_struct:.2f}x | {t_rw * 1e3:.3f} | " + " | ".join(dense_cols) + " |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="c in {2, 6}, k in {3, 5} and the c=2 stack only")
    ap.add_argument("--group", default="SO3", choices=["SO3", "O3"])
    args = ap.parse_args(argv)
    G = equiproj.SO3() if args.group == "SO3" else equiproj.O3()
    cs, ks = ((2, 6), (3, 5)) if args.quick else ((2, 6, 16), (3, 5, 7))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, energy + gradient; "
          f"dense basis built up to {DENSE_LIMIT / 2**20:.0f} MiB", file=sys.stderr)
    print("| layer | weight MiB | structured ms | one pass ms (per-pair/it) | saved/weight | first call s "
          "| per-pair ms | per-pair/structured | read+write ms | dense basis | dense build | dense ms | dense/structured |")
    print("|" + "---|" * 13)
    for c in cs:
        for k in ks:
            print(_row(f"{G} c={c} k={k}", make_layers(G, c, (k,))), flush=True)
    for c in ((2,) if args.quick else (2, 6)):
        print(_row(f"{G} stack c={c} (9 convs)", make_layers(G, c, STACK_KERNELS)), flush=True)


if __name__ == "__main__":
    main()
