"""Subgroups, the subgroup lattice, and the restriction of a representation to a subgroup.

A :class:`Subgroup` names a subgroup ``H`` of a group ``G`` and carries it as an equiproj group whose
elements, as matrices, are elements of ``G``. Each group lists the subgroups that matter through its
hook ``_subgroup_list`` (one representative per conjugacy class, chosen so that the inclusions
between the representatives are literal: ``D1[0] ⊂ D2[0] ⊂ D4``, and where no choice of one per class
does that, a few more conjugates), and ``G.subgroups()`` returns them as a :class:`SubgroupLattice`.

The restriction ``rep.restrict(H)`` keeps the matrices (``rep.restrict(H).matrix(h) == rep.matrix(h)``)
and re-decomposes each field into irreps of ``H``: every irrep ``psi`` of ``G`` in the field is split
once into irreps of ``H`` (``psi|_H = Q_psi (⊕ phi) Q_psi^T``, cached per ``(psi, H)``), and the field's
change of basis becomes ``Q_f · blockdiag(Q_psi)``. So a layer of any width restricts at the cost of
its distinct irreps. Since ``Hom_G ⊂ Hom_H``, the energies obey ``E_perp^H <= E_perp^G``
(docs/math.md §10).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction
from typing import TYPE_CHECKING

import torch

from .._caches import bytes_cached
from ._decompose import decompose_by_projection
from ._field import Field
from ._threads import one_thread

if TYPE_CHECKING:
    from ._rep import Rep

__all__ = ["Subgroup", "SubgroupLattice", "subgroup_lattice", "every_subgroup_lattice", "angle_name"]


@dataclasses.dataclass(frozen=True)
class Subgroup:
    """A subgroup ``group`` of ``parent``, with a ``name`` (``"C4"``, ``"D1[0]"``, ``"D1[pi/2]"``, ``"O"``).

    ``group`` is an equiproj group whose elements are elements of ``parent`` (the same matrices), so a
    representation of ``parent`` restricts to it without a change of coordinates.

    Example::

        >>> from equiproj.groups import Dihedral
        >>> H = Dihedral(4).subgroups()["C4"]
        >>> H.group, H.order
        (Cyclic(4), 4)
    """

    name: str
    group: object
    parent: object

    def __repr__(self):
        return f"Subgroup({self.name!r} of {self.parent!r}: {self.group!r})"

    def __str__(self):
        return self.name

    @property
    def order(self) -> int | None:
        return self.group.order

    def is_subgroup_of(self, other: "Subgroup") -> bool:
        """Whether every element of this subgroup is an element of ``other`` (literal inclusion)."""
        return is_subset(self.group, other.group)


def is_subset(a, b) -> bool:
    """Whether the group ``a`` is contained in the group ``b`` (both as sets of matrices)."""
    if a.ambient_dim != b.ambient_dim:
        return False
    if a.is_finite and b.is_finite and a.order > b.order:
        return False
    if not a.is_finite and b.is_finite:
        return False
    g = a.elements() if a.is_finite else a.generators()  # generators of a dense subgroup: b is closed
    return bool(b._contains(g))


class SubgroupLattice:
    """The subgroups of ``parent`` that it lists (:meth:`Group.subgroups`) with their inclusions.

    Indexing by name gives a :class:`Subgroup`; iteration runs from the smallest to the largest
    (by order, continuous groups last). ``covers()`` are the edges of the Hasse diagram.

    Example::

        >>> from equiproj.groups import Dihedral
        >>> L = Dihedral(4).subgroups()
        >>> L.names
        ('C1', 'C2', 'D1[0]', 'D1[pi/2]', 'C4', 'D2[0]', 'D2[pi/2]', 'D4')
        >>> [s.name for s in L.above("D1[0]")]
        ['D1[0]', 'D2[0]', 'D4']
    """

    def __init__(self, parent, subgroups):
        subgroups = list(subgroups)
        if len({s.name for s in subgroups}) != len(subgroups):
            raise ValueError("subgroup names must be unique")
        for s in subgroups:
            if not is_subset(s.group, parent):
                raise ValueError(f"{s.name} ({s.group!r}) is not a subgroup of {parent!r}")
        subgroups.sort(key=lambda s: (s.order is None, s.order or 0, not _is_rotation_only(s.group)))
        self.parent = parent
        self.subgroups = tuple(subgroups)
        n = len(subgroups)
        if parent.is_finite:  # each subgroup as a set of the parent's element indices: inclusions are set inclusions
            sets = [_element_indices(s.group, parent) for s in subgroups]
            inclusion = [[sets[i] <= sets[j] for j in range(n)] for i in range(n)]
        else:
            inclusion = [[i == j or is_subset(subgroups[i].group, subgroups[j].group) for j in range(n)]
                         for i in range(n)]
        #: inclusion[i][j]: subgroups[i] ⊆ subgroups[j]
        self.inclusion = tuple(map(tuple, inclusion))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.subgroups)

    def __len__(self):
        return len(self.subgroups)

    def __iter__(self):
        return iter(self.subgroups)

    def __contains__(self, name):
        return name in self.names

    def __getitem__(self, name: str) -> Subgroup:
        for s in self.subgroups:
            if s.name == name:
                return s
        raise KeyError(f"{self.parent!r} lists no subgroup named {name!r}; its subgroups are {list(self.names)}")

    def __repr__(self):
        return f"SubgroupLattice({self.parent!r}: {', '.join(self.names)})"

    def _i(self, s) -> int:
        return self.names.index(s.name if isinstance(s, Subgroup) else s)

    def includes(self, small, large) -> bool:
        """Whether ``small ⊆ large`` (names or :class:`Subgroup` objects of this lattice)."""
        return self.inclusion[self._i(small)][self._i(large)]

    def below(self, s) -> list[Subgroup]:
        """The subgroups of ``s`` (``s`` included)."""
        j = self._i(s)
        return [t for i, t in enumerate(self.subgroups) if self.inclusion[i][j]]

    def above(self, s) -> list[Subgroup]:
        """The subgroups that contain ``s`` (``s`` included)."""
        i = self._i(s)
        return [t for j, t in enumerate(self.subgroups) if self.inclusion[i][j]]

    def covers(self) -> list[tuple[Subgroup, Subgroup]]:
        """``(H, K)`` with ``H ⊂ K`` and nothing listed strictly between them: the Hasse diagram's edges."""
        n, inc = len(self), self.inclusion
        out = []
        for i in range(n):
            for j in range(n):
                if i != j and inc[i][j] and not any(k not in (i, j) and inc[i][k] and inc[k][j] for k in range(n)):
                    out.append((self.subgroups[i], self.subgroups[j]))
        return out


