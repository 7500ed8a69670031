"""Experiment ``digits``: real handwritten digits (scikit-learn's ``load_digits``, 1797 8x8 images
shipped with the package: no download) under rotations by multiples of 90 degrees drawn from a
non-uniform orientation prior (``upright`` of the digits stay upright, the rest are rotated by 90,
180 or 270 degrees with equal probability), classified by a CNN whose convolutions and head are
declared C4-equivariant (C4-invariant class scores).

The symmetry is only approximate twice over: the orientation prior is not uniform (an upright 9
is more likely than a 6 turned by 180 degrees, which looks like one), and handwriting is not
rotation invariant (a rotated 1 looks like a dash). An invariant classifier cannot tell a 6 from a
9 turned upside down; a non-invariant one can use the prior.

Model (:class:`C4DigitNet`): three 3x3 ``nn.Conv2d`` declared C4-equivariant (trivial input,
``fields`` regular fields hidden: the exact grid action on the kernels), ``PointwiseActivation``
(ReLU on regular fields), a 2x2 max ``GridPool`` (8 -> 4, centred), then the flattened feature
map into an ``nn.Linear`` declared with the fields times the pixels' permutation as its input
representation and 10 trivial fields as output (tutorial, "Heads").

Regimes (:data:`._relaxed.REGIMES`): no penalty; the projection penalty in the loss; the decoupled
step ``W <- W - eta (W - P W)`` (``ProjectionPenalty.decay_``); strictly projected; the data-level
penalty ``lambda ||f(g x) - f(x)||^2`` on the logits (one random non-identity rotation per step,
:func:`equiproj.baselines.sampled_data_penalty`) for the wall-clock time of the projection run;
residual pathways (:mod:`._relaxed`). Every lambda of the grid is trained with every seed; the table
takes, per regime, the lambda with the best mean validation accuracy; the figure shows test
accuracy against lambda.

Metrics: test accuracy (all, upright, rotated), the invariance error (mean over test images of the
max over the three rotations of ``max_c |p_c(g x) - p_c(x)|``, p the softmax), the largest relative
error of :func:`equiproj.nn.check_equivariance` on the logits of a test batch, ``E_perp / ||W||^2`` of
the declared layers (of the merged weights for residual pathways), time per step.

scikit-learn is imported only when the data are loaded (``pip install scikit-learn``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ... import grid as _grid
from ... import nn as eqnn
from ...baselines import sampled_data_penalty
from ...groups import Cyclic
from ._relaxed import REGIMES, merged_copy, relaxed_step, residual_pathway_
from ._config import ExperimentConfig
from ._training import interleaved_step_times, mean_std, pyplot, relative_e_perp, run_steps, seed_all, write_csv

__all__ = ["DigitsParams", "load_digit_images", "rotated_digits", "C4DigitNet", "digits_data_penalty", "train_digits",
           "digits_accuracy", "digits_invariance_error", "DigitsConfig", "run", "format_table",
           "SKLEARN_MISSING"]

SKLEARN_MISSING = "scikit-learn is not installed: pip install scikit-learn (or pip install 'equiproj[experiments]')"


@dataclass
class DigitsParams:
    """The orientation prior: P(upright) = ``upright``; 90, 180 and 270 degrees share the rest."""

    upright: float = 0.7


def load_digit_images() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits as ``images [1797, 1, 8, 8]`` (float32, values 0-1) and ``labels [1797]``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(SKLEARN_MISSING) from e
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0, torch.tensor(d.target, dtype=torch.long)


def rotated_digits(images: torch.Tensor, labels: torch.Tensor, params: DigitsParams, generator: torch.Generator,
                   splits: tuple[int, int, int]) -> dict:
    """A seeded split ``{"train", "val", "test"}`` (sizes ``splits``; the rest unused) of the digits, each
    image turned by ``k`` quarter turns (``torch.rot90``, k drawn from the prior): per split
    ``{"x" [n, 1, 8, 8] standardised, "y" [n], "k" [n]}``. One mean and std over all pixels of the
    training images (scalars: they commute with the rotations)."""
    if not 0.0 <= params.upright <= 1.0:
        raise ValueError(f"upright must be a probability in [0, 1], got {params.upright}")
    if sum(splits) > len(images):
        raise ValueError(f"splits {splits} need {sum(splits)} images; there are {len(images)}")
    order = torch.randperm(len(images), generator=generator)
    prior = torch.tensor([params.upright] + [(1.0 - params.upright) / 3] * 3, dtype=torch.float64)
    k = torch.multinomial(prior, len(images), replacement=True, generator=generator)
    x = torch.stack([torch.rot90(img, int(q), (-2, -1)) for img, q in zip(images, k)])
    out, start = {}, 0
    for name, n in zip(("train", "val", "test"), splits):
        idx = order[start : start + n]
        out[name] = dict(x=x[idx], y=labels[idx], k=k[idx])
        start += n
    mean, std = out["train"]["x"].mean(), out["train"]["x"].std()
    for part in out.values():
        part["x"] = (part["x"] - mean) / std
    return out


class C4DigitNet(nn.Sequential):
    """``[B, 1, 8, 8] -> [B, 10]`` logits: 3x3 convs declared C4-equivariant (``fields`` regular fields),
    ReLU through ``PointwiseActivation``, a centred 2x2 max pool, and a flattened-map ``nn.Linear``
    declared from the fields times the 4x4 pixel permutation to 10 invariant scores."""

    def __init__(self, fields: int = 8):
        G = Cyclic(4)
        image, hidden, classes = G.trivial(), fields * G.regular(), 10 * G.trivial()
        conv = lambda a, b: eqnn.declare(nn.Conv2d(a.dim, b.dim, 3, padding=1), a, b)  # noqa: E731
        super().__init__(
            conv(image, hidden), eqnn.PointwiseActivation(hidden),
            conv(hidden, hidden), eqnn.PointwiseActivation(hidden),
            eqnn.GridPool(hidden, 2, kernel_size=2, stride=2, mode="max"),
            conv(hidden, hidden), eqnn.PointwiseActivation(hidden),
            nn.Flatten(),
            eqnn.declare(nn.Linear(hidden.dim * 16, 10), hidden @ _grid.kernel_rep(G, (4, 4)), classes))


def _rotate(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.rot90(x, k % 4, (-2, -1))


def digits_data_penalty(model: nn.Module, x: torch.Tensor, logits: torch.Tensor, k: int) -> torch.Tensor:
    """``mean_x ||f(g x) - f(x)||^2`` on the logits for the rotation by ``k`` quarter turns:
    :func:`equiproj.baselines.sampled_data_penalty` with that element (one extra forward and backward)."""
    g = torch.linalg.matrix_power(torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64), k % 4)
    return sampled_data_penalty(model, x, Cyclic(4), act_in=lambda g, t: _grid.act(t, g, Cyclic(4).trivial()),
                                act_out=lambda g, t: t, fx=logits, elements=g[None])


def _step_fn(model: nn.Module, regime: str, lam: float, lr: float, generator: torch.Generator):
    def data_penalty(model, x, logits):
        return digits_data_penalty(model, x, logits, int(torch.randint(1, 4, (1,), generator=generator)))

    return relaxed_step(model, regime, lam, lr, F.cross_entropy, data_penalty)


def _make_model(fields: int, regime: str) -> nn.Module:
    model = C4DigitNet(fields)
    return residual_pathway_(model) if regime == "rpp" else model


def train_digits(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, *, regime: str, lam: float, steps: int,
                 batch: int, lr: float, generator: torch.Generator) -> float:
    """Adam on the cross-entropy (+ the regime's penalty) for ``steps`` mini-batches; returns the seconds."""
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {list(REGIMES)}")
    step = _step_fn(model, regime, lam, lr, generator)
    return run_steps(step, model, X, Y, strict=regime in ("strict", "rpp"), steps=steps, batch=batch,
                     generator=generator)


@torch.no_grad()
def digits_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean()) if len(y) else float("nan")


