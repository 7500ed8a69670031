"""The C++ CPU kernel (``csrc/``, ``torch.ops.equiproj.fused_energies`` on CPU) against the float64
spatial-domain reference (``equiproj.reference``), on fresh random inputs.

The kernel computes every tile in float64 whatever the weight dtype, so the reference sees
exactly the tensor the kernel sees (upcast to float64) and only the final roundings differ.
Tolerances:

* energies (relative): 1e-10 for float64 weights (1e-7 when nearly equivariant,
  E_perp / ||W||^2 ~ 1e-10: the reference's own rounding of R = W - P W); 1e-6 for fp32 / fp16 /
  bf16 weights, nearly equivariant included (energies are returned in float32: 2^-24 rounding).
* gradients ``2 lambda_perp R + 2 lambda_G P W`` (elementwise): ``ulp |g_ref| + 1e-12 (|lambda_perp| + |lambda_G|) max|W|``
  ``+ ulp * smallest_normal`` (subnormal spacing), with ``ulp`` one unit in the last place of the
  weight dtype (2^-52, 2^-23, 2^-10, 2^-7): the float64 gradient rounded once (bf16/fp16 via
  float32, so up to one ulp). The trace form on float32 rows long enough for its vector kernel forms
  the gradient from float32 terms: there the bound adds ``2 ulp (|2 lambda_perp R| + |2 lambda_G P W|)``
  (exact where the weight is nearly equivariant: ``R`` keeps its own precision, the test below).

Kernel paths covered: r = 0 pairs, alone and joined with their neighbours; pairs whose basis spans the
tile (scalar to scalar), with their 1-row blocks run many at a time; A = I/sqrt(d) pairs with
d = 3, 5 and 7 (runtime d), and d = 2, 3, 5 on rows of over a thousand columns (the float32 kernel's
chunks and tails); square small tiles (complex type 2x2, d = 3, 4, 5 with r up to 9); the generic kernel (dense change of
basis, regular reps, non-square field pairs; four float64 lanes, and eight where the CPU has AVX-512); tile counts with and without a remainder of the
four-tile loops; permutations; float64 staging (half types, strided and permuted columns).
"""

from __future__ import annotations

import pytest
import torch

import equiproj
import equiproj.testing as verify
from equiproj import ops, reference
from equiproj._plan import block_plan
from equiproj.groups import Rep

pytestmark = pytest.mark.skipif(not ops.cpp_available(), reason="the C++ extension equiproj._C is not built")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _so3_fields(gen):
    G = equiproj.SO3()  # real type: A = I/sqrt(d); l = 3 (d = 7) takes the runtime-d path
    return Rep.parse(G, "3x0 + 2x1 + 5x2 + 3"), Rep.parse(G, "2x0 + 1 + 3x2 + 2x3")


def _so2_complex(gen):
    G = equiproj.SO2()  # 2-dim irreps are complex type: A = I/sqrt2, J/sqrt2 (r = 2); 5 copies: a remainder
    return Rep.parse(G, "2x0 + 5x1 + 3x2"), Rep.parse(G, "0 + 3x1 + 2 + 2x3")


def _so2_permuted(gen):
    G = equiproj.SO2()  # a tensor product of sums carries a permutation
    return Rep.parse(G, "0 + 1") @ Rep.parse(G, "1 + 2"), Rep.parse(G, "2x0 + 3x1 + 2")


def _dense_basis(gen):
    G = equiproj.Cyclic(5)  # dense change of basis: one 7-dim field, general basis (generic kernel)
    a = G.regular() + G.standard()
    return a.change_basis(verify.random_orthogonal(a.dim, gen)), Rep.parse(G, "2x0 + 1 + 2") + 3 * G.regular()


def _small_general(gen):
    G = equiproj.SO2()  # square small tiles with r > 2: "3x0" in a random basis (r = 9), "2x0 + 1" (r = 6);
    t = Rep.parse(G, "3x0").change_basis(verify.random_orthogonal(3, gen))  # non-square pairs (4x2, 4x3)
    f = Rep.parse(G, "2x0 + 1").change_basis(verify.random_orthogonal(4, gen))
    return 3 * t + 2 * f + G.irrep(1), 2 * f + 5 * t + G.irrep(1) @ G.irrep(1)


def _trace_long_rows(gen):
    # the trace form on long rows (d = 3): the float32 kernel's chunks of 960 columns, a short last chunk
    # and the tiles past its last whole vector group (1020 = 960 + 48 + 12 columns)
    G = equiproj.SO3()
    return Rep.parse(G, "340x1 + 0"), Rep.parse(G, "3x1 + 0")


