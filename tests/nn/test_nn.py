"""equiproj.nn: declared layers, the model-level penalty, hard projection, reports (docs/math.md §2, §6).

References, all float64 and independent of the code under test:
  * linear layers: ``equiproj.reference`` (exact average over the group);
  * conv layers: ``equiproj.reference`` with input rep ``rep_in @ Rep.permutation(G, points=grid_points)``
    (one dense permutation field, not equiproj.grid's orbit structure), and the kernel average
    ``mean_g rho_out(g) K(g^-1 x) rho_in(g)^T`` computed on the kernel tensor with ``grid.act``
    (itself pinned to ``torch.rot90`` / ``torch.flip`` in test_grid.py);
  * equivariance of outputs: transform inputs by ``rep.matrix(g)`` / grid rotations.
Tolerances (relative unless stated): float64 energies 1e-10, gradients 1e-9; float32 1e-5;
bf16/fp16 weights 1e-5 against the reference on the same (rounded) weights; nearly equivariant
(E_perp/||W||^2 ~ 1e-12, float64) 1e-3; equivariance after project_ (float64) 1e-11 absolute
on outputs of order 1.
"""

import copy
import io
import json
import math
import os
import runpy
import sys
import types

import pytest
import torch
from torch import nn

import equiproj as ep
from equiproj import grid, reference
from equiproj import translation as tr
from equiproj.nn import (ApproxEquivariantConv2d, ApproxEquivariantConv3d, ApproxEquivariantLinear,
                         NoKernelSpaceError, ProjectionPenalty, declaration, declare, declare_translations,
                         declared_layers, layer_energies, project_, report, undeclare)
from equiproj.testing import random_orthogonal
from equiproj.testing import relative_error as rel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------
def ref_energies(layer, rep_in, rep_out, kernel_shape=None):
    """(E_perp, E_G) of one layer, bias included, from equiproj.reference (differentiable)."""
    W = layer.weight.double()
    if kernel_shape is not None:
        W = W.reshape(W.shape[0], -1)
        rep_in = rep_in @ ep.Rep.permutation(rep_in.group, points=grid.grid_points(kernel_shape))
    e_p, e_g = reference.energies(W, rep_in, rep_out)[0], reference.energies(W, rep_in, rep_out)[1]
    if layer.bias is not None:
        b = layer.bias.double()[:, None]
        triv = rep_out.group.trivial()
        e_p, e_g = e_p + reference.energies(b, triv, rep_out)[0], e_g + reference.energies(b, triv, rep_out)[1]
    return e_p, e_g


def kernel_average(K, G, rep_in, rep_out):
    """P(K) = mean_g rho_out(g) K(g^-1 x) rho_in(g)^T on the kernel tensor [c_out, c_in, *k]."""
    acc = torch.zeros_like(K, dtype=torch.float64)
    for g in G.elements():
        acc += torch.einsum("ab,bc...,dc->ad...", rep_out.matrix(g), grid.act(K.double(), g), rep_in.matrix(g))
    return acc / len(G.elements())


class NormGate(nn.Module):
    """x_f * sigmoid(|x_f|) per irrep copy: equivariant for reps built by Rep.parse (no permutation)."""

    def __init__(self, rep):
        super().__init__()
        assert rep.perm is None
        self.sizes = [f.dim for c, f in rep.segments for _ in range(c)]

    def forward(self, x):
        parts = torch.split(x, self.sizes, dim=-1)
        return torch.cat([p * torch.sigmoid(p.norm(dim=-1, keepdim=True)) for p in parts], -1)


def c4_cnn(dtype=torch.float64):
    """A lifted C4 group CNN: image -> 2 regular fields -> 2 regular fields -> pool -> '2x0 + 1'."""
    G = ep.Cyclic(4)
    reg = 2 * G.regular()
    out = ep.Rep.parse(G, "2x0 + 1")
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).to(dtype)
    layers = [(model[0], G.trivial(), reg, (3, 3)), (model[2], reg, reg, (3, 3)), (model[6], reg, out, None)]
    for layer, ri, ro, _ in layers:
        declare(layer, ri, ro)

    def transform_in(x, g):
        return grid.act(x, g)

    def transform_out(y, g):
        return y @ out.matrix(g).to(y.dtype).T

    return model, layers, (lambda n: torch.randn(n, 1, 7, 7, dtype=dtype)), transform_in, transform_out, G


def so3_mlp(dtype=torch.float64):
    """An SO(3) MLP: input in a rotated user basis, norm-gated hidden irreps, bias on every layer."""
    G = ep.SO3()
    r0 = ep.Rep.parse(G, "3x0 + 2x1")
    r0 = r0.change_basis(random_orthogonal(r0.dim, torch.Generator().manual_seed(5)))  # same basis in every build
    r1, r2 = ep.Rep.parse(G, "4x0 + 3x1 + 2x2"), ep.Rep.parse(G, "2x0 + 1")
    model = nn.Sequential(ApproxEquivariantLinear(r0, r1), NormGate(r1), ApproxEquivariantLinear(r1, r2)).to(dtype)
    layers = [(model[0], r0, r1, None), (model[2], r1, r2, None)]

    def transform_in(x, g):
        return x @ r0.matrix(g).to(x.dtype).T

    def transform_out(y, g):
        return y @ r2.matrix(g).to(y.dtype).T

    return model, layers, (lambda n: torch.randn(n, r0.dim, dtype=dtype)), transform_in, transform_out, G


