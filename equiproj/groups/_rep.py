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
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Iterable, Sequence

import torch

from ._clebsch_gordan import irrep_product
from ._decompose import block_diag_irreps, check_representation, decompose

__all__ = ["Rep", "Irrep", "Field", "check_rep_pair"]


class Field:
    """An atomic representation ``rho_f(g) = Q (⊕_slots psi(g)) Q^T`` of small dimension."""

    def __init__(self, group: Group, slots: Sequence["Irrep"], Q: torch.Tensor | None,
                 matrix_fn: Callable[[torch.Tensor], torch.Tensor], name: str, key=None, dim: int | None = None):
        self.group = group
        self.slots = tuple(slots)
        self.dim = sum(s.dim for s in self.slots) if dim is None else dim
        self.Q = Q
        self._matrix_fn = matrix_fn
        self.name = name
        self._key = key if key is not None else ("field", id(self))

    def matrix(self, g: torch.Tensor) -> torch.Tensor:
        return self._matrix_fn(g).to(torch.float64)

    def __eq__(self, other):
        return isinstance(other, Field) and self._key == other._key

    def __hash__(self):
        return hash(self._key)

    def __repr__(self):
        return self.name


class Rep:
    """A real orthogonal representation of ``group`` on R^dim (see the module docstring).

    Build one with ``G.irrep(id)``, ``G.trivial()``, ``G.standard()``, ``G.regular()``,
    ``Rep.parse(G, "16x0e + 8x1o")``, ``a + b``, ``3 * a``, ``a @ b`` (tensor product),
    ``Rep.permutation(G, points=...)``, ``Rep.from_matrices(G, fn)`` and ``rep.change_basis(Q)``.
    """

    def __init__(self, group: Group, segments: Iterable[tuple[int, Field]], perm: torch.Tensor | None = None,
                 name: str | None = None):
        merged: list[tuple[int, Field]] = []
        for c, f in segments:
            if merged and merged[-1][1] == f:
                merged[-1] = (merged[-1][0] + c, f)
            else:
                merged.append((int(c), f))
        self.group = group
        self.segments = tuple(merged)
        self.dim = sum(c * f.dim for c, f in self.segments)
        if perm is not None:
            perm = torch.as_tensor(perm, dtype=torch.long)
            if torch.equal(perm, torch.arange(self.dim)):
                perm = None
        self.perm = perm
        self._name = name

    # ---- identity -------------------------------------------------------------------------
    def _key(self):
        return (self.group, self.segments, None if self.perm is None else tuple(self.perm.tolist()))

    def __eq__(self, other):
        return isinstance(other, Rep) and self._key() == other._key()

    def __hash__(self):
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:  # reps are immutable; plans are cached by rep, so hash once
        return hash(self._key())

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
        out = torch.zeros(g.shape[:-2] + (self.dim, self.dim), dtype=torch.float64, device=g.device)
        o = 0
        for c, f in self.segments:
            M = f.matrix(g)
            for _ in range(c):
                out[..., o : o + f.dim, o : o + f.dim] = M
                o += f.dim
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
        Q = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        slots, o = [], 0
        for c, f in self.segments:
            Qf = torch.eye(f.dim, dtype=torch.float64) if f.Q is None else f.Q
            for _ in range(c):
                Q[o : o + f.dim, o : o + f.dim] = Qf
                slots += f.slots
                o += f.dim
        if self.perm is not None:
            Q = Q[self._inverse_perm]
        return Q, slots

    @property
    def change_of_basis(self) -> torch.Tensor:
        """Orthogonal ``Q`` ``[dim, dim]`` with ``matrix(g) = Q @ blockdiag(irreps(g)) @ Q.T``, the block
        diagonal listing, for each ``(irrep, mult)`` of ``self.irreps`` in order, ``mult`` copies."""
        Q, slots = self._structured_basis
        order = {ir: i for i, (ir, _) in enumerate(self.irreps)}
        offsets, o = [], 0
        for s in slots:
            offsets.append((order[s], o, s.dim))
            o += s.dim
        cols = [torch.arange(o, o + d) for _, o, d in sorted(offsets, key=lambda t: t[0])]
        return Q[:, torch.cat(cols)] if cols else Q

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
            perm = torch.cat([self._perm_or_arange(), other._perm_or_arange() + self.dim])
        return Rep(self.group, self.segments + other.segments, perm)

    def __radd__(self, other):
        if isinstance(other, int) and other == 0:  # so that sum([...]) works
            return self
        return NotImplemented

    def __mul__(self, n: int) -> "Rep":
        """``n`` copies (the direct sum ``self + ... + self``)."""
        if isinstance(n, bool) or not isinstance(n, int):
            return NotImplemented
        if n < 1:
            raise ValueError(f"multiplicity must be >= 1, got {n}")
        out = self
        for _ in range(n - 1):
            out = out + self
        return out

    __rmul__ = __mul__

    def __matmul__(self, other: "Rep") -> "Rep":
        """Tensor product; coordinate ``(i, j)`` is ``i * other.dim + j`` (Kronecker order)."""
        self._same_group(other, "tensor")
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
        Qs, slots = self._structured_basis
        inner = self
        field = Field(self.group, slots, Q @ Qs, lambda g: Q @ inner.matrix(g, check=False) @ Q.T,
                      name=f"changed_basis({self!r})")
        return Rep(self.group, [(1, field)])

    # ---- constructors ---------------------------------------------------------------------
    @classmethod
    def from_matrices(cls, group: Group, fn: Callable[[torch.Tensor], torch.Tensor],
                      band_limit: int | None = None, name: str | None = None) -> "Rep":
        """A representation from a user-supplied homomorphism ``fn(g: [..., dG, dG]) -> [..., d, d]``.

        It is decomposed into irreps numerically. ``band_limit`` bounds the frequencies
        (continuous groups; searched up to 32 if not given). Raises ``ValueError`` if ``fn``
        is not orthogonal or not a homomorphism.
        """
        _check_group(group)
        probe = fn(group.identity()[None])
        if not isinstance(probe, torch.Tensor) or probe.dim() != 3 or probe.shape[0] != 1 or probe.shape[1] != probe.shape[2]:
            raise ValueError("fn must map [..., d_G, d_G] elements to a tensor of shape [..., d, d]")
        dim = probe.shape[-1]

        def f64(g):
            return fn(g).to(torch.float64)

        check_representation(group, f64, dim)
        if group.is_finite or band_limit is not None:
            slots, Q = decompose(group, f64, dim, band_limit)
        else:
            for L in range(1, 33 if group.ambient_dim == 2 else 11):
                try:
                    slots, Q = decompose(group, f64, dim, L)
                    break
                except ValueError:
                    continue
            else:
                raise ValueError(f"fn does not decompose into irreps of {group} of frequency <= {L}")
        name = name or "from_matrices"
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
        if (points is None) == (action is None):
            raise ValueError("give exactly one of points= or action=")
        if points is not None:
            pts = torch.as_tensor(points, dtype=torch.float64)
            if pts.dim() != 2 or pts.shape[1] != group.ambient_dim:
                raise ValueError(f"points must have shape [n, {group.ambient_dim}], got {tuple(pts.shape)}")
            size = len(pts)
            scale = max(float(pts.abs().max()), 1.0)

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

        def fn(g):
            sigma = action(g)
            if sigma.shape != g.shape[:-2] + (n,):
                raise ValueError(f"action must return shape [..., {n}], got {tuple(sigma.shape)}")
            # column i has its 1 in row sigma(i)
            return torch.nn.functional.one_hot(sigma, n).transpose(-1, -2).to(torch.float64)

        return cls.from_matrices(group, fn, band_limit=0 if not group.is_finite else None,
                                 name=name or f"permutation({n})")

    @classmethod
    def parse(cls, group: Group, s: str) -> "Rep":
        """Parse ``"16x0e + 8x1o"`` (O(3)), ``"4x0 + 2x1"`` (SO(2), C_N, SO(3)), ``"2x(0,0) + (1,2)"``
        (O(2), D_N), ``"A1g + 3xT1u"`` (octahedral). ``"regular"``, ``"standard"`` and ``"trivial"``
        are accepted as terms (``"4xregular + 2x0"``)."""
        if not isinstance(s, str):
            raise TypeError(f"expected a string, got {type(s).__name__}")
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
    def from_escnn(cls, field_type) -> "Rep":
        """The rep of an escnn ``FieldType`` in equiproj's conventions (docs/interop.md): the escnn
        element with base-space action ``A`` is ``g = S A S`` (``S = diag(1, -1)`` or ``diag(1, -1, -1)``)
        and ``rep.matrix(g)`` equals ``field_type.representation`` at that element (checked on
        conversion); one field per escnn field, with its irreps and change of basis. Needs escnn;
        SO(2), O(2), C_N, D_N, SO(3) and O(3)."""
        if _ESCNN_CONVERTER is None:
            raise RuntimeError("Rep.from_escnn needs equiproj.groups loaded (import equiproj.groups)")
        return _ESCNN_CONVERTER(field_type)


