"""Planar groups about the z axis of R^3: ``g3 = diag(g, det g)`` for ``g`` in C_N, D_N, SO(2), O(2).

These are the axial subgroups of SO(3) (and O(3)) that :meth:`Group.subgroups` lists: a rotation
by ``theta`` about z, and for the dihedral ones the half turns about the axes of the xy plane
(a planar reflection ``g`` becomes the rotation ``diag(g, -1)``). The group borrows everything it
knows from the planar group: its irreps are the planar irreps of the upper-left 2x2 block.
"""

from __future__ import annotations

import torch

from ._group import Group

__all__ = ["Axial"]


def _embed(g2: torch.Tensor) -> torch.Tensor:
    det = g2[..., 0, 0] * g2[..., 1, 1] - g2[..., 0, 1] * g2[..., 1, 0]
    out = torch.zeros(g2.shape[:-2] + (3, 3), dtype=g2.dtype, device=g2.device)
    out[..., :2, :2] = g2
    out[..., 2, 2] = det
    return out


class Axial(Group):
    """The planar group ``planar`` acting on R^3 about the z axis, as rotations: ``diag(g, det g)``.

    Example::

        >>> from equiproj.groups import Dihedral
        >>> H = Axial(Dihedral(4))
        >>> H.order, H.ambient_dim
        (8, 3)
    """

    ambient_dim = 3

    def __init__(self, planar: Group):
        if not isinstance(planar, Group) or planar.ambient_dim != 2:
            raise TypeError(f"Axial needs a planar group (C_N, D_N, SO2, O2), got {planar!r}")
        self.planar = planar
        self.trivial_id = planar.trivial_id

    def _key(self):
        return ("Axial", self.planar._key())

    def __repr__(self):
        return f"Axial({self.planar!r})"

    @property
    def order(self):
        return self.planar.order

    def elements(self):
        return _embed(self.planar.elements())

    def sample(self, n, generator=None):
        return _embed(self.planar.sample(n, generator))

    def generators(self):
        return _embed(self.planar.generators())

    def _contains(self, g):
        if not bool((g[..., :2, 2].abs() < 1e-6).all() and (g[..., 2, :2].abs() < 1e-6).all()):
            return False
        g2 = g[..., :2, :2]
        det = g2[..., 0, 0] * g2[..., 1, 1] - g2[..., 0, 1] * g2[..., 1, 0]
        return bool(((g[..., 2, 2] - det).abs() < 1e-6).all()) and self.planar._contains(g2)

    def index(self, g):
        if g.numel() and not self._contains(g):
            raise ValueError(f"matrices are not elements of {self}")
        return self.planar.index(g[..., :2, :2])

    def haar_quadrature(self, degree):
        g, w = self.planar.haar_quadrature(degree)
        return _embed(g), w

    def haar_quadrature_size(self, degree):
        return self.planar.haar_quadrature_size(degree)

    def product_may_contain(self, psi, a, b):
        return self.planar.product_may_contain(self.planar.irrep(psi.id), self.planar.irrep(a.id),
                                               self.planar.irrep(b.id))

    def irrep_ids(self, band_limit):
        return self.planar.irrep_ids(band_limit)

    def canonical_irrep_id(self, id):
        return self.planar.canonical_irrep_id(id)

    def parse_irrep_id(self, s):
        return self.planar.parse_irrep_id(s)

    def irrep_dim(self, id):
        return self.planar.irrep_dim(id)

    def irrep_type(self, id):
        return self.planar.irrep_type(id)

    def irrep_band(self, id):
        return self.planar.irrep_band(id)

    def irrep_matrix(self, id, g):
        return self.planar.irrep_matrix(id, g[..., :2, :2])

    def irrep_name(self, id):
        return self.planar.irrep_name(id)

    def _same_irrep_as(self, psi):
        if not isinstance(psi.group, Axial):
            return None
        return self.planar._same_irrep_as(psi.group.planar.irrep(psi.id))
