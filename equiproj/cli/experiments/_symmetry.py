"""Experiment ``symmetry``: which subgroup of D4 did the model keep? The symmetry spectrum of models
declared under D4 and trained with a weak projection penalty, on data whose symmetry is known.

Cases (each trained with ``seeds`` seeds; data generated once per case):

* ``chirality`` (synthetic, exact answer C4): 12x12 images of one of ``patterns`` random 4x4 binary
  patterns, or of its mirror image, turned by a random multiple of 90 degrees and placed at a random
  position; the label is the handedness; every image comes with its 8 images under D4. Labels are invariant under the rotations
  and flip under every reflection, so the classifier (D4 grid convs, regular fields, global average
  pool, a linear map to one logit declared ``regular -> trivial``) can keep C4 and nothing above it.
* ``plume_fixed`` (PhiFlow, :mod:`._phiflow`): buoyancy along +x for every plume, at equal strength,
  the model does not see the direction. The one-frame map commutes with the reflection ``y -> -y``
  only: the answer is ``D1[0]`` (the reflection ``F = diag(1, -1)``).
* ``plume_four``: the direction uniform over the four axis directions at equal strength, and the
  model sees it (two more input channels, a standard field): the map is D4-equivariant; all of D4
  survives.
* ``plume_strength``: the existing data (strength grows from one direction to the next, asymmetry
  0.5), direction seen: no element but the identity maps the set of strengths onto itself, so only
  C1 survives exactly; the spectrum shows how much each subgroup is broken.

Model for the plumes: 3x3 zero-padded D4 grid convs (``hidden_fields`` regular fields, ReLU on the
regular fields), input smoke, inflow, velocity (and direction), output the change of smoke and velocity
over one frame (normalised as in :mod:`._smoke`). Training: from an exactly D4-equivariant start
(``init_equivariant_``), Adam with a cosine-annealed learning rate on the task loss plus
``lam * E_perp^D4`` (a weak, uniform pull towards D4: what the data do not ask for stays near 0, what
they ask for grows; the annealing keeps the optimiser's noise out of the end point).

Reading: per case and seed, the model-level row of :func:`equiproj.nn.symmetry_spectrum`; the
separation is ``min_{H not in S} E^H / E^S`` for the expected survivor S (how far the spectrum's
value at S lies below that of every subgroup that is not part of S), and the *recovered* subgroup is
the largest proper subgroup (other than C1, whose value is always 0) whose separation is at least
``ratio``, or D4 when no subgroup stands out.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ... import nn as eqnn
from ...groups import Dihedral
from ._config import ExperimentConfig
from ._phiflow_data import PHIFLOW_MISSING, PlumeParams, phiflow_available, plume_dataset
from ._smoke import SmokeScales, smoke_pairs
from ._training import mean_std, pyplot, run_steps, seed_all, write_csv

__all__ = ["SymmetryConfig", "run", "format_table", "expected_survivor", "ChiralityNet", "D4PlumeNet",
           "chiral_patterns", "chirality_images"]

#: the subgroup of D4 that each case keeps exactly
expected_survivor = {"chirality": "C4", "plume_fixed": "D1[0]", "plume_four": "D4", "plume_strength": "C1"}


@dataclass
class SymmetryConfig(ExperimentConfig):
    """Sizes of the symmetry experiment (``demo()`` / ``full()`` / ``tiny()``)."""

    cases: tuple = ("chirality", "plume_fixed", "plume_four", "plume_strength")
    seeds: int = 3
    lam: float = 1.0  # the weight of the projection penalty lam * E_perp^D4 in the loss
    ratio: float = 10.0  # a subgroup is singled out when its value is this many times below all not inside it
    lr: float = 3e-3  # Adam, annealed to 0 (cosine) so that the end is not set by the optimiser's noise
    batch: int = 32
    # chirality
    patterns: int = 3
    images: int = 32  # base images; the data set holds each with its 8 D4 images (labels flipped by reflections)
    image_steps: int = 300  # full-batch steps (a mini-batch's own asymmetry would break C4 at about 1e-3)
    image_fields: int = 4
    # plumes
    grid: int = 32
    train_traj: int = 6
    test_traj: int = 2
    frames: int = 10
    warmup: int = 10
    plume_steps: int = 300
    plume_fields: int = 4
    cache_dir: str | None = None
    params: PlumeParams = field(default_factory=lambda: replace(PlumeParams(), grid=32))

    @classmethod
    def demo(cls) -> "SymmetryConfig":
        """3 seeds, the four cases, 32x32 plumes: about 10 minutes on 2 shared cores (data cached after)."""
        return cls()

    @classmethod
    def full(cls) -> "SymmetryConfig":
        return cls()

    @classmethod
    def tiny(cls) -> "SymmetryConfig":  # the test suite
        return cls(cases=("chirality",), seeds=1, images=8, image_steps=20, patterns=2, image_fields=1)


# ---------------------------------------------------------------------------------------------
# the synthetic case
# ---------------------------------------------------------------------------------------------
def chiral_patterns(k: int, generator: torch.Generator, size: int = 4) -> list[torch.Tensor]:
    """``k`` random ``size x size`` binary patterns that are chiral: no rotation of the mirror image is the pattern."""
    bases = []
    while len(bases) < k:
        p = (torch.rand(size, size, generator=generator) < 0.5).float()
        mirrors = [torch.rot90(p.flip(-1), r, (-2, -1)) for r in range(4)]
        if not any(torch.equal(p, m) for m in mirrors) and p.sum() > 2:
            bases.append(p)
    return bases


def chirality_images(n: int, bases: list[torch.Tensor], generator: torch.Generator, canvas: int = 12):
    """``(x [8 n, 1, canvas, canvas], label [8 n])``: ``n`` images of one of the ``bases`` (label 0) or of its
    mirror (label 1), turned by a random multiple of 90 degrees, at a random position; each with its 8
    images under D4 (the rotations keep the label, the reflections flip it), so that the data set itself
    has exactly the symmetry."""
    patterns, size = len(bases), bases[0].shape[-1]
    which = torch.randint(0, patterns, (n,), generator=generator)
    label = torch.randint(0, 2, (n,), generator=generator)
    turn = torch.randint(0, 4, (n,), generator=generator)
    pos = torch.randint(0, canvas - size + 1, (n, 2), generator=generator)
    x = torch.zeros(n, 1, canvas, canvas)
    for i in range(n):
        p = bases[int(which[i])]
        p = p.flip(-1) if label[i] else p
        p = torch.rot90(p, int(turn[i]), (-2, -1))
        r, c = int(pos[i, 0]), int(pos[i, 1])
        x[i, 0, r : r + size, c : c + size] = p
    xs = [torch.rot90(x, k, (-2, -1)) for k in range(4)]
    xs += [v.flip(-1) for v in xs]
    labels = [label] * 4 + [1 - label] * 4
    return torch.cat(xs), torch.cat(labels).float()


class ChiralityNet(nn.Sequential):
    """``[B, 1, N, N] -> [B]`` logit: two 3x3 D4 grid convs to ``fields`` regular fields (ReLU), the
    spatial maximum, a linear map declared ``fields x regular -> trivial``."""

    def __init__(self, fields: int = 4):
        G = Dihedral(4)
        hidden = fields * G.regular()
        super().__init__(
            eqnn.declare(nn.Conv2d(1, hidden.dim, 3, padding=1), G.trivial(), hidden), eqnn.PointwiseActivation(hidden),
            eqnn.declare(nn.Conv2d(hidden.dim, hidden.dim, 3, padding=1), hidden, hidden),
            eqnn.PointwiseActivation(hidden), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            eqnn.declare(nn.Linear(hidden.dim, 1), hidden, G.trivial()), nn.Flatten(0))


class D4PlumeNet(nn.Sequential):
    """``[B, C, N, N] -> [B, 3, N, N]``: 3x3 zero-padded D4 grid convs; input smoke, inflow (trivial), velocity
    (standard) and, with ``direction``, the buoyancy direction (standard); output smoke and velocity."""

    def __init__(self, fields: int = 4, layers: int = 3, direction: bool = True):
        G = Dihedral(4)
        hidden = fields * G.regular()
        rep_in = G.trivial() + G.trivial() + G.standard()
        if direction:
            rep_in = rep_in + G.standard()
        reps = [rep_in] + [hidden] * (layers - 1) + [G.trivial() + G.standard()]
        mods = []
        for i, (a, b) in enumerate(zip(reps[:-1], reps[1:])):
            mods.append(eqnn.declare(nn.Conv2d(a.dim, b.dim, 3, padding=1), a, b))
            if i < layers - 1:
                mods.append(eqnn.PointwiseActivation(b))
        super().__init__(*mods)


# ---------------------------------------------------------------------------------------------
# the experiment
# ---------------------------------------------------------------------------------------------
def _plume_params(cfg: SymmetryConfig, case: str) -> PlumeParams:
    if case == "plume_fixed":
        return replace(cfg.params, grid=cfg.grid, asymmetry=0.0, direction=1)  # +x
    if case == "plume_four":
        return replace(cfg.params, grid=cfg.grid, asymmetry=0.0, direction=None)
    return replace(cfg.params, grid=cfg.grid)  # the existing direction-dependent strength


def _case_data(cfg: SymmetryConfig, case: str, seed: int, log):
    """``(X, Y, X_test, Y_test, task_loss, make_model, steps, batch)`` of one case."""
    if case == "chirality":
        gen = torch.Generator().manual_seed(70_000 + seed)
        bases = chiral_patterns(cfg.patterns, gen)
        X, Y = chirality_images(cfg.images, bases, gen)
        Xt, Yt = chirality_images(max(1, cfg.images // 2), bases, gen)
        return (X, Y, Xt, Yt, nn.functional.binary_cross_entropy_with_logits,
                lambda: ChiralityNet(cfg.image_fields), cfg.image_steps, len(X))
    params = _plume_params(cfg, case)
    sizes, frames = (cfg.train_traj, 1, cfg.test_traj), (cfg.frames, 2, cfg.frames)
    data, meta = plume_dataset(params, sizes, frames, seed=60_000 + seed, warmup=cfg.warmup, twins=1,
                               cache_dir=cfg.cache_dir, log=log)
    sc = SmokeScales.fit(data["train"])
    X, Y = smoke_pairs(data["train"], sc)
    Xt, Yt = smoke_pairs(data["test"], sc)
    see = case != "plume_fixed"
    if not see:
        X, Xt = X[:, :4], Xt[:, :4]
    return (X, Y, Xt, Yt, nn.functional.mse_loss, lambda: D4PlumeNet(cfg.plume_fields, direction=see), cfg.plume_steps,
            cfg.batch)


def _penalised_step(model, cfg: SymmetryConfig, task_loss, steps: int):
    """Adam (cosine-annealed) on ``task_loss + lam E_perp^D4``, from an exactly D4-equivariant start: the
    non-equivariance of the result is what the data asked for, against a weak pull towards D4."""
    eqnn.init_equivariant_(model)
    penalty = eqnn.ProjectionPenalty(model, cfg.lam)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)

    def step(x, y):
        loss = task_loss(model(x), y) + penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()

    return step


def _task_score(case: str, model, X, Y) -> float:
    with torch.no_grad():
        out = model(X)
    if case == "chirality":
        return float(((out > 0).float() == Y).float().mean())  # accuracy
    return float(nn.functional.mse_loss(out, Y))  # normalised one-step MSE


def separation(spectrum_row: dict, lattice, survivor: str) -> float:
    """``min over H not contained in survivor of E^H / E^survivor`` (``inf`` where nothing lies above)."""
    above = [spectrum_row[h.name] for h in lattice if not lattice.includes(h, survivor)]
    if not above:
        return float("inf")
    return min(above) / max(spectrum_row[survivor], 1e-300)


def recovered(spectrum_row: dict, lattice, ratio: float) -> str:
    """The subgroup the spectrum singles out: the largest listed proper subgroup ``S`` other than C1 (whose
    value is 0 for every model) with :func:`separation` at least ``ratio``; the whole group when none does."""
    top = lattice.subgroups[-1]
    candidates = [h for h in lattice if h.order != 1 and h is not top
                  and separation(spectrum_row, lattice, h.name) >= ratio]
    if not candidates:
        return top.name
    best = max(len(lattice.below(h)) for h in candidates)
    return "+".join(h.name for h in candidates if len(lattice.below(h)) == best)


def run(cfg: SymmetryConfig, seed: int = 0, out: str | None = None, log=print, tag: str = "") -> dict:
    """Run the experiment. Returns ``{"rows", "spectra", "info"}``; writes ``symmetry{tag}_results.csv``,
    ``symmetry{tag}_table.md`` and, with matplotlib, ``symmetry{tag}_<case>.png`` (the lattice and the
    per-layer heatmap of seed 0) and ``symmetry{tag}_spectra.png`` (model-level rows, all seeds)."""
    t0 = time.perf_counter()
    lattice = Dihedral(4).subgroups()
    rows, spectra, info = [], {}, {"skipped": []}
    for case in cfg.cases:
        if case.startswith("plume") and not phiflow_available():
            log(f"  {case}: {PHIFLOW_MISSING}")
            info["skipped"].append(case)
            continue
        tc = time.perf_counter()
        X, Y, Xt, Yt, loss, make, steps, batch = _case_data(cfg, case, seed, log)
        for r in range(cfg.seeds):
            s = 1000 * seed + r
            gen = seed_all(s)
            model = make()
            secs = run_steps(_penalised_step(model, cfg, loss, steps), model, X, Y, strict=False, steps=steps,
                             batch=batch, generator=gen)
            spectrum = eqnn.symmetry_spectrum(model)
            row = spectrum.model
            spectra.setdefault(case, []).append(spectrum)
            survivor = expected_survivor[case]
            rows.append(dict(case=case, seed=s, steps=steps, train_s=secs, score=_task_score(case, model, Xt, Yt),
                             expected=survivor, recovered=recovered(row, lattice, cfg.ratio),
                             separation=separation(row, lattice, survivor),
                             **{f"E[{h}]": row[h] for h in lattice.names}))
            log(f"  {case} seed {s}: recovered {rows[-1]['recovered']} (expected {survivor}), separation "
                f"{rows[-1]['separation']:.3g}, {secs:.0f} s")
            if out and r == 0:
                spectrum.plot(os.path.join(out, f"symmetry{tag}_{case}.png"),
                              title=f"{case}: D4-declared, penalty lambda={cfg.lam:g} (seed {s}); kept: "
                                    f"{expected_survivor[case]} expected")
        info[f"{case}_s"] = time.perf_counter() - tc
    info["total_s"] = time.perf_counter() - t0
    result = dict(rows=rows, spectra=spectra, info=info, ratio=cfg.ratio, lam=cfg.lam)
    if out and rows:
        write_csv(rows, os.path.join(out, f"symmetry{tag}_results.csv"))
        with open(os.path.join(out, f"symmetry{tag}_table.md"), "w") as f:
            f.write(format_table(result) + "\n")
        _plot_rows(rows, lattice, os.path.join(out, f"symmetry{tag}_spectra.png"), cfg, log)
    return result


def format_table(result: dict) -> str:
    rows = result["rows"]
    if not rows:
        return "symmetry: no case ran (" + ", ".join(result["info"]["skipped"]) + " skipped)"
    names = list(Dihedral(4).subgroups().names)
    out = [f"Symmetry spectrum of D4-declared models (projection penalty lambda={result['lam']:g}); model-level "
           f"E_perp/||W||^2 per subgroup, mean over {len({r['seed'] for r in rows})} seed(s) (geometric); recovered = "
           f"the largest proper subgroup whose value is {result['ratio']:g} times below every subgroup not inside it "
           "(D4 when none is), per seed\n",
           "| case | expected | recovered (per seed) | separation min/max | score | " + " | ".join(names) + " |",
           "|---|---|---|---|---|" + "---|" * len(names)]
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = [r for r in rows if r["case"] == case]
        geo = {n: float(torch.tensor([max(r[f"E[{n}]"], 1e-300) for r in rs], dtype=torch.float64).log().mean().exp())
               for n in names}
        seps = [r["separation"] for r in rs]
        sc, sd = mean_std([r["score"] for r in rs])
        score = f"{'acc' if case == 'chirality' else 'MSE'} {sc:.3f} ± {sd:.3f}"
        if rs[0]["expected"] == "C1" or all(s == float("inf") for s in seps):
            sep = "–"  # nothing lies above D4, and E^C1 is 0 for every model: no ratio to take
        else:
            sep = f"{min(seps):.3g} / {max(seps):.3g}"
        out.append(f"| {case} | {rs[0]['expected']} | {', '.join(r['recovered'] for r in rs)} | {sep} | {score} | "
                   + " | ".join(f"{geo[n]:.1e}" for n in names) + " |")
    out.append("\nseparation: min over subgroups H not contained in the expected one of E^H / E^expected (per seed); "
               "score: test accuracy (chirality) or normalised one-step test MSE (plumes).")
    return "\n".join(out)


def _plot_rows(rows, lattice, path, cfg, log):
    plt = pyplot(log)
    if plt is None:
        return
    names = list(lattice.names)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(4.2 * len(cases), 3.8), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for r in (r for r in rows if r["case"] == case):
            ax.semilogy(range(len(names)), [max(r[f"E[{n}]"], 1e-16) for n in names], "o-", alpha=0.8,
                        label=f"seed {r['seed']}")
        ax.set_xticks(range(len(names)), names, rotation=60, fontsize=7)
        ax.set_title(f"{case} (expected {expected_survivor[case]})", fontsize=9)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("model-level E_perp / ||W||^2")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"  wrote {path}")
