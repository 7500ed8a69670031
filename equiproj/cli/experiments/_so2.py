"""``equiproj demo``: the paper's experiments at laptop scale, with the projection penalty against
unconstrained, sample-based and strictly equivariant training, on data whose symmetry is imperfect.

Experiment 1, ``so2`` (paper §4.1): 2-D points, an SO(2)-declared classifier whose hidden
features are Fourier coefficients (SO(2) irreps of frequency 0..4) and whose readout is
invariant. Data: the *wedge* set (positives uniform in the unit disk, negatives in the wedge
theta in [-pi/4, pi/4], r in [2.3, 3]) and *wavey rings* (two rings, radii 1.0 and 1.5, both
modulated by 0.5 sigma sin(5 theta)). Grid over lambda_G x lambda_perp, plus a strictly
invariant model (``project`` after every step). Metrics: test accuracy and the invariance
error, the mean over test points of max over 40 random rotations of |p(R x) - p(x)| (p the
predicted probability).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ... import nn as eqnn
from ...groups import SO2, Rep
from ._config import ExperimentConfig
from ._training import mean_std, pyplot, relative_e_perp, seed_all, write_csv

__all__ = ["so2_hidden_rep", "FourierSiLU", "SO2Classifier", "so2_wedge", "so2_wavey_rings", "train_so2", "so2_accuracy",
           "so2_invariance_error", "SO2Config", "run", "format_table"]


def so2_hidden_rep(channels: int, max_freq: int) -> Rep:
    """``channels x (0 + 1 + ... + max_freq)`` of SO(2): per channel, the Fourier coefficients of
    a band-limited signal on the circle."""
    return Rep.parse(SO2(), " + ".join(f"{channels}x{k}" for k in range(max_freq + 1)))


class FourierSiLU(nn.Module):
    """SiLU applied pointwise to band-limited signals on the circle (an SO(2)-equivariant nonlinearity).

    Input/output ``[..., rep.dim]`` in the layout of :func:`so2_hidden_rep`. Channel ``c`` holds the
    coefficients of ``f_c(phi) = a_0 + sum_k a_k cos(k phi) + b_k sin(k phi)``; rotating the
    input points by ``theta`` maps ``f_c`` to ``f_c(. - theta)``, which is how irrep ``k`` acts
    on ``(a_k, b_k)``. The layer samples ``f_c`` at ``samples`` equally spaced angles, applies
    SiLU and returns the coefficients of frequency ``<= max_freq`` of the result (discrete
    Fourier transform). It commutes exactly with rotations by multiples of ``2 pi / samples``;
    for other angles only through aliasing of frequencies ``>= samples - max_freq``, which decay
    exponentially because SiLU is smooth (a ReLU would leave a 1/k^2 tail). Why not a norm
    nonlinearity: it never mixes frequencies, so an invariant readout of a frequency-1 input
    would be constant; sampling on the circle creates the invariants (e.g. the radius).
    """

    def __init__(self, channels: int, max_freq: int, samples: int):
        super().__init__()
        if samples <= 2 * max_freq:
            raise ValueError(f"samples must exceed 2 * max_freq = {2 * max_freq}, got {samples}")
        phi = 2 * math.pi * torch.arange(samples, dtype=torch.float64) / samples
        rows, scale = [torch.ones_like(phi)], [1.0 / samples]
        for k in range(1, max_freq + 1):
            rows += [torch.cos(k * phi), torch.sin(k * phi)]
            scale += [2.0 / samples, 2.0 / samples]
        synthesis = torch.stack(rows)  # [2L+1, S]
        analysis = synthesis.T * torch.tensor(scale, dtype=torch.float64)  # [S, 2L+1]
        C, L = channels, max_freq
        index = torch.empty(C, 2 * L + 1, dtype=torch.long)  # (channel, coefficient) -> coordinate
        for c in range(C):
            index[c, 0] = c
            for k in range(1, L + 1):
                index[c, 2 * k - 1] = C + (k - 1) * 2 * C + 2 * c
                index[c, 2 * k] = C + (k - 1) * 2 * C + 2 * c + 1
        self.register_buffer("synthesis", synthesis.float())
        self.register_buffer("analysis", analysis.float())
        self.register_buffer("index", index.reshape(-1))
        self.register_buffer("inverse", torch.argsort(index.reshape(-1)))
        self.channels, self.max_freq, self.samples = C, L, samples

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        coeffs = h[..., self.index].unflatten(-1, (self.channels, 2 * self.max_freq + 1))
        out = F.silu(coeffs @ self.synthesis) @ self.analysis
        return out.flatten(-2)[..., self.inverse]


class SO2Classifier(nn.Module):
    """``x [..., 2] -> logit [...]``: Linear(std -> H), FourierSiLU, Linear(H -> H), FourierSiLU,
    Linear(H -> trivial), with ``H = channels x (0..max_freq)``. Plain ``nn.Linear`` layers with
    SO(2) declarations (:func:`equiproj.nn.declare`): equivariant only as far as training makes them."""

    def __init__(self, channels: int = 4, max_freq: int = 4, samples: int = 32):
        super().__init__()
        G = SO2()
        H = so2_hidden_rep(channels, max_freq)
        self.lin1, self.lin2, self.readout = nn.Linear(2, H.dim), nn.Linear(H.dim, H.dim), nn.Linear(H.dim, 1)
        self.act = FourierSiLU(channels, max_freq, samples)
        eqnn.declare(self.lin1, G.standard(), H)
        eqnn.declare(self.lin2, H, H)
        eqnn.declare(self.readout, H, G.trivial())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.act(self.lin2(self.act(self.lin1(x))))).squeeze(-1)


def _polar(r: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], -1).float()


def so2_wedge(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, 2], y [n])``: half positives (y = 1) uniform in the unit disk, half negatives in
    the wedge ``theta in [-pi/4, pi/4]``, ``r in [2.3, 3.0]`` (r uniform)."""
    n_pos = n // 2
    u = torch.rand(4, n, dtype=torch.float64, generator=generator)
    pos = _polar(u[0, :n_pos].sqrt(), 2 * math.pi * u[1, :n_pos])
    neg = _polar(2.3 + 0.7 * u[2, n_pos:], (u[3, n_pos:] - 0.5) * math.pi / 2)
    return torch.cat([pos, neg]), torch.cat([torch.ones(n_pos), torch.zeros(n - n_pos)])


