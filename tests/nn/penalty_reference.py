"""The float64 reference of a penalty, for the penalty tests: the same penalty on a float64 copy of the
model with every term on the ``"reference"`` backend (``$EQUIPROJ_BACKEND``; its gradients from
autograd), and the comparison the tests make against it."""

import copy

import torch

from equiproj import ops
from equiproj.nn import ProjectionPenalty


def reference_model(model):
    ref = copy.deepcopy(model).double()
    with torch.no_grad():  # exactly the (rounded) values of the model under test
        for p, q in zip(ref.parameters(), model.parameters()):
            p.copy_(q.double())
    return ref


def reference_run(model, monkeypatch, lambdas: dict, what, *args):
    """``what`` of the float64 reference penalty (``ProjectionPenalty(ref, **lambdas)``) of ``model``'s
    current values: ``"value"``, ``"grads"`` (``(value, [grad])``) or ``"decay"`` (the parameters after
    ``decay_(*args)``)."""
    ref = reference_model(model)
    with monkeypatch.context() as mp:
        mp.setenv(ops.ENV_VAR, "reference")
        pen = ProjectionPenalty(ref, **lambdas)
        if what == "value":
            return pen().detach()
        if what == "grads":
            value = pen()
            value.backward()
            return value.detach(), [p.grad for p in ref.parameters()]
        pen.decay_(*args)
        return [p.detach() for p in ref.parameters()]


def close(got, want, tol, what):
    """``max |got - want| <= tol max |want|`` (in float64; ``got`` a tensor or a number)."""
    got, want = torch.as_tensor(got).detach().double(), want.detach().double()
    scale = float(want.abs().max()) or 1.0
    assert float((got - want).abs().max()) <= tol * scale, what
