"""The spatial groups: SO(3), O(3) and the symmetries of the cube (elements ``[..., 3, 3]``).

Irreps:

* ``SO3()``: degree ``0 <= l <= L_MAX`` (``"2"``; e3nn's ``"2e"`` is accepted too), real Wigner D in
  the basis of :mod:`equiproj.groups._so3` (e3nn's); ``L_MAX = 512``, higher degrees raise ``ValueError``;
* ``O3()``: ``(l, p)``, p = +-1, e3nn strings ``"2e"`` (p = +1), ``"1o"`` (p = -1); an element
  ``g = s R`` (``s = det g``) acts by ``p^[s<0] D_l(R)``;
* ``Octahedral()``: ``"A1" "A2" "E" "T1" "T2"``, T1 the defining 3-D action;
* ``FullOctahedral()``: the same with ``"g"``/``"u"`` (even/odd under the inversion ``-I``),
  ``"T1u"`` the defining 3-D action.
"""

from __future__ import annotations

import functools
import itertools
import math
import re

import numpy as np
import torch

from ._clebsch_gordan import irrep_product
from ._axial import Axial
from ._group import Group
from ._planar import O2, SO2, Cyclic, Dihedral
from ._point import PointGroup
from ._so3 import check_degree, wigner_D
from ._subgroups import angle_name

__all__ = ["SO3", "O3", "Octahedral", "FullOctahedral", "Tetrahedral", "FullTetrahedral", "euler_zyz",
           "clebsch_gordan"]


