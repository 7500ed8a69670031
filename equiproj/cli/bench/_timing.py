"""How ``equiproj bench`` times: which fused backends answer on the device, the measurement of one call
(``torch.utils.benchmark.Timer``, re-measured when noisy), the progress bar, and the timing of one
layer against its baselines."""

from __future__ import annotations

import math
import sys
import time
from typing import Callable

import torch
from torch.utils.benchmark import Timer

from ... import baselines, ops, reference
from ..._energy import energies
from ...groups import O3, Group, Rep
from ._suite import FUSED_BACKENDS, Settings, rel_error


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
            err = rel_error(e.detach(), ref)
            out[b] = None if err < 1e-4 else f"wrong result (rel err {err:.1e})"
        except Exception as e:  # noqa: BLE001 - any failure means "not available here"
            out[b] = f"not available ({error_text(e)})"
    return out


def error_text(e: Exception, limit: int = 400) -> str:
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


def is_noisy(st: dict) -> bool:
    """Whether a measurement is marked noisy (:func:`measure`; decided from its quartiles for a record
    without the mark)."""
    return bool(st.get("noisy", relative_spread(st) > 1.0))


def bandwidth_text(nbytes: float, st: dict) -> str:
    """The bandwidth of moving ``nbytes`` in the measured time, or ``noisy``."""
    if is_noisy(st) or not st["median_s"] > 0:
        return "noisy"
    return f"{nbytes / st['median_s'] / 1e9:.3g} GB/s"


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


# ---- timing of one layer --------------------------------------------------------------------
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
            add(f"fused[{b}]" if b != "torch" else "torch (spectral)", note=f"failed: {error_text(e, 200)}")
    for b in fused:  # the same kernels with the gradient computed in the forward pass (known lambda)
        progress.step(f"{layer.key}: {b} one pass")
        Wd = W.detach()
        try:
            add(f"fused[{b}] one pass", measure(lambda b=b: layer.energies_and_grad(Wd, b)[2], settings, dev),
                backend=b, note="energies_and_grad: energies + gradient from one kernel call, no autograd graph")
        except Exception as e:  # noqa: BLE001
            add(f"fused[{b}] one pass", note=f"failed: {error_text(e, 200)}")

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
            add("torch.compile", note=f"failed: {error_text(e, 200)}")
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
