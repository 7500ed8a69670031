"""Groups, their real orthogonal irreps, and representations built from them (the library's lowest layer).

Group elements are orthogonal matrices, ``[..., 2, 2]`` or ``[..., 3, 3]``, float64.

===================  ==========================  =============================================
group                irrep id                    string form (``Rep.parse``) / notes
===================  ==========================  =============================================
``Cyclic(N)``        frequency ``k``, 0..N//2    ``"3"``; k = 0, N/2: 1-dim, real type; else
                                                 2-dim rotation by k*theta, complex type
``SO2()``            frequency ``k >= 0``        as ``Cyclic``
``Dihedral(N)``      ``(j, k)``                  ``"(1,2)"``; (0,0) trivial, (1,0) det, (1,k)
                                                 2-dim for 0 < k < N/2, and for even N the
                                                 1-dim (0,N/2), (1,N/2); all real type
``O2()``             ``(j, k)``                  (0,0), (1,0), (1,k) for k >= 1
``SO3()``            degree ``0 <= l <= L_MAX``  ``"2"`` (e3nn's ``"2e"`` is accepted too)
``O3()``             ``(l, p)``, p = +-1         e3nn style ``"2e"`` (p = +1), ``"1o"`` (p = -1);
                                                 ``Rep.from_e3nn(irreps)`` takes e3nn's ``Irreps``
``Octahedral()``     ``"A1" "A2" "E" "T1" "T2"`` T1 = the defining 3-D action
``FullOctahedral()`` the above + ``"g"``/``"u"`` T1u = the defining 3-D action
``Tetrahedral()``     ``"A" "E" "T"``              T (12 rotations); E of complex type
``FullTetrahedral()`` as ``Octahedral()``        T_d (24), through ``g -> det(g) g``; T2 = defining
``Axial(planar)``    the planar group's ids       a planar group about z: ``diag(g, det g)``
``PointGroup(name,  ``0, 1, ...`` (0 trivial)  a finite group of 3x3 matrices from generators;
generators)``                                    irreps from its regular rep (numerical tables)
===================  ==========================  =============================================

``Dihedral(N, axis=a)`` holds the reflections ``R(2 pi k / N + a) F`` (escnn's subgroup id ``(a, N)``
of O(2)). ``G.subgroups()`` lists the subgroups that matter (a :class:`SubgroupLattice` of
:class:`Subgroup` values) and ``rep.restrict(H)`` restricts a representation to one of them
(docs/math.md §9).

2-D elements are ``R(theta) F^s`` with ``F = diag(1, -1)``; the 2-dim irrep of frequency k
maps it to ``R(k theta) F^s``. SO(3) irreps act on real spherical harmonics in e3nn's basis
(:func:`spherical_harmonics`, :func:`wigner_D`). O(3) elements ``g = s R`` (``s = det g``) act by
``p^[s<0] D_l(R)``. Degrees above :data:`L_MAX` (512) raise ``ValueError``. The conventions are
collected in docs/math.md §8.

Example::

    >>> G = SO3()
    >>> r = Rep.parse(G, "4x0 + 2x1")
    >>> r.dim
    10
    >>> [(str(ir), m) for ir, m in r.irreps]
    [('0', 4), ('1', 2)]
"""

from . import _escnn  # noqa: F401 - sets Rep.from_escnn's implementation (escnn is imported only when used)
from ._clebsch_gordan import irrep_product
from ._coerce import as_rep, as_rep_pair
from ._group import Group
from ._planar import O2, SO2, Cyclic, Dihedral
from ._rep import Field, Irrep, Rep, check_rep_pair
from ._so3 import L_MAX, sphere_quadrature, spherical_harmonics, wigner_D
from ._spatial import O3, SO3, FullOctahedral, FullTetrahedral, Octahedral, Tetrahedral, clebsch_gordan
from ._axial import Axial
from ._point import PointGroup
from ._subgroups import Subgroup, SubgroupLattice

__all__ = [
    "Group", "Cyclic", "Dihedral", "SO2", "O2", "SO3", "O3", "Octahedral", "FullOctahedral", "Tetrahedral",
    "FullTetrahedral", "Axial", "PointGroup",
    "Subgroup", "SubgroupLattice",
    "Rep", "Irrep", "Field", "check_rep_pair", "as_rep", "as_rep_pair",
    "spherical_harmonics", "wigner_D", "sphere_quadrature", "clebsch_gordan", "irrep_product", "L_MAX",
]
