"""The PhiFlow smoke-plume experiment (equiproj/cli/experiments/_phiflow.py, experiments/phiflow_smoke.py): the
solver's symmetry and its breaking, the cached data set, a tiny run of every regime, and what the
demo and the script do without PhiFlow."""

import importlib.util
import json
import os
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

import equiproj.nn as eqnn
from equiproj.cli import _demo as demo
from equiproj.cli.experiments import _phiflow as phiflow
from equiproj.cli.experiments._relaxed import REGIMES
from equiproj.cli.experiments._smoke import SmokeScales, smoke_equivariance_error, smoke_rollout

needs_phiflow = pytest.mark.skipif(not phiflow.phiflow_available(), reason="PhiFlow is not installed")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_projected_plume_net_is_equivariant(seed, gen):
    torch.manual_seed(seed)
    net = phiflow.C4PlumeNet(hidden_fields=2, layers=3)
    assert [d.case for _, _, d in eqnn.declared_layers(net)] == ["grid"] * 3
    x = torch.randn(3, 6, 12, 12, generator=gen)
    assert smoke_equivariance_error(net, x) > 0.1
    eqnn.project_(net)
    assert smoke_equivariance_error(net, x) < 1e-5
    with pytest.raises(ValueError, match="at least 2 layers"):
        phiflow.C4PlumeNet(layers=1)


