"""The command line: ``equiproj verify``, ``info`` and ``bench`` (a quick one-layer run)."""

import json
import sys

import pytest

from equiproj.cli import bench
from equiproj.cli import main


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "bench" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--quick" in out and "--json" in out and "--plot" in out and "--device" in out


def test_verify_and_info(capsys):
    assert main(["verify"]) == 0
    out = capsys.readouterr().out
    assert "SO3()" in out and "largest relative error" in out
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "equiproj" in out and "backend cpp" in out


def test_bench_quick_one_layer(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--layers", "mlp", "--no-progress", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "## Verification against the float64 reference" in out
    assert "| layer | group | W MiB | method | time | spread | vs fused | notes |" in out
    assert "sampled @1% (K=" in out and "floor: read+write W" in out and "dense projector" in out
    assert "data-level overhead / projection overhead" in out
    result = json.loads(path.read_text())
    assert result["settings"]["mode"] == "quick"
    assert {r["method"] for r in result["timings"]} >= {"torch (spectral)", "floor: read+write W", "dense projector"}
    assert all(bench.verification_ok(r) for r in result["verification"])
    sampled = next(r for r in result["timings"] if r["method"].startswith("sampled"))
    assert sampled["K"] >= 1 and sampled["median_s"] > 0 and 0.8 < sampled["mean_over_exact"] < 1.2
    torch_row = next(r for r in result["timings"] if r["method"] == "torch (spectral)")
    assert torch_row["ratio_vs_fused"] is not None and torch_row["median_s"] > 0


def test_bench_plot_without_matplotlib(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(["bench", "--quick", "--plot", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install" in err


def test_bench_cuda_without_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_settings_modes():
    q, d, f = (bench.Settings.for_mode(m) for m in ("quick", "default", "full"))
    assert q.budget_s < d.budget_s < f.budget_s and q.draws <= d.draws <= f.draws
    with pytest.raises(ValueError, match="mode"):
        bench.Settings.for_mode("huge")
