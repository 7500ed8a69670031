"""Hard projection of a model's declared layers."""

from __future__ import annotations

import torch
from torch import nn

from ._declare import select_layers
from ._restrict import under
from ._tensors import assign, no_autocast

__all__ = ["project_"]


def project_(model: nn.Module, which: str = "equivariant", layers=None, subgroup=None) -> nn.Module:
    """Replace each declared layer's weight (and bias) by its equivariant part ``P(W)``
    (``which="equivariant"``) or by ``W - P(W)`` (``"non_equivariant"``), in place under
    ``torch.no_grad()``; computed in float64, stored in the parameter's dtype. With ``subgroup``
    (a :class:`~equiproj.groups.Subgroup` or a name from ``G.subgroups()``), the projection is onto
    the maps equivariant under that subgroup only; the declarations stay as they are. Returns ``model``."""
    if which not in ("equivariant", "non_equivariant"):
        raise ValueError(f"which must be 'equivariant' or 'non_equivariant', got {which!r}")
    selected = select_layers(model, layers)
    with torch.no_grad(), no_autocast(selected[0][1].weight.device):
        for name, m, d in selected:
            w, b = under(d, subgroup).projected(name, m, which)
            assign(m.weight, w)
            if b is not None:
                assign(m.bias, b)
    return model