def _axis_rotation(axis, angle: float) -> torch.Tensor:
    a = torch.tensor(axis, dtype=torch.float64)
    a = a / a.norm()
    K = torch.tensor([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def euler_zyz(alpha: torch.Tensor, beta: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``R_z(alpha) R_y(beta) R_z(gamma)`` ``[..., 3, 3]``."""
    def rz(t):
        c, s, o, z = torch.cos(t), torch.sin(t), torch.ones_like(t), torch.zeros_like(t)
        return torch.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(t.shape + (3, 3))

    c, s, o, z = torch.cos(beta), torch.sin(beta), torch.ones_like(beta), torch.zeros_like(beta)
    ry = torch.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(beta.shape + (3, 3))
    return rz(alpha) @ ry @ rz(gamma)


def _so3_quadrature(degree) -> tuple[torch.Tensor, torch.Tensor]:
    """Product rule in Euler angles, exact for matrix coefficients of degree <= ``degree``:
    ``D^l_{mn} = e^{-i m alpha} d^l_{mn}(beta) e^{-i n gamma}``; the alpha/gamma sums kill
    m, n != 0, and ``d^l_{00}(beta) = P_l(cos beta)`` is integrated exactly by Gauss-Legendre."""
    degree = int(degree)
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    M = degree + 1
    x, wx = np.polynomial.legendre.leggauss(degree // 2 + 1)
    ang = 2 * math.pi * torch.arange(M, dtype=torch.float64) / M
    beta = torch.arccos(torch.from_numpy(x))
    a, b, c = torch.meshgrid(ang, beta, ang, indexing="ij")
    g = euler_zyz(a.reshape(-1), b.reshape(-1), c.reshape(-1))
    w = (torch.ones(M, 1, 1, dtype=torch.float64) * torch.from_numpy(wx / 2)[None, :, None] / M**2).expand(M, len(x), M).reshape(-1)
    return g, w


def _so3_quadrature_size(degree) -> int:
    degree = int(degree)
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    return (degree + 1) ** 2 * (degree // 2 + 1)


# A rotation about the harmonics' polar axis y by an angle that is an irrational multiple of pi:
# its Wigner D matrices are block diagonal with blocks of size <= 2.
_TORUS = torch.tensor([[math.cos(1.0), 0.0, math.sin(1.0)], [0.0, 1.0, 0.0], [-math.sin(1.0), 0.0, math.cos(1.0)]],
                      dtype=torch.float64)


def _haar_so3(n, generator):
    q = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        -1,
    ).reshape(n, 3, 3)


def _det3(g):
    return torch.linalg.det(g)


class SO3(Group):
    """SO(3): all rotations of 3-space. Irreps by degree ``l`` (real Wigner D, e3nn's basis)."""

    ambient_dim = 3

    def standard_irrep_id(self):
        return 1

    def sample(self, n, generator=None):
        return _haar_so3(n, generator)

    def generators(self):
        # rotations by irrational angles about two skew axes generate a dense subgroup
        return torch.stack([_axis_rotation((1.0, 0.3, -0.2), 1.0), _axis_rotation((-0.4, 1.0, 0.7), math.sqrt(2.0))])

    def _contains(self, g):
        return bool((_det3(g) > 0).all())

    def _subgroup_list(self):
        return _rotation_subgroups() + [("SO3", self)]

    def _same_irrep_as(self, psi):
        return psi.id[0] if isinstance(psi.group, O3) else None  # (l, p) on rotations is D_l

    def haar_quadrature(self, degree):
        return _so3_quadrature(degree)

    def haar_quadrature_size(self, degree):
        return _so3_quadrature_size(degree)

    def torus_element(self):
        return _TORUS.clone()

    def product_may_contain(self, psi, a, b):
        return abs(a.band - b.band) <= psi.band <= a.band + b.band

    def _harmonic_irrep_id(self, h):
        return h

    def irrep_ids(self, band_limit):
        return list(range(band_limit + 1))

    def canonical_irrep_id(self, id):
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)) or id < 0:
            raise ValueError(f"unknown irrep id {id!r} for {self}: degrees are ints l >= 0")
        return check_degree(id)

    def parse_irrep_id(self, s):
        if s.endswith("e"):  # e3nn's spelling '2e'
            s = s[:-1]
        return super().parse_irrep_id(s)

    def irrep_dim(self, l):
        return 2 * l + 1

    def irrep_band(self, l):
        return l

    def irrep_matrix(self, l, g):
        return wigner_D(l, g)


class O3(Group):
    """O(3) = SO(3) x {+-I}. Irreps ``(l, p)``, e3nn strings ``"1o"``, ``"2e"``."""

    ambient_dim = 3
    trivial_id = (0, 1)

    def standard_irrep_id(self):
        return (1, -1)

    def sample(self, n, generator=None):
        g = _haar_so3(n, generator)
        s = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
        return g * s[:, None, None]

    def generators(self):
        return torch.cat([SO3().generators(), -torch.eye(3, dtype=torch.float64)[None]])

    def _subgroup_list(self):
        return _rotation_subgroups() + [("SO3", SO3()), ("Td", FullTetrahedral()), ("Th", _point_group("Th")),
                                        ("Oh", FullOctahedral()), ("O3", self)]

    def haar_quadrature(self, degree):
        g, w = _so3_quadrature(degree)
        return torch.cat([g, -g]), torch.cat([w, w]) / 2

    def haar_quadrature_size(self, degree):
        return 2 * _so3_quadrature_size(degree)

    def torus_element(self):
        return _TORUS.clone()

    def product_may_contain(self, psi, a, b):
        return psi.id[1] == a.id[1] * b.id[1] and abs(a.band - b.band) <= psi.band <= a.band + b.band

    def _harmonic_irrep_id(self, h):
        return (h, (-1) ** h)

    def irrep_ids(self, band_limit):
        return [(l, p) for l in range(band_limit + 1) for p in (1, -1)]

    def canonical_irrep_id(self, id):
        if not (isinstance(id, tuple) and len(id) == 2) or id[1] not in (1, -1) or not isinstance(id[0], (int, np.integer)) or id[0] < 0:
            raise ValueError(f"unknown irrep id {id!r} for {self}: ids are (l, p) with l >= 0, p = +1 or -1")
        return (check_degree(id[0]), int(id[1]))

    def parse_irrep_id(self, s):
        if len(s) >= 2 and s[-1] in "eo" and s[:-1].isdigit():
            return (int(s[:-1]), 1 if s[-1] == "e" else -1)
        raise ValueError(f"malformed irrep {s!r} for {self}: expected e3nn style like '1o' or '2e'")

    def irrep_name(self, id):
        return f"{id[0]}{'e' if id[1] == 1 else 'o'}"

    def irrep_dim(self, id):
        return 2 * id[0] + 1

    def irrep_band(self, id):
        return id[0]

    def irrep_matrix(self, id, g):
        l, p = id
        s = torch.sign(_det3(g))
        D = wigner_D(l, g * s[..., None, None])
        return D * torch.where(s < 0, float(p), 1.0)[..., None, None]


def _signed_permutations(det_sign: int | None) -> torch.Tensor:
    return _signed_permutation_table(det_sign).clone()


@functools.lru_cache(maxsize=3)
def _signed_permutation_table(det_sign: int | None) -> torch.Tensor:
    """The signed permutation matrices (of determinant ``det_sign``, or all), built once: the cubic
    groups list their elements often (every restriction and inclusion test)."""
    mats = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            m = torch.zeros(3, 3, dtype=torch.float64)
            for i, j in enumerate(perm):
                m[i, j] = signs[i]
            if det_sign is None or round(float(torch.linalg.det(m))) == det_sign:
                mats.append(m)
    return torch.stack(mats)


# Basis of the 2-dim irrep E: the sum-zero plane of R^3 (S_3 permuting the axes)
_E_BASIS = torch.tensor([[1.0, -1.0, 0.0], [1.0, 1.0, -2.0]], dtype=torch.float64).T / torch.tensor(
    [math.sqrt(2.0), math.sqrt(6.0)], dtype=torch.float64
)


def _octahedral_irrep(name: str, R: torch.Tensor) -> torch.Tensor:
    """Irreps of the rotation group O of the cube, evaluated at rotations ``R`` (signed permutations)."""
    perm = R.abs()
    # sign of the axis permutation = det of |R|
    sgn = torch.linalg.det(perm).round()
    if name == "A1":
        return torch.ones_like(sgn)[..., None, None]
    if name == "A2":
        return sgn[..., None, None]
    if name == "E":
        B = _E_BASIS.to(R.device)
        return B.T @ perm @ B
    if name == "T1":
        return R
    if name == "T2":
        return R * sgn[..., None, None]
    raise ValueError(name)


class _NamedIrreps(Group):
    """A finite group whose irreps are a fixed table of names (``_names``) with their dimensions (``_dims``):
    the irrep-id hooks read the table."""

    _names: tuple[str, ...]
    _dims: dict[str, int]

    def irrep_ids(self, band_limit):
        return list(self._names)

    def canonical_irrep_id(self, id):
        if id not in self._names:
            raise ValueError(f"unknown irrep id {id!r} for {self}: ids are {', '.join(self._names)}")
        return id

    def parse_irrep_id(self, s):
        return s

    def irrep_dim(self, id):
        return self._dims[id]


class Octahedral(_NamedIrreps):
    """O: the 24 rotations of the cube (signed permutation matrices, det +1).

    Irreps ``"A1"`` (trivial), ``"A2"`` (sign of the permutation of the axes), ``"E"``
    (2-dim: S_3 permuting the axes, on the plane x+y+z = 0 with basis
    ``(1,-1,0)/sqrt2, (1,1,-2)/sqrt6``), ``"T1"`` (the rotation itself), ``"T2"`` (= A2 x T1).
    """

    ambient_dim = 3
    trivial_id = "A1"
    _names = ("A1", "A2", "E", "T1", "T2")
    _dims = {"A1": 1, "A2": 1, "E": 2, "T1": 3, "T2": 3}

    @property
    def order(self):
        return 24

    @functools.cached_property
    def _elements(self):
        return _signed_permutations(1)

    def elements(self):
        return self._elements.clone()

    def generators(self):
        return torch.stack([_axis_rotation((0, 0, 1), math.pi / 2).round(), _axis_rotation((1, 1, 1), 2 * math.pi / 3).round()])

    def _contains(self, g):
        return bool(((g.abs() - g.abs().round()).abs() < 1e-6).all() and (_det3(g) > 0).all())

    _lists_every_subgroup_class = True

    def _subgroup_list(self):
        return _octahedral_rotation_subgroups()

    def _conjugate_subgroup(self, name, H, g):
        return conjugate_name(name, g), PointGroup(conjugate_name(name, g), g @ H.generators() @ g.T)

    def _same_irrep_as(self, psi):
        if type(self) is Octahedral and isinstance(psi.group, FullOctahedral):
            return psi.id[:-1]  # on rotations the parity suffix does nothing
        return None

    def standard_irrep_id(self):
        return "T1" if self.trivial_id == "A1" else "T1u"

    def _harmonic_irrep_id(self, h):
        return self.standard_irrep_id() if h == 1 else None  # D_1(R) = R: the defining action

    def _ambient_harmonic_matrix(self, h):
        ambient = O3()
        return lambda g: ambient.irrep_matrix((h, (-1) ** h), g)

    def irrep_matrix(self, id, g):
        return _octahedral_irrep(id, g)


class FullOctahedral(Octahedral):
    """O_h = O x {+-I}: the 48 symmetries of the cube (all signed permutation matrices).

    Irreps are those of O with a parity suffix: ``"A1g"`` ... ``"T2u"``; ``g`` is even and
    ``u`` odd under the inversion ``-I``. ``"T1u"`` is the defining 3-D action.
    """

    trivial_id = "A1g"
    _names = tuple(n + p for p in "gu" for n in Octahedral._names)
    _dims = {n + p: d for p in "gu" for n, d in Octahedral._dims.items()}

    @property
    def order(self):
        return 48

    @functools.cached_property
    def _elements(self):
        return _signed_permutations(None)

    def generators(self):
        return torch.cat([super().generators(), -torch.eye(3, dtype=torch.float64)[None]])

    def _contains(self, g):
        return bool(((g.abs() - g.abs().round()).abs() < 1e-6).all())

    def _subgroup_list(self):
        return _octahedral_rotation_subgroups() + [(name, _point_group(name)) for name in _IMPROPER_GENERATORS] + [
            ("Td", FullTetrahedral()), ("Oh", self)] + [(name, _point_group(name)) for name in _EXTRA_CONJUGATES]

    def _same_irrep_as(self, psi):
        return None

    def irrep_matrix(self, id, g):
        s = torch.sign(_det3(g))
        out = _octahedral_irrep(id[:-1], g * s[..., None, None])
        if id[-1] == "u":
            out = out * s[..., None, None]
        return out


def _axis_parity(g: torch.Tensor) -> torch.Tensor:
    """The sign of the permutation of the axes of signed permutation matrices ``g``."""
    return torch.linalg.det(g.abs()).round()


class Tetrahedral(_NamedIrreps):
    """T: the 12 rotations of the regular tetrahedron, the rotations of the cube whose permutation of the
    axes is even. Irreps ``"A"`` (trivial), ``"E"`` (2-dim, complex type: the axes' cyclic permutations
    turn the plane x+y+z = 0 by multiples of 120 degrees, in O's ``E`` basis) and ``"T"`` (the rotation itself).
    """

    ambient_dim = 3
    trivial_id = "A"
    _names = ("A", "E", "T")
    _dims = {"A": 1, "E": 2, "T": 3}
    _as_octahedral = {"A": "A1", "E": "E", "T": "T1"}

    @property
    def order(self):
        return 12

    def elements(self):
        els = _signed_permutations(1)
        return els[_axis_parity(els) > 0]

    def generators(self):
        return torch.stack([_axis_rotation((1, 1, 1), 2 * math.pi / 3).round(),
                            torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))])

    def _contains(self, g):
        return bool(((g.abs() - g.abs().round()).abs() < 1e-6).all() and (_det3(g) > 0).all()
                    and (_axis_parity(g.round()) > 0).all())

    def standard_irrep_id(self):
        return "T"

    def irrep_type(self, id):
        return "complex" if id == "E" else "real"

    def _harmonic_irrep_id(self, h):
        return "T" if h == 1 else None

    def _ambient_harmonic_matrix(self, h):
        ambient = O3()
        return lambda g: ambient.irrep_matrix((h, (-1) ** h), g)

    def irrep_matrix(self, id, g):
        return _octahedral_irrep(self._as_octahedral[id], g)


