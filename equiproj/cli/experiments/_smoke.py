"""Experiment 2, ``smoke``: a smoke-plume solver written here (Boussinesq advection-diffusion of
a density driven by buoyancy along a per-trajectory direction g, periodic grid, semi-Lagrangian
advection, spectral diffusion and pressure projection, float64), exactly C4-equivariant except
for a fixed wind (strength ``wind``) that the model does not see. A CNN whose convolutions are
declared C4-equivariant (exact 90-degree grid action on the kernels) maps (density, source,
velocity, g) to the next frame. Regimes: no penalty; the projection penalty; the data-level
sample-based penalty E_g ||f(g x) - g f(x)||^2 (one random rotation per step: one extra forward
and backward pass) at equal wall-clock time, and at equal steps; strictly projected; and the
same projection energy applied as a decoupled step ``W <- W - eta (W - P W)`` after each Adam
step (``ProjectionPenalty.decay_``, like AdamW's weight decay). Metrics:
rollout RMSE on held-out trajectories, equivariance error, time per epoch, mean +- std over
seeds.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ... import nn as eqnn
from ...groups import Cyclic
from ._config import ExperimentConfig
from ._smoke_data import (SMOKE_IN_VECTORS, SMOKE_OUT_VECTORS, SmokeParams, SmokeSolver, c4_matrix, rotate_fields,
                          simulate_smoke)
from ._training import (interleaved_step_times, mean_std, pyplot, regime_step, relative_e_perp, run_steps, seed_all,
                        validation_sweep, write_csv)

__all__ = ["SmokeParams", "SmokeSolver", "simulate_smoke", "rotate_fields", "c4_matrix", "C4SmokeNet", "SmokeScales",
           "smoke_pairs", "smoke_data_penalty", "SMOKE_REGIMES", "train_smoke", "smoke_rollout", "smoke_equivariance_error",
           "smoke_data_asymmetry", "SmokeConfig", "run", "format_table"]


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


def smoke_data_penalty(model: nn.Module, x: torch.Tensor, fx: torch.Tensor, k: int) -> torch.Tensor:
    """The data-level sample-based penalty for one rotation ``k`` (drawn from the three non-identity
    elements: the identity contributes exactly 0): ``mean ||f(g x) - g f(x)||^2`` per output entry,
    one extra forward (and backward) pass. Equals :func:`equiproj.baselines.sampled_data_penalty`
    with that element, divided by the number of output entries per example."""
    return F.mse_loss(model(rotate_fields(x, k, SMOKE_IN_VECTORS)), rotate_fields(fx, k, SMOKE_OUT_VECTORS))


def _smoke_step_fn(model: C4SmokeNet, regime: str, lam: float, lr: float, generator: torch.Generator):
    def data_penalty(model, x, pred):
        return smoke_data_penalty(model, x, pred, int(torch.randint(1, 4, (1,), generator=generator)))

    return regime_step(model, regime, lam, lr, F.mse_loss, data_penalty)


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
class SmokeConfig(ExperimentConfig):
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


def _fit_one(cfg: SmokeConfig, regime: str, lam: float, steps: int, seed: int, X, Y) -> tuple[C4SmokeNet, float]:
    gen = seed_all(seed)
    model = C4SmokeNet(cfg.hidden_fields, cfg.layers, cfg.kernel)
    secs = train_smoke(model, X, Y, regime=regime, lam=lam, steps=steps, batch=cfg.batch, lr=cfg.lr, generator=gen)
    return model, secs


def run(cfg: SmokeConfig, seed: int = 0, out: str | None = None, log=print, tag: str = "") -> dict:
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
                             rel_E_perp=relative_e_perp(model)))
            curves.setdefault(regime, []).append(rmse)
            if r == 0:
                snapshots[regime] = pred[0, -1, 0]
        log(f"  smoke seed {1000 * seed + r}: {len(cfg.regimes)} regimes done")
    snapshots["truth"] = test["states"][0, cfg.horizon, 0]
    info["total_s"] = time.perf_counter() - t0
    result = dict(rows=rows, sweep=sweep, info=info, lambdas=lam)
    if out:
        write_csv(rows, os.path.join(out, f"smoke{tag}_results.csv"))
        if sweep:
            write_csv(sweep, os.path.join(out, f"smoke{tag}_sweep.csv"))
        with open(os.path.join(out, f"smoke{tag}_table.md"), "w") as f:
            f.write(format_table(result) + "\n")
        plot_smoke(curves, snapshots, os.path.join(out, f"smoke{tag}_rollout.png"), log)
    return result


def format_table(result: dict) -> str:
    rows, info = result["rows"], result["info"]
    seeds = len({r["seed"] for r in rows})
    out = [f"Experiment 2 (smoke plume, {info['grid']}x{info['grid']}, C4-declared CNN, wind {info['wind']:g}: "
           f"true map's C4 asymmetry {info['asymmetry']:.3f}); mean ± std over {seeds} seed(s)\n",
           "| regime | λ (η) | steps | time/epoch (s) | rollout RMSE | final-step RMSE | equivariance error |",
           "|---|---|---|---|---|---|---|"]
    for regime in dict.fromkeys(r["regime"] for r in rows):
        rs = [r for r in rows if r["regime"] == regime]

        def ms(key, fmt):
            m, s = mean_std([r[key] for r in rs])
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


def plot_smoke(curves: dict, snapshots: dict, path: str, log=print) -> None:
    plt = pyplot(log)
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