#: Rep.from_escnn's implementation, set by equiproj.groups._escnn when the package loads (it needs the
#: group classes, which import this module; escnn itself is imported only when called)
_ESCNN_CONVERTER = None


def check_rep_pair(rep_in, rep_out) -> None:
    """Raise ``TypeError`` unless both are :class:`Rep`, ``ValueError`` unless they are of one group."""
    for name, r in (("rep_in", rep_in), ("rep_out", rep_out)):
        if not isinstance(r, Rep):
            raise TypeError(f"{name} must be an equiproj Rep, got {type(r).__name__}")
    if rep_in.group != rep_out.group:
        raise ValueError(f"rep_in acts by {rep_in.group} but rep_out by {rep_out.group}: they must be the same group")


def _check_group(group) -> None:
    # duck-typed: the group classes build their irreps from this module, so it cannot import them
    if not (callable(getattr(group, "irreps", None)) and callable(getattr(group, "haar_quadrature", None))):
        raise TypeError(f"group must be an equiproj Group, got {type(group).__name__}")


def _check_orthogonal(Q, dim, name):
    if not isinstance(Q, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor")
    if Q.shape != (dim, dim):
        raise ValueError(f"{name} must have shape [{dim}, {dim}], got {tuple(Q.shape)}")
    Q = Q.to(torch.float64).cpu()
    err = (Q.T @ Q - torch.eye(dim, dtype=torch.float64)).abs().amax()
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

    def __repr__(self):
        return f"Irrep({self.group}, {self.group.irrep_name(self.id)})"

    def __str__(self):
        return self.group.irrep_name(self.id)

    @property
    def endomorphism_basis(self) -> torch.Tensor:
        """``[r, d, d]``: a Frobenius-orthonormal basis of End_G(psi), the matrices commuting with
        every ``psi(g)``; r = 1, 2, 4 for real, complex, quaternionic type. The first is ``I/sqrt(d)``."""
        return _endomorphism_basis(self)


@functools.lru_cache(maxsize=None)
def _endomorphism_basis(irrep: Irrep) -> torch.Tensor:
    d = irrep.dim
    gens = irrep.matrix(irrep.group.generators(), check=False)
    # vec(X) with X psi(h) = psi(h) X  <=>  (psi(h) ⊗ I - I ⊗ psi(h)^T) vec(X) = 0 (row-major vec)
    A = torch.cat([torch.kron(p, torch.eye(d, dtype=torch.float64)) - torch.kron(torch.eye(d, dtype=torch.float64), p.T.contiguous())
                   for p in gens])
    _, S, Vh = torch.linalg.svd(A)
    null = Vh[(S > 1e-9 * max(1.0, float(S[0]))).sum():]
    r = len(null)
    expected = {"real": 1, "complex": 2, "quaternionic": 4}[irrep.type]
    if r != expected:
        raise RuntimeError(f"{irrep}: commutant has dimension {r}, expected {expected} for {irrep.type} type")
    # Gram-Schmidt starting from the identity, for a canonical first element
    basis = [torch.eye(d, dtype=torch.float64).reshape(-1) / d**0.5]
    for v in null:
        for b in basis:
            v = v - (b @ v) * b
        if v.norm() > 1e-6:
            basis.append(v / v.norm())
    return torch.stack(basis[:r]).reshape(r, d, d)


@functools.lru_cache(maxsize=None)
def tensor_field(fa: Field, fb: Field) -> Field:
    """The field of ``fa ⊗ fb`` (Kronecker order), decomposed per slot pair with the cached
    Clebsch-Gordan blocks of :func:`equiproj.clebsch_gordan.irrep_product`."""
    group = fa.group

    def matrix_fn(g):
        A, B = fa.matrix(g), fb.matrix(g)
        return torch.einsum("...ij,...kl->...ikjl", A, B).reshape(g.shape[:-2] + (fa.dim * fb.dim,) * 2)

    # spectral of a ⊗ b: per slot pair (s, t) the CG decomposition of psi_s ⊗ psi_t
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
    Q = torch.kron(Qa, Qb) @ Qk
    return Field(group, slots, Q, matrix_fn, name=f"({fa.name}⊗{fb.name})", key=("tensor", fa, fb))


def structured_check(rep: Rep, g: torch.Tensor) -> float:
    """Max deviation of ``rep.matrix(g)`` from ``Q ⊕psi(g) Q^T`` (for tests/diagnostics)."""
    Q, slots = rep._structured_basis
    return float((rep.matrix(g) - Q @ block_diag_irreps(slots, g) @ Q.T).abs().amax())