def _trace_five_dims(gen):
    G = equiproj.SO3()  # d = 5: 1005 = 960 + 40 + 5 columns
    return Rep.parse(G, "201x2 + 0"), Rep.parse(G, "0 + 2x2")


def _trace_two_dims(gen):
    G = equiproj.FullOctahedral()  # Eg: a 2-dim irrep of real type (trace form, d = 2) on long rows
    return Rep.parse(G, "503xEg + 2xT1u"), Rep.parse(G, "3xEg + T1u")


def _scalar_rows(gen):
    # scalar output fields: 0e -> 0e pairs span their tiles (R = 0), adjacent r = 0 pairs (1o, 2e, 0o) join
    # into one span, and the 1-row blocks run many at a time (150 rows: one group of joined rows and a
    # remainder; 70 rows: one group), beside a 3-row field whose rows are not joined
    G = equiproj.O3()
    return Rep.parse(G, "7x0e + 3x1o + 2x2e + 4x0o + 5x0e"), Rep.parse(G, "150x0e + 1o + 70x0e")


def _octahedral(gen):
    return verify.mixed_reps(equiproj.Octahedral(), gen)  # 3-dim real irreps, the 24-dim regular rep


def _o3(gen):
    return verify.mixed_reps(equiproj.O3(), gen)


CASES = {"so3_fields": _so3_fields, "so2_complex": _so2_complex, "so2_permuted": _so2_permuted,
         "dense_basis": _dense_basis, "small_general": _small_general, "octahedral": _octahedral, "o3": _o3,
         "trace_long_rows": _trace_long_rows, "trace_five_dims": _trace_five_dims,
         "trace_two_dims": _trace_two_dims, "scalar_rows": _scalar_rows}


#: cases whose float32 rows the trace-form kernel runs in float32 lanes (the mean split hi + lo): each term
#: of the gradient, 2 lambda_perp R and 2 lambda_G P W, is rounded once, so where they cancel the error is
#: bounded by the terms, not by their sum
FLOAT32_TERMS = {"trace_long_rows", "trace_five_dims", "trace_two_dims"}


def _plan(ri, ro):
    return block_plan(ri, ro).packed("cpu", torch.float64)


def cpp(weights, plans, lambda_perp=(), lambda_G=()):
    """The op on CPU, its results per weight: ``(e_perp, e_g, grads)`` (fresh gradients written)."""
    P, weights = plans, list(weights)
    grads = [torch.empty(W.shape, dtype=W.dtype) for W in weights] if len(lambda_perp) else []
    if len(lambda_perp) and len(lambda_perp) != len(weights):
        grads = grads[: len(lambda_perp)]
    ep, eg = torch.ops.equiproj.fused_energies(weights, [p.meta for p in P], [p.basis for p in P],
                                               [p.perm_out for p in P], [p.perm_in for p in P], list(lambda_perp),
                                               list(lambda_G), grads, False)
    return ops.split_energies(weights, ep), ops.split_energies(weights, eg), grads


def _reference(W, ri, ro, cp, cg):
    """(E_perp, E_G, grad, |grad terms|) in float64 for exactly the tensor W; cp, cg broadcast over its batch
    (the last: ``|2 lambda_perp R| + |2 lambda_G P W|``, the magnitudes of the gradient's two terms)."""
    W64 = W.detach().double()
    PW = reference.project(W64, ri, ro)
    R = W64 - PW
    perp, g = 2 * cp.double()[..., None, None] * R, 2 * cg.double()[..., None, None] * PW
    return R.square().sum((-2, -1)), PW.square().sum((-2, -1)), perp + g, perp.abs() + g.abs()


