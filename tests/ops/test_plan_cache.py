"""The C++ kernel's cache of host plans and checked permutations (``csrc/fused_energies.cpp``).

The op keeps the host form of a plan (float64 basis, transposed basis copies, orbit tables, output
groups) and each checked permutation across calls, keyed by the tensors' addresses, version
counters, dtypes, sizes and strides, with a weak reference to those tensors (an entry whose tensors
were freed is dropped, and holds no memory of theirs). These tests check that a cached plan gives bitwise the results
of a freshly built one, that plans interleave, that a plan or permutation changed in place is read
again, and that more distinct plans than the cache holds stay correct. Results are compared with
the float64 spatial-domain reference (``equiproj.reference``) at relative tolerance 1e-10 for
float64 weights, as in test_cpp.py.
"""

from __future__ import annotations

import pytest
import torch

import equiproj
from equiproj import ops, reference
from equiproj._plan import block_plan
from equiproj.groups import Rep

pytestmark = pytest.mark.skipif(not ops.cpp_available(), reason="the C++ extension equiproj._C is not built")

TOL = 1e-10  # float64 weights: every tile in float64, energies returned in float64


def _permuted_reps():
    G = equiproj.SO2()  # a tensor product of sums carries a column permutation
    return Rep.parse(G, "0 + 1") @ Rep.parse(G, "1 + 2"), Rep.parse(G, "2x0 + 3x1 + 2")


def _so3_reps():
    G = equiproj.SO3()  # trace-form pairs (A = I/sqrt(d)) and r = 0 pairs
    return Rep.parse(G, "3x0 + 2x1 + 2"), Rep.parse(G, "2x0 + 1 + 3x2")


def _plan(ri, ro):
    return block_plan(ri, ro).packed("cpu", torch.float64)


def _call(W, meta, basis, perm_out, perm_in, cp=None, cg=None):
    """(E_perp, E_G, grad or None) of one weight."""
    lp, lg = ([cp], [cg]) if cp is not None else ([], [])
    grads = [torch.empty(W.shape, dtype=W.dtype)] if cp is not None else []
    ep, eg = torch.ops.equiproj.fused_energies([W], [meta], [basis], [perm_out], [perm_in], lp, lg, grads, False)
    return ep, eg, grads[0] if grads else None


def _call_plan(W, P, cp=None, cg=None):
    return _call(W, P.meta, P.basis, P.perm_out, P.perm_in, cp, cg)


def _check_reference(W, ri, ro, ep, eg, g=None, cp=None, cg=None):
    PW = reference.project(W, ri, ro)
    R = W - PW
    for e, r in ((ep, R.square().sum((-2, -1))), (eg, PW.square().sum((-2, -1)))):
        err = float(((e - r.reshape(-1)).abs() / r.abs().reshape(-1).clamp_min(1e-300)).max())
        assert err <= TOL, f"relative error {err:.2e}"
    if g is not None:
        ref = 2 * cp[..., None, None] * R + 2 * cg[..., None, None] * PW
        assert torch.allclose(g, ref, rtol=1e-12, atol=1e-12 * float(W.abs().max()))


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b) if x is not None)


def test_repeated_call_equals_fresh_build(gen):
    ri, ro = _permuted_reps()
    P = _plan(ri, ro)
    W = torch.randn(2, ro.dim, ri.dim, generator=gen, dtype=torch.float64)
    cp, cg = torch.rand(2, generator=gen, dtype=torch.float64), torch.rand(2, generator=gen, dtype=torch.float64)
    torch.ops.equiproj_cpu.clear_plan_caches()
    first = _call_plan(W, P, cp, cg)  # built
    assert torch.ops.equiproj_cpu.plan_cache_size() == 1
    second = _call_plan(W, P, cp, cg)  # from the cache
    assert torch.ops.equiproj_cpu.plan_cache_size() == 1
    assert _same(first, second)
    _check_reference(W, ri, ro, *second, cp, cg)


def test_interleaved_plans(gen):
    plans = []
    for reps in (_permuted_reps(), _so3_reps()):
        ri, ro = reps
        W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64)
        plans.append((ri, ro, _plan(ri, ro), W, _call_plan(W, _plan(ri, ro))))  # first results from other tensors
    for _ in range(3):
        for ri, ro, P, W, expected in plans:
            got = _call_plan(W, P)
            assert _same(got, expected)
            _check_reference(W, ri, ro, *got)


def test_accumulating_and_writing_calls_share_a_plan(gen):
    """The cached plan serves calls that add the gradient in place and calls that write it."""
    ri, ro = _so3_reps()
    P = _plan(ri, ro)
    W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64)
    cp, cg = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.2, dtype=torch.float64)
    _, _, g = _call_plan(W, P, cp, cg)
    for _ in range(2):
        out = torch.randn(W.shape, generator=gen, dtype=torch.float64)
        start = out.clone()
        torch.ops.equiproj.fused_energies([W], [P.meta], [P.basis], [P.perm_out], [P.perm_in], [cp], [cg], [out], True)
        torch.testing.assert_close(out, start + g, rtol=1e-14, atol=1e-14)
        _, _, g2 = _call_plan(W, P, cp, cg)
        assert torch.equal(g2, g)


