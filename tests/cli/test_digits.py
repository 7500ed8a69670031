"""The digits experiment (equiproj/cli/experiments/_digits.py): the data (scikit-learn's load_digits), the C4 CNN,
the data-level penalty, a tiny run of every regime, and ``equiproj demo --only digits``."""

import importlib.util
import sys

import pytest
import torch

import equiproj.nn as eqnn
from equiproj import Cyclic, grid
from equiproj.baselines import sampled_data_penalty
from equiproj.cli import _demo as demo
from equiproj.cli.experiments import _digits as digits
from equiproj.cli.experiments._relaxed import REGIMES
from equiproj.cli.experiments._training import relative_e_perp

needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="scikit-learn is not installed")


def test_projected_digit_net_is_invariant_and_the_plain_one_is_not(seed, gen):
    torch.manual_seed(seed)
    model = digits.C4DigitNet(fields=2)
    x = torch.randn(6, 1, 8, 8, generator=gen)
    G = Cyclic(4)
    assert [d.case for _, _, d in eqnn.declared_layers(model)] == ["grid", "grid", "grid", "linear"]
    assert eqnn.check_equivariance(model, G.trivial(), 10 * G.trivial(), x).max_rel_error > 1e-2
    assert digits.digits_invariance_error(model, x) > 1e-4
    eqnn.project_(model)
    assert relative_e_perp(model) < 1e-12
    assert eqnn.check_equivariance(model, G.trivial(), 10 * G.trivial(), x).max_rel_error < 1e-5
    assert digits.digits_invariance_error(model, x) < 1e-6


def test_data_penalty_is_the_mean_squared_change_of_the_logits(seed, gen):
    torch.manual_seed(seed)
    model = digits.C4DigitNet(fields=1)
    x = torch.randn(4, 1, 8, 8, generator=gen)
    fx = model(x)
    for k in (1, 2, 3):
        direct = (model(torch.rot90(x, k, (-2, -1))) - fx).square().sum(1).mean()
        torch.testing.assert_close(digits.digits_data_penalty(model, x, fx, k), direct, rtol=1e-5, atol=1e-7)
    # the rotation by one quarter turn is the group element the library's grid action calls k = 1
    g = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(grid.act(x, g, Cyclic(4).trivial()), torch.rot90(x, 1, (-2, -1)))
    lib = sampled_data_penalty(model, x, Cyclic(4), act_in=lambda g, t: grid.act(t, g, Cyclic(4).trivial()),
                               act_out=lambda g, t: t, fx=fx, elements=g[None])
    torch.testing.assert_close(digits.digits_data_penalty(model, x, fx, 1), lib)


@needs_sklearn
def test_rotated_digits_follow_the_orientation_prior():
    images, labels = digits.load_digit_images()
    assert images.shape == (1797, 1, 8, 8) and float(images.max()) == 1.0 and set(labels.tolist()) == set(range(10))
    params = digits.DigitsParams(upright=0.7)
    data = digits.rotated_digits(images, labels, params, torch.Generator().manual_seed(1), (1000, 297, 500))
    again = digits.rotated_digits(images, labels, params, torch.Generator().manual_seed(1), (1000, 297, 500))
    assert [len(data[s]["y"]) for s in ("train", "val", "test")] == [1000, 297, 500]
    assert torch.equal(data["test"]["x"], again["test"]["x"])
    k = torch.cat([data[s]["k"] for s in data])
    freq = torch.bincount(k, minlength=4).double() / len(k)
    # 1797 draws: the binomial std of each frequency is below 0.011
    assert abs(float(freq[0]) - 0.7) < 0.05 and all(abs(float(f) - 0.1) < 0.04 for f in freq[1:])
    # each image is one of the originals turned by k quarter turns (standardised by scalars)
    x, y, q = data["train"]["x"][:20], data["train"]["y"][:20], data["train"]["k"][:20]
    back = torch.stack([torch.rot90(img, -int(r), (-2, -1)) for img, r in zip(x, q)])
    flat = (images - images.mean()).flatten(1)
    for b, label in zip(back, y):
        b = b.flatten()
        match = torch.nn.functional.cosine_similarity(flat - flat.mean(1, keepdim=True), (b - b.mean())[None], dim=1)
        assert float(match.max()) > 1 - 1e-5 and int(labels[match.argmax()]) == int(label)
    with pytest.raises(ValueError, match="probability"):
        digits.rotated_digits(images, labels, digits.DigitsParams(upright=1.5), torch.Generator(), (10, 10, 10))
    with pytest.raises(ValueError, match="splits"):
        digits.rotated_digits(images, labels, params, torch.Generator(), (1000, 1000, 1000))


@needs_sklearn
def test_digits_run_on_the_tiny_config(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # figures: test_digits_figure_is_written
    cfg = digits.DigitsConfig.tiny()
    res = digits.run(cfg, seed=0, out=str(tmp_path), log=lambda m: None)
    n_fits = sum(len(cfg.grid.get(r, (0.0,))) for r in cfg.regimes) * cfg.seeds
    assert len(res["rows"]) == n_fits and set(res["chosen"]) == set(REGIMES)
    strict = next(r for r in res["rows"] if r["regime"] == "strict")
    assert strict["inv_err"] < 1e-5 and strict["check_max_rel"] < 1e-5 and strict["rel_E_perp"] < 1e-12
    assert all(0 <= r["test_acc"] <= 1 for r in res["rows"])
    table = (tmp_path / "digits_table.md").read_text()
    assert all(name in table for name in REGIMES.values()) and "Time per step" in table
    assert (tmp_path / "digits_results.csv").read_text().count("\n") == n_fits + 1
    assert not list(tmp_path.glob("*.png"))


@needs_sklearn
def test_digits_figure_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    digits.run(digits.DigitsConfig.tiny(), seed=0, out=str(tmp_path), log=lambda m: None)
    assert (tmp_path / "digits_accuracy_vs_lambda.png").stat().st_size > 1000


@needs_sklearn
def test_demo_only_digits(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(digits.DigitsConfig, "demo", classmethod(lambda cls: cls.tiny()))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert demo.main(["--only", "digits", "--out", str(tmp_path), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "Digits (scikit-learn load_digits" in out and "residual pathway" in out


def test_demo_without_scikit_learn_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    for name in ("sklearn", "sklearn.datasets"):
        monkeypatch.setitem(sys.modules, name, None)  # find_spec -> None, import -> ImportError
    assert demo.main(["--only", "digits", "--out", str(tmp_path)]) == 0
    assert "scikit-learn is not installed: pip install scikit-learn" in capsys.readouterr().out
    with pytest.raises(ImportError, match="scikit-learn is not installed"):
        digits.load_digit_images()
    assert "digits" not in demo.DEFAULT_EXPERIMENTS
