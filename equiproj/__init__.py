"""equiproj: the exact non-equivariant energy of a layer, its gradient and projection, for whole networks.

Given a weight ``W`` and how a group acts on its inputs and outputs, ``E_perp = ||W - P(W)||^2``
(``P`` the orthogonal projection onto equivariant maps) is computed exactly, in one pass over
``W`` (Berndt & Stühmer, "Approximate Equivariance via Projection-Based Regularisation", 2026).

Layers of the package, each importing only from those below it (``docs/architecture.md``):
``groups`` (groups, irreps, reps) -> ``_plan`` (the block plan) -> ``ops`` (the fused op and its
backends) -> the energy functions -> ``kernel_spaces``, ``grid``, ``translation`` -> ``nn``;
the applications (``equiproj bench``, ``verify``, ``demo``) live in ``equiproj.cli``, which this
package never imports.

Example::

    >>> G = O3()
    >>> r = Rep.parse(G, "4x0e + 2x1o")
    >>> W = torch.randn(r.dim, r.dim)
    >>> e_perp, e_g = energies(W, r, r)
    >>> bool(torch.isclose(e_perp + e_g, W.square().sum()))
    True
"""

from . import _deprecated, grid, kernel_spaces, nn, reference, translation
from ._caches import clear_caches
from ._energy import (energies, energies_and_grad, energies_and_grads_many, energies_many, energy_breakdown, eq_energy,
                      noneq_energy, project)
from .groups import SO2, SO3, O2, O3, Cyclic, Dihedral, FullOctahedral, Group, Irrep, Octahedral, Rep
from .kernel_spaces import KernelSpace, SteerableKernelSpace
from .nn import check_equivariance, init_equivariant_

__version__ = "0.1.0"

__all__ = [
    # groups and representations
    "Group", "Cyclic", "Dihedral", "SO2", "O2", "SO3", "O3", "Octahedral", "FullOctahedral", "Rep", "Irrep",
    # energies of weights
    "energies", "noneq_energy", "eq_energy", "energies_many", "energies_and_grad", "energies_and_grads_many",
    "project", "energy_breakdown",
    # kernel spaces
    "KernelSpace", "SteerableKernelSpace",
    # networks
    "check_equivariance", "init_equivariant_",
    # modules
    "nn", "grid", "translation", "kernel_spaces", "reference",
    # memory
    "clear_caches",
    "__version__",
]

_deprecated.install(__name__)


def __dir__():
    return sorted(__all__)
