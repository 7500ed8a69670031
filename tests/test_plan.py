"""Unit tests of the block plan (``equiproj/_plan.py``): SidePlan, field pairs, PackedPlan.

Every expectation is computed independently of the plan: coverage by painting the matrix, the
commutant dimension by characters (``group.haar_quadrature``), equivariance from the fields' own
matrix functions, and the projection from the spatial-domain reference (``equiproj.reference``).

Coordinates: the plan works in *structured* coordinates, ``W_struct = W[perm_out][:, perm_in]``
(structured coordinate i holds user coordinate ``perm[i]``), where ``rho(g)[perm][:, perm]`` is
block diagonal over the rep's segments, each segment ``c`` copies of its field's ``matrix(g)``.
A field pair's basis is in the coordinates of the two fields (``Field.matrix``), not the irrep basis.
"""

from __future__ import annotations

import pytest
import torch

import equiproj as ep
from equiproj import reference
from equiproj._plan import (BlockPlan, FieldPair, OrbitForm, PackedPlan, PlanColumn, PlanRow, SidePlan, block_plan,
                            packed_plan)
from equiproj.kernels import torch_project
from equiproj.testing import nearly_equivariant, random_orthogonal

F64 = torch.float64


# ---- cases: (rep_in, rep_out), built from a generator ----------------------------------------------
def _sums(gen):
    G = ep.SO3()
    return ep.Rep.parse(G, "3x0 + 2x1 + 2"), ep.Rep.parse(G, "2x0 + 1 + 2x2 + 3")


def _o3_sums(gen):
    G = ep.O3()
    return ep.Rep.parse(G, "2x0e + 1o + 1e + 2x2e"), ep.Rep.parse(G, "0e + 2x1o + 2e + 0o")


def _regular_c4(gen):
    G = ep.Cyclic(4)
    return G.regular(), G.regular() + 2 * G.trivial() + G.irrep(1)


def _regular_d4(gen):
    G = ep.Dihedral(4)
    return G.regular(), G.standard() + G.regular() + G.irrep((1, 2))


def _so3_tensor_perm(gen):
    G = ep.SO3()
    t = ep.Rep.parse(G, "0 + 1") @ ep.Rep.parse(G, "1 + 2")
    assert t.perm is not None
    return t, ep.Rep.parse(G, "0 + 2x1 + 2") + G.irrep(1) @ G.irrep(1)


def _change_basis(gen):
    G = ep.O3()
    a = ep.Rep.parse(G, "0e + 2x1o + 2e")
    b = ep.Rep.parse(G, "1o + 2x0e + 1e")
    return a.change_basis(random_orthogonal(a.dim, gen)), 2 * b.change_basis(random_orthogonal(b.dim, gen))


def _so2_mixed(gen):
    return ep.testing.mixed_reps(ep.SO2(), gen)


def _octahedral_disjoint(gen):
    G = ep.Octahedral()
    return ep.Rep.parse(G, "2xA1 + E"), ep.Rep.parse(G, "T1 + 3xT2")  # no shared irrep: r = 0 everywhere


CASES = {f.__name__[1:]: f for f in (_sums, _o3_sums, _regular_c4, _regular_d4, _so3_tensor_perm, _change_basis,
                                     _so2_mixed, _octahedral_disjoint)}


@pytest.fixture(params=sorted(CASES))
def case(request, gen):
    rep_in, rep_out = CASES[request.param](gen)
    return rep_in, rep_out


def _perm(rep):
    return rep.perm if rep.perm is not None else torch.arange(rep.dim)


def _segment_fields(rep):
    """``{offset: (copies, field)}`` of the rep's segments, structured coordinates."""
    out, o = {}, 0
    for c, f in rep.segments:
        out[o] = (c, f)
        o += c * f.dim
    assert o == rep.dim
    return out


def _field_band(f) -> int:
    return max(s.band for s in f.slots)


