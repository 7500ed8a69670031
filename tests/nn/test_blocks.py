"""The equivariant building blocks: each commutes with the group on [B, C] and [B, C, *spatial] tensors,
for several groups and field types, in float64 (to 1e-12), float32 and bfloat16, under torch.compile;
and each refuses the fields it cannot handle."""

import pytest
import torch
from torch import nn

import equiproj as ep
from equiproj import grid
from equiproj.testing import random_orthogonal
from equiproj.nn import (FieldBatchNorm, FieldLayerNorm, Gate, GridPool, GroupPooling, NormActivation, NormPooling,
                         PointwiseActivation, centred_grid)


def act_channels(x, rep, g):
    """``rho(g)`` on dim 1 only (vector features, or fields without moving the positions)."""
    R = rep.matrix(g).to(x)
    return torch.movedim(torch.movedim(x, 1, -1) @ R.T, -1, 1)


def act(x, rep, g):
    return grid.act(x, g, rep) if x.dim() > 2 else act_channels(x, rep, g)


def assert_equivariant(block, x, elements, tol):
    y = block(x)
    for g in elements:
        err = (block(act(x, block.rep_in, g)) - act(y, block.rep_out, g)).abs().max()
        assert float(err) <= tol * max(1.0, float(y.abs().max())), (type(block).__name__, float(err))


def any_fields(G):
    """Irreps with multiplicities, a tensor product (a permutation of the channels), a change of basis."""
    if G.ambient_dim == 3:
        p = {ep.O3(): "0e + 2x1o + 2e", ep.FullOctahedral(): "A1g + T1u + Eg", ep.Octahedral(): "A1 + 2xT1 + E"}.get(
            G, "0 + 2x1 + 2")
    elif G.is_finite:
        p = "regular"
    else:
        p = "0 + 2x1 + 2" if G == ep.SO2() else "(0,0) + 2x(1,1) + (1,2)"
    r = ep.Rep.parse(G, p) + G.standard() @ G.standard()
    return r.change_basis(random_orthogonal(r.dim, torch.Generator().manual_seed(3)))


GROUPS = [ep.Cyclic(4), ep.Dihedral(4), ep.SO2(), ep.O2(), ep.SO3(), ep.O3(), ep.Octahedral(), ep.FullOctahedral()]


def grid_size(G):
    return 5 if G.ambient_dim == 2 else 3


