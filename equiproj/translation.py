"""Translations of a periodic grid Z_N^s (s = 1, 2) and locally connected layers (docs/math.md §7).

A locally connected layer has one kernel per output position. On a periodic grid it is
translation equivariant iff it is a convolution: the same kernel at every position. The
group (cyclic shifts of the grid) is self-contained here; it is not a :class:`equiproj.Group`.

Two layouts of such a weight:

* **compact** (what :class:`LocallyConnected1d` / :class:`LocallyConnected2d` store):
  ``w [c_out, c_in, *positions, *kernel]`` with ``y[o, p] = sum_{a, d} w[o, a, p, d] x[a, p + d - c]``
  (indices mod N, ``c = (k - 1) // 2``). A shift by ``t`` maps it to ``w[o, a, p - t, d]``; the
  projection averages over all shifts, i.e. over positions: ``P(w)[o, a, p, d] = mean_p w``.
  In Fourier terms (DFT over positions, orthonormal) the equivariant part is the zero
  frequency, and ``E_perp`` the energy of all other frequencies, which by Parseval is
  ``sum (w - mean_p w)^2``: that residual form is what :func:`energies` computes (one pass,
  no cancellation, and cheaper than the FFT it equals).
* **dense**: ``M [..., *out_positions, *in_positions]``, any linear map between signals on the
  grid (``y[p] = sum_q M[p, q] x[q]``). Equivariant iff circulant, ``M[p, q] = m(q - p)``; the
  projection averages ``S_t^T M S_t`` over all shifts. With the unitary DFT ``F``,
  ``F M F^H`` is diagonal iff M is circulant, and ``E_perp`` is exactly the off-diagonal energy
  of this 2-D DFT over (output position, input position): :func:`dense_energies`.

Both are exact; both are tested against the float64 reference that averages over all shifts.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.inputs import accumulation_dtype

__all__ = ["energies", "project", "dense_energies", "dense_project", "LocallyConnected1d", "LocallyConnected2d",
           "is_locally_connected"]


def _check_compact(weight, spatial_dims: int, name="weight"):
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if spatial_dims not in (1, 2):
        raise ValueError(f"spatial_dims must be 1 or 2, got {spatial_dims!r}")
    if weight.dim() < spatial_dims:
        raise ValueError(f"{name} must have at least {spatial_dims} position axes, got shape {tuple(weight.shape)}")


def energies(weight: torch.Tensor, spatial_dims: int, position_dim: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E_perp, E_G)`` (scalars) of a compact locally connected weight under translations.

    Args:
        weight: ``[..., *positions, ...]``: the ``spatial_dims`` axes starting at ``position_dim``
            index the output position (``[c_out, c_in, *positions, *kernel]``: ``position_dim = 2``;
            a bias ``[c_out, *positions]``: ``position_dim = 1``).
        spatial_dims: 1 or 2.
    Returns:
        ``E_perp = sum (w - mean_positions w)^2`` (the non-zero-frequency energy of the DFT over
        positions) and ``E_G = (number of positions) * sum (mean_positions w)^2``, float32 (float64
        for float64 weights), differentiable.
    """
    _check_compact(weight, spatial_dims)
    axes = tuple(range(position_dim, position_dim + spatial_dims))
    if axes[-1] >= weight.dim():
        raise ValueError(f"weight of shape {tuple(weight.shape)} has no position axes {axes}")
    w = weight.to(accumulation_dtype(weight.dtype))
    mean = w.mean(axes, keepdim=True)
    n = math.prod(weight.shape[a] for a in axes)
    return (w - mean).square().sum(), mean.square().sum() * n


def project(weight: torch.Tensor, spatial_dims: int, which: str = "equivariant", position_dim: int = 2) -> torch.Tensor:
    """The translation-equivariant part (mean over positions, broadcast back) or the rest, in ``weight.dtype``."""
    _check_compact(weight, spatial_dims)
    _check_which(which)
    axes = tuple(range(position_dim, position_dim + spatial_dims))
    w = weight.to(accumulation_dtype(weight.dtype))
    mean = w.mean(axes, keepdim=True).expand_as(w)
    return (mean if which == "equivariant" else w - mean).to(weight.dtype)


def _check_which(which):
    if which not in ("equivariant", "non_equivariant"):
        raise ValueError(f"which must be 'equivariant' or 'non_equivariant', got {which!r}")


def _dense_dft(M: torch.Tensor, grid: tuple[int, ...]):
    s = len(grid)
    out_axes = tuple(range(-2 * s, -s))
    in_axes = tuple(range(-s, 0))
    # F M F^H: unitary DFT over the output position, inverse (conjugate) DFT over the input position
    Mh = torch.fft.fftn(M, dim=out_axes, norm="ortho")
    Mh = torch.fft.ifftn(Mh, dim=in_axes, norm="ortho")
    P = math.prod(grid)
    return Mh.reshape(M.shape[: M.dim() - 2 * s] + (P, P))


