"""Fields: the small orthogonal reps a :class:`~equiproj.groups.Rep` is made of.

A :class:`Field` holds its irreps (``slots``) and the change of basis ``Q`` to them, or, for a
permutation field, the index tables of its :class:`PermutationAction`, from which its decomposition
is derived on first use (docs/math.md §9). Also the tensor product of two fields and the size
limits of the dense builds.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Callable, Sequence

import numpy as np
import torch

from .._caches import bytes_cached
from ._clebsch_gordan import irrep_product
from ._commutant import _COMMUTANT_DIM
from ._decompose import block_diag_irreps, decompose

#: the most elements (float64) of a dense matrix the reps build (``rep.matrix``, ``change_of_basis``): 4 GiB
MAX_DENSE_ELEMENTS = 2**29
#: the longest explicit permutation of coordinates the reps build (int64): 512 MiB
MAX_PERMUTATION = 2**26

def check_dense_size(elements: int, what: str) -> None:
    """``ValueError`` when a dense float64 tensor of ``elements`` entries would exceed :data:`MAX_DENSE_ELEMENTS`."""
    if elements > MAX_DENSE_ELEMENTS:
        raise ValueError(f"{what} would be a dense float64 tensor of {elements:,} entries ({elements * 8 / 2**30:.1f} GiB), "
                         f"more than the {MAX_DENSE_ELEMENTS:,} equiproj builds: the representation is too large to "
                         "write out densely; the energy functions work on its structure (segments and fields) instead")


def check_permutation_size(n: int, what: str) -> None:
    """``ValueError`` when an explicit permutation of ``n`` coordinates exceeds :data:`MAX_PERMUTATION`."""
    if n > MAX_PERMUTATION:
        raise ValueError(f"{what} needs an explicit permutation of {n:,} coordinates, more than the {MAX_PERMUTATION:,} "
                         "equiproj builds; write the rep as segments of copies without a permutation, e.g. "
                         "Rep.parse(G, '1000000x0e + 1000000x1o') instead of 1000000 * Rep.parse(G, '0e + 1o')")

class _TensorKey:
    """A tensor as part of a dict key: hashed by a digest of its bytes, equal to another exactly when
    the tensors are equal (same dtype, shape and values)."""

    __slots__ = ("tensor", "_hash")

    def __init__(self, t: torch.Tensor):
        t = t.detach().cpu().contiguous()
        self.tensor = t
        digest = hashlib.blake2b(t.numpy().view(np.uint8).reshape(-1).data, digest_size=16).digest()
        self._hash = hash((str(t.dtype), tuple(t.shape), digest))

    def __eq__(self, other):
        return (isinstance(other, _TensorKey) and self._hash == other._hash and self.tensor.dtype == other.tensor.dtype
                and self.tensor.shape == other.tensor.shape and torch.equal(self.tensor, other.tensor))

    def __hash__(self):
        return self._hash

    def __reduce__(self):  # the hash digests the bytes but hashes a str: recomputed in the new process
        return (_TensorKey, (self.tensor,))


class Field:
    """An atomic representation ``rho_f(g) = Q (⊕_slots psi(g)) Q^T`` of small dimension."""

    def __init__(self, group: Group, slots: Sequence["Irrep"] | None, Q: torch.Tensor | None,
                 matrix_fn: Callable[[torch.Tensor], torch.Tensor], name: str, key=None, dim: int | None = None,
                 permutation: "PermutationAction | None" = None):
        self.group = group
        self.permutation = permutation
        if slots is None:
            # a permutation field's decomposition is worked out on first use (its slots from the characters,
            # its Q in closed form or numerically): the orbit route of the kernels never needs them
            if permutation is None or key is None or dim is None:
                raise ValueError("a field without slots must be a permutation field with a key and a dim")
            self._slots, self._Q, self._lazy = None, None, True
        else:
            self._slots, self._Q, self._lazy = tuple(slots), Q, False
        self.dim = sum(s.dim for s in self.slots) if dim is None else dim
        self._matrix_fn = matrix_fn
        self.name = name
        # by default the field is what its decomposition says: rho_f(g) = Q (⊕ slots) Q^T
        self._key = key if key is not None else ("field", group, self.slots, None if Q is None else _TensorKey(Q))
        self._hash = hash(self._key)

    @property
    def slots(self) -> tuple["Irrep", ...]:
        """The irreps of the field, in the order of ``Q``'s column blocks."""
        if self._slots is None:
            self._slots = tuple(self.permutation.slots())
        return self._slots

    @property
    def Q(self) -> torch.Tensor | None:
        """``[dim, dim]`` orthogonal, ``rho_f(g) = Q (⊕ slots psi(g)) Q^T``; ``None``: the identity."""
        if self._lazy and self._Q is None:
            self._Q = self.permutation.change_of_basis(self.slots)
        return self._Q

    def matrix(self, g: torch.Tensor) -> torch.Tensor:
        return self._matrix_fn(g).to(torch.float64)

    def __eq__(self, other):
        return self is other or (isinstance(other, Field) and self._hash == other._hash and self._key == other._key)

    def __hash__(self):
        return self._hash

    def __repr__(self):
        return self.name

    def __reduce__(self):
        if self._lazy:  # rebuilt from its index tables
            return (_permutation_field, (self.permutation, self.name, self._key))
        # the matrix function may be a closure or the user's function: a pickled field evaluates its
        # decomposition instead, which is the same representation (to the decomposition's accuracy)
        return (_unpickled_field, (self.group, self.slots, self.Q, self.name, self._key, self.dim))


