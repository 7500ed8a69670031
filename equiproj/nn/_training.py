"""Starting and steering training: equivariant initialisation."""

from __future__ import annotations

import torch
from torch import nn

from ._declare import select_layers
from ._project import project_
from ._tensors import assign, full

__all__ = ["init_equivariant_"]


@torch.no_grad()
def init_equivariant_(model: nn.Module, keep_norm: bool = True, layers=None) -> nn.Module:
    """Project every declared layer (:func:`project_`) and, with ``keep_norm``, rescale each weight back
    to its Frobenius norm before the projection (biases as projected). Returns ``model``.

    The start for strongly penalised or strictly projected training: the plain projection of a
    default-initialised layer keeps only its equivariant share of the energy (about a quarter for
    a C4 conv), and from that small start strictly projected ReLU networks can die.
    """
    selected = select_layers(model, layers)
    norms = [full(m.weight).norm() for _, m, _ in selected]
    project_(model, layers=[m for _, m, _ in selected])
    if keep_norm:
        for (_, m, _), before in zip(selected, norms):
            w = full(m.weight)
            n = w.norm()
            if n > 0:
                assign(m.weight, w * (before / n))
    return model