MODELS = {"cnn": c4_cnn, "mlp": so3_mlp}


def some_elements(G, n=6):
    return G.elements() if G.is_finite else G.sample(n)


# ---------------------------------------------------------------------------------------------
# the penalty equals the reference; gradients; projection makes models equivariant
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", list(MODELS))
def test_penalty_equals_sum_of_reference_energies(kind, dtype, seed):
    model, layers, *_ = MODELS[kind](dtype)
    names = [n for n, _, _ in declared_layers(model)]
    assert len(names) == len(layers)
    lam_p = {names[0]: 0.7, "default": 0.2}
    pen = ProjectionPenalty(model, lambda_perp=lam_p, lambda_G=0.05)
    value = pen()
    assert value.dtype == dtype and value.dim() == 0
    expect = 0.0
    for i, (layer, ri, ro, ks) in enumerate(layers):
        e_p, e_g = ref_energies(layer, ri, ro, ks)
        expect = expect + (0.7 if i == 0 else 0.2) * e_p + 0.05 * e_g
        lp, lg = layer_energies(layer)
        assert rel(lp, e_p) < (1e-10 if dtype == torch.float64 else 1e-5)
        assert rel(lg, e_g) < (1e-10 if dtype == torch.float64 else 1e-5)
    assert rel(value, expect) < (1e-10 if dtype == torch.float64 else 1e-5)
    per_layer = pen.energies()[0]
    assert per_layer.shape == (len(layers),)


@pytest.mark.parametrize("kind", list(MODELS))
def test_gradients_equal_autograd_of_reference(kind, seed):
    model, layers, *_ = MODELS[kind](torch.float64)
    pen = ProjectionPenalty(model, lambda_perp=0.3, lambda_G=0.02)
    pen().backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = sum(0.3 * e_p + 0.02 * e_g for e_p, e_g in (ref_energies(l, ri, ro, ks) for l, ri, ro, ks in layers))
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, atol=1e-9 * float(p.grad.abs().max()), rtol=1e-9)
    # and dE_perp/dW = 2 (W - P W) for one layer
    layer, ri, ro, ks = layers[0]
    layer.zero_grad()
    layer_energies(layer)[0].backward()
    W = layer.weight.detach()
    PW = project_(copy.deepcopy(nn.Sequential(layer)))[0].weight.detach()
    torch.testing.assert_close(layer.weight.grad, 2 * (W - PW), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("kind", list(MODELS))
def test_penalty_backward_equals_autograd_of_reference(kind, dtype, seed):
    """``penalty.backward()`` (one fused pass per weight, no graph) adds the reference gradient to
    existing ``.grad``s, returns the penalty, and leaves frozen parameters alone."""
    model, layers, *_ = MODELS[kind](dtype)
    names = [n for n, _, _ in declared_layers(model)]
    pen = ProjectionPenalty(model, lambda_perp={names[0]: 0.7, "default": 0.2}, lambda_G=0.05)
    frozen = layers[-1][0].bias
    frozen.requires_grad_(False)
    pre = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        p.grad = pre[n].clone() if n in pre else None
    value = pen.backward()
    assert value.dtype == dtype and value.dim() == 0 and not value.requires_grad
    got = {n: p.grad for n, p in model.named_parameters()}
    assert frozen.grad is None
    model.zero_grad(set_to_none=True)
    total = sum((0.7 if i == 0 else 0.2) * e_p + 0.05 * e_g
                for i, (e_p, e_g) in enumerate(ref_energies(l, ri, ro, ks) for l, ri, ro, ks in layers))
    total.backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert rel(value, total) < tol
    for n, p in model.named_parameters():
        if n in pre:
            expect = pre[n].double() + p.grad
            torch.testing.assert_close(got[n].double(), expect, atol=tol * float(expect.abs().max()), rtol=tol)
            assert got[n].dtype == dtype


def test_penalty_backward_mixed_cases_and_unsquared(seed):
    """Kernel-space layers (their own one-pass route), a kernel space without one and
    norm='unsquared' (autograd): the same gradients and value as ``penalty().backward()``."""
    G, ri, ro, conv = so2_conv()
    declare(conv, ri, ro)  # SO(2): the steerable kernel space
    tapwise = nn.Conv2d(ro.dim, ro.dim, 3, padding=1).double()
    declare(tapwise, ro, ro, kernel_space=TapwiseSpace())  # a protocol-only kernel space: autograd
    lin = declare(nn.Linear(ro.dim, ri.dim).double(), ro, ri)
    model = nn.Sequential(conv, tapwise, nn.Flatten())
    model.add_module("lin", lin)
    assert [d.case for _, _, d in declared_layers(model)] == ["kernel_space", "kernel_space", "linear"]
    for norm in ("squared", "unsquared"):
        pen = ProjectionPenalty(model, lambda_perp=0.4, lambda_G=0.1, norm=norm)
        model.zero_grad(set_to_none=True)
        expect_value = pen()
        expect_value.backward()
        expect = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        value = pen.backward()
        assert rel(value, expect_value) < 1e-12
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, expect[n], atol=1e-12 * float(expect[n].abs().max()), rtol=1e-12)


