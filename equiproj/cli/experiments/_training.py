"""What the experiments share: seeding, one training step per regime, timing, validation sweeps, output."""

from __future__ import annotations

import csv
import time

import torch
from torch import nn

from ... import nn as eqnn

__all__ = ["relative_e_perp", "seed_all", "mean_std", "regime_step", "run_steps", "interleaved_step_times",
           "validation_sweep", "write_csv", "pyplot"]


@torch.no_grad()
def relative_e_perp(model: nn.Module) -> float:
    """``sum E_perp / sum ||W||^2`` over the declared layers (biases included)."""
    e_perp, e_g = eqnn.ProjectionPenalty(model, 1.0).energies()
    return float(e_perp.sum() / (e_perp.sum() + e_g.sum()))


def seed_all(seed: int) -> torch.Generator:
    torch.manual_seed(seed)  # layer initialisation uses the global generator
    return torch.Generator().manual_seed(seed)


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else 0.0


def regime_step(model: nn.Module, regime: str, lam: float, lr: float, task_loss, data_penalty):
    """One training step ``step(x, y)`` of a regime: Adam on ``task_loss(model(x), y)`` plus the
    regime's penalty: ``"projection"`` adds ``ProjectionPenalty(model, lam)()``; ``"data_time"`` /
    ``"data_steps"`` add ``lam * data_penalty(model, x, model(x))`` (one sampled group element, one
    extra forward and backward); ``"strict"`` projects after the step, ``"decoupled"`` shrinks the
    non-equivariant part by ``lam`` (:meth:`equiproj.nn.ProjectionPenalty.decay_`)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    penalty = eqnn.ProjectionPenalty(model, lam) if regime in ("projection", "decoupled") else None

    def step(x, y):
        pred = model(x)
        loss = task_loss(pred, y)
        if regime == "projection":
            loss = loss + penalty()
        elif regime in ("data_time", "data_steps"):
            loss = loss + lam * data_penalty(model, x, pred)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if regime == "strict":
            eqnn.project_(model)
        elif regime == "decoupled":
            penalty.decay_(lam)

    return step


def run_steps(step, model: nn.Module, X: torch.Tensor, Y: torch.Tensor, *, strict: bool, steps: int, batch: int,
              generator: torch.Generator) -> float:
    """``step(x, y)`` on ``steps`` mini-batches (epochs of a seeded permutation of ``X``, ``Y``);
    a strict model starts from :func:`equiproj.nn.init_equivariant_`. Returns the training time in seconds."""
    t0 = time.perf_counter()
    if strict:
        eqnn.init_equivariant_(model)
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


def write_csv(rows: list[dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def pyplot(log):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("  matplotlib is not installed: PNGs skipped (pip install matplotlib); tables and CSVs are complete")
        return None
    return plt
