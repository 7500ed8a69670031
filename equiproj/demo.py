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

Experiment 2, ``smoke``: a smoke-plume solver written here (Boussinesq advection-diffusion of
a density driven by buoyancy along a per-trajectory direction g, periodic grid, semi-Lagrangian
advection, spectral diffusion and pressure projection, float64), exactly C4-equivariant except
for a fixed wind (strength ``wind``) that the model does not see. A CNN whose convolutions are
declared C4-equivariant (exact 90-degree grid action on the kernels) maps (density, source,
velocity, g) to the next frame. Regimes: no penalty; the projection penalty; the data-level
sample-based penalty E_g ||f(g x) - g f(x)||^2 (one random rotation per step: one extra forward
and backward pass) at equal wall-clock time, and at equal steps; strictly projected; and the
same projection energy applied as a decoupled step ``W <- W - eta (W - P W)`` after each Adam
step (``shrink_noneq_``, like AdamW's weight decay). Metrics:
rollout RMSE on held-out trajectories, equivariance error, time per epoch, mean +- std over
seeds.

Experiment 3, ``voxels``: O(3)-declared 3-D CNN on voxel shapes whose label depends weakly on
orientation; the same regimes (:mod:`equiproj.demo_voxels`).

Run::

    equiproj demo [--full] [--seed N] [--out DIR] [--only so2|smoke|voxels]
    python -m equiproj.demo [same options]

Everything is seeded (data, initialisation, batches, rotations). One number depends on the
machine: the step count of the "equal wall-clock" sample-based run, computed from the step
times of the two penalties measured in the same run (printed with the table). The PNGs need
matplotlib (``pip install matplotlib``); without it the tables and CSVs are still written.

The models are plain ``nn.Linear`` / ``nn.Conv2d`` stacks with symmetry declarations
(:func:`equiproj.nn.declare`); the penalty is :class:`equiproj.nn.ProjectionPenalty`, the strict
regime :func:`equiproj.nn.project_` after every optimiser step.
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from . import nn as eqnn
from .groups import SO2, Cyclic
from .rep import Rep

__all__ = [
    "so2_hidden_rep", "FourierSiLU", "SO2Classifier", "so2_wedge", "so2_wavey_rings", "train_so2", "so2_accuracy",
    "so2_invariance_error", "SO2Config", "run_so2",
    "SmokeParams", "SmokeSolver", "simulate_smoke", "rotate_fields", "c4_matrix", "C4SmokeNet", "SmokeScales",
    "smoke_pairs", "smoke_data_penalty", "shrink_noneq_", "project_init_", "regime_step", "run_steps",
    "interleaved_step_times", "train_smoke", "smoke_rollout", "smoke_equivariance_error", "smoke_data_asymmetry", "SmokeConfig",
    "run_smoke", "format_so2_table", "format_smoke_table",
    "validation_sweep", "EXPERIMENTS", "script_main", "add_arguments", "run", "main",
]


@torch.no_grad()
def relative_noneq_energy(model: nn.Module) -> float:
    """``sum E_perp / sum ||W||^2`` over the declared layers (biases included)."""
    e_perp, e_g = eqnn.ProjectionPenalty(model, 1.0).energies()
    return float(e_perp.sum() / (e_perp.sum() + e_g.sum()))


def _seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)  # layer initialisation uses the global generator
    return torch.Generator().manual_seed(seed)


# =============================================================================================
# Experiment 1: SO(2) invariance toy
# =============================================================================================

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
class SO2Config:
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


def run_so2(cfg: SO2Config, seed: int = 0, out: str | None = None, log=print) -> list[dict]:
    """Run experiment 1; returns one row per (dataset, regime, seed); writes CSV/markdown/PNG to ``out``."""
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
                _seed_all(1000 * seed + r)
                model = SO2Classifier(cfg.channels, cfg.max_freq, cfg.samples)
                secs = train_so2(model, x_tr, y_tr, lambda_perp=lp, lambda_G=lg, steps=cfg.steps, lr=cfg.lr,
                                 strict=strict)
                rot_gen = torch.Generator().manual_seed(seed + 7)
                row = dict(dataset=label, sigma="" if sigma is None else sigma, regime="strict" if strict else "penalty",
                           lambda_G=lg, lambda_perp=lp, seed=1000 * seed + r,
                           test_acc=so2_accuracy(model, x_te, y_te),
                           inv_err=so2_invariance_error(model, x_te, rot_gen),
                           rel_E_perp=relative_noneq_energy(model), train_s=secs)
                rows.append(row)
                if r == 0 and (sigma is None or sigma == cfg.boundary_sigma):
                    if strict or (lg == 0 and lp in (0.0, strong)):
                        key = "strict" if strict else ("unconstrained" if lp == 0 else f"lambda_perp={lp:g}")
                        boundary_models[(label, key)] = (model, x_te, y_te)
        log(f"  so2 {label}: {len(regimes) * cfg.seeds} runs done")
    if out:
        _write_csv(rows, os.path.join(out, "so2_results.csv"))
        with open(os.path.join(out, "so2_table.md"), "w") as f:
            f.write(format_so2_table(rows) + "\n")
        plot_so2(rows, boundary_models, out, log)
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def format_so2_table(rows: list[dict]) -> str:
    """One markdown grid per data set: rows lambda_G, columns lambda_perp, cells
    ``test accuracy % / invariance error`` (mean over seeds), plus the strictly invariant model."""
    out = ["Experiment 1 (SO(2) toy): test accuracy % / invariance error "
           "(mean over test points of max over 40 rotations of |p(Rx) - p(x)|), mean over seeds"]
    for label in dict.fromkeys(r["dataset"] for r in rows):
        sub = [r for r in rows if r["dataset"] == label]
        lgs = sorted({r["lambda_G"] for r in sub if r["regime"] == "penalty"})
        lps = sorted({r["lambda_perp"] for r in sub if r["regime"] == "penalty"})

        def cell(rs):
            acc, acc_sd = _mean_std([100 * r["test_acc"] for r in rs])
            inv, _ = _mean_std([r["inv_err"] for r in rs])
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
        f"{k} {_mean_std([r['train_s'] for r in rs])[0]:.1f} s" for k, rs in kinds.items() if rs))
    return "\n".join(out)


