"""Equivariant initialisation and the decoupled step of the penalty."""

import pytest
import torch
from torch import nn

import equiproj as ep
from equiproj.nn import ProjectionPenalty, declare, init_equivariant_


def c4_net(fields: int, layers: int):
    """Plain convs declared C4-equivariant: 2 scalars in, regular fields inside, 2 scalars out."""
    G = ep.Cyclic(4)
    hidden = fields * G.regular()
    reps = [2 * G.trivial()] + [hidden] * (layers - 1) + [2 * G.trivial()]
    convs = [declare(nn.Conv2d(a.dim, b.dim, 3, padding=1), a, b) for a, b in zip(reps, reps[1:])]
    return nn.Sequential(*convs)


def relative_noneq(model) -> float:
    e_perp, e_g = ProjectionPenalty(model, 1.0).energies()
    return float(e_perp.sum() / (e_perp.sum() + e_g.sum()))


def test_decay_scales_the_non_equivariant_part(seed):
    net = c4_net(fields=1, layers=2)
    pen = ProjectionPenalty(net, 1.0)
    with torch.no_grad():
        e_perp, e_g = pen.energies()
        pen.decay_(0.0)
        assert torch.allclose(pen.energies()[0], e_perp)
        pen.decay_(0.5)  # W - P W halves, P W stays
        p2, g2 = pen.energies()
        assert torch.allclose(p2, 0.25 * e_perp, rtol=1e-4) and torch.allclose(g2, e_g, rtol=1e-4)
        pen.decay_(1.0)
        assert float(pen.energies()[0].max()) < 1e-10
    with pytest.raises(ValueError, match="rate"):
        pen.decay_(1.5)


def test_init_equivariant_keeps_the_norms(seed):
    net = c4_net(fields=2, layers=3)
    norms = [float(c.weight.detach().norm()) for c in net]
    init_equivariant_(net)
    assert relative_noneq(net) < 1e-10
    assert [float(c.weight.detach().norm()) for c in net] == pytest.approx(norms, rel=1e-5)
    plain = c4_net(fields=2, layers=3)
    init_equivariant_(plain, keep_norm=False)  # the bare projection keeps only the equivariant share
    assert relative_noneq(plain) < 1e-10 and float(plain[1].weight.norm()) < 0.9 * float(net[1].weight.norm())
