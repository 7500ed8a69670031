"""Experiment 3 of ``equiproj demo``: a 3-D O(3) toy, synthetic voxel shapes whose label depends
weakly on orientation, classified by a 3-D CNN whose convolutions are declared O(3)-equivariant.

Data (:func:`voxel_shapes`). Four classes of shapes made of Gaussian bumps, each drawn at a
uniformly random orientation (Haar O(3)) and rendered on a ``grid^3`` voxel grid:

* ``stick``: 3-5 bumps on a segment (main axis: the segment);
* ``ring``: 6 bumps on a circle (main axis: its normal);
* ``tetrahedron``: 4 bumps at the vertices of a regular tetrahedron;
* ``octahedron``: 6 bumps at the vertices of a regular octahedron.

Size, bump width and amplitudes are random, bump positions are jittered, the shape is shifted by
a sub-voxel offset, and i.i.d. Gaussian noise is added per voxel. The class is a property of the
shape, not of its orientation. The symmetry-breaking term: a stick or ring whose main axis lies
within ``cone_deg`` of the z axis gets the *other* label (stick <-> ring) with probability
``breaking``. At ``breaking = 0`` the labels are O(3)-invariant; at ``breaking = 1`` about 9 % of
the labels (``cone_deg = 35``) depend on the orientation, so an invariant classifier is capped at
about 91 % and only a non-invariant one can do better.

Model (:class:`O3VoxelNet`): three plain ``nn.Conv3d`` (kernel 5, then 3, 3) declared with
:func:`equiproj.nn.declare` on O(3) reps (``0e`` input; hidden ``s x 0e + v x 1o + t x 2e`` plus
one gate scalar per non-scalar field; scalar output): the kernel-space case, band-limited
steerable kernels of :func:`equiproj.kernel_spaces.default_kernel_space`. Gated nonlinearity (SiLU on
scalars, ``sigmoid(gate)`` times each vector / l=2 field: exactly equivariant), a 2x average pool
after the first layer, global average pooling of the output scalars, a linear classifier on
these invariants. Zero padding and the even-sized pooling keep the whole network exactly
invariant under the 48 symmetries of the cube once its kernels are projected.

Regimes: no penalty; the projection penalty ``lambda sum E_perp`` (``ProjectionPenalty``); the
data-level sampled penalty ``lambda E ||f(g x) - f(x)||^2`` (one random non-identity cube symmetry
per step, exact on the grid, through :func:`equiproj.baselines.sampled_data_penalty`: one extra
forward and backward pass) run for the wall-clock time of the projection run (step times of the
two penalties measured interleaved in the same run); strictly projected (``project_`` after every
step, from the projected initialisation rescaled to the default norm). The full run adds the
projection energy applied as a decoupled step ``W <- W - eta (W - P W)`` after each Adam step
(``ProjectionPenalty.decay_``, the form that won experiment 2). Lambdas (and eta) are chosen
on validation shapes in the full run.

Metrics: test accuracy (against the label, and against the shape class); the invariance error
on the grid, mean over (a subset of) the test inputs of the max over
the 47 non-identity cube symmetries g of ``max_c |p_c(g x) - p_c(x)|`` (p the softmax, exact
action on the voxels); the *smooth* invariance error, the same quantity for ``rotations`` random
O(3) elements acting on the shape before rendering (noise-free renders of the test shapes, so the
input rotation is exact and the strictly projected model's value is the floor set by the grid
and band-limited kernels); ``sum E_perp / sum ||W||^2`` of the declared layers; time per epoch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ... import nn as eqnn
from ...baselines import sampled_data_penalty
from ...grid import act as grid_act
from ...groups import O3, FullOctahedral, Rep
from ._config import ExperimentConfig
from ._training import (interleaved_step_times, mean_std, regime_step, relative_e_perp, run_steps, seed_all,
                        validation_sweep, write_csv)
from ._voxels_data import VOXEL_CLASSES, VoxelParams, render_shapes, voxel_shapes

__all__ = ["VOXEL_CLASSES", "VoxelParams", "voxel_shapes", "render_shapes", "O3VoxelNet",
           "cube_symmetries", "voxel_data_penalty", "train_voxels", "measure_step_times", "voxel_accuracy", "cube_invariance_error",
           "smooth_invariance_error", "VoxelConfig", "run", "format_table", "VOXEL_REGIMES"]

VOXEL_REGIMES = {
    "none": "no penalty",
    "projection": "projection penalty",
    "data_time": "data-level penalty, equal time",
    "data_steps": "data-level penalty, equal steps",
    "strict": "strictly projected",
    "decoupled": "projection penalty, decoupled step",
}


# =============================================================================================
# Model
# =============================================================================================

class O3VoxelNet(nn.Module):
    """``[B, 1, N, N, N] -> logits [B, classes]`` (N even): Conv3d(k=5) -> gate -> avg-pool 2 ->
    Conv3d(k=3) -> gate -> Conv3d(k=3) to ``out_scalars x 0e`` -> SiLU -> global mean -> Linear.

    Hidden fields: ``scalars x 0e + vectors x 1o + tensors x 2e`` (conv outputs carry one more
    ``0e`` gate per non-scalar field). Every conv is a plain ``nn.Conv3d`` (zero padding, same
    size) declared O(3)-equivariant in the default steerable kernel space; the classifier acts
    on invariants only (not declared: ``0e -> 0e`` maps are all equivariant).
    """

    def __init__(self, scalars: int = 8, vectors: int = 4, tensors: int = 2, out_scalars: int = 16,
                 classes: int = len(VOXEL_CLASSES)):
        super().__init__()
        G = O3()
        dims = [3] * vectors + [5] * tensors
        fields = " + ".join(f for f in (f"{vectors}x1o" if vectors else "", f"{tensors}x2e" if tensors else "") if f)
        hidden = Rep.parse(G, f"{scalars}x0e" + (" + " + fields if fields else ""))
        gated = Rep.parse(G, f"{scalars + len(dims)}x0e" + (" + " + fields if fields else ""))
        reps = [(Rep.parse(G, "0e"), gated, 5), (hidden, gated, 3), (hidden, Rep.parse(G, f"{out_scalars}x0e"), 3)]
        self.convs = nn.ModuleList(nn.Conv3d(a.dim, b.dim, k, padding=k // 2) for a, b, k in reps)
        for conv, (a, b, _) in zip(self.convs, reps):
            eqnn.declare(conv, a, b)
        if not fields:
            raise ValueError("O3VoxelNet needs vector or tensor fields (vectors + tensors > 0)")
        self.gate = eqnn.Gate(Rep.parse(G, f"{scalars}x0e"), Rep.parse(G, f"{len(dims)}x0e"), Rep.parse(G, fields))
        self.classifier = nn.Linear(out_scalars, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled invariants ``[B, out_scalars]`` that the classifier sees."""
        h = F.avg_pool3d(self.gate(self.convs[0](x)), 2)
        h = self.gate(self.convs[1](h))
        return F.silu(self.convs[2](h)).mean((-3, -2, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# =============================================================================================
# Training
# =============================================================================================

def cube_symmetries() -> torch.Tensor:
    """The 48 symmetries of the cube ``[48, 3, 3]`` float64 (signed permutations; index 0 is not
    assumed to be the identity: use :func:`_non_identity`)."""
    return FullOctahedral().elements()


def _non_identity(elements: torch.Tensor) -> torch.Tensor:
    eye = torch.eye(3, dtype=elements.dtype)
    return elements[~(elements == eye).flatten(1).all(1)]


def _act_voxels(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return grid_act(x, g)


def voxel_data_penalty(model: nn.Module, x: torch.Tensor, logits: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``mean_batch ||f(g x) - f(x)||^2`` on the logits for one cube symmetry ``g [3, 3]`` (the output
    is invariant): :func:`equiproj.baselines.sampled_data_penalty` with that element. One extra
    forward and backward pass."""
    return sampled_data_penalty(model, x, FullOctahedral(), act_in=_act_voxels, act_out=lambda g, y: y,
                                fx=logits, elements=g[None])


def _step_fn(model: nn.Module, regime: str, lam: float, lr: float, generator: torch.Generator):
    elements = _non_identity(cube_symmetries())

    def data_penalty(model, x, logits):
        g = elements[int(torch.randint(len(elements), (1,), generator=generator))]
        return voxel_data_penalty(model, x, logits, g)

    return regime_step(model, regime, lam, lr, F.cross_entropy, data_penalty)


def train_voxels(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, *, regime: str, lam: float, steps: int,
                 batch: int, lr: float, generator: torch.Generator) -> float:
    """Adam on the cross-entropy (+ the regime's penalty) for ``steps`` mini-batches (epochs of a
    seeded permutation); ``X [n, 1, N, N, N]``, ``Y [n]``. Returns the training time in seconds."""
    if regime not in VOXEL_REGIMES:
        raise ValueError(f"unknown regime {regime!r}; expected one of {list(VOXEL_REGIMES)}")
    step = _step_fn(model, regime, lam, lr, generator)
    return run_steps(step, model, X, Y, strict=regime == "strict", steps=steps, batch=batch, generator=generator)


def measure_step_times(make_model, X, Y, regimes, *, lams: dict, batch: int, lr: float, repeats: int = 6) -> dict:
    """Median seconds per training step of each regime, measured interleaved (after one warm-up
    step each) so that a change of machine load affects all regimes alike."""
    gen = torch.Generator().manual_seed(0)
    steps = {r: _step_fn(make_model(), r, lams.get(r, 0.0), lr, gen) for r in regimes}
    return interleaved_step_times(steps, X, Y, batch=batch, repeats=repeats, generator=gen)


# =============================================================================================
# Metrics
# =============================================================================================

@torch.no_grad()
def _probs(model: nn.Module, x: torch.Tensor, batch: int = 128) -> torch.Tensor:
    return torch.cat([torch.softmax(model(x[i : i + batch].float()), -1) for i in range(0, len(x), batch)])


@torch.no_grad()
def voxel_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((_probs(model, x).argmax(-1) == y).float().mean())


@torch.no_grad()
def cube_invariance_error(model: nn.Module, x: torch.Tensor, elements: torch.Tensor | None = None) -> float:
    """Mean over inputs ``x [n, 1, N, N, N]`` of ``max_g max_c |p_c(g x) - p_c(x)|`` over the cube
    symmetries ``elements`` (default: the 47 non-identity ones), exact on the voxel grid."""
    g_all = _non_identity(cube_symmetries()) if elements is None else elements
    p0 = _probs(model, x)
    worst = torch.zeros(len(x), dtype=p0.dtype)
    for g in g_all:
        worst = torch.maximum(worst, (_probs(model, grid_act(x, g)) - p0).abs().amax(-1))
    return float(worst.mean())


@torch.no_grad()
def smooth_invariance_error(model: nn.Module, data: dict, grid: int, generator: torch.Generator,
                            rotations: int = 8) -> float:
    """Mean over the shapes in ``data`` of ``max_R max_c |p_c(render(R s)) - p_c(render(s))|`` over
    ``rotations`` Haar-random O(3) elements ``R`` (one set for all shapes), noise-free renders:
    the input rotation is exact (it acts on the shape, not on voxels)."""
    R = O3().sample(rotations, generator=generator)
    p0 = _probs(model, render_shapes(data, grid))
    worst = torch.zeros(len(p0), dtype=p0.dtype)
    for r in R:
        worst = torch.maximum(worst, (_probs(model, render_shapes(data, grid, r)) - p0).abs().amax(-1))
    return float(worst.mean())


# =============================================================================================
# Experiment
# =============================================================================================

@dataclass
class VoxelConfig(ExperimentConfig):
    """Sizes of experiment 3 (``demo()`` / ``full()`` / ``tiny()``)."""

    params: VoxelParams = field(default_factory=VoxelParams)
    n_train: int = 512
    n_val: int = 256
    n_test: int = 512
    scalars: int = 8
    vectors: int = 4
    tensors: int = 2
    out_scalars: int = 16
    batch: int = 32
    lr: float = 3e-3
    epochs: int = 20
    seeds: int = 3
    lambda_perp: float = 1e-4  # used when no sweep is run: the full run's validation choices
    lambda_data: float = 0.1
    eta_decoupled: float = 0.5
    sweep_perp: tuple = ()  # validation sweep (seed 0) before the seeded runs
    sweep_data: tuple = ()
    sweep_decoupled: tuple = ()
    cube_test: int = 64  # test inputs for the cube invariance error (x 47 symmetries)
    smooth_test: int = 256  # test shapes for the smooth invariance error
    smooth_rotations: int = 8
    regimes: tuple = ("none", "projection", "data_time", "strict", "decoupled")

    @classmethod
    def demo(cls) -> "VoxelConfig":
        """The short version: 256 training shapes, 6 epochs, 1 seed, the four main regimes, fixed lambdas."""
        return cls(n_train=256, n_test=256, epochs=6, seeds=1, cube_test=32, smooth_test=128, smooth_rotations=4,
                   regimes=("none", "projection", "data_time", "strict"))

    @classmethod
    def full(cls) -> "VoxelConfig":
        """512 training shapes, 20 epochs, 3 seeds, lambdas (and eta) chosen on validation shapes."""
        return cls(sweep_perp=(1e-4, 1e-3, 1e-2), sweep_data=(0.1, 1.0, 10.0), sweep_decoupled=(0.05, 0.5))

    @classmethod
    def tiny(cls) -> "VoxelConfig":  # the test suite
        return cls(params=replace(VoxelParams(), grid=8), n_train=16, n_val=8, n_test=8, scalars=2, vectors=1,
                   tensors=1, out_scalars=4, batch=8, epochs=1, seeds=1, cube_test=4, smooth_test=4,
                   smooth_rotations=2)

    def model(self) -> O3VoxelNet:
        return O3VoxelNet(self.scalars, self.vectors, self.tensors, self.out_scalars)


def _fit(cfg: VoxelConfig, regime: str, lam: float, steps: int, seed: int, X, Y) -> tuple[O3VoxelNet, float]:
    gen = seed_all(seed)
    model = cfg.model()
    return model, train_voxels(model, X, Y, regime=regime, lam=lam, steps=steps, batch=cfg.batch, lr=cfg.lr,
                               generator=gen)


def run(cfg: VoxelConfig, seed: int = 0, out: str | None = None, log=print, tag: str = "") -> dict:
    """Run experiment 3. Returns ``{"rows": [...], "sweep": [...], "info": {...}, "lambdas": {...}}``
    (one row per (regime, seed)) and writes ``voxels{tag}_results.csv``, ``voxels{tag}_table.md``
    (and ``voxels{tag}_sweep.csv``) to ``out``."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(30_000 + seed)
    p = cfg.params
    train, val, test = (voxel_shapes(n, p, gen) for n in (cfg.n_train, cfg.n_val, cfg.n_test))
    X, Y = train["x"], train["y"]
    steps_per_epoch = max(1, len(X) // cfg.batch)
    steps = cfg.epochs * steps_per_epoch
    swapped = float((test["y"] != test["cls"]).float().mean())
    info = dict(data_s=time.perf_counter() - t0, grid=p.grid, breaking=p.breaking, cone_deg=p.cone_deg,
                n_train=cfg.n_train, steps_per_epoch=steps_per_epoch, swapped_test=swapped)
    log(f"  voxels data: {cfg.n_train}+{cfg.n_val}+{cfg.n_test} shapes on {p.grid}^3 in {info['data_s']:.1f} s; "
        f"{100 * swapped:.1f}% of test labels orientation-dependent (breaking {p.breaking:g})")

    lam = {"projection": cfg.lambda_perp, "data_time": cfg.lambda_data, "data_steps": cfg.lambda_data,
           "decoupled": cfg.eta_decoupled}
    sweep = validation_sweep(
        cfg, lam, lambda regime, value: _fit(cfg, regime, value, steps, 1000 * seed, X, Y),
        lambda model: voxel_accuracy(model, val["x"], val["y"]), key="val_acc", higher_is_better=True,
        describe=lambda acc: f"validation accuracy {100 * acc:.1f}%", log=log)

    step_s = measure_step_times(cfg.model, X, Y, ("projection", "data_steps", "none"), lams=lam, batch=cfg.batch,
                                lr=cfg.lr)
    info["step_s"] = step_s
    equal_time_steps = max(1, round(steps * step_s["projection"] / step_s["data_steps"]))
    info["equal_time_steps"] = equal_time_steps
    log(f"  step time: none {1e3 * step_s['none']:.0f} ms, projection {1e3 * step_s['projection']:.0f} ms, "
        f"data-level {1e3 * step_s['data_steps']:.0f} ms -> {equal_time_steps} data-level steps at equal time "
        f"(vs {steps})")

    smooth_subset = {k: v[: cfg.smooth_test] for k, v in test.items()}
    rows = []
    for r in range(cfg.seeds):
        for regime in cfg.regimes:
            n = equal_time_steps if regime == "data_time" else steps
            model, secs = _fit(cfg, regime, lam.get(regime, 0.0), n, 1000 * seed + r, X, Y)
            rot_gen = torch.Generator().manual_seed(seed + 7)
            rows.append(dict(regime=regime, lam=lam.get(regime, 0.0), seed=1000 * seed + r, steps=n,
                             epochs=n / steps_per_epoch, train_s=secs, epoch_s=secs * steps_per_epoch / n,
                             test_acc=voxel_accuracy(model, test["x"], test["y"]),
                             test_acc_unswapped=voxel_accuracy(model, test["x"], test["cls"]),
                             cube_inv_err=cube_invariance_error(model, test["x"][: cfg.cube_test]),
                             smooth_inv_err=smooth_invariance_error(model, smooth_subset, p.grid, rot_gen,
                                                                    cfg.smooth_rotations),
                             rel_E_perp=relative_e_perp(model)))
            log(f"  voxels seed {1000 * seed + r} {regime}: test accuracy {100 * rows[-1]['test_acc']:.1f}%, "
                f"{secs:.1f} s")
    info["total_s"] = time.perf_counter() - t0
    result = dict(rows=rows, sweep=sweep, info=info, lambdas=lam)
    if out:
        write_csv(rows, os.path.join(out, f"voxels{tag}_results.csv"))
        if sweep:
            write_csv(sweep, os.path.join(out, f"voxels{tag}_sweep.csv"))
        with open(os.path.join(out, f"voxels{tag}_table.md"), "w") as f:
            f.write(format_table(result) + "\n")
    return result


def format_table(result: dict) -> str:
    """Markdown table: one line per regime, mean ± std over seeds."""
    rows, info = result["rows"], result["info"]
    seeds = len({r["seed"] for r in rows})
    out = [f"Experiment 3 (O(3) voxel shapes, {info['grid']}^3, O(3)-declared 3-D CNN, breaking {info['breaking']:g}: "
           f"{100 * info['swapped_test']:.1f}% of test labels depend on orientation); mean ± std over {seeds} seed(s)\n",
           "| regime | λ (η) | steps | time/epoch (s) | test acc. % | acc. vs shape class % | invariance error, cube "
           "(48) | invariance error, smooth O(3) | E_perp / ‖W‖² |",
           "|---|---|---|---|---|---|---|---|---|"]
    for regime in dict.fromkeys(r["regime"] for r in rows):
        rs = [r for r in rows if r["regime"] == regime]

        def ms(key, fmt, scale=1.0):
            m, s = mean_std([scale * r[key] for r in rs])
            return f"{m:{fmt}} ± {s:{fmt}}" if len(rs) > 1 else f"{m:{fmt}}"

        lam = f"{rs[0]['lam']:g}" if regime not in ("none", "strict") else "–"
        out.append(f"| {VOXEL_REGIMES[regime]} | {lam} | {rs[0]['steps']} | {ms('epoch_s', '.2f')} | "
                   f"{ms('test_acc', '.1f', 100)} | {ms('test_acc_unswapped', '.1f', 100)} | {ms('cube_inv_err', '.2e')} | "
                   f"{ms('smooth_inv_err', '.2e')} | {ms('rel_E_perp', '.1e')} |")
    st = info["step_s"]
    out.append(f"\nStep time (same run, interleaved): no penalty {1e3 * st['none']:.1f} ms, projection penalty "
               f"{1e3 * st['projection']:.1f} ms, data-level penalty {1e3 * st['data_steps']:.1f} ms (data-level / "
               f"projection {st['data_steps'] / st['projection']:.2f}).")
    if result["sweep"]:
        out.append("\nλ chosen on validation shapes (seed 0, accuracy): " + ", ".join(
            f"{s['regime']} λ={s['lam']:g}: {100 * s['val_acc']:.1f}%" for s in result["sweep"]))
    return "\n".join(out)