class FullTetrahedral(_NamedIrreps):
    """T_d: the 24 symmetries of the regular tetrahedron (the signed permutation matrices whose determinant
    is the sign of their permutation of the axes). ``g -> det(g) g`` is an isomorphism onto O, and the
    irreps are O's through it: ``"A1" "A2" "E" "T1" "T2"``; ``"T2"`` is the defining 3-D action."""

    ambient_dim = 3
    trivial_id = "A1"
    _names = Octahedral._names
    _dims = Octahedral._dims

    @property
    def order(self):
        return 24

    def elements(self):
        els = _signed_permutations(None)
        return els[_axis_parity(els) == _det3(els).round()]

    def generators(self):
        mirror = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)  # x <-> y
        return torch.cat([Tetrahedral().generators(), mirror[None]])

    def _contains(self, g):
        return bool(((g.abs() - g.abs().round()).abs() < 1e-6).all()
                    and (_axis_parity(g.round()) == _det3(g).round()).all())

    def standard_irrep_id(self):
        return "T2"

    def irrep_matrix(self, id, g):
        return _octahedral_irrep(id, g * _det3(g).sign()[..., None, None])


#: the largest order M of the axial C_M, D_M (about z) that SO(3) and O(3) list
MAX_AXIAL_ORDER = 8