def spectral_field_matrix(Q: torch.Tensor | None, slots: tuple, g: torch.Tensor) -> torch.Tensor:
    """``rho_f(g) = Q (⊕ slots psi(g)) Q^T`` from a field's decomposition (``Q`` ``None``: the identity)."""
    D = block_diag_irreps(slots, g.to(torch.float64))
    if Q is None:
        return D
    Qd = Q.to(g.device)
    return Qd @ D @ Qd.T


def _unpickled_field(group, slots, Q, name, key, dim) -> Field:
    return Field(group, slots, Q, functools.partial(spectral_field_matrix, Q, tuple(slots)), name, key=key, dim=dim)


@bytes_cached("equiproj.groups._field.tensor_field")
def tensor_field(fa: Field, fb: Field) -> Field:
    """The field of ``fa ⊗ fb`` (Kronecker order), decomposed per slot pair with the cached
    Clebsch-Gordan blocks of :func:`equiproj.groups._clebsch_gordan.irrep_product`. The product of two
    permutation fields is a permutation field (``sigma(i, j) = (sigma_a(i), sigma_b(j))``), whose
    decomposition is worked out only when something asks for it."""
    group = fa.group

    def matrix_fn(g):
        A, B = fa.matrix(g), fb.matrix(g)
        return torch.einsum("...ij,...kl->...ikjl", A, B).reshape(g.shape[:-2] + (fa.dim * fb.dim,) * 2)

    name, key = f"({fa.name}⊗{fb.name})", ("tensor", fa, fb)
    if fa.permutation is not None and fb.permutation is not None:
        ta, tb = fa.permutation.element_table(), fb.permutation.element_table()
        table = (ta[:, :, None] * fb.dim + tb[:, None, :]).reshape(len(ta), fa.dim * fb.dim)
        action = PermutationAction(group, fa.dim * fb.dim, table,
                                   decomposition=functools.partial(_product_decomposition, fa, fb),
                                   factors=(fa.permutation, fb.permutation))
        return Field(group, None, None, action.matrix, name, key=key, dim=action.dim, permutation=action)
    slots, Q = _product_decomposition(fa, fb)
    return Field(group, slots, Q, matrix_fn, name=name, key=key)


