"""Experiment 3 (O(3) voxel shapes): the data generator, the exact cube invariance of the projected
model, the pieces it relies on (gate, data-level penalty, rendering vs grid action), and a tiny
end-to-end run through ``run`` and ``equiproj demo --only voxels``."""

import math

import pytest
import torch

import equiproj.nn as eqnn
from equiproj import O3, grid
from equiproj.cli import _demo as demo
from equiproj.cli.experiments import _voxels as dv
from equiproj.cli.experiments._voxels import (VOXEL_REGIMES, O3VoxelNet, VoxelConfig, VoxelParams, cube_invariance_error,
                                  cube_symmetries, format_table, render_shapes, run,
                                  smooth_invariance_error, voxel_data_penalty, voxel_shapes)


def _shapes(n, seed, **kw):
    return voxel_shapes(n, VoxelParams(**kw), torch.Generator().manual_seed(seed))


def test_generator_is_deterministic_and_balanced():
    a, b, c = _shapes(40, 3), _shapes(40, 3), _shapes(40, 4)
    for key in ("x", "y", "cls", "centres", "noise"):
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["x"], c["x"])
    assert a["x"].shape == (40, 1, 12, 12, 12) and a["x"].dtype == torch.float32
    assert torch.bincount(a["cls"], minlength=4).tolist() == [10, 10, 10, 10]
    # shapes are centred in the grid: the outer voxel layer carries little mass (3.5% measured;
    # a shape off-centre by a few voxels would put far more there)
    clean = render_shapes(a, 12)
    border = clean.clone()
    border[..., 1:-1, 1:-1, 1:-1] = 0
    assert float(border.sum() / clean.sum()) < 0.05


def test_labels_are_orientation_independent_without_breaking():
    d = _shapes(400, 5, breaking=0.0)
    assert torch.equal(d["y"], d["cls"])
    # with breaking = 1 exactly the near-vertical sticks and rings swap their label
    d = _shapes(2000, 5, breaking=1.0, cone_deg=35.0)
    vertical = d["axis"][:, 2].abs() >= math.cos(math.radians(35.0))
    expected = torch.where((d["cls"] <= 1) & vertical, 1 - d["cls"], d["cls"])
    assert torch.equal(d["y"], expected)
    # the axes are Haar-distributed: P(|a_z| >= cos 35°) = 1 - cos 35°, for half of the shapes
    frac = float((d["y"] != d["cls"]).float().mean())
    assert abs(frac - 0.5 * (1 - math.cos(math.radians(35.0)))) < 0.025


def test_rendering_a_rotated_shape_is_the_grid_action():
    d = _shapes(6, 7)
    base = render_shapes(d, 12)
    for g in cube_symmetries()[::5]:
        torch.testing.assert_close(render_shapes(d, 12, g), grid.act(base, g), atol=1e-12, rtol=0)
    # a generic rotation is no voxel permutation but keeps the mass (bumps well inside the grid)
    R = O3().sample(1, generator=torch.Generator().manual_seed(0))[0]
    rotated = render_shapes(d, 12, R)
    assert not torch.allclose(rotated, base, atol=1e-3)
    assert torch.allclose(rotated.sum((1, 2, 3, 4)), base.sum((1, 2, 3, 4)), rtol=0.03)