def so2_wavey_rings(n: int, sigma: float, generator: torch.Generator, noise: float = 0.05
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, 2], y [n])``: inner ring (y = 1) radius ``1.0``, outer ring (y = 0) radius ``1.5``,
    both modulated by ``0.5 sigma sin(5 theta)`` plus Gaussian radial noise. For ``sigma > 0.5``
    the rings' radial ranges overlap: no invariant classifier separates them."""
    n_in = n // 2
    theta = 2 * math.pi * torch.rand(n, dtype=torch.float64, generator=generator)
    base = torch.cat([torch.full((n_in,), 1.0), torch.full((n - n_in,), 1.5)]).double()
    r = base + 0.5 * sigma * torch.sin(5 * theta) + noise * torch.randn(n, dtype=torch.float64, generator=generator)
    return _polar(r, theta), torch.cat([torch.ones(n_in), torch.zeros(n - n_in)])


def _rotations(theta: torch.Tensor) -> torch.Tensor:
    c, s = torch.cos(theta), torch.sin(theta)
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def train_so2(model: SO2Classifier, x: torch.Tensor, y: torch.Tensor, *, lambda_perp: float, lambda_G: float,
              steps: int, lr: float, strict: bool = False) -> float:
    """Full-batch Adam on BCE + ``lambda_perp sum E_perp + lambda_G sum E_G``; ``strict``: project
    every declared layer after every step. Returns the training time in seconds."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    penalty = eqnn.ProjectionPenalty(model, lambda_perp, lambda_G) if (lambda_perp or lambda_G) else None
    t0 = time.perf_counter()
    if strict:
        eqnn.project_(model)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        if penalty is not None:
            loss = loss + penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if strict:
            eqnn.project_(model)
    return time.perf_counter() - t0


@torch.no_grad()
def so2_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((model(x) > 0).float() == y).float().mean())


@torch.no_grad()
def so2_invariance_error(model: nn.Module, x: torch.Tensor, generator: torch.Generator, rotations: int = 40) -> float:
    """Mean over the points of ``max over `rotations` random R of |p(R x) - p(x)|``, p = sigmoid(logit)."""
    R = _rotations(2 * math.pi * torch.rand(rotations, dtype=torch.float64, generator=generator)).float()
    p0 = torch.sigmoid(model(x))
    p = torch.sigmoid(model(torch.einsum("rij,nj->rni", R, x)))
    return float((p - p0).abs().amax(0).mean())


@dataclass
class SO2Config(ExperimentConfig):
    """Sizes of experiment 1 (``demo()`` / ``full()``)."""

    n_train: int = 1000
    n_test: int = 2000
    steps: int = 600
    lr: float = 1e-2
    channels: int = 4
    max_freq: int = 4
    samples: int = 32
    lambdas_G: tuple = (0.0, 1e-3, 1e-2, 1e-1)
    lambdas_perp: tuple = (0.0, 1e-3, 1e-2, 1e-1)
    sigmas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    seeds: int = 1
    boundary_sigma: float = 1.0  # wavey-rings set shown in the decision-boundary figure

    @classmethod
    def demo(cls) -> "SO2Config":
        return cls(n_train=500, n_test=1000, steps=250, lambdas_G=(0.0, 1e-2), lambdas_perp=(0.0, 1e-1),
                   sigmas=(0.0, 0.5, 1.0))

    @classmethod
    def full(cls) -> "SO2Config":
        return cls(steps=500, seeds=3)

    @classmethod
    def tiny(cls) -> "SO2Config":  # the test suite
        return cls(n_train=64, n_test=64, steps=5, lambdas_G=(0.0,), lambdas_perp=(0.0, 1e-1),
                   sigmas=(1.0,))


def run(cfg: SO2Config, seed: int = 0, out: str | None = None, log=print, tag: str = "") -> dict:
    """Run experiment 1; returns ``{"rows": [...]}``, one row per (dataset, regime, seed), and writes
    ``so2{tag}_results.csv``, ``so2{tag}_table.md`` and the PNGs to ``out``."""
    datasets = [("wedge", None)] + [("rings", s) for s in cfg.sigmas]
    rows, boundary_models = [], {}
    warm = SO2Classifier(cfg.channels, cfg.max_freq, cfg.samples)  # one-time costs out of the timings
    train_so2(warm, torch.zeros(4, 2), torch.zeros(4), lambda_perp=1.0, lambda_G=1.0, steps=2, lr=cfg.lr, strict=True)
    strong = max(cfg.lambdas_perp)
    for di, (name, sigma) in enumerate(datasets):
        data_gen = torch.Generator().manual_seed(10_000 * seed + di)
        make = (lambda n: so2_wedge(n, data_gen)) if sigma is None else (lambda n: so2_wavey_rings(n, sigma, data_gen))
        x_tr, y_tr = make(cfg.n_train)
        x_te, y_te = make(cfg.n_test)
        label = name if sigma is None else f"rings s={sigma:g}"
        regimes = [(lg, lp, False) for lg in cfg.lambdas_G for lp in cfg.lambdas_perp] + [(0.0, 0.0, True)]
        for r in range(cfg.seeds):
            for lg, lp, strict in regimes:
                seed_all(1000 * seed + r)
                model = SO2Classifier(cfg.channels, cfg.max_freq, cfg.samples)
                secs = train_so2(model, x_tr, y_tr, lambda_perp=lp, lambda_G=lg, steps=cfg.steps, lr=cfg.lr,
                                 strict=strict)
                rot_gen = torch.Generator().manual_seed(seed + 7)
                row = dict(dataset=label, sigma="" if sigma is None else sigma, regime="strict" if strict else "penalty",
                           lambda_G=lg, lambda_perp=lp, seed=1000 * seed + r,
                           test_acc=so2_accuracy(model, x_te, y_te),
                           inv_err=so2_invariance_error(model, x_te, rot_gen),
                           rel_E_perp=relative_e_perp(model), train_s=secs)
                rows.append(row)
                if r == 0 and (sigma is None or sigma == cfg.boundary_sigma):
                    if strict or (lg == 0 and lp in (0.0, strong)):
                        key = "strict" if strict else ("unconstrained" if lp == 0 else f"lambda_perp={lp:g}")
                        boundary_models[(label, key)] = (model, x_te, y_te)
        log(f"  so2 {label}: {len(regimes) * cfg.seeds} runs done")
    if out:
        write_csv(rows, os.path.join(out, f"so2{tag}_results.csv"))
        with open(os.path.join(out, f"so2{tag}_table.md"), "w") as f:
            f.write(format_table({"rows": rows}) + "\n")
        plot_so2(rows, boundary_models, out, log, tag)
    return {"rows": rows}


def format_table(result: dict) -> str:
    """One markdown grid per data set: rows lambda_G, columns lambda_perp, cells
    ``test accuracy % / invariance error`` (mean over seeds), plus the strictly invariant model."""
    rows = result["rows"]
    out = ["Experiment 1 (SO(2) toy): test accuracy % / invariance error "
           "(mean over test points of max over 40 rotations of |p(Rx) - p(x)|), mean over seeds"]
    for label in dict.fromkeys(r["dataset"] for r in rows):
        sub = [r for r in rows if r["dataset"] == label]
        lgs = sorted({r["lambda_G"] for r in sub if r["regime"] == "penalty"})
        lps = sorted({r["lambda_perp"] for r in sub if r["regime"] == "penalty"})

        def cell(rs):
            acc, acc_sd = mean_std([100 * r["test_acc"] for r in rs])
            inv, _ = mean_std([r["inv_err"] for r in rs])
            return f"{acc:.1f}" + (f"±{acc_sd:.1f}" if len(rs) > 1 else "") + f" / {inv:.2g}"

        out.append(f"\n**{label}**\n")
        out.append("| λ_G \\ λ_perp | " + " | ".join(f"{lp:g}" for lp in lps) + " |")
        out.append("|---" * (len(lps) + 1) + "|")
        for lg in lgs:
            cells = [cell([r for r in sub if r["regime"] == "penalty" and r["lambda_G"] == lg and r["lambda_perp"] == lp])
                     for lp in lps]
            out.append(f"| {lg:g} | " + " | ".join(cells) + " |")
        strict = [r for r in sub if r["regime"] == "strict"]
        if strict:
            out.append(f"| strictly invariant | {cell(strict)} |" + " |" * (len(lps) - 1))
    kinds = {"no penalty": [r for r in rows if r["regime"] == "penalty" and not (r["lambda_perp"] or r["lambda_G"])],
             "projection penalty": [r for r in rows if r["regime"] == "penalty" and (r["lambda_perp"] or r["lambda_G"])],
             "strictly invariant (project_ every step)": [r for r in rows if r["regime"] == "strict"]}
    out.append("\nMean training time per run: " + ", ".join(
        f"{k} {mean_std([r['train_s'] for r in rs])[0]:.1f} s" for k, rs in kinds.items() if rs))
    return "\n".join(out)


@torch.no_grad()
def plot_so2(rows: list[dict], models: dict, out: str, log=print, tag: str = "") -> None:
    plt = pyplot(log)
    if plt is None:
        return
    labels = list(dict.fromkeys(k[0] for k in models))
    keys = list(dict.fromkeys(k[1] for k in models))
    fig, axes = plt.subplots(len(labels), len(keys), figsize=(3.2 * len(keys), 3.2 * len(labels)), squeeze=False)
    lim = 3.2
    g = torch.linspace(-lim, lim, 161)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1)
    for i, label in enumerate(labels):
        for j, key in enumerate(keys):
            ax = axes[i][j]
            model, x, y = models[(label, key)]
            p = torch.sigmoid(model(grid.reshape(-1, 2))).reshape(grid.shape[:2])
            ax.contourf(g, g, p, levels=[0, 0.5, 1], colors=["#f4c7c3", "#c6dbef"])
            ax.contour(g, g, p, levels=[0.5], colors="k", linewidths=1)
            sub = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:400]  # both classes
            ax.scatter(x[sub, 0], x[sub, 1], c=["#1f77b4" if v else "#d62728" for v in y[sub]], s=3)
            acc = so2_accuracy(model, x, y)
            ax.set_title(f"{label}: {key}\nacc {100 * acc:.1f}%", fontsize=9)
            ax.set_aspect("equal")
            ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    path = os.path.join(out, f"so2{tag}_decision_boundaries.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)

    rings = [r for r in rows if r["dataset"].startswith("rings") and r["lambda_G"] == 0]
    if rings:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
        series = sorted({(r["regime"], r["lambda_perp"]) for r in rings})
        for regime, lp in series:
            rs = [r for r in rings if r["regime"] == regime and r["lambda_perp"] == lp]
            sig = sorted({r["sigma"] for r in rs})
            acc = [mean_std([100 * r["test_acc"] for r in rs if r["sigma"] == s])[0] for s in sig]
            inv = [mean_std([r["inv_err"] for r in rs if r["sigma"] == s])[0] for s in sig]
            name = "strictly invariant" if regime == "strict" else f"λ_perp={lp:g}"
            a1.plot(sig, acc, "o-", label=name)
            a2.semilogy(sig, [max(v, 1e-8) for v in inv], "o-", label=name)
        a1.set_xlabel("σ (symmetry breaking)"), a1.set_ylabel("test accuracy %"), a1.legend(fontsize=7)
        a2.set_xlabel("σ"), a2.set_ylabel("invariance error")
        fig.suptitle("wavey rings, λ_G = 0", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"so2{tag}_rings_vs_sigma.png"), dpi=110)
        plt.close(fig)
    log(f"  wrote {path} and so2{tag}_rings_vs_sigma.png")