def _check(W, ep, eg, g, ri, ro, cp, cg, what, near=False, float32_terms=False):
    rp, rg, rgrad, terms = _reference(W, ri, ro, cp, cg)
    acc = torch.float64 if W.dtype == torch.float64 else torch.float32
    assert ep.dtype == eg.dtype == acc and ep.shape == eg.shape == W.shape[:-2], what
    tol = (1e-7 if near else 1e-10) if W.dtype == torch.float64 else 1e-6
    for name, e, r in (("E_perp", ep, rp), ("E_G", eg, rg)):
        err = float(((e.double() - r).abs() / r.abs().clamp_min(1e-300)).max())
        assert err <= tol, f"{what} {name}: relative error {err:.2e} > {tol:.0e}"
    assert g.dtype == W.dtype and g.shape == W.shape and g.is_contiguous(), what
    wmax = W.detach().double().abs().amax((-2, -1), keepdim=True)
    cmag = (cp.abs() + cg.abs()).double()[..., None, None]
    subnormal = torch.finfo(W.dtype).smallest_normal * ULP[W.dtype]  # spacing below the normal range
    bound = ULP[W.dtype] * rgrad.abs() + 1e-12 * cmag * wmax + subnormal
    if float32_terms and W.dtype == torch.float32:  # one float32 rounding of each term of the gradient
        bound = bound + 2 * ULP[W.dtype] * terms
    err = (g.double() - rgrad).abs()
    assert bool((err <= bound).all()), f"{what} grad: max error {float(err.max()):.2e}"


def _layouts(base, gen):
    """The same values as contiguous, transposed (column stride m), sliced (column stride 2) and
    batched-with-permuted-batch-dims tensors."""
    m, n = base.shape[-2:]
    yield "contiguous", base
    yield "transposed", base.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.zeros(m, 2 * n + 1, dtype=base.dtype)
    wide[:, 1::2] = base
    yield "sliced", wide[:, 1::2]
    batch = torch.randn(3, 2, m, n, generator=gen, dtype=torch.float64).to(base.dtype)
    batch[1, 0] = base
    yield "batched", batch.transpose(0, 1).contiguous().transpose(0, 1)  # [3, 2, m, n], batch strides swapped


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, dtype, gen):
    ri, ro = CASES[case](gen)
    P = _plan(ri, ro)
    base = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64).to(dtype)
    for layout, W in _layouts(base, gen):
        batch = W.shape[:-2]
        cp = torch.rand(batch, generator=gen) * 2 - 0.5
        cg = torch.rand(batch, generator=gen) * 2 - 0.5
        (ep,), (eg,), (g,) = cpp([W], [P], [cp], [cg])
        _check(W, ep, eg, g, ri, ro, cp, cg, f"{case} {dtype} {layout}", float32_terms=case in FLOAT32_TERMS)
        (ep2,), (eg2,), grads = cpp([W], [P])  # energies only: the same values, no gradient
        assert grads == [] and torch.equal(ep2, ep) and torch.equal(eg2, eg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["so3_fields", "so2_complex", "so2_permuted", "small_general", "dense_basis",
                                  "trace_long_rows", "trace_five_dims", "trace_two_dims", "scalar_rows"])
def test_nearly_equivariant(case, dtype, gen):
    ri, ro = CASES[case](gen)
    W64 = verify.nearly_equivariant(torch.randn(2, ro.dim, ri.dim, dtype=torch.float64, generator=gen), ri, ro,
                                    1e-10, gen)
    W = W64.to(dtype)
    cp, cg = torch.tensor([1.0, 0.0]), torch.tensor([0.3, 1.0])
    (ep,), (eg,), (g,) = cpp([W], [_plan(ri, ro)], [cp], [cg])
    if dtype in (torch.float64, torch.float32):  # rounding to fp16/bf16 adds more than 1e-10
        assert float((ep.double() / W.double().square().sum((-2, -1))).max()) < 1e-8
    _check(W, ep, eg, g, ri, ro, cp, cg, f"{case} {dtype} nearly equivariant", near=True)


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
@pytest.mark.parametrize("case", ["so3_fields", "so2_complex", "small_general", "dense_basis", "scalar_rows"])
def test_other_isas_match_reference(case, isa, gen):
    """The kernels compiled for the baseline x86-64 ISA (used on CPUs without AVX2+FMA), and the AVX2
    kernels without the AVX-512 tiles of pairs with a general basis (used on CPUs without AVX-512; the
    baseline kernels where there is no AVX2 either): random and nearly equivariant weights."""
    ri, ro = CASES[case](gen)
    P = _plan(ri, ro)
    previous = torch.ops.equiproj_cpu.set_isa(isa)
    try:
        assert torch.ops.equiproj_cpu.isa() in (isa, "baseline")
        for dtype in (torch.float32, torch.float64):
            W = torch.randn(2, ro.dim, ri.dim, generator=gen, dtype=torch.float64).to(dtype)
            cp, cg = torch.rand(2, generator=gen), torch.rand(2, generator=gen)
            (ep,), (eg,), (g,) = cpp([W], [P], [cp], [cg])
            _check(W, ep, eg, g, ri, ro, cp, cg, f"{case} {dtype} {isa}")
            W = verify.nearly_equivariant(W.double(), ri, ro, 1e-10, gen).to(dtype)
            (ep,), (eg,), (g,) = cpp([W], [P], [cp], [cg])
            _check(W, ep, eg, g, ri, ro, cp, cg, f"{case} {dtype} {isa} nearly equivariant", near=True)
    finally:
        torch.ops.equiproj_cpu.set_isa(previous)