def _product_decomposition(fa: Field, fb: Field) -> tuple[list, torch.Tensor]:
    """``(slots, Q)`` of ``fa ⊗ fb`` from the fields' decompositions and the Clebsch-Gordan blocks."""
    check_dense_size((fa.dim * fb.dim) ** 2, f"the decomposition of the tensor product of fields {fa.name} and {fb.name}")
    D = fa.dim * fb.dim
    Qk = torch.zeros(D, D, dtype=torch.float64)
    slots, col, oa = [], 0, 0
    for sa in fa.slots:
        ob = 0
        for sb in fb.slots:
            sub_slots, C = irrep_product(sa, sb)
            rows = ((oa + torch.arange(sa.dim))[:, None] * fb.dim + ob + torch.arange(sb.dim)).reshape(-1)
            Qk[rows, col : col + C.shape[1]] = C
            slots += sub_slots
            col += C.shape[1]
            ob += sb.dim
        oa += sa.dim
    Qa = torch.eye(fa.dim, dtype=torch.float64) if fa.Q is None else fa.Q
    Qb = torch.eye(fb.dim, dtype=torch.float64) if fb.Q is None else fb.Q
    return slots, torch.kron(Qa, Qb) @ Qk


#: the most float64 entries (``|G| d^2``) the monomial test of a field reads: its matrices at every element
_MONOMIAL_TEST_ELEMENTS = 2**24
#: how far from +-1 and 0 the entries of a monomial field's matrices may be (float64 rounding of cos, sin)
_MONOMIAL_TOL = 1e-12