def _rotation_subgroups() -> list:
    """The rotation subgroups SO(3) lists: axial C_M, D_M and SO(2), O(2) about z, T and O. A half turn
    about x (D1) is conjugate to the one about z (C2), and every D_M's axis is conjugate, so one each;
    C3 and D3 about the body diagonal (-1, 1, 1) are conjugate to C3z and D3z in SO(3), and listed as
    well because they are literally subgroups of T and O (the lattice's inclusions are literal)."""
    out = [("C1", Axial(Cyclic(1)))]
    out += [(f"C{m}z", Axial(Cyclic(m))) for m in range(2, MAX_AXIAL_ORDER + 1)]
    out += [(f"D{m}z", Axial(Dihedral(m))) for m in range(2, MAX_AXIAL_ORDER + 1)]
    out += [("C3[-111]", _point_group("C3[-111]")), ("D3[-111]", _point_group("D3[-111]"))]
    return out + [("SO2z", Axial(SO2())), ("O2z", Axial(O2())), ("T", Tetrahedral()), ("O", Octahedral())]


def _octahedral_rotation_subgroups() -> list:
    """One subgroup of O per conjugacy class (11): a half turn about a coordinate axis (C2z) or about a
    face diagonal (D1z[pi/2], the axis (1, 1, 0)), C3 about the body diagonal (-1, 1, 1), C4z, the two
    classes of D2 (coordinate axes; z and the face diagonals), D3 about (-1, 1, 1) (its half turns
    include the one about (1, 1, 0)), D4z, T and O."""
    return [("C1", Axial(Cyclic(1))), ("C2z", Axial(Cyclic(2))), ("D1z[pi/2]", Axial(Dihedral(1, axis=math.pi / 2))),
            ("C3[-111]", _point_group("C3[-111]")),
            ("C4z", Axial(Cyclic(4))), ("D2z", Axial(Dihedral(2))), ("D2z[pi/2]", Axial(Dihedral(2, axis=math.pi / 2))),
            ("D3[-111]", _point_group("D3[-111]")), ("D4z", Axial(Dihedral(4))), ("T", Tetrahedral()), ("O", Octahedral())]


