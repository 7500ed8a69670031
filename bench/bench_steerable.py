"""Steerable conv kernels: the structured energy against the dense-basis baseline (the paper's
computation) and a plain per-field-pair torch computation, energy + gradient, float32, same run.

Methods (each computes E_perp and E_G of every layer and the gradient of sum E_perp + 0.5 E_G):

* ``structured``: :func:`equiproj.kernel_spaces.kernel_energies_many` (the pixel-tile plan of
  each layer through the fused op, one call for all layers) + ``backward`` (one more call);
* ``per_pair``: one small pixel-space basis ``[R, d_out, d_in k^s]`` per field-pair type, a
  projection per field pair with ``einsum`` and autograd (what a user would write in torch);
* ``one pass``: :func:`~equiproj.kernel_spaces.kernel_energies_and_grads_many` (the same computation,
  the gradient formed in the forward pass from the known weights 1 and ``C_G``, no autograd graph);
* ``dense``: the paper's approach, the ``[N, D']`` orthonormal basis of V
  (:class:`~equiproj.kernel_spaces.DenseKernelBasis`, QR; the span of escnn's basis of the layer)
  and ``Q Q^T w`` with autograd. Its build time and memory are reported; where the basis exceeds
  ``EQUIPROJ_BENCH_DENSE_MIB`` (default 256 MiB) only its size is given.

``python bench/bench_steerable.py`` prints the table: one SO(3) layer ``c x (0+1+2) -> same``
for c in {2, 6, 16} and k in {3, 5, 7}, then the stack of the paper's 3-D experiment (9 convs:
kernels 7, 5, 3, 3, 3, 1 and three 1x1 skips, c copies of l = 0+1+2). ``--quick`` runs a subset.
"Memory" of the structured path is what it keeps for backward (saved tensors, the weights
themselves excluded), from ``saved_tensors_hooks``.

``--paper`` prints the paper-parity table instead: the paper's penalty exactly as its code
computes it (``Q`` from the QR of the layer's basis, ``lambda_G ||Q^T w||^2 + lambda_perp (||w||^2 -
||Q^T w||^2)`` and its gradient by autograd, float32) against the one-pass fused computation, on
the benchmark's 3-D layer ``c x (0e+1o+2e) -> same``, k = 5 (O(3)) for growing ``c``: time and
memory (the basis and what is kept for backward) of both, up to the largest ``c`` whose dense basis
fits ``--dense-gib`` (default 2 GiB), and the sizes where the dense side cannot run.

Timings taken on a shared machine are noisy: compare ratios from one run. CI runs this file with
``--benchmark-disable`` (each method once, checked against the others).
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
    assert saved_bytes(structured, layers) <= weight_bytes  # irreps fields: nothing but the weights


def test_paper_parity_row_runs():
    """The paper's penalty (dense Q, ||w||^2 - ||Q^T w||^2, autograd) agrees with the fused one pass, and
    a layer whose dense basis exceeds the limit is reported as such."""
    row = paper_parity_row(equiproj.O3(), 1, 3, 2**30)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 13 and float(cells[-1]) < 1e-4
    assert "cannot run" in paper_parity_row(equiproj.O3(), 1, 3, 0)


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


# ---------------------------------------------------------------------------------------
# paper parity: the dense Q Q^T w of the paper's code against the one-pass fused computation
# ---------------------------------------------------------------------------------------
LAMBDA_PERP, LAMBDA_G = 1.0, C_G


class PaperPenalty:
    """The paper's penalty as its code computes it: ``Q`` (float32) with orthonormal columns spanning
    the layer's basis (QR), ``q = Q^T w``, ``lambda_G ||q||^2 + lambda_perp (||w||^2 - ||q||^2)``, autograd."""

    def __init__(self, sp, ri, ro):
        t0 = time.perf_counter()
        self.Q = DenseKernelBasis(sp, ri, ro, method="hom", dtype=torch.float32).Q
        self.build_seconds = time.perf_counter() - t0

    def __call__(self, w):
        v = w.reshape(-1)
        q = v @ self.Q
        g = q.square().sum()
        return LAMBDA_G * g + LAMBDA_PERP * (v.square().sum() - g)


