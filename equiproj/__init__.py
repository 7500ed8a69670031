"""equiproj: the exact non-equivariant energy of a layer, its gradient and projection, for whole networks.

Given a weight ``W`` and how a group acts on its inputs and outputs, ``E_perp = ||W - P(W)||^2``
(``P`` the orthogonal projection onto equivariant maps) is computed exactly, in one pass over
``W`` (Berndt & Stühmer, "Approximate Equivariance via Projection-Based Regularisation", 2026).

Layers of the package, each importing only from those below it (``docs/architecture.md``):
``groups`` (groups, irreps, reps) -> ``_plan`` (the block plan) -> ``ops`` (the fused op and its
backends) -> the energy functions -> ``kernel_spaces``, ``grid``, ``translation`` -> ``nn``;
the applications (``equiproj bench``, ``verify``, ``demo``) live in ``equiproj.cli``, which this
package never imports.

What is re-exported here: the weight-level API (groups and representations, the energy functions,
kernel spaces) and the subpackages. Everything that takes a model (``declare``, the penalty,
``project_``, ``init_equivariant_``, ``check_equivariance``, the network blocks) lives in
:mod:`equiproj.nn` only.

Example::

    >>> import torch
    >>> from equiproj import O3, Rep, energies
    >>> G = O3()
    >>> r = Rep.parse(G, "4x0e + 2x1o")
    >>> W = torch.randn(r.dim, r.dim)
    >>> e_perp, e_g = energies(W, r, r)
    >>> bool(torch.isclose(e_perp + e_g, W.square().sum()))
    True
"""

from . import grid, kernel_spaces, nn, reference, translation
from ._caches import clear_caches
from ._energy import (energies, energies_and_grad, energies_and_grads_many, energies_many, energy_breakdown,
                      project)
from .groups import SO2, SO3, O2, O3, Cyclic, Dihedral, FullOctahedral, Group, Irrep, Octahedral, Rep
from .kernel_spaces import KernelSpace, SteerableKernelSpace

__version__ = "0.1.0"

__all__ = [
    # groups and representations
    "Group", "Cyclic", "Dihedral", "SO2", "O2", "SO3", "O3", "Octahedral", "FullOctahedral", "Rep", "Irrep",
    # energies of weights
    "energies", "energies_many", "energies_and_grad", "energies_and_grads_many",
    "project", "energy_breakdown",
    # kernel spaces
    "KernelSpace", "SteerableKernelSpace",
    # modules
    "nn", "grid", "translation", "kernel_spaces", "reference",
    # memory
    "clear_caches",
    "__version__",
]

def __dir__():
    return sorted(__all__)
