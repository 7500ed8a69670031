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
``j``-th direction (``j = 0, 1, 2, 3``: +y, +x, -y, -x; ``PlumeParams.direction = j`` fixes it for every plume): the strength depends on the direction, as
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

import hashlib
import importlib.util
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from torch import nn

from .. import nn as eqnn
from ..groups import Cyclic
from ._relaxed import REGIMES, merged_copy, relaxed_step, residual_pathway_
from ._smoke import (SmokeScales, c4_matrix, rotate_fields, smoke_data_penalty,
                     smoke_equivariance_error, smoke_pairs, smoke_rollout)
from ._training import interleaved_step_times, mean_std, pyplot, relative_noneq_energy, run_steps, seed_all, write_csv

__all__ = ["PHIFLOW_MISSING", "phiflow_available", "PlumeParams", "simulate_plumes", "plume_twin_difference",
           "plume_dataset", "default_cache_dir", "C4PlumeNet", "PlumeConfig", "run_phiflow", "format_phiflow_table"]

PHIFLOW_MISSING = ("PhiFlow is not installed: pip install phiflow==3.4.0 (or pip install 'equiproj[experiments]'); "
                   "the phiflow experiment is skipped")


def phiflow_available() -> bool:
    return importlib.util.find_spec("phi") is not None


def _flow():
    """PhiFlow's ``phi.torch.flow`` namespace (torch backend), imported on first use."""
    try:
        with warnings.catch_warnings():  # phiml's imports of numpy internals
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            from phi.torch import flow
    except ImportError as e:
        raise ImportError(PHIFLOW_MISSING) from e
    return flow


def _versions() -> dict:
    import phi
    import phiml

    return {"phiflow": phi.__version__, "phiml": phiml.__version__, "torch": torch.__version__}


@dataclass
class PlumeParams:
    """Simulation parameters (cell size 1, time step ``dt``)."""

    grid: int = 64
    buoyancy: float = 0.1  # strength along the first direction (+y)
    asymmetry: float = 0.5  # relative growth of the strength over the four directions: the symmetry breaking
    inflow_rate: float = 0.2
    dt: float = 1.0
    tolerance: float = 1e-6  # relative and absolute tolerance of the pressure solve
    direction: int | None = None  # None: each plume's direction uniform over the four; j: always the j-th


def _configs(params: PlumeParams, n: int, generator: torch.Generator) -> dict:
    """Random trajectories: direction index ``j [n]``, inflow centre ``[n, 2]`` (x, y), unit direction ``[n, 2]``."""
    N = params.grid
    j = torch.randint(0, 4, (n,), generator=generator)
    if params.direction is not None:
        j = torch.full((n,), int(params.direction) % 4, dtype=torch.long)
    offset = (torch.rand(n, generator=generator, dtype=torch.float64) - 0.5) * (N / 2)
    base = torch.stack([N / 2 + offset, torch.full((n,), N * 6 / 64, dtype=torch.float64)], 1)
    up = torch.tensor([0.0, 1.0], dtype=torch.float64)
    c = torch.full((2,), N / 2, dtype=torch.float64)
    g = torch.stack([c4_matrix(int(k)) for k in j])
    return dict(j=j, centre=c + torch.einsum("nab,nb->na", g, base - c), direction=g @ up)


def _strength(params: PlumeParams, j: torch.Tensor) -> torch.Tensor:
    return params.buoyancy * (1.0 + params.asymmetry * j.to(torch.float64) / 3.0)


def _simulate(params: PlumeParams, centre: torch.Tensor, direction: torch.Tensor, strength: torch.Tensor,
              frames: int, warmup: int) -> dict:
    """PhiFlow run of a batch of trajectories; ``frames`` saved states after ``warmup`` steps."""
    flow = _flow()
    N = params.grid
    with flow.math.precision(64), warnings.catch_warnings():
        # the pressure of a closed box is defined up to a constant (the rank deficiency PhiFlow reports; CG
        # converges to one solution, whose gradient is the same); the rest are PhiFlow's notes about torch
        warnings.filterwarnings("ignore", message="Rank deficiency", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="Sparse (CSR tensor support|invariant checks)", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="spsolve requires")
        bounds = flow.Box(x=N, y=N)
        smoke = flow.CenteredGrid(0, flow.ZERO_GRADIENT, x=N, y=N, bounds=bounds)
        velocity = flow.StaggeredGrid(0, 0, x=N, y=N, bounds=bounds)
        vec = flow.channel(vector="x,y")
        centres = flow.tensor(centre.numpy(), flow.batch("traj"), vec)
        inflow = params.inflow_rate * flow.resample(flow.Sphere(center=centres, radius=max(1.5, N / 16)), to=smoke,
                                                    soft=True)
        force = flow.tensor((strength[:, None] * direction).numpy(), flow.batch("traj"), vec)
        pressure, states = None, []
        for t in range(warmup + frames):
            if t >= warmup:
                s = torch.from_numpy(smoke.values.numpy("traj,y,x"))[:, None]
                u = torch.from_numpy(velocity.at_centers().values.numpy("traj,vector,y,x"))
                states.append(torch.cat([s, u], 1))
            smoke = flow.advect.mac_cormack(smoke, velocity, params.dt) + inflow
            buoyancy = flow.resample(smoke * force, to=velocity) * params.dt
            velocity = flow.advect.semi_lagrangian(velocity, velocity, params.dt) + buoyancy
            solve = flow.Solve("scipy-CG", params.tolerance, params.tolerance, x0=pressure)
            velocity, pressure = flow.fluid.make_incompressible(velocity, (), solve)
        source = torch.from_numpy(inflow.values.numpy("traj,y,x"))[:, None]
    return dict(states=torch.stack(states, 1).to(torch.float64), source=source.to(torch.float64))


