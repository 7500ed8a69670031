"""Group actions on grids (equiproj.grid): the axis convention, the kernel permutation rep.

The convention is pinned to torch's own operations: C4's generator R(90°) is
``torch.rot90(x, 1, dims=(-1, -2))``, D4's reflection diag(1, -1) is ``torch.flip(x, (-2,))``.
Everything else is exact integer bookkeeping: equalities are checked exactly (float64, atol 0).
"""

import itertools

import pytest
import torch

import equiproj as ep
from equiproj import grid


def _rot90_xy():
    return torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 4, 5])
def test_act_matches_torch_rot90_and_flip_2d(n):
    x = torch.randn(3, 2, n, n, dtype=torch.float64)
    R = ep.Cyclic(4).elements()[1]
    torch.testing.assert_close(R, _rot90_xy(), atol=1e-15, rtol=0)
    assert torch.equal(grid.act(x, R), torch.rot90(x, 1, dims=(-1, -2)))
    F = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    assert torch.equal(grid.act(x, F), torch.flip(x, dims=(-2,)))  # y -> -y: rows reversed
    assert torch.equal(grid.act(x, -F), torch.flip(x, dims=(-1,)))  # x -> -x: columns reversed


def test_act_matches_torch_3d():
    x = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    Rz = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # about z: x->y
    assert torch.equal(grid.act(x, Rz), torch.rot90(x, 1, dims=(-1, -2)))
    Rx = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)  # about x: y->z
    assert torch.equal(grid.act(x, Rx), torch.rot90(x, 1, dims=(-2, -3)))
    assert torch.equal(grid.act(x, -torch.eye(3, dtype=torch.float64)), torch.flip(x, dims=(-1, -2, -3)))


@pytest.mark.parametrize("G,shape", [(ep.Cyclic(4), (5, 5)), (ep.Dihedral(4), (4, 4)), (ep.Dihedral(2), (3, 4)),
                                     (ep.Octahedral(), (3, 3, 3)), (ep.FullOctahedral(), (2, 2, 2))], ids=str)
def test_act_is_a_group_action_and_matches_kernel_rep(G, shape):
    els = G.elements()
    x = torch.randn(2, *shape, dtype=torch.float64)
    pairs = list(itertools.product(range(len(els)), repeat=2))[:: max(1, len(els) ** 2 // 150)]
    for i, j in pairs:  # g·(h·x) = (gh)·x
        assert torch.equal(grid.act(grid.act(x, els[j]), els[i]), grid.act(x, els[i] @ els[j]))
    # rho_pix(g) vec(x) = vec(g·x): the kernel rep acts like the tensor action, in flatten order
    rho = grid.kernel_rep(G, shape)
    R = rho.matrix(els)
    moved = torch.stack([grid.act(x, g).reshape(2, -1) for g in els])
    assert torch.equal(torch.einsum("gij,bj->gbi", R, x.reshape(2, -1)), moved)
    # and it equals the plain (one dense field) permutation rep of the grid points
    dense = ep.Rep.permutation(G, points=grid.grid_points(shape))
    assert torch.equal(R, dense.matrix(els))
    # orbit structure: small fields, not one field of size prod(shape)
    assert sum(c * f.dim for c, f in rho.segments) == rho.dim == torch.tensor(shape).prod()
    assert max(f.dim for _, f in rho.segments) <= len(els)


def test_grid_points_convention():
    p = grid.grid_points((3, 3))
    assert p.shape == (9, 2)
    assert p[1].tolist() == [0.0, -1.0]  # row 0, column 1: x = 0, y = -1
    assert p[5].tolist() == [1.0, 0.0]  # row 1, column 2
    q = grid.grid_points((2, 3, 4))
    assert q[0].tolist() == [-1.5, -1.0, -0.5] and q[-1].tolist() == [1.5, 1.0, 0.5]  # (x, y, z)


def test_has_grid_action():
    assert grid.has_grid_action(ep.Cyclic(4), (3, 3)) and grid.has_grid_action(ep.Dihedral(4), (6, 6))
    assert grid.has_grid_action(ep.Dihedral(2), (3, 5)) and grid.has_grid_action(ep.Cyclic(1), (2, 7))
    assert not grid.has_grid_action(ep.Cyclic(4), (3, 5))
    assert not grid.has_grid_action(ep.Cyclic(8), (3, 3)) and not grid.has_grid_action(ep.SO2(), (3, 3))
    assert grid.has_grid_action(ep.Octahedral(), (4, 4, 4)) and not grid.has_grid_action(ep.Octahedral(), (3, 3, 5))
    assert not grid.has_grid_action(ep.Cyclic(4), (3, 3, 3))  # a 2-D group on a 3-D grid
    for G in (ep.SO3(), ep.O2(), ep.Cyclic(7)):  # 1x1 kernels: every group
        assert grid.has_grid_action(G, (1, 1)) and grid.has_grid_action(G, (1,))
    assert grid.kernel_rep(ep.SO3(), (1, 1, 1)) == ep.SO3().trivial()


def test_errors():
    with pytest.raises(ValueError, match="onto itself"):
        grid.kernel_rep(ep.Cyclic(8), (3, 3))
    with pytest.raises(ValueError, match="onto itself"):
        grid.act(torch.randn(3, 5), ep.Cyclic(4).elements()[1])
    with pytest.raises(ValueError, match="one \\[s, s\\]"):
        grid.act(torch.randn(3, 3), ep.Cyclic(4).elements())
    with pytest.raises(ValueError, match="channel axis"):
        grid.act(torch.randn(2, 3, 3), ep.Cyclic(4).elements()[1], rep=ep.Cyclic(4).regular())
    with pytest.raises(TypeError):
        grid.grid_points(3)
    with pytest.raises(ValueError):
        grid.grid_points((3, 0))


def test_act_on_fields_uses_the_rep():
    G = ep.Dihedral(4)
    rep = G.regular() + G.standard()
    x = torch.randn(2, rep.dim, 5, 5, dtype=torch.float64)
    for g in G.elements():
        expect = torch.einsum("ab,nbyx->nayx", rep.matrix(g), grid.act(x, g))
        torch.testing.assert_close(grid.act(x, g, rep), expect, atol=1e-14, rtol=0)