def _element_indices(H, G) -> frozenset:
    """The elements of the finite group ``H`` as indices of ``G.elements()`` (the nearest element; ``H`` is
    checked to be a subgroup of ``G`` before)."""
    P = G.elements().reshape(G.order, -1)
    E = H.elements().reshape(H.order, -1).to(P)
    return frozenset(torch.cdist(E, P).argmin(1).tolist())


def _is_rotation_only(group) -> bool:
    g = group.generators()
    return bool((torch.linalg.det(g) > 0).all())


@bytes_cached("equiproj.groups._subgroups.subgroup_lattice")
def subgroup_lattice(group) -> SubgroupLattice:
    """The lattice of ``group``'s listed subgroups (its hook ``_subgroup_list``), cached per group."""
    return SubgroupLattice(group, [Subgroup(name, h, group) for name, h in group._subgroup_list()])


@bytes_cached("equiproj.groups._subgroups.every_subgroup_lattice")
def every_subgroup_lattice(group) -> SubgroupLattice:
    """Every subgroup of the finite ``group``: its listed subgroups and all their conjugates ``g H g^-1``
    (each named by the group's hook ``_conjugate_subgroup``, which maps the axes in the name through
    ``g``), one entry per set of elements; the listed names are kept. Cached per group."""
    if not (group.is_finite and group._lists_every_subgroup_class):
        raise ValueError(f"subgroups(conjugates=True) lists every subgroup of a finite group whose listed subgroups "
                         f"cover every conjugacy class (Cyclic, Dihedral, Octahedral, FullOctahedral); {group!r} is "
                         "not one of them: use subgroups(), one subgroup per conjugacy class")
    els = group.elements()
    listed = group._subgroup_list()
    found: dict[frozenset, tuple[str, object]] = {}
    for name, H in listed:
        found.setdefault(_element_indices(H, group), (name, H))
    P = els.reshape(len(els), -1)
    for name, H in listed:
        hs = H.elements()
        conj = els[:, None] @ hs[None] @ els[:, None].transpose(-1, -2)  # [g, h]: g h g^-1 (orthogonal g)
        idx = torch.cdist(conj.reshape(-1, P.shape[1]), P).argmin(1).reshape(len(els), len(hs))
        for g, row in zip(els, idx.tolist()):
            key = frozenset(row)
            if key not in found:
                found[key] = group._conjugate_subgroup(name, H, g)
    names = [n for n, _ in found.values()]
    if len(set(names)) != len(names):
        raise RuntimeError(f"{group!r}: the names of its conjugate subgroups are not unique: {sorted(names)}")
    return SubgroupLattice(group, [Subgroup(n, h, group) for n, h in found.values()])


