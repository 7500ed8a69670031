"""What a kernel space provides: the interface :func:`equiproj.nn.declare` accepts as ``kernel_space=``."""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["KernelSpace"]


class KernelSpace(Protocol):
    """A definition of "equivariant" for conv kernels ``[..., c_out, c_in, k, ..., k]``.

    ``energies`` returns ``(E_perp, E_G)`` (differentiable, one per kernel of the batch);
    ``project`` returns the equivariant part (``which="equivariant"``) or the rest
    (``"non_equivariant"``), same shape and dtype as the weight; ``describe`` one line for
    reports. :class:`~equiproj.kernel_spaces.SteerableKernelSpace` implements it, and also
    batches many layers into one fused call (``energies_many`` / ``energies_and_grads_many``),
    which the penalty uses when a space type provides them.
    """

    def energies(self, weight: torch.Tensor, rep_in, rep_out) -> tuple[torch.Tensor, torch.Tensor]: ...

    def project(self, weight: torch.Tensor, rep_in, rep_out, which: str = "equivariant") -> torch.Tensor: ...

    def describe(self) -> str: ...
