"""Does an equivariant initialisation help a strongly penalised C8 CNN? Default init against init_equivariant_.

A C8 CNN (5x5 kernels, so its convolutions are steerable: rotations by 45 degrees do not map the
grid; hidden 4 regular fields of C8, pointwise ReLU, group pooling) classifies 17x17 images of a
ring, a disk, a cross or a bar at random angles and positions. It is trained for a fixed budget
with Adam, either with the projection penalty in the loss (``--regime penalty``, ``--lam``) or
strictly projected (``--regime strict``: ``project_`` after every step), from PyTorch's default
initialisation or from ``equiproj.nn.init_equivariant_`` (every declared layer projected and rescaled
to its previous norm), over 3 seeds; reported: test accuracy, and E_perp/||W||^2 at the start and
the end.

    python experiments/c8_init.py [--regime penalty|strict] [--lam 0.1] [--steps 300] [--seeds 3]
                                  [--out experiments/results]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from torch import nn

import equiproj
from equiproj.nn import GroupPooling, PointwiseActivation, ProjectionPenalty, declare, init_equivariant_, project_

CLASSES = 4


def shapes(n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, 1, size, size]`` images of four classes (ring, disk, cross, bar) at random angles and offsets."""
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    c = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    theta = 2 * math.pi * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 3
    u = (xx - shift[:, 0, None, None]) * theta.cos()[:, None, None] + (yy - shift[:, 1, None, None]) * theta.sin()[:, None, None]
    v = -(xx - shift[:, 0, None, None]) * theta.sin()[:, None, None] + (yy - shift[:, 1, None, None]) * theta.cos()[:, None, None]
    r = (u ** 2 + v ** 2).sqrt()
    R = size / 4
    ring = torch.exp(-((r - R) ** 2) / 1.5)
    disk = torch.sigmoid(2 * (R - r))
    cross = torch.sigmoid(2 * (R - r)) * (torch.exp(-u ** 2 / 2) + torch.exp(-v ** 2 / 2)).clamp(max=1)
    bar = torch.sigmoid(2 * (R - u.abs())) * torch.exp(-v ** 2 / 2)
    img = torch.stack([ring, disk, cross, bar], 1)[torch.arange(n), y]
    return (img + 0.1 * torch.randn(n, size, size, generator=gen))[:, None], y


def c8_cnn(fields: int = 4) -> nn.Sequential:
    G = equiproj.Cyclic(8)
    h = fields * G.regular()
    return nn.Sequential(
        declare(nn.Conv2d(1, h.dim, 5, padding=2), G.trivial(), h), PointwiseActivation(h),
        declare(nn.Conv2d(h.dim, h.dim, 5, padding=2), h, h), PointwiseActivation(h),
        declare(nn.Conv2d(h.dim, h.dim, 5, padding=2), h, h), PointwiseActivation(h),
        GroupPooling(h), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(fields, CLASSES))


def relative_e_perp(penalty: ProjectionPenalty) -> float:
    with torch.no_grad():
        e_perp, e_g = penalty.energies()
    return float(e_perp.sum() / (e_perp.sum() + e_g.sum()))


def run(init: str, seed: int, steps: int, data, regime: str = "penalty", lam: float = 0.1) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(100 + seed)
    (x, y), (xt, yt) = data
    model = c8_cnn()
    if init == "init_equivariant_":
        init_equivariant_(model)
    penalty = ProjectionPenalty(model, lambda_perp=lam if regime == "penalty" else 0.0)
    start = relative_e_perp(penalty)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        if regime == "penalty":
            loss = loss + penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if regime == "strict":
            project_(model)
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    return {"init": init, "seed": seed, "accuracy": acc, "rel_E_perp_start": start, "rel_E_perp_end": relative_e_perp(penalty),
            "train_s": time.perf_counter() - t0}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--regime", choices=("penalty", "strict"), default="penalty")
    p.add_argument("--lam", type=float, default=0.1, help="lambda_perp of the penalty regime")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", default=None, help="write c8_init_table.md there")
    a = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    data = (shapes(1024, 17, gen), shapes(512, 17, gen))
    rows = [run(init, s, a.steps, data, a.regime, a.lam) for s in range(a.seeds) for init in ("default", "init_equivariant_")]
    how = f"penalty lambda_perp = {a.lam:g} in the loss" if a.regime == "penalty" else "strictly projected (project_ after every step)"
    lines = [f"C8 CNN (5x5 steerable convs, 4 regular fields), {how}, Adam, "
             f"{a.steps} steps of batch 32, {a.seeds} seeds; chance = {1 / CLASSES:.2f}", "",
             "| init | test accuracy (mean ± std) | per seed | E_perp/‖W‖² at start | at end |", "|---|---|---|---|---|"]
    for init in ("default", "init_equivariant_"):
        rs = [r for r in rows if r["init"] == init]
        accs = [r["accuracy"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {init} | {statistics.mean(accs):.3f} ± {sd:.3f} | {', '.join(f'{x:.3f}' for x in accs)} "
                     f"| {statistics.mean(r['rel_E_perp_start'] for r in rs):.2g} "
                     f"| {statistics.mean(r['rel_E_perp_end'] for r in rs):.2g} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        tag = "strict" if a.regime == "strict" else f"penalty{a.lam:g}"
        with open(os.path.join(a.out, f"c8_init_{tag}.md"), "w") as f:
            f.write(text + f"\n\n(command: python experiments/c8_init.py --regime {a.regime} --lam {a.lam:g} --steps "
                    f"{a.steps} --seeds {a.seeds}; torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    return rows


if __name__ == "__main__":
    main()