def _script():
    spec = importlib.util.spec_from_file_location("phiflow_smoke_script", os.path.join(REPO, "experiments",
                                                                                       "phiflow_smoke.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_phiflow_the_demo_and_the_script_say_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "phiflow_available", lambda: False)
    assert demo.main(["--only", "phiflow", "--out", str(tmp_path)]) == 0
    assert "PhiFlow is not installed: pip install phiflow" in capsys.readouterr().out
    script = _script()
    monkeypatch.setattr(script, "phiflow_available", lambda: False)
    assert script.main(["--generate-only", "--cache-dir", str(tmp_path)]) == 0
    assert "PhiFlow is not installed" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.npz"))
    assert "phiflow" not in demo.DEFAULT_EXPERIMENTS
    if not phiflow.phiflow_available():
        with pytest.raises(ImportError, match="PhiFlow is not installed"):
            phiflow.simulate_plumes(phiflow.PlumeParams(grid=8), 1, 1, torch.Generator())


@needs_phiflow
def test_phiflow_plumes_are_c4_symmetric_up_to_the_direction_dependent_buoyancy():
    params = phiflow.PlumeParams(grid=16, asymmetry=0.0)
    # the solver commutes with the quarter turns of the box (float64, CG tolerance 1e-6 -> measured ~1e-10)
    assert phiflow.plume_twin_difference(params, 1, 3, torch.Generator().manual_seed(0), warmup=2) < 1e-6
    assert phiflow.plume_twin_difference(replace(params, asymmetry=0.5), 1, 3, torch.Generator().manual_seed(0),
                                         warmup=2) > 1e-3
    data = phiflow.simulate_plumes(replace(params, asymmetry=0.5), 4, 2, torch.Generator().manual_seed(1), warmup=2)
    assert data["states"].shape == (4, 2, 3, 16, 16) and data["source"].shape == (4, 1, 16, 16)
    assert float(data["states"][:, -1, 0].abs().amax()) > 0.1  # smoke was fed in
    torch.testing.assert_close(data["g_dir"].norm(dim=1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(data["strength"], 0.1 * (1 + 0.5 * data["direction_index"].double() / 3))


def _pinned_step_times(monkeypatch):
    """Step times measured as usual, but the data-level step reported at twice the projection step:
    the equal-time regime's step count is derived from measured wall-clock times (a loaded machine
    gives it another step or two, which moves its RMSE by ~0.4% per step at this size), so it is
    pinned to half the steps for the rows of a run to depend on the seed only."""
    measured = phiflow.interleaved_step_times

    def pinned(*args, **kwargs):
        times = measured(*args, **kwargs)
        return {**times, "data_time": 2 * times["projection"]}

    monkeypatch.setattr(phiflow, "interleaved_step_times", pinned)


def _persistence_rollout(cfg):
    """Rollout RMSE of the zero-change forecast (every frame predicted equal to the first) on the test plumes."""
    sizes, frames = (cfg.train_traj, cfg.val_traj, cfg.test_traj), (cfg.frames, cfg.horizon + 1, cfg.horizon + 1)
    data, _ = phiflow.plume_dataset(cfg.params, sizes, frames, seed=50_000, warmup=cfg.warmup, twins=cfg.twins,
                                    cache_dir=cfg.cache_dir, log=lambda m: None)
    sc = SmokeScales.fit(data["train"])
    rmse, _ = smoke_rollout(lambda x: x.new_zeros(len(x), 3, *x.shape[2:]), data["test"], sc, cfg.horizon)
    return float(rmse.mean())


_SEEDED = ("lam", "steps", "one_step_rmse", "rollout_rmse", "final_rmse", "equiv_err")


@needs_phiflow
def test_phiflow_run_on_the_tiny_config_learns_writes_and_reuses_the_cached_data_set(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _pinned_step_times(monkeypatch)
    # 80 epochs of the tiny set (80 steps; measured: every regime at 0.31-0.75 of the zero-change rollout RMSE)
    cfg = replace(phiflow.PlumeConfig.tiny(), cache_dir=str(tmp_path / "cache"), epochs=80)
    logs, logs2 = [], []
    threads = torch.get_num_threads()
    try:
        # one thread: on a 2-core machine busy with another job, two threads made these ~1000 tiny steps
        # take 80-110 s instead of 1 s (every parallel region waits for a descheduled thread)
        torch.set_num_threads(1)
        res = phiflow.run(cfg, seed=0, out=str(tmp_path), log=logs.append)
        res2 = phiflow.run(cfg, seed=0, out=None, log=logs2.append)
    finally:
        torch.set_num_threads(threads)
    rows = {r["regime"]: r for r in res["rows"]}
    assert list(rows) == list(REGIMES)
    assert rows["data_time"]["steps"] == 40 and rows["none"]["steps"] == 80
    assert set(res["info"]["step_s"]) == set(REGIMES)
    # every regime learned something: its rollout beats the zero-change forecast by a clear margin
    persistence = _persistence_rollout(cfg)
    for regime, r in rows.items():
        assert r["rollout_rmse"] < 0.85 * persistence, (regime, r["rollout_rmse"], persistence)
    assert rows["strict"]["equiv_err"] < 1e-5 and rows["strict"]["rel_E_perp"] < 1e-12
    assert rows["none"]["equiv_err"] > 0.1 and rows["rpp"]["equiv_err"] > 1e-3
    # the chosen lambda is the sweep's best on validation
    sweep = [s for s in res["sweep"] if s["regime"] == "projection"]
    assert rows["projection"]["lam"] == min(sweep, key=lambda s: s["val_rollout_rmse"])["lam"]
    assert "residual pathway" in (tmp_path / "phiflow_table.md").read_text()
    (path,) = (tmp_path / "cache").glob("plumes_16_*.npz")
    with np.load(path) as f:
        assert f["train_states"].dtype == np.float16 and f["train_states"].shape == (2, 4, 3, 16, 16)
        meta = json.loads(str(f["meta"]))
    assert meta["seed"] == 50_000 and meta["versions"]["phiflow"] and meta["params"]["grid"] == 16
    # the second run loaded the data set and repeated every seeded number (to a tolerance far above
    # float32 rounding, which another thread count or build may change, and far below the effect of
    # one more training step, another initialisation or other data)
    assert any("loaded" in m for m in logs2) and not any("simulating" in m for m in logs2)
    for r, r2 in zip(res["rows"], res2["rows"]):
        for key in _SEEDED:
            torch.testing.assert_close(r2[key], r[key], rtol=1e-4, atol=1e-6, msg=f"{r['regime']} {key}")
    # what a run trains on is what the file holds, whether it was just simulated or loaded
    sizes, frames = (cfg.train_traj, cfg.val_traj, cfg.test_traj), (cfg.frames, cfg.horizon + 1, cfg.horizon + 1)
    fresh, _ = phiflow.plume_dataset(cfg.params, sizes, frames, seed=50_000, warmup=cfg.warmup, twins=cfg.twins,
                                     cache_dir=str(tmp_path / "fresh"), log=lambda m: None)
    loaded, meta2 = phiflow.plume_dataset(cfg.params, sizes, frames, seed=50_000, warmup=cfg.warmup, twins=cfg.twins,
                                          cache_dir=cfg.cache_dir, log=lambda m: None)
    assert meta2 == meta
    for split in ("train", "val", "test"):
        for name in ("states", "source", "g_dir", "strength", "direction_index"):
            assert torch.equal(fresh[split][name], loaded[split][name]), (split, name)
