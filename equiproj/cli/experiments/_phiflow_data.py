"""The data of the PhiFlow experiment: smoke plumes simulated by PhiFlow (inflow position and buoyancy
direction varied, buoyancy strength depending on the direction), their rotated twins, and the
data set cached once per set of parameters and seed."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch

from ._smoke_data import c4_matrix, rotate_fields

__all__ = ["PHIFLOW_MISSING", "phiflow_available", "PlumeParams", "simulate_plumes", "plume_twin_difference",
           "default_cache_dir", "PLUME_SPLITS", "plume_dataset"]

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


#: the three parts of a data set
PLUME_SPLITS = ("train", "val", "test")


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
                        for a in _ARRAYS} for s in PLUME_SPLITS}
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
    for s, n, f in zip(PLUME_SPLITS, sizes, frames):
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
              for s in PLUME_SPLITS for a in _ARRAYS}
    tmp = path[:-4] + f".tmp{os.getpid()}.npz"
    np.savez_compressed(tmp, meta=np.array(json.dumps(meta)), **arrays)
    os.replace(tmp, path)
    log(f"  plumes: {meta['generation_s']:.0f} s; rotated-twin difference {twin:.2e}; wrote {path} "
        f"({os.path.getsize(path) / 2**20:.1f} MiB)")
    # what is trained on is what was stored: float16, as a later run loads it
    data = {s: {a: torch.from_numpy(arrays[f"{s}_{a}"].astype(np.float64 if a != "direction_index" else np.int64))
                for a in _ARRAYS} for s in PLUME_SPLITS}
    return data, meta