@torch.no_grad()
def digits_invariance_error(model: nn.Module, x: torch.Tensor) -> float:
    """Mean over ``x`` of the max over the three rotations of ``max_c |p_c(g x) - p_c(x)|`` (p: softmax)."""
    p = model(x).softmax(1)
    worst = torch.stack([(model(_rotate(x, k)).softmax(1) - p).abs().amax(1) for k in (1, 2, 3)]).amax(0)
    return float(worst.mean())


@dataclass
class DigitsConfig(ExperimentConfig):
    """Sizes of the digits experiment (``demo()`` / ``full()`` / ``tiny()``)."""

    params: DigitsParams = field(default_factory=DigitsParams)
    n_train: int = 1000
    n_val: int = 297
    n_test: int = 500
    fields: int = 8
    batch: int = 50
    lr: float = 3e-3
    epochs: int = 30
    seeds: int = 3
    # every value with every seed; the table takes the best mean validation accuracy per regime
    grid: dict = field(default_factory=lambda: {"projection": (1e-3, 1e-2, 1e-1, 1.0),
                                                "decoupled": (0.01, 0.05, 0.2, 0.5),
                                                "data_time": (0.1, 1.0, 10.0), "rpp": (1e-3, 1e-2, 1e-1)})
    regimes: tuple = tuple(REGIMES)
    check_batch: int = 64  # test images for check_equivariance

    @classmethod
    def demo(cls) -> "DigitsConfig":
        """One seed, one lambda per regime, 15 epochs."""
        return cls(epochs=15, seeds=1, grid={"projection": (1e-2,), "decoupled": (0.2,), "data_time": (1.0,),
                                             "rpp": (1e-2,)})

    @classmethod
    def full(cls) -> "DigitsConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "DigitsConfig":  # the test suite
        return cls(n_train=60, n_val=30, n_test=40, fields=2, batch=20, epochs=2, seeds=1,
                   grid={"projection": (1e-2, 1e-1), "decoupled": (0.2,), "data_time": (1.0,), "rpp": (1e-2,)},
                   check_batch=8)