#: Generators of the subgroups of O_h beyond the named groups, one per conjugacy class, each element
#: written as the images of the coordinates. Names are Schoenflies symbols with the principal axis:
#: ``z``, a direction ``[uvw]`` (``[-111]`` the body diagonal (-1, 1, 1), ``[110]`` a face diagonal),
#: ``[pi/2]`` where the two-fold axes or mirrors lie on the face diagonals rather than the coordinate
#: axes (as ``D2z[pi/2]``); for ``Cs`` the axis is the mirror's normal. The representatives were picked
#: (by a search over all choices) so that every inclusion up to conjugacy is literal except four that
#: no choice can make literal together; ``_EXTRA_CONJUGATES`` makes those literal too (docs/math.md §10).
_ROTATION_GENERATORS = {
    "C3[-111]": ("-y,z,-x",),
    "D3[-111]": ("-x,-z,-y", "y,x,-z"),
}
_IMPROPER_GENERATORS = {
    "Ci": ("-x,-y,-z",),
    "Csz": ("x,y,-z",),
    "Cs[110]": ("-y,-x,z",),
    "S4z": ("y,-x,-z",),
    "C2hz": ("x,y,-z", "-x,-y,z"),
    "C2h[110]": ("-x,-y,-z", "y,x,-z"),
    "C2vz": ("x,-y,z", "-x,y,z"),
    "C2vz[pi/2]": ("-x,-y,z", "y,x,z"),
    "C2v[110]": ("x,y,-z", "y,x,z"),
    "S6[-111]": ("y,-z,x",),
    "C3v[-111]": ("x,z,y", "-y,-x,z"),
    "C4hz": ("x,y,-z", "y,-x,z"),
    "C4vz": ("x,-y,z", "y,x,z"),
    "D2dz": ("x,-y,-z", "y,x,z"),
    "D2dz[pi/2]": ("x,-y,z", "y,x,-z"),
    "D2h": ("x,y,-z", "x,-y,z", "-x,y,z"),
    "D2hz[pi/2]": ("x,y,-z", "-x,-y,z", "y,x,z"),
    "D3d[-111]": ("x,z,y", "y,x,-z"),
    "D4hz": ("x,y,-z", "x,-y,z", "y,x,z"),
    "Th": ("x,y,-z", "y,z,x"),
}
#: Two more conjugates, listed besides the representatives so that every inclusion between conjugacy
#: classes is a literal inclusion of listed subgroups: the mirror x -> -x (``Csx``, conjugate to ``Csz``)
#: lies in ``C2vz``, ``C4vz`` and ``D2dz[pi/2]``, which hold the mirrors of the planes through z; the
#: mirror swapping x and y (``Cs[1-10]``, conjugate to ``Cs[110]``) lies in ``C2v[110]``.
_EXTRA_CONJUGATES = {
    "Csx": ("-x,y,z",),
    "Cs[1-10]": ("y,x,z",),
}