def _paper_saved_bytes(fn, w, *counted) -> int:
    """Bytes kept for backward by ``fn(w)`` (distinct floating-point tensors other than ``w`` and
    ``counted``, which the caller counts already)."""
    seen: dict[int, int] = {}
    skip = {w.data_ptr()} | {t.data_ptr() for t in counted}

    def pack(t):
        if t.data_ptr() not in skip and t.is_floating_point():
            seen[t.data_ptr()] = max(seen.get(t.data_ptr(), 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(w)
    out.backward()
    w.grad = None
    return sum(seen.values())


def paper_parity_row(G, c: int, k: int, dense_limit: int) -> str:
    (w, sp, ri, ro), = make_layers(G, c, (k,))
    weight_bytes = w.numel() * w.element_size()
    N, D = DenseKernelBasis.size(sp, ri, ro)
    dense_bytes = N * D * 4
    t0 = time.perf_counter()
    plan = sp.plan(ri, ro)
    plan_s = time.perf_counter() - t0
    wd = w.detach()
    t_one = timeit(lambda: sp.energies_and_grad(wd, ri, ro, lambda_perp=LAMBDA_PERP, lambda_G=LAMBDA_G))

    def ours(x):
        e_perp, e_g = sp.energies(x, ri, ro)
        return LAMBDA_PERP * e_perp + LAMBDA_G * e_g

    def autograd_step(fn):
        w.grad = None
        fn(w).backward()

    t_auto = timeit(lambda: autograd_step(ours))
    ours_mem = plan.basis_bytes + _paper_saved_bytes(ours, w)
    cols = [f"O(3) {c}x(0e+1o+2e) k={k}", f"{weight_bytes / 2**20:.2f}", f"{N} x {D}", f"{plan_s:.3f}",
            f"{t_one * 1e3:.2f}", f"{t_auto * 1e3:.2f}", f"{ours_mem / 2**20:.2f} ({ours_mem / weight_bytes:.2f}x W)"]
    if dense_bytes <= dense_limit:
        paper = PaperPenalty(sp, ri, ro)
        # the same numbers (float32): the penalty value and its gradient
        w.grad = None
        paper(w).backward()
        g_paper = w.grad.clone()
        _, _, g_ours = sp.energies_and_grad(wd, ri, ro, lambda_perp=LAMBDA_PERP, lambda_G=LAMBDA_G)
        grad_err = float((g_ours - g_paper).abs().max() / g_paper.abs().max())
        t_dense = timeit(lambda: autograd_step(paper), repeat=3, min_time=0.0)
        dense_mem = dense_bytes + _paper_saved_bytes(paper, w, paper.Q)
        cols += [f"{paper.build_seconds:.2f}", f"{t_dense * 1e3:.1f}", f"{dense_mem / 2**20:,.0f}",
                 f"{t_dense / t_one:,.0f}x", f"{dense_mem / ours_mem:,.0f}x", f"{grad_err:.1e}"]
        del paper
    else:
        cols += ["-", f"cannot run: Q needs {dense_bytes / 2**30:,.1f} GiB", f"{dense_bytes / 2**20:,.0f} (Q alone)",
                 "-", f"{dense_bytes / ours_mem:,.0f}x", "-"]
    return "| " + " | ".join(cols) + " |"


def paper_parity(dense_gib: float = 2.0, quick: bool = False) -> None:
    limit = int(dense_gib * 2**30)
    G = equiproj.O3()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; the paper's dense Q Q^T w up to "
          f"{dense_gib:g} GiB", file=sys.stderr)
    print("| layer | W MiB | dense Q [N, D'] | plan build s | one pass ms | fused autograd ms | fused memory MiB "
          "(basis + saved) | dense build s | dense ms (autograd) | dense memory MiB (Q + saved) | dense / one pass "
          "time | dense / fused memory | gradient rel. diff |")
    print("|" + "---|" * 13)
    cs = [1, 2, 4] if quick else [1, 2, 4, 6, 7, 16]
    for c in cs:
        print(paper_parity_row(G, c, 5, limit), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="c in {2, 6}, k in {3, 5} and the c=2 stack only")
    ap.add_argument("--group", default="SO3", choices=["SO3", "O3"])
    ap.add_argument("--paper", action="store_true", help="the paper-parity table (dense Q Q^T w against one pass)")
    ap.add_argument("--dense-gib", type=float, default=2.0, help="memory limit of the dense side for --paper")
    args = ap.parse_args(argv)
    if args.paper:
        paper_parity(args.dense_gib, args.quick)
        return
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
