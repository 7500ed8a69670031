"""Smoke tests of ``equiproj demo`` (tiny sizes) and checks of the pieces the experiments rely on:
the equivariance of the nonlinearity, of the solver, of projected models, and the CLI plumbing."""

import math
import sys

import pytest
import torch

import equiproj.nn as eqnn
from equiproj import Cyclic, grid
from equiproj.cli import _demo as demo
from equiproj.cli.experiments import _smoke as smoke
from equiproj.cli.experiments import _so2 as so2
from equiproj.cli.experiments._smoke import (C4SmokeNet, SmokeParams, c4_matrix, rotate_fields, simulate_smoke, smoke_data_asymmetry,
                                 smoke_equivariance_error)
from equiproj.cli.experiments._so2 import FourierSiLU, SO2Classifier, so2_hidden_rep, so2_invariance_error, so2_wavey_rings, so2_wedge
from equiproj.cli.experiments._training import relative_e_perp


def _rot(theta):
    return torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)


def test_fourier_silu_commutes_with_rotations():
    C, L, S = 3, 4, 32
    rep = so2_hidden_rep(C, L)
    act = FourierSiLU(C, L, S).double()
    h = 0.5 * torch.randn(50, rep.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # a rotation by a multiple of 2 pi / S permutes the samples: exact up to the float32 DFT matrices
    g = _rot(2 * math.pi * 5 / S)
    D = rep.matrix(g)
    assert torch.allclose(act(h @ D.T), act(h) @ D.T, atol=1e-7)
    # any other angle: aliasing of frequencies >= S - L only (SiLU is smooth)
    g = _rot(0.4321)
    D = rep.matrix(g)
    err = (act(h @ D.T) - act(h) @ D.T).norm() / act(h).norm()
    assert err < 2e-4  # measured 7e-5 for coefficients of std 0.5
    err_on_grid_angles = (act(h @ rep.matrix(_rot(2 * math.pi / S)).T) - act(h) @ rep.matrix(_rot(2 * math.pi / S)).T).norm()
    assert err_on_grid_angles < err * act(h).norm()  # off-grid angles do alias
    with pytest.raises(ValueError, match="samples"):
        FourierSiLU(C, L, 2 * L)


def test_fourier_silu_is_silu_of_the_signal():
    L = 8
    act = FourierSiLU(1, L, 64).double()
    h = torch.zeros(1, 2 * L + 1, dtype=torch.float64)
    h[0, :3] = torch.tensor([0.3, 0.5, -0.2])  # f(phi) = 0.3 + 0.5 cos(phi) - 0.2 sin(phi)
    out = act(h)[0]
    for phi in (0.0, 0.7, 2.9):
        f = 0.3 + 0.5 * math.cos(phi) - 0.2 * math.sin(phi)
        basis = [1.0] + [fn(k * phi) for k in range(1, L + 1) for fn in (math.cos, math.sin)]
        # silu(f) is smooth and of small amplitude: frequencies above 8 are below 1e-8
        assert abs(float(out @ torch.tensor(basis, dtype=torch.float64)) - f / (1 + math.exp(-f))) < 1e-8


def test_so2_data_sets():
    x, y = so2_wedge(400, torch.Generator().manual_seed(1))
    r, th = x.norm(dim=1), torch.atan2(x[:, 1], x[:, 0])
    assert x.shape == (400, 2) and y.sum() == 200
    assert (r[y == 1] <= 1 + 1e-6).all()
    assert ((r[y == 0] >= 2.3 - 1e-5) & (r[y == 0] <= 3.0 + 1e-5)).all() and (th[y == 0].abs() <= math.pi / 4 + 1e-6).all()
    x2, _ = so2_wedge(400, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)
    x, y = so2_wavey_rings(400, 0.0, torch.Generator().manual_seed(2), noise=0.0)
    assert torch.allclose(x[y == 1].norm(dim=1), torch.ones(200), atol=1e-5)
    assert torch.allclose(x[y == 0].norm(dim=1), torch.full((200,), 1.5), atol=1e-5)


def test_projected_so2_classifier_is_invariant():
    torch.manual_seed(0)
    model = SO2Classifier(channels=2, max_freq=4, samples=32)
    x = 2 * torch.randn(200, 2, generator=torch.Generator().manual_seed(3))
    assert so2_invariance_error(model, x, torch.Generator().manual_seed(4)) > 1e-3
    eqnn.project_(model)
    assert so2_invariance_error(model, x, torch.Generator().manual_seed(4)) < 1e-5


def test_rotate_fields_is_the_c4_action():
    x = torch.randn(2, 5, 6, 6, generator=torch.Generator().manual_seed(0))
    vec = ((1, 2), (3, 4))
    for a in range(4):
        for b in range(4):
            assert torch.allclose(rotate_fields(rotate_fields(x, a, vec), b, vec), rotate_fields(x, a + b, vec))
    # a constant vector field is rotated by the C4 matrix
    v = torch.tensor([0.3, -1.2])
    field = v[None, :, None, None].expand(1, 2, 4, 4)
    assert torch.allclose(rotate_fields(field, 1, ((0, 1),))[0, :, 0, 0], c4_matrix(1).float() @ v)
    # a density blob displaced by +x moves to c4_matrix(k) (+x) (x = column, y = row)
    img = torch.zeros(1, 1, 5, 5)
    img[0, 0, 2, 3] = 1.0  # (x, y) = (+1, 0) from the centre
    row, col = (rotate_fields(img, 1)[0, 0] == 1).nonzero()[0].tolist()
    assert (col - 2, row - 2) == tuple(int(v) for v in c4_matrix(1) @ torch.tensor([1.0, 0.0], dtype=torch.float64))
    # the library's grid action (the convention of its kernel reps) agrees
    G = Cyclic(4)
    rep = G.trivial() + G.standard() + G.standard()
    for k in range(4):
        assert torch.allclose(rotate_fields(x, k, vec), grid.act(x, c4_matrix(k), rep), atol=1e-6)


def test_c4_net_projected_is_equivariant_and_energy_is_zero():
    torch.manual_seed(1)
    net = C4SmokeNet(hidden_fields=2, layers=3, kernel=5)
    assert [eqnn.declaration(c).case for c in net.convs] == ["grid"] * 3
    x = torch.randn(3, 6, 12, 12, generator=torch.Generator().manual_seed(5))
    assert smoke_equivariance_error(net, x) > 0.1
    assert relative_e_perp(net) > 0.5
    eqnn.project_(net)
    assert smoke_equivariance_error(net, x) < 1e-5
    assert relative_e_perp(net) < 1e-10


def test_data_penalty_matches_the_library_baseline():
    from equiproj.baselines import sampled_data_penalty

    torch.manual_seed(2)
    net = C4SmokeNet(hidden_fields=1, layers=2, kernel=3)
    x = torch.randn(2, 6, 8, 8, generator=torch.Generator().manual_seed(6))
    G = Cyclic(4)
    rin, rout = G.trivial() + G.trivial() + G.standard() + G.standard(), G.trivial() + G.standard()
    fx = net(x)
    for k in (1, 2, 3):
        ours = smoke.smoke_data_penalty(net, x, fx, k)
        lib = sampled_data_penalty(net, x, G, act_in=lambda g, t: grid.act(t, g, rin),
                                   act_out=lambda g, t: grid.act(t, g, rout), fx=fx, elements=c4_matrix(k)[None])
        assert torch.allclose(ours * fx[0].numel(), lib, rtol=1e-5)


def test_smoke_solver_symmetry_is_broken_only_by_the_wind():
    gen = torch.Generator().manual_seed(0)
    p = SmokeParams(grid=16, wind=0.0)
    data = simulate_smoke(p, 2, 3, gen, warmup=3)
    assert data["states"].shape == (2, 3, 3, 16, 16) and data["states"][:, :, 0].abs().max() > 0
    assert smoke_data_asymmetry(p, data, frames=2) < 1e-10
    p_wind = SmokeParams(grid=16, wind=0.05)
    assert smoke_data_asymmetry(p_wind, data, frames=2) > 1e-2


def test_so2_and_smoke_run_on_tiny_configs(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # figures: see test_figures_are_written
    rows = so2.run(so2.SO2Config.tiny(), seed=0, out=str(tmp_path), log=lambda m: None)["rows"]
    assert len(rows) == 2 * 3  # wedge + one rings set, (lambda_perp 0, 0.1) + strict
    assert all(0 <= r["test_acc"] <= 1 for r in rows)
    assert max(r["inv_err"] for r in rows if r["regime"] == "strict") < 1e-4
    assert "strictly invariant" in (tmp_path / "so2_table.md").read_text()
    res = smoke.run(smoke.SmokeConfig.tiny(), seed=0, out=str(tmp_path), log=lambda m: None)
    regimes = [r["regime"] for r in res["rows"]]
    assert regimes == list(smoke.SmokeConfig.tiny().regimes)
    strict = next(r for r in res["rows"] if r["regime"] == "strict")
    assert strict["equiv_err"] < 1e-5
    assert all(math.isfinite(r["rollout_rmse"]) for r in res["rows"])
    assert (tmp_path / "smoke_results.csv").read_text().count("\n") == len(regimes) + 1


def test_demo_cli_is_deterministic_and_works_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(so2.SO2Config, "demo", classmethod(lambda cls: cls.tiny()))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert demo.main(["--only", "so2", "--seed", "3", "--out", str(tmp_path / "a")]) == 0
    first = capsys.readouterr()
    assert "matplotlib is not installed" in first.err
    assert demo.main(["--only", "so2", "--seed", "3", "--out", str(tmp_path / "b")]) == 0
    second = capsys.readouterr()
    table = lambda s: s.split("Mean training time")[0]  # timings differ between runs  # noqa: E731
    assert "Experiment 1" in first.out and table(first.out) == table(second.out)
    assert not list((tmp_path / "a").glob("*.png"))


def test_figures_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    cfg = so2.SO2Config.tiny()
    so2.run(cfg, seed=0, out=str(tmp_path), log=lambda m: None)
    smoke.run(smoke.SmokeConfig.tiny(), seed=0, out=str(tmp_path), log=lambda m: None)
    for name in ("so2_decision_boundaries.png", "so2_rings_vs_sigma.png", "smoke_rollout.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_decoupled_step_matches_the_copying_implementation(monkeypatch):
    """The fused in-place ``ProjectionPenalty.decay_`` trains the demo's smoke CNN (tiny config) to the same
    weights and rollout as the earlier implementation, which copied every parameter and projected."""
    cfg = smoke.SmokeConfig.tiny()
    gen = torch.Generator().manual_seed(20_000)
    train = smoke.simulate_smoke(cfg.params, cfg.train_traj, cfg.frames, gen)
    test = smoke.simulate_smoke(cfg.params, cfg.test_traj, cfg.horizon + 1, gen)
    sc = smoke.SmokeScales.fit(train)
    X, Y = smoke.smoke_pairs(train, sc)

    @torch.no_grad()
    def copying_decay(self, rate, rate_G=0.0):
        model = self._model
        old = [p.detach().clone() for p in model.parameters()]
        eqnn.project_(model)
        for p, o in zip(model.parameters(), old):
            p.mul_(rate).add_(o, alpha=1.0 - rate)

    results = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(eqnn.ProjectionPenalty, "decay_", copying_decay)
        model, _ = smoke._fit_one(cfg, "decoupled", 0.3, 12, 0, X, Y)
        rmse, _ = smoke.smoke_rollout(model, test, sc, cfg.horizon)
        results.append((torch.cat([p.detach().reshape(-1) for p in model.parameters()]), rmse))
    (w_fused, r_fused), (w_copy, r_copy) = results
    assert float((w_fused - w_copy).abs().max()) <= 1e-5 * float(w_copy.abs().max())
    torch.testing.assert_close(r_fused, r_copy, rtol=1e-4, atol=0)


def test_every_experiment_has_the_shared_shape():
    """One run signature ``run(cfg, seed, out, log, tag)`` and one config base for every experiment."""
    import inspect

    from equiproj.cli.experiments import EXPERIMENTS, ExperimentConfig

    for name, experiment in EXPERIMENTS.items():
        assert issubclass(experiment.config, ExperimentConfig), name
        for preset in ("demo", "full", "tiny"):
            assert isinstance(getattr(experiment.config, preset)(), experiment.config), (name, preset)
        params = list(inspect.signature(experiment.run).parameters)
        assert params == ["cfg", "seed", "out", "log", "tag"], (name, params)
    with pytest.raises(TypeError, match="abstract"):
        ExperimentConfig()
    with pytest.raises(TypeError, match="no data parameters"):
        EXPERIMENTS["so2"].config.tiny().with_params(sigma=1.0)