@pytest.mark.parametrize("kind", list(MODELS))
def test_project_makes_outputs_equivariant(kind, seed):
    model, layers, sample, t_in, t_out, G = MODELS[kind](torch.float64)
    x = sample(3)
    def err():
        with torch.no_grad():
            return max(float((model(t_in(x, g)) - t_out(model(x), g)).abs().max()) for g in some_elements(G))

    assert err() > 1e-3  # the test can fail: an unprojected model is not equivariant
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    project_(model)
    e_p = ProjectionPenalty(model, 1.0).energies()[0].detach()
    norms = torch.stack([sum(p.detach().square().sum() for p in l.parameters()) for l, *_ in layers])
    assert float((e_p / norms).max()) < 1e-26
    assert err() < 1e-11
    # the complement: W - P(W), no equivariant energy left, E_perp unchanged from the original
    other, *_ = MODELS[kind](torch.float64)
    other.load_state_dict(before)
    e_p0 = ProjectionPenalty(other, 1.0).energies()[0].detach()
    project_(other, which="non_equivariant")
    e_p1, e_g1 = (e.detach() for e in ProjectionPenalty(other, 1.0).energies())
    assert float(e_g1.max()) < 1e-26 * float(norms.max()) and rel(e_p1, e_p0) < 1e-10
    for (n, p), q in zip(other.named_parameters(), model.parameters()):
        torch.testing.assert_close(p + q, before[n], atol=1e-13, rtol=0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_nearly_equivariant_weights(kind, seed):
    model, layers, *_ = MODELS[kind](torch.float64)
    project_(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-6 * p.abs().mean() * torch.randn_like(p))
    pen = ProjectionPenalty(model, 1.0)
    got = pen.energies()[0]
    for i, (layer, ri, ro, ks) in enumerate(layers):
        e_p = ref_energies(layer, ri, ro, ks)[0]
        ratio = float(e_p.detach() / sum(p.detach().square().sum() for p in layer.parameters()))
        assert 1e-15 < ratio < 1e-10
        assert rel(got[i], e_p) < 1e-3


def test_unsquared_norm(seed):
    model, layers, *_ = c4_cnn()
    pen = ProjectionPenalty(model, lambda_perp=0.5, lambda_G=0.1, norm="unsquared")
    expect = sum(0.5 * e_p.sqrt() + 0.1 * e_g.sqrt() for e_p, e_g in (ref_energies(l, ri, ro, ks) for l, ri, ro, ks in layers))
    assert rel(pen(), expect) < 1e-10
    project_(model)  # E_perp = 0 (to rounding, possibly exactly): gradients stay finite
    pen().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# convolutions on grids, all exact groups
# ---------------------------------------------------------------------------------------------
CONVS = [  # (group, rep_in, rep_out, kernel, conv kwargs, input spatial shape)
    (ep.Cyclic(4), "0 + 1", "regular + 2", 3, dict(padding=1), (7, 7)),
    (ep.Cyclic(4), "2xregular", "2xregular", 3, dict(padding=2, dilation=2), (8, 8)),
    (ep.Dihedral(4), "regular", "(0,0) + (1,1) + (0,2)", 3, dict(padding=1), (6, 6)),
    (ep.Dihedral(4), "(1,1) + (1,0)", "regular", 4, dict(padding=2), (5, 5)),
    (ep.Dihedral(2), "regular", "(1,0) + (0,1) + (1,1)", (3, 5), dict(padding=(1, 2)), (6, 8)),
    (ep.Octahedral(), "A1 + T1", "E + T2 + A2", 3, dict(padding=1), (5, 5, 5)),
    (ep.FullOctahedral(), "A1g + T1u", "T1u + A2g + Eu", 3, dict(padding=1), (4, 4, 4)),
    (ep.Octahedral(), "regular", "T1 + 2xA1", 1, dict(), (3, 3, 3)),
]


@pytest.mark.parametrize("G,rin,rout,k,kw,shape", CONVS, ids=lambda v: str(v) if isinstance(v, ep.Group) else None)
def test_conv_grid_energies_and_equivariance(G, rin, rout, k, kw, shape, seed):
    ri, ro = ep.Rep.parse(G, rin), ep.Rep.parse(G, rout)
    Conv = {2: nn.Conv2d, 3: nn.Conv3d}[len(shape)]
    conv = Conv(ri.dim, ro.dim, k, **kw).double()
    declare(conv, ri, ro)
    d = declaration(conv)
    kshape = tuple(conv.kernel_size)
    assert d.case == ("pointwise" if math.prod(kshape) == 1 else "grid")
    # energies against the dense-permutation reference and the kernel average
    e_p, e_g = layer_energies(conv)
    r_p, r_g = ref_energies(conv, ri, ro, kshape)
    assert rel(e_p, r_p) < 1e-10 and rel(e_g, r_g) < 1e-10
    PK = kernel_average(conv.weight.detach(), G, ri, ro)
    Pb = reference.project(conv.bias.detach().double()[:, None], G.trivial(), ro)
    ref_perp = (conv.weight.detach() - PK).square().sum() + (conv.bias.detach()[:, None] - Pb).square().sum()
    assert rel(e_p, ref_perp) < 1e-10
    # output equivariance after projection, for every group element
    x = torch.randn(2, ri.dim, *shape, dtype=torch.float64)
    def err():
        with torch.no_grad():
            return max(float((conv(grid.act(x, g, ri)) - grid.act(conv(x), g, ro)).abs().max()) for g in G.elements())

    assert err() > 1e-3
    project_(conv)
    torch.testing.assert_close(conv.weight.detach(), PK, atol=1e-13, rtol=0)
    assert err() < 1e-11


def test_conv_3d_group_convolution_regular(seed):
    """The group-convolution case in 3-D: lifted O network (trivial -> regular -> regular)."""
    G = ep.Octahedral()
    reg = G.regular()
    model = nn.Sequential(ApproxEquivariantConv3d(G.trivial(), reg, 3, padding=1), nn.ReLU(),
                          ApproxEquivariantConv3d(reg, reg, 3, padding=1)).double()
    assert all(declaration(m).case == "grid" for m in (model[0], model[2]))
    e_p = ProjectionPenalty(model, 1.0).energies()[0]
    for i, m in enumerate((model[0], model[2])):
        ri = G.trivial() if i == 0 else reg
        assert rel(e_p[i], ref_energies(m, ri, reg, (3, 3, 3))[0]) < 1e-10
    project_(model)
    x = torch.randn(1, 1, 4, 4, 4, dtype=torch.float64)
    y = model(x)
    for g in G.elements()[::5]:
        torch.testing.assert_close(model(grid.act(x, g)), grid.act(y, g, reg), atol=1e-11, rtol=0)


def test_conv_rotation_by_torch_rot90(seed):
    """The axis convention end to end: rotating images with torch.rot90 permutes the regular
    channels of a projected C4 conv as rho_regular(R90) says."""
    G = ep.Cyclic(4)
    conv = ApproxEquivariantConv2d(G.trivial(), G.regular(), 5, padding=2).double()
    project_(conv)
    x = torch.randn(2, 1, 9, 9, dtype=torch.float64)
    R = G.regular().matrix(G.elements()[1])
    lhs = conv(torch.rot90(x, 1, dims=(-1, -2)))
    rhs = torch.einsum("ab,nbyx->nayx", R, torch.rot90(conv(x), 1, dims=(-1, -2)))
    torch.testing.assert_close(lhs, rhs, atol=1e-12, rtol=0)


def test_channels_only_case(seed):
    """kernel_space='channels': G acts on channels, each tap separately (here a 1-D conv)."""
    G = ep.SO3()
    ri, ro = ep.Rep.parse(G, "2x0 + 1"), ep.Rep.parse(G, "1 + 2")
    conv = declare(nn.Conv1d(ri.dim, ro.dim, 4).double(), ri, ro, kernel_space="channels")
    assert declaration(conv).case == "channels"
    K = conv.weight.detach()
    e_ref = sum(reference.energies(K[..., t], ri, ro)[0] for t in range(4))
    e_ref = e_ref + reference.energies(conv.bias.detach()[:, None], G.trivial(), ro)[0]
    assert rel(layer_energies(conv)[0], e_ref) < 1e-10
    project_(conv)
    x = torch.randn(2, ri.dim, 10, dtype=torch.float64)
    for g in G.sample(3):
        torch.testing.assert_close(conv(torch.einsum("ab,nbt->nat", ri.matrix(g), x)),
                                   torch.einsum("ab,nbt->nat", ro.matrix(g), conv(x)), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# kernel spaces (continuous rotations): the KernelSpace protocol and the steerable spaces
# ---------------------------------------------------------------------------------------------
class TapwiseSpace:
    """A stand-in kernel space (G acts on channels only, tap by tap) to test the protocol."""

    def __init__(self):
        self.calls = []

    def describe(self):
        return "test kernel space (tap-wise)"

    def energies(self, weight, rep_in, rep_out):
        self.calls.append("energies")
        W = weight.flatten(2).permute(2, 0, 1)
        e_p, e_g = ep.energies(W, rep_in, rep_out)
        return e_p.sum(), e_g.sum()

    def project(self, weight, rep_in, rep_out, which="equivariant"):
        self.calls.append(("project", which))
        W = weight.flatten(2).permute(2, 0, 1)
        P = ep.project(W, rep_in, rep_out, which=which)
        return P.permute(1, 2, 0).reshape(weight.shape)


def so2_conv():
    G = ep.SO2()
    ri, ro = ep.Rep.parse(G, "2x0 + 1"), ep.Rep.parse(G, "0 + 1 + 2")
    return G, ri, ro, nn.Conv2d(ri.dim, ro.dim, 3, padding=1).double()


def test_kernel_space_protocol(seed):
    G, ri, ro, conv = so2_conv()
    space = TapwiseSpace()
    declare(conv, ri, ro, kernel_space=space)
    d = declaration(conv)
    assert d.case == "kernel_space" and d.kernel_space is space and "tap-wise" in d.description
    K, b = conv.weight.detach(), conv.bias.detach()
    e_ref = sum(reference.energies(K[:, :, i, j], ri, ro)[0] for i in range(3) for j in range(3))
    e_ref = e_ref + reference.energies(b[:, None], G.trivial(), ro)[0]
    lin = declare(nn.Linear(ro.dim, ri.dim).double(), ro, ri)
    model = nn.Sequential(conv, nn.Flatten(), nn.Identity())
    model.add_module("lin", lin)
    pen = ProjectionPenalty(model, 1.0)
    e_p = pen.energies()[0]
    assert rel(e_p[0], e_ref) < 1e-10 and rel(e_p[1], ref_energies(lin, ro, ri)[0]) < 1e-10
    rows = report(model).rows
    assert rows[0]["case"] == "kernel_space" and rows[0]["defect_upper"] is None and "tap-wise" in str(report(model))
    project_(model)
    assert ("project", "equivariant") in space.calls
    assert float(pen.energies()[0].detach().max()) < 1e-26


def test_kernel_space_unavailable_is_a_clear_error(monkeypatch):
    import equiproj.nn._declare as declare_module

    G, ri, ro, conv = so2_conv()

    def broken(group, kernel_size, spatial_dims):
        raise RuntimeError("not for this group")

    monkeypatch.setattr(declare_module, "default_kernel_space", broken)
    with pytest.raises(NoKernelSpaceError, match="no kernel space for SO2.* yet.*not for this group"):
        declare(conv, ri, ro)
    assert declaration(conv) is None
    space = TapwiseSpace()
    monkeypatch.setattr(declare_module, "default_kernel_space", lambda group, kernel_size, spatial_dims: space)
    declare(conv, ri, ro)
    assert declaration(conv).kernel_space is space
    monkeypatch.undo()
    # a 1-D conv with a planar group and k > 1 has neither a grid action nor a kernel space
    C4 = ep.Cyclic(4)
    with pytest.raises(NoKernelSpaceError, match="kernel_space='channels'"):
        declare(nn.Conv1d(4, 4, 3), C4.regular(), C4.regular())
    with pytest.raises(ValueError, match="no exact grid"):
        declare(nn.Conv2d(4, 4, 3), ep.Cyclic(8).irrep(1) + ep.Cyclic(8).irrep(2),
                ep.Cyclic(8).irrep(1) + ep.Cyclic(8).irrep(2), kernel_space="grid")


def test_steerable_default_kernel_space_integration(seed):
    G = ep.SO2()
    ri, ro = ep.Rep.parse(G, "2x0 + 1"), ep.Rep.parse(G, "0 + 1 + 2")
    conv = declare(nn.Conv2d(ri.dim, ro.dim, 5, padding=2).double(), ri, ro)
    d = declaration(conv)
    assert d.case == "kernel_space"
    e_p, e_g = d.kernel_space.energies(conv.weight, ri, ro)
    b = conv.bias.detach()[:, None]
    e_p = e_p + reference.energies(b, G.trivial(), ro)[0]
    assert rel(layer_energies(conv)[0], e_p) < 1e-10
    project_(conv)
    assert float(layer_energies(conv)[0]) < 1e-24


# ---------------------------------------------------------------------------------------------
# translations (locally connected layers) in a model
# ---------------------------------------------------------------------------------------------
def test_translation_layers_in_penalty_and_projection(seed):
    lc = tr.LocallyConnected2d(2, 3, (5, 6), 3).double()
    declare_translations(lc)
    assert declaration(lc).case == "translation"
    G = ep.Cyclic(4)
    lin = declare(nn.Linear(4, 4).double(), G.regular(), G.regular())
    model = nn.ModuleDict({"lc": lc, "lin": lin})
    pen = ProjectionPenalty(model, lambda_perp={"lc": 2.0, "lin": 1.0})
    w, b = lc.weight.detach(), lc.bias.detach()
    e_lc = (w - w.mean((2, 3), keepdim=True)).square().sum() + (b - b.mean((1, 2), keepdim=True)).square().sum()
    assert rel(pen(), 2.0 * e_lc + ref_energies(lin, G.regular(), G.regular())[0]) < 1e-10
    assert "translations" in str(report(model))
    project_(model)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(lc(torch.roll(x, (2, 3), (2, 3))), torch.roll(lc(x), (2, 3), (2, 3)), atol=1e-12, rtol=0)
    with pytest.raises(TypeError, match="declare_translations"):
        declare(lc, G.regular(), G.regular())
    with pytest.raises(TypeError, match="LocallyConnected"):
        declare_translations(nn.Linear(3, 3))


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def test_report(seed):
    model, layers, *_ = c4_cnn()
    G = ep.SO3()
    extra = declare(nn.Linear(6, 6, bias=False).double(), ep.Rep.parse(G, "2x1"), ep.Rep.parse(G, "0 + 2"))  # shares no irrep
    model.add_module("extra", extra)
    rep = report(model, breakdown=True)
    d = rep.as_dict()
    json.dumps(d)  # plain structure
    assert [r["name"] for r in d["layers"]] == ["0", "2", "6", "extra"]
    for row, (layer, ri, ro, ks) in zip(d["layers"], layers):
        e_p, e_g = ref_energies(layer, ri, ro, ks)
        assert rel(row["e_perp"], e_p) < 1e-10 and rel(row["e_g"], e_g) < 1e-10
        n2 = sum(float(p.square().sum()) for p in layer.parameters())
        assert rel(row["norm_sq"], n2) < 1e-12 and rel(row["rel_perp"], float(e_p) / n2) < 1e-10
        assert abs(sum(e["e_perp"] for e in row["breakdown"]) - row["e_perp"]) < 1e-10 * row["e_perp"]
        assert row["shares_no_irrep"] is False and row["case"] == ("grid" if ks else "linear")
        # worst-case defect of the full map [W | b] over all elements lies in [sqrt E, 2 sqrt E]
        W = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        rin = ri if ks is None else ri @ ep.Rep.permutation(ri.group, points=grid.grid_points(ks))
        Wb = torch.cat([W, layer.bias.detach()[:, None]], 1)
        rin = rin + ri.group.trivial()
        els = ri.group.elements()
        sup = float((ro.matrix(els) @ Wb - Wb @ rin.matrix(els)).square().sum((-2, -1)).sqrt().max())
        assert row["defect_lower"] * (1 - 1e-9) <= sup <= row["defect_upper"] * (1 + 1e-9)
    last = d["layers"][-1]
    assert last["shares_no_irrep"] is True and rel(last["e_perp"], last["norm_sq"]) < 1e-12
    text = str(rep)
    assert "shares no irrep" in text and "exact grid action: Cyclic(4)" in text and "total" in text
    assert rel(d["total"]["e_perp"], sum(r["e_perp"] for r in d["layers"])) < 1e-12


# ---------------------------------------------------------------------------------------------
# declare: no effect on the module; state_dict; pickling; errors
# ---------------------------------------------------------------------------------------------
def test_declare_changes_nothing_in_the_module(seed):
    G = ep.Dihedral(4)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    out0, sd0 = conv(x), {k: v.clone() for k, v in conv.state_dict().items()}
    params0 = list(conv.named_parameters())
    attrs0 = set(conv.__dict__)
    declare(conv, G.regular(), G.regular())
    assert type(conv) is nn.Conv2d
    assert torch.equal(conv(x), out0)
    assert conv.state_dict().keys() == sd0.keys() and all(torch.equal(conv.state_dict()[k], v) for k, v in sd0.items())
    assert [(n, id(p)) for n, p in conv.named_parameters()] == [(n, id(p)) for n, p in params0]
    assert set(conv.__dict__) - attrs0 == {"_equiproj_declaration"}
    assert not (conv._forward_hooks or conv._forward_pre_hooks or conv._backward_hooks or conv._state_dict_hooks)
    sub = ApproxEquivariantConv2d(G.regular(), G.regular(), 3, padding=1)
    assert isinstance(sub, nn.Conv2d) and sub.state_dict().keys() == conv.state_dict().keys()
    undeclare(conv)
    assert declaration(conv) is None


def test_state_dict_round_trip_and_pickling(seed):
    m1, *_ = c4_cnn()
    sd = m1.state_dict()
    plain = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    assert sd.keys() == plain.state_dict().keys()
    buf = io.BytesIO()
    torch.save(sd, buf)
    m2, *_ = c4_cnn()  # rebuilt from code: declares again
    m2.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert rel(ProjectionPenalty(m2, 1.0, 0.1)(), ProjectionPenalty(m1, 1.0, 0.1)()) < 1e-15
    # copies keep the declarations
    assert rel(ProjectionPenalty(copy.deepcopy(m1), 1.0)(), ProjectionPenalty(m1, 1.0)()) < 1e-15
    # a pickled model carries them: same energies, and equal reps in a process with other str hashes
    buf = io.BytesIO()
    torch.save(m1, buf)
    m3 = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert rel(ProjectionPenalty(m3, 1.0, 0.1)(), ProjectionPenalty(m1, 1.0, 0.1)()) < 1e-15


def test_whole_model_pickle_round_trips_declarations_across_processes(tmp_path, seed):
    """torch.save(model) / torch.load in a fresh process (another PYTHONHASHSEED): declarations of every
    kind (grid-permutation convs, a flattened-grid Linear head, steerable kernel spaces in both layouts,
    translations) come back; their reps equal freshly built ones, and the energies are the same."""
    import subprocess

    G8 = ep.Cyclic(8)
    models = {"c4": c4_cnn()[0],
              "c8_regular": nn.Sequential(declare(nn.Conv2d(3, 16, 5, padding=2), 3 * G8.trivial(), 2 * G8.regular())),
              "c8_irreps": nn.Sequential(declare(nn.Conv2d(16, 4, 5), 2 * G8.regular(), ep.Rep.parse(G8, "2x0 + 2"))),
              "translations": nn.Sequential(declare_translations(tr.LocallyConnected2d(2, 3, (6, 6), 3)))}
    G4 = ep.Dihedral(4)
    h = 2 * G4.regular()
    models["flattened_head"] = nn.Sequential(declare(nn.Linear(h.dim * 9, 5), h @ ep.grid.kernel_rep(G4, (3, 3)),
                                                     5 * G4.trivial()))
    energies = {}
    for name, m in models.items():
        torch.save(m, tmp_path / f"{name}.pt")
        energies[name] = float(ProjectionPenalty(m, 1.0, 0.1)().detach())
    script = f"""
import torch, equiproj as ep
from equiproj.nn import ProjectionPenalty, declaration
G4, G8 = ep.Dihedral(4), ep.Cyclic(8)
fresh = {{"c4": ep.Cyclic(4).trivial(), "c8_regular": 3 * G8.trivial(), "c8_irreps": 2 * G8.regular(),
         "flattened_head": 2 * G4.regular() @ ep.grid.kernel_rep(G4, (3, 3))}}
for name, energy in {energies!r}.items():
    m = torch.load({str(tmp_path)!r} + f"/{{name}}.pt", weights_only=False)
    got = float(ProjectionPenalty(m, 1.0, 0.1)())
    assert abs(got - energy) <= 1e-6 * energy, (name, got, energy)
    if name in fresh:
        d = declaration(m[0])
        assert d.rep_in == fresh[name] and hash(d.rep_in) == hash(fresh[name]), name
print("ok")
"""
    env = dict(os.environ, PYTHONHASHSEED=str(12345 + seed % 1000))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_a_model_pickled_without_declarations_says_what_to_do():
    from equiproj.nn._declaration import StaleDeclaration
    from equiproj.nn._declare import _ATTR

    m1, *_ = c4_cnn()
    m1[0].__dict__[_ATTR] = StaleDeclaration("Declaration(conv, ...)")
    with pytest.raises(ValueError, match="unpickled.*declare on it again"):
        ProjectionPenalty(m1, 1.0)


def test_errors():
    G = ep.Cyclic(4)
    reg = G.regular()
    with pytest.raises(TypeError, match="nn.Linear and nn.Conv"):
        declare(nn.ReLU(), reg, reg)
    with pytest.raises(TypeError, match="Rep"):
        declare(nn.Linear(4, 4), [4], reg)
    assert declaration(declare(nn.Linear(4, 4), "regular", reg)).rep_in == reg  # a string, in rep_out's group
    with pytest.raises(ValueError, match=r"\(out_features, in_features\)"):
        declare(nn.Linear(4, 5), reg, reg)
    with pytest.raises(ValueError, match="same group"):
        declare(nn.Linear(4, 4), reg, ep.Dihedral(2).regular())
    with pytest.raises(ValueError, match="does not match"):
        declare(nn.Conv2d(4, 6, 3), reg, reg)
    with pytest.raises(ValueError, match="groups=2"):
        declare(nn.Conv2d(4, 4, 3, groups=2), reg, reg)
    with pytest.raises(TypeError, match="transposed"):
        declare(nn.ConvTranspose2d(4, 4, 3), reg, reg)
    with pytest.raises(ValueError, match="kernel_space must be"):
        declare(nn.Conv2d(4, 4, 3), reg, reg, kernel_space="steerable")
    with pytest.raises(ValueError, match="convolutions only"):
        declare(nn.Linear(4, 4), reg, reg, kernel_space="grid")
    with pytest.raises(ValueError, match="lazy"):
        declare(nn.LazyLinear(4), reg, reg)
    with pytest.raises(TypeError, match=r"\.project"):
        declare(nn.Conv2d(4, 4, 3), reg, reg, kernel_space=types.SimpleNamespace(energies=lambda *a: None))
    with pytest.raises(ValueError, match="rejects"):
        declare(nn.Conv2d(4, 4, 3), reg, reg, kernel_space=types.SimpleNamespace(
            energies=lambda *a: (_ for _ in ()).throw(ValueError("bad shape")), project=lambda *a, **k: None))
    # undeclared models and layers
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    for fn in (lambda: ProjectionPenalty(model, 1.0), lambda: project_(model), lambda: report(model)):
        with pytest.raises(ValueError, match="no declared layers"):
            fn()
    with pytest.raises(ValueError, match="is not declared"):
        layer_energies(model[0])
    declare(model[0], reg, reg)
    with pytest.raises(ValueError, match="'1' .* is not declared"):
        ProjectionPenalty(model, 1.0, layers=["0", "1"])
    with pytest.raises(ValueError, match="is not declared"):
        ProjectionPenalty(model, 1.0, layers=[model[1]])
    with pytest.raises(ValueError, match="no layer named"):
        ProjectionPenalty(model, 1.0, layers=["7"])
    with pytest.raises(ValueError, match="not declared layers"):
        ProjectionPenalty(model, {"0": 1.0, "1": 2.0})
    with pytest.raises(ValueError, match="no value for"):
        ProjectionPenalty(model, {"default": 1.0}, lambda_G={})
    with pytest.raises(ValueError, match=">= 0"):
        ProjectionPenalty(model, -1.0)
    with pytest.raises(ValueError, match="norm"):
        ProjectionPenalty(model, 1.0, norm="l1")
    with pytest.raises(ValueError, match="which"):
        project_(model, which="both")
    pen = ProjectionPenalty(model, 1.0)
    model[0].weight = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match="declared"):
        pen()


# ---------------------------------------------------------------------------------------------
# AMP, torch.compile
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_weights(dtype, seed):
    model, layers, *_ = c4_cnn(dtype)
    pen = ProjectionPenalty(model, 1.0, 0.1)
    value = pen()
    assert value.dtype == torch.float32
    expect = sum(e_p + 0.1 * e_g for e_p, e_g in (ref_energies(l, ri, ro, ks) for l, ri, ro, ks in layers))
    assert rel(value, expect) < 1e-5
    value.backward()
    layer = layers[1][0]
    assert layer.weight.grad.dtype == dtype
    # dE/dW = 2 (W - PW) + 0.2 PW, compared in float64 on the same rounded weights
    W = layer.weight.detach().double()
    PW = ep.project(W.reshape(W.shape[0], -1), declaration(layer).weight_rep_in, layers[1][2]).reshape(W.shape)
    torch.testing.assert_close(layer.weight.grad.double(), 2 * (W - PW) + 0.2 * PW, atol=2e-2 * float(W.abs().max()),
                               rtol=2e-2)


def test_autocast_does_not_lower_precision(seed):
    model, *_ = c4_cnn(torch.float32)
    pen = ProjectionPenalty(model, 1.0, 0.1)
    plain = pen()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(2, 1, 7, 7))
        under = pen()
    assert y.dtype == torch.bfloat16  # autocast is on for the model...
    assert under.dtype == torch.float32 and rel(under, plain) < 1e-6  # ...and off for the penalty


