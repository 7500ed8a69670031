"""``nn.Linear`` / ``nn.Conv2d`` / ``nn.Conv3d`` declared at construction: plain layers otherwise."""

from __future__ import annotations

from torch import nn

from ..groups import Rep, check_rep_pair
from ._declare import declare

__all__ = ["ApproxEquivariantLinear", "ApproxEquivariantConv2d", "ApproxEquivariantConv3d"]


class ApproxEquivariantLinear(nn.Linear):
    """``nn.Linear(rep_in.dim, rep_out.dim)`` declared with ``(rep_in, rep_out)``: a plain
    ``nn.Linear`` otherwise (same forward, parameters and state_dict)."""

    def __init__(self, rep_in: Rep, rep_out: Rep, bias: bool = True, device=None, dtype=None):
        check_rep_pair(rep_in, rep_out)
        super().__init__(rep_in.dim, rep_out.dim, bias=bias, device=device, dtype=dtype)
        declare(self, rep_in, rep_out)


class _ApproxEquivariantConvNd:
    """The constructor of the declared convolutions (mixed into ``nn.Conv2d`` / ``nn.Conv3d``)."""

    def __init__(self, rep_in: Rep, rep_out: Rep, kernel_size, stride=1, padding=0, dilation=1, bias: bool = True,
                 padding_mode: str = "zeros", device=None, dtype=None, *, kernel_space=None):
        check_rep_pair(rep_in, rep_out)
        super().__init__(rep_in.dim, rep_out.dim, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         bias=bias, padding_mode=padding_mode, device=device, dtype=dtype)
        declare(self, rep_in, rep_out, kernel_space=kernel_space)


class ApproxEquivariantConv2d(_ApproxEquivariantConvNd, nn.Conv2d):
    """``nn.Conv2d(rep_in.dim, rep_out.dim, kernel_size, ...)`` declared with ``(rep_in, rep_out)``
    (``kernel_space`` as in :func:`declare`): a plain ``nn.Conv2d`` otherwise."""


class ApproxEquivariantConv3d(_ApproxEquivariantConvNd, nn.Conv3d):
    """``nn.Conv3d(rep_in.dim, rep_out.dim, kernel_size, ...)`` declared with ``(rep_in, rep_out)``
    (``kernel_space`` as in :func:`declare`): a plain ``nn.Conv3d`` otherwise."""
