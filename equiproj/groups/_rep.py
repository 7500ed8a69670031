"""Representations: ``Irrep`` and ``Rep``.

A ``Rep`` is a real orthogonal representation in the user's coordinates (the coordinates of
a layer's weight). It is stored with its structure (docs/math.md §4):

    rho(g) = Pi^T [ ⊕_segments I_c ⊗ rho_f(g) ] Pi,    rho_f(g) = Q_f (⊕_slots psi(g)) Q_f^T

* a *segment* is ``c`` contiguous copies of a small *field* rep ``f`` (coordinates ``[c, dim f]``,
  copy-major, like e3nn's ``"16x1o"``);
* a field knows its decomposition into irreps (``slots``, in the order of ``Q_f``'s column
  blocks) and a small orthogonal ``Q_f`` (``None`` for an irrep, i.e. identity);
* ``Pi`` is an optional fixed permutation (``perm[i]`` = user coordinate of structured
  coordinate ``i``), needed e.g. for tensor products of sums.

``rep.matrix(g)`` evaluates ``rho_f`` directly (the irrep formulas, the permutation, the
user's function, Kronecker products), never through ``Q``; the spectral code uses ``Q``. The
two are tested against each other.

Reps are values: two reps are equal (and hash equal) when they have the same group, the same
segments of equal fields and the same permutation. Fields are equal when they are the same irrep,
the tensor product of equal fields, the same rep in a basis changed by an equal ``Q``, or (made by
``from_matrices`` / ``permutation``) have the same slots and the same decomposition ``Q_f``
(bit for bit: the decomposition is deterministic). Caches keyed by reps (the block plans) thus
find fresh but equal reps.

Multiplicities are counts: ``n * rep`` of a one-segment rep is one segment of ``n c`` copies, so
``Rep.parse(G, "100000000x0e")`` costs nothing. What is built densely (``rep.matrix``,
``change_of_basis``) or index by index (permutations) refuses clearly when it would be too large.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ._commutant import endomorphism_basis_of
from ._decompose import block_diag_irreps, check_representation, decompose, verify_decomposition
from ._field import (Field, PermutationAction, _TensorKey, check_dense_size,
                     check_permutation_size, permutation_field, permutation_table, spectral_field_matrix, tensor_field)
from ._registry import GROUP_CLASSES  # the group classes by name (they import this module)

#: ``n * rep`` repeats the segments of a multi-segment rep up to this many segments (as ``rep + ... + rep``);
#: beyond, it multiplies the counts and records the copy-major layout as a permutation
_MAX_REPEATED_SEGMENTS = 64

__all__ = ["Rep", "Irrep", "Field", "PermutationAction", "check_rep_pair"]



class Rep:
    """A real orthogonal representation of ``group`` on R^dim (see the module docstring).

    Build one with ``G.irrep(id)``, ``G.trivial()``, ``G.standard()``, ``G.regular()``,
    ``Rep.parse(G, "16x0e + 8x1o")``, ``a + b``, ``3 * a``, ``a @ b`` (tensor product),
    ``Rep.permutation(G, points=...)``, ``Rep.from_matrices(G, fn)`` and ``rep.change_basis(Q)``.
    """

    def __init__(self, group: Group, segments: Iterable[tuple[int, Field]], perm: torch.Tensor | None = None,
                 name: str | None = None):
        _check_group(group)
        merged: list[tuple[int, Field]] = []
        for c, f in segments:
            if not isinstance(f, Field) or isinstance(c, bool) or not isinstance(c, (int, np.integer)):
                raise TypeError(f"segments must be (count, Field) pairs, got ({c!r}, {type(f).__name__})")
            if c < 1 or f.dim < 1:
                raise ValueError(f"a segment needs count >= 1 and a field of dimension >= 1, got {int(c)} x {f.name} "
                                 f"(dimension {f.dim})")
            if f.group != group:
                raise ValueError(f"field {f.name} is of {f.group}, not of {group}")
            if merged and merged[-1][1] == f:
                merged[-1] = (merged[-1][0] + int(c), f)
            else:
                merged.append((int(c), f))
        if not merged:
            raise ValueError(f"a Rep of {group} needs at least one field: a representation of dimension 0 acts on "
                             "nothing (a layer without inputs or outputs has no weight to constrain)")
        self.group = group
        self.segments = tuple(merged)
        self.dim = sum(c * f.dim for c, f in self.segments)
        if perm is not None:
            perm = torch.as_tensor(perm, dtype=torch.long).cpu()
            counts = torch.bincount(perm.clamp(0, self.dim), minlength=self.dim + 1)[: self.dim] if perm.dim() == 1 else None
            if perm.shape != (self.dim,) or not bool((counts == 1).all()):
                raise ValueError(f"perm must be a permutation of range({self.dim}); got a tensor of shape "
                                 f"{tuple(perm.shape)} that is not one")
            if torch.equal(perm, torch.arange(self.dim)):
                perm = None
        self.perm = perm
        self._name = name

    # ---- identity -------------------------------------------------------------------------
    def _key(self):
        return (self.group, self.segments, None if self.perm is None else self._perm_key)

    @functools.cached_property
    def _perm_key(self) -> _TensorKey:
        return _TensorKey(self.perm)

    def __eq__(self, other):
        if self is other:
            return True
        return isinstance(other, Rep) and hash(self) == hash(other) and self._key() == other._key()

    def __hash__(self):
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:  # reps are immutable; plans are cached by rep, so hash once
        return hash(self._key())

    def __reduce__(self):  # the structure only: cached hashes and bases are rebuilt in the new process
        return (Rep, (self.group, self.segments, self.perm, self._name))

    def __repr__(self):
        if self._name:
            return f"Rep({self.group}, {self._name!r})"
        body = " + ".join(f"{c}x{f.name}" if c > 1 else f.name for c, f in self.segments)
        return f"Rep({self.group}, {body!r}{', permuted' if self.perm is not None else ''})"

    # ---- evaluation -----------------------------------------------------------------------
    def matrix(self, g: torch.Tensor, check: bool = True) -> torch.Tensor:
        """``rho(g)``: ``[..., dG, dG] -> [..., dim, dim]`` float64."""
        if check:
            g = self.group.check_elements(g)
        check_dense_size(math.prod(g.shape[:-2]) * self.dim**2,
                         f"rep.matrix of {math.prod(g.shape[:-2])} elements for a rep of dimension {self.dim}")
        out = torch.zeros(g.shape[:-2] + (self.dim, self.dim), dtype=torch.float64, device=g.device)
        o = 0
        for c, f in self.segments:
            w = c * f.dim
            # the c diagonal blocks of the segment at once: [..., c, d, c, d] view, diagonal over the copies
            blocks = out[..., o : o + w, o : o + w].unflatten(-1, (c, f.dim)).unflatten(-3, (c, f.dim))
            M = f.matrix(g)
            blocks.diagonal(dim1=-4, dim2=-2).copy_(M[..., None].expand(M.shape + (c,)))
            o += w
        if self.perm is not None:
            inv = self._inverse_perm.to(g.device)
            out = out[..., inv, :][..., :, inv]
        return out

    @functools.cached_property
    def _inverse_perm(self) -> torch.Tensor:
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(self.dim)
        return inv

    @property
    def irreps(self) -> list[tuple["Irrep", int]]:
        """The irreps with their multiplicities, in order of first appearance."""
        counts: dict[Irrep, int] = {}
        for c, f in self.segments:
            for s in f.slots:
                counts[s] = counts.get(s, 0) + c
        return list(counts.items())

    @property
    def band_limit(self) -> int:
        """Largest frequency / degree among the irreps (0 for finite groups' irreps)."""
        return max((s.band for _, f in self.segments for s in f.slots), default=0)

    @functools.cached_property
    def _structured_basis(self) -> tuple[torch.Tensor, list["Irrep"]]:
        """(Q_struct ``[dim, dim]``, slots in column order): rho = Q_struct ⊕psi Q_struct^T."""
        check_dense_size(self.dim**2, f"the change of basis of a rep of dimension {self.dim}")
        Q = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        slots, o = [], 0
        for c, f in self.segments:
            Qf = torch.eye(f.dim, dtype=torch.float64) if f.Q is None else f.Q
            w = c * f.dim
            Q[o : o + w, o : o + w].unflatten(1, (c, f.dim)).unflatten(0, (c, f.dim)).diagonal(dim1=0, dim2=2).copy_(
                Qf[..., None].expand(f.dim, f.dim, c))
            slots += list(f.slots) * c
            o += w
        if self.perm is not None:
            Q = Q[self._inverse_perm]
        return Q, slots

    def _times_structured_basis(self, M: torch.Tensor) -> torch.Tensor:
        """``M @ Q_struct`` without forming ``Q_struct``: it permutes ``M``'s columns and multiplies each
        segment's column block by its small field ``Q`` (``O(dim^2 f)`` for fields of dimension ``f``
        instead of a dense ``O(dim^3)`` product)."""
        if self.perm is not None:  # Q_struct = B[inv] (rows permuted): M @ B[inv] = M' @ B with M'[:, inv] = M
            permuted = torch.empty_like(M)
            permuted[:, self._inverse_perm] = M
            M = permuted
        blocks, o = [], 0
        for c, f in self.segments:
            w = c * f.dim
            block = M[:, o : o + w]
            blocks.append(block if f.Q is None else (block.unflatten(1, (c, f.dim)) @ f.Q).flatten(1))
            o += w
        return torch.cat(blocks, dim=1) if len(blocks) != 1 else blocks[0].contiguous()

    @property
    def change_of_basis(self) -> torch.Tensor:
        """Orthogonal ``Q`` ``[dim, dim]`` with ``matrix(g) = Q @ blockdiag(irreps(g)) @ Q.T``, the block
        diagonal listing, for each ``(irrep, mult)`` of ``self.irreps`` in order, ``mult`` copies."""
        Q, slots = self._structured_basis
        order = {ir: i for i, (ir, _) in enumerate(self.irreps)}
        # each column's irrep, in the order of self.irreps; a stable sort keeps the copies in place
        col_type = torch.repeat_interleave(torch.tensor([order[s] for s in slots]), torch.tensor([s.dim for s in slots]))
        return Q[:, torch.argsort(col_type, stable=True)]

    # ---- algebra --------------------------------------------------------------------------
    def _same_group(self, other, op):
        if not isinstance(other, Rep):
            raise TypeError(f"cannot {op} a Rep and a {type(other).__name__}")
        if other.group != self.group:
            raise ValueError(f"cannot {op} reps of different groups: {self.group} and {other.group}")

    def _perm_or_arange(self):
        return self.perm if self.perm is not None else torch.arange(self.dim)

    def __add__(self, other: "Rep") -> "Rep":
        """Direct sum; coordinates of ``self`` first."""
        self._same_group(other, "add")
        perm = None
        if self.perm is not None or other.perm is not None:
            check_permutation_size(self.dim + other.dim, f"the direct sum {self!r} + {other!r}")
            perm = torch.cat([self._perm_or_arange(), other._perm_or_arange() + self.dim])
        return Rep(self.group, self.segments + other.segments, perm)

    def __radd__(self, other):
        if isinstance(other, int) and other == 0:  # so that sum([...]) works
            return self
        return NotImplemented

    def __mul__(self, n: int) -> "Rep":
        """``n`` copies (the direct sum ``self + ... + self``, copy-major coordinates).

        A one-segment rep ``c x f`` gives ``n c x f`` (any ``n``, at no cost). A rep of several
        segments gives the segments repeated (exactly ``self + ... + self``) while that makes at most
        64 segments, else each segment's count times ``n`` with a permutation to the copy-major layout."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            return NotImplemented
        n = int(n)
        if n < 1:
            raise ValueError(f"multiplicity must be >= 1, got {n}")
        if n == 1:
            return self
        if self.perm is None and len(self.segments) == 1:
            (c, f), = self.segments
            return Rep(self.group, [(n * c, f)])
        if self.perm is None and n * len(self.segments) <= _MAX_REPEATED_SEGMENTS:
            return Rep(self.group, self.segments * n)
        check_permutation_size(n * self.dim, f"{n} copies of {self!r}")
        # copy t of self occupies user coordinates [t dim, (t+1) dim); segment i gathers its c_i copies of each
        p, shift = self._perm_or_arange(), torch.arange(n)[:, None] * self.dim
        perm, o = [], 0
        for c, f in self.segments:
            perm.append((shift + p[o : o + c * f.dim]).reshape(-1))
            o += c * f.dim
        return Rep(self.group, [(n * c, f) for c, f in self.segments], torch.cat(perm))

    __rmul__ = __mul__

    def __matmul__(self, other: "Rep") -> "Rep":
        """Tensor product; coordinate ``(i, j)`` is ``i * other.dim + j`` (Kronecker order)."""
        self._same_group(other, "tensor")
        check_permutation_size(self.dim * other.dim, f"the tensor product {self!r} @ {other!r}")
        segs, perm = [], []
        pa, pb = self._perm_or_arange(), other._perm_or_arange()
        oa = 0
        for ca, fa in self.segments:
            ob = 0
            for cb, fb in other.segments:
                f = tensor_field(fa, fb)
                segs.append((ca * cb, f))
                # structured coords (u, v, alpha, beta) -> user (a, b) -> a * dim_b + b
                u = torch.arange(ca)[:, None, None, None]
                v = torch.arange(cb)[None, :, None, None]
                al = torch.arange(fa.dim)[None, None, :, None]
                be = torch.arange(fb.dim)[None, None, None, :]
                a = pa[oa + u * fa.dim + al]
                b = pb[ob + v * fb.dim + be]
                perm.append((a * other.dim + b).reshape(-1))
                ob += cb * fb.dim
            oa += ca * fa.dim
        return Rep(self.group, segs, torch.cat(perm))

    def change_basis(self, Q: torch.Tensor) -> "Rep":
        """The same representation in new coordinates: ``rho'(g) = Q rho(g) Q^T`` (``Q`` orthogonal)."""
        Q = _check_orthogonal(Q, self.dim, "Q")
        slots = self._structured_basis[1]
        inner = self
        field = Field(self.group, slots, self._times_structured_basis(Q), lambda g: Q @ inner.matrix(g, check=False) @ Q.T,
                      name=f"changed_basis({self!r})", key=("change_basis", self, _TensorKey(Q)))
        return Rep(self.group, [(1, field)])

    def restrict(self, H) -> "Rep":
        """This representation on a subgroup ``H`` (a :class:`~equiproj.groups.Subgroup` from
        ``G.subgroups()``, or a group whose elements are elements of ``G``): the same matrices
        (``rep.restrict(H).matrix(h) == rep.matrix(h)``), decomposed into the irreps of ``H``."""
        from ._subgroups import restricted_segments  # noqa: PLC0415 - _subgroups does not import this module

        target, segments = restricted_segments(self, H)
        return self if segments is None else Rep(target, segments, self.perm)

    # ---- constructors ---------------------------------------------------------------------
    @classmethod
    def from_matrices(cls, group: Group, fn: Callable[[torch.Tensor], torch.Tensor],
                      band_limit: int | None = None, name: str | None = None) -> "Rep":
        """A representation from a user-supplied homomorphism ``fn(g: [..., dG, dG]) -> [..., d, d]``.

        It is decomposed into irreps numerically. ``band_limit`` bounds the frequencies
        (continuous groups; searched up to 32 (2-D) / 10 (3-D) if not given). Raises ``ValueError``
        if ``fn`` is not orthogonal or not a homomorphism. Two reps made from the same function are
        equal (the decomposition is deterministic).

        ``fn`` may return float64 matrices (decomposed and checked to 1e-8) or float32 ones, which
        are decomposed in float64 and checked at float32 precision; the rep is then the exact
        representation ``Q (⊕ irreps) Q^T`` nearest to them (``rep.matrix`` returns that, in float64).
        """
        _check_group(group)
        probe = fn(group.identity()[None])
        if not isinstance(probe, torch.Tensor) or probe.dim() != 3 or probe.shape[0] != 1 or probe.shape[1] != probe.shape[2]:
            raise ValueError("fn must map [..., d_G, d_G] elements to a tensor of shape [..., d, d]")
        dim = probe.shape[-1]
        if dim == 0:
            raise ValueError("fn returns 0 x 0 matrices: a representation needs dimension >= 1")
        if probe.dtype not in (torch.float64, torch.float32):
            raise TypeError(f"fn must return float64 or float32 matrices, got {probe.dtype}: float16/bfloat16 and "
                            "integer matrices are too coarse to decompose; return them as float64")
        # rounding of float32 entries: |rho^T rho - I| and |rho(gh) - rho(g) rho(h)| grow like eps * dim
        exact = probe.dtype == torch.float64
        tol = 1e-6 if exact else max(1e-6, 16 * torch.finfo(torch.float32).eps * dim)

        def f64(g):
            return fn(g).to(torch.float64)

        check_representation(group, f64, dim, tol=tol)
        verify_tol = 1e-8 if exact else tol
        if group.is_finite or band_limit is not None:
            slots, Q = decompose(group, f64, dim, band_limit, tol=verify_tol)
        else:
            last = None
            for L in range(1, 33 if group.ambient_dim == 2 else 11):
                try:
                    slots, Q = decompose(group, f64, dim, L, tol=verify_tol)
                    break
                except ValueError as err:
                    last = err
            else:
                raise ValueError(f"fn does not decompose into irreps of {group} of frequency <= {L} (at {L}: {last}); "
                                 "pass band_limit= if higher frequencies occur") from None
        name = name or "from_matrices"
        if not exact:  # the exact representation the float32 matrices approximate
            f64 = functools.partial(spectral_field_matrix, Q, tuple(slots))
        return cls(group, [(1, Field(group, slots, Q, f64, name))], name=name)

    @classmethod
    def permutation(cls, group: Group, points: torch.Tensor | None = None,
                    action: Callable[[torch.Tensor], torch.Tensor] | None = None, size: int | None = None,
                    name: str | None = None) -> "Rep":
        """The permutation representation of an action on a finite set: ``rho(g) e_i = e_{sigma_g(i)}``.

        Give either ``points`` ``[n, dG]`` that the group maps onto themselves
        (``x_{sigma_g(i)} = g x_i``, e.g. the pixels of a kernel grid), or ``action(g) ->
        [..., n]`` long tensor of ``sigma_g`` and ``size = n``.
        """
        _check_group(group)
        if group.is_finite:  # index tables: no dense matrices, the decomposition on first use
            table = permutation_table(group, points, action, size)
            n = table.shape[1]
            return cls(group, [(1, permutation_field(PermutationAction(group, n, table), name or f"permutation({n})"))],
                       name=name or f"permutation({n})")
        fn, n = permutation_matrices(group, points, action, size)
        return cls.from_matrices(group, fn, band_limit=0, name=name or f"permutation({n})")

    @classmethod
    def parse(cls, group: Group, s) -> "Rep":
        """Parse ``"16x0e + 8x1o"`` (O(3)), ``"4x0 + 2x1"`` (SO(2), C_N, SO(3)), ``"2x(0,0) + (1,2)"``
        (O(2), D_N), ``"A1g + 3xT1u"`` (octahedral). ``"regular"``, ``"standard"`` and ``"trivial"``
        are accepted as terms (``"4xregular + 2x0"``). An e3nn ``Irreps`` (or ``Irrep``) is accepted
        for ``s`` too (read as its string, ``"8x0e+4x1o"``)."""
        if not _is_group(group):
            named = isinstance(group, str) and group in GROUP_CLASSES
            hint = f" like equiproj.{group}()" if named else ", e.g. equiproj.O3()"
            raise TypeError(f"group must be an equiproj Group object{hint}, got {type(group).__name__} {group!r}")
        from ._e3nn import is_e3nn_irreps  # noqa: PLC0415 - recognises e3nn objects without importing e3nn

        if is_e3nn_irreps(s):
            s = str(s)
        if not isinstance(s, str):
            raise TypeError(f"expected a string (or an e3nn Irreps), got {type(s).__name__}")
        if not s.isascii():  # "\d" and int() would read other scripts' digits ("٣" as 3)
            bad = sorted({c for c in s if not c.isascii()})
            raise ValueError(f"representation strings are ASCII (digits 0-9, letters, 'x', '+', parentheses); {s!r} "
                             f"contains {bad}")
        terms = [t.strip() for t in s.split("+")]
        if not s.strip() or any(not t for t in terms):
            raise ValueError(f"malformed representation string {s!r}")
        reps = []
        for t in terms:
            m = re.fullmatch(r"(?:(\d+)\s*x\s*)?(.+)", t)
            mult = int(m.group(1)) if m.group(1) is not None else 1
            if mult < 1:
                raise ValueError(f"multiplicity must be >= 1 in {t!r}")
            body = m.group(2).strip()
            if body in ("regular", "standard", "trivial"):
                r = getattr(group, body)()
            else:
                r = group.irrep(body)
            reps.append(mult * r)
        return sum(reps)

    @classmethod
    def from_e3nn(cls, irreps, group: Group | None = None) -> "Rep":
        """The rep of an e3nn ``Irreps`` (or ``Irrep``, or its string ``"8x0e + 4x1o"``) with e3nn's
        coordinates: ``rep.matrix(g)`` equals ``irreps.D_from_matrix(g)``.

        ``group``: ``equiproj.O3()`` (default) or ``equiproj.SO3()`` (then every parity must be ``e``:
        an odd irrep differs from an even one only under the inversion, which SO(3) does not have).
        equiproj's SO(3)/O(3) basis is e3nn's (real spherical harmonics, polar axis y), so no change
        of basis is involved. e3nn is imported only if ``irreps`` is an e3nn object already.
        """
        from ._e3nn import e3nn_irreps_string  # noqa: PLC0415 - the optional dependency's helpers, on use

        if group is None:
            group = GROUP_CLASSES["O3"]()
        _check_group(group)
        return cls.parse(group, e3nn_irreps_string(irreps, type(group).__name__))

    @classmethod
    def from_escnn(cls, field_type) -> "Rep":
        """The rep of an escnn ``FieldType`` in equiproj's conventions (docs/interop.md): the escnn
        element with base-space action ``A`` is ``g = S A S`` (``S = diag(1, -1)`` or ``diag(1, -1, -1)``)
        and ``rep.matrix(g)`` equals ``field_type.representation`` at that element (checked on
        conversion); one field per escnn field, with its irreps and change of basis. Needs escnn;
        SO(2), O(2), C_N, D_N, SO(3) and O(3)."""
        from ._escnn import escnn_rep_parts  # noqa: PLC0415 - _escnn does not import this module

        G, segments, elements, want = escnn_rep_parts(field_type)
        rep = Rep(G, segments)
        # the field type's own matrices at the test elements
        err = float((rep.matrix(elements) - want).abs().max())
        if not err < 1e-6 * max(1.0, math.sqrt(rep.dim)):
            raise RuntimeError(f"Rep.from_escnn: the converted rep differs from escnn's field type by {err:.1e}")
        return rep


def rep_from_decomposition(group: Group, fn: Callable[[torch.Tensor], torch.Tensor], slots: Sequence["Irrep"],
                           Q: torch.Tensor, name: str) -> Rep:
    """The one-field rep ``fn`` (float64 matrices) whose decomposition ``fn = Q (⊕ slots) Q^T`` is known
    in closed form; it is checked at random elements, as a numerical one would be."""
    verify_decomposition(group, fn, list(slots), Q, 1e-8)
    return Rep(group, [(1, Field(group, slots, Q, fn, name))], name=name)


def permutation_matrices(group, points, action, size) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """``(fn, n)``: the permutation matrices ``fn(g) [..., n, n]`` of the action given to :meth:`Rep.permutation`."""
    if (points is None) == (action is None):
        raise ValueError("give exactly one of points= or action=")
    if points is not None:
        pts = torch.as_tensor(points, dtype=torch.float64)
        if pts.dim() != 2 or pts.shape[1] != group.ambient_dim:
            raise ValueError(f"points must have shape [n, {group.ambient_dim}], got {tuple(pts.shape)}")
        size = len(pts)
        scale = max(float(pts.abs().max()), 1.0) if size else 1.0

        def action(g):
            moved = torch.einsum("...ij,nj->...ni", g, pts.to(g.device))
            dist = (moved[..., :, None, :] - pts.to(g.device)).abs().amax(-1)
            val, idx = dist.min(-1)
            if idx.numel() and not val.amax() < 1e-6 * scale:
                raise ValueError("the group does not map the points onto themselves")
            return idx

    if size is None:
        raise ValueError("size= is required with action=")
    n = int(size)
    if n < 1:
        raise ValueError("a permutation representation needs at least one point (size >= 1)")

    def fn(g):
        sigma = action(g)
        if sigma.shape != g.shape[:-2] + (n,):
            raise ValueError(f"action must return shape [..., {n}], got {tuple(sigma.shape)}")
        # column i has its 1 in row sigma(i)
        return torch.nn.functional.one_hot(sigma, n).transpose(-1, -2).to(torch.float64)

    return fn, n


def check_rep_pair(rep_in, rep_out) -> None:
    """Raise ``TypeError`` unless both are :class:`Rep`, ``ValueError`` unless they are of one group."""
    for name, r in (("rep_in", rep_in), ("rep_out", rep_out)):
        if not isinstance(r, Rep):
            raise TypeError(f"{name} must be an equiproj Rep, got {type(r).__name__}")
    if rep_in.group != rep_out.group:
        raise ValueError(f"rep_in acts by {rep_in.group} but rep_out by {rep_out.group}: they must be the same group")


def _is_group(group) -> bool:
    # duck-typed: the group classes build their irreps from this module, so it cannot import them
    return callable(getattr(group, "irreps", None)) and callable(getattr(group, "haar_quadrature", None))


def _check_group(group) -> None:
    if not _is_group(group):
        raise TypeError(f"group must be an equiproj Group object (e.g. equiproj.O3()), got {type(group).__name__} {group!r}")



def _check_orthogonal(Q, dim, name):
    if not isinstance(Q, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor")
    if Q.shape != (dim, dim):
        raise ValueError(f"{name} must have shape [{dim}, {dim}], got {tuple(Q.shape)}")
    Q = Q.detach().to(device="cpu", dtype=torch.float64, copy=True)  # the rep's own: the caller may change theirs
    gram = Q.T @ Q  # the one dense O(dim^3) step of a change of basis: the check itself is kept exact
    gram.diagonal().sub_(1.0)
    err = gram.abs().amax()
    if not err < 1e-6:
        raise ValueError(f"{name} is not orthogonal: max |Q^T Q - I| = {float(err):.2e}")
    return Q


class Irrep(Rep):
    """An irreducible representation of ``group`` with id ``id`` (made by ``group.irrep(id)``).

    Attributes: ``id``, ``dim``, ``type`` (``"real"``, ``"complex"`` or ``"quaternionic"``),
    ``band`` (frequency or degree; 0 for finite groups' irreps), ``endomorphism_basis``.
    """

    def __init__(self, group: Group, id):
        self.id = id
        self.type = group.irrep_type(id)
        self.band = group.irrep_band(id)
        field = Field(group, (self,), None, self._raw_matrix, name=group.irrep_name(id),
                      key=("irrep", group, id), dim=group.irrep_dim(id))
        super().__init__(group, [(1, field)])

    def _raw_matrix(self, g):
        return self.group.irrep_matrix(self.id, g)

    def matrix(self, g: torch.Tensor, check: bool = True) -> torch.Tensor:
        """``psi(g)``: ``[..., dG, dG] -> [..., dim, dim]`` float64."""
        if check:
            g = self.group.check_elements(g)
        return self._raw_matrix(g.to(torch.float64)).to(torch.float64)

    def _key(self):
        return ("irrep", self.group, self.id)

    def __reduce__(self):
        return (_group_irrep, (self.group, self.id))

    def __repr__(self):
        return f"Irrep({self.group}, {self.group.irrep_name(self.id)})"

    def __str__(self):
        return self.group.irrep_name(self.id)

    @property
    def endomorphism_basis(self) -> torch.Tensor:
        """``[r, d, d]``: a Frobenius-orthonormal basis of End_G(psi), the matrices commuting with
        every ``psi(g)``; r = 1, 2, 4 for real, complex, quaternionic type. The first is ``I/sqrt(d)``."""
        return endomorphism_basis_of(self)


def _group_irrep(group: Group, id) -> Irrep:
    return group.irrep(id)


def structured_check(rep: Rep, g: torch.Tensor) -> float:
    """Max deviation of ``rep.matrix(g)`` from ``Q ⊕psi(g) Q^T`` (for tests/diagnostics)."""
    Q, slots = rep._structured_basis
    return float((rep.matrix(g) - Q @ block_diag_irreps(slots, g) @ Q.T).abs().amax())
