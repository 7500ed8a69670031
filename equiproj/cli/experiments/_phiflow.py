"""Experiment ``phiflow``: smoke plumes simulated by PhiFlow (the solver Wang, Walters & Yu 2022,
"Approximately Equivariant Networks for Imperfectly Symmetric Dynamics", used for their smoke
data), at laptop scale, with a C4-declared CNN trained by six regimes.

Data (:func:`simulate_plumes`, cached by :func:`plume_dataset`). 2-D incompressible smoke with
buoyancy in a closed square box (``grid x grid`` cells, no-slip walls: PhiFlow's staggered velocity
with zero extrapolation, MacCormack advection of the smoke, semi-Lagrangian advection of the
velocity, pressure projection by conjugate gradients in float64). Per trajectory a buoyancy
direction ``d`` (one of the four axis directions) and an inflow: a disk of radius
``grid / 16`` at ``grid * 6 / 64`` cells from the wall behind it, at a uniformly random position
along that wall (within the middle half), fed at ``inflow_rate`` per step. The buoyancy force is
``strength(d) * smoke * d`` with ``strength(d_j) = buoyancy * (1 + asymmetry * j / 3)`` for the
``j``-th direction (``j = 0, 1, 2, 3``: +y, +x, -y, -x): the strength depends on the direction, as
in the rotation split of Wang et al., where the buoyancy grows from one inflow direction to the
next. The model sees the smoke, the velocity, the inflow and the direction ``d`` but not the
strength, so the map it learns is C4-equivariant only at ``asymmetry = 0`` (PhiFlow's solver
itself commutes with the 90-degree rotations of the box to about 1e-10: measured, see
:func:`plume_twin_difference`).

Model (:class:`C4PlumeNet`): zero-padded 3x3 ``nn.Conv2d`` declared C4-equivariant (exact grid
action): input ``2x trivial + 2x standard`` (smoke, inflow; velocity, direction), hidden regular
fields through ``PointwiseActivation`` (ReLU), output ``trivial + standard`` (the change of smoke
and velocity over one frame, normalised). Training pairs, normalisation, rollout and the
equivariance error are those of the home-made smoke experiment (:mod:`._smoke`).

Regimes (:data:`._relaxed.REGIMES`): no penalty; projection penalty in the loss; the decoupled step;
strictly projected; the data-level penalty (one random rotation per step) for the wall-clock time
of the projection run; residual pathways. Lambdas chosen on validation trajectories (seed 0).
Metrics: future-step (rollout) RMSE over the horizon and at its last step, equivariance error,
time per step (all regimes, measured interleaved).

PhiFlow (``pip install phiflow``, or ``pip install 'equiproj[experiments]'``) is imported only to
generate data.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ... import nn as eqnn
from ...groups import Cyclic
from ._config import ExperimentConfig
from ._phiflow_data import (PHIFLOW_MISSING, PLUME_SPLITS, PlumeParams, default_cache_dir, phiflow_available,
                            plume_dataset, plume_twin_difference, simulate_plumes)
from ._relaxed import REGIMES, merged_copy, relaxed_step, residual_pathway_
from ._smoke import SmokeScales, smoke_data_penalty, smoke_equivariance_error, smoke_pairs, smoke_rollout
from ._training import interleaved_step_times, mean_std, pyplot, relative_e_perp, run_steps, seed_all, write_csv

__all__ = ["PHIFLOW_MISSING", "phiflow_available", "PlumeParams", "simulate_plumes", "plume_twin_difference",
           "plume_dataset", "default_cache_dir", "C4PlumeNet", "PlumeConfig", "run", "format_table"]


class C4PlumeNet(nn.Sequential):
    """``[B, 6, N, N] -> [B, 3, N, N]``: ``layers`` zero-padded convolutions declared C4-equivariant
    (inputs smoke, inflow, velocity, direction; ``hidden_fields`` regular fields; outputs smoke and
    velocity), ``PointwiseActivation`` (ReLU) between them."""

    def __init__(self, hidden_fields: int = 6, layers: int = 4, kernel: int = 3):
        if layers < 2:
            raise ValueError(f"need at least 2 layers, got {layers}")
        G = Cyclic(4)
        hidden = hidden_fields * G.regular()
        reps = [G.trivial() + G.trivial() + G.standard() + G.standard()] + [hidden] * (layers - 1)
        reps += [G.trivial() + G.standard()]
        mods = []
        for i, (a, b) in enumerate(zip(reps[:-1], reps[1:])):
            mods.append(eqnn.declare(nn.Conv2d(a.dim, b.dim, kernel, padding=kernel // 2), a, b))
            if i < layers - 1:
                mods.append(eqnn.PointwiseActivation(b))
        super().__init__(*mods)


def _step_fn(model: nn.Module, regime: str, lam: float, lr: float, generator: torch.Generator):
    def data_penalty(model, x, pred):
        return smoke_data_penalty(model, x, pred, int(torch.randint(1, 4, (1,), generator=generator)))

    return relaxed_step(model, regime, lam, lr, torch.nn.functional.mse_loss, data_penalty)


@dataclass
class PlumeConfig(ExperimentConfig):
    """Sizes of the PhiFlow experiment (``demo()`` / ``full()`` / ``tiny()``)."""

    params: PlumeParams = field(default_factory=PlumeParams)
    train_traj: int = 16
    val_traj: int = 2
    test_traj: int = 6
    frames: int = 20
    horizon: int = 16
    warmup: int = 20
    hidden_fields: int = 4
    layers: int = 4
    kernel: int = 3
    batch: int = 8
    lr: float = 2e-3
    epochs: int = 15
    seeds: int = 3
    # without a sweep: the validation choices of the home-made smoke experiment's full run (experiments/README.md)
    lambdas: dict = field(default_factory=lambda: {"projection": 0.1, "decoupled": 0.5, "data_time": 1.0,
                                                   "rpp": 1e-3})
    sweep: dict = field(default_factory=dict)  # regime -> values, chosen on validation rollouts (seed 0)
    regimes: tuple = tuple(REGIMES)
    twins: int = 2
    cache_dir: str | None = None

    @classmethod
    def demo(cls) -> "PlumeConfig":
        """A 32x32 grid, 8 training plumes, 8 epochs, 1 seed, fixed lambdas."""
        return cls(params=replace(PlumeParams(), grid=32), train_traj=8, val_traj=1, test_traj=3, frames=12,
                   horizon=10, warmup=10, epochs=8, seeds=1)

    @classmethod
    def full(cls) -> "PlumeConfig":
        """64x64, 16 training plumes (304 pairs), 15 epochs, 3 seeds, lambdas chosen on validation plumes."""
        return cls(sweep={"projection": (0.01, 0.1, 1.0), "decoupled": (0.05, 0.2, 0.5), "data_time": (0.1, 1.0),
                          "rpp": (1e-3, 1e-2)})

    @classmethod
    def tiny(cls) -> "PlumeConfig":  # the test suite
        return cls(params=replace(PlumeParams(), grid=16), train_traj=2, val_traj=1, test_traj=1, frames=4,
                   horizon=3, warmup=3, hidden_fields=1, layers=2, batch=4, epochs=1, seeds=1, twins=1,
                   sweep={"projection": (0.1, 1.0)})


def _make_model(cfg: PlumeConfig, regime: str) -> nn.Module:
    model = C4PlumeNet(cfg.hidden_fields, cfg.layers, cfg.kernel)
    return residual_pathway_(model) if regime == "rpp" else model


def _fit(cfg: PlumeConfig, regime: str, lam: float, steps: int, seed: int, X, Y) -> tuple[nn.Module, float]:
    gen = seed_all(seed)
    model = _make_model(cfg, regime)
    step = _step_fn(model, regime, lam, cfg.lr, gen)
    secs = run_steps(step, model, X, Y, strict=regime in ("strict", "rpp"), steps=steps, batch=cfg.batch,
                     generator=gen)
    return model, secs


def run(cfg: PlumeConfig, seed: int = 0, out: str | None = None, log=print, tag: str = "") -> dict:
    """Run the PhiFlow experiment. Returns ``{"rows", "sweep", "info", "lambdas"}`` and writes
    ``phiflow{tag}_results.csv``, ``phiflow{tag}_table.md`` (``phiflow{tag}_sweep.csv``) and, with
    matplotlib, ``phiflow{tag}_rollout.png`` to ``out``."""
    t0 = time.perf_counter()
    sizes = (cfg.train_traj, cfg.val_traj, cfg.test_traj)
    frames = (cfg.frames, cfg.horizon + 1, cfg.horizon + 1)
    data, meta = plume_dataset(cfg.params, sizes, frames, seed=50_000 + seed, warmup=cfg.warmup, twins=cfg.twins,
                               cache_dir=cfg.cache_dir, log=log)
    train, val, test = (data[s] for s in PLUME_SPLITS)
    sc = SmokeScales.fit(train)
    X, Y = smoke_pairs(train, sc)
    X_test, _ = smoke_pairs(test, sc)
    steps_per_epoch = max(1, len(X) // cfg.batch)
    steps = cfg.epochs * steps_per_epoch
    info = dict(data_s=time.perf_counter() - t0, pairs=len(X), steps=steps, grid=cfg.params.grid,
                asymmetry=cfg.params.asymmetry, twin_difference=meta["twin_difference"], versions=meta["versions"],
                generation_s=meta["generation_s"])

    lam = {r: cfg.lambdas.get(r, 0.0) for r in cfg.regimes}
    gen = torch.Generator().manual_seed(0)
    timed = {r: _make_model(cfg, r) for r in cfg.regimes}
    for r in ("strict", "rpp"):
        if r in timed:
            eqnn.init_equivariant_(timed[r])
    step_s = interleaved_step_times({r: _step_fn(m, r, lam[r], cfg.lr, gen) for r, m in timed.items()}, X, Y,
                                    batch=cfg.batch, repeats=6, generator=gen)
    info["step_s"] = step_s
    equal_time_steps = steps
    if "data_time" in step_s and "projection" in step_s:
        equal_time_steps = max(1, round(steps * step_s["projection"] / step_s["data_time"]))
    info["equal_time_steps"] = equal_time_steps
    log("  step time: " + ", ".join(f"{r} {1e3 * s:.0f} ms" for r, s in step_s.items())
        + f" -> {equal_time_steps} data-level steps at equal time (vs {steps})")
    n_steps = lambda regime: equal_time_steps if regime == "data_time" else steps  # noqa: E731

    sweep, fitted = [], {}
    for regime, values in cfg.sweep.items():
        if regime not in cfg.regimes:
            continue
        best = None
        for value in values:
            model, secs = _fit(cfg, regime, value, n_steps(regime), 1000 * seed, X, Y)
            fitted[regime, value] = (model, secs)
            score = float(smoke_rollout(model, val, sc, cfg.horizon)[0].mean())
            sweep.append({"regime": regime, "lam": value, "val_rollout_rmse": score, "train_s": secs})
            log(f"  sweep {regime} lambda={value:g}: validation rollout RMSE {score:.4f}")
            if best is None or score < best[0]:
                best = (score, value)
        lam[regime] = best[1]

    rows, curves = [], {}
    for r in range(cfg.seeds):
        for regime in cfg.regimes:
            n = n_steps(regime)
            if r == 0 and (regime, lam[regime]) in fitted:  # the sweep's fit with this seed
                model, secs = fitted[regime, lam[regime]]
            else:
                model, secs = _fit(cfg, regime, lam[regime], n, 1000 * seed + r, X, Y)
            rmse, _ = smoke_rollout(model, test, sc, cfg.horizon)
            rows.append(dict(regime=regime, lam=lam[regime], seed=1000 * seed + r, steps=n, train_s=secs,
                             step_ms=1e3 * secs / n, rollout_rmse=float(rmse.mean()), final_rmse=float(rmse[-1]),
                             one_step_rmse=float(rmse[0]), equiv_err=smoke_equivariance_error(model, X_test),
                             rel_E_perp=relative_e_perp(merged_copy(model))))
            curves.setdefault(regime, []).append(rmse)
        log(f"  phiflow seed {1000 * seed + r}: {len(cfg.regimes)} regimes done")
    info["total_s"] = time.perf_counter() - t0
    result = dict(rows=rows, sweep=sweep, info=info, lambdas=lam)
    if out:
        write_csv(rows, os.path.join(out, f"phiflow{tag}_results.csv"))
        if sweep:
            write_csv(sweep, os.path.join(out, f"phiflow{tag}_sweep.csv"))
        with open(os.path.join(out, f"phiflow{tag}_table.md"), "w") as f:
            f.write(format_table(result) + "\n")
        plot_rollout(curves, os.path.join(out, f"phiflow{tag}_rollout.png"), info, log)
    return result


def format_table(result: dict) -> str:
    rows, info = result["rows"], result["info"]
    seeds = len({r["seed"] for r in rows})
    out = [f"PhiFlow smoke plumes ({info['grid']}x{info['grid']}, PhiFlow {info['versions']['phiflow']}, asymmetry "
           f"{info['asymmetry']:g}: rotated-twin difference {info['twin_difference']:.2e}; {info['pairs']} training "
           f"pairs; C4-declared CNN); mean ± std over {seeds} seed(s)\n",
           "| regime | λ (η) | steps | time/step (ms) | one-step RMSE | rollout RMSE | final-step RMSE | "
           "equivariance error | E_perp / ‖W‖² |",
           "|---|---|---|---|---|---|---|---|---|"]
    for regime in dict.fromkeys(r["regime"] for r in rows):
        rs = [r for r in rows if r["regime"] == regime]

        def ms(key, fmt):
            m, s = mean_std([r[key] for r in rs])
            return f"{m:{fmt}} ± {s:{fmt}}" if len(rs) > 1 else f"{m:{fmt}}"

        lam = f"{rs[0]['lam']:g}" if regime not in ("none", "strict") else "–"
        out.append(f"| {REGIMES[regime]} | {lam} | {rs[0]['steps']} | {1e3 * info['step_s'][regime]:.1f} | "
                   f"{ms('one_step_rmse', '.4f')} | {ms('rollout_rmse', '.4f')} | {ms('final_rmse', '.4f')} | "
                   f"{ms('equiv_err', '.2e')} | {ms('rel_E_perp', '.1e')} |")
    out.append("\ntime/step: median of interleaved steps in the same run (the data-level run's step count "
               "matches the projection run's wall-clock time).")
    if result["sweep"]:
        out.append("\nλ chosen on validation plumes (seed 0, rollout RMSE): " + ", ".join(
            f"{s['regime']} λ={s['lam']:g}: {s['val_rollout_rmse']:.4f}" for s in result["sweep"]))
    return "\n".join(out)


def plot_rollout(curves: dict, path: str, info: dict, log=print) -> None:
    plt = pyplot(log)
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for regime, cs in curves.items():
        c = torch.stack(cs)
        m = c.mean(0)
        steps = torch.arange(1, len(m) + 1)
        ax.plot(steps, m, label=REGIMES[regime])
        if len(cs) > 1:
            s = c.std(0)
            ax.fill_between(steps, m - s, m + s, alpha=0.15)
    ax.set_xlabel("rollout step (frames)")
    ax.set_ylabel("RMSE (normalised fields)")
    ax.set_title(f"PhiFlow plumes {info['grid']}x{info['grid']}, asymmetry {info['asymmetry']:g}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"  wrote {path}")
