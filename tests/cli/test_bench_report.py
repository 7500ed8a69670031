"""The report of ``equiproj bench`` prints no number that noise made meaningless, from crafted
measurements (no timing): noisy times give no ratio, overheads within the spread are "within noise",
targets are not evaluated in quick mode, and the exit status is about verification only."""

from __future__ import annotations

import math
import re

import pytest

from equiproj.cli import bench
from equiproj.cli import main


def _st(median, spread=0.1, **extra):
    """A measurement: median and quartiles ``median * (1 -+ spread / 2)``."""
    st = {"median_s": median, "q1_s": median * (1 - spread / 2), "q3_s": median * (1 + spread / 2),
          "min_s": median * (1 - spread / 2), "repeats": 9}
    st["noisy"] = bench.relative_spread(st) > 1.0
    return {**st, **extra}


def _row(layer, method, st=None, **extra):
    return {"layer": layer, "title": f"the {layer} layer", "group": "O3()", "weight_mib": 1.0, "method": method,
            **(st or {}), **extra}


def _result(mode="default", timings=None, overhead=None, verification=None):
    timings = timings if timings is not None else [
        _row("mlp", "fused[cpp]", _st(1e-4)), _row("mlp", "torch (spectral)", _st(1e-3)),
        _row("mlp", "floor: read+write W", _st(1e-5), note=bench.bandwidth_text(1e6, _st(1e-5))),
        _row("mlp", "sampled @1% (K=100)", _st(1e-2), time_how="measured"),
        _row("o3conv", "fused[cpp]", _st(1e-3)), _row("o3conv", "dense projector", _st(1e-2))]
    result = {"settings": {"mode": mode}, "machine": {"processor": "x86_64", "cpu_count": 2, "torch": "2.x",
                                                      "torch_threads": 2, "device": "cpu"},
              "backends": {"cpp": "ok"}, "fused": ["cpp"], "groups": [], "timings": timings,
              "verification": verification if verification is not None else [
                  {"layer": "mlp", "method": "cpp", "dtype": "float32", "rel_err_perp": 1e-7, "rel_err_G": 1e-7,
                   "verified_shape": [4, 4]}],
              "floor": {"bytes": 2**26, **_st(0.02)},
              "overhead": overhead or {"model": "m", "batch": 8, "backend": "cpp", "plain": _st(1e-2),
                                       "projection": _st(1.2e-2), "projection_one_pass": _st(1.1e-2),
                                       "data_k1": _st(2.5e-2)},
              "seconds": 1.0}
    bench.ratios(result)
    return result


def _table_row(report: str, method: str, layer: str = "mlp") -> list[str]:
    line = next(ln for ln in report.splitlines() if ln.startswith(f"| the {layer} layer |") and f"| {method} |" in ln)
    return [c.strip() for c in line.strip("|").split("|")]


def _numbers_are_finite(report: str) -> None:
    assert not re.search(r"\binf|\bnan", report, re.IGNORECASE), "an infinite or NaN number is printed"
    assert not re.search(r"(?<![\w±])-\d+(\.\d+)?\s?%", report), "a negative percentage is printed"


# ---- the measurement: retried, then marked -------------------------------------------------
def test_noisy_measurement_is_retried_then_marked(monkeypatch):
    settings = bench.Settings.for_mode("quick")
    assert settings.noise_retries >= 1
    spreads = iter([3.0, 1.5, 2.0, 9.0, 9.0])
    monkeypatch.setattr(bench._timing, "measure_once", lambda *a, **k: _st(1e-3, next(spreads)))
    st = bench.measure(lambda: None, settings)
    assert st["attempts"] == 1 + settings.noise_retries and st["noisy"]
    assert bench.relative_spread(st) == pytest.approx(1.5)  # the least spread attempt is kept
    spreads = iter([3.0, 0.2, 9.0])
    st = bench.measure(lambda: None, settings)
    assert st["attempts"] == 2 and not st["noisy"] and bench.relative_spread(st) == pytest.approx(0.2)
    spreads = iter([0.3])
    st = bench.measure(lambda: None, settings)
    assert st["attempts"] == 1 and not st["noisy"]