@pytest.mark.parametrize("copies", [1, 3, 6, 7, 13])
def test_generic_tiles_on_every_copy_count(copies, gen):
    """Generic tiles of ranks 1 to 4 (the eight-lane kernel takes up to eight tiles per block and the
    tiles left over in blocks of four, two and one) and of rank 7 (three per block), written and added,
    random and nearly equivariant, against the reference."""
    G = equiproj.SO2()

    def field(spec):
        r = Rep.parse(G, spec)
        return r.change_basis(verify.random_orthogonal(r.dim, gen))

    # one output field of over five dimensions against one input field: ranks 1, 2, 3, 4 and 7 (a frequency-0
    # pair adds 1 to the rank, a pair of one frequency above 0 adds 2)
    for out_spec, in_spec in (("0 + 1 + 3 + 4", "0 + 2"), ("1 + 2 + 3", "1"), ("0 + 1 + 2 + 3", "0 + 1"),
                              ("2x0 + 1 + 2", "0 + 1"), ("3x0 + 2x1", "0 + 1")):
        ri, ro = copies * field(in_spec), 2 * field(out_spec)
        P = _plan(ri, ro)
        for dtype in (torch.float32, torch.float64):
            W = torch.randn(2, ro.dim, ri.dim, generator=gen, dtype=torch.float64)
            cp, cg = torch.rand(2, generator=gen), torch.rand(2, generator=gen)
            for near, Wd in ((False, W), (True, verify.nearly_equivariant(W, ri, ro, 1e-10, gen))):
                Wt = Wd.to(dtype)
                (ep,), (eg,), (g,) = cpp([Wt], [P], [cp], [cg])
                _check(Wt, ep, eg, g, ri, ro, cp, cg, f"{out_spec} <- {copies} x ({in_spec}) {dtype}", near=near)
                out = torch.randn(Wt.shape, generator=gen, dtype=torch.float64).to(dtype)
                want = out.double() + _reference(Wt, ri, ro, cp, cg)[2]
                ops.fused_energies_and_grads([Wt], [P], [cp], [cg], outs=[out])
                assert float((out.double() - want).abs().max()) <= 4 * ULP[dtype] * float(want.abs().max())


def test_set_isa_takes_back_what_it_returns():
    """Each choice's name, as ``isa()`` gives it, restores that choice; unknown names are refused."""
    first = torch.ops.equiproj_cpu.isa()
    try:
        for which in ("baseline", "avx2", "best"):
            torch.ops.equiproj_cpu.set_isa(which)
            name = torch.ops.equiproj_cpu.isa()
            torch.ops.equiproj_cpu.set_isa("baseline" if which != "baseline" else "best")
            torch.ops.equiproj_cpu.set_isa(name)
            assert torch.ops.equiproj_cpu.isa() == name
        with pytest.raises(ValueError, match="set_isa: expected"):
            torch.ops.equiproj_cpu.set_isa("avx1024")
    finally:
        torch.ops.equiproj_cpu.set_isa(first)
    assert torch.ops.equiproj_cpu.isa() == first


def test_many_layers_in_one_call_equal_single_calls(gen):
    """One call over layers of mixed dtypes, batches and permutations returns bitwise what the
    single-layer calls return (each matrix's sum runs over its own row blocks in a fixed order)."""
    names = ["so3_fields", "so2_permuted", "dense_basis", "small_general"]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    weights, plans, cps, cgs = [], [], [], []
    for k, (name, dt) in enumerate(zip(names, dtypes)):
        ri, ro = CASES[name](gen)
        shape = (ro.dim, ri.dim) if k % 2 else (2, ro.dim, ri.dim)
        weights.append(torch.randn(shape, generator=gen, dtype=torch.float64).to(dt))
        plans.append(_plan(ri, ro))
        cps.append(torch.rand(shape[:-2], generator=gen))
        cgs.append(torch.rand(shape[:-2], generator=gen))
    ep, eg, g = cpp(weights, plans, cps, cgs)
    for i in range(len(weights)):
        (ep1,), (eg1,), (g1,) = cpp([weights[i]], [plans[i]], [cps[i]], [cgs[i]])
        assert torch.equal(ep[i], ep1) and torch.equal(eg[i], eg1) and torch.equal(g[i], g1)


