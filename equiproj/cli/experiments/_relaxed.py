"""The relaxed baseline of the experiments on outside data: residual pathways in the style of
Finzi, Benton & Wilson (2021, "Residual Pathway Priors for Soft Equivariance Constraints").

Every declared layer becomes ``equivariant(x) + free(x)``: the declared layer, kept exactly
equivariant (projected at the start and after every optimiser step), plus an undeclared copy of
the same shape whose weights start at zero and carry an L2 penalty ``lam * sum ||W_free||^2`` in
the loss. The free branch can model the part of the data that breaks the symmetry, at a price set
by ``lam``; the equivariant branch pays nothing. Regime ``"rpp"`` of :func:`relaxed_step`; the
other regimes are those of :func:`._training.regime_step`.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ... import nn as eqnn
from ._training import regime_step

__all__ = ["REGIMES", "ResidualPathway", "residual_pathway_", "free_parameters", "merged_copy", "relaxed_step"]


REGIMES = {
    "none": "no penalty",
    "projection": "projection penalty (in the loss)",
    "decoupled": "decoupled step (decay_)",
    "strict": "strictly projected",
    "data_time": "data-level penalty, equal time",
    "rpp": "residual pathway (RPP)",
}


class ResidualPathway(nn.Module):
    """``equivariant(x) + free(x)``: ``layer`` (declared) and an undeclared copy of it with zero weights."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        if eqnn.declaration(layer) is None:
            raise ValueError(f"a residual pathway needs a declared layer; {type(layer).__name__} is not declared")
        free = eqnn.undeclare(copy.deepcopy(layer))
        with torch.no_grad():
            for p in free.parameters():
                p.zero_()
        self.equivariant, self.free = layer, free

    def forward(self, x):
        return self.equivariant(x) + self.free(x)


def residual_pathway_(model: nn.Module) -> nn.Module:
    """Replace every declared layer of ``model`` (at any depth) by a :class:`ResidualPathway`; returns ``model``."""
    if eqnn.declaration(model) is not None:
        raise ValueError("the model itself is a declared layer: wrap it in ResidualPathway directly")
    for name, child in list(model.named_children()):
        if isinstance(child, ResidualPathway):
            continue
        if eqnn.declaration(child) is not None:
            setattr(model, name, ResidualPathway(child))
        else:
            residual_pathway_(child)
    return model


def free_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the free branches of ``model``'s residual pathways."""
    return [p for m in model.modules() if isinstance(m, ResidualPathway) for p in m.free.parameters()]


@torch.no_grad()
def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every residual pathway merged into one declared layer of weight
    ``W_equivariant + W_free`` (the same function), so that its energies can be read off."""
    merged = copy.deepcopy(model)

    def merge(module):
        for name, child in list(module.named_children()):
            if isinstance(child, ResidualPathway):
                layer = child.equivariant
                for p, q in zip(layer.parameters(), child.free.parameters()):
                    p.add_(q)
                setattr(module, name, layer)
            else:
                merge(child)

    merge(merged)
    return merged


def relaxed_step(model: nn.Module, regime: str, lam: float, lr: float, task_loss, data_penalty):
    """One training step ``step(x, y)`` of ``regime``. ``"rpp"`` (``model`` prepared by
    :func:`residual_pathway_`): Adam on ``task_loss + lam * sum ||W_free||^2``, then the equivariant
    branches are projected (:func:`equiproj.nn.project_`). Every other regime:
    :func:`._training.regime_step`."""
    if regime != "rpp":
        return regime_step(model, regime, lam, lr, task_loss, data_penalty)
    free = free_parameters(model)
    if not free:
        raise ValueError("regime 'rpp' needs a model with residual pathways (residual_pathway_)")
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(x, y):
        loss = task_loss(model(x), y) + lam * sum(p.square().sum() for p in free)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        eqnn.project_(model)

    return step
