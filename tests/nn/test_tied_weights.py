"""A weight shared between two declared layers (tied weights) under the decoupled step.

``ProjectionPenalty`` sums the layers' energies, so autograd gives a tied weight the sum of the
two gradients. The decoupled step ``decay_`` must agree: one step of the tied weight with the sum,
``W <- W - rate * sum_k (W - P_k W)`` (every ``P_k`` applied to the weight before the step), not
one step per declaration, each seeing the weight the previous one left.
"""

import torch
from torch import nn

import equiproj as ep
from equiproj.nn import ProjectionPenalty, declare


def tied_model(r):
    a, b = nn.Linear(r.dim, r.dim, bias=False), nn.Linear(r.dim, r.dim, bias=False)
    b.weight = a.weight
    return nn.Sequential(declare(a, r, r), nn.Tanh(), declare(b, r, r)).double()


def test_decay_steps_a_tied_weight_once_with_the_sum(seed):
    G = ep.Cyclic(4)
    r = 2 * G.regular()
    model = tied_model(r)
    W = model[0].weight.detach().clone()
    residual = ep.project(W, r, r, which="non_equivariant")
    penalty = ProjectionPenalty(model, lambda_perp=1.0)
    penalty.decay_(0.1)
    torch.testing.assert_close(model[0].weight.detach(), W - 2 * 0.1 * residual, rtol=1e-12, atol=1e-12)
    assert model[0].weight is model[2].weight


def test_penalty_gradient_of_a_tied_weight_is_the_sum(seed):
    """What the decoupled step should agree with: autograd through the penalty."""
    G = ep.Cyclic(4)
    r = 2 * G.regular()
    model = tied_model(r)
    W = model[0].weight.detach().clone()
    penalty = ProjectionPenalty(model, lambda_perp=1.0)
    penalty().backward()
    torch.testing.assert_close(model[0].weight.grad, 2 * 2 * ep.project(W, r, r, which="non_equivariant"),
                               rtol=1e-10, atol=1e-12)