def test_deterministic_across_calls_and_thread_counts(gen):
    """Bitwise equal results for repeated calls and for 1 or 2 threads (per-row-block partial sums,
    added in a fixed order; no atomics)."""
    G = equiproj.SO3()
    r = Rep.parse(G, "40x0 + 30x1 + 21x2")  # 235 x 235: several parallel chunks
    W = torch.randn(r.dim, r.dim, generator=gen)
    P = _plan(r, r)
    c = [torch.tensor(0.7)], [torch.tensor(0.2)]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpp([W], [P], *c)
        torch.set_num_threads(2)
        two, again = cpp([W], [P], *c), cpp([W], [P], *c)
    finally:
        torch.set_num_threads(old)
    for a, b, d in zip(one, two, again):
        assert torch.equal(a[0], b[0]) and torch.equal(b[0], d[0])


def test_openmp_is_active():
    """at::parallel_for really runs in parallel inside the extension (it silently runs serially
    when the extension is compiled without OpenMP), and follows torch.set_num_threads."""
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert ops.cpp_num_threads() == 1 and torch.ops.equiproj_cpu.parallel_threads(16) == 1
        torch.set_num_threads(2)
        assert ops.cpp_num_threads() == 2
        assert torch.ops.equiproj_cpu.parallel_threads(16) == 2
    finally:
        torch.set_num_threads(old)
    assert torch.ops.equiproj_cpu.isa() in ("avx2+avx512", "avx2", "baseline")


def test_empty_batch_and_zero_weights():
    ri, ro = _so3_fields(None)
    P = _plan(ri, ro)
    W0 = torch.zeros(0, ro.dim, ri.dim)
    (ep,), (eg,), (g,) = cpp([W0], [P], [torch.zeros(0)], [torch.zeros(0)])
    assert ep.shape == (0,) and g.shape == W0.shape
    Z = torch.zeros(ro.dim, ri.dim)
    (ep,), (eg,), (g,) = cpp([Z], [P], [torch.tensor(1.0)], [torch.tensor(1.0)])
    assert float(ep) == 0 and float(eg) == 0 and not g.any()


def test_bad_inputs():
    ri, ro = _so2_permuted(None)
    P = _plan(ri, ro)
    W = torch.randn(ro.dim, ri.dim)
    with pytest.raises(ValueError, match="weights but"):
        torch.ops.equiproj.fused_energies([W], [P.meta], [], [P.perm_out], [P.perm_in], [], [], [], False)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        cpp([W.int()], [P])
    with pytest.raises(ValueError, match="rows"):
        cpp([W[:-1]], [P])
    with pytest.raises(ValueError, match="not a permutation"):
        torch.ops.equiproj.fused_energies([W], [P.meta], [P.basis], [torch.zeros_like(P.perm_out)], [P.perm_in],
                                              [], [], [], False)
    with pytest.raises(ValueError, match="perm_in has"):
        torch.ops.equiproj.fused_energies([W], [P.meta], [P.basis], [P.perm_out], [P.perm_in[:-1]], [], [], [], False)
    with pytest.raises(TypeError, match="perm_in must be a 1-d CPU int64"):
        torch.ops.equiproj.fused_energies([W], [P.meta], [P.basis], [P.perm_out], [P.perm_in.int()], [], [], [], False)
    with pytest.raises(TypeError, match="meta must be"):
        torch.ops.equiproj.fused_energies([W], [P.meta[:, :7]], [P.basis], [P.perm_out], [P.perm_in], [], [], [], False)
    bad = P.meta.clone()
    bad[0, 1] += 1  # the first pair no longer starts at column 0
    with pytest.raises(ValueError, match="tile the columns"):
        torch.ops.equiproj.fused_energies([W], [bad], [P.basis], [P.perm_out], [P.perm_in], [], [], [], False)
    bad = P.meta.clone()
    bad[:, 7] += P.basis.numel()  # basis offsets past the end
    with pytest.raises(ValueError, match="malformed plan row"):
        torch.ops.equiproj.fused_energies([W], [bad], [P.basis], [P.perm_out], [P.perm_in], [], [], [], False)
    with pytest.raises(ValueError, match="one per matrix"):
        cpp([W], [P], [torch.ones(2)], [torch.ones(2)])
    with pytest.raises(ValueError, match="both be empty"):
        cpp([W], [P], [torch.ones(())], [])