def test_real_measurement_has_the_marks():
    settings = bench.Settings.for_mode("quick", budget_s=0.01, min_repeats=3, warmup=1)
    st = bench.measure(lambda: sum(range(100)), settings)
    assert st["median_s"] > 0 and st["attempts"] >= 1 and isinstance(st["noisy"], bool)


# ---- the timing table -------------------------------------------------------------------------
def test_noisy_time_gives_no_ratio():
    timings = [_row("mlp", "fused[cpp]", _st(1e-4)), _row("mlp", "torch (spectral)", _st(1e-3, 110.0)),
               _row("mlp", "floor: read+write W", _st(1e-5, 3.0), note=bench.bandwidth_text(1e6, _st(1e-5, 3.0))),
               _row("o3conv", "fused[cpp]", _st(1e-3, 5.0)), _row("o3conv", "torch (spectral)", _st(1e-2))]
    report = bench.format_report(_result(timings=timings))
    cells = _table_row(report, "torch (spectral)")
    assert cells[5] == "noisy" and cells[6] == "noisy"  # spread and ratio: no "±5500%", no bare number
    assert _table_row(report, "floor: read+write W")[7] == "noisy"  # no "0.0 GB/s"
    # the reference of the o3conv layer is noisy: no ratio on that layer either
    assert _table_row(report, "torch (spectral)", "o3conv")[6] == "noisy"
    assert _table_row(report, "fused[cpp]")[5] == "±5%" and _table_row(report, "fused[cpp]")[6] == "1x"
    assert "±5500%" not in report and "5500" not in report
    _numbers_are_finite(report)


def test_bandwidth_has_significant_digits():
    assert bench.bandwidth_text(1000, _st(1e-3)) == "0.001 GB/s"  # never "0.0 GB/s"
    assert bench.bandwidth_text(8e9, _st(1.0)) == "8 GB/s"
    assert bench.bandwidth_text(8e9, _st(1.0, 2.5)) == "noisy"


def test_ratio_text():
    assert bench.ratio_text({"ratio_vs_fused": 3.456}) == "3.46x"
    assert bench.ratio_text({"ratio_vs_fused": 1234.5}) == "1,234x"
    assert bench.ratio_text({"ratio_vs_fused": 2.0, "ratio_noisy": True}) == "noisy"
    assert bench.ratio_text({"ratio_vs_fused": math.inf}).startswith("n/a")
    assert bench.ratio_text({"ratio_vs_fused": None}) == "-"


# ---- the overhead table -----------------------------------------------------------------------
def test_overhead_within_noise_is_not_a_finding():
    o = {"model": "m", "batch": 8, "backend": "cpp", "plain": _st(10e-3, 0.8),
         "projection": _st(6.7e-3, 0.8),  # faster than the plain step: noise, not a negative overhead
         "projection_one_pass": _st(10.5e-3, 0.2), "data_k1": _st(25e-3, 0.2)}
    report = bench.format_report(_result(overhead=o))
    assert "| + projection penalty (exact, all 3 layers) | 6.70 ms | ±40% | within noise |" in report
    assert "gradient added in one pass (ProjectionPenalty.backward) | 10.50 ms | ±10% | within noise |" in report
    assert "K=1 (one augmented copy) | 25.00 ms | ±10% | +150% |" in report
    assert "data-level overhead / projection overhead: n/a (the projection overhead is within noise)" in report
    _numbers_are_finite(report)


def test_overhead_ratio_when_both_are_findings():
    o = {"model": "m", "batch": 8, "backend": "cpp", "plain": _st(10e-3), "projection": _st(12e-3),
         "projection_one_pass": _st(11.5e-3), "data_k1": _st(25e-3)}
    report = bench.format_report(_result(overhead=o))
    assert "data-level overhead / projection overhead: 7.5x" in report  # 150% / 20%
    assert bench.overhead_finding(o, "projection") == (pytest.approx(0.2), "+20%")


