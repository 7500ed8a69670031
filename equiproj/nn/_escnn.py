"""escnn models and convolutions as plain, declared PyTorch modules (optional: escnn is used, never
imported, here; docs/interop.md)."""

from __future__ import annotations

from torch import nn

from ..kernel_spaces import escnn_conv_to_torch
from ..kernel_spaces import from_escnn as _conv_space
from ._declare import declare

__all__ = ["from_escnn"]


def _is_escnn_conv(m) -> bool:
    return type(m).__name__ in ("R2Conv", "R3Conv") and hasattr(m, "basisexpansion")


def from_escnn(module, *, bias: bool = True) -> nn.Module:
    """Plain PyTorch modules from escnn ones, every convolution declared with its own kernel space.

    * an escnn ``R2Conv``/``R3Conv``: the plain ``nn.Conv2d``/``nn.Conv3d`` with its expanded filter and
      bias (:func:`equiproj.kernel_spaces.escnn_conv_to_torch`), declared with the reps of its field
      types and the kernel space whose equivariant kernels are exactly the span of its basis
      (:func:`equiproj.kernel_spaces.from_escnn`);
    * any other escnn module (a model): ``module.export()`` (escnn's own conversion to plain modules,
      which puts the module in eval mode), then every ``R2Conv``/``R3Conv`` of ``module`` is declared
      on the exported conv of the same name.

    The result trains like any PyTorch model; :class:`~equiproj.nn.ProjectionPenalty` then keeps it
    close to the escnn model's symmetry, and :func:`~equiproj.nn.report` says how close.

    Example::

        >>> import equiproj
        >>> from escnn import gspaces, nn as escnn_nn
        >>> gs = gspaces.rot2dOnR2(8)
        >>> field_type = escnn_nn.FieldType(gs, 2 * [gs.regular_repr])
        >>> escnn_model = escnn_nn.SequentialModule(escnn_nn.R2Conv(field_type, field_type, kernel_size=5),
        ...                                         escnn_nn.ReLU(field_type))
        >>> plain = equiproj.nn.from_escnn(escnn_model)
        >>> penalty = equiproj.nn.ProjectionPenalty(plain, lambda_perp=1e-2)
    """
    if _is_escnn_conv(module):
        space, rep_in, rep_out = _conv_space(module)
        return declare(escnn_conv_to_torch(module), rep_in, rep_out, kernel_space=space, bias=bias)
    if not callable(getattr(module, "export", None)) or not isinstance(module, nn.Module):
        raise TypeError(f"from_escnn takes an escnn R2Conv/R3Conv or an escnn module with .export(), got "
                        f"{type(module).__name__}")
    convs = [(name, m) for name, m in module.named_modules() if _is_escnn_conv(m)]
    plain = module.export()
    for name, m in convs:
        try:
            target = plain.get_submodule(name) if name else plain
        except AttributeError:
            raise ValueError(f"escnn's export of {type(module).__name__} has no module named {name!r} for its "
                             f"{type(m).__name__}: declare that conv by hand (equiproj.kernel_spaces.from_escnn)") from None
        if not isinstance(target, (nn.Conv2d, nn.Conv3d)):
            raise ValueError(f"escnn exported {name!r} as {type(target).__name__}, not a plain convolution")
        space, rep_in, rep_out = _conv_space(m)
        declare(target, rep_in, rep_out, kernel_space=space, bias=bias)
    return plain
