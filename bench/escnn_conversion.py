"""Per escnn module: the largest difference between its output and that of the module ``from_escnn``
made of it, on the models of tests/nn/test_escnn_models.py (float32, two training-mode steps and one
eval step; each module is fed escnn's own input, so the numbers do not accumulate along a model), and
the status of every escnn module. The table of docs/interop.md.

Needs escnn (and equiproj importable in that environment), from the repository root::

    python bench/escnn_conversion.py > bench/results/escnn_conversion.md
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "nn"))


def measure() -> dict[str, tuple[float, float]]:
    """``{escnn class: (largest |difference|, largest |difference| / largest |output|)}``."""
    from escnn import nn as enn
    from test_escnn_models import MODELS

    import equiproj

    worst: dict[str, tuple[float, float]] = {}
    for name, build in MODELS.items():
        gen = torch.Generator().manual_seed(7)
        model, t_in, shape = build(gen)
        model.train()
        plain = equiproj.nn.from_escnn(model)
        x0 = torch.randn((8, t_in.size) + shape[1:], generator=gen)
        for step, mode in enumerate(("train", "train", "eval")):
            model.train(mode == "train")
            plain.train(mode == "train")
            x = enn.GeometricTensor(x0 + 0.1 * step, t_in)
            for (cname, child), pchild in zip(model.named_children(), plain.children()):
                torch.manual_seed(100 + step)
                want = child(x)
                torch.manual_seed(100 + step)
                got = pchild(x.tensor)
                diff = float((got - want.tensor).detach().abs().max())
                rel = diff / max(float(want.tensor.abs().max()), 1e-30)
                key = type(child).__name__
                old = worst.get(key, (0.0, 0.0))
                worst[key] = (max(old[0], diff), max(old[1], rel))
                x = want
        worst["SequentialModule"] = max(worst.get("SequentialModule", (0.0, 0.0)), (0.0, 0.0))
    worst["GatedNonLinearity2"] = _gated2()
    return worst


def _gated2() -> tuple[float, float]:
    """escnn's GatedNonLinearity2 takes two tensors, so it sits in no SequentialModule: measured on its own."""
    from escnn import gspaces
    from escnn import nn as enn

    import equiproj

    gen = torch.Generator().manual_seed(7)
    gs = gspaces.rot2dOnR2(-1, maximum_frequency=3)
    G = gs.fibergroup
    t_gates = enn.FieldType(gs, 4 * [G.irrep(0)])
    t_gated = enn.FieldType(gs, [G.irrep(2), G.irrep(1), G.irrep(3), G.irrep(1)])
    m = enn.GatedNonLinearity2((t_gates, t_gated))
    plain = equiproj.nn.from_escnn(m)
    g, x = torch.randn(8, 4, 9, 9, generator=gen), torch.randn(8, t_gated.size, 9, 9, generator=gen)
    want = m(enn.GeometricTensor(g, t_gates), enn.GeometricTensor(x, t_gated)).tensor
    diff = float((plain(g, x) - want).detach().abs().max())
    return diff, diff / float(want.abs().max())


def main() -> None:
    from equiproj.nn._escnn import ESCNN_MODULES

    worst = measure()
    print("| escnn module | status | largest output difference (absolute / relative to the largest output) |")
    print("|---|---|---|")
    for name, status in sorted(ESCNN_MODULES.items(), key=lambda kv: (not kv[1].startswith("converted"), kv[0])):
        if name in worst and name != "SequentialModule":
            d = f"{worst[name][0]:.1e} / {worst[name][1]:.1e}"
        elif name == "SequentialModule":
            d = "(the whole models: tests/nn/test_escnn_models.py)"
        else:
            d = "not measured" if status == "converted" else ""
        print(f"| `{name}` | {status} | {d} |")
    print(f"\ntorch {torch.__version__}; float32; per module, escnn's input fed to both; "
          "two training-mode steps (same seed) and one eval step (GatedNonLinearity2: one call on its own). "
          "GNormBatchNorm is measured on irrep fields: on fields with a change of basis (regular fields) escnn "
          "1.0.11's own forward fails, and the converted block is checked by equivariance there.")


if __name__ == "__main__":
    main()