def _fit(cfg: DigitsConfig, regime: str, lam: float, steps: int, seed: int, X, Y) -> tuple[nn.Module, float]:
    gen = seed_all(seed)
    model = _make_model(cfg.fields, regime)
    secs = train_digits(model, X, Y, regime=regime, lam=lam, steps=steps, batch=cfg.batch, lr=cfg.lr, generator=gen)
    return model, secs


def _evaluate(model: nn.Module, data: dict, check_batch: int) -> dict:
    test, val = data["test"], data["val"]
    upright = test["k"] == 0
    x_check = test["x"][:check_batch]
    G = Cyclic(4)
    check = eqnn.check_equivariance(model, G.trivial(), 10 * G.trivial(), x_check)
    return dict(val_acc=digits_accuracy(model, val["x"], val["y"]),
                test_acc=digits_accuracy(model, test["x"], test["y"]),
                test_acc_upright=digits_accuracy(model, test["x"][upright], test["y"][upright]),
                test_acc_rotated=digits_accuracy(model, test["x"][~upright], test["y"][~upright]),
                inv_err=digits_invariance_error(model, test["x"]), check_max_rel=float(check.max_rel_error),
                rel_E_perp=relative_e_perp(merged_copy(model)))


def run(cfg: DigitsConfig, seed: int = 0, out: str | None = None, log=print, tag: str = "") -> dict:
    """Run the digits experiment. Returns ``{"rows", "chosen", "info"}`` (one row per regime, lambda and
    seed; ``chosen`` the lambda per regime) and writes ``digits{tag}_results.csv``, ``digits{tag}_table.md``
    and ``digits{tag}_accuracy_vs_lambda.png`` (with matplotlib) to ``out``."""
    t0 = time.perf_counter()
    images, labels = load_digit_images()
    data = rotated_digits(images, labels, cfg.params, torch.Generator().manual_seed(40_000 + seed),
                          (cfg.n_train, cfg.n_val, cfg.n_test))
    X, Y = data["train"]["x"], data["train"]["y"]
    steps_per_epoch = max(1, len(X) // cfg.batch)
    steps = cfg.epochs * steps_per_epoch
    info = dict(upright=cfg.params.upright, n_train=len(X), steps=steps,
                upright_test=float((data["test"]["k"] == 0).float().mean()))
    log(f"  digits: {len(X)}+{cfg.n_val}+{cfg.n_test} images, {100 * info['upright_test']:.0f}% of test images "
        f"upright (prior {cfg.params.upright:g})")

    lams = {r: tuple(cfg.grid.get(r, (0.0,))) for r in cfg.regimes}
    middle = lambda r: lams[r][len(lams[r]) // 2]  # noqa: E731
    gen = torch.Generator().manual_seed(0)
    timed = {r: _make_model(cfg.fields, r) for r in cfg.regimes}
    for r in ("strict", "rpp"):
        if r in timed:
            eqnn.init_equivariant_(timed[r])
    step_fns = {r: _step_fn(m, r, middle(r), cfg.lr, gen) for r, m in timed.items()}
    step_s = interleaved_step_times(step_fns, X, Y, batch=cfg.batch, repeats=20, generator=gen)
    info["step_s"] = step_s
    equal_time_steps = steps
    if "data_time" in step_s and "projection" in step_s:
        equal_time_steps = max(1, round(steps * step_s["projection"] / step_s["data_time"]))
    info["equal_time_steps"] = equal_time_steps
    log("  step time: " + ", ".join(f"{r} {1e3 * s:.1f} ms" for r, s in step_s.items())
        + f" -> {equal_time_steps} data-level steps at equal time (vs {steps})")

    rows = []
    for regime in cfg.regimes:
        n = equal_time_steps if regime == "data_time" else steps
        for lam in lams[regime]:
            for r in range(cfg.seeds):
                model, secs = _fit(cfg, regime, lam, n, 1000 * seed + r, X, Y)
                rows.append(dict(regime=regime, lam=lam, seed=1000 * seed + r, steps=n, train_s=secs,
                                 step_ms=1e3 * secs / n, **_evaluate(model, data, cfg.check_batch)))
            accs = [row["test_acc"] for row in rows if row["regime"] == regime and row["lam"] == lam]
            log(f"  digits {regime} lambda={lam:g}: test accuracy {100 * sum(accs) / len(accs):.1f}%")
    chosen = {}
    for regime in cfg.regimes:
        best = max(lams[regime], key=lambda lam: mean_std([row["val_acc"] for row in rows
                                                           if row["regime"] == regime and row["lam"] == lam])[0])
        chosen[regime] = best
    info["total_s"] = time.perf_counter() - t0
    result = dict(rows=rows, chosen=chosen, info=info)
    if out:
        write_csv(rows, os.path.join(out, f"digits{tag}_results.csv"))
        with open(os.path.join(out, f"digits{tag}_table.md"), "w") as f:
            f.write(format_table(result) + "\n")
        plot_accuracy_vs_lambda(result, os.path.join(out, f"digits{tag}_accuracy_vs_lambda.png"), log)
    return result


def format_table(result: dict) -> str:
    """Markdown: one line per regime at its chosen lambda (mean ± std over seeds), then the step times."""
    rows, info, chosen = result["rows"], result["info"], result["chosen"]
    seeds = len({r["seed"] for r in rows})
    out = [f"Digits (scikit-learn load_digits, 8x8, C4-declared CNN; P(upright) = {info['upright']:g}, "
           f"{100 * info['upright_test']:.0f}% of the test images upright); mean ± std over {seeds} seed(s)\n",
           "| regime | λ (η) | steps | test acc. % | upright % | rotated % | invariance error | check_equivariance "
           "max rel. error | E_perp / ‖W‖² |",
           "|---|---|---|---|---|---|---|---|---|"]
    for regime, lam in chosen.items():
        rs = [r for r in rows if r["regime"] == regime and r["lam"] == lam]

        def ms(key, fmt, scale=1.0):
            m, s = mean_std([scale * r[key] for r in rs])
            return f"{m:{fmt}} ± {s:{fmt}}" if len(rs) > 1 else f"{m:{fmt}}"

        lam_s = f"{lam:g}" if regime not in ("none", "strict") else "–"
        out.append(f"| {REGIMES[regime]} | {lam_s} | {rs[0]['steps']} | {ms('test_acc', '.1f', 100)} | "
                   f"{ms('test_acc_upright', '.1f', 100)} | {ms('test_acc_rotated', '.1f', 100)} | "
                   f"{ms('inv_err', '.2e')} | {ms('check_max_rel', '.1e')} | {ms('rel_E_perp', '.1e')} |")
    out.append("\nTime per step (median, measured interleaved in the same run): " + ", ".join(
        f"{REGIMES[r]} {1e3 * s:.1f} ms" for r, s in info["step_s"].items()) + ".")
    swept = [r for r in chosen if len({row["lam"] for row in rows if row["regime"] == r}) > 1]

    def test_acc(regime, lam):
        return 100 * mean_std([row["test_acc"] for row in rows if row["regime"] == regime and row["lam"] == lam])[0]

    if swept:
        out.append("\nTest accuracy % per λ (mean over seeds; the table's λ has the best validation accuracy): "
                   + "; ".join(f"{REGIMES[r]}: " + ", ".join(
                       f"{lam:g} → {test_acc(r, lam):.1f}"
                       for lam in dict.fromkeys(row["lam"] for row in rows if row["regime"] == r)) for r in swept))
    return "\n".join(out)


def plot_accuracy_vs_lambda(result: dict, path: str, log=print) -> None:
    """Test accuracy (mean ± std over seeds) against lambda for every regime with a lambda; the
    regimes without one as horizontal bands."""
    plt = pyplot(log)
    if plt is None:
        return
    rows = result["rows"]
    curves = {}
    for regime in dict.fromkeys(r["regime"] for r in rows):
        lams = list(dict.fromkeys(r["lam"] for r in rows if r["regime"] == regime))
        stats = [mean_std([100 * r["test_acc"] for r in rows if r["regime"] == regime and r["lam"] == lam])
                 for lam in lams]
        curves[regime] = (lams, [s[0] for s in stats], [s[1] for s in stats])
    top = max(max(m) for _, m, _ in curves.values())
    # a collapsed run (a far too strong penalty) would squash the rest: it is drawn at the bottom edge, labelled
    bottom = max(min(min(m) for _, m, _ in curves.values()), top - 12) - 1
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (regime, (lams, m, sd)) in enumerate(curves.items()):
        if regime in ("none", "strict"):
            line = ax.axhline(m[0], ls="--" if regime == "none" else ":", color="k" if regime == "none" else "C7",
                              label=REGIMES[regime])
            ax.axhspan(m[0] - sd[0], m[0] + sd[0], color=line.get_color(), alpha=0.1)
            continue
        shown = [max(v, bottom + 0.3) for v in m]
        bars = ax.errorbar(lams, shown, yerr=[s if v > bottom else 0 for v, s in zip(m, sd)], marker="o", capsize=3,
                           label=REGIMES[regime], color=f"C{i}")
        for lam, v in zip(lams, m):
            if v <= bottom:
                ax.annotate(f"{v:.1f}", (lam, bottom + 0.3), textcoords="offset points", xytext=(0, 6), ha="center",
                            fontsize=7, color=bars[0].get_color())
    ax.set_ylim(bottom, top + 1)
    ax.set_xscale("log")
    ax.set_xlabel("λ (η for the decoupled step)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"digits, C4 CNN, P(upright) = {result['info']['upright']:g}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"  wrote {path}")