def angle_name(theta: float) -> str:
    """``theta`` (radians) as a multiple of pi: ``"0"``, ``"pi/4"``, ``"3pi/2"`` (else 6 decimals)."""
    f = Fraction(theta / math.pi).limit_denominator(96)
    if abs(float(f) * math.pi - theta) > 1e-9:
        return f"{theta:.6f}"
    if f == 0:
        return "0"
    num = "pi" if f.numerator == 1 else f"{f.numerator}pi"
    return num if f.denominator == 1 else f"{num}/{f.denominator}"


# ---------------------------------------------------------------------------------------------
# restriction
# ---------------------------------------------------------------------------------------------
def _target(H):
    return H.group if isinstance(H, Subgroup) else H


def restricted_segments(rep: "Rep", H) -> tuple:
    """``(target group, segments)`` of ``rep`` restricted to the subgroup ``H`` (a :class:`Subgroup` or a
    group whose elements are elements of ``rep.group``): the same fields' matrices, decomposed into the
    irreps of ``H``; ``segments`` is ``None`` when ``H`` is ``rep.group`` itself. :meth:`Rep.restrict`
    builds the rep from them (this module does not import the rep module: it imports this one)."""
    target = _target(H)
    if not (hasattr(target, "ambient_dim") and hasattr(target, "irrep_ids")):
        raise TypeError(f"restrict needs a Subgroup or an equiproj group, got {type(H).__name__}")
    if target == rep.group:
        return target, None
    if not is_subset(target, rep.group):
        raise ValueError(f"{target!r} is not a subgroup of {rep.group!r}: its elements are not all elements of "
                         f"{rep.group!r}; pick one of {rep.group!r}.subgroups() or a group of its matrices")
    return target, [(c, restrict_field(f, target)) for c, f in rep.segments]


def restrict_field(field: Field, H) -> Field:
    """One field of a representation of G as a field of the subgroup ``H`` (cached per field and ``H``)."""
    if field.permutation is None and field.Q is None and len(field.slots) == 1:
        return _restrict_irrep_field(field, H)
    return _restrict_field(field, H)


@functools.lru_cache(maxsize=4096)  # an irrep's field: tiny values (Q is the irrep's dimension squared)
def _restrict_irrep_field(field: Field, H) -> Field:
    return _restricted_field(field, H)


@bytes_cached("equiproj.groups._subgroups.restrict_field")
def _restrict_field(field: Field, H) -> Field:
    return _restricted_field(field, H)


def _restricted_field(field: Field, H) -> Field:
    slots, blocks, identity = [], [], True
    for psi in field.slots:
        h_slots, Q = branching(psi, H)
        slots += h_slots
        blocks.append(Q)
        identity = identity and Q is None
    if identity:
        Q = field.Q
    else:
        B = torch.block_diag(*[torch.eye(psi.dim, dtype=torch.float64) if q is None else q
                               for psi, q in zip(field.slots, blocks)])
        Q = B if field.Q is None else field.Q @ B
    return Field(H, slots, Q, field._matrix_fn, name=f"{field.name}|{H!r}", key=("restricted", field, H),
                 dim=field.dim)


@functools.lru_cache(maxsize=4096)  # tiny values (Q is psi.dim squared): a size walk per entry would cost more
@one_thread
def branching(psi, H) -> tuple[list, torch.Tensor | None]:
    """The branching rule of the irrep ``psi`` of G to the subgroup ``H``: ``(slots, Q)`` with
    ``psi(h) = Q (⊕ slots(h)) Q^T`` for h in H (``Q`` ``None``: the identity).

    Where the restriction keeps the irrep's matrices exactly (the same formula on H's elements),
    the rule is read off; otherwise it is the decomposition by projection operators (``psi.band``
    bounds the frequencies a continuous H can see), verified to 1e-8 on H's generators (finite H) or
    at random elements of H."""
    fn = psi._raw_matrix
    same = H._same_irrep_as(psi)
    if same is not None:
        return [H.irrep(same)], None
    slots, Q = decompose_by_projection(H, lambda h: fn(h).to(torch.float64), psi.dim,
                                       None if H.is_finite else max(psi.band, 0))
    if len(slots) == 1 and torch.allclose(Q, torch.eye(psi.dim, dtype=torch.float64), atol=1e-12):
        return slots, None
    return slots, Q