def _simulate_chunked(params: PlumeParams, centre, direction, strength, frames: int, warmup: int, chunk: int = 8,
                      log=None) -> dict:
    parts, n = [], len(centre)
    for i in range(0, n, chunk):
        t0 = time.perf_counter()
        parts.append(_simulate(params, centre[i : i + chunk], direction[i : i + chunk], strength[i : i + chunk], frames,
                               warmup))
        if log:
            log(f"    simulated {min(n, i + chunk)}/{n} plumes ({time.perf_counter() - t0:.0f} s)")
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _twin_configs(params: PlumeParams, cfg: dict) -> dict:
    """The configurations turned by 90 degrees: inflow and direction rotated, the next direction's index."""
    g = c4_matrix(1)
    c = torch.full((2,), params.grid / 2, dtype=torch.float64)
    return dict(j=(cfg["j"] + 1) % 4, centre=c + (cfg["centre"] - c) @ g.T, direction=cfg["direction"] @ g.T)


def _twin_difference(plumes: torch.Tensor, twins: torch.Tensor) -> float:
    return float((twins - rotate_fields(plumes, 1, ((1, 2),))).norm() / plumes.norm())


def simulate_plumes(params: PlumeParams, n: int, frames: int, generator: torch.Generator, warmup: int = 10,
                    chunk: int = 8, log=None) -> dict:
    """``n`` random plumes (see the module docstring). Returns ``states [n, frames, 3, N, N]`` (smoke,
    u_x, u_y at the cell centres; x = column, y = row), ``source [n, 1, N, N]`` (inflow per step),
    ``g_dir [n, 2]`` (unit buoyancy direction, seen by the model), ``strength [n]`` (not seen) and
    ``direction_index [n]``, float64."""
    cfg = _configs(params, n, generator)
    strength = _strength(params, cfg["j"])
    sim = _simulate_chunked(params, cfg["centre"], cfg["direction"], strength, frames, warmup, chunk, log)
    return dict(states=sim["states"], source=sim["source"], g_dir=cfg["direction"], strength=strength,
                direction_index=cfg["j"])


def plume_twin_difference(params: PlumeParams, n: int, frames: int, generator: torch.Generator,
                          warmup: int = 10) -> float:
    """How far the data are from C4-symmetric: ``n`` random plumes and their twins turned by 90 degrees
    (inflow and direction rotated, the strength that of the new direction), ``||twin - g plume|| /
    ||plume||`` over the saved frames. About 1e-10 at ``asymmetry = 0`` (the solver's own symmetry)."""
    cfg = _configs(params, n, generator)
    twin = _twin_configs(params, cfg)
    both = {k: torch.cat([cfg[k], twin[k]]) for k in cfg}
    sim = _simulate(params, both["centre"], both["direction"], _strength(params, both["j"]), frames, warmup)
    return _twin_difference(sim["states"][:n], sim["states"][n:])


def default_cache_dir() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "equiproj")


_SPLITS = ("train", "val", "test")
_ARRAYS = ("states", "source", "g_dir", "strength", "direction_index")


