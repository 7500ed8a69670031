"""The block plan of a (rep_in, rep_out) pair: what every backend executes (docs/math.md §4).

A plan holds, for each side, the permutation to the structured layout and the fields (offset,
copies, dim, small orthogonal Q); the irrep type of every spectral coordinate; and, per irrep
type shared by both sides, the spectral coordinates of each copy and the cached orthonormal
basis ``C [r, d, d]`` of its commutant. In the irrep basis a weight splits into d_out x d_in
blocks; a block between copies of the same type psi has equivariant part
``sum_s <C_s, B> C_s``, every other block is entirely non-equivariant.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ._caches import bytes_cached
from .groups import Field, Irrep, Rep, check_rep_pair
from .groups._field import monomial_action

__all__ = ["SidePlan", "BlockPlan", "FieldPair", "PackedPlan", "PlanColumn", "PlanRow", "OrbitForm", "orbit_pair",
           "product_columns", "block_plan", "plan_for"]


@dataclass
class FieldBlock:
    """``copies`` consecutive copies of a field of dimension ``dim`` starting at ``offset``
    (structured coordinates); ``Q`` is ``None`` when the field is already in the irrep basis."""

    offset: int
    copies: int
    dim: int
    field: Field

    @property
    def Q(self) -> torch.Tensor | None:
        return self.field.Q

    @property
    def slots(self) -> tuple[Irrep, ...]:
        return self.field.slots


@dataclass
class SidePlan:
    dim: int
    perm: torch.Tensor | None  # structured coordinate i holds user coordinate perm[i]
    fields: list[FieldBlock]
    types: list[Irrep]  # distinct irreps on this side
    coord_type: torch.Tensor  # [dim] index into ``types`` of each spectral coordinate
    rows: dict[Irrep, torch.Tensor]  # irrep -> [copies, d] spectral coordinates of each copy

    @staticmethod
    def build(rep: Rep) -> "SidePlan":
        """Vectorised over the copies of each segment (a count can be huge: ``Rep.parse(G, "100000x0e")``)."""
        fields, types, coord_types, rows = [], [], [], {}
        index: dict[Irrep, int] = {}
        o = 0
        for c, f in rep.segments:
            fields.append(FieldBlock(o, c, f.dim, f))
            field_type, offsets = [], {}  # per coordinate of the field; slot offsets per irrep
            so = 0
            for s in f.slots:
                if s not in index:
                    index[s] = len(types)
                    types.append(s)
                offsets.setdefault(s, []).append(so)
                field_type += [index[s]] * s.dim
                so += s.dim
            copies = o + torch.arange(c)[:, None, None] * f.dim  # [c, 1, 1]
            for s, offs in offsets.items():  # copy-major, then slot order: [c * k, d]
                r = copies + torch.tensor(offs)[None, :, None] + torch.arange(s.dim)[None, None, :]
                rows.setdefault(s, []).append(r.reshape(-1, s.dim))
            coord_types.append(torch.tensor(field_type, dtype=torch.long).repeat(c))
            o += c * f.dim
        return SidePlan(rep.dim, rep.perm, fields, types, torch.cat(coord_types),
                        {s: torch.cat(r) for s, r in rows.items()})


@dataclass
class FieldPair:
    """All tiles between copies of one output field and copies of one input field.

    Tile ``(u, v)`` is ``W_struct[out_offset + u*d_out : ... + d_out, in_offset + v*d_in : ... + d_in]``
    for ``u < out_copies``, ``v < in_copies``. ``basis`` ``[r, d_out, d_in]`` (float64, user
    coordinates of the field) is an orthonormal basis of the equivariant maps between the two
    fields: the projection of a tile T is ``sum_k <A_k, T> A_k`` and its residual
    ``T - sum_k <A_k, T> A_k``. ``r = 0``: every tile is entirely non-equivariant.
    """

    out_offset: int
    in_offset: int
    out_copies: int
    in_copies: int
    d_out: int
    d_in: int
    basis: torch.Tensor


#: the most float64 entries of the field-pair bases of one plan (1 GiB: the regular rep of C_512 or D_256)
MAX_BASIS_ELEMENTS = 2**27

_TOO_LARGE = (
    "a map between fields of dimension {d_out} and {d_in} needs a basis of {size:,} float64 entries, and a plan holds "
    "at most {limit:,}: the kernels work field by field and suit small fields (irreps, regular reps of groups up to "
    "order 512). Write the weight in the irrep basis instead: W_irr = rep_out.change_of_basis.T @ W @ "
    "rep_in.change_of_basis, with the reps sum(m * irrep for irrep, m in rep.irreps) (the energies are the same)")


def _field_pair_basis(fo: FieldBlock, fi: FieldBlock, bases: dict, room: int = MAX_BASIS_ELEMENTS) -> torch.Tensor:
    """``A = Q_out[:, slot a] C_s Q_in[:, slot b]^T`` over same-type slot pairs (a, b) and s."""
    Qo = torch.eye(fo.dim, dtype=torch.float64) if fo.Q is None else fo.Q
    Qi = torch.eye(fi.dim, dtype=torch.float64) if fi.Q is None else fi.Q
    in_slots: dict[Irrep, list[int]] = {}  # irrep -> offsets of its slots in the input field
    oi = 0
    for si in fi.slots:
        in_slots.setdefault(si, []).append(oi)
        oi += si.dim
    pairs, oo = [], 0  # (output offset, input offset, irrep), output-slot-major
    for so in fo.slots:
        pairs += [(oo, oi, so) for oi in in_slots.get(so, ())]
        oo += so.dim
    rank = sum(len(bases[s]) for _, _, s in pairs)
    if rank * fo.dim * fi.dim > room:
        raise ValueError(_TOO_LARGE.format(size=rank * fo.dim * fi.dim, d_out=fo.dim, d_in=fi.dim,
                                           limit=MAX_BASIS_ELEMENTS))
    # written in place: for a large field (the regular rep of a group of order 512) the basis is 1 GiB
    out = torch.empty(rank, fo.dim, fi.dim, dtype=torch.float64)
    k = 0
    for oo, oi, s in pairs:
        r = len(bases[s])
        torch.matmul(Qo[:, oo : oo + s.dim] @ bases[s], Qi[:, oi : oi + s.dim].T, out=out[k : k + r])
        k += r
    return out


class PlanColumn(enum.IntEnum):
    """The int64 columns of a row of :attr:`PackedPlan.meta` (one row per field pair).

    ``csrc/plan_columns.h`` mirrors this enum for the C++ kernels (checked when the extension
    loads, and by the tests); the Triton schedule reads rows through it."""

    OUT_OFFSET = 0  # first structured row of the output field's copies
    IN_OFFSET = 1  # first structured column of the input field's copies
    OUT_COPIES = 2
    IN_COPIES = 3
    D_OUT = 4  # dimension of the output field
    D_IN = 5
    RANK = 6  # r: number of basis matrices (0: the whole tile is non-equivariant); an orbit pair: its orbits
    BASIS_OFFSET = 7  # where the pair's [r, d_out, d_in] basis (an orbit pair: its orbit data) starts in PackedPlan.basis
    ORBITS = 8  # 0: a basis pair; K > 0: an orbit pair of two permutation fields with K orbits (no basis)
    ORBIT_FORM = 9  # an orbit pair's OrbitForm: how the kernels find the orbit of an entry


class PlanRow(NamedTuple):
    """One row of :attr:`PackedPlan.meta` as Python ints, fields in :class:`PlanColumn` order (what
    host code and traced code read: plain ints, no enum lookups)."""

    out_offset: int
    in_offset: int
    out_copies: int
    in_copies: int
    d_out: int
    d_in: int
    rank: int
    basis_offset: int
    orbits: int
    orbit_form: int


class OrbitForm(enum.IntEnum):
    """How the kernels find the orbit ``o(a, b)`` of entry ``(a, b)`` of a tile of an orbit pair
    (docs/math.md §9). ``TABLE``: the pair's segment of :attr:`PackedPlan.basis` holds the orbit of
    every entry, ``d_out * d_in`` exact integers row-major, then the ``K`` inverse orbit sizes
    ``1 / n_k`` (a tile's share of an orbit). ``CYCLIC`` / ``DIHEDRAL``: regular fields of C_N / D_N,
    closed forms with nothing stored, every orbit of size ``d``: C_N ``o(a, b) = (b - a) mod N``; D_N
    (element ``k + N s`` is ``R(k) F^s``) ``o = (k_b - k_a) mod N + N t`` for ``s_a = 0`` and
    ``(k_a - k_b) mod N + N (1 - t)`` for ``s_a = 1``. ``PRODUCT``: a regular output field and an
    input field ``f_1 ⊗ f_2`` of two permutation fields (a grid convolution's ``f_in ⊗ pixels``):
    every orbit meets every row once, ``K = d_in``, and orbit ``k = c d_2 + q`` sits in row ``a`` at
    column ``T_1[a, c] d_2 + T_2[a, q]``; the segment holds ``d_2``, then ``T_1`` ``[d_out, d_1]`` and
    ``T_2`` ``[d_out, d_2]`` row-major (``|G| (d_1 + d_2) + 1`` numbers instead of ``d_out d_in``).
    ``POINTS``: any two permutation fields, by the group's permutations themselves:
    ``P(T)[a, b] = (1/|G|) sum_g T[sigma_g(a), sigma_g(b)]``; the segment holds ``|G|``, then
    ``sigma^out`` ``[|G|, d_out]`` and ``sigma^in`` ``[|G|, d_in]`` row-major (``|G| (d_out + d_in) + 1``
    numbers: a large point set, whose orbit table would be larger than the weight). ``SIGNED``: two
    monomial fields (signed permutations, :func:`~equiproj.groups._field.monomial_action`: an irrep
    field of C_4 or D_4 times the points of a kernel grid), whose equivariant maps are the signed orbit
    sums ``W[e] = c(e) w_k``: the segment holds ``c(e) (k + 1)`` for every entry ``e`` of orbit ``k``
    (``0`` where the orbit's stabiliser flips the sign, so that ``P(T)`` vanishes there), row-major,
    then the ``K`` inverse orbit sizes; ``P(T)[e] = c(e) (1 / n_k) sum_{e' in k} c(e') T[e']``."""

    TABLE = 0
    CYCLIC = 1
    DIHEDRAL = 2
    PRODUCT = 3
    POINTS = 4
    SIGNED = 5


#: pairs of permutation fields this small keep their basis: the kernels' small-tile paths (compile-time
#: tile shapes, vectorised across tiles) beat the two passes of the orbit route there
_SMALL_FIELD = 5

#: except closed-form pairs (C_N, D_N regular) of this dimension: C_4 and D_2, whose 4x4 tiles the CPU
#: kernel handles two to a vector in one pass over the weight
_SMALL_CLOSED_FORM = 4

#: the largest orbit index table of one field pair (its entries are exact in a float32 basis)
MAX_ORBIT_TABLE = 2**24

#: pairs of permutation fields with at most this many entries per tile keep their orbit table when a
#: ``POINTS`` segment would be larger: its kernels (one indexed add per entry) beat the |G| gathers
#: per entry of the points form there; larger pairs take whichever is smaller
_TABLE_ENTRIES = 128 * 128


assert PlanRow._fields == tuple(c.name.lower() for c in PlanColumn), "PlanRow mirrors PlanColumn"


@dataclass
class PackedPlan:
    """The field-pair plan as plain tensors, what every backend executes.

    * ``meta`` ``[P, len(PlanColumn)]`` int64, one row per field pair, columns :class:`PlanColumn`;
      offsets are in structured coordinates.
    * ``basis`` ``[sum_p r_p d_out_p d_in_p]``: each pair's ``[r, d_out, d_in]`` orthonormal basis,
      row-major.
    * ``perm_out`` ``[m]`` / ``perm_in`` ``[n]`` int64: structured coordinate i is user row/column
      ``perm[i]`` (identity when the rep has no permutation; ``identity_perm`` says so).
    """

    m: int
    n: int
    meta: torch.Tensor
    basis: torch.Tensor
    perm_out: torch.Tensor
    perm_in: torch.Tensor
    identity_perm: bool
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def to(self, device, dtype) -> "PackedPlan":
        return PackedPlan(self.m, self.n, self.meta.to(device), self.basis.to(device=device, dtype=dtype),
                          self.perm_out.to(device), self.perm_in.to(device), self.identity_perm)

    def rows(self) -> list[PlanRow]:
        """``meta`` as Python ints (cached): one :class:`PlanRow` per field pair."""
        if "rows" not in self._cache:
            self._cache["rows"] = [PlanRow(*r) for r in self.meta.cpu().tolist()]
        return self._cache["rows"]

    def pair_bases(self, device, dtype) -> list[torch.Tensor]:
        """Each field pair's basis ``[r, d_out, d_in]`` on ``device`` in ``dtype`` (cached); ``None`` for an orbit pair."""
        key = ("bases", torch.device(device), dtype)
        if key not in self._cache:
            basis = self.basis.to(device=device, dtype=dtype)
            self._cache[key] = [None if r.orbits else basis[r.basis_offset : r.basis_offset + r.rank * r.d_out * r.d_in]
                                .reshape(r.rank, r.d_out, r.d_in) for r in self.rows()]
        return self._cache[key]

    def orbit_index(self, row: PlanRow, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(o, inverse sizes, signs)`` of an orbit pair: the orbit of every entry of a tile
        ``[d_out * d_in]`` (long, row-major), ``1 / n_k`` float64 and, for a ``SIGNED`` pair, the sign
        ``c(e)`` of every entry (float64; ``None`` for the other forms), on ``device`` (cached; the closed
        forms written out, for the pure-torch kernels). A ``SIGNED`` pair's entries whose orbit has no
        equivariant part have sign 0 and the extra orbit ``K``, of inverse size 0: ``P(T) = c(e) (1 / n_k)
        sum_{o(e') = k} c(e') T[e']`` for every form, with ``c = 1`` where there are no signs."""
        key = ("orbits", row.basis_offset, row.d_out, row.d_in, torch.device(device))
        if key not in self._cache:
            self._cache[key] = tuple(None if t is None else t.to(device) for t in _orbit_index(row, self.basis))
        return self._cache[key]

    def point_tables(self, row: PlanRow, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigma_out [|G|, d_out], sigma_in [|G|, d_in])`` long on ``device`` of an ``OrbitForm.POINTS``
        orbit pair (cached): the permutation of the output and of the input field by every element."""
        key = ("points", row.basis_offset, row.d_out, row.d_in, torch.device(device))
        if key not in self._cache:
            self._cache[key] = tuple(t.to(device) for t in point_tables(row, self.basis))
        return self._cache[key]

    def permutations(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(perm_out, perm_in, inverse perm_out, inverse perm_in)`` on ``device`` (cached), or ``None``
        for the identity."""
        if self.identity_perm:
            return None
        key = ("perms", torch.device(device))
        if key not in self._cache:
            po, pi = self.perm_out.to(device), self.perm_in.to(device)
            self._cache[key] = (po, pi, torch.argsort(po), torch.argsort(pi))
        return self._cache[key]


def _orbit_index(row: PlanRow, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    do, di, K = row.d_out, row.d_in, row.orbits
    if row.orbit_form in (OrbitForm.TABLE, OrbitForm.SIGNED):
        data = basis[row.basis_offset : row.basis_offset + do * di + K].to(torch.float64).cpu()
        code, inv = data[: do * di].round().to(torch.long), data[do * di :]
        if row.orbit_form == OrbitForm.TABLE:
            return code, inv, None
        o = torch.where(code == 0, K, code.abs() - 1)  # sign 0: the extra orbit K, of inverse size 0
        return o, torch.cat([inv, inv.new_zeros(1)]), code.sign().to(torch.float64)
    a, b = torch.arange(do)[:, None], torch.arange(di)[None, :]
    if row.orbit_form == OrbitForm.POINTS:
        raise ValueError("an OrbitForm.POINTS pair has no orbit index: use PackedPlan.point_tables")
    if row.orbit_form == OrbitForm.PRODUCT:  # written out: the column of orbit k in row a, inverted
        o = torch.empty(do, di, dtype=torch.long).scatter_(1, product_columns(row, basis), b.expand(do, di).contiguous())
        return o.reshape(-1), torch.full((K,), 1.0 / do, dtype=torch.float64), None
    if row.orbit_form == OrbitForm.CYCLIC:
        o = (b - a) % do
    elif row.orbit_form == OrbitForm.DIHEDRAL:
        N = do // 2
        ka, sa, kb, tb = a % N, a // N, b % N, b // N
        o = torch.where(sa == 0, (kb - ka) % N + N * tb, (ka - kb) % N + N * (1 - tb))
    else:
        raise ValueError(f"unknown orbit form {row.orbit_form}")
    return o.reshape(-1), torch.full((K,), 1.0 / do, dtype=torch.float64), None


def product_columns(row: PlanRow, basis: torch.Tensor) -> torch.Tensor:
    """``[d_out, d_in]`` long: the column of orbit ``k`` in row ``a`` of a ``PRODUCT`` orbit pair,
    ``T_1[a, k // d_2] d_2 + T_2[a, k % d_2]``."""
    d2 = int(basis[row.basis_offset])
    d1 = row.d_in // d2
    data = basis[row.basis_offset : row.basis_offset + 1 + row.d_out * (d1 + d2)].to(torch.float64).cpu()
    t1 = data[1 : 1 + row.d_out * d1].round().to(torch.long).reshape(row.d_out, d1)
    t2 = data[1 + row.d_out * d1 : 1 + row.d_out * (d1 + d2)].round().to(torch.long).reshape(row.d_out, d2)
    return (t1[:, :, None] * d2 + t2[:, None, :]).reshape(row.d_out, row.d_in)


def point_tables(row: PlanRow, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigma_out [|G|, d_out], sigma_in [|G|, d_in])`` long: the segment of an ``OrbitForm.POINTS`` pair."""
    bo, do, di = row.basis_offset, row.d_out, row.d_in
    ng = int(basis[bo])
    data = basis[bo + 1 : bo + 1 + ng * (do + di)].to(torch.float64).cpu().round().to(torch.long)
    return data[: ng * do].reshape(ng, do), data[ng * do :].reshape(ng, di)


def _points_segment(pa, pb) -> tuple[int, torch.Tensor]:
    """``(K, segment)`` of the ``POINTS`` form: ``|G|``, ``sigma^out``, ``sigma^in``; ``K`` (the orbits of
    G on the pairs, ``dim Hom_G``) by Burnside's lemma, ``K = (1/|G|) sum_g fix_out(g) fix_in(g)``,
    O(|G| (d_out + d_in)) work and memory."""
    to, ti = pa.element_table(), pb.element_table()  # [|G|, d]
    ng = to.shape[0]
    fix_out = (to == torch.arange(to.shape[1])).sum(1)
    fix_in = (ti == torch.arange(ti.shape[1])).sum(1)
    K = int((fix_out * fix_in).sum()) // ng
    return K, torch.cat([torch.tensor([float(ng)], dtype=torch.float64), to.reshape(-1).to(torch.float64),
                         ti.reshape(-1).to(torch.float64)])


def _product_orbits(pa, pb) -> torch.Tensor:
    """The ``PRODUCT`` segment of a regular output field ``pa`` and a product input field ``pb``:
    orbit ``k`` of the pairs is represented by ``(0, k)``; the element ``g_a`` that maps output
    coordinate 0 to ``a`` maps it to ``(a, sigma_{g_a}(k))``, so row ``a`` of ``T_i`` is ``sigma_{g_a}``
    of factor ``i``."""
    f1, f2 = pb.factors
    regular = pa.element_table()  # [|G|, |G|]: row x is sigma of element x
    g_of_row = torch.empty(pa.dim, dtype=torch.long)
    g_of_row[regular[:, 0]] = torch.arange(pa.dim)  # the element that maps coordinate 0 to row a
    t1, t2 = f1.element_table()[g_of_row], f2.element_table()[g_of_row]
    return torch.cat([torch.tensor([float(f2.dim)], dtype=torch.float64), t1.reshape(-1).to(torch.float64),
                      t2.reshape(-1).to(torch.float64)])


def orbit_pair(field_out: Field, field_in: Field) -> tuple[int, OrbitForm, torch.Tensor] | None:
    """``(K, form, data)`` when both fields are permutation fields (one of dimension above 5, or
    both regular fields of C_4 or D_2; :func:`_orbit_pair`) or both monomial fields, one of dimension
    above 5 (:func:`_signed_orbit_pair`), else ``None`` (the permutation test is made before the cache,
    which then holds only orbit pairs)."""
    if field_out.permutation is not None and field_in.permutation is not None:
        return _orbit_pair(field_out, field_in)
    if max(field_out.dim, field_in.dim) <= _SMALL_FIELD or field_out.dim * field_in.dim > _TABLE_ENTRIES:
        return None
    return _signed_orbit_pair(field_out, field_in)


@bytes_cached("equiproj._plan.signed_orbit_pair")
def _signed_orbit_pair(field_out: Field, field_in: Field) -> tuple[int, OrbitForm, torch.Tensor] | None:
    """``(K, OrbitForm.SIGNED, data)`` for two monomial fields (``OrbitForm.TABLE`` where every sign is
    ``+1``), else ``None``.

    G moves entry ``e = (a, b)`` of a tile to ``g e = (sigma_g(a), sigma_g(b))`` with the factor
    ``t_g(e) = sign_g(a) sign_g(b)``, so an equivariant map satisfies ``W[g e] = t_g(e) W[e]``: on each
    orbit it is ``c(e) w`` with ``c(g r) = t_g(r)`` relative to the orbit's first entry ``r``, unless some
    ``g`` fixing ``r`` has ``t_g(r) = -1`` (then only 0). The orbits' indicator vectors signed by ``c``,
    divided by ``sqrt(n_k)``, are an orthonormal basis of the equivariant maps, and ``P(W)`` is the
    signed mean over each orbit. Found from the images of every entry under every element, so only for
    ``|G| d_out d_in <= 2^24``."""
    mo, mi = monomial_action(field_out), monomial_action(field_in)
    d_out, d_in = field_out.dim, field_in.dim
    if mo is None or mi is None or mo[0].shape[0] * d_out * d_in > 2**24:
        return None
    (so, to), (si, ti) = mo, mi
    ng, N = so.shape[0], d_out * d_in
    image = (so[:, :, None] * d_in + si[:, None, :]).reshape(ng, N)  # [|G|, N]: g e
    factor = (to[:, :, None] * ti[:, None, :]).reshape(ng, N)  # t_g(e)
    first = image.min(0).values  # the first entry (row-major) of the orbit of every entry
    reached = image[:, first] == torch.arange(N)  # g maps the orbit's first entry to e
    plus = (reached & (factor[:, first] > 0)).any(0)
    minus = (reached & (factor[:, first] < 0)).any(0)
    label = torch.unique(first, return_inverse=True)[1]  # orbits numbered by their first entry
    flipped = torch.zeros(int(label.max()) + 1, dtype=torch.bool).index_fill_(0, label[plus & minus], True)
    kept = (~flipped).to(torch.long)
    number = torch.cumsum(kept, 0) - 1  # the kept orbits, renumbered 0 .. K - 1
    K = int(kept.sum())
    if K == 0:
        return None
    keep = kept[label].bool()
    code = torch.where(keep, (number[label] + 1) * torch.where(plus, 1, -1), 0)
    sizes = torch.bincount(number[label][keep], minlength=K).to(torch.float64)
    if bool((code > 0).all()):  # no sign (a trivial irrep and a permutation field): a plain orbit table
        return K, OrbitForm.TABLE, torch.cat([(code - 1).to(torch.float64), 1.0 / sizes])
    return K, OrbitForm.SIGNED, torch.cat([code.to(torch.float64), 1.0 / sizes])


@bytes_cached("equiproj._plan.orbit_pair")
def _orbit_pair(field_out: Field, field_in: Field) -> tuple[int, OrbitForm, torch.Tensor] | None:
    """``(K, form, data)`` for two permutation fields, one of dimension above 5 (or both regular
    fields of C_4 or D_2, or two 4-point fields whose orbits are those of C_4's), else ``None``
    (:func:`orbit_pair` answers the other fields before the cache).

    For permutation fields ``Hom_G`` is spanned by the indicator matrices of the orbits of G on pairs
    ``(a, b)`` (``(a, b) ~ (sigma_g(a), sigma_g(b))``), so ``P(W)`` is the mean of W over each orbit and
    no basis is needed (docs/math.md §9). Regular fields of C_N / D_N have closed forms (``data`` empty);
    a regular output field and a product input field (a grid convolution) have the factorised index of
    ``OrbitForm.PRODUCT``; a large pair whose group's permutations take less room than an orbit table
    (``|G| (d_out + d_in)`` against ``d_out d_in``) stores those (``OrbitForm.POINTS``, the mean over
    the group's images of each entry); otherwise ``data`` is the orbit of every entry (row-major, exact integers in float64) followed by the
    inverse orbit sizes, from the connected components of the graph the group's generators draw on the
    pairs. Shared by every copy of the pair: its size is that of one tile."""
    pa, pb = field_out.permutation, field_in.permutation
    d_out, d_in = field_out.dim, field_in.dim
    form = pa.group.regular_pair_orbits() if pa.regular and pb.regular and pa.group == pb.group else None
    small = max(d_out, d_in) <= _SMALL_FIELD
    if small and not d_out == d_in == _SMALL_CLOSED_FORM:
        return None
    if form is not None:
        return d_out, OrbitForm[form.upper()], torch.zeros(0, dtype=torch.float64)
    if small:  # two 4-point fields that are not regular: the cyclic closed form where their orbits are C_4's
        K, labels = _orbit_labels(pa, pb)
        return (d_out, OrbitForm.CYCLIC, torch.zeros(0, dtype=torch.float64)) if _cyclic(labels, K, d_out) else None
    if pa.regular and pb.factors is not None and pa.group == pb.group:
        return d_in, OrbitForm.PRODUCT, _product_orbits(pa, pb)
    ng = pa.group.order
    if d_out * d_in > _TABLE_ENTRIES and ng * (d_out + d_in) + 1 < d_out * d_in:
        K, data = _points_segment(pa, pb)
        return K, OrbitForm.POINTS, data
    if d_out * d_in > MAX_ORBIT_TABLE:
        raise ValueError(f"the orbits of a pair of permutation fields of dimension {d_out} and {d_in} need an index "
                         f"table of {d_out * d_in:,} entries, more than the {MAX_ORBIT_TABLE:,} a plan holds: split the "
                         "fields into smaller orbits (e.g. one field per orbit of the points)")
    K, o = _orbit_labels(pa, pb)
    if d_out == d_in and _cyclic(o, K, d_out):  # e.g. C_N acting on N points in cyclic order
        return d_out, OrbitForm.CYCLIC, torch.zeros(0, dtype=torch.float64)
    sizes = torch.bincount(o, minlength=K).to(torch.float64)
    return K, OrbitForm.TABLE, torch.cat([o.to(torch.float64), 1.0 / sizes])


def _cyclic(labels: torch.Tensor, K: int, n: int) -> bool:
    """Whether the orbits ``labels`` (row-major over an ``n x n`` tile) are those of the cyclic closed form:
    entry ``(a, b)`` on orbit ``(b - a) mod n``."""
    if K != n:
        return False
    a = torch.arange(n)
    diagonal = ((a[None, :] - a[:, None]) % n).reshape(-1)
    return len(torch.unique(labels * n + diagonal)) == n


def _orbit_labels(pa, pb) -> tuple[int, torch.Tensor]:
    """``(K, orbit of every entry)`` of a pair of permutation actions: the connected components of the graph
    the group's generators draw on the pairs ``(a, b)`` (row-major), numbered by their first entry."""
    import numpy as np  # noqa: PLC0415
    from scipy.sparse import coo_matrix  # noqa: PLC0415
    from scipy.sparse.csgraph import connected_components  # noqa: PLC0415

    d_out, d_in = pa.dim, pb.dim
    go, gi = pa.generator_table(), pb.generator_table()  # [k, d]
    nodes = d_out * d_in
    src = np.tile(np.arange(nodes), len(go))
    dst = (go[:, :, None] * d_in + gi[:, None, :]).reshape(-1).numpy()
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(nodes, nodes))
    K, labels = connected_components(graph, directed=True, connection="weak")
    _, first = np.unique(labels, return_index=True)  # number the orbits by their first entry (row-major)
    order = labels[np.sort(first)]  # the orbit labels in order of first appearance
    relabel = np.empty(K, dtype=np.int64)
    relabel[order] = np.arange(K)
    return int(K), torch.from_numpy(relabel[labels])


class _CommutantBases(dict):
    """irrep -> its commutant basis ``[r, d, d]``, computed on first use: a plan of orbit pairs needs
    none (the regular rep of C_4096 shares 2049 irreps with itself)."""

    def __missing__(self, irrep: Irrep) -> torch.Tensor:
        basis = self[irrep] = irrep.endomorphism_basis
        return basis


@dataclass
class BlockPlan:
    rep_in: Rep
    rep_out: Rep
    inp: SidePlan
    out: SidePlan
    shared: list[Irrep]  # irrep types present on both sides
    bases: dict[Irrep, torch.Tensor]  # commutant basis [r, d, d] per shared type (filled on first use)
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @functools.cached_property
    def field_pairs(self) -> list[FieldPair]:
        """The plan in field-pair form (what the fused kernels execute), row-major over fields."""
        pairs, used = [], 0
        for fo in self.out.fields:
            for fi in self.inp.fields:
                basis = _field_pair_basis(fo, fi, self.bases, MAX_BASIS_ELEMENTS - used)
                used += basis.numel()
                pairs.append(FieldPair(fo.offset, fi.offset, fo.copies, fi.copies, fo.dim, fi.dim, basis))
        return pairs

    @functools.cached_property
    def packed_cpu(self) -> PackedPlan:
        """The packed plan: a pair of permutation fields is an orbit pair (its orbit data in place of a
        basis, :func:`orbit_pair`), every other pair carries its basis (:attr:`field_pairs`)."""
        rows, chunks, bo, used = [], [], 0, 0
        for fo in self.out.fields:
            for fi in self.inp.fields:
                orbits = orbit_pair(fo.field, fi.field)
                if orbits is not None:
                    K, form, data = orbits
                    row, chunk = [K, bo, K, int(form)], data
                else:
                    basis = _field_pair_basis(fo, fi, self.bases, MAX_BASIS_ELEMENTS - used)
                    used += basis.numel()
                    row, chunk = [basis.shape[0], bo, 0, 0], basis.reshape(-1)
                rows.append([fo.offset, fi.offset, fo.copies, fi.copies, fo.dim, fi.dim] + row)
                assert len(rows[-1]) == len(PlanColumn)
                chunks.append(chunk)
                bo += chunk.numel()
        m, n = self.shape
        return PackedPlan(
            m, n, torch.tensor(rows, dtype=torch.long).reshape(-1, len(PlanColumn)),
            (torch.cat(chunks) if len(chunks) > 1 else chunks[0]) if chunks else torch.zeros(0, dtype=torch.float64),
            self.out.perm if self.out.perm is not None else torch.arange(m),
            self.inp.perm if self.inp.perm is not None else torch.arange(n),
            self.out.perm is None and self.inp.perm is None,
        )

    def packed(self, device, dtype) -> PackedPlan:
        """:class:`PackedPlan` on ``device`` with the basis in ``dtype`` (cached)."""
        key = ("packed", torch.device(device), dtype)
        if key not in self._device_cache:
            self._device_cache[key] = self.packed_cpu.to(device, dtype)
        return self._device_cache[key]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out.dim, self.inp.dim)

    @property
    def disjoint(self) -> bool:
        """True when the two reps share no irrep: every equivariant map is zero."""
        return not self.shared


@bytes_cached("block plans")
def block_plan(rep_in: Rep, rep_out: Rep) -> BlockPlan:
    """The (cached) plan for maps from ``rep_in`` to ``rep_out``."""
    check_rep_pair(rep_in, rep_out)
    inp, out = SidePlan.build(rep_in), SidePlan.build(rep_out)
    shared = [s for s in out.types if s in inp.rows]
    return BlockPlan(rep_in, rep_out, inp, out, shared, _CommutantBases())


def packed_plan(rep_in: Rep, rep_out: Rep, device, dtype: torch.dtype | None = None) -> PackedPlan:
    """The packed plan of ``(rep_in, rep_out)`` on ``device`` (cached by the block plan), its basis in
    ``dtype``; by default what the fused kernels read: float64 on the CPU (the C++ tiles are
    float64), float32 elsewhere (the Triton kernels)."""
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float64 if device.type == "cpu" else torch.float32
    return block_plan(rep_in, rep_out).packed(device, dtype)


# Under torch.compile the plan is looked up, never traced: dynamo ignores lru_cache and would
# re-run the construction (decompositions, SVDs) inside the trace, where dict lookups keyed by
# irreps go wrong. `assume_constant_result` runs the lookup eagerly at trace time and bakes in an
# integer key; the plan is an attribute of this holder under that key (an attribute, not a dict
# entry: dynamo reads a new attribute afresh, whereas it would keep a dict as it was when first
# seen in the frame). Its tensors become graph inputs.
class _TracedPlans:
    pass


_TRACED_PLANS = _TracedPlans()


@torch.compiler.assume_constant_result
def _traced_plan_key(rep_in: Rep, rep_out: Rep, device: str, dtype: str) -> int:
    P = packed_plan(rep_in, rep_out, torch.device(device), None if dtype == "None" else getattr(torch, dtype[6:]))
    P.rows()  # the rows as Python ints, read here: in the trace, meta.tolist() would give unbacked sizes
    setattr(_TRACED_PLANS, f"plan_{id(P)}", P)  # holds P: the key stays valid
    return id(P)


def plan_for(rep_in: Rep, rep_out: Rep, device, dtype: torch.dtype | None = None) -> PackedPlan:
    """:func:`packed_plan`, also inside ``torch.compile(fullgraph=True)``, where the plan is looked up
    when the code is traced."""
    if torch.compiler.is_compiling():
        return getattr(_TRACED_PLANS, f"plan_{_traced_plan_key(rep_in, rep_out, str(device), str(dtype))}")
    return packed_plan(rep_in, rep_out, device, dtype)