def test_torch_compile(seed):
    """A compiled step (model + penalty) equals the eager one. The penalty is one eager call inside
    the compiled code (a graph break, see equiproj.nn); backend "aot_eager" exercises dynamo and
    AOT autograd around it without inductor's C++ build time (inductor: checked by hand, same result)."""
    model, _, sample, *_ = c4_cnn(torch.float32)
    pen = ProjectionPenalty(model, 0.1, 0.01)
    x = sample(4)

    def step(x):
        return model(x).square().mean() + pen()

    eager = step(x)
    eager.backward()
    g_eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(step, backend="aot_eager")
    value = compiled(x)
    value.backward()
    assert rel(value, eager) < 1e-5
    for p, g in zip(model.parameters(), g_eager):
        torch.testing.assert_close(p.grad, g, atol=1e-5 * float(g.abs().max()), rtol=1e-4)


def test_wrapped_models_keep_layer_names(seed):
    model, *_ = c4_cnn()
    wrapped = torch.compile(model)  # compiles lazily: nothing is compiled here
    pen = ProjectionPenalty(wrapped, {"0": 1.0, "2": 0.5, "6": 0.1})
    assert pen.names == ["0", "2", "6"] and "[grid]" in repr(pen)
    assert rel(pen(), ProjectionPenalty(model, {"0": 1.0, "2": 0.5, "6": 0.1})()) < 1e-15