def _hom_dim_by_characters(group, fi, fo) -> float:
    """dim Hom_G(fi, fo) = ∫ chi_in(g) chi_out(g) dg (real characters), exact quadrature."""
    g, w = group.haar_quadrature(_field_band(fi) + _field_band(fo))
    chi_i = fi.matrix(g).diagonal(dim1=-2, dim2=-1).sum(-1)
    chi_o = fo.matrix(g).diagonal(dim1=-2, dim2=-1).sum(-1)
    return float((w * chi_i * chi_o).sum())


# ---- caching and errors ----------------------------------------------------------------------------
def test_block_plan_is_cached_per_rep_pair():
    G = ep.SO3()
    a, b = ep.Rep.parse(G, "2x0 + 1"), ep.Rep.parse(G, "1 + 2")
    P = block_plan(a, b)
    assert isinstance(P, BlockPlan)
    assert block_plan(a, b) is P
    # equal reps built separately hit the same entry
    assert block_plan(ep.Rep.parse(G, "2x0 + 1"), ep.Rep.parse(G, "1 + 2")) is P
    assert block_plan(b, a) is not P
    assert P.field_pairs is P.field_pairs and P.packed_cpu is P.packed_cpu
    assert P.packed("cpu", F64) is P.packed("cpu", F64)
    assert P.packed("cpu", torch.float32) is not P.packed("cpu", F64)
    assert packed_plan(a, b, "cpu") is P.packed("cpu", F64)


def test_block_plan_errors():
    G = ep.SO3()
    with pytest.raises(TypeError):
        block_plan(G.irrep(1), "1")
    with pytest.raises(ValueError, match="acts by"):
        block_plan(G.irrep(1), ep.O3().irrep((1, -1)))


# ---- the side plans --------------------------------------------------------------------------------
def test_side_plan_matches_the_rep(case, gen):
    for rep in case:
        S = SidePlan.build(rep)
        assert S.dim == rep.dim
        if rep.perm is None:
            assert S.perm is None
        else:
            assert torch.equal(S.perm, rep.perm)
        fields = _segment_fields(rep)
        assert [(fb.offset, fb.copies, fb.dim) for fb in S.fields] == [(o, c, f.dim) for o, (c, f) in fields.items()]
        for fb, (c, f) in zip(S.fields, fields.values()):
            assert fb.slots == f.slots
        # structured layout: rho(g)[perm][:, perm] is block diagonal, c copies of each field's matrix
        g = rep.group.sample(3, generator=gen)
        p = _perm(rep)
        R = rep.matrix(g)[:, p][:, :, p]
        expect = torch.zeros_like(R)
        for fb, (c, f) in zip(S.fields, fields.values()):
            M = f.matrix(g)
            for u in range(c):
                o = fb.offset + u * fb.dim
                expect[:, o : o + fb.dim, o : o + fb.dim] = M
                # each field is Q (⊕ slots) Q^T in its own coordinates
                Q = torch.eye(fb.dim, dtype=F64) if fb.Q is None else fb.Q
                torch.testing.assert_close(Q.T @ Q, torch.eye(fb.dim, dtype=F64), atol=1e-12, rtol=0)
                D = torch.zeros(3, fb.dim, fb.dim, dtype=F64)
                so = 0
                for s in fb.slots:
                    D[:, so : so + s.dim, so : so + s.dim] = s.matrix(g)
                    so += s.dim
                torch.testing.assert_close(Q @ D @ Q.T, M, atol=1e-10, rtol=0)
        torch.testing.assert_close(R, expect, atol=1e-12, rtol=0)
        # spectral coordinates: each once, typed, with the rep's multiplicities
        seen = torch.cat([r.reshape(-1) for r in S.rows.values()])
        assert sorted(seen.tolist()) == list(range(rep.dim))
        for s, rows in S.rows.items():
            assert rows.shape[1] == s.dim
            assert (S.coord_type[rows.reshape(-1)] == S.types.index(s)).all()
        assert {s: len(rows) for s, rows in S.rows.items()} == dict(rep.irreps)
        assert S.types == [s for s, _ in rep.irreps]


