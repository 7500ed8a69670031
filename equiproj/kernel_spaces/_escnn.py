"""escnn convolutions as plain convolutions with the same kernel space (optional: escnn is used, never
imported, here; docs/interop.md).

* :func:`escnn_conv_declaration`: ``(kernel_space, rep_in, rep_out)`` of an escnn ``R2Conv``/``R3Conv``, so that
  ``equiproj.nn.declare(plain_conv, rep_in, rep_out, kernel_space=space)`` calls exactly that layer's
  kernels equivariant (the span of escnn's basis is the space's V; checked by dimension on conversion).
* :func:`escnn_conv_to_torch`: the plain ``nn.Conv2d``/``nn.Conv3d`` with the layer's expanded
  filter and bias (escnn's weight layout is torch's: the same tensor, no reordering).
"""

from __future__ import annotations


import torch

from .._caches import bytes_cached
from ..groups import Rep
from ._dense import DenseKernelBasis
from ._steerable import SteerableKernelSpace, default_kernel_space

__all__ = ["escnn_conv_declaration", "escnn_conv_to_torch"]


def _check_conv(conv) -> int:
    """Spatial dimension of an escnn R2Conv/R3Conv, or a clear error."""
    if not all(hasattr(conv, a) for a in ("basisexpansion", "in_type", "out_type", "kernel_size", "expand_parameters")):
        raise TypeError(f"expected an escnn R2Conv or R3Conv, got {type(conv).__name__}")
    s = int(conv.in_type.gspace.dimensionality)
    if s not in (2, 3):
        raise ValueError(f"escnn convolution on {s}-D space: equiproj has kernel spaces for 2-D and 3-D kernels")
    if int(getattr(conv, "groups", 1)) != 1:
        raise ValueError(f"{type(conv).__name__} has groups={conv.groups}: only groups=1 convolutions are one dense map "
                         "from rep_in to rep_out")
    return s


def _as_int(v, name) -> int:
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise ValueError(f"anisotropic {name} {tuple(v)}: a kernel space needs the same {name} along every axis")
        v = v[0]
    return int(v)


def _ring_frequencies(conv, rings_escnn) -> tuple[int, ...]:
    """Per ring, the highest harmonic frequency/degree among the layer's basis elements (0 where none)."""
    top: dict[float, int] = {}
    for attr in conv.basisexpansion.get_basis_info():
        r = round(float(attr["radius"]), 9)
        top[r] = max(top.get(r, 0), int(attr["irrep:frequency"]))
    return tuple(top.get(round(float(r), 9), 0) for r in rings_escnn)


@bytes_cached("equiproj.kernel_spaces._escnn._space")
def _space(group, kernel_size: int, spatial_dims: int, rings: tuple, sigma: tuple, max_frequency: tuple):
    default = default_kernel_space(group, kernel_size, spatial_dims)
    if (default.rings, default.sigma, default.max_frequency) == (rings, sigma, max_frequency):
        return default  # one object: plans cached once for every layer of this kind
    return SteerableKernelSpace(group, kernel_size, spatial_dims, rings=rings, sigma=sigma, max_frequency=max_frequency)


def escnn_conv_declaration(conv) -> tuple[SteerableKernelSpace, Rep, Rep]:
    """``(kernel_space, rep_in, rep_out)`` of an escnn ``R2Conv``/``R3Conv``: the reps of its field types
    (:meth:`equiproj.Rep.from_escnn`) and the steerable kernel space of its basis parameters (rings and
    widths, rescaled by the dilation; per ring the highest frequency its basis uses), whose V is the
    span of the layer's basis.

    Raises ``ValueError`` for grouped or anisotropic convolutions and for a layer whose basis is not
    all of V (a custom ``basis_filter`` or ``maximum_offset``): its dimension is compared with V's.

    Example::

        >>> import equiproj
        >>> from escnn import gspaces, nn as escnn_nn
        >>> from equiproj.kernel_spaces import escnn_conv_declaration, escnn_conv_to_torch
        >>> gs = gspaces.rot2dOnR2(8)
        >>> field_type = escnn_nn.FieldType(gs, 2 * [gs.regular_repr])
        >>> escnn_conv = escnn_nn.R2Conv(field_type, field_type, kernel_size=5)
        >>> space, rep_in, rep_out = escnn_conv_declaration(escnn_conv)
        >>> plain = escnn_conv_to_torch(escnn_conv)
        >>> plain = equiproj.nn.declare(plain, rep_in, rep_out, kernel_space=space)
    """
    s = _check_conv(conv)
    rep_in, rep_out = Rep.from_escnn(conv.in_type), Rep.from_escnn(conv.out_type)
    k = _as_int(conv.kernel_size, "kernel_size")
    dil = _as_int(getattr(conv, "dilation", 1), "dilation")
    rings_e = [float(r) for r in conv._rings]
    rings = tuple(r / dil for r in rings_e)
    sigma = tuple(float(v) / dil for v in conv._sigma)
    mf = _ring_frequencies(conv, rings_e)
    mf = tuple(0 if r == 0 else v for r, v in zip(rings, mf))
    space = _space(rep_in.group, k, s, rings, sigma, mf)
    dim_v = DenseKernelBasis.size(space, rep_in, rep_out)[1]
    dim_e = int(conv.basisexpansion.dimension())
    if dim_v != dim_e:
        raise ValueError(f"{type(conv).__name__}: escnn's basis has {dim_e} elements but the kernel space's V has dimension "
                         f"{dim_v} (rings {rings}, max frequency {mf}): the layer filters its basis beyond a per-ring "
                         "frequency cutoff (basis_filter, maximum_offset), which equiproj does not reproduce")
    return space, rep_in, rep_out


def escnn_conv_to_torch(conv) -> torch.nn.Module:
    """A plain ``torch.nn.Conv2d``/``Conv3d`` computing what the escnn ``R2Conv``/``R3Conv`` computes now:
    its expanded filter and bias, padding, stride, dilation and padding mode, on the layer's device
    and dtype. (The result is an ordinary layer; declare it with :func:`escnn_conv_declaration`'s kernel space.)"""
    s = _check_conv(conv)
    with torch.no_grad():
        filt, bias = conv.expand_parameters()
    cls = torch.nn.Conv2d if s == 2 else torch.nn.Conv3d
    out = cls(conv.in_type.size, conv.out_type.size, conv.kernel_size, stride=conv.stride, padding=conv.padding,
              dilation=conv.dilation, groups=1, bias=bias is not None, padding_mode=conv.padding_mode,
              device=filt.device, dtype=filt.dtype)
    with torch.no_grad():
        out.weight.copy_(filt)
        if bias is not None:
            out.bias.copy_(bias)
    return out
