"""Clebsch-Gordan decompositions of irrep tensor products, computed fast and cached in memory.

``irrep_product(a, b)`` decomposes ``a ⊗ b`` (Kronecker order: coordinate ``(i, j)`` is
``i * b.dim + j``) into the group's own irreps, ``(a ⊗ b)(g) = Q (⊕_slots psi(g)) Q^T``, the same
contract as the numerical decomposition of ``_decompose.py``, but by a small null-space
computation per candidate irrep ``psi`` instead of a Haar quadrature. An intertwiner
``X [da db, d_psi]`` with ``(a ⊗ b)(h) X = X psi(h)`` is a vector of ``a ⊗ b ⊗ psi`` fixed by every
generator ``h`` (the generators of a continuous group generate a dense subgroup, so this is
the same space). The fixed vectors of the group's torus element (``group.torus_element()``, whose
irrep matrices are block diagonal with blocks of size <= 2; SO(3)/O(3): a rotation about the
harmonics' polar axis y) are found block triple by block triple; the other generators are then
imposed on that much smaller subspace. Candidates that the group's selection rules exclude
(``group.product_may_contain``: SO(3)/O(3) triangle rule and parity; SO(2)/O(2) frequencies
``|ka - kb|``, ``ka + kb``) are skipped. The space has dimension ``mult * r``
(``r`` = 1, 2, 4 for real, complex, quaternionic type); a Gram-Schmidt over the commutant extracts
``mult`` isometric intertwiners, which become Q's columns. For SO(3)/O(3) these are the
real-basis Clebsch-Gordan coefficients of the library's harmonics (e3nn's basis, checked
against ``e3nn.o3.wigner_3j`` up to sign in the tests), one copy of each ``|l1 - l2| <= l <= l1 + l2``.

Results live in a bounded ``functools.lru_cache`` (memory only: nothing is written to or read from disk)
and are verified against ``a.matrix(g) ⊗ b.matrix(g)`` at random elements before being cached.

Tensor products of reps (``a @ b``, ``tensor_field`` in ``_field.py``) are built from these blocks;
:func:`equiproj.groups.clebsch_gordan` returns the SO(3) coefficients as a tensor.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.linalg
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from .._caches import bytes_cached
from ._decompose import block_diag_irreps, isometric_intertwiners
from ._threads import one_thread

__all__ = ["irrep_product", "MAX_PRODUCT_DIM"]

#: the largest tensor product of two irreps decomposed (the null spaces cost about its square: SO(3)
#: 7 ⊗ 7, dimension 225, takes about a second on one core; 10 ⊗ 10 took 19 s)
MAX_PRODUCT_DIM = 225


def _null_space(A: torch.Tensor, what: str) -> torch.Tensor:
    """Orthonormal basis ``[k, n]`` of the null space of ``A [r, n]``; requires a clear spectral gap."""
    full = A.shape[0] < A.shape[1]
    try:
        _, S, Vh = torch.linalg.svd(A, full_matrices=full)
    except torch.linalg.LinAlgError:  # LAPACK's divide and conquer (gesdd) can fail on many equal singular values
        _, S, Vh = (torch.from_numpy(x) for x in scipy.linalg.svd(A.numpy(), full_matrices=full, lapack_driver="gesvd"))
    S = torch.cat([S, S.new_zeros(Vh.shape[0] - len(S))])
    scale = max(1.0, float(S[0])) if len(S) else 1.0
    null = S < 1e-9 * scale
    rest = S[~null]
    if len(rest) and not float(rest.min()) > 1e-6 * scale:
        raise RuntimeError(f"{what}: null space not separated from the spectrum (smallest non-zero singular value "
                           f"{float(rest.min()):.1e})")
    return Vh[null]


def _kron_matrices(a: Irrep, b: Irrep, g: torch.Tensor) -> torch.Tensor:
    A, B = a.matrix(g, check=False), b.matrix(g, check=False)
    return torch.einsum("...ij,...kl->...ikjl", A, B).reshape(g.shape[:-2] + (a.dim * b.dim,) * 2)


def _blocks(M: torch.Tensor) -> list[torch.Tensor]:
    """Index sets of the diagonal blocks of ``M`` (connected components of its non-zero pattern)."""
    nz = ((M.abs() > 1e-12) | (M.abs().T > 1e-12)).numpy()
    n, label = connected_components(csr_matrix(nz), directed=False)
    return [torch.from_numpy(np.flatnonzero(label == c)) for c in range(n)]


@bytes_cached("equiproj.groups._clebsch_gordan._fixed_matrices")
def _fixed_matrices(psi: Irrep) -> tuple[torch.Tensor, torch.Tensor]:
    """``psi`` at the torus element h1 ``[d, d]`` and at the remaining generators ``[h, d, d]`` (cached)."""
    h1, rest = _constraint_elements(psi.group)
    return psi.matrix(h1, check=False), psi.matrix(rest, check=False)


def _constraint_elements(group) -> tuple[torch.Tensor, torch.Tensor]:
    gens = group.generators()
    h1 = group.torus_element()
    return (gens[0], gens[1:]) if h1 is None else (h1, gens)


def _invariants(factors_h1: list[torch.Tensor], factors_gens: list[torch.Tensor]) -> torch.Tensor:
    """Orthonormal basis ``[k, N]`` of the vectors of ``R^{d1} ⊗ R^{d2} ⊗ R^{d3}`` fixed by
    ``F1(h) ⊗ F2(h) ⊗ F3(h)`` for the element h1 and every generator.

    ``factors_h1``: the three ``[d_i, d_i]`` matrices at h1, block diagonal with small blocks: the
    fixed space of h1 is found block triple by block triple (tiny problems); the generators'
    constraints are then solved on that subspace only (``factors_gens``: three ``[h, d_i, d_i]``).
    """
    dims = [F.shape[0] for F in factors_h1]
    N = dims[0] * dims[1] * dims[2]
    grouped = []  # per factor: {block size: (matrices [n, s, s], indices [n, s])}
    for F in factors_h1:
        g: dict[int, list] = {}
        for I in _blocks(F):
            g.setdefault(len(I), []).append(I)
        grouped.append({sz: (torch.stack([F[I][:, I] for I in Is]), torch.stack(Is)) for sz, Is in g.items()})
    by_size = []
    for M1, I1 in grouped[0].values():
        for M2, I2 in grouped[1].values():
            for M3, I3 in grouped[2].values():
                n1, n2, n3 = len(M1), len(M2), len(M3)
                S = M1.shape[-1] * M2.shape[-1] * M3.shape[-1]
                s12 = M1.shape[-1] * M2.shape[-1]
                K12 = (M1[:, None, :, None, :, None] * M2[None, :, None, :, None, :]).reshape(n1 * n2, s12, s12)
                subs = (K12[:, None, :, None, :, None] * M3[None, :, None, :, None, :]).reshape(n1 * n2 * n3, S, S)
                pos = ((I1[:, None, None, :, None, None] * dims[1] + I2[None, :, None, None, :, None]) * dims[2]
                       + I3[None, None, :, None, None, :]).reshape(n1 * n2 * n3, S)
                by_size.append((subs, pos))
    cols = []
    for subs, pos in by_size:
        n = subs.shape[-1]
        # fixed vectors of the orthogonal T: null space of the PSD 2I - T - T^T
        lam, V = torch.linalg.eigh(2 * torch.eye(n, dtype=subs.dtype) - subs - subs.transpose(-1, -2))
        sel = (lam < 1e-9).nonzero()  # (block triple, eigen index)
        if len(sel):
            Ug = torch.zeros(N, len(sel), dtype=torch.float64)
            where = pos[sel[:, 0]]  # [k, n] positions in R^N
            Ug[where, torch.arange(len(sel))[:, None].expand_as(where)] = V[sel[:, 0], :, sel[:, 1]]
            cols.append(Ug)
    if not cols:
        return torch.zeros(0, N, dtype=torch.float64)
    U = torch.cat(cols, 1)  # [N, k1]: disjoint supports, so orthonormal columns
    if not len(factors_gens[0]):
        return U.T
    X = U.T.reshape(-1, *dims)
    residuals = []
    for F1, F2, F3 in zip(*factors_gens):
        TX = (F1 @ X.reshape(len(X), dims[0], -1)).reshape(len(X), dims[0], dims[1], dims[2])
        TX = (F2 @ TX.transpose(1, 2).reshape(len(X), dims[1], -1)).reshape(len(X), dims[1], dims[0], dims[2])
        TX = (TX.transpose(1, 2) @ F3.T).reshape(len(X), N)
        residuals.append(TX.T - U)
    null = _null_space(torch.cat(residuals), "invariants")  # [k, k1]
    return null @ U.T


@bytes_cached("equiproj.groups._clebsch_gordan.irrep_product")
@one_thread
def irrep_product(a: Irrep, b: Irrep) -> tuple[tuple[Irrep, ...], torch.Tensor]:
    """``(slots, Q)`` with ``a(g) ⊗ b(g) = Q (⊕_slots psi(g)) Q^T``; Q ``[da db, da db]`` float64 orthogonal.

    Cached in memory per pair. Raises ``ValueError`` for irreps of different groups.
    """
    if not (_is_irrep(a) and _is_irrep(b)):
        raise TypeError("irrep_product takes two Irrep objects")
    if a.group != b.group:
        raise ValueError(f"irreps of different groups: {a.group} and {b.group}")
    group = a.group
    n = a.dim * b.dim
    if n > MAX_PRODUCT_DIM:
        raise ValueError(f"{a} ⊗ {b} has dimension {n}: equiproj decomposes tensor products of irreps numerically, "
                         f"which takes too long above dimension {MAX_PRODUCT_DIM} (SO(3): degrees 7 ⊗ 7); declare "
                         "the irreps the product contains instead (for SO(3): every degree |a - b| <= l <= a + b once), "
                         "in their own coordinates")
    slots, cols, total = [], [], 0
    for psi in group.irreps(None if group.is_finite else a.band + b.band):
        if not group.product_may_contain(psi, a, b):
            continue
        d = psi.dim
        # an intertwiner X [n, d] (a ⊗ b)(h) X = X psi(h) is a fixed vector of a ⊗ b ⊗ psi
        mats = [_fixed_matrices(r) for r in (a, b, psi)]
        fixed = _invariants([m[0] for m in mats], [m[1] for m in mats])
        if not len(fixed):
            continue
        r = psi.endomorphism_basis.shape[0]
        if len(fixed) % r:
            raise RuntimeError(f"{a} ⊗ {b}: intertwiner space to {psi} has dimension {len(fixed)}, not a multiple of {r}")
        m = len(fixed) // r
        cols.append(isometric_intertwiners(fixed.reshape(-1, n, d), m, d))
        slots += [psi] * m
        total += m * d
    if total != n:
        raise RuntimeError(f"{a} ⊗ {b}: found {total} of {n} dimensions in irreps of {group}")
    Q = torch.cat(cols, dim=-1)
    U, _, Vh = torch.linalg.svd(Q)  # snap to the nearest orthogonal matrix
    Q = U @ Vh
    g = group.sample(6, generator=torch.Generator().manual_seed(7))
    err = (_kron_matrices(a, b, g) - Q @ block_diag_irreps(slots, g) @ Q.T).abs().amax()
    if not err < 1e-9:
        raise RuntimeError(f"{a} ⊗ {b}: decomposition inaccurate (error {float(err):.1e})")
    return tuple(slots), Q


def _is_irrep(x) -> bool:
    # duck-typed: Irrep (in _rep.py) builds its tensor products from this module
    return hasattr(x, "endomorphism_basis") and hasattr(x, "group")
