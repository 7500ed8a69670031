"""Build an approximately equivariant network (the tutorial of docs/tutorial.md, as one script).

An image classifier that should not care how an image is rotated by multiples of 90 degrees
(the group C4; use equiproj.Dihedral(4) to add reflections). The data: RGB images of a bright
ring or a bright disk at a random position, with a weak colour gradient that breaks the symmetry
a little. Built from plain nn.Conv2d / nn.Linear layers, declared, with equivariant blocks in
between; started from an equivariant initialisation; trained with the decoupled projection step
(or the penalty in the loss, --mode penalty) under a warm-up schedule; then reported, projected
and checked.

    python examples/equivariant_network.py            # about a minute on a laptop CPU
    python examples/equivariant_network.py --tiny     # a few seconds (what the tests run)
"""

import argparse

import torch
from torch import nn

import equiproj
from equiproj.nn import (FieldBatchNorm, GridPool, GroupPooling, PointwiseActivation, ProjectionPenalty,
                         check_equivariance, declare, init_equivariant_, project_, report)


def images(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` RGB images ``[n, 3, size, size]``: class 0 a ring, class 1 a disk, plus a colour gradient."""
    y = torch.randint(0, 2, (n,), generator=generator)
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centre = (torch.rand(n, 2, generator=generator) - 0.5) * size / 3
    r = ((xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2).sqrt()
    radius = size / 5
    ring = torch.exp(-((r - radius) ** 2) / 2.0)
    disk = torch.sigmoid(2.0 * (radius - r))
    shape = torch.where(y[:, None, None] == 0, ring, disk)
    colour = torch.rand(n, 3, 1, 1, generator=generator) + 0.5
    gradient = 0.1 * xx / size  # the imperfect symmetry: a fixed left-right colour gradient
    x = colour * shape[:, None] + gradient + 0.1 * torch.randn(n, 3, size, size, generator=generator)
    return x, y


def build_model(G: equiproj.Group, fields: int = 8, classes: int = 2) -> nn.Sequential:
    """RGB (3 scalar channels) -> regular fields -> invariant class scores."""
    rgb = 3 * G.trivial()                 # a colour image: three channels that do not change under rotation
    hidden = fields * G.regular()         # regular fields: a rotation permutes the channels of each field
    return nn.Sequential(
        declare(nn.Conv2d(3, hidden.dim, 3, padding=1), rgb, hidden),
        PointwiseActivation(hidden),      # ReLU is equivariant on permutation fields (not on irrep fields)
        declare(nn.Conv2d(hidden.dim, hidden.dim, 3, stride=2, padding=1), hidden, hidden),  # odd sizes keep strides centred
        FieldBatchNorm(hidden),
        PointwiseActivation(hidden),
        GridPool(hidden, spatial_dims=2, kernel_size=3, stride=2),  # centred windows: (n - 3) % 2 == 0
        declare(nn.Conv2d(hidden.dim, hidden.dim, 3, padding=1), hidden, hidden),
        PointwiseActivation(hidden),
        GroupPooling(hidden),              # max over each field's channels: invariants
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        declare(nn.Linear(fields, classes), fields * G.trivial(), classes * G.trivial()),
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few seconds: small images, few steps")
    p.add_argument("--mode", choices=("decay", "penalty"), default="decay",
                   help="the decoupled projection step after each optimiser step, or the penalty in the loss")
    args = p.parse_args(argv)
    size, n, steps, fields = (17, 64, 8, 4) if args.tiny else (33, 512, 300, 8)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    G = equiproj.Cyclic(4)
    x_train, y_train = images(n, size, gen)
    x_test, y_test = images(n // 2, size, gen)

    model = build_model(G, fields)
    init_equivariant_(model)              # project every declared layer, keeping each weight's norm
    penalty = ProjectionPenalty(model, lambda_perp=0.0)
    schedule = equiproj.nn.linear_warmup(0.05 if args.mode == "decay" else 1e-2, steps=max(1, steps // 5))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        idx = torch.randint(0, n, (32,), generator=gen)
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        if args.mode == "penalty":
            penalty.set_lambdas(lambda_perp=schedule(step))
            loss = loss + penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if args.mode == "decay":
            penalty.decay_(schedule(step))  # W <- W - rate (W - P W), in place, one fused pass per weight

    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    print(report(model))
    before = check_equivariance(model, 3 * G.trivial(), 2 * G.trivial(), x_test[:8])
    project_(model)                       # exactly equivariant from here on
    with torch.no_grad():
        accuracy_projected = float((model(x_test).argmax(1) == y_test).float().mean())
    after = check_equivariance(model, 3 * G.trivial(), 2 * G.trivial(), x_test[:8])
    print(f"\ntest accuracy {accuracy:.3f} (after project_: {accuracy_projected:.3f})")
    print(f"equivariance error before project_ {before.max_rel_error:.1e}, after {after.max_rel_error:.1e}")
    print(after)
    return {"accuracy": accuracy, "accuracy_projected": accuracy_projected, "before": before.max_rel_error,
            "after": after.max_rel_error}


if __name__ == "__main__":
    main()