def test_shared_types_and_bases(case):
    rep_in, rep_out = case
    P = block_plan(rep_in, rep_out)
    ins, outs = {s for s, _ in rep_in.irreps}, {s for s, _ in rep_out.irreps}
    assert set(P.shared) == ins & outs and len(P.shared) == len(set(P.shared))
    assert P.disjoint == (not (ins & outs))
    assert P.shape == (rep_out.dim, rep_in.dim)
    r_of = {"real": 1, "complex": 2, "quaternionic": 4}
    for s in P.shared:
        C = P.bases[s]
        assert C.shape == (r_of[s.type], s.dim, s.dim)


# ---- field pairs -----------------------------------------------------------------------------------
def _paint(m, n, rows: list[PlanRow]) -> torch.Tensor:
    cover = torch.zeros(m, n, dtype=torch.long)
    for r in rows:
        rows = slice(r.out_offset, r.out_offset + r.out_copies * r.d_out)
        cover[rows, r.in_offset : r.in_offset + r.in_copies * r.d_in] += 1
    return cover


def test_field_pairs_tile_the_matrix_once(case):
    rep_in, rep_out = case
    P = block_plan(rep_in, rep_out).packed_cpu
    assert (P.m, P.n) == (rep_out.dim, rep_in.dim)
    cover = _paint(P.m, P.n, P.rows())
    assert int(cover.min()) == 1 and int(cover.max()) == 1, f"coverage counts {cover.unique().tolist()}"
    # one pair per (output segment, input segment)
    assert len(P.rows()) == len(rep_out.segments) * len(rep_in.segments)


def test_field_pair_bases_are_orthonormal_equivariant_and_complete(case, gen):
    rep_in, rep_out = case
    group = rep_in.group
    BP = block_plan(rep_in, rep_out)
    outs, ins = _segment_fields(rep_out), _segment_fields(rep_in)
    g = group.sample(4, generator=gen)
    total_rank = 0
    for fp in BP.field_pairs:
        assert isinstance(fp, FieldPair)
        co, fo = outs[fp.out_offset]
        ci, fi = ins[fp.in_offset]
        assert (fp.out_copies, fp.d_out, fp.in_copies, fp.d_in) == (co, fo.dim, ci, fi.dim)
        A = fp.basis
        r = A.shape[0]
        assert A.dtype == F64 and A.shape == (r, fo.dim, fi.dim)
        # the rank is dim Hom_G(field_in, field_out), from characters
        hom = _hom_dim_by_characters(group, fi, fo)
        assert abs(hom - r) < 1e-8, f"{fi} -> {fo}: r = {r}, characters say {hom}"
        total_rank += r * co * ci
        if not r:
            continue
        flat = A.reshape(r, -1)
        torch.testing.assert_close(flat @ flat.T, torch.eye(r, dtype=F64), atol=1e-12, rtol=0)
        Mo, Mi = fo.matrix(g), fi.matrix(g)  # [4, d, d]
        lhs = torch.einsum("gab,kbc->gkac", Mo, A)
        rhs = torch.einsum("kab,gbc->gkac", A, Mi)
        torch.testing.assert_close(lhs, rhs, atol=1e-10, rtol=0)
    # the dimension of all equivariant maps rep_in -> rep_out, by characters of the whole reps
    gq, w = group.haar_quadrature(rep_in.band_limit + rep_out.band_limit)
    chi = lambda rep: rep.matrix(gq).diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    assert abs(float((w * chi(rep_in) * chi(rep_out)).sum()) - total_rank) < 1e-8


