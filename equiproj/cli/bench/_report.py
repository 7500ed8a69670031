"""The text report of ``equiproj bench`` (tables, spreads, ratios, verdicts on the targets) and its JSON."""

from __future__ import annotations

import json
import math


from .._verify import format_table
from ._layer_kinds import format_layer_kinds
from ._timing import bandwidth_text, is_noisy, relative_spread
from ._verification import verification_ok


def time_text(s) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


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
            ok = verification_ok(r)
            all_ok &= ok
            L.append(f"| {r['layer']} | {shape} | {r['method']} | {r['dtype']} | {r['error']} | | | {'n/a' if ok else 'FAIL'} |")
            continue
        near = r.get("rel_err_near")
        worst = max(worst, r["rel_err_perp"], r["rel_err_G"], near or 0.0)
        ok = verification_ok(r)
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
        L.append(f"| {r['title']} | {r['group']} | {r['weight_mib']:.2f} | {r['method']} | {time_text(r.get('median_s'))} "
                 f"| {spread_text(r)} | {ratio_text(r)} | {r.get('note', '')} |")
    f = result["floor"]
    if f:
        L.append(f"| bandwidth floor: one read + one write of {f['bytes'] / 2**20:.0f} MiB | | {f['bytes'] / 2**20:.0f} "
                 f"| torch.mul(x, 2, out=y) | {time_text(f['median_s'])} | {spread_text(f)} "
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
            L.append(f"| {label} | {time_text(s['median_s'])} | {spread_text(s)} | {ov} |")
        L.append("")
        L.append(f"data-level overhead / projection overhead: {overhead_ratio_text(o)} (the data-level penalty costs "
                 f"at least one extra forward + backward per step: {overhead_finding(o, 'data_k1')[1]} here). "
                 "An overhead is reported when the difference of the medians exceeds the interquartile ranges of "
                 "both steps, else 'within noise'.")
    if result.get("layer_kinds"):
        L.append("")
        L.append("## Every kind of layer against its memory floor (float32; `penalty.backward()` and `decay_`)")
        L.append("")
        L.append(format_layer_kinds(result["layer_kinds"]))
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