@bytes_cached("equiproj.groups._field.monomial_action")
def monomial_action(field: Field) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(sigma, sign)``, both ``[|G|, d]`` (long, float64 ``+-1``), when every ``rho_f(g)`` of a finite
    group is a signed permutation matrix, ``rho_f(g) e_i = sign_g(i) e_{sigma_g(i)}`` (rows in the order
    of ``group.elements()``); else ``None``. Permutation fields (every sign ``+1``), the irreps of C_4 and
    D_4 and the three-dimensional irreps of the octahedral groups in their own bases, and products of
    such fields (an irrep field times the points of a kernel grid) are monomial: their equivariant maps
    are signed orbit sums (docs/math.md §9). Decided from the field's matrices at every element, so only
    for ``|G| d^2 <= 2^24``.

    >>> from equiproj.groups import Cyclic, Rep
    >>> sigma, sign = monomial_action(Rep.parse(Cyclic(4), "1").segments[0][1])
    >>> sigma[1].tolist(), sign[1].tolist()
    ([1, 0], [1.0, -1.0])
    """
    G = field.group
    if not G.is_finite or G.order * field.dim**2 > _MONOMIAL_TEST_ELEMENTS:
        return None
    if field.permutation is not None:
        sigma = field.permutation.element_table()
        return sigma, torch.ones(sigma.shape, dtype=torch.float64)
    M = field.matrix(G.elements())  # [|G|, d, d]: column i of rho(g) is sign_g(i) e_{sigma_g(i)}
    A = M.abs()
    sigma = A.argmax(dim=-2)
    sign = M.gather(-2, sigma[:, None, :]).squeeze(-2)
    # to rounding only: the signed orbit sums project onto the maps of the exact signed permutations, so
    # a field that is one only approximately keeps the spectral route, which uses its own matrices
    if not (bool(((sign.abs() - 1).abs() < _MONOMIAL_TOL).all()) and bool(((A.sum(-2) - 1).abs() < _MONOMIAL_TOL).all())):
        return None
    return sigma, sign.sign()


class PermutationAction:
    """How a finite group permutes the basis of a field: ``rho_f(g) e_i = e_{sigma_g(i)}``.

    Held as index tables, never as matrices: ``table`` ``[|G|, d]`` int64, ``sigma_g`` of every
    element in the order of ``group.elements()``; or, for the group's regular representation
    (``regular=True``), no table at all: the group answers through its hooks
    (``regular_table``, ``regular_generator_table``, ``regular_change_of_basis``, closed forms
    for C_N and D_N), so that ``Cyclic(65536).regular()`` costs O(1) to build. The action of a
    product field ``f_a ⊗ f_b`` keeps its ``factors`` (the two actions, ``sigma(i, j) = (sigma_a(i),
    sigma_b(j))``), from which the kernels index its orbits without a table of the product (docs/math.md
    §9). The decomposition
    into irreps is derived from the tables when asked: the multiplicities from the characters
    (fixed points), ``Q`` from ``decomposition()`` (closed form) or numerically, ordered as the
    group lists its irreps.
    """

    def __init__(self, group, dim: int, table: torch.Tensor | None = None, regular: bool = False,
                 decomposition: Callable[[], tuple[list, torch.Tensor]] | None = None,
                 factors: "tuple[PermutationAction, PermutationAction] | None" = None):
        if (table is None) != regular:
            raise ValueError("give a table, or regular=True for the group's regular representation")
        if factors is not None and factors[0].dim * factors[1].dim != dim:
            raise ValueError(f"factors of dimensions {factors[0].dim} and {factors[1].dim} do not make a field of dimension {dim}")
        self.group, self.dim, self.regular = group, int(dim), regular
        self.factors = factors
        self._table = None if table is None else table.to(torch.long).contiguous()
        self._decomposition = decomposition
        self._cache: dict = {}

    @property
    def key(self):
        """What makes two actions equal: the group and its table (or 'regular')."""
        return ("regular", self.group) if self.regular else ("table", self.group, _TensorKey(self._table))

    def __reduce__(self):
        return (PermutationAction, (self.group, self.dim, self._table, self.regular, self._decomposition, self.factors))

    def element_table(self) -> torch.Tensor:
        """``[|G|, d]`` long: row x is ``sigma`` of ``group.elements()[x]``."""
        if self.regular:
            check_permutation_size(self.dim * self.dim, f"the multiplication table of {self.group}")
            return self.group.regular_table()
        return self._table

    def generator_table(self) -> torch.Tensor:
        """``[k, d]`` long: ``sigma`` of each of ``group.generators()``."""
        if "gen" not in self._cache:
            self._cache["gen"] = (self.group.regular_generator_table() if self.regular
                                  else self._table[self.group.index(self.group.generators())])
        return self._cache["gen"]

    def sigma(self, g: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` long: ``sigma_g`` of the elements ``g`` ``[..., dG, dG]``."""
        idx = self.group.index(g)
        if self.regular:
            return self.group.regular_table(idx.cpu()).to(g.device)
        return self._table.to(g.device)[idx]

    def matrix(self, g: torch.Tensor) -> torch.Tensor:
        n = self.dim
        return torch.nn.functional.one_hot(self.sigma(g), n).transpose(-1, -2).to(torch.float64)

    def slots(self) -> list["Irrep"]:
        """The irreps of the field in the group's order, each as often as it occurs."""
        G = self.group
        if self.regular:  # each irrep psi occurs dim / (commutant dim) times
            return [psi for psi in G.irreps() for _ in range(psi.dim // _COMMUTANT_DIM[psi.type])]
        els = G.elements()
        fixed = (self._table == torch.arange(self.dim)).sum(1).to(torch.float64)  # the character
        out = []
        for psi in G.irreps():
            chi = psi.matrix(els, check=False).diagonal(dim1=-2, dim2=-1).sum(-1)
            m_float = float(fixed @ chi) / len(els) / _COMMUTANT_DIM[psi.type]
            m = round(m_float)
            if abs(m - m_float) > 1e-6:
                raise ValueError(f"the permutation action is not a representation of {G} (multiplicity of {psi} "
                                 f"is {m_float:.4f})")
            out += [psi] * m
        return out

    def change_of_basis(self, slots: Sequence["Irrep"]) -> torch.Tensor:
        """``Q`` ``[d, d]`` whose column blocks carry ``slots`` (as :meth:`slots` lists them)."""
        check_dense_size(self.dim**2, f"the change of basis of a permutation field of dimension {self.dim}")
        if self._decomposition is not None:
            found, Q = self._decomposition()
        elif self.regular and all(psi.type != "quaternionic" for psi in slots):
            found, Q = list(slots), self.group.regular_change_of_basis()
        else:
            found, Q = decompose(self.group, self.matrix, self.dim)
        return _columns_in_order(list(slots), list(found), Q)


def _columns_in_order(slots: list, found: list, Q: torch.Tensor) -> torch.Tensor:
    """``Q``'s column blocks (one per irrep of ``found``) reordered so that they carry ``slots``."""
    if found == slots:
        return Q
    rank = {psi: i for i, psi in enumerate(dict.fromkeys(slots))}
    if sorted(rank.get(s, -1) for s in found) != [rank[s] for s in slots]:
        raise ValueError("the decomposition does not match the multiplicities of the field")
    starts, o = [], 0
    for s in found:
        starts.append(o)
        o += s.dim
    order = sorted(range(len(found)), key=lambda k: rank[found[k]])  # stable: copies keep their order
    cols = torch.cat([torch.arange(starts[k], starts[k] + found[k].dim) for k in order])
    return Q[:, cols]


def permutation_field(action: PermutationAction, name: str, key=None) -> Field:
    """The field on which ``action`` permutes the basis (its decomposition is derived on first use)."""
    return Field(action.group, None, None, action.matrix, name,
                 key=key if key is not None else ("permutation",) + action.key, dim=action.dim, permutation=action)


def _permutation_field(action: PermutationAction, name: str, key) -> Field:
    return permutation_field(action, name, key)


def permutation_table(group, points, action, size) -> torch.Tensor:
    """``[|G|, n]`` long: ``sigma_g`` of every element of a finite group, from the ``points`` or the
    ``action`` given to :meth:`Rep.permutation`; checked to be a permutation action (rows are
    permutations, ``sigma_{s h} = sigma_s o sigma_h`` for every generator s and element h)."""
    if (points is None) == (action is None):
        raise ValueError("give exactly one of points= or action=")
    els = group.elements()
    if points is not None:
        pts = torch.as_tensor(points, dtype=torch.float64)
        if pts.dim() != 2 or pts.shape[1] != group.ambient_dim:
            raise ValueError(f"points must have shape [n, {group.ambient_dim}], got {tuple(pts.shape)}")
        n = len(pts)
        if n < 1:
            raise ValueError("a permutation representation needs at least one point (size >= 1)")
        from scipy.spatial import cKDTree  # noqa: PLC0415 - nearest points in O(n log n)

        scale = max(float(pts.abs().max()), 1.0)
        moved = torch.einsum("gij,nj->gni", els, pts).reshape(-1, group.ambient_dim)
        dist, idx = cKDTree(pts.numpy()).query(moved.numpy())
        if not float(np.max(dist)) < 1e-6 * scale:
            raise ValueError("the group does not map the points onto themselves")
        table = torch.from_numpy(idx).to(torch.long).reshape(len(els), n)
    else:
        if size is None:
            raise ValueError("size= is required with action=")
        n = int(size)
        if n < 1:
            raise ValueError("a permutation representation needs at least one point (size >= 1)")
        table = torch.as_tensor(action(els)).to(torch.long)
        if table.shape != (len(els), n):
            raise ValueError(f"action must return shape [..., {n}], got {tuple(table.shape)} for {len(els)} elements")
    if not torch.equal(table.sort(1).values, torch.arange(n).expand(len(els), n)):
        raise ValueError("the action does not permute the points: some sigma_g is not a permutation of range(n)")
    gens = group.index(group.generators())
    products = group.index(els[gens][:, None] @ els[None])  # [k, |G|]: index of s h
    if not torch.equal(table[products], torch.gather(table[gens][:, None, :].expand(-1, len(els), -1), 2,
                                                    table[None].expand(len(gens), -1, -1))):
        raise ValueError("the action is not a homomorphism: sigma_{g h} differs from sigma_g o sigma_h")
    return table