def elements(G, spatial):
    if spatial:
        shape = (grid_size(G),) * G.ambient_dim
        return [g for g in (G.elements() if G.is_finite else ep.nn._check._grid_subgroup(G, shape))
                if grid.grid_permutation(g, shape) is not None]
    return G.elements() if G.is_finite else G.sample(6, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("G", GROUPS, ids=str)
@pytest.mark.parametrize("spatial", [False, True], ids=["vectors", "grid"])
def test_any_field_blocks_commute(G, spatial, gen):
    r = any_fields(G)
    shape = (6, r.dim) + ((grid_size(G),) * G.ambient_dim if spatial else ())
    x = torch.randn(shape, dtype=torch.float64, generator=gen)
    els = elements(G, spatial)
    blocks = [NormActivation(r), NormActivation(r, act=torch.relu, normalize=True), NormPooling(r),
              FieldBatchNorm(r), FieldLayerNorm(r)]
    for b in blocks:
        b.double()
        for p in b.parameters():  # non-trivial affine parameters
            with torch.no_grad():
                p.normal_(generator=gen)
    for b in blocks:
        assert_equivariant(b, x, els, 1e-12)
    bn = blocks[3]
    bn.train()
    bn(x)
    bn.eval()  # running statistics: a fixed shift, still equivariant
    assert_equivariant(bn, x, els, 1e-12)


@pytest.mark.parametrize("G", [ep.Cyclic(4), ep.Dihedral(4), ep.Octahedral()], ids=str)
def test_permutation_field_blocks_commute(G, gen):
    r = (2 if G.ambient_dim == 2 else 1) * G.regular() + G.trivial()
    s = G.ambient_dim
    x = torch.randn((3 if s == 2 else 1, r.dim) + (9,) * s, dtype=torch.float64, generator=gen)
    els = G.elements() if s == 2 else G.generators()  # 3-D: the generators (the rest follows), to stay fast
    for b in [PointwiseActivation(r), PointwiseActivation(r, torch.tanh), GroupPooling(r), GroupPooling(r, "mean"),
              GridPool(r, s, 3, 2), GridPool(r, s, 3, 2, mode="max"), GridPool(r, s, 3, 3, 0)]:
        assert_equivariant(b.double(), x, els, 1e-12)
    assert GroupPooling(r).rep_out == sum(c for c, _ in r.segments) * G.trivial()


def test_gate_commutes_and_checks_its_fields(gen):
    G = ep.O3()
    gate = Gate(ep.Rep.parse(G, "4x0e + 2x0o"), ep.Rep.parse(G, "3x0e"), ep.Rep.parse(G, "2x1o + 2e"),
                act_scalars=torch.tanh)
    assert gate.rep_out == ep.Rep.parse(G, "4x0e + 2x0o + 2x1o + 2e")
    x = torch.randn(5, gate.rep_in.dim, dtype=torch.float64, generator=gen)
    assert_equivariant(gate, x, G.sample(6, generator=gen), 1e-12)
    with pytest.raises(ValueError, match="odd"):  # silu is not odd: wrong on the pseudo-scalars
        Gate(ep.Rep.parse(G, "0o"), ep.Rep.parse(G, "0e"), ep.Rep.parse(G, "1o"))
    with pytest.raises(ValueError, match="one gate per copy"):
        Gate(ep.Rep.parse(G, "0e"), ep.Rep.parse(G, "2x0e"), ep.Rep.parse(G, "1o"))
    with pytest.raises(ValueError, match="trivial fields"):
        Gate(ep.Rep.parse(G, "0e"), ep.Rep.parse(G, "1o"), ep.Rep.parse(G, "0o + 1e + 2e"))


def test_pointwise_and_group_pooling_refuse_other_fields():
    with pytest.raises(ValueError, match="Gate or equiproj.nn.NormActivation"):
        PointwiseActivation(ep.Rep.parse(ep.SO2(), "0 + 1"))
    with pytest.raises(ValueError, match="NormPooling"):
        GroupPooling(ep.Cyclic(4).standard())
    with pytest.raises(ValueError, match="mode='avg'"):
        GridPool(ep.Cyclic(4).standard(), 2, 2, mode="max")
    with pytest.raises(ValueError, match="channel axis"):
        NormActivation(ep.Cyclic(4).regular())(torch.randn(2, 3))


def test_a_relu_on_irrep_fields_is_not_equivariant(gen):
    """What PointwiseActivation refuses really breaks equivariance (the check can fail)."""
    r = ep.Rep.parse(ep.SO2(), "0 + 1")
    x = torch.randn(50, r.dim, dtype=torch.float64, generator=gen)
    g = ep.SO2().sample(1, generator=gen)[0]
    err = (torch.relu(act_channels(x, r, g)) - act_channels(torch.relu(x), r, g)).abs().max()
    assert float(err) > 0.1


def test_grid_pool_sizes():
    r = ep.Cyclic(4).regular()
    assert centred_grid(9, 3, 2) and not centred_grid(10, 3, 2) and centred_grid(10, 2, 2) and centred_grid(33, 3, 2, 1)
    with pytest.raises(ValueError, match=r"\(n - 3\) % 2 == 0"):
        GridPool(r, 2, 3, 2)(torch.randn(1, 4, 10, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision(dtype, gen):
    G = ep.Cyclic(4)
    r = 2 * G.regular()
    x = torch.randn(4, r.dim, 7, 7, generator=gen).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    for b in [NormActivation(r), FieldBatchNorm(r).eval(), FieldLayerNorm(r), GroupPooling(r), GridPool(r, 2, 3, 2)]:
        b.to(dtype)
        y = b(x)
        assert y.dtype == dtype
        assert_equivariant(b, x, G.elements(), tol)


def test_blocks_under_torch_compile(gen):
    G = ep.O3()
    r = ep.Rep.parse(G, "2x0e + 1o")
    gate = Gate(ep.Rep.parse(G, "2x0e"), ep.Rep.parse(G, "0e"), ep.Rep.parse(G, "1o"))
    model = nn.Sequential(NormActivation(r), FieldLayerNorm(r), NormPooling(r))
    x = torch.randn(3, r.dim, generator=gen)
    xg = torch.randn(3, gate.rep_in.dim, generator=gen)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.compile(gate, fullgraph=True)(xg), gate(xg), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(gen):
    G = ep.Cyclic(4)
    r = 2 * G.regular()
    x = torch.randn(4, r.dim, 7, 7, generator=gen)
    for b in [NormActivation(r), FieldBatchNorm(r), FieldLayerNorm(r), GroupPooling(r), GridPool(r, 2, 3, 2)]:
        torch.testing.assert_close(b.cuda()(x.cuda()).cpu(), b.cpu()(x), rtol=1e-5, atol=1e-6)