# =============================================================================================
# Experiment 2: smoke plume with a C4-declared CNN
# =============================================================================================

@dataclass
class SmokeParams:
    """Solver parameters (grid units: cell size 1, one solver step ``dt``)."""

    grid: int = 64
    dt: float = 1.0
    substeps: int = 2  # solver steps per saved frame
    buoyancy: float = 0.02
    viscosity: float = 0.05
    diffusivity: float = 0.02
    drag: float = 0.02
    decay: float = 0.02
    source_rate: float = 0.1
    wind: float = 0.02  # strength of the fixed wind: the only symmetry-breaking term
    wind_angle_deg: float = 30.0


def _bilinear_periodic(f: torch.Tensor, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``f [B, C, N, N]`` sampled at real positions ``X`` (column), ``Y`` (row) ``[B, N, N]``, periodic."""
    B, C, N, _ = f.shape
    x0, y0 = torch.floor(X), torch.floor(Y)
    fx, fy = (X - x0)[:, None], (Y - y0)[:, None]
    x0, y0 = x0.long() % N, y0.long() % N
    x1, y1 = (x0 + 1) % N, (y0 + 1) % N
    flat = f.reshape(B, C, N * N)

    def at(yy, xx):
        return flat.gather(2, (yy * N + xx).reshape(B, 1, N * N).expand(B, C, N * N)).reshape(B, C, N, N)

    return (1 - fy) * ((1 - fx) * at(y0, x0) + fx * at(y0, x1)) + fy * ((1 - fx) * at(y1, x0) + fx * at(y1, x1))


class SmokeSolver:
    """Boussinesq smoke on a periodic ``grid x grid`` torus, float64.

    One step: add the source; buoyancy ``u += dt * buoyancy * (rho - mean rho) * g_dir``;
    semi-Lagrangian advection (bilinear) of rho and u by ``u + wind``; spectral diffusion;
    pressure projection (FFT, Nyquist derivative zeroed so the discretisation keeps the grid's
    symmetry); linear drag and decay. With ``wind = 0`` the step commutes with every 90-degree
    rotation of the grid (rotating rho, source, u and g_dir together) up to rounding.
    """

    def __init__(self, params: SmokeParams):
        self.p = p = params
        n = p.grid
        k = torch.fft.fftfreq(n, d=1.0 / n).to(torch.float64) * (2 * math.pi / n)
        kd = k.clone()
        kd[n // 2] = 0.0
        self.kx, self.ky = kd[None, :].expand(n, n), kd[:, None].expand(n, n)
        kd2 = self.kx ** 2 + self.ky ** 2
        self.kd2 = torch.where(kd2 > 0, kd2, torch.ones_like(kd2))
        k2 = k[None, :] ** 2 + k[:, None] ** 2
        self.viscous = torch.exp(-p.viscosity * k2 * p.dt)
        self.diffusive = torch.exp(-p.diffusivity * k2 * p.dt)
        a = math.radians(p.wind_angle_deg)
        self.wind = torch.tensor([p.wind * math.cos(a), p.wind * math.sin(a)], dtype=torch.float64)
        r = torch.arange(n, dtype=torch.float64)
        self.Y, self.X = torch.meshgrid(r, r, indexing="ij")

    def _project(self, u: torch.Tensor) -> torch.Tensor:
        U = torch.fft.fft2(u)
        div = self.kx * U[:, 0] + self.ky * U[:, 1]
        U = U - torch.stack([self.kx, self.ky])[None] * (div / self.kd2)[:, None]
        return torch.fft.ifft2(U).real

    def step(self, rho, u, source, g_dir):
        """``rho [B,1,N,N]``, ``u [B,2,N,N]`` (x = column, y = row components), ``source [B,1,N,N]``,
        ``g_dir [B,2]`` -> ``(rho, u)`` one step later."""
        p = self.p
        rho = rho + p.dt * source
        u = u + p.dt * p.buoyancy * (rho - rho.mean((-2, -1), keepdim=True)) * g_dir[:, :, None, None]
        v = u + self.wind[None, :, None, None]
        both = _bilinear_periodic(torch.cat([rho, u], 1), self.X - p.dt * v[:, 0], self.Y - p.dt * v[:, 1])
        rho = torch.fft.ifft2(torch.fft.fft2(both[:, :1]) * self.diffusive).real
        u = self._project(torch.fft.ifft2(torch.fft.fft2(both[:, 1:]) * self.viscous).real)
        return rho * (1 - p.decay * p.dt), u * (1 - p.drag * p.dt)

    def frame(self, rho, u, source, g_dir):
        """One saved frame: ``substeps`` solver steps."""
        for _ in range(self.p.substeps):
            rho, u = self.step(rho, u, source, g_dir)
        return rho, u


def simulate_smoke(params: SmokeParams, trajectories: int, frames: int, generator: torch.Generator,
                   warmup: int = 10) -> dict:
    """Random plumes: source a Gaussian blob (random centre, width 2.5-4 cells), buoyancy direction
    uniform on the circle, fluid at rest initially; ``warmup`` frames are discarded.

    Returns ``states [B, frames, 3, N, N]`` (rho, u_x, u_y), ``source [B, 1, N, N]``,
    ``g_dir [B, 2]``, all float64.
    """
    n, B = params.grid, trajectories
    u4 = torch.rand(4, B, dtype=torch.float64, generator=generator)
    cx, cy, width = u4[0] * n, u4[1] * n, 2.5 + 1.5 * u4[2]
    r = torch.arange(n, dtype=torch.float64)
    dx = (r[None, None, :] - cx[:, None, None] + n / 2) % n - n / 2
    dy = (r[None, :, None] - cy[:, None, None] + n / 2) % n - n / 2
    source = (params.source_rate * torch.exp(-(dx ** 2 + dy ** 2) / (2 * width[:, None, None] ** 2)))[:, None]
    angle = 2 * math.pi * u4[3]
    g_dir = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    solver = SmokeSolver(params)
    rho, u = torch.zeros(B, 1, n, n, dtype=torch.float64), torch.zeros(B, 2, n, n, dtype=torch.float64)
    states = []
    for t in range(warmup + frames):
        if t >= warmup:
            states.append(torch.cat([rho, u], 1))
        rho, u = solver.frame(rho, u, source, g_dir)
    return dict(states=torch.stack(states, 1), source=source, g_dir=g_dir)


# model channels: input (rho, source, u_x, u_y, g_x, g_y), output (d rho, d u_x, d u_y)
SMOKE_IN_VECTORS = ((2, 3), (4, 5))
SMOKE_OUT_VECTORS = ((1, 2),)


def c4_matrix(k: int) -> torch.Tensor:
    """The element of C4 that :func:`rotate_fields` applies for ``k``: ``[[0, 1], [-1, 0]]^k``
    acting on (x = column, y = row) coordinates (``torch.rot90(., k, (-2, -1))``)."""
    g = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    return torch.linalg.matrix_power(g, k % 4)


def rotate_fields(x: torch.Tensor, k: int, vectors=()) -> torch.Tensor:
    """The C4 element ``c4_matrix(k)`` acting on fields ``[..., C, N, N]``: every channel is moved
    on the grid (``torch.rot90``), and each channel pair in ``vectors`` (x, y components) is
    also rotated as a vector. Scalars elsewhere."""
    out = torch.rot90(x, k % 4, (-2, -1))
    if not vectors:
        return out
    g = c4_matrix(k).to(x.dtype)
    chans = list(out.unbind(-3))
    for a, b in vectors:
        va, vb = chans[a], chans[b]
        chans[a], chans[b] = g[0, 0] * va + g[0, 1] * vb, g[1, 0] * va + g[1, 1] * vb
    return torch.stack(chans, -3)


class C4SmokeNet(nn.Module):
    """``[B, 6, N, N] -> [B, 3, N, N]``: ``layers`` circular-padded convolutions with ReLU, hidden
    channels ``hidden_fields`` copies of the regular representation of C4 (a pointwise ReLU commutes
    with it), input channels scalar/scalar/vector/vector, output scalar/vector. Every conv is a
    plain ``nn.Conv2d`` declared C4-equivariant with the exact grid action on its kernel."""

    def __init__(self, hidden_fields: int = 4, layers: int = 4, kernel: int = 3):
        super().__init__()
        if layers < 2:
            raise ValueError(f"need at least 2 layers, got {layers}")
        G = Cyclic(4)
        reps = [G.trivial() + G.trivial() + G.standard() + G.standard()]
        reps += [hidden_fields * G.regular()] * (layers - 1) + [G.trivial() + G.standard()]
        self.convs = nn.ModuleList(nn.Conv2d(a.dim, b.dim, kernel, padding=kernel // 2, padding_mode="circular")
                                   for a, b in zip(reps[:-1], reps[1:]))
        for conv, a, b in zip(self.convs, reps[:-1], reps[1:]):
            eqnn.declare(conv, a, b, kernel_space="grid")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs[:-1]:
            x = F.relu(conv(x))
        return self.convs[-1](x)


@dataclass
class SmokeScales:
    """Per-field normalisation (one scalar per field, so rotations commute with it)."""

    rho: float
    u: float
    source: float
    d_rho: float
    d_u: float

    @classmethod
    def fit(cls, data: dict) -> "SmokeScales":
        s = data["states"]
        d = s[:, 1:] - s[:, :-1]
        rms = lambda t: float(t.square().mean().sqrt())  # noqa: E731
        return cls(rms(s[:, :, 0]), rms(s[:, :, 1:]), float(data["source"].amax()), rms(d[:, :, 0]), rms(d[:, :, 1:]))

    def inputs(self, state, source, g_dir):
        """``state [B, 3, N, N]`` -> model input ``[B, 6, N, N]`` float32."""
        n = state.shape[-1]
        return torch.cat([state[:, :1] / self.rho, source / self.source, state[:, 1:] / self.u,
                          g_dir[:, :, None, None].expand(-1, -1, n, n)], 1).float()

    def targets(self, state, nxt):
        return torch.cat([(nxt[:, :1] - state[:, :1]) / self.d_rho, (nxt[:, 1:] - state[:, 1:]) / self.d_u], 1).float()

    def advance(self, state, pred):
        return state + torch.cat([pred[:, :1] * self.d_rho, pred[:, 1:] * self.d_u], 1).to(state.dtype)

    def normalised(self, state):
        return torch.cat([state[:, :1] / self.rho, state[:, 1:] / self.u], 1)


def smoke_pairs(data: dict, sc: SmokeScales) -> tuple[torch.Tensor, torch.Tensor]:
    """All one-frame (input, target) pairs of a data set: ``[P, 6, N, N]``, ``[P, 3, N, N]``."""
    s = data["states"]
    B, T = s.shape[:2]
    X = [sc.inputs(s[:, t], data["source"], data["g_dir"]) for t in range(T - 1)]
    Y = [sc.targets(s[:, t], s[:, t + 1]) for t in range(T - 1)]
    return torch.stack(X, 1).flatten(0, 1), torch.stack(Y, 1).flatten(0, 1)


SMOKE_REGIMES = {
    "none": "no penalty",
    "projection": "projection penalty",
    "data_time": "data-level penalty, equal time",
    "data_steps": "data-level penalty, equal steps",
    "strict": "strictly projected",
    "decoupled": "projection penalty, decoupled step",
}


@torch.no_grad()
def shrink_noneq_(model: nn.Module, eta: float) -> None:
    """``W <- W - eta (W - P W)`` for every declared layer (biases included): a plain gradient step
    of size ``eta / 2`` on ``E_perp``, taken outside the optimiser, like AdamW's decoupled weight
    decay. With Adam, the same energy added to the loss (``ProjectionPenalty``) is rescaled per
    coordinate together with the task gradient; decoupled, it shrinks the non-equivariant part
    by the factor ``1 - eta`` per step whatever the task gradient's scale."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    old = [p.detach().clone() for p in model.parameters()]
    eqnn.project_(model)  # undeclared parameters are left as they are
    for p, o in zip(model.parameters(), old):
        p.mul_(eta).add_(o, alpha=1.0 - eta)


def smoke_data_penalty(model: nn.Module, x: torch.Tensor, fx: torch.Tensor, k: int) -> torch.Tensor:
    """The data-level sample-based penalty for one rotation ``k`` (drawn from the three non-identity
    elements: the identity contributes exactly 0): ``mean ||f(g x) - g f(x)||^2`` per output entry,
    one extra forward (and backward) pass. Equals :func:`equiproj.baselines.sampled_data_penalty`
    with that element, divided by the number of output entries per example."""
    return F.mse_loss(model(rotate_fields(x, k, SMOKE_IN_VECTORS)), rotate_fields(fx, k, SMOKE_OUT_VECTORS))


def regime_step(model: nn.Module, regime: str, lam: float, lr: float, task_loss, data_penalty):
    """One training step ``step(x, y)`` of a regime: Adam on ``task_loss(model(x), y)`` plus the
    regime's penalty: ``"projection"`` adds ``ProjectionPenalty(model, lam)()``; ``"data_time"`` /
    ``"data_steps"`` add ``lam * data_penalty(model, x, model(x))`` (one sampled group element, one
    extra forward and backward); ``"strict"`` projects after the step, ``"decoupled"`` shrinks the
    non-equivariant part by ``lam`` (:func:`shrink_noneq_`)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    penalty = eqnn.ProjectionPenalty(model, lam) if regime == "projection" else None

    def step(x, y):
        pred = model(x)
        loss = task_loss(pred, y)
        if penalty is not None:
            loss = loss + penalty()
        elif regime in ("data_time", "data_steps"):
            loss = loss + lam * data_penalty(model, x, pred)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if regime == "strict":
            eqnn.project_(model)
        elif regime == "decoupled":
            shrink_noneq_(model, lam)

    return step


def run_steps(step, model: nn.Module, X: torch.Tensor, Y: torch.Tensor, *, strict: bool, steps: int, batch: int,
              generator: torch.Generator) -> float:
    """``step(x, y)`` on ``steps`` mini-batches (epochs of a seeded permutation of ``X``, ``Y``);
    a strict model starts from :func:`project_init_`. Returns the training time in seconds."""
    t0 = time.perf_counter()
    if strict:
        project_init_(model)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch:
            order = torch.cat([order, torch.randperm(len(X), generator=generator)])
        idx, order = order[:batch], order[batch:]
        step(X[idx], Y[idx])
    return time.perf_counter() - t0


def interleaved_step_times(steps: dict, X: torch.Tensor, Y: torch.Tensor, *, batch: int, repeats: int,
                           generator: torch.Generator) -> dict:
    """Median seconds per call of each ``steps[name](x, y)`` on random batches, measured interleaved
    (after one warm-up call each) so that a change of machine load affects all of them alike."""
    times = {r: [] for r in steps}
    for rep in range(repeats + 1):
        for r, step in steps.items():
            idx = torch.randint(len(X), (batch,), generator=generator)
            t0 = time.perf_counter()
            step(X[idx], Y[idx])
            if rep:
                times[r].append(time.perf_counter() - t0)
    return {r: float(torch.tensor(t).median()) for r, t in times.items()}


def _smoke_step_fn(model: C4SmokeNet, regime: str, lam: float, lr: float, generator: torch.Generator):
    def data_penalty(model, x, pred):
        return smoke_data_penalty(model, x, pred, int(torch.randint(1, 4, (1,), generator=generator)))

    return regime_step(model, regime, lam, lr, F.mse_loss, data_penalty)


@torch.no_grad()
def project_init_(model: nn.Module) -> None:
    """Project every declared layer and rescale each weight back to its Frobenius norm before the
    projection (biases as projected). The plain projection of a default-initialised C4 conv keeps
    about a quarter of its energy; from that half-norm start, strictly projected ReLU networks
    died (every unit of a layer inactive) in 1 of 2 seeds of the demo."""
    norms = {id(m.weight): m.weight.norm() for _, m, _ in eqnn.declared_layers(model)}
    eqnn.project_(model)
    for _, m, _ in eqnn.declared_layers(model):
        n = m.weight.norm()
        if n > 0:
            m.weight.mul_(norms[id(m.weight)] / n)


def train_smoke(model: C4SmokeNet, X: torch.Tensor, Y: torch.Tensor, *, regime: str, lam: float, steps: int,
                batch: int, lr: float, generator: torch.Generator) -> float:
    """Adam on the one-step MSE (+ the regime's penalty) for ``steps`` mini-batches (epochs of a
    seeded permutation). Returns the training time in seconds."""
    if regime not in SMOKE_REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {list(SMOKE_REGIMES)}")
    step = _smoke_step_fn(model, regime, lam, lr, generator)
    return run_steps(step, model, X, Y, strict=regime == "strict", steps=steps, batch=batch, generator=generator)


def measure_step_times(make_model, X, Y, regimes, *, lams: dict, batch: int, lr: float, repeats: int = 4) -> dict:
    """Median seconds per training step of each regime, measured interleaved (after one warm-up
    step each) so that a change of machine load affects all regimes alike."""
    gen = torch.Generator().manual_seed(0)
    steps = {r: _smoke_step_fn(make_model(), r, lams.get(r, 0.0), lr, gen) for r in regimes}
    return interleaved_step_times(steps, X, Y, batch=batch, repeats=repeats, generator=gen)


@torch.no_grad()
def smoke_rollout(model: nn.Module, data: dict, sc: SmokeScales, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Autoregressive rollout from frame 0 of every trajectory: ``(rmse [horizon], prediction
    [B, horizon, 3, N, N])``, RMSE over trajectories, fields and pixels in normalised units."""
    s = data["states"]
    state, preds, rmse = s[:, 0], [], []
    for t in range(1, horizon + 1):
        state = sc.advance(state, model(sc.inputs(state, data["source"], data["g_dir"])))
        preds.append(state)
        rmse.append(float((sc.normalised(state) - sc.normalised(s[:, t])).square().mean().sqrt()))
    return torch.tensor(rmse), torch.stack(preds, 1)


@torch.no_grad()
def smoke_equivariance_error(model: nn.Module, X: torch.Tensor, batch: int = 32) -> float:
    """``sum ||f(g x) - g f(x)||^2 / sum ||f(x)||^2`` over the inputs and the three rotations, square-rooted."""
    num = den = 0.0
    for i in range(0, len(X), batch):
        x = X[i : i + batch]
        fx = model(x)
        for k in (1, 2, 3):
            diff = model(rotate_fields(x, k, SMOKE_IN_VECTORS)) - rotate_fields(fx, k, SMOKE_OUT_VECTORS)
            num += float(diff.square().sum())
            den += float(fx.square().sum())
    return math.sqrt(num / den)


def smoke_data_asymmetry(params: SmokeParams, data: dict, frames: int = 4) -> float:
    """How far the true one-frame map is from C4-equivariant: ``||F(g x) - g F(x)|| / ||F(x) - x||``
    over the first ``frames`` frames of ``data`` and the three rotations (0 for ``wind = 0``)."""
    solver = SmokeSolver(params)
    num = den = 0.0
    for t in range(frames):
        st = data["states"][:, t]
        rho, u = solver.frame(st[:, :1], st[:, 1:], data["source"], data["g_dir"])
        nxt = torch.cat([rho, u], 1)
        den += 3 * float((nxt - st).square().sum())
        for k in (1, 2, 3):
            g = c4_matrix(k)
            rs = rotate_fields(st, k, ((1, 2),))
            r_rho, r_u = solver.frame(rs[:, :1], rs[:, 1:], rotate_fields(data["source"], k), data["g_dir"] @ g.T)
            num += float((torch.cat([r_rho, r_u], 1) - rotate_fields(nxt, k, ((1, 2),))).square().sum())
    return math.sqrt(num / den)


@dataclass
class SmokeConfig:
    """Sizes of experiment 2 (``demo()`` / ``full()``)."""

    params: SmokeParams = field(default_factory=SmokeParams)
    train_traj: int = 16
    val_traj: int = 2
    test_traj: int = 6
    frames: int = 20
    horizon: int = 16
    hidden_fields: int = 4
    layers: int = 4
    kernel: int = 3
    batch: int = 8
    lr: float = 2e-3
    epochs: int = 15
    seeds: int = 3
    lambda_perp: float = 0.1  # used when no sweep is run
    lambda_data: float = 1.0  # the defaults are the full run's validation choices
    eta_decoupled: float = 0.5
    sweep_perp: tuple = ()  # validation sweep (seed 0) before the seeded runs
    sweep_data: tuple = ()
    sweep_decoupled: tuple = ()
    regimes: tuple = ("none", "projection", "data_time", "strict", "data_steps", "decoupled")

    @classmethod
    def demo(cls) -> "SmokeConfig":
        """The short version: a 32x32 grid, 120 training pairs, 10 epochs, 2 seeds, fixed lambdas."""
        return cls(params=replace(SmokeParams(), grid=32), train_traj=8, val_traj=1, test_traj=4, frames=16,
                   horizon=12, epochs=10, seeds=2)

    @classmethod
    def full(cls) -> "SmokeConfig":
        """64x64, 304 training pairs, 15 epochs, 3 seeds, lambdas chosen on validation trajectories."""
        return cls(sweep_perp=(0.1, 0.3, 1.0), sweep_data=(0.1, 0.3, 1.0), sweep_decoupled=(0.05, 0.2, 0.5))

    @classmethod
    def tiny(cls) -> "SmokeConfig":  # the test suite
        return cls(params=replace(SmokeParams(), grid=16), train_traj=2, val_traj=1, test_traj=1, frames=4,
                   horizon=3, hidden_fields=1, layers=2, batch=4, epochs=1, seeds=1)


def validation_sweep(cfg, lam: dict, fit, score, *, key: str, higher_is_better: bool, describe, log) -> list[dict]:
    """Choose the lambdas on validation data (seed 0 models): for each regime with a sweep in ``cfg``
    (``sweep_perp``, ``sweep_data``, ``sweep_decoupled``), ``fit(regime, value) -> (model, seconds)``
    at every value, keep the best ``score(model)`` in ``lam`` (the data-level choice also sets
    ``"data_time"``). Returns one row per fit (``key`` holds the score)."""
    sweep = []
    for regime, values in (("projection", cfg.sweep_perp), ("data_steps", cfg.sweep_data),
                           ("decoupled", cfg.sweep_decoupled)):
        best = None
        for value in values:
            model, secs = fit(regime, value)
            score_value = score(model)
            sweep.append({"regime": regime, "lam": value, key: score_value, "train_s": secs})
            log(f"  sweep {regime} lambda={value:g}: {describe(score_value)}")
            if best is None or (score_value > best[0] if higher_is_better else score_value < best[0]):
                best = (score_value, value)
        if best is not None:
            lam[regime] = best[1]
            if regime == "data_steps":
                lam["data_time"] = best[1]
    return sweep


def _fit_one(cfg: SmokeConfig, regime: str, lam: float, steps: int, seed: int, X, Y) -> tuple[C4SmokeNet, float]:
    gen = _seed_all(seed)
    model = C4SmokeNet(cfg.hidden_fields, cfg.layers, cfg.kernel)
    secs = train_smoke(model, X, Y, regime=regime, lam=lam, steps=steps, batch=cfg.batch, lr=cfg.lr, generator=gen)
    return model, secs


def run_smoke(cfg: SmokeConfig, seed: int = 0, out: str | None = None, log=print, tag: str = "") -> dict:
    """Run experiment 2. Returns ``{"rows": [...], "sweep": [...], "info": {...}, "lambdas": {...}}``
    and writes ``smoke{tag}_results.csv``, ``smoke{tag}_table.md``, ``smoke{tag}_rollout.png`` to ``out``."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(20_000 + seed)
    train = simulate_smoke(cfg.params, cfg.train_traj, cfg.frames, gen)
    val = simulate_smoke(cfg.params, cfg.val_traj, cfg.horizon + 1, gen)
    test = simulate_smoke(cfg.params, cfg.test_traj, cfg.horizon + 1, gen)
    sc = SmokeScales.fit(train)
    X, Y = smoke_pairs(train, sc)
    X_test, _ = smoke_pairs(test, sc)
    steps_per_epoch = max(1, len(X) // cfg.batch)
    steps = cfg.epochs * steps_per_epoch
    info = dict(data_s=time.perf_counter() - t0, pairs=len(X), steps_per_epoch=steps_per_epoch,
                asymmetry=smoke_data_asymmetry(cfg.params, test), wind=cfg.params.wind, grid=cfg.params.grid)
    log(f"  smoke data: {cfg.train_traj}+{cfg.val_traj}+{cfg.test_traj} trajectories of {cfg.params.grid}x"
        f"{cfg.params.grid} in {info['data_s']:.1f} s; {len(X)} training pairs; true map's C4 asymmetry "
        f"{info['asymmetry']:.3f}")

    lam = {"projection": cfg.lambda_perp, "data_time": cfg.lambda_data, "data_steps": cfg.lambda_data,
           "decoupled": cfg.eta_decoupled}
    sweep = validation_sweep(
        cfg, lam, lambda regime, value: _fit_one(cfg, regime, value, steps, 1000 * seed, X, Y),
        lambda model: float(smoke_rollout(model, val, sc, cfg.horizon)[0].mean()), key="val_rollout_rmse",
        higher_is_better=False, describe=lambda rmse: f"validation rollout RMSE {rmse:.4f}", log=log)

    make = lambda: C4SmokeNet(cfg.hidden_fields, cfg.layers, cfg.kernel)  # noqa: E731
    step_s = measure_step_times(make, X, Y, ("projection", "data_steps"), lams=lam, batch=cfg.batch, lr=cfg.lr)
    info["step_s"] = step_s
    equal_time_steps = max(1, round(steps * step_s["projection"] / step_s["data_steps"]))
    log(f"  step time: projection {1e3 * step_s['projection']:.0f} ms, data-level {1e3 * step_s['data_steps']:.0f} ms "
        f"-> {equal_time_steps} data-level steps at equal time (vs {steps})")

    rows, curves, snapshots = [], {}, {}
    for r in range(cfg.seeds):
        for regime in cfg.regimes:
            n = equal_time_steps if regime == "data_time" else steps
            model, secs = _fit_one(cfg, regime, lam.get(regime, 0.0), n, 1000 * seed + r, X, Y)
            rmse, pred = smoke_rollout(model, test, sc, cfg.horizon)
            rows.append(dict(regime=regime, lam=lam.get(regime, 0.0), seed=1000 * seed + r, steps=n,
                             epochs=n / steps_per_epoch, train_s=secs, epoch_s=secs * steps_per_epoch / n,
                             rollout_rmse=float(rmse.mean()), final_rmse=float(rmse[-1]),
                             equiv_err=smoke_equivariance_error(model, X_test),
                             rel_E_perp=relative_noneq_energy(model)))
            curves.setdefault(regime, []).append(rmse)
            if r == 0:
                snapshots[regime] = pred[0, -1, 0]
        log(f"  smoke seed {1000 * seed + r}: {len(cfg.regimes)} regimes done")
    snapshots["truth"] = test["states"][0, cfg.horizon, 0]
    info["total_s"] = time.perf_counter() - t0
    result = dict(rows=rows, sweep=sweep, info=info, lambdas=lam)
    if out:
        _write_csv(rows, os.path.join(out, f"smoke{tag}_results.csv"))
        if sweep:
            _write_csv(sweep, os.path.join(out, f"smoke{tag}_sweep.csv"))
        with open(os.path.join(out, f"smoke{tag}_table.md"), "w") as f:
            f.write(format_smoke_table(result) + "\n")
        plot_smoke(curves, snapshots, os.path.join(out, f"smoke{tag}_rollout.png"), log)
    return result


def format_smoke_table(result: dict) -> str:
    rows, info = result["rows"], result["info"]
    seeds = len({r["seed"] for r in rows})
    out = [f"Experiment 2 (smoke plume, {info['grid']}x{info['grid']}, C4-declared CNN, wind {info['wind']:g}: "
           f"true map's C4 asymmetry {info['asymmetry']:.3f}); mean ± std over {seeds} seed(s)\n",
           "| regime | λ (η) | steps | time/epoch (s) | rollout RMSE | final-step RMSE | equivariance error |",
           "|---|---|---|---|---|---|---|"]
    for regime in dict.fromkeys(r["regime"] for r in rows):
        rs = [r for r in rows if r["regime"] == regime]

        def ms(key, fmt):
            m, s = _mean_std([r[key] for r in rs])
            return f"{m:{fmt}} ± {s:{fmt}}" if len(rs) > 1 else f"{m:{fmt}}"

        lam = rs[0]["lam"] if regime not in ("none", "strict") else "–"
        out.append(f"| {SMOKE_REGIMES[regime]} | {lam:g} | {rs[0]['steps']} | {ms('epoch_s', '.2f')} | "
                   f"{ms('rollout_rmse', '.4f')} | {ms('final_rmse', '.4f')} | {ms('equiv_err', '.2e')} |"
                   if lam != "–" else
                   f"| {SMOKE_REGIMES[regime]} | – | {rs[0]['steps']} | {ms('epoch_s', '.2f')} | "
                   f"{ms('rollout_rmse', '.4f')} | {ms('final_rmse', '.4f')} | {ms('equiv_err', '.2e')} |")
    st = info["step_s"]
    out.append(f"\nStep time (same run): projection penalty {1e3 * st['projection']:.1f} ms, data-level penalty "
               f"{1e3 * st['data_steps']:.1f} ms (ratio {st['data_steps'] / st['projection']:.2f}).")
    if result["sweep"]:
        out.append("\nλ chosen on validation trajectories (seed 0): " + ", ".join(
            f"{s['regime']} λ={s['lam']:g}: {s['val_rollout_rmse']:.4f}" for s in result["sweep"]))
    return "\n".join(out)


# =============================================================================================
# Output: CSV, figures
# =============================================================================================

def _write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _pyplot(log):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("  matplotlib is not installed: PNGs skipped (pip install matplotlib); tables and CSVs are complete")
        return None
    return plt


@torch.no_grad()
def plot_so2(rows: list[dict], models: dict, out: str, log=print) -> None:
    plt = _pyplot(log)
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
    path = os.path.join(out, "so2_decision_boundaries.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)

    rings = [r for r in rows if r["dataset"].startswith("rings") and r["lambda_G"] == 0]
    if rings:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
        series = sorted({(r["regime"], r["lambda_perp"]) for r in rings})
        for regime, lp in series:
            rs = [r for r in rings if r["regime"] == regime and r["lambda_perp"] == lp]
            sig = sorted({r["sigma"] for r in rs})
            acc = [_mean_std([100 * r["test_acc"] for r in rs if r["sigma"] == s])[0] for s in sig]
            inv = [_mean_std([r["inv_err"] for r in rs if r["sigma"] == s])[0] for s in sig]
            name = "strictly invariant" if regime == "strict" else f"λ_perp={lp:g}"
            a1.plot(sig, acc, "o-", label=name)
            a2.semilogy(sig, [max(v, 1e-8) for v in inv], "o-", label=name)
        a1.set_xlabel("σ (symmetry breaking)"), a1.set_ylabel("test accuracy %"), a1.legend(fontsize=7)
        a2.set_xlabel("σ"), a2.set_ylabel("invariance error")
        fig.suptitle("wavey rings, λ_G = 0", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "so2_rings_vs_sigma.png"), dpi=110)
        plt.close(fig)
    log(f"  wrote {path} and so2_rings_vs_sigma.png")


def plot_smoke(curves: dict, snapshots: dict, path: str, log=print) -> None:
    plt = _pyplot(log)
    if plt is None:
        return
    fig = plt.figure(figsize=(2.2 * len(snapshots), 5.6))
    ax = fig.add_subplot(2, 1, 1)
    for regime, cs in curves.items():
        c = torch.stack(cs)
        m = c.mean(0)
        steps = torch.arange(1, len(m) + 1)
        ax.plot(steps, m, label=SMOKE_REGIMES[regime])
        if len(cs) > 1:
            s = c.std(0)
            ax.fill_between(steps, m - s, m + s, alpha=0.2)
    ax.set_xlabel("rollout step"), ax.set_ylabel("RMSE (normalised)"), ax.legend(fontsize=7)
    order = ["truth"] + [r for r in snapshots if r != "truth"]
    vmax = float(snapshots["truth"].abs().max())
    for i, key in enumerate(order):
        a = fig.add_subplot(2, len(order), len(order) + i + 1)
        a.imshow(snapshots[key].numpy(), cmap="magma", vmin=0, vmax=vmax, origin="upper")
        a.set_title("truth" if key == "truth" else SMOKE_REGIMES[key], fontsize=8)
        a.set_xticks([]), a.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"  wrote {path}")


# =============================================================================================
# Command line
# =============================================================================================

EXPERIMENTS = {"so2": "SO(2) toy", "smoke": "smoke plume, C4", "voxels": "O(3) voxel shapes"}


def _experiment(name: str):
    """``(config class, run function, table formatter)`` of experiment ``name``."""
    if name == "so2":
        return SO2Config, run_so2, format_so2_table
    if name == "smoke":
        return SmokeConfig, run_smoke, format_smoke_table
    from .demo_voxels import VoxelConfig, format_voxels_table, run_voxels

    return VoxelConfig, run_voxels, format_voxels_table


def script_main(argv, name: str, description: str, param: str | None = None, param_help: str = "") -> int:
    """The entry point of the ``experiments/`` script of experiment ``name``: ``--full``, ``--seed``,
    ``--out``, ``--threads`` and, with ``param``, ``--<param>`` overriding ``config.params.<param>``
    (outputs tagged ``_<param><value>``). Prints the table, then the time and config."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--full", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="experiments/results")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    if param:
        p.add_argument(f"--{param}", type=float, help=f"{param_help} (default: the config's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config_cls, run_fn, format_fn = _experiment(name)
    cfg = config_cls.full() if args.full else config_cls.demo()
    value = getattr(args, param) if param else None
    kw = {}
    if value is not None:
        cfg = replace(cfg, params=replace(cfg.params, **{param: value}))
        kw["tag"] = f"_{param}{value:g}"
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    result = run_fn(cfg, args.seed, args.out, log=lambda m: print(m, file=sys.stderr, flush=True), **kw)
    print(format_fn(result))
    print(f"\n({time.perf_counter() - t0:.0f} s, {torch.get_num_threads()} threads; config {cfg})")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``equiproj demo`` options (``--full``, ``--seed``, ``--out``, ``--only``)."""
    parser.add_argument("--full", action="store_true", help="the sizes of the issue (3 seeds, full grids): about 100 min on 2 cores")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation, batches (default 0)")
    parser.add_argument("--out", default="equiproj-demo", help="output directory for tables, CSVs, PNGs")
    parser.add_argument("--only", choices=tuple(EXPERIMENTS), help="run one experiment only")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice; 1 is faster on a busy machine)")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the demo for parsed ``args`` (see :func:`add_arguments`); prints one table per experiment."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"command{'_' + args.only if args.only else ''}.txt"), "w") as f:
        f.write(" ".join(["equiproj demo"] + (["--full"] if args.full else []) + [f"--seed {args.seed}"]
                         + ([f"--only {args.only}"] if args.only else [])
                         + ([f"--threads {args.threads}"] if getattr(args, "threads", None) else [])) + "\n")
        f.write(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    for number, (name, title) in enumerate(EXPERIMENTS.items(), 1):
        if args.only not in (None, name):
            continue
        config_cls, run_fn, format_fn = _experiment(name)
        log(f"experiment {number}: {title}")
        t = time.perf_counter()
        result = run_fn(config_cls.full() if args.full else config_cls.demo(), args.seed, args.out, log)
        print(format_fn(result))
        print(f"\n(experiment {number}: {time.perf_counter() - t:.0f} s)\n")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; outputs in {args.out}")
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="equiproj demo", description=__doc__.split("\n\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
