"""The base class of the symmetry groups: elements, irrep data and the hooks the rest of the library asks.

A group owns everything that is specific to it (escnn's design): its elements and their
membership test, its irreps (ids, dimensions, types, matrices), an exact Haar quadrature, a
torus element for the Clebsch-Gordan solver, the selection rules of its tensor products and
its action on angular harmonics. Code outside the groups asks these hooks; it never branches
on the type of a group.

Group elements are orthogonal matrices ``[..., d, d]`` (d = ``ambient_dim``), float64.
"""

from __future__ import annotations

import abc
from typing import Hashable

import torch

from .._caches import bytes_cached
from ._commutant import _COMMUTANT_DIM
from ._field import PermutationAction, permutation_field
from ._rep import GROUP_CLASSES, Irrep, Rep
from ._threads import one_thread

__all__ = ["Group"]


class Group(abc.ABC):
    """A compact group of orthogonal ``ambient_dim x ambient_dim`` matrices.

    Subclasses define the irrep data (:meth:`irrep_ids`, :meth:`canonical_irrep_id`, :meth:`irrep_dim`,
    :meth:`irrep_matrix`) and the :meth:`generators`: these are abstract, so a group that lacks one
    cannot be instantiated. The other hooks have defaults that hold for a finite group whose irreps
    are real; a subclass overrides those that do not hold for it. Groups compare equal when they are the same group (``Cyclic(4) == Cyclic(4)``).
    """

    ambient_dim: int
    #: id of the trivial irrep
    trivial_id: Hashable = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):  # the public groups, by name (Rep.from_e3nn's default O3)
            GROUP_CLASSES[cls.__name__] = cls

    # ---- identity -------------------------------------------------------------------------
    def _key(self) -> tuple:
        return (type(self).__name__,)

    def __eq__(self, other) -> bool:
        return isinstance(other, Group) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ---- elements -------------------------------------------------------------------------
    @property
    def order(self) -> int | None:
        """Number of elements (``None`` for a continuous group)."""
        return None

    @property
    def is_finite(self) -> bool:
        return self.order is not None

    def identity(self) -> torch.Tensor:
        """``[d, d]`` identity element."""
        return torch.eye(self.ambient_dim, dtype=torch.float64)

    def elements(self) -> torch.Tensor:
        """All elements, ``[|G|, d, d]`` (finite groups only)."""
        raise TypeError(f"{self} is not finite: it has no list of elements; use sample()")

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` Haar-random elements, ``[n, d, d]`` float64."""
        els = self.elements()
        idx = torch.randint(len(els), (n,), generator=generator)
        return els[idx]

    @abc.abstractmethod
    def generators(self) -> torch.Tensor:
        """``[k, d, d]`` elements that generate the group (a dense subgroup if continuous)."""

    def check_elements(self, g: torch.Tensor, name: str = "g") -> torch.Tensor:
        """Validate that ``g`` holds elements of this group; returns it as float64."""
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of group elements, got {type(g).__name__}")
        d = self.ambient_dim
        if g.dim() < 2 or g.shape[-2:] != (d, d):
            raise ValueError(f"{name} must have shape [..., {d}, {d}] for {self}, got {tuple(g.shape)}")
        if not g.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {g.dtype}")
        g = g.to(torch.float64)
        tol = 1e-6 if g.dtype == torch.float64 else 1e-4
        if g.numel():
            err = (g.transpose(-1, -2) @ g - torch.eye(d, dtype=g.dtype, device=g.device)).abs().amax()
            if not err <= tol:  # also catches NaN
                raise ValueError(f"{name} is not orthogonal (|g^T g - I| = {float(err):.2e})")
            if not self._contains(g):
                raise ValueError(f"{name} contains matrices that are not elements of {self}")
        return g

    def _contains(self, g: torch.Tensor) -> bool:
        return True

    def index(self, g: torch.Tensor) -> torch.Tensor:
        """Position of each element of ``g`` in ``elements()`` (finite groups), ``[...]`` long."""
        els = self.elements().to(g.device)
        dist = (g[..., None, :, :] - els).abs().flatten(-2).amax(-1)
        val, idx = dist.min(-1)
        if g.numel() and not val.amax() < 1e-6:
            raise ValueError(f"matrices are not elements of {self}")
        return idx

    # ---- hooks asked by the rest of the library -------------------------------------------
    def haar_quadrature(self, degree: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Elements ``[P, d, d]`` and weights ``[P]`` (summing to 1) with ``sum_p w_p f(g_p) = ∫_G f(g) dg``
        exactly for every matrix coefficient ``f`` of an irrep of frequency/degree ``<= degree``
        (every function, for a finite group: the element average)."""
        if not self.is_finite:
            raise TypeError(f"no Haar quadrature for {self}")
        els = self.elements()
        return els, torch.full((len(els),), 1.0 / len(els), dtype=torch.float64)

    def haar_quadrature_size(self, degree: int) -> int:
        """The number of elements of :meth:`haar_quadrature` ``(degree)``, without building them."""
        if not self.is_finite:
            raise TypeError(f"no Haar quadrature for {self}")
        return self.order

    def torus_element(self) -> torch.Tensor | None:
        """An element whose irrep matrices are block diagonal with blocks of size <= 2 (the
        Clebsch-Gordan solver finds fixed vectors block by block there), or ``None``."""
        return None

    def product_may_contain(self, psi: Irrep, a: Irrep, b: Irrep) -> bool:
        """Selection rule: ``False`` when ``psi`` cannot occur in ``a ⊗ b`` (a shortcut only: the
        decomposition of a tensor product is complete and verified either way)."""
        return True

    def harmonic_rep(self, h: int) -> Rep:
        """The representation of this group on the angular harmonics of frequency (2-D) or degree
        (3-D) ``h``: ``phi_h(g x) = sigma_h(g) phi_h(x)``, in the harmonics' basis (the kernel
        spaces of :mod:`equiproj.kernel_spaces` sample them). One object per ``(group, h)``, so
        that plans cached by representation are reused."""
        return _harmonic_rep(self, int(h))

    def subgroups(self, conjugates: bool = False):
        """The subgroups that matter, one per conjugacy class (and, where one per class cannot make every
        inclusion literal, a few more conjugates), with their inclusions: a
        :class:`~equiproj.groups.SubgroupLattice` (each group lists them through ``_subgroup_list``).

        ``conjugates=True``: every subgroup, each conjugate of a listed one named by its own axes
        (``Csx``, ``Csy``, ``Csz`` are the three mirrors of O_h; ``D1[pi/4]`` a reflection of D8), for the
        finite groups whose list covers every conjugacy class (C_N, D_N, O, O_h). A trained model can keep
        the mirror x -> -x and break y -> -y although the two are conjugate."""
        from ._subgroups import every_subgroup_lattice, subgroup_lattice  # noqa: PLC0415 - _subgroups does not import this module

        return every_subgroup_lattice(self) if conjugates else subgroup_lattice(self)

    #: whether ``_subgroup_list`` has a subgroup in every conjugacy class, so that its conjugates are
    #: every subgroup (``subgroups(conjugates=True)``)
    _lists_every_subgroup_class = False

    def _subgroup_list(self) -> list[tuple[str, "Group"]]:
        """``(name, group)`` per listed subgroup (this group included), elements as matrices of this group."""
        return [(repr(self), self)]

    def _conjugate_subgroup(self, name: str, H: "Group", g: torch.Tensor) -> tuple[str, "Group"]:
        """The subgroup ``g H g^-1`` of this group and its name, for a listed subgroup ``(name, H)`` and an
        element ``g`` (a group with ``_lists_every_subgroup_class`` names the conjugate by mapping the
        axes of ``name`` through ``g``)."""
        raise NotImplementedError(f"{self!r} does not name the conjugates of its subgroups")

    def _same_irrep_as(self, psi: Irrep) -> Hashable | None:
        """For an irrep ``psi`` of a group containing this one: the id of this group's irrep whose
        matrices are ``psi``'s on this group's elements (the branching rule in closed form), or ``None``."""
        return None

    def _harmonic_irrep_id(self, h: int) -> Hashable | None:
        """The irrep whose matrices are exactly ``sigma_h``, if there is one."""
        return None

    def _ambient_harmonic_matrix(self, h: int):
        """``g -> sigma_h(g)`` for every element of the ambient O(2) / O(3)."""
        raise ValueError(f"{self} does not act on angular harmonics")

    # ---- irrep data (subclass interface) ----------------------------------------------------
    @abc.abstractmethod
    def irrep_ids(self, band_limit: int | None) -> list:
        """Ids of the irreps of frequency/degree ``<= band_limit`` (all of them for a finite group)."""

    @abc.abstractmethod
    def canonical_irrep_id(self, id) -> Hashable:
        """``id`` validated and in its canonical form; raises for an unknown id."""

    def parse_irrep_id(self, s: str) -> Hashable:
        """The id written as ``s`` (the inverse of :meth:`irrep_name`)."""
        try:
            return int(s)
        except ValueError:
            raise ValueError(f"malformed irrep {s!r} for {self}") from None

    @abc.abstractmethod
    def irrep_dim(self, id) -> int:
        """The dimension of the irrep ``id``."""

    def irrep_type(self, id) -> str:
        """``"real"``, ``"complex"`` or ``"quaternionic"``: the commutant has dimension 1, 2 or 4."""
        return "real"

    def irrep_band(self, id) -> int:
        """Frequency or degree (0 for a finite group's irreps)."""
        return 0

    @abc.abstractmethod
    def irrep_matrix(self, id, g: torch.Tensor) -> torch.Tensor:
        """The irrep's matrices at the elements ``g`` ``[..., d, d]`` (unchecked), ``[..., dim, dim]``."""

    def irrep_name(self, id) -> str:
        return str(id)

    def standard_irrep_id(self) -> Hashable | None:
        """Id of the irrep that is the defining action (``None`` if the defining action is reducible)."""
        return None

    # ---- representations ------------------------------------------------------------------
    def irrep(self, id) -> Irrep:
        """The irrep with this id (see :mod:`equiproj.groups` for each group's ids)."""
        if isinstance(id, str):
            id = self.parse_irrep_id(id.strip())
        return Irrep(self, self.canonical_irrep_id(id))

    def irreps(self, band_limit: int | None = None) -> list[Irrep]:
        """All irreps (finite groups) or those with frequency/degree ``<= band_limit``."""
        if band_limit is None and not self.is_finite:
            raise ValueError(f"{self} has infinitely many irreps: pass band_limit")
        return [self.irrep(i) for i in self.irrep_ids(band_limit)]

    def trivial(self) -> Irrep:
        """The 1-dim trivial irrep."""
        return self.irrep(self.trivial_id)

    def standard(self) -> Rep:
        """The defining action on R^2 or R^3 (``rep.matrix(g) == g``)."""
        sid = self.standard_irrep_id()
        if sid is not None:  # the defining action is itself one of the irreps
            return self.irrep(sid)
        return _standard_rep(self)

    def regular(self) -> Rep:
        """The left-regular representation (finite groups): ``e_h -> e_{gh}``, ordered as ``elements()``.

        Its decomposition is written down, not computed (docs/math.md §4): copy ``b`` of the irrep
        ``psi`` (dim d, commutant dim r, ``d / r`` copies) is the column block
        ``Q[x, a] = sqrt(d / |G|) psi(x)_{a b}`` over the elements x, the real Fourier transform on
        the group (for C_N the real DFT: ``cos(k theta_x), sin(k theta_x)``); Schur orthogonality
        makes Q orthogonal. One object per group (cached)."""
        if not self.is_finite:
            raise TypeError(f"{self} is continuous: it has no regular representation of finite dimension")
        return _regular_rep(self)

    # ---- the regular representation as index tables (docs/math.md §9) ----------------------
    def regular_table(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., |G|]`` long: ``sigma_g`` of the regular representation for the elements with indices
        ``idx`` (all elements by default): ``g x = elements()[sigma_g(x)]``."""
        els = self.elements()
        if idx is None:
            idx = torch.arange(len(els))
        return self.index(els[idx][..., None, :, :] @ els)

    def regular_generator_table(self) -> torch.Tensor:
        """``[k, |G|]`` long: ``sigma`` of each of :meth:`generators` in the regular representation."""
        return self.regular_table(self.index(self.generators()))

    def regular_pair_orbits(self) -> str | None:
        """The closed form of the orbits of the group on pairs ``(x, y)`` of its elements
        (``(x, y) ~ (g x, g y)``: the orbit is ``x^-1 y``) that the kernels evaluate without a table:
        ``"cyclic"`` (C_N: ``(y - x) mod N``), ``"dihedral"`` (D_N), or ``None`` (an index table)."""
        return None

    @one_thread
    def regular_change_of_basis(self) -> torch.Tensor:
        """``Q`` ``[|G|, |G|]`` of the regular representation, its column blocks carrying the irreps as
        ``regular().segments[0][1].slots`` lists them; written down, not computed: copy ``b`` of ``psi``
        (dim d, commutant dim r, d / r copies) is ``Q[x, a] = sqrt(d / |G|) psi(x)_{a b}``, the real
        Fourier transform on the group (Schur orthogonality makes Q orthogonal)."""
        els = self.elements()
        n = len(els)
        cols = []
        for psi in self.irreps():
            copies = psi.dim // _COMMUTANT_DIM[psi.type]
            M = psi.matrix(els, check=False)  # [|G|, d, d]; copy b is column b of psi(x)
            cols.append(M[:, :, :copies].transpose(1, 2).reshape(n, copies * psi.dim) * (psi.dim / n) ** 0.5)
        return torch.cat(cols, dim=1)


@bytes_cached("equiproj.groups._group._standard_rep")
def _standard_rep(group: Group) -> Rep:
    return Rep.from_matrices(group, lambda g: g, name="standard", band_limit=1)


@bytes_cached("equiproj.groups._group._regular_rep")
def _regular_rep(group: Group) -> Rep:
    action = PermutationAction(group, group.order, regular=True)
    return Rep(group, [(1, permutation_field(action, "regular", key=("regular", group)))], name="regular")


@bytes_cached("equiproj.groups._group._harmonic_rep")
def _harmonic_rep(group: Group, h: int) -> Rep:
    if h == 0:
        return group.trivial()
    rid = group._harmonic_irrep_id(h)
    if rid is not None:
        return group.irrep(rid)
    # a finite subgroup: the ambient harmonic rep restricted, decomposed numerically
    return Rep.from_matrices(group, group._ambient_harmonic_matrix(h), name=f"harmonic({h})")
