"""One run of ``equiproj bench``: verification, timings, the bandwidth floor, the overhead; the
ratios of every method to the fastest fused backend."""

from __future__ import annotations

import os
import platform
import time

import torch

from .._verify import verify_groups
from ._layer_kinds import layer_kind_rows, layer_kinds
from ._overhead import time_overhead
from ._suite import Settings, suite
from ._timing import Progress, available_backends, measure, time_layer
from ._verification import verify_layer, verify_many


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
    kind_threads = (1,) if settings.mode == "quick" else (1, 2)
    kinds = layer_kinds(quick=settings.mode != "full", every=settings.mode != "quick")
    total = (1 if settings.verify_groups else 0) + len(layers) * (1 + 2 * len(fused) + 5) + 4 + len(kinds) * len(kind_threads)
    bar = Progress(total, enabled=progress)
    result = {"settings": {k: v for k, v in settings.__dict__.items()}, "machine": machine_info(settings.device),
              "backends": {b: (why or "ok") for b, why in backends.items()}, "fused": fused,
              "verification": [], "groups": [], "timings": [], "floor": None, "overhead": None, "layer_kinds": []}
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
    # 4. every kind of layer through the penalty against its memory floor
    result["layer_kinds"] = layer_kind_rows(kind_threads, kinds=kinds, rounds=5 if settings.mode == "quick" else None,
                                            progress=bar.step, device=settings.device)
    bar.close()
    ratios(result)
    result["seconds"] = time.perf_counter() - t_start
    return result


def ratios(result: dict) -> None:
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
