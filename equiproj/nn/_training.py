"""Starting and steering training: equivariant initialisation, and schedules for the penalty's weights.

A schedule is a function ``step -> value`` for :meth:`ProjectionPenalty.set_lambdas` (or for the
rate of :meth:`ProjectionPenalty.decay_`), called once per step like a learning-rate schedule::

    schedule = equiproj.nn.cosine(1e-2, steps=10_000, warmup=500)
    for step, (x, y) in enumerate(loader):
        penalty.set_lambdas(lambda_perp=schedule(step))
        ...
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._declare import select_layers
from ._project import project_
from ._tensors import assign, full

__all__ = ["init_equivariant_", "constant", "linear_warmup", "cosine"]


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


def constant(value: float):
    """The schedule ``step -> value``."""
    value = _check_value(value)
    return lambda step: value


def linear_warmup(value: float, steps: int):
    """The schedule that rises linearly from 0 at step 0 to ``value`` at ``steps``, then stays there:
    the usual start for a strong penalty, which would otherwise freeze the first steps."""
    value, steps = _check_value(value), _check_steps(steps)
    return lambda step: value * min(1.0, max(0, step) / steps)


def cosine(value: float, steps: int, warmup: int = 0, final: float = 0.0):
    """The schedule with a linear warm-up to ``value`` over ``warmup`` steps, then a half cosine down to
    ``final`` at step ``steps`` (and ``final`` after)."""
    value, final, steps = _check_value(value), _check_value(final), _check_steps(steps)
    warmup = int(warmup)
    if not 0 <= warmup < steps:
        raise ValueError(f"warmup must be in [0, steps), got {warmup} with steps={steps}")

    def schedule(step):
        step = max(0, step)  # as the other schedules: a negative step counts as step 0
        if step < warmup:
            return value * step / warmup
        t = min(1.0, (step - warmup) / (steps - warmup))
        return final + (value - final) * 0.5 * (1.0 + math.cos(math.pi * t))

    return schedule


def _check_value(v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"a schedule value must be a finite number >= 0, got {v!r}")
    return float(v)


def _check_steps(steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    return steps