def plume_dataset(params: PlumeParams, sizes: tuple[int, int, int], frames: tuple[int, int, int], *, seed: int,
                  warmup: int, twins: int = 2, cache_dir: str | None = None, log=print) -> tuple[dict, dict]:
    """The train/val/test plumes (``sizes`` trajectories of ``frames`` saved frames each) and their
    metadata, from the cache file ``plumes_<grid>_<hash of the parameters and seed>.npz`` in
    ``cache_dir`` (default :func:`default_cache_dir`) or generated and written there: float16 states
    and sources, compressed; the metadata (parameters, seed, PhiFlow, phiml and torch versions,
    generation time, :func:`plume_twin_difference` of ``twins`` plumes) as JSON inside."""
    # a key without "direction" when it is the default, so that data cached before it existed are found
    key = dict(params={k: v for k, v in asdict(params).items() if not (k == "direction" and v is None)}, sizes=list(sizes), frames=list(frames), seed=seed, warmup=warmup, twins=twins)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, f"plumes_{params.grid}_{digest}.npz")
    if os.path.exists(path):
        with np.load(path) as f:
            meta = json.loads(str(f["meta"]))
            data = {s: {a: torch.from_numpy(f[f"{s}_{a}"].astype(np.float64 if a != "direction_index" else np.int64))
                        for a in _ARRAYS} for s in _SPLITS}
        log(f"  plumes: loaded {path} (generated with PhiFlow {meta['versions']['phiflow']}, seed {meta['seed']})")
        return data, meta
    flow_versions = (_flow(), _versions())[1]
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    log(f"  plumes: simulating {sum(sizes)} trajectories on a {params.grid}x{params.grid} grid with PhiFlow "
        f"{flow_versions['phiflow']} (cache miss: {path})")
    # every trajectory (the twins' too) in batches of up to 8, for the longest split's frames
    cfgs = [_configs(params, n, gen) for n in (*sizes, twins)]
    cfgs.append(_twin_configs(params, cfgs[-1]))
    both = {k: torch.cat([c[k] for c in cfgs]) for k in cfgs[0]}
    strength = _strength(params, both["j"])
    sim = _simulate_chunked(params, both["centre"], both["direction"], strength, max(frames), warmup, log=log)
    data, start = {}, 0
    for s, n, f in zip(_SPLITS, sizes, frames):
        part = slice(start, start + n)
        data[s] = dict(states=sim["states"][part, :f], source=sim["source"][part], g_dir=both["direction"][part],
                       strength=strength[part], direction_index=both["j"][part])
        start += n
    twin = (_twin_difference(sim["states"][start : start + twins, : frames[2]],
                             sim["states"][start + twins :, : frames[2]]) if twins else float("nan"))
    meta = dict(key, digest=digest, versions=flow_versions, generation_s=time.perf_counter() - t0, twin_difference=twin)
    os.makedirs(cache_dir, exist_ok=True)
    arrays = {f"{s}_{a}": data[s][a].numpy().astype(np.float16 if a in ("states", "source") else
                                                      np.int8 if a == "direction_index" else np.float32)
              for s in _SPLITS for a in _ARRAYS}
    tmp = path[:-4] + f".tmp{os.getpid()}.npz"
    np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), **arrays)
    os.replace(tmp, path)
    log(f"  plumes: {meta['generation_s']:.0f} s; rotated-twin difference {twin:.2e}; wrote {path} "
        f"({os.path.getsize(path) / 2**20:.1f} MiB)")
    # what is trained on is what was stored: float16, as a later run loads it
    data = {s: {a: torch.from_numpy(arrays[f"{s}_{a}"].astype(np.float64 if a != "direction_index" else np.int64))
                for a in _ARRAYS} for s in _SPLITS}
    return data, meta


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
class PlumeConfig:
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


def run_phiflow(cfg: PlumeConfig, seed: int = 0, out: str | None = None, log=print, tag: str = "") -> dict:
    """Run the PhiFlow experiment. Returns ``{"rows", "sweep", "info", "lambdas"}`` and writes
    ``phiflow{tag}_results.csv``, ``phiflow{tag}_table.md`` (``phiflow{tag}_sweep.csv``) and, with
    matplotlib, ``phiflow{tag}_rollout.png`` to ``out``."""
    t0 = time.perf_counter()
    sizes = (cfg.train_traj, cfg.val_traj, cfg.test_traj)
    frames = (cfg.frames, cfg.horizon + 1, cfg.horizon + 1)
    data, meta = plume_dataset(cfg.params, sizes, frames, seed=50_000 + seed, warmup=cfg.warmup, twins=cfg.twins,
                               cache_dir=cfg.cache_dir, log=log)
    train, val, test = (data[s] for s in _SPLITS)
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
                             rel_E_perp=relative_noneq_energy(merged_copy(model))))
            curves.setdefault(regime, []).append(rmse)
        log(f"  phiflow seed {1000 * seed + r}: {len(cfg.regimes)} regimes done")
    info["total_s"] = time.perf_counter() - t0
    result = dict(rows=rows, sweep=sweep, info=info, lambdas=lam)
    if out:
        write_csv(rows, os.path.join(out, f"phiflow{tag}_results.csv"))
        if sweep:
            write_csv(sweep, os.path.join(out, f"phiflow{tag}_sweep.csv"))
        with open(os.path.join(out, f"phiflow{tag}_table.md"), "w") as f:
            f.write(format_phiflow_table(result) + "\n")
        plot_rollout(curves, os.path.join(out, f"phiflow{tag}_rollout.png"), info, log)
    return result


def format_phiflow_table(result: dict) -> str:
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
