"""Translations of periodic grids and locally connected layers (equiproj.translation, docs/math.md §7).

Reference: the float64 average over all cyclic shifts, ``P(M) = mean_t S_t^T M S_t``, computed
with ``torch.roll`` (no Fourier transform). Tolerances: float64 1e-10 relative on energies
(1e-3 for nearly equivariant weights with E_perp/||W||^2 ~ 1e-12), float32 1e-5.
"""

import pytest
import torch
import torch.nn.functional as F

from equiproj import translation as tr
from equiproj.testing import relative_error as rel


def shift_average(M, grid):
    """Reference: mean over all shifts t of M[p + t, q + t] (dense layout [..., *grid, *grid])."""
    s = len(grid)
    out_axes = tuple(range(M.dim() - 2 * s, M.dim() - s))
    in_axes = tuple(range(M.dim() - s, M.dim()))
    acc = torch.zeros_like(M, dtype=torch.float64)
    ts = torch.cartesian_prod(*[torch.arange(n) for n in grid]).reshape(-1, s)
    for t in ts.tolist():
        acc += torch.roll(M.double(), shifts=tuple(t) * 2, dims=out_axes + in_axes)
    return acc / len(ts)


def to_dense(w, grid, kernel):
    """Compact LC weight [c_out, c_in, *grid, *kernel] -> dense [c_out, c_in, *grid, *grid]."""
    s = len(grid)
    M = torch.zeros(w.shape[:2] + tuple(grid) * 2, dtype=w.dtype)
    for p in torch.cartesian_prod(*[torch.arange(n) for n in grid]).reshape(-1, s).tolist():
        for d in torch.cartesian_prod(*[torch.arange(k) for k in kernel]).reshape(-1, s).tolist():
            q = tuple((p[i] + d[i] - (kernel[i] - 1) // 2) % grid[i] for i in range(s))
            M[(slice(None), slice(None)) + tuple(p) + q] += w[(slice(None), slice(None)) + tuple(p) + tuple(d)]
    return M


CASES = [((7,), (3,)), ((8,), (4,)), ((5, 4), (3, 3)), ((4, 6), (2, 3))]


@pytest.mark.parametrize("grid,kernel", CASES, ids=str)
def test_dense_energies_equal_shift_average(grid, kernel, gen):
    M = torch.randn((2, 3) + grid * 2, dtype=torch.float64, generator=gen)
    PM = shift_average(M, grid)
    e_perp, e_g = tr.dense_energies(M, grid)
    assert e_perp.shape == (2, 3) and e_perp.dtype == torch.float64
    assert rel(e_perp, (M - PM).square().flatten(2).sum(-1)) < 1e-10
    assert rel(e_g, PM.square().flatten(2).sum(-1)) < 1e-10
    torch.testing.assert_close(tr.dense_project(M, grid), PM, atol=1e-12, rtol=0)
    torch.testing.assert_close(tr.dense_project(M, grid, "non_equivariant"), M - PM, atol=1e-12, rtol=0)
    # circulant maps have no off-diagonal DFT energy
    assert float(tr.dense_energies(PM, grid)[0].max()) < 1e-24 * float(PM.square().sum())


@pytest.mark.parametrize("grid,kernel", CASES, ids=str)
def test_compact_energies_equal_shift_average(grid, kernel, gen):
    w = torch.randn((3, 2) + grid + kernel, dtype=torch.float64, generator=gen)
    M = to_dense(w, grid, kernel)
    PM = shift_average(M, grid)
    e_perp, e_g = tr.energies(w, len(grid))
    assert rel(e_perp, (M - PM).square().sum()) < 1e-10
    assert rel(e_g, PM.square().sum()) < 1e-10
    # the compact projection is the dense one, in compact form
    torch.testing.assert_close(to_dense(tr.project(w, len(grid)), grid, kernel), PM, atol=1e-12, rtol=0)
    # and the dense path (2-D DFT) agrees on the embedded weight
    assert rel(tr.dense_energies(M, grid)[0].sum(), e_perp) < 1e-10


def test_nearly_equivariant_and_float32(gen):
    grid, kernel = (6, 5), (3, 3)
    conv = torch.randn(4, 3, 1, 1, *kernel, dtype=torch.float64, generator=gen).expand(4, 3, *grid, *kernel)
    noise = torch.randn(conv.shape, dtype=torch.float64, generator=gen)
    noise = noise - noise.mean((2, 3), keepdim=True)
    w = conv + noise * (1e-12 * conv.square().sum() / noise.square().sum()).sqrt()
    M = to_dense(w, grid, kernel)
    ref = (M - shift_average(M, grid)).square().sum()
    assert 1e-13 < float(ref / M.square().sum()) < 1e-11
    assert rel(tr.energies(w, 2)[0], ref) < 1e-3
    w32 = torch.randn(4, 3, *grid, *kernel, generator=gen)
    e32 = tr.energies(w32, 2)
    assert e32[0].dtype == torch.float32
    assert rel(e32[0], tr.energies(w32.double(), 2)[0]) < 1e-5


def test_gradient(gen):
    w = torch.randn(2, 2, 5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    e_perp, e_g = tr.energies(w, 1)
    (g_perp,) = torch.autograd.grad(e_perp, w)
    torch.testing.assert_close(g_perp, 2 * (w - w.mean(2, keepdim=True)).detach(), atol=1e-13, rtol=0)
    assert torch.autograd.gradcheck(lambda x: tr.energies(x, 1), (w,))
    M = torch.randn(2, 4, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: tr.dense_energies(x, (4,)), (M,))


@pytest.mark.parametrize("cls,grid,k", [(tr.LocallyConnected1d, (9,), 3), (tr.LocallyConnected2d, (6, 7), 3),
                                        (tr.LocallyConnected2d, (5, 5), 1)], ids=["1d", "2d", "2d-k1"])
def test_locally_connected_is_a_convolution_after_projection(cls, grid, k, gen):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    layer = cls(3, 4, grid, k).double()
    x = torch.randn(2, 3, *grid, dtype=torch.float64)
    dims = tuple(range(2, 2 + len(grid)))
    shift = tuple(range(1, len(grid) + 1))
    before = (layer(torch.roll(x, shift, dims)) - torch.roll(layer(x), shift, dims)).abs().max()
    assert before > 1e-3  # a generic locally connected layer is not translation equivariant
    with torch.no_grad():
        layer.weight.copy_(tr.project(layer.weight, len(grid)))
        layer.bias.copy_(tr.project(layer.bias, len(grid), position_dim=1))
    assert float(tr.energies(layer.weight.detach(), len(grid))[0]) < 1e-28
    out = layer(x)
    torch.testing.assert_close(layer(torch.roll(x, shift, dims)), torch.roll(out, shift, dims), atol=1e-12, rtol=0)
    # equals the circular convolution with the shared kernel
    conv = {1: F.conv1d, 2: F.conv2d}[len(grid)]
    kern = layer.weight[(slice(None), slice(None)) + (0,) * len(grid)]
    pad = [(k - 1) // 2] * (2 * len(grid))
    ref = conv(F.pad(x, pad, mode="circular"), kern, layer.bias[(slice(None),) + (0,) * len(grid)])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_errors():
    with pytest.raises(ValueError, match="spatial_dims"):
        tr.energies(torch.randn(2, 2, 3, 3), 3)
    with pytest.raises(TypeError):
        tr.energies(torch.ones(2, 2, 3, 3, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="output positions"):
        tr.dense_energies(torch.randn(2, 4, 5), (4,))
    with pytest.raises(ValueError, match="which"):
        tr.project(torch.randn(2, 2, 3, 3), 1, which="both")
    with pytest.raises(ValueError, match="larger than"):
        tr.LocallyConnected1d(2, 2, 3, 5)
    with pytest.raises(ValueError, match="expected input"):
        tr.LocallyConnected1d(2, 2, 6, 3)(torch.randn(1, 2, 7))