def test_noisy_overhead_steps():
    o = {"model": "m", "batch": 8, "backend": "cpp", "plain": _st(10e-3, 3.0), "projection": _st(12e-3),
         "projection_one_pass": _st(11.5e-3), "data_k1": _st(25e-3)}
    report = bench.format_report(_result(overhead=o))
    assert "| task loss only | 10.00 ms | noisy | - |" in report
    assert "data-level overhead / projection overhead: n/a (the data-level overhead is noisy)" in report
    _numbers_are_finite(report)


# ---- targets and exit status -------------------------------------------------------------------
def _missing_targets():
    return [_row("mlp", "fused[cpp]", _st(1e-4)), _row("mlp", "sampled @1% (K=100)", _st(7.8e-4), time_how="measured"),
            _row("o3conv", "fused[cpp]", _st(1e-3)), _row("o3conv", "dense projector", _st(2e-3))]


def test_targets_are_not_evaluated_in_quick_mode():
    report = bench.format_report(_result("quick", timings=_missing_targets()))
    targets = report.split("## Targets", 1)[1].split("##", 1)[0]
    assert "not evaluated in quick mode" in targets.splitlines()[0]
    assert "missed" not in targets and "met" not in re.sub(r"not evaluated", "", targets)
    assert targets.count("(target >= 1000x: not evaluated in quick mode)") == 1
    assert "(target >= 300x: not evaluated in quick mode)" in targets


def test_missed_targets_are_reported_in_default_mode():
    report = bench.format_report(_result("default", timings=_missing_targets()))
    targets = report.split("## Targets", 1)[1].split("##", 1)[0]
    assert "does not change the exit status" in targets
    assert "(target >= 1000x: missed by 128.2x)" in targets and "(target >= 300x: missed by 150.0x)" in targets
    noisy = _missing_targets()
    noisy[1] = _row("mlp", "sampled @1% (K=100)", _st(7.8e-4, 4.0), time_how="measured")
    targets = bench.format_report(_result("default", timings=noisy)).split("## Targets", 1)[1]
    assert "the time ratio is noisy (target >= 1000x: not evaluated: noisy time)" in targets


@pytest.mark.parametrize("mode", ["quick", "default"])
def test_exit_status_is_about_verification_only(mode, monkeypatch, capsys):
    """Missed targets and noisy times leave the exit status 0; a failed verification makes it 1; an
    empty verification is no pass."""
    outcome = {}
    monkeypatch.setattr(bench, "run_suite", lambda settings, progress=True: outcome["result"])
    outcome["result"] = _result(mode, timings=_missing_targets())
    argv = ["bench", "--no-progress"] + (["--quick"] if mode == "quick" else [])
    assert main(argv) == 0
    assert "all pass" in capsys.readouterr().out
    failed = {"layer": "mlp", "method": "cpp", "dtype": "float32", "rel_err_perp": 1e-2, "rel_err_G": 1e-7,
              "verified_shape": [4, 4]}
    outcome["result"] = _result(mode, verification=[failed])
    assert main(argv) == 1
    assert "FAILURES above" in capsys.readouterr().out
    outcome["result"] = _result(mode, verification=[])
    assert main(argv) == 1
    assert "nothing was verified" in capsys.readouterr().out


# ---- the plot ---------------------------------------------------------------------------------
def test_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    timings = _missing_targets() + [
        _row("large", "fused[cpp]", _st(0.1)),
        _row("large", "sampled @1% (K=5000)", _st(40.0), time_how="extrapolated linearly from K=2 and K=4"),
        _row("large", "floor: read+write W", _st(1e-3, 4.0))]
    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))  # keep the figure to look at
    path = tmp_path / "t.png"
    bench.write_plot(_result("quick", timings=timings), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (fig,) = figures
    axes = fig.axes
    assert len(axes) == 3 and all(ax.get_xscale() == "log" for ax in axes)
    assert len({ax.get_xlim() for ax in axes}) == 1  # one shared time axis
    texts = [t.get_text() for ax in axes for t in ax.texts]
    assert "40.00 s (400x, extrapolated)" in texts and "1.00 ms (noisy)" in texts and "780 µs (7.8x)" in texts
    assert "quick mode" in fig._suptitle.get_text() and "x86_64" in fig._suptitle.get_text()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "time extrapolated, not measured" in legend and "exact, fused kernel" in legend
    real_close(fig)
