"""Equivariant initialisation and the decoupled step of the penalty."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import equiproj as ep
from equiproj import reference
from equiproj.nn import ProjectionPenalty, declare, declare_translations, init_equivariant_


def c4_net(fields: int, layers: int):
    """Plain convs declared C4-equivariant: 2 scalars in, regular fields inside, 2 scalars out."""
    G = ep.Cyclic(4)
    hidden = fields * G.regular()
    reps = [2 * G.trivial()] + [hidden] * (layers - 1) + [2 * G.trivial()]
    convs = [declare(nn.Conv2d(a.dim, b.dim, 3, padding=1), a, b) for a, b in zip(reps, reps[1:])]
    return nn.Sequential(*convs)


def relative_e_perp(model) -> float:
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
    assert relative_e_perp(net) < 1e-10
    assert [float(c.weight.detach().norm()) for c in net] == pytest.approx(norms, rel=1e-5)
    plain = c4_net(fields=2, layers=3)
    init_equivariant_(plain, keep_norm=False)  # the bare projection keeps only the equivariant share
    assert relative_e_perp(plain) < 1e-10 and float(plain[1].weight.norm()) < 0.9 * float(net[1].weight.norm())


class _LargestOutput(TorchDispatchMode):
    """Records the largest fresh tensor any aten op produces (views of their inputs do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def test_decay_is_in_place_without_parameter_copies(seed):
    G = ep.O3()
    r = ep.Rep.parse(G, "16x0e + 8x1o + 4x2e")
    model = nn.Sequential(*[declare(nn.Linear(r.dim, r.dim), r, r) for _ in range(3)])
    pen = ProjectionPenalty(model, 1.0)
    pen.energies()  # the plans are built (and cached) by the first call
    before = [p.detach().clone() for p in model.parameters()]
    ptrs = [p.data_ptr() for p in model.parameters()]
    with _LargestOutput() as mode:
        pen.decay_(0.25)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert mode.largest < r.dim * r.dim // 8, f"the step produced a tensor of {mode.largest} elements"
    for p, p0, (name, m) in zip(model.parameters(), before, list(model.named_parameters())):
        W0 = p0.double() if p0.dim() == 2 else p0.double()[:, None]
        rin = r if p0.dim() == 2 else G.trivial()
        PW = reference.project(W0, rin, r)
        torch.testing.assert_close(p.detach().double().reshape(W0.shape), W0 - 0.25 * (W0 - PW), rtol=0, atol=2e-6)


def _bytes_allocated(fn) -> int:
    """Every byte the CPU allocator hands out while ``fn`` runs, inside C++ kernels too (the profiler's
    memory events), freed or not: an upper bound on the step's peak memory above its inputs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def test_decay_allocates_a_negligible_fraction_of_the_parameters(seed):
    G = ep.Cyclic(4)
    h = 16 * G.regular()
    model = nn.Sequential(declare(nn.Linear(h.dim, h.dim), h, h), declare(nn.Conv2d(h.dim, h.dim, 3), h, h))
    pen = ProjectionPenalty(model, 0.0)
    pen.decay_(0.1)  # plans built and cached
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def copying_step():  # the step with a copy of the parameters, W <- (1 - rate) W + rate P W
        with torch.no_grad():
            old = [p.detach().clone() for p in model.parameters()]
            ep.nn.project_(model)
            for p, o in zip(model.parameters(), old):
                p.mul_(0.1).add_(o, alpha=0.9)

    assert _bytes_allocated(copying_step) >= param_bytes  # the measurement sees copies
    assert _bytes_allocated(lambda: pen.decay_(0.1)) < 0.01 * param_bytes


def test_decay_with_the_equivariant_term_and_kinds_without_a_fused_route(seed):
    """``rate_G`` shrinks ``P W`` too; translations and a custom kernel space step through their projection."""
    from equiproj.translation import LocallyConnected1d

    G = ep.Cyclic(4)
    conv = declare(nn.Conv2d(4, 4, 3, padding=1).double(), G.regular(), G.regular())
    lc = declare_translations(LocallyConnected1d(2, 2, 8, 3).double())
    model = nn.Sequential(conv, lc)
    pen = ProjectionPenalty(model, 1.0)
    e_perp, e_g = pen.energies()
    with torch.no_grad():
        pen.decay_(0.5, rate_G=0.5)
    p2, g2 = pen.energies()
    torch.testing.assert_close(p2, 0.25 * e_perp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g2, 0.25 * e_g, rtol=1e-10, atol=1e-12)


def test_backward_adds_to_an_existing_grad_in_place(seed):
    G = ep.SO3()
    r = ep.Rep.parse(G, "4x0 + 2x1 + 2")
    model = nn.Sequential(declare(nn.Linear(r.dim, r.dim).double(), r, r), nn.Tanh(),
                          declare(nn.Linear(r.dim, r.dim).double(), r, r))
    pen = ProjectionPenalty(model, {"0": 0.5, "2": 2.0}, lambda_G=0.1)
    x = torch.randn(5, r.dim, dtype=torch.float64)
    model(x).square().sum().backward()
    task = [p.grad.clone() for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    value = pen.backward()  # after the task gradient: added in place
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    for p in model.parameters():
        p.grad = None
    ref_value = pen()
    ref_value.backward()
    for p, t in zip(model.parameters(), task):
        torch.testing.assert_close(p.grad + t, grads.pop(0), rtol=1e-12, atol=1e-12)
    assert abs(float(value) - float(ref_value)) <= 1e-12 * abs(float(ref_value))