#: the Schoenflies symbols of the subgroups of O_h, longest first (a name is one of them, then its axes)
_SCHOENFLIES = sorted(("C1", "Ci", "Cs", "C2", "C3", "C4", "S4", "S6", "C2h", "C4h", "C2v", "C3v", "C4v", "D1", "D2",
                       "D3", "D4", "D2d", "D3d", "D2h", "D4h", "T", "Th", "Td", "O", "Oh"), key=len, reverse=True)
#: the plane of each coordinate axis, as a right-handed pair: angles about x are measured from y to z
_PLANE = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}


def conjugate_name(name: str, g: torch.Tensor) -> str:
    """The name of ``g H g^-1`` for the subgroup ``H`` of O_h named ``name``: the principal axis mapped
    through ``g`` (``"C4z"`` -> ``"C4x"``, ``"C3[-111]"`` -> ``"C3[111]"``, a direction up to sign, written
    with the fewest minus signs), and for the groups with two-fold axes or mirrors through a coordinate
    axis (``D_n``, ``C_nv``, ``D_nd``, ``D_nh``) their angle: ``[a]`` when the first of them lies at
    ``a / 2`` in the plane of the axis (``D2z[pi/2]``: on the face diagonals), as ``Dihedral(n, axis=a)``.

    Example::

        >>> import torch
        >>> swap_xz = torch.tensor([[0.0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=torch.float64)
        >>> conjugate_name("C4vz", swap_xz), conjugate_name("D1z[pi/2]", swap_xz), conjugate_name("Csz", swap_xz)
        ('C4vx', 'D1x[pi/2]', 'Csx')
    """
    base = next((b for b in _SCHOENFLIES if name.startswith(b)), None)
    m = re.fullmatch(r"(x|y|z|\[[-0-9]+\])?(?:\[([0-9]*pi(?:/[0-9]+)?)\])?", name[len(base):]) if base else None
    if m is None:
        raise ValueError(f"{name!r} is not a Schoenflies symbol with axes (as 'C4z', 'D2z[pi/2]', 'C3[-111]')")
    axis, angle = m.groups()
    if axis is None:
        return name  # no axis: a normal subgroup
    n = _axis_direction(axis)
    image = torch.round(g @ n)
    out = base + _axis_token(image)
    if axis in _PLANE and (base.startswith("D") or base.endswith("v")):
        order = int(re.search(r"[0-9]+", base).group())
        a = _angle_value(angle) if angle else 0.0
        i, j = _PLANE[axis]
        s = torch.zeros(3, dtype=torch.float64)
        s[i], s[j] = math.cos(a / 2), math.sin(a / 2)  # the first two-fold axis or mirror line
        s = g @ s
        i, j = _PLANE[_axis_token(image)]
        period = 2 * math.pi / order
        a = (2 * math.atan2(float(s[j]), float(s[i]))) % period
        if min(a, period - a) > 1e-9:
            out += f"[{angle_name(a)}]"
    return out