# ---- the packed plan -------------------------------------------------------------------------------
def test_packed_plan_matches_field_pairs(case):
    rep_in, rep_out = case
    BP = block_plan(rep_in, rep_out)
    P = BP.packed_cpu
    assert isinstance(P, PackedPlan)
    assert P.meta.dtype == torch.long and P.meta.shape == (len(BP.field_pairs), len(PlanColumn))
    assert P.basis.dtype == F64 and P.basis.dim() == 1
    offset = 0
    for row, fp in zip(P.rows(), BP.field_pairs):
        assert isinstance(row, PlanRow)
        r = fp.basis.shape[0]
        head = (fp.out_offset, fp.in_offset, fp.out_copies, fp.in_copies, fp.d_out, fp.d_in)
        if row.orbits:  # a pair of permutation fields: as many orbits as basis matrices, orbit data in place of them
            assert tuple(row[:6]) == head and row.rank == row.orbits == r and row.basis_offset == offset
            offset += fp.d_out * fp.d_in + r if row.orbit_form in (OrbitForm.TABLE, OrbitForm.SIGNED) else 0
            continue
        assert row == head + (r, offset, 0, 0)
        chunk = P.basis[row.basis_offset : row.basis_offset + r * fp.d_out * fp.d_in]
        assert torch.equal(chunk, fp.basis.reshape(-1))
        offset += r * fp.d_out * fp.d_in
    assert P.basis.numel() == offset
    for k, c in enumerate(PlanColumn):
        assert P.meta[:, c].tolist() == [row[k] for row in P.rows()]
    assert torch.equal(P.perm_out, _perm(rep_out)) and torch.equal(P.perm_in, _perm(rep_in))
    assert P.identity_perm == (rep_in.perm is None and rep_out.perm is None)
    # pair_bases reads the same numbers back (None for an orbit pair)
    for A, fp, row in zip(P.pair_bases("cpu", F64), BP.field_pairs, P.rows()):
        assert A is None if row.orbits else torch.equal(A, fp.basis)


def test_packed_plan_to_and_caches(case):
    rep_in, rep_out = case
    P = block_plan(rep_in, rep_out).packed_cpu
    Q = P.to("cpu", torch.float32)
    assert Q is not P and (Q.m, Q.n, Q.identity_perm) == (P.m, P.n, P.identity_perm)
    assert torch.equal(Q.meta, P.meta) and Q.meta.dtype == torch.long
    assert Q.basis.dtype == torch.float32
    torch.testing.assert_close(Q.basis.double(), P.basis, atol=1e-7, rtol=0)
    assert torch.equal(Q.perm_out, P.perm_out) and torch.equal(Q.perm_in, P.perm_in)
    M = P.to("meta", torch.float32)  # a device move without a GPU
    assert M.meta.device.type == "meta" and M.basis.device.type == "meta" and M.perm_out.device.type == "meta"
    assert M.basis.dtype == torch.float32 and M.basis.shape == P.basis.shape
    # pair_bases: cached per (device, dtype), shaped [r, d_out, d_in]
    b64 = P.pair_bases("cpu", F64)
    assert P.pair_bases(torch.device("cpu"), F64) is b64
    b32 = P.pair_bases("cpu", torch.float32)
    assert b32 is not b64 and all(a is None or a.dtype == torch.float32 for a in b32)
    for A, B, row in zip(b64, b32, P.rows()):
        if row.orbits:
            assert A is None and B is None
            continue
        assert A.shape == (row.rank, row.d_out, row.d_in)
        torch.testing.assert_close(B.double(), A, atol=1e-7, rtol=0)
    assert P.rows() is P.rows()
    # permutations: None for the identity, else (perm_out, perm_in, inverses), cached
    perms = P.permutations("cpu")
    if P.identity_perm:
        assert perms is None
    else:
        assert P.permutations(torch.device("cpu")) is perms
        po, pi, ipo, ipi = perms
        assert torch.equal(po, P.perm_out) and torch.equal(pi, P.perm_in)
        assert torch.equal(po[ipo], torch.arange(P.m)) and torch.equal(ipo[po], torch.arange(P.m))
        assert torch.equal(pi[ipi], torch.arange(P.n)) and torch.equal(ipi[pi], torch.arange(P.n))