def test_meta_changed_in_place_is_read_again(gen):
    ri, ro = _so3_reps()
    P = _plan(ri, ro)
    meta = P.meta.clone()
    W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64)
    ep, eg, _ = _call(W, meta, P.basis, P.perm_out, P.perm_in)
    _check_reference(W, ri, ro, ep, eg)
    rank = torch.ops.equiproj_cpu.plan_columns().index("RANK")
    meta[:, rank] = 0  # every pair r = 0: nothing is equivariant
    ep, eg, _ = _call(W, meta, P.basis, P.perm_out, P.perm_in)
    torch.testing.assert_close(ep, W.square().sum().reshape(1), rtol=TOL, atol=0)
    assert float(eg) == 0.0
    meta[0, rank] = 10**6  # malformed: checked again
    with pytest.raises(ValueError, match="malformed plan row"):
        _call(W, meta, P.basis, P.perm_out, P.perm_in)


def test_basis_changed_in_place_is_read_again(gen):
    """Doubling an orthonormal basis A_k -> 2 A_k gives coef' = 2 coef and R' = T - 4 P(T): E_G' = 4 E_G and
    E_perp' = E_perp + 9 E_G (R and P(T) orthogonal)."""
    ri, ro = _so3_reps()
    P = _plan(ri, ro)
    basis = P.basis.clone()
    W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64)
    ep, eg, _ = _call(W, P.meta, basis, P.perm_out, P.perm_in)
    _check_reference(W, ri, ro, ep, eg)
    assert float(eg) > 0.01 * float(ep)  # the change below is visible
    basis.mul_(2)
    ep2, eg2, _ = _call(W, P.meta, basis, P.perm_out, P.perm_in)
    torch.testing.assert_close(eg2, 4 * eg, rtol=TOL, atol=0)
    torch.testing.assert_close(ep2, ep + 9 * eg, rtol=TOL, atol=0)


def test_permutation_changed_in_place_is_read_again(gen):
    ri, ro = _permuted_reps()
    P = _plan(ri, ro)
    assert not torch.equal(P.perm_in, torch.arange(ri.dim))
    perm_in = P.perm_in.clone()
    W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64)
    ep, eg, _ = _call(W, P.meta, P.basis, P.perm_out, perm_in)
    _check_reference(W, ri, ro, ep, eg)
    perm_in.copy_(torch.arange(ri.dim))  # now the identity: the columns are read unpermuted
    expected = _call(W, P.meta, P.basis, P.perm_out, torch.arange(ri.dim))
    assert _same(_call(W, P.meta, P.basis, P.perm_out, perm_in), expected)
    assert not torch.equal(expected[0], ep)
    perm_in[0] = perm_in[1]  # no longer a permutation: checked again
    with pytest.raises(ValueError, match="is not a permutation"):
        _call(W, P.meta, P.basis, P.perm_out, perm_in)


def test_more_plans_than_the_cache_holds(gen):
    """300 distinct plan tensors (more than the 256 entries of the cache), two kinds interleaved, each
    freed after use so that the allocator may offer its address again: the cache drops the entry of a
    freed plan at the next insert, so it holds only the plan alive (the current one)."""
    full_ri, full_ro = _so3_reps()
    P = _plan(full_ri, full_ro)
    W = torch.randn(full_ro.dim, full_ri.dim, generator=gen, dtype=torch.float64)
    expected = _call_plan(W, P)
    _check_reference(W, full_ri, full_ro, *expected[:2])
    rank = torch.ops.equiproj_cpu.plan_columns().index("RANK")
    zero_meta = P.meta.clone()
    zero_meta[:, rank] = 0
    total = W.square().sum().reshape(1)
    torch.ops.equiproj_cpu.clear_plan_caches()
    for k in range(300):
        meta = (P.meta if k % 2 == 0 else zero_meta).clone()
        basis, perm_out, perm_in = P.basis.clone(), P.perm_out.clone(), P.perm_in.clone()
        ep, eg, _ = _call(W, meta, basis, perm_out, perm_in)
        if k % 2 == 0:
            assert torch.equal(ep, expected[0]) and torch.equal(eg, expected[1]), k
        else:
            torch.testing.assert_close(ep, total, rtol=TOL, atol=0)
            assert float(eg) == 0.0, k
        assert torch.ops.equiproj_cpu.plan_cache_size() <= 1, k
        del meta, basis, perm_out, perm_in


def test_inference_tensors_are_not_cached(gen):
    ri, ro = _permuted_reps()
    with torch.inference_mode():
        P = _plan(ri, ro)
        meta, basis, perm_out, perm_in = P.meta.clone(), P.basis.clone(), P.perm_out.clone(), P.perm_in.clone()
    W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64)
    torch.ops.equiproj_cpu.clear_plan_caches()
    with torch.inference_mode():
        ep, eg, _ = _call(W, meta, basis, perm_out, perm_in)
        assert torch.ops.equiproj_cpu.plan_cache_size() == 0
        _check_reference(W, ri, ro, ep, eg)
        rank = torch.ops.equiproj_cpu.plan_columns().index("RANK")
        meta[:, rank] = 0  # no version counter: only an uncached plan sees this
        ep, eg, _ = _call(W, meta, basis, perm_out, perm_in)
    torch.testing.assert_close(ep, W.square().sum().reshape(1), rtol=TOL, atol=0)
    assert float(eg) == 0.0
