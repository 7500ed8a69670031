"""equiproj: exact non-equivariant energy of linear layers and its gradient (Berndt & Stühmer, 2026)."""

from .groups import SO2, SO3, O2, O3, Cyclic, Dihedral, FullOctahedral, Group, Octahedral
from .rep import Irrep, Rep

__version__ = "0.1.0"
from .energy import (energies, energies_and_grad, energies_and_grads_many, energies_many, eq_energy, noneq_energy,
                     project)
from . import grid, nn, reference, translation