def test_packed_plan_default_dtype():
    G = ep.SO3()
    a, b = ep.Rep.parse(G, "0 + 1"), ep.Rep.parse(G, "1 + 2")
    assert packed_plan(a, b, "cpu").basis.dtype == F64
    assert packed_plan(a, b, torch.device("cpu"), torch.float32).basis.dtype == torch.float32
    assert packed_plan(a, b, "meta").basis.dtype == torch.float32  # off the CPU: what the Triton kernels read
    assert packed_plan(a, b, "cpu") is packed_plan(a, b, "cpu", F64)
    from equiproj._plan import plan_for

    assert plan_for(a, b, "cpu") is packed_plan(a, b, "cpu")


# ---- projecting with the plan ----------------------------------------------------------------------
def _assert_projection_matches(W, rep_in, rep_out, P):
    ours = torch_project(W, P)
    ref = reference.project(W, rep_in, rep_out)
    scale = W.square().sum((-2, -1)).sqrt().amax()
    assert ours.dtype == F64 and ours.shape == W.shape
    err = float((ours - ref).abs().amax() / scale)
    assert err < 1e-12, f"plan projection differs from the reference by {err:.1e} (relative to ||W||)"
    return ours, ref


def test_projection_equals_reference(case, gen):
    rep_in, rep_out = case
    P = packed_plan(rep_in, rep_out, "cpu")
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
    PW, _ = _assert_projection_matches(W, rep_in, rep_out, P)
    # P is a projection: idempotent, self-adjoint in the Frobenius inner product
    torch.testing.assert_close(torch_project(PW, P), PW, atol=1e-12 * float(W.norm()), rtol=0)
    V = torch.randn(W.shape, dtype=F64, generator=gen)
    assert abs(float((torch_project(V, P) * W).sum() - (V * PW).sum())) < 1e-11 * float(W.norm() * V.norm())
    if block_plan(rep_in, rep_out).disjoint:
        assert float(PW.abs().max()) == 0.0


def test_projection_of_nearly_equivariant_weights(case, gen):
    rep_in, rep_out = case
    if block_plan(rep_in, rep_out).disjoint:
        pytest.skip("no equivariant maps: nothing is nearly equivariant")
    P = packed_plan(rep_in, rep_out, "cpu")
    W = nearly_equivariant(torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen), rep_in, rep_out, 1e-10, gen)
    _assert_projection_matches(W, rep_in, rep_out, P)
    # the residual W - P(W), ~1e-5 ||W||, still agrees to a small relative error
    res = torch_project(W, P, which="non_equivariant")
    res_ref = W - reference.project(W, rep_in, rep_out)
    ratio = float(res_ref.square().sum() / W.square().sum())
    assert 1e-11 < ratio < 1e-9
    assert float((res - res_ref).norm() / res_ref.norm()) < 1e-6


def test_projection_of_batched_noncontiguous_weights(case, gen):
    rep_in, rep_out = case
    m, n = rep_out.dim, rep_in.dim
    P = packed_plan(rep_in, rep_out, "cpu")
    stored = torch.randn(3, n, m, dtype=F64, generator=gen)
    W = stored.transpose(-1, -2)  # [3, m, n], column-major matrices
    assert not W.is_contiguous()
    _assert_projection_matches(W, rep_in, rep_out, P)
    big = torch.randn(2, 2, 2 * m, n + 3, dtype=F64, generator=gen)
    W2 = big[:, 1, ::2, 2 : n + 2]  # strided rows, offset columns
    assert W2.shape == (2, m, n) and not W2.is_contiguous()
    ours, _ = _assert_projection_matches(W2, rep_in, rep_out, P)
    # each matrix of the batch is projected on its own
    for b in range(2):
        torch.testing.assert_close(ours[b], torch_project(W2[b].contiguous(), P), atol=1e-13, rtol=0)


