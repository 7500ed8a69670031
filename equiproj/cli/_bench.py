"""``equiproj bench``: verification against the float64 reference, then micro-benchmarks of the exact
energy + gradient against the baselines of :mod:`equiproj.baselines`.

What the default suite measures (``run_suite``; ``--quick`` is smaller, ``--full`` larger):

1. Verification. Every available backend (``"torch"`` and the fused backends that answer on
   this device) on every suite layer against the float64 reference (:mod:`equiproj.reference`;
   for steerable conv layers the reference quadrature on the kernel-space coefficients plus the
   out-of-band energy), on random float32 and float64 weights and on nearly equivariant float32
   weights (E_perp / ||W||^2 ~ 1e-7); the dense projector and the sample-based penalty are
   checked too. Large layers are verified at a reduced multiplicity with the same fields. Then
   the per-group table of ``equiproj verify``.
2. Timing of energy + gradient (``E_perp`` and ``dE_perp/dW``) per layer and method, with
   warm-up and repeats (median, interquartile spread), float32:
   fused backends, the pure-torch spectral path, ``torch.compile`` of it, the dense projector
   (build time and memory in the notes), a read+write pass over the same bytes (the bandwidth
   floor), and the operator-level sample-based penalty at the ``K`` that gives 1% relative RMS
   error of ``2 E_perp``. ``K = var / (0.01 * 2 E_perp)^2`` is derived from the variance of ``N``
   independent draws (the table says ``N``); where affordable it is confirmed by repeated
   K-sample estimates; the time at ``K`` is measured, or extrapolated from a measured chunk of
   samples when it would take too long (the table says which).
3. The per-step overhead of the data-level sample-based penalty (one augmented copy) next to
   that of the projection penalty, for the same small O(3) MLP.

Fused rows appear for the fused backends that answer on this device.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils.benchmark import Timer

from .. import baselines, ops, reference
from .._energy import energies, energies_and_grad, energies_and_grads_many, energies_many, project
from ..groups import O3, Cyclic, Group, Rep
from ..kernel_spaces import DenseKernelBasis, default_kernel_space
from ..testing import nearly_equivariant
from ._verify import format_table, verify_groups

__all__ = ["Settings", "LinearLayer", "SteerableConvLayer", "suite", "available_backends", "measure",
           "run_suite", "format_report", "FUSED_BACKENDS", "LAYER_KEYS"]

FUSED_BACKENDS = ("cpp", "triton")


# ---------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------
@dataclass
class Settings:
    """Knobs of one run; :meth:`for_mode` gives the ``quick`` / ``default`` / ``full`` presets."""

    mode: str = "default"
    device: str = "cpu"
    seed: int = 0
    budget_s: float = 1.0  # timing budget per (layer, method) after warm-up
    min_repeats: int = 5
    max_repeats: int = 50
    warmup: int = 2
    draws: int = 1024  # draws of the orbit defect for the variance (fewer if a draw is slow)
    draws_budget_s: float = 5.0  # cap on the time spent drawing (per layer, and again for the field blocks)
    min_draws: int = 16
    confirm_repeats: int = 20  # repeated K-sample estimates confirming K (0: never)
    confirm_budget_s: float = 4.0
    sampled_budget_s: float = 4.0  # time at K is measured directly if one estimate fits this
    dense_max_bytes: int = 2 * 2**30
    compile_layers: tuple = ("mlp",)
    o3_conv_copies: tuple = (4,)
    overhead_batch: int = 256
    verify_groups: bool = True
    rel_err: float = 0.01
    layers: tuple | None = None  # restrict to these layer keys
    noise_retries: int = 2  # a timing whose interquartile range exceeds its median is measured again, this often

    @classmethod
    def for_mode(cls, mode: str, **kw) -> "Settings":
        if mode == "quick":
            base = dict(budget_s=0.3, min_repeats=3, max_repeats=20, warmup=1, draws=256, draws_budget_s=2.0, min_draws=8,
                        confirm_repeats=0, sampled_budget_s=1.0, dense_max_bytes=512 * 2**20, compile_layers=(),
                        o3_conv_copies=(2,), overhead_batch=128, verify_groups=False)
        elif mode == "full":
            base = dict(budget_s=3.0, min_repeats=7, max_repeats=100, warmup=3, draws=4096, draws_budget_s=60.0,
                        confirm_repeats=100, confirm_budget_s=60.0, sampled_budget_s=30.0,
                        dense_max_bytes=3 * 2**30, compile_layers=("mlp", "c8conv", "o3conv"),
                        o3_conv_copies=(2, 4, 8))
        elif mode == "default":
            base = {}
        else:
            raise ValueError(f"mode must be 'quick', 'default' or 'full', got {mode!r}")
        base.update(kw)
        return cls(mode=mode, **base)


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------
def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64).cpu(), torch.as_tensor(b, dtype=torch.float64).cpu()
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


class LinearLayer:
    """A linear layer ``W [rep_out.dim, rep_in.dim]`` of the suite."""

    kind = "linear"

    def __init__(self, key: str, title: str, rep_in: Rep, rep_out: Rep, reduced: "LinearLayer | None" = None,
                 dense_check: "LinearLayer | None" = None):
        self.key, self.title, self.rep_in, self.rep_out = key, title, rep_in, rep_out
        self.group = rep_in.group
        self._reduced = reduced
        self._dense_check = dense_check

    def dense_check_layer(self) -> "LinearLayer":
        """The layer on which the float64 dense projector is checked against the reference."""
        return self._dense_check or self.verification_layer()

    def in_band(self, W):
        return W

    def compiled(self):
        """``torch.compile`` of the pure-torch path: ``W -> (E_perp, E_G)``."""
        return baselines.compiled_energies(self.rep_in, self.rep_out)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rep_out.dim, self.rep_in.dim)

    def verification_layer(self) -> "LinearLayer":
        """The layer checked against the reference (``self``, or a smaller one with the same fields)."""
        return self._reduced or self

    def energies(self, W: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        return energies(W, self.rep_in, self.rep_out, backend=backend)

    def energies_and_grad(self, W: torch.Tensor, backend: str):
        """``(E_perp, E_G, dE_perp/dW)`` in one pass, no autograd graph."""
        return energies_and_grad(W, self.rep_in, self.rep_out, backend=backend)

    def reference(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        W = W.detach().cpu().double()
        P = reference.project(W, self.rep_in, self.rep_out)
        return (W - P).square().sum((-2, -1)), P.square().sum((-2, -1))

    def nearly_equivariant(self, W: torch.Tensor, ratio: float, gen) -> torch.Tensor:
        return nearly_equivariant(W.detach().cpu().double(), self.rep_in, self.rep_out, ratio, gen)

    def defects(self, W: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return baselines.orbit_defects(W, self.rep_in, self.rep_out, g)

    def dense_size(self) -> tuple[int, int]:
        return baselines.DenseProjector.size(self.rep_in, self.rep_out)

    def dense(self, dtype, device, max_bytes=None, method="auto"):
        return baselines.DenseProjector(self.rep_in, self.rep_out, dtype=dtype, device=device, max_bytes=max_bytes,
                                        method=method)

    def dense_energies(self, dense, W):
        return dense.energies(W)

    def block_weights(self, W: torch.Tensor):
        """``(label, W_b)``: the non-equivariant part of ``W`` restricted to one block of fields, for
        each (output segment, input segment) pair (float64, CPU)."""
        yield from _field_blocks(W.detach().cpu().double(), self.rep_in, self.rep_out)


def _field_blocks(M: torch.Tensor, rep_in: Rep, rep_out: Rep):
    """``(label, N)`` per (output segment, input segment) of ``M [m, n]``: ``M`` restricted to that block
    minus its projection (nothing if a rep is permuted)."""
    if rep_out.perm is not None or rep_in.perm is not None:
        return
    oo = 0
    for co, fo in rep_out.segments:
        oi = 0
        for ci, fi in rep_in.segments:
            N = torch.zeros_like(M)
            N[..., oo : oo + co * fo.dim, oi : oi + ci * fi.dim] = M[..., oo : oo + co * fo.dim, oi : oi + ci * fi.dim]
            yield f"{fo.name}<-{fi.name}", N - project(N, rep_in, rep_out)
            oi += ci * fi.dim
        oo += co * fo.dim


class SteerableConvLayer:
    """A conv kernel ``[c_out, c_in, k, ..., k]`` in a band-limited steerable kernel space (its
    reference: the group quadrature on the space's orthonormal band coefficients, plus the
    out-of-band energy, a route independent of the pixel-tile plan the fused backends run)."""

    kind = "conv"

    def __init__(self, key: str, title: str, rep_in: Rep, rep_out: Rep, kernel_size: int, spatial_dims: int,
                 reduced: "SteerableConvLayer | None" = None):
        self.key, self.title, self.rep_in, self.rep_out = key, title, rep_in, rep_out
        self.group = rep_in.group
        self.kernel_size, self.spatial_dims = kernel_size, spatial_dims
        self.space = default_kernel_space(self.group, kernel_size, spatial_dims)
        self.crep = self.space.coefficient_rep(rep_in)
        self._reduced = reduced

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rep_out.dim, self.rep_in.dim) + (self.kernel_size,) * self.spatial_dims

    def verification_layer(self):
        return self._reduced or self

    def dense_check_layer(self):
        return self.verification_layer()

    def _parts(self, W):
        """(K ``[..., m, n, P]``, A ``[..., m, n D]`` in the coefficient rep's layout, out-of-band energy)."""
        A = self.space.coefficients(W, self.rep_in, self.rep_out)
        K = W.to(A.dtype)
        outside = (K - self.space.kernel(A, self.rep_in, self.rep_out)).square().flatten(-2 - self.spatial_dims).sum(-1)
        return K, A, outside

    def energies(self, W: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``SteerableKernelSpace.energies`` (what a user calls), run by ``backend``."""
        return self.space.energies(W, self.rep_in, self.rep_out, backend=backend)

    def energies_and_grad(self, W: torch.Tensor, backend: str):
        """``SteerableKernelSpace.energies_and_grad``: one pass, no autograd graph."""
        return self.space.energies_and_grad(W, self.rep_in, self.rep_out, backend=backend)

    def reference(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        K, A, outside = self._parts(W.detach().cpu().double())
        P = reference.project(A, self.crep, self.rep_out)
        return (A - P).square().sum((-2, -1)) + outside, P.square().sum((-2, -1))

    def nearly_equivariant(self, W: torch.Tensor, ratio: float, gen) -> torch.Tensor:
        ri, ro, sp = self.rep_in, self.rep_out, self.space
        K, A, _ = self._parts(W.detach().cpu().double())
        Keq = sp.kernel(reference.project(A, self.crep, ro), ri, ro)
        N = torch.randn(K.shape, dtype=torch.float64, generator=gen)
        NA = sp.coefficients(N, ri, ro)
        Nperp = N - sp.kernel(reference.project(NA, self.crep, ro), ri, ro)
        scale = (ratio * Keq.square().sum() / Nperp.square().sum()).sqrt()
        return Keq + scale * Nperp

    def block_weights(self, W: torch.Tensor):
        """``(label, W_b)``: in-band kernels whose non-equivariance sits in one block of coefficient
        fields (output field x (input field ⊗ harmonic)), float64, CPU."""
        A = self.space.coefficients(W.detach().cpu().double(), self.rep_in, self.rep_out)
        for label, N in _field_blocks(A, self.crep, self.rep_out):
            yield label, self.space.kernel(N, self.rep_in, self.rep_out)

    def compiled(self):
        """The kernel-space split (eager) plus ``torch.compile`` of the coefficient energies."""
        inner = baselines.compiled_energies(self.crep, self.rep_out)

        def fn(W):
            K, A, outside = self._parts(W)
            e_perp, e_g = inner(A)
            return e_perp + outside.to(e_perp.dtype), e_g

        return fn

    def in_band(self, W: torch.Tensor) -> torch.Tensor:
        """The part of ``W`` inside the kernel space (``K B B^T``), same dtype."""
        with torch.no_grad():
            A = self.space.coefficients(W, self.rep_in, self.rep_out)
            return self.space.kernel(A, self.rep_in, self.rep_out).to(W.dtype)

    def defects(self, W: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return baselines.conv_orbit_defects(W, self.rep_in, self.rep_out, g, kernel_space=self.space)

    def dense_size(self) -> tuple[int, int]:
        return DenseKernelBasis.size(self.space, self.rep_in, self.rep_out)

    def dense(self, dtype, device, max_bytes=None, method="hom"):
        N, D = self.dense_size()
        nbytes = N * D * torch.empty(0, dtype=dtype).element_size()
        if max_bytes is not None and nbytes > max_bytes:
            raise MemoryError(f"the dense basis would be [{N}, {D}] = {nbytes / 2**30:.2f} GiB")
        return DenseKernelBasis(self.space, self.rep_in, self.rep_out, method=method, dtype=dtype, device=device)

    def dense_energies(self, dense, W):
        return dense.energies(W)


# ---------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------
def suite(settings: Settings) -> list:
    """The suite's layers, in order (``settings.layers``: only those keys, each one of :data:`LAYER_KEYS`)."""
    if settings.layers is not None:
        unknown = [k for k in settings.layers if k not in LAYER_KEYS]
        if unknown or not settings.layers:
            raise ValueError(f"unknown layer keys {unknown}: choose from {list(LAYER_KEYS)}" if unknown else
                             f"no layer keys given: choose from {list(LAYER_KEYS)}")
    G3 = O3()
    p = Rep.parse
    rows: list = []

    def add(key, make):
        if settings.layers is not None and key.split(":")[0] not in settings.layers:
            return
        rows.append(make())

    mlp = p(G3, "64x0e+32x1o+16x2e")
    mlp_small = p(G3, "8x0e+4x1o+2x2e")
    add("mlp", lambda: LinearLayer("mlp", TITLES["mlp"], mlp, mlp,
                                   dense_check=LinearLayer("mlp", "", mlp_small, mlp_small)))

    def c8conv():
        C8 = Cyclic(8)
        r = 32 * C8.regular()
        small = 2 * C8.regular()
        red = SteerableConvLayer("c8conv", "", small, small, 5, 2)
        return SteerableConvLayer("c8conv", TITLES["c8conv"], r, r, 5, 2, reduced=red)

    add("c8conv", c8conv)

    for c in settings.o3_conv_copies:
        def o3conv(c=c):
            r = p(G3, f"{c}x0e+{c}x1o+{c}x2e")
            red = None
            if c > 2:
                rr = p(G3, "2x0e+2x1o+2x2e")
                red = SteerableConvLayer("o3conv", "", rr, rr, 5, 3)
            return SteerableConvLayer(f"o3conv" + (f":c{c}" if len(settings.o3_conv_copies) > 1 else ""),
                                      TITLES["o3conv"] + f" ({c}x0e+{c}x1o+{c}x2e)", r, r, 5, 3, reduced=red)

        add("o3conv", o3conv)

    big = p(G3, "1024x0e+1024x1o")
    small = p(G3, "16x0e+16x1o")
    add("large", lambda: LinearLayer("large", TITLES["large"], big, big,
                                     reduced=LinearLayer("large", "", small, small)))
    return rows


TITLES = {
    "mlp": "MLP layer 64x0e+32x1o+16x2e -> same",
    "c8conv": "2-D conv 32 C8-regular fields -> 32, k=5",
    "o3conv": "3-D conv l<=2 fields, k=5",
    "large": "linear 4096x4096, 1024x0e+1024x1o",
}
#: the keys of ``--layers``
LAYER_KEYS = tuple(TITLES)


# ---------------------------------------------------------------------------------------
# Backends and timing
# ---------------------------------------------------------------------------------------
def available_backends(device: str) -> dict[str, str | None]:
    """``{name: None}`` for each fused backend that computes correct energies on ``device`` (tried on a
    tiny input), else ``{name: "why not"}``. Triton is timed only on CUDA (on a CPU it would run in
    the interpreter)."""
    out: dict[str, str | None] = {}
    G = O3()
    r = Rep.parse(G, "2x0e+1o+2e")
    W = torch.randn(r.dim, r.dim, generator=torch.Generator().manual_seed(0))
    ref = reference.energies(W.double(), r, r)[0]
    for b in FUSED_BACKENDS:
        if b == "triton" and not device.startswith("cuda"):
            out[b] = "GPU only (the CPU interpreter is for tests, not timing)"
            continue
        if b == "cpp" and device != "cpu":
            out[b] = "CPU only"
            continue
        why = _missing_reason(b)
        if why:
            out[b] = f"not available ({why})"
            continue
        try:
            Wd = W.to(device).requires_grad_()
            e = energies(Wd, r, r, backend=b)[0]
            torch.autograd.grad(e.sum(), Wd)
            err = _rel(e.detach(), ref)
            out[b] = None if err < 1e-4 else f"wrong result (rel err {err:.1e})"
        except Exception as e:  # noqa: BLE001 - any failure means "not available here"
            out[b] = f"not available ({_error_text(e)})"
    return out


def _error_text(e: Exception, limit: int = 400) -> str:
    """``Type: message`` on one line (what went wrong, for the report)."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


def _missing_reason(backend: str) -> str | None:
    """Why the fused op has no kernel for ``backend`` here, or None."""
    available = {"cpp": ops.cpp_available, "triton": ops.triton_available}[backend]
    return None if available() else f"{backend} kernel not built/installed"


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def relative_spread(st: dict) -> float:
    """The interquartile range of a measurement relative to its median (``inf`` for a zero median)."""
    return (st["q3_s"] - st["q1_s"]) / st["median_s"] if st["median_s"] > 0 else math.inf


def measure(fn: Callable[[], object], settings: Settings, device: str = "cpu", min_repeats: int | None = None) -> dict:
    """Median, quartiles and count of the wall time of one ``fn()`` call (:func:`measure_once`).

    A measurement whose interquartile range exceeds its median says nothing about the time: it is
    taken again, up to ``settings.noise_retries`` times, and the least spread one is kept; if that
    one is still as wide, it is marked ``"noisy": True`` (the report then computes no ratio from
    it). ``"attempts"`` counts the measurements taken."""
    best = None
    for attempt in range(1 + max(0, settings.noise_retries)):
        st = measure_once(fn, settings, device, min_repeats)
        if best is None or relative_spread(st) < relative_spread(best):
            best = st
        if relative_spread(best) <= 1.0:
            break
    best["attempts"] = attempt + 1
    best["noisy"] = relative_spread(best) > 1.0
    return best


def measure_once(fn: Callable[[], object], settings: Settings, device: str = "cpu",
                 min_repeats: int | None = None) -> dict:
    """Median, quartiles and count of the wall time of one ``fn()`` call, by ``torch.utils.benchmark.Timer``
    (which synchronises CUDA): ``settings.warmup`` warm-up calls, then ``blocked_autorange`` for
    ``settings.budget_s`` (each measurement is the mean of one block of calls), topped up with single
    calls to at least ``min_repeats`` measurements (fewer for calls slower than the budget)."""
    timer = Timer(stmt="fn()", globals={"fn": fn})
    t0 = time.perf_counter()
    for _ in range(settings.warmup):
        fn()
        _sync(device)
    per_call = (time.perf_counter() - t0) / settings.warmup if settings.warmup else 0.0
    lo = settings.min_repeats if min_repeats is None else min_repeats
    if per_call > settings.budget_s:
        lo = min(lo, 3)
    times = list(timer.blocked_autorange(min_run_time=settings.budget_s).times) if per_call <= settings.budget_s else []
    while len(times) < lo:
        times += timer.timeit(1).times
    times = times[: max(lo, settings.max_repeats)]
    ts = torch.tensor(sorted(times), dtype=torch.float64)
    return {"median_s": float(ts.median()), "q1_s": float(torch.quantile(ts, 0.25)),
            "q3_s": float(torch.quantile(ts, 0.75)), "min_s": float(ts[0]), "repeats": len(times)}


def _grad_step(energy_fn, W):
    def step():
        e = energy_fn(W)
        (g,) = torch.autograd.grad(e.sum(), W)
        return g

    return step


class Progress:
    """A progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.done, self.enabled = max(1, total), 0, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def step(self, label: str):
        self.done = min(self.total, self.done + 1)
        if not self.enabled:
            return
        frac = self.done / self.total
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        msg = f"[{bar}] {self.done}/{self.total} {time.perf_counter() - self.t0:5.0f}s {label}"
        if self.tty:
            self.stream.write("\r" + msg[:120].ljust(120))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------
def verify_layer(layer, backends: list[str], settings: Settings, gen: torch.Generator) -> list[dict]:
    """Rows ``{layer, method, dtype, rel_err_perp, rel_err_G, rel_err_near}`` for the exact methods and
    the dense projector on ``layer.verification_layer()``, against the float64 reference."""
    L = layer.verification_layer()
    dev = settings.device
    W64 = torch.randn((2,) + L.shape, dtype=torch.float64, generator=gen)  # batched: two weights
    rp, rg = L.reference(W64)
    Wn = L.nearly_equivariant(W64[0], 1e-7, gen).float()
    rn = L.reference(Wn)[0]
    rows = []
    for b in backends:
        for dt in (torch.float32, torch.float64):
            W = W64.to(dt)
            try:
                ep, eg = L.energies(W.to(dev), b)
                rpd, rgd = (rp, rg) if dt == torch.float64 else L.reference(W)
                row = {"method": b, "dtype": str(dt).replace("torch.", ""),
                       "rel_err_perp": _rel(ep.detach().cpu(), rpd), "rel_err_G": _rel(eg.detach().cpu(), rgd)}
                if dt == torch.float32:
                    row["rel_err_near"] = _rel(L.energies(Wn.to(dev), b)[0].detach().cpu(), rn)
            except Exception as e:  # noqa: BLE001
                row = {"method": b, "dtype": str(dt).replace("torch.", ""), "error": _error_text(e, 200)}
            rows.append(row)
    for r in rows:
        r["verified_shape"] = list(L.shape)
    if L is not layer:  # full size: float32 against the float64 torch path (itself verified above)
        Wf = torch.randn(layer.shape, generator=gen).to(dev)
        rp32, rg32 = (e.cpu() for e in layer.energies(Wf.double(), "torch"))
        for b in backends:
            try:
                ep, eg = layer.energies(Wf, b)
                rows.append({"method": f"{b} (vs torch float64)", "dtype": "float32", "verified_shape": list(layer.shape),
                             "rel_err_perp": _rel(ep.detach().cpu(), rp32), "rel_err_G": _rel(eg.detach().cpu(), rg32)})
            except Exception as e:  # noqa: BLE001
                rows.append({"method": f"{b} (vs torch float64)", "dtype": "float32", "verified_shape": list(layer.shape),
                             "error": _error_text(e, 200)})
    # the dense projector (float64), on a layer small enough for a float64 basis
    Ld = layer.dense_check_layer()
    Wd = W64 if Ld is L else torch.randn((2,) + Ld.shape, dtype=torch.float64, generator=gen)
    rpd, rgd = (rp, rg) if Ld is L else Ld.reference(Wd)
    try:
        d = Ld.dense(torch.float64, "cpu", max_bytes=settings.dense_max_bytes)
        ep, eg = Ld.dense_energies(d, Wd)
        rows.append({"method": "dense", "dtype": "float64", "rel_err_perp": _rel(ep, rpd), "rel_err_G": _rel(eg, rgd),
                     "verified_shape": list(Ld.shape)})
    except MemoryError as e:
        rows.append({"method": "dense", "dtype": "float64", "error": str(e), "verified_shape": list(Ld.shape)})
    for r in rows:
        r["layer"] = layer.key
    return rows


def verify_many(layers, backends: list[str], settings: Settings, gen: torch.Generator) -> list[dict]:
    """``energies_many`` (the multi-layer entry point) on all linear suite layers at once (their
    verification sizes), float32, against the per-layer float64 reference."""
    if not layers:
        return []
    Ls = [L.verification_layer() for L in layers]
    Ws = [torch.randn(L.shape, generator=gen) for L in Ls]
    refs = [L.reference(W) for L, W in zip(Ls, Ws)]
    rp, rg = torch.stack([r[0] for r in refs]), torch.stack([r[1] for r in refs])
    rows = []
    for b in backends:
        try:
            ep, eg = energies_many([W.to(settings.device) for W in Ws], [(L.rep_in, L.rep_out) for L in Ls], backend=b)
            rows.append({"method": b, "dtype": "float32", "rel_err_perp": _rel(ep.detach().cpu(), rp),
                         "rel_err_G": _rel(eg.detach().cpu(), rg)})
        except Exception as e:  # noqa: BLE001
            rows.append({"method": b, "dtype": "float32", "error": _error_text(e, 200)})
    for r in rows:
        r["layer"] = "energies_many(" + ", ".join(L.key for L in layers) + ")"
        r["verified_shape"] = [len(Ls)]
    return rows


def _verification_ok(r) -> bool:
    if "error" in r:
        return r["method"] == "dense"  # a dense basis that does not fit is not a failure
    tol = 1e-9 if r["dtype"] == "float64" else 1e-4
    ok = r["rel_err_perp"] <= tol and r["rel_err_G"] <= tol
    return ok and r.get("rel_err_near", 0.0) <= 1e-3


# ---------------------------------------------------------------------------------------
# Timing of one layer
# ---------------------------------------------------------------------------------------
def _mib(shape, dtype=torch.float32) -> float:
    return math.prod(shape) * torch.empty(0, dtype=dtype).element_size() / 2**20


def time_layer(layer, fused: list[str], settings: Settings, gen: torch.Generator, progress: Progress) -> list[dict]:
    """Timing rows for one layer: each exact method, the floor, the dense projector, the sampled penalty."""
    dev = settings.device
    W = torch.randn(layer.shape, generator=gen).to(dev).requires_grad_()
    base = {"layer": layer.key, "title": layer.title, "group": str(layer.group), "weight_mib": _mib(layer.shape)}
    rows = []

    def add(method, stats=None, **extra):
        rows.append({**base, "method": method, **(stats or {}), **extra})

    for b in fused + ["torch"]:
        progress.step(f"{layer.key}: {b}")
        try:
            add(f"fused[{b}]" if b != "torch" else "torch (spectral)",
                measure(_grad_step(lambda X, b=b: layer.energies(X, b)[0], W), settings, dev), backend=b)
        except Exception as e:  # noqa: BLE001
            add(f"fused[{b}]" if b != "torch" else "torch (spectral)", note=f"failed: {_error_text(e, 200)}")
    for b in fused:  # the same kernels with the gradient computed in the forward pass (known lambda)
        progress.step(f"{layer.key}: {b} one pass")
        Wd = W.detach()
        try:
            add(f"fused[{b}] one pass", measure(lambda b=b: layer.energies_and_grad(Wd, b)[2], settings, dev),
                backend=b, note="energies_and_grad: energies + gradient from one kernel call, no autograd graph")
        except Exception as e:  # noqa: BLE001
            add(f"fused[{b}] one pass", note=f"failed: {_error_text(e, 200)}")

    progress.step(f"{layer.key}: torch.compile")
    if layer.key.split(":")[0] in settings.compile_layers:
        try:
            t0 = time.perf_counter()
            torch.compiler.reset()  # a fresh dynamo cache per layer (no recompile limit, honest compile time)
            fn = layer.compiled()
            step = _grad_step(lambda X: fn(X)[0], W)
            step()
            _sync(dev)
            compile_s = time.perf_counter() - t0
            what = "" if layer.kind == "linear" else "coefficient energies compiled, kernel-space split eager; "
            add("torch.compile", measure(step, settings, dev), note=f"{what}compile + first call {compile_s:.1f} s")
        except Exception as e:  # noqa: BLE001
            add("torch.compile", note=f"failed: {_error_text(e, 200)}")
    else:
        add("torch.compile", note="skipped in this mode (compiles for minutes on a CPU); see --full")

    progress.step(f"{layer.key}: floor")
    src = W.detach().clone()
    dst = torch.empty_like(src)
    st = measure(lambda: torch.mul(src, 2.0, out=dst), settings, dev)
    add("floor: read+write W", st, note=bandwidth_text(2 * src.numel() * 4, st))
    del src, dst

    progress.step(f"{layer.key}: dense")
    N, D = layer.dense_size()
    try:
        dense = layer.dense(torch.float32, dev, max_bytes=settings.dense_max_bytes)
        st = measure(_grad_step(lambda X: layer.dense_energies(dense, X)[0], W), settings, dev)
        meth = getattr(dense, "method", "hom (QR)")
        add("dense projector", st, build_s=dense.build_seconds, dense_bytes=dense.nbytes,
            note=f"Q [{N}, {D}] {dense.nbytes / 2**20:.0f} MiB, build {dense.build_seconds:.2f} s ({meth})")
        del dense
    except MemoryError:
        add("dense projector", dense_bytes=N * D * 4,
            note=f"n/a: Q [{N}, {D}] would need {N * D * 4 / 2**30:,.1f} GiB (limit {settings.dense_max_bytes / 2**30:.1f})")

    progress.step(f"{layer.key}: sampled")
    rows += _time_sampled(layer, W, base, settings, gen)
    return rows


def _time_sampled(layer, W, base, settings: Settings, gen: torch.Generator) -> list[dict]:
    """K for 1% relative RMS error of the orbit estimator (from the variance of N draws), and its time.

    Conv layers use the in-band part of the weight: the out-of-band energy enters the estimator
    exactly (no variance), so a random kernel (mostly out of band) would flatter the estimator."""
    dev = settings.device
    G: Group = layer.group
    W = layer.in_band(W.detach()).requires_grad_()
    Wd = W.detach()
    exact = float(2 * layer.energies(Wd.double(), "torch")[0])
    # draws (no grad) in chunks; the first chunk sizes the rest
    t0 = time.perf_counter()
    draws = [layer.defects(Wd, G.sample(8, generator=gen))]
    _sync(dev)
    per_draw = (time.perf_counter() - t0) / 8
    n = int(min(settings.draws, max(settings.min_draws, settings.draws_budget_s / max(per_draw, 1e-9))))
    done = 8
    t0 = time.perf_counter()
    while done < n:
        k = min(256, n - done)
        draws.append(layer.defects(Wd, G.sample(k, generator=gen)))
        done += k
    _sync(dev)
    if done > 8:
        per_draw = (time.perf_counter() - t0) / (done - 8)
    d = torch.cat(draws).double().cpu()
    est = baselines.samples_for_relative_error(d, exact, settings.rel_err)
    K = est["K"]
    k_unc = math.sqrt(2 / (len(d) - 1))  # relative standard error of a variance estimate (normal approx.)
    note = [f"K from the variance of {len(d)} draws (±{100 * k_unc:.0f}%"
            + (", likely low: few draws miss the rare small defects near the identity" if len(d) < 200 else "")
            + f"), draw mean / 2E_perp = {est['mean'] / exact:.3f}"]
    if layer.kind == "conv":
        note.append("in-band kernel")
    blocks = {}
    block_list = list(layer.block_weights(Wd)) if settings.mode != "quick" and settings.draws_budget_s / per_draw >= 64 else []
    nb = int(min(256, settings.draws_budget_s / (per_draw * max(1, len(block_list)))))
    if block_list and nb >= 64:  # the same draws budget, shared by the blocks
        for label, Wb in block_list:
            exact_b = float(2 * layer.energies(Wb, "torch")[0])
            if exact_b > 1e-12 * exact:  # blocks between fields with an equivariant map keep some energy
                db = layer.defects(Wb.to(Wd), G.sample(nb, generator=gen)).double().cpu()
                blocks[label] = baselines.samples_for_relative_error(db, exact_b, settings.rel_err)["K"]
        if blocks:
            lo, hi = min(blocks, key=blocks.get), max(blocks, key=blocks.get)
            note.append(f"non-equivariance in one field block: K = {blocks[lo]} ({lo}) to {blocks[hi]} ({hi}), "
                        f"{nb} draws each")
    confirmed = None
    R = settings.confirm_repeats
    if R and R * K * per_draw <= settings.confirm_budget_s:  # fresh K-sample estimates
        ests = torch.stack([layer.defects(Wd, G.sample(K, generator=gen)).double().mean() for _ in range(R)]).cpu()
        confirmed = float(((ests - exact) / exact).square().mean().sqrt())
        note.append(f"measured RMS rel. error at K over {R} repeats: {100 * confirmed:.2f}%")

    def step(k):
        e = layer.defects(W, G.sample(k, generator=gen)).mean()
        (g,) = torch.autograd.grad(e, W)
        return g

    if 3 * K * per_draw <= settings.sampled_budget_s:  # energy + gradient ~ 3 passes per sample
        st = measure(lambda: step(K), settings, dev, min_repeats=3)
        how = "measured"
    else:  # time two chunk sizes and extrapolate linearly (fixed cost + per-sample cost)
        k2 = max(2, min(K, int(settings.sampled_budget_s / (3 * per_draw))))
        k1 = max(1, k2 // 2)
        quick = Settings(**{**settings.__dict__, "warmup": 1, "budget_s": 0.0})
        s1 = measure(lambda: step(k1), quick, dev, min_repeats=2)
        s2 = measure(lambda: step(k2), Settings(**{**quick.__dict__, "warmup": 0}), dev, min_repeats=2)
        slope = max((s2["median_s"] - s1["median_s"]) / (k2 - k1), 0.5 * s2["median_s"] / k2)
        scale = (s2["median_s"] + slope * (K - k2)) / s2["median_s"]
        st = {key: v * scale for key, v in s2.items() if key.endswith("_s")}
        st["repeats"] = s2["repeats"]
        st["noisy"] = s1["noisy"] or s2["noisy"]
        how = f"extrapolated linearly from K={k1} and K={k2}"
    note.append(f"time {how}")
    rows = [{**base, "method": f"sampled @1% (K={K})", **st, "K": K, "K_blocks": blocks,
             "draws": len(d), "K_rel_unc": k_unc, "mean_over_exact": est["mean"] / exact,
             "confirmed_rms_rel_err": confirmed, "time_how": how, "note": "; ".join(note)}]
    if blocks and max(blocks.values()) > K:  # the worst single-block case, timed the same way
        Kw = max(blocks.values())
        if 3 * Kw * per_draw <= settings.sampled_budget_s:
            st = measure(lambda: step(Kw), settings, dev, min_repeats=3)
            how = "measured"
        else:
            st = {key: v * Kw / K for key, v in rows[0].items() if key.endswith("_s")}
            st["noisy"] = rows[0]["noisy"]
            how = f"scaled from K={K}"
        rows.append({**base, "method": f"sampled @1% (K={Kw}, worst block)", **st, "K": Kw, "time_how": how,
                     "note": f"non-equivariance only in the {max(blocks, key=blocks.get)} block; time {how}"})
    return rows


# ---------------------------------------------------------------------------------------
# Data-level vs projection penalty overhead (a small O(3) MLP)
# ---------------------------------------------------------------------------------------
class _Gate(torch.nn.Module):
    """Equivariant nonlinearity on fields: SiLU on scalars, ``x * sigmoid(|x|)`` on the other fields."""

    def __init__(self, rep: Rep):
        super().__init__()
        if rep.perm is not None:
            raise ValueError("_Gate needs a rep without permutation")
        self.segs = [(c, f.dim) for c, f in rep.segments]

    def forward(self, x):
        out, o = [], 0
        for c, d in self.segs:
            blk = x[..., o : o + c * d]
            if d == 1:
                out.append(torch.nn.functional.silu(blk))
            else:
                b = blk.unflatten(-1, (c, d))
                out.append((b * torch.sigmoid(b.norm(dim=-1, keepdim=True))).flatten(-2))
            o += c * d
        return torch.cat(out, -1)


def small_model(G: Group | None = None, seed: int = 0):
    """``(model, reps, rep_in, rep_out)``: a 3-layer O(3) MLP 16x0e+8x1o+4x2e -> 64x0e+32x1o+16x2e (x2) -> 8x0e+4x1o."""
    G = G or O3()
    r_in, r_h, r_out = (Rep.parse(G, s) for s in ("16x0e+8x1o+4x2e", "64x0e+32x1o+16x2e", "8x0e+4x1o"))
    torch.manual_seed(seed)
    lin = lambda a, b: torch.nn.Linear(a.dim, b.dim, bias=False)  # noqa: E731
    model = torch.nn.Sequential(lin(r_in, r_h), _Gate(r_h), lin(r_h, r_h), _Gate(r_h), lin(r_h, r_out))
    reps = [(r_in, r_h), (r_h, r_h), (r_h, r_out)]
    return model, reps, r_in, r_out


def time_overhead(settings: Settings, fused: list[str], gen: torch.Generator, progress: Progress) -> dict:
    """Step time of the small model: plain, + projection penalty, + data-level penalty (K=1)."""
    dev = settings.device
    G = O3()
    model, reps, r_in, r_out = small_model(G, settings.seed)
    model = model.to(dev)
    params = list(model.parameters())
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    B = settings.overhead_batch
    x = torch.randn(B, r_in.dim, generator=gen).to(dev)
    y = torch.randn(B, r_out.dim, generator=gen).to(dev)
    backend = fused[0] if fused else "torch"
    lam = 1e-2

    def plain():
        loss = torch.nn.functional.mse_loss(model(x), y)
        return torch.autograd.grad(loss, params)

    def projection():
        loss = torch.nn.functional.mse_loss(model(x), y)
        e = energies_many(weights, reps, backend=backend)[0]
        return torch.autograd.grad(loss + lam * e.sum(), params)

    weight_index = [next(i for i, p in enumerate(params) if p is w) for w in weights]

    def projection_one_pass():  # what ProjectionPenalty.backward() does: the penalty's gradient added in one pass
        loss = torch.nn.functional.mse_loss(model(x), y)
        grads = torch.autograd.grad(loss, params)
        _, _, pen = energies_and_grads_many(weights, reps, lambda_perp=[lam] * len(weights),
                                            lambda_G=[0.0] * len(weights), backend=backend)
        for i, d in zip(weight_index, pen):
            grads[i].add_(d)
        return grads

    def data():
        fx = model(x)
        loss = torch.nn.functional.mse_loss(fx, y)
        pen = baselines.sampled_data_penalty(model, x, G, act_in=r_in, act_out=r_out, num_samples=1,
                                             generator=gen, fx=fx)
        return torch.autograd.grad(loss + lam * pen, params)

    out = {"model": "O(3) MLP 60 -> 240 -> 240 -> 20 (3 Linear, gated)", "batch": B, "backend": backend}
    for name, fn in (("plain", plain), ("projection", projection), ("projection_one_pass", projection_one_pass),
                     ("data_k1", data)):
        progress.step(f"overhead: {name}")
        out[name] = measure(fn, settings, dev)
    t0 = out["plain"]["median_s"]
    out["overhead_projection"] = out["projection"]["median_s"] / t0 - 1
    out["overhead_projection_one_pass"] = out["projection_one_pass"]["median_s"] / t0 - 1
    out["overhead_data_k1"] = out["data_k1"]["median_s"] / t0 - 1
    return out


# ---------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------
def machine_info(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average"] = os.getloadavg()[0]
    except (AttributeError, OSError):
        pass
    return info


def run_suite(settings: Settings, progress: bool = True) -> dict:
    """Run verification and timings; returns a plain dict (what ``--json`` writes)."""
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(settings.seed)
    backends = available_backends(settings.device)
    fused = [b for b, why in backends.items() if why is None]
    layers = suite(settings)
    total = (1 if settings.verify_groups else 0) + len(layers) * (1 + 2 * len(fused) + 5) + 4
    bar = Progress(total, enabled=progress)
    result = {"settings": {k: v for k, v in settings.__dict__.items()}, "machine": machine_info(settings.device),
              "backends": {b: (why or "ok") for b, why in backends.items()}, "fused": fused,
              "verification": [], "groups": [], "timings": [], "floor": None, "overhead": None}
    result["settings"]["dense_max_bytes"] = settings.dense_max_bytes
    # 1. verification
    for L in layers:
        bar.step(f"verify {L.key}")
        result["verification"] += verify_layer(L, ["torch"] + fused, settings, gen)
    result["verification"] += verify_many([L for L in layers if L.kind == "linear"], ["torch"] + fused, settings, gen)
    if settings.verify_groups:

        bar.step("verify groups")
        result["groups"] = verify_groups(seed=settings.seed)
    # 2. timings
    for L in layers:
        result["timings"] += time_layer(L, fused, settings, gen, bar)
    bar.step("bandwidth floor")
    n = 16 * 2**20  # 64 MiB of float32
    src = torch.randn(n, generator=gen).to(settings.device)
    dst = torch.empty_like(src)
    st = measure(lambda: torch.mul(src, 2.0, out=dst), settings, settings.device)
    result["floor"] = {"bytes": 4 * n, **st, "GBps": 2 * 4 * n / st["median_s"] / 1e9}
    del src, dst
    # 3. overhead
    result["overhead"] = time_overhead(settings, fused, gen, bar)
    bar.close()
    _ratios(result)
    result["seconds"] = time.perf_counter() - t_start
    return result


def _ratios(result: dict) -> None:
    """Ratio of every method's time to the best fused backend's (torch when no fused backend) per layer."""
    by_layer: dict[str, list] = {}
    for r in result["timings"]:
        by_layer.setdefault(r["layer"], []).append(r)
    for key, rows in by_layer.items():
        fused = [r for r in rows if r["method"].startswith("fused[") and "median_s" in r]
        ref = min(fused, key=lambda r: r["median_s"]) if fused else next(
            (r for r in rows if r["method"] == "torch (spectral)" and "median_s" in r), None)
        for r in rows:
            r["reference_method"] = ref["method"] if ref else None
            r["ratio_vs_fused"] = r["median_s"] / ref["median_s"] if ref and "median_s" in r else None
            # a ratio with a noisy time on either side is no result (the report says "noisy")
            r["ratio_noisy"] = bool(r["ratio_vs_fused"] is not None and (r.get("noisy") or ref.get("noisy")))


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------
def _t(s) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def is_noisy(st: dict) -> bool:
    """Whether a measurement is marked noisy (:func:`measure`; decided from its quartiles for a record
    without the mark)."""
    return bool(st.get("noisy", relative_spread(st) > 1.0))


def spread_text(st: dict | None) -> str:
    """``±x%``, half the interquartile range relative to the median; ``noisy`` when the range exceeds
    the median (such a spread is not a property of the code); ``-`` without a time."""
    if not st or "median_s" not in st:
        return "-"
    if is_noisy(st):
        return "noisy"
    return f"±{50 * relative_spread(st):.0f}%"


def ratio_text(r: dict) -> str:
    """The "vs fused" ratio of a timing row: ``12.3x``, ``noisy`` (a noisy time on either side), ``-``."""
    v = r.get("ratio_vs_fused")
    if v is None:
        return "-"
    if r.get("ratio_noisy"):
        return "noisy"
    if not (math.isfinite(v) and v > 0):
        return "n/a (no finite time)"
    return f"{v:.3g}x" if v < 100 else f"{v:,.0f}x"



def bandwidth_text(nbytes: float, st: dict) -> str:
    """The bandwidth of moving ``nbytes`` in the measured time, or ``noisy``."""
    if is_noisy(st) or not st["median_s"] > 0:
        return "noisy"
    return f"{nbytes / st['median_s'] / 1e9:.3g} GB/s"


def overhead_finding(o: dict, name: str) -> tuple[float | None, str]:
    """``(overhead, text)`` of step ``name`` of the overhead table against the plain step.

    The overhead (relative to the plain step) is a finding only when the difference of the medians
    exceeds the interquartile range of both steps: then ``(overhead, "+x%")``. Otherwise
    ``(None, "within noise")`` (a smaller, or negative, difference says nothing about the penalty)
    or ``(None, "noisy")`` when either step is itself noisy."""
    s, s0 = o[name], o["plain"]
    if is_noisy(s) or is_noisy(s0):
        return None, "noisy"
    difference = s["median_s"] - s0["median_s"]
    noise = max(s["q3_s"] - s["q1_s"], s0["q3_s"] - s0["q1_s"])
    if difference <= noise:
        return None, "within noise"
    overhead = difference / s0["median_s"]
    return overhead, f"+{100 * overhead:.0f}%"


def overhead_ratio_text(o: dict) -> str:
    """Data-level overhead / projection overhead, when both are findings; else ``n/a (why)``."""
    data, data_text = overhead_finding(o, "data_k1")
    proj, proj_text = overhead_finding(o, "projection")
    if data is None:
        return f"n/a (the data-level overhead is {data_text})"
    if proj is None:
        return f"n/a (the projection overhead is {proj_text})"
    return f"{data / proj:.1f}x"


def format_report(result: dict) -> str:
    """The markdown report: verification, the timing table, the targets, the overhead table."""
    L = []
    m = result["machine"]
    L.append(f"equiproj bench ({result['settings']['mode']}): {m['processor']}, {m['cpu_count']} CPUs, "
             f"torch {m['torch']} ({m['torch_threads']} threads), device {m['device']}"
             + (f" ({m['gpu']})" if "gpu" in m else ""))
    L.append("backends: " + ", ".join(f"{b}: {s}" for b, s in result["backends"].items()))
    load = m.get("load_average")
    if load is not None and m["cpu_count"] and load > 0.5 * m["cpu_count"] and m["device"] == "cpu":
        L.append(f"WARNING: load average {load:.1f} on {m['cpu_count']} CPUs when the run began: other processes "
                 "compete for the cores, timings are inflated and noisy (ratios within the run are less affected)")
    L.append("")
    L.append("## Verification against the float64 reference")
    L.append("")
    L.append("| layer | verified shape | method | dtype | E_perp rel err | E_G rel err | near-eq (1e-7) rel err | ok |")
    L.append("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    all_ok = True
    for r in result["verification"]:
        shape = "x".join(map(str, r["verified_shape"]))
        if "error" in r:
            ok = _verification_ok(r)
            all_ok &= ok
            L.append(f"| {r['layer']} | {shape} | {r['method']} | {r['dtype']} | {r['error']} | | | {'n/a' if ok else 'FAIL'} |")
            continue
        near = r.get("rel_err_near")
        worst = max(worst, r["rel_err_perp"], r["rel_err_G"], near or 0.0)
        ok = _verification_ok(r)
        all_ok &= ok
        L.append(f"| {r['layer']} | {shape} | {r['method']} | {r['dtype']} | {r['rel_err_perp']:.1e} | {r['rel_err_G']:.1e} "
                 f"| {'-' if near is None else f'{near:.1e}'} | {'yes' if ok else 'FAIL'} |")
    L.append("")
    if not result["verification"]:
        L.append("nothing was verified -> FAILURE")
    else:
        L.append(f"largest relative error: {worst:.1e} (tolerances: float64 1e-9, float32 1e-4, near-equivariant "
                 f"float32 1e-3) -> {'all pass' if all_ok else 'FAILURES above'}")
    if result["groups"]:

        L.append("")
        L.append("Per-group check (mixed reps, float64 unless stated):")
        L.append("")
        L.append(format_table(result["groups"]))
        gw = max(max(r["rel_err_perp"], r["rel_err_G"], r["rel_err_near_f64"]) for r in result["groups"])
        L.append(f"\nlargest relative error over the groups (float64): {gw:.1e}")
    L.append("")
    L.append("## Energy + gradient per layer (float32; median of repeats, spread = interquartile range / 2)")
    L.append("")
    ref = {r["layer"]: r.get("reference_method") for r in result["timings"]}
    L.append("| layer | group | W MiB | method | time | spread | vs fused | notes |")
    L.append("|---|---|---|---|---|---|---|---|")
    for r in result["timings"]:
        L.append(f"| {r['title']} | {r['group']} | {r['weight_mib']:.2f} | {r['method']} | {_t(r.get('median_s'))} "
                 f"| {spread_text(r)} | {ratio_text(r)} | {r.get('note', '')} |")
    f = result["floor"]
    if f:
        L.append(f"| bandwidth floor: one read + one write of {f['bytes'] / 2**20:.0f} MiB | | {f['bytes'] / 2**20:.0f} "
                 f"| torch.mul(x, 2, out=y) | {_t(f['median_s'])} | {spread_text(f)} "
                 f"| | {bandwidth_text(2 * f['bytes'], f)} |")
    refs = sorted({v for v in ref.values() if v})
    L.append("")
    L.append(f"'vs fused': time / time of the fastest fused backend on the same layer in this run "
             f"({', '.join(refs) or 'none'}; 'torch (spectral)' where no fused backend is available). "
             "Sampled @1%: the operator-level sample-based penalty at the K giving 1% relative RMS error "
             "of 2 E_perp (see notes for how K and its time were obtained). 'noisy': the interquartile range "
             "of the time exceeded its median in every attempt; no ratio is computed from it.")
    L.append("")
    if result["settings"]["mode"] == "quick":
        L.append("## Targets (not evaluated in quick mode: quick runs are too short to be meaningful)")
    else:
        L.append("## Targets (ratios in this run; a missed target is reported here and does not change the exit "
                 "status, which is about correctness)")
    L.append("")
    L += _targets(result)
    o = result["overhead"]
    if o:
        L.append("")
        L.append(f"## Training-step overhead: {o['model']}, batch {o['batch']}, penalty backend {o['backend']}")
        L.append("")
        L.append("| step | time | spread | overhead vs plain step |")
        L.append("|---|---|---|---|")
        for name, label in (("plain", "task loss only"), ("projection", "+ projection penalty (exact, all 3 layers)"),
                            ("projection_one_pass", "+ projection penalty, gradient added in one pass "
                                                    "(ProjectionPenalty.backward)"),
                            ("data_k1", "+ data-level sampled penalty, K=1 (one augmented copy)")):
            if name not in o:  # results from before the one-pass row
                continue
            s = o[name]
            ov = "-" if name == "plain" else overhead_finding(o, name)[1]
            L.append(f"| {label} | {_t(s['median_s'])} | {spread_text(s)} | {ov} |")
        L.append("")
        L.append(f"data-level overhead / projection overhead: {overhead_ratio_text(o)} (the data-level penalty costs "
                 f"at least one extra forward + backward per step: {overhead_finding(o, 'data_k1')[1]} here). "
                 "An overhead is reported when the difference of the medians exceeds the interquartile ranges of "
                 "both steps, else 'within noise'.")
    L.append("")
    L.append(f"total time {result['seconds']:.0f} s. Timings on a shared machine are noisy; compare ratios within one run.")
    return "\n".join(L)


def verdict(r: dict, target: float, mode: str) -> str:
    """Whether the ratio of timing row ``r`` meets ``target``: not in quick mode (too short to mean
    anything), not from a noisy time; else ``met`` / ``missed by x``."""
    if mode == "quick":
        return "not evaluated in quick mode"
    if r.get("ratio_noisy"):
        return "not evaluated: noisy time"
    ratio = r["ratio_vs_fused"]
    return "met" if ratio >= target else f"missed by {target / ratio:.1f}x"


def _targets(result: dict) -> list[str]:
    out = []
    rows = result["timings"]
    mode = result["settings"]["mode"]

    def get(layer_prefix, method_prefix):
        return [r for r in rows if r["layer"].split(":")[0] == layer_prefix and r["method"].startswith(method_prefix)
                and r.get("ratio_vs_fused") is not None]

    def faster(r):
        return "the time ratio is noisy" if r.get("ratio_noisy") else f"{ratio_text(r)} faster"

    for key in ("mlp", "o3conv", "large"):
        for r in get(key, "sampled"):
            out.append(f"- exact vs {r['method']} ({r['title']}, {r['group']}): {faster(r)} "
                       f"(target >= 1000x: {verdict(r, 1000, mode)})")
    for r in get("o3conv", "dense"):
        out.append(f"- exact vs dense projector ({r['title']}): {faster(r)} (target >= 300x: {verdict(r, 300, mode)})")
    for r in get("mlp", "dense") + get("large", "dense") + get("c8conv", "dense"):
        out.append(f"- exact vs dense projector ({r['title']}): {faster(r)} (no target)")
    o = result["overhead"]
    if o:
        out.append(f"- data-level penalty (K=1) step overhead {overhead_finding(o, 'data_k1')[1]} vs projection "
                   f"penalty {overhead_finding(o, 'projection')[1]}"
                   + (f" ({overhead_finding(o, 'projection_one_pass')[1]} with the one-pass gradient)"
                      if "projection_one_pass" in o else "")
                   + " (target: data-level >= one extra forward+backward"
                   + (": not evaluated in quick mode)" if mode == "quick" else ")"))
    return out or ["- (no rows to compare)"]


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(result, fh, indent=1, default=str)


def check_plot_available() -> None:
    """Raise ``RuntimeError`` with install instructions when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, which is not installed: pip install matplotlib "
                           "(or pip install 'equiproj[plot]')") from None


#: colour and legend label of each kind of method in the plot, by the method's leading words
_PLOT_KINDS = (("fused", "tab:green", "exact, fused kernel"), ("torch", "tab:blue", "exact, pure torch"),
               ("floor", "tab:gray", "floor: read + write W"), ("dense", "tab:orange", "dense projector"),
               ("sampled", "tab:red", "sample-based @1% RMS error"))


def _plot_kind(method: str) -> tuple[str, str]:
    return next(((c, label) for prefix, c, label in _PLOT_KINDS if method.startswith(prefix)), ("tab:blue", "exact"))


def _extrapolated(r: dict) -> bool:
    """Whether the time of a row was extrapolated or scaled rather than measured."""
    return r.get("time_how", "measured") != "measured"


def write_plot(result: dict, path: str) -> None:
    """A PNG of the timing table: one panel per layer, one bar per method, on one log time axis
    shared by all panels; the time on each bar (``extrapolated`` / ``noisy`` where so), the
    interquartile range as a whisker, a legend of the kinds of method, and the machine and mode in
    the title."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import LogLocator

    by_layer: dict[str, list] = {}
    for r in result["timings"]:
        if "median_s" in r:
            by_layer.setdefault(r["title"], []).append(r)
    n = max(1, len(by_layer))
    heights = [max(2, len(rows)) for rows in by_layer.values()] or [2]
    fig, axes = plt.subplots(n, 1, figsize=(10, 0.32 * sum(heights) + 0.9 * n + 1.6), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    values = [r["median_s"] for rows in by_layer.values() for r in rows] or [1e-3]
    lo, hi = min(values), max(max(values), max(r["q3_s"] for rows in by_layer.values() for r in rows) if by_layer else 1)
    for ax, (title, rows) in zip(axes[:, 0], by_layer.items()):
        y = range(len(rows))
        vals = [r["median_s"] for r in rows]
        ax.barh(y, vals, color=[_plot_kind(r["method"])[0] for r in rows],
                hatch=["//" if _extrapolated(r) else "" for r in rows], edgecolor="white", linewidth=0.5)
        ax.errorbar(vals, y, xerr=[[v - r["q1_s"] for v, r in zip(vals, rows)], [r["q3_s"] - v for v, r in zip(vals, rows)]],
                    fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        for yi, r in zip(y, rows):
            marks = [m for m, on in (("extrapolated", _extrapolated(r)), ("noisy", is_noisy(r))) if on]
            shown = r.get("ratio_vs_fused") not in (None, 1.0) and not r.get("ratio_noisy")
            parts = ([ratio_text(r)] if shown else []) + marks
            label = _t(r["median_s"]) + (f" ({', '.join(parts)})" if parts else "")
            ax.text(max(r["median_s"], r["q3_s"]) * 1.15, yi, label, va="center", fontsize=7)
        ax.set_yticks(list(y), [r["method"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title + (f" ({rows[0]['group']})" if rows[0].get("group") else ""), fontsize=9, loc="left")
        ax.grid(axis="x", which="major", linewidth=0.4, alpha=0.5)
    ax0 = axes[0, 0]
    ax0.set_xscale("log")
    ax0.set_xlim(lo / 3, hi * 100)  # room on the right for the labels
    ax0.xaxis.set_major_locator(LogLocator(base=10, numticks=30))
    axes[-1, 0].set_xlabel("time per call: E_perp and its gradient (seconds, log scale; whisker: interquartile range; "
                           "in brackets: time / time of the fastest fused kernel on the layer, as in the report)", fontsize=8)
    for ax in axes[:, 0]:
        ax.tick_params(axis="x", labelsize=7, labelbottom=True)
    kinds = {label: c for r in result["timings"] if "median_s" in r for c, label in [_plot_kind(r["method"])]}
    handles = [Patch(color=c, label=label) for label, c in kinds.items()]
    if any(_extrapolated(r) for rows in by_layer.values() for r in rows):
        handles.append(Patch(facecolor="white", hatch="///", edgecolor="dimgray", label="time extrapolated, not measured"))
    m = result.get("machine", {})
    mode = result.get("settings", {}).get("mode", "?")
    fig.suptitle(f"equiproj bench, {mode} mode: {m.get('processor', '?')}, {m.get('cpu_count', '?')} CPUs, "
                 f"torch {m.get('torch', '?')} ({m.get('torch_threads', '?')} threads), device {m.get('device', '?')}"
                 + (f" ({m['gpu']})" if "gpu" in m else ""), fontsize=10)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.4 / fig.get_figheight()),
               ncol=min(3, len(handles)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / fig.get_figheight()))
    fig.savefig(path, dpi=120)
    plt.close(fig)