def _axis_direction(token: str) -> torch.Tensor:
    if token in _PLANE:
        return torch.eye(3, dtype=torch.float64)["xyz".index(token)]
    return torch.tensor([float(c) for c in re.findall(r"-?[0-9]", token)], dtype=torch.float64)


def _axis_token(v: torch.Tensor) -> str:
    c = [int(x) for x in v.tolist()]
    if sum(x != 0 for x in c) == 1:
        return "xyz"[next(i for i, x in enumerate(c) if x)]
    neg = [-x for x in c]
    c = min(c, neg, key=lambda u: (sum(x < 0 for x in u), [-x for x in u if x][:1]))
    return "[" + "".join(str(x) for x in c) + "]"


def _angle_value(s: str) -> float:
    num, _, den = s.partition("/")
    return (int(num[:-2]) if num[:-2] else 1) * math.pi / (int(den) if den else 1)


@functools.lru_cache(maxsize=64)
def _point_group(name: str) -> PointGroup:
    return PointGroup(name, {**_ROTATION_GENERATORS, **_IMPROPER_GENERATORS, **_EXTRA_CONJUGATES}[name])


def clebsch_gordan(l1: int, l2: int, l3: int) -> torch.Tensor:
    """Real SO(3) Clebsch-Gordan coefficients ``C [2l1+1, 2l2+1, 2l3+1]`` in the basis of the SO(3) irreps.

    ``sum_ij C[i, j, k] x_i y_j`` is the degree-``l3`` part of ``x ⊗ y``; ``||C||^2 = 2 l3 + 1``
    and ``D1(R) ⊗ D2(R)`` maps C's columns like ``D3(R)``. Zero unless ``|l1 - l2| <= l3 <= l1 + l2``.
    """
    for v in (l1, l2, l3):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"degrees must be ints >= 0, got {(l1, l2, l3)}")
    G = SO3()
    d1, d2, d3 = 2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1
    if not abs(l1 - l2) <= l3 <= l1 + l2:
        return torch.zeros(d1, d2, d3, dtype=torch.float64)
    slots, Q = irrep_product(G.irrep(l1), G.irrep(l2))
    o = 0
    for s in slots:
        if s.id == l3:
            return Q[:, o : o + d3].reshape(d1, d2, d3).clone()
        o += s.dim
    raise RuntimeError(f"{l3} missing from {l1} ⊗ {l2}")