def _check_dense(M, grid):
    if not isinstance(M, torch.Tensor) or not M.is_floating_point():
        raise TypeError("M must be a floating-point torch.Tensor")
    grid = tuple(int(n) for n in grid)
    if len(grid) not in (1, 2) or any(n < 1 for n in grid):
        raise ValueError(f"grid must be (N,) or (N1, N2) with positive sizes, got {grid}")
    if M.dim() < 2 * len(grid) or tuple(M.shape[-2 * len(grid):]) != grid + grid:
        raise ValueError(f"M must have shape [..., *{grid}, *{grid}] (output positions, then input positions), "
                         f"got {tuple(M.shape)}")
    return grid


def dense_energies(M: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E_perp, E_G)``, each ``[...]``, of dense position-to-position maps ``M [..., *grid, *grid]``.

    ``E_perp`` is the off-diagonal energy of the unitary 2-D DFT ``F M F^H`` over (output
    position, input position), summed directly (never as total minus diagonal); ``E_G`` its
    diagonal energy. Exact; differentiable; float32 (float64 for float64 input).
    """
    grid = _check_dense(M, grid)
    Mh = _dense_dft(M.to(accumulation_dtype(M.dtype)), grid)
    P = Mh.shape[-1]
    E = Mh.real.square() + Mh.imag.square()
    diag = torch.eye(P, dtype=torch.bool, device=M.device)
    e_g = E.diagonal(dim1=-2, dim2=-1).sum(-1)
    e_perp = E.masked_fill(diag, 0.0).sum((-2, -1))
    return e_perp, e_g


def dense_project(M: torch.Tensor, grid: Sequence[int], which: str = "equivariant") -> torch.Tensor:
    """The circulant part of ``M`` (its DFT diagonal, transformed back) or the rest, in ``M.dtype``."""
    grid = _check_dense(M, grid)
    _check_which(which)
    s = len(grid)
    Mh = _dense_dft(M.to(accumulation_dtype(M.dtype)), grid)
    P = Mh.shape[-1]
    diag = torch.eye(P, dtype=torch.bool, device=M.device)
    Mh = Mh * diag if which == "equivariant" else Mh.masked_fill(diag, 0.0)
    Mh = Mh.reshape(M.shape)
    X = torch.fft.fftn(torch.fft.ifftn(Mh, dim=tuple(range(-2 * s, -s)), norm="ortho"), dim=tuple(range(-s, 0)), norm="ortho")
    return X.real.to(M.dtype)


class _LocallyConnected(nn.Module):
    spatial_dims: int

    def __init__(self, in_channels: int, out_channels: int, size, kernel_size, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        s = self.spatial_dims
        size = (size,) * s if isinstance(size, int) else tuple(size)
        kernel_size = (kernel_size,) * s if isinstance(kernel_size, int) else tuple(kernel_size)
        if len(size) != s or len(kernel_size) != s or any(int(v) < 1 for v in size + kernel_size):
            raise ValueError(f"size and kernel_size must be {s} positive ints, got {size}, {kernel_size}")
        if any(k > n for k, n in zip(kernel_size, size)):
            raise ValueError(f"kernel_size {kernel_size} larger than the periodic grid {size}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.size, self.kernel_size = size, kernel_size
        fk = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *size, *kernel_size, **fk))
        self.bias = nn.Parameter(torch.empty(out_channels, *size, **fk)) if bias else None
        bound = 1 / math.sqrt(in_channels * math.prod(kernel_size))
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, size={self.size}, kernel_size={self.kernel_size}, "
                f"bias={self.bias is not None}, periodic")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spatial_dims
        if x.dim() != s + 2 or x.shape[1] != self.in_channels or tuple(x.shape[2:]) != self.size:
            raise ValueError(f"expected input [B, {self.in_channels}, *{self.size}], got {tuple(x.shape)}")
        pad = []
        for k in reversed(self.kernel_size):  # F.pad lists the last axis first
            c = (k - 1) // 2
            pad += [c, k - 1 - c]
        xp = F.pad(x, pad, mode="circular")
        # patches [B, c_in, *positions, *kernel]: patch at p holds x[p + d - c]
        for i, k in enumerate(self.kernel_size):
            xp = xp.unfold(2 + i, k, 1)
        letters = "pq"[:s]
        kl = "uv"[:s]
        out = torch.einsum(f"oa{letters}{kl},ba{letters}{kl}->bo{letters}", self.weight, xp)
        if self.bias is not None:
            out = out + self.bias
        return out


class LocallyConnected1d(_LocallyConnected):
    """Periodic 1-D locally connected layer: ``[B, c_in, N] -> [B, c_out, N]``, one kernel per position.

    ``weight [c_out, c_in, N, k]``, ``bias [c_out, N]``; with every position's kernel equal it is
    ``Conv1d(..., padding_mode="circular")`` (stride 1, output position p sees ``x[p - c : p - c + k]``).
    """

    spatial_dims = 1


class LocallyConnected2d(_LocallyConnected):
    """Periodic 2-D locally connected layer: ``[B, c_in, H, W] -> [B, c_out, H, W]``.

    ``weight [c_out, c_in, H, W, k_h, k_w]``, ``bias [c_out, H, W]``.
    """

    spatial_dims = 2


def is_locally_connected(module) -> bool:
    return isinstance(module, _LocallyConnected)
