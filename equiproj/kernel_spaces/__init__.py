"""Kernel spaces: what "equivariant" means for a convolution kernel under rotations the grid does not have.

* :class:`KernelSpace`: the protocol a kernel space implements (``energies``, ``project``,
  ``describe``); :func:`equiproj.nn.declare` accepts any such object as ``kernel_space=``.
* :class:`SteerableKernelSpace` / :func:`default_kernel_space`: the span of the sampled band-limited
  equivariant kernels (what escnn's R2Conv/R3Conv parametrise) for C_N, D_N, SO(2), O(2) on 2-D
  kernels and SO(3), O(3), O, O_h on 3-D kernels, projected onto in the pixel inner product;
  :func:`kernel_energies_many` / :func:`kernel_energies_and_grads_many` do many layers in one call.
* :class:`DenseKernelBasis`: the dense reference ``Q Q^T w`` of that span (small layers, tests and
  benchmarks).
* :func:`smooth_equivariance_error`: how equivariant a kernel is at angles off the grid.
* :func:`escnn_conv_declaration` / :func:`escnn_conv_to_torch`: an escnn ``R2Conv``/``R3Conv`` as a plain conv with
  its kernel space and reps (escnn is needed only for these; docs/interop.md).

The exact actions on the grid itself (C4/D4 on square kernels, O/O_h on cubic ones) are in
:mod:`equiproj.grid`, translations of periodic grids in :mod:`equiproj.translation`.
"""

from ._dense import DenseKernelBasis
from ._escnn import escnn_conv_to_torch, escnn_conv_declaration
from ._protocol import KernelSpace
from ._smooth import smooth_equivariance_error
from ._steerable import SteerableKernelSpace, default_kernel_space, kernel_energies_and_grads_many, kernel_energies_many

__all__ = ["KernelSpace", "SteerableKernelSpace", "default_kernel_space", "kernel_energies_many",
           "kernel_energies_and_grads_many", "DenseKernelBasis", "smooth_equivariance_error", "escnn_conv_declaration",
           "escnn_conv_to_torch"]