def test_overhead_example_runs():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import penalty_overhead
    finally:
        sys.path.pop(0)
    r = penalty_overhead.measure(batch=2, size=5, copies=1, repeats=1)
    assert r["ratio"] > 0 and r["ratio_one_pass"] > 0 and r["params"] > 0


def test_quickstart_example_runs(capsys):
    runpy.run_path(os.path.join(ROOT, "examples", "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "E_perp" in out and "exact grid action" in out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(seed):
    cpu, layers, sample, *_ = c4_cnn(torch.float32)
    gpu = copy.deepcopy(cpu).cuda()
    pen_c, pen_g = ProjectionPenalty(cpu, 0.3, 0.05), ProjectionPenalty(gpu, 0.3, 0.05)
    v_c, v_g = pen_c(), pen_g()
    assert v_g.device.type == "cuda" and rel(v_g.cpu(), v_c) < 1e-5
    v_c.backward()
    v_g.backward()
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, atol=1e-5 * float(p.grad.abs().max()), rtol=1e-4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert rel(pen_g(), v_g) < 1e-6
    project_(gpu)
    assert float(pen_g.energies()[0].detach().max()) < 1e-10
    x = sample(2).cuda()
    with torch.no_grad():
        y = gpu(x)
        for g in ep.Cyclic(4).elements():
            torch.testing.assert_close(gpu(grid.act(x, g)), y @ layers[2][2].matrix(g).float().cuda().T, atol=1e-5, rtol=0)