# ---- caches: bounded, and hit by fresh but equal reps ---------------------------------------------
def _rss_mib() -> float:
    import os

    with open("/proc/self/statm") as f:  # tracemalloc does not see torch's allocations
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_memory_stays_flat_over_energy_calls_with_fresh_reps(gen):
    """Fresh reps compared unequal, so every call built and cached a new plan: with
    (2 * FullOctahedral().regular()).change_basis(Q) memory grew by 27 MB per call."""
    G = ep.Dihedral(3)
    Q = random_orthogonal(2 * G.order, gen)
    W = torch.randn(2 * G.order, 2 * G.order, generator=gen)
    rep = (2 * G.regular()).change_basis(Q)
    ep.energies(W, rep, rep)
    plans = block_plan.cache_info().currsize
    before = _rss_mib()
    for _ in range(10_000):
        rep = (2 * G.regular()).change_basis(Q)
        ep.energies(W, rep, rep)
    assert _rss_mib() - before <= 50
    assert block_plan.cache_info().currsize == plans


def test_package_caches_are_bounded():
    """Every cache of the groups, the plan, the grid and the kernel spaces is bounded: by bytes
    (``bytes_cached``) or, for the few caches of tiny values, by a functools ``maxsize``."""
    import functools
    import importlib

    from equiproj._caches import ByteBoundedCache

    modules = ["equiproj.groups._rep", "equiproj.groups._group", "equiproj.groups._so3", "equiproj.groups._clebsch_gordan",
               "equiproj.groups._spatial", "equiproj.groups._planar", "equiproj.groups._field", "equiproj.groups._subgroups",
               "equiproj.groups._commutant", "equiproj._plan", "equiproj.grid", "equiproj.kernel_spaces._pixel_plan",
               "equiproj.kernel_spaces._factorised", "equiproj.kernel_spaces._steerable"]
    by_bytes, by_entries = [], []
    for name in modules:
        for obj in vars(importlib.import_module(name)).values():
            if isinstance(obj, functools._lru_cache_wrapper):
                by_entries.append(obj)
                assert obj.cache_parameters()["maxsize"] is not None, f"{name}.{obj.__name__} is unbounded"
            elif isinstance(getattr(obj, "cache", None), ByteBoundedCache):
                by_bytes.append(obj)
                assert obj.cache.max_bytes < 1 << 40, f"{name}.{obj.__name__} has no byte budget"
    assert len(by_bytes) >= 20 and len(by_entries) >= 3


def test_a_plan_too_large_refuses_before_allocating_and_the_irrep_basis_recipe_works(gen, monkeypatch):
    """A field pair whose basis exceeds the plan's limit (C_512's regular rep ⊗ its standard rep, one
    field of dimension 1024: 16 GiB) is refused with a recipe; the recipe (the weight in the irrep
    basis, the reps as sums of irreps) gives the same energies."""
    import equiproj._plan as plan_module

    G = ep.Cyclic(16)
    rep = G.regular() @ G.standard()
    W = torch.randn(rep.dim, rep.dim, dtype=F64, generator=gen)
    expected = ep.energies(W, rep, rep)
    monkeypatch.setattr(plan_module, "MAX_BASIS_ELEMENTS", 32**3)
    block_plan.cache_clear()  # the plan built above would be found
    with pytest.raises(ValueError, match="W_irr = rep_out.change_of_basis.T @ W @ rep_in.change_of_basis"):
        ep.energies(W, rep, rep)
    monkeypatch.undo()
    irr = sum(m * irrep for irrep, m in rep.irreps)
    Q = rep.change_of_basis
    got = ep.energies(Q.T @ W @ Q, irr, irr)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