def test_gate_is_equivariant_for_any_rotation():
    G = O3()
    scalars, dims = 3, [3, 3, 5]  # 3 scalars, then 3 gates, then 2 vectors and one l = 2 field
    gated_rep = (scalars + len(dims)) * G.trivial() + 2 * G.irrep("1o") + G.irrep("2e")
    out_rep = scalars * G.trivial() + 2 * G.irrep("1o") + G.irrep("2e")
    gate = eqnn.Gate(scalars * G.trivial(), len(dims) * G.trivial(), 2 * G.irrep("1o") + G.irrep("2e")).double()
    h = torch.randn(2, gated_rep.dim, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = G.sample(1, generator=torch.Generator().manual_seed(2))[0]
    Din, Dout = gated_rep.matrix(g), out_rep.matrix(g)
    lhs = gate(torch.einsum("ab,nbxyz->naxyz", Din, h))
    rhs = torch.einsum("ab,nbxyz->naxyz", Dout, gate(h))
    torch.testing.assert_close(lhs, rhs, atol=1e-12, rtol=0)


def test_projected_model_is_invariant_under_the_48_cube_symmetries():
    torch.manual_seed(0)
    model = O3VoxelNet(scalars=3, vectors=2, tensors=1, out_scalars=4).double()
    x = _shapes(3, 9)["x"].double()
    elements = cube_symmetries()
    assert len(elements) == 48

    def worst(m):  # largest change of the pooled invariants, relative to their spread over inputs
        with torch.no_grad():
            f0 = m.features(x)
            spread = float((f0 - f0.mean(0)).abs().max())
            return max(float((m.features(grid.act(x, g)) - f0).abs().max()) for g in elements) / spread

    assert worst(model) > 1e-3  # a random init is far from invariant
    eqnn.project_(model)
    assert worst(model) < 1e-12
    # a projected model has no data-level penalty either; an unprojected one has
    g = elements[7]
    assert float(voxel_data_penalty(model, x, model(x), g).detach()) < 1e-20


def test_data_penalty_is_the_logit_defect():
    torch.manual_seed(1)
    model = O3VoxelNet(scalars=2, vectors=1, tensors=1, out_scalars=3)
    x = _shapes(4, 11)["x"]
    g = cube_symmetries()[13]
    fx = model(x)
    ref = (model(grid.act(x, g)) - fx).square().sum(1).mean()
    val = voxel_data_penalty(model, x, fx, g)
    assert float(val.detach()) > 0
    torch.testing.assert_close(val, ref, rtol=1e-6, atol=0)


def test_invariance_errors_separate_projected_and_unprojected_models():
    torch.manual_seed(2)
    net = O3VoxelNet(scalars=2, vectors=1, tensors=1, out_scalars=3)
    d = _shapes(8, 13)
    with torch.no_grad():
        f0 = net.features(d["x"])
        mu, sd = f0.mean(0), f0.std(0)

    class Standardised(torch.nn.Module):  # a confident classifier on standardised invariants: probabilities move
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return 3 * (self.net.features(x) - mu) / sd

    model = Standardised()
    before_cube = cube_invariance_error(model, d["x"])
    before_smooth = smooth_invariance_error(model, d, 12, torch.Generator().manual_seed(0), rotations=3)
    eqnn.project_(model)
    after_cube = cube_invariance_error(model, d["x"])
    after_smooth = smooth_invariance_error(model, d, 12, torch.Generator().manual_seed(0), rotations=3)
    assert before_cube > 1e-2 and after_cube < 1e-5
    assert after_smooth < before_smooth


def test_tiny_run_has_every_regime_and_column(tmp_path):
    cfg = VoxelConfig.tiny()
    result = run(cfg, seed=0, out=str(tmp_path), log=lambda m: None)
    rows = result["rows"]
    assert [r["regime"] for r in rows] == list(cfg.regimes)
    assert set(cfg.regimes) >= {"none", "projection", "data_time", "strict"}
    for r in rows:
        for key in ("test_acc", "cube_inv_err", "smooth_inv_err", "rel_E_perp", "epoch_s", "steps"):
            assert math.isfinite(r[key]), (r["regime"], key)
    by = {r["regime"]: r for r in rows}
    assert by["strict"]["rel_E_perp"] < 1e-10 and by["strict"]["cube_inv_err"] < 1e-5
    assert by["none"]["rel_E_perp"] > 0.1
    steps = cfg.epochs * (cfg.n_train // cfg.batch)
    assert by["none"]["steps"] == steps and 1 <= by["data_time"]["steps"] <= steps
    table = format_table(result)
    for regime in cfg.regimes:
        assert VOXEL_REGIMES[regime] in table
    for column in ("test acc.", "invariance error, cube", "invariance error, smooth", "time/epoch", "E_perp"):
        assert column in table
    for name in ("voxels_results.csv", "voxels_table.md"):
        assert (tmp_path / name).exists()
    # seeded: a second run gives the same numbers (timings and the equal-time step count aside)
    again = run(cfg, seed=0, out=None, log=lambda m: None)["rows"]
    for r, s in zip(rows, again):
        if r["regime"] != "data_time":
            for key in ("test_acc", "cube_inv_err", "smooth_inv_err", "rel_E_perp"):
                assert r[key] == s[key], (r["regime"], key)


def test_demo_only_voxels_dispatch(tmp_path, monkeypatch, capsys):

    monkeypatch.setattr(dv.VoxelConfig, "demo", classmethod(lambda cls: cls.tiny()))
    assert demo.main(["--only", "voxels", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Experiment 3" in out and "strictly projected" in out
    assert (tmp_path / "command_voxels.txt").read_text().startswith("equiproj demo --seed 0 --only voxels")
    with pytest.raises(SystemExit):
        demo.main(["--only", "cubes"])
