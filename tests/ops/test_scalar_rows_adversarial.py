"""The C++ kernel on layers of many scalar (1-dim) fields, against the float64 reference.

Such layers take three routes of their own: a field pair whose orthonormal basis spans the tile
(scalar to scalar: all of it equivariant) runs as a sum of squares into E_G; adjacent pairs of one
output field that are both r = 0, or both spanning, join into one span of columns; an output field
whose pairs are all of those kinds runs many of its 1-row blocks as one row block (about 4096
entries), with a remainder block. The float32 sum of squares ends a row in one masked vector.

The probes: scalar output fields of 1..3000 rows against 1..300 columns (row groups with and
without a remainder, rows shorter and longer than a group), scalar fields of the finite, planar and
octahedral groups, interleaved and permuted fields, every weight dtype and layout, nearly
equivariant and non-finite weights, gradients added in place (the decoupled step with the output
aliasing the weight), both instruction sets, every tail length of the masked vector, a scaled
(non-orthonormal) basis that must not be taken for a spanning one, trivial fields in a rotated
basis (spanning tiles up to 8 x 8, and just past the size the spanning check takes), declared layers'
``ProjectionPenalty.backward()`` / ``decay_()``, and results bitwise independent of the thread count
(the op, and penalty() / backward() / decay_()).

Tolerances (as tests/ops/test_cpp.py): energies relative 1e-10 for float64 weights (1e-7 when nearly
equivariant), 1e-6 otherwise (returned in float32); gradients elementwise
``ulp |g_ref| + 1e-12 (|lambda_perp| + |lambda_G|) max|W| + ulp * smallest_normal``, plus for float32
``2 ulp (|2 lambda_perp R| + |2 lambda_G P W|)`` (the trace form of the vector fields beside the scalars
forms float32 terms); an energy that is 0 is compared relative to ``E_perp + E_G``.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import equiproj
from equiproj import Rep, ops, reference
from equiproj._plan import plan_for
from equiproj.nn import ProjectionPenalty, declare
from equiproj.ops import cpp_available, fused_energies_and_grads
from equiproj.testing import nearly_equivariant, random_orthogonal

pytestmark = pytest.mark.skipif(not cpp_available(), reason="the C++ extension is not built")

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture(params=["best", "baseline"])
def isa(request):
    previous = torch.ops.equiproj_cpu.set_isa(request.param)
    yield request.param
    torch.ops.equiproj_cpu.set_isa(previous)


def _expected(W, ri, ro, cp, cg):
    """(E_perp, E_G, gradient) in float64 for exactly the tensor W (cp, cg: numbers or [batch] tensors)."""
    W64 = W.detach().double()
    PW = reference.project(W64, ri, ro)
    cp = torch.as_tensor(cp, dtype=torch.float64)[..., None, None]
    cg = torch.as_tensor(cg, dtype=torch.float64)[..., None, None]
    return (W64 - PW).square().sum((-2, -1)), PW.square().sum((-2, -1)), 2 * cp * (W64 - PW) + 2 * cg * PW


def _check(W, ri, ro, cp, cg, ep, eg, g, what, near=False):
    W64 = W.detach().double()
    PW = reference.project(W64, ri, ro)
    rp, rg = (W64 - PW).square().sum((-2, -1)), PW.square().sum((-2, -1))
    cp64 = torch.as_tensor(cp, dtype=torch.float64)[..., None, None]
    cg64 = torch.as_tensor(cg, dtype=torch.float64)[..., None, None]
    perp, par = 2 * cp64 * (W64 - PW), 2 * cg64 * PW
    rgrad = perp + par
    tol = (1e-7 if near else 1e-10) if W.dtype == torch.float64 else 1e-6
    total = rp + rg  # an energy that is 0 (no equivariant part, say) is compared to the weight's scale
    for name, e, r in (("E_perp", ep, rp), ("E_G", eg, rg)):
        assert e.shape == r.shape, f"{what} {name} shape"
        err = float(((e.double() - r).abs() / torch.maximum(r.abs(), 1e-13 * total).clamp_min(1e-300)).max())
        assert err <= tol, f"{what} {name}: relative error {err:.2e} > {tol:.0e}"
    assert g.dtype == W.dtype and g.shape == W.shape, what
    cmag = (torch.as_tensor(cp).abs() + torch.as_tensor(cg).abs()).double()[..., None, None]
    wmax = W.detach().double().abs().amax((-2, -1), keepdim=True)
    bound = ULP[W.dtype] * rgrad.abs() + 1e-12 * cmag * wmax + torch.finfo(W.dtype).smallest_normal * ULP[W.dtype]
    if W.dtype == torch.float32:  # the trace form of 1o/2e fields on float32 rows rounds each term once
        bound = bound + 2 * ULP[W.dtype] * (perp.abs() + par.abs())
    err = (g.double() - rgrad).abs()
    assert bool((err <= bound).all()), f"{what} grad: max error {float(err.max()):.3e}"


def _run(W, ri, ro, cp, cg):
    (ep,), (eg,), (g,) = fused_energies_and_grads([W], [plan_for(ri, ro, "cpu")], [cp], [cg])
    return ep, eg, g


O3 = equiproj.O3()

#: (output fields, input fields): scalar outputs of 1 .. 3000 rows against 1 .. 300 columns. The rows
#: of an all-scalar output field run in groups of about 4096 entries: 600 x 7 is one group of 585 rows
#: and a remainder of 15, 37 x 300 groups of 13 rows and a remainder of 11, 3000 x 2 one group of 2048
#: rows and 952 left, 2500 x 1 one group of all rows, 5 x 1000 rows longer than a group (one row a block)
SCALAR_SHAPES = [("0e", "0e"), ("0e", "300x0e"), ("600x0e", "0e"), ("600x0e", "7x0e"), ("37x0e", "300x0e"),
                 ("300x0e", "13x0e"), ("3000x0e", "2x0e"), ("2500x0e", "0e"), ("5x0e", "1000x0e"), ("97x0e", "41x0e")]

#: input forms: all spanning pairs; all r = 0 pairs (0o, and 1o); r = 0 pairs split by spanning ones
#: (no two r = 0 pairs adjacent); r = 0 pairs of different dimensions adjacent (joined)
INPUT_FORMS = {
    "scalars": lambda k: f"{k}x0e",
    "pseudoscalars": lambda k: f"{k}x0o",
    "alternating": lambda k: " + ".join(["0e", "0o"] * max(k // 2, 1)),
    "mixed_zero": lambda k: f"{max(k - 1, 1)}x0o + 1o + 2e + 0o",
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", list(INPUT_FORMS))
@pytest.mark.parametrize("shape", SCALAR_SHAPES, ids=lambda s: f"{s[0]}<-{s[1]}")
def test_scalar_outputs_match_reference(shape, form, dtype, gen):
    out, inp = shape
    k = int(inp.split("x")[0]) if "x" in inp else 1
    rows = int(out.split("x")[0]) if "x" in out else 1
    if form != "scalars":  # the reference writes these reps out densely: at most 60 columns and 700 rows
        k, rows = min(k, 60), min(rows, 700)
    ro, ri = Rep.parse(O3, f"{rows}x0e"), Rep.parse(O3, INPUT_FORMS[form](k))
    W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64).to(dtype)
    cp, cg = float(torch.rand((), generator=gen)) + 0.1, float(torch.rand((), generator=gen)) - 0.5
    ep, eg, g = _run(W, ri, ro, cp, cg)
    _check(W, ri, ro, cp, cg, ep, eg, g, f"{out} <- {ri} {dtype}")


def _one_dim_irreps(G, band_limit=None):
    irreps = G.irreps(band_limit) if band_limit is not None else G.irreps()
    return [i for i in irreps if i.dim == 1]


GROUPS = {
    "C5": lambda: (equiproj.Cyclic(5), None),
    "D4": lambda: (equiproj.Dihedral(4), None),
    "D3": lambda: (equiproj.Dihedral(3), None),
    "O": lambda: (equiproj.Octahedral(), None),
    "Oh": lambda: (equiproj.FullOctahedral(), None),
    "SO2": lambda: (equiproj.SO2(), 1),
    "O2": lambda: (equiproj.O2(), 2),
    "O3": lambda: (equiproj.O3(), 1),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("group", list(GROUPS))
def test_one_dim_fields_of_other_groups(group, dtype, gen):
    """Trivial and sign-like irreps of each group, interleaved with a higher-dimensional field."""
    G, band = GROUPS[group]()
    ones = _one_dim_irreps(G, band)
    big = [i for i in (G.irreps(band) if band is not None else G.irreps()) if i.dim > 1][:1]
    assert ones and ones[0].dim == 1
    # outputs: many copies of each 1-dim irrep, split by a larger field; inputs: each 1-dim irrep a few
    # times in an order that puts equal and different irreps side by side
    ro = 40 * ones[0]
    for i in ones[1:]:
        ro = ro + 3 * i
    if big:
        ro = ro + big[0] + 25 * ones[0]
    ri = 2 * ones[-1] + 3 * ones[0]
    for i in ones:
        ri = ri + i
    if big:
        ri = ri + 2 * big[0] + 4 * ones[0]
    W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64).to(dtype)
    ep, eg, g = _run(W, ri, ro, 0.8, 0.3)
    _check(W, ri, ro, 0.8, 0.3, ep, eg, g, f"{group} {ri} -> {ro}")


def test_parsed_one_dim_forms(gen):
    """``Rep.parse`` spellings of scalar and pseudoscalar fields, as a user writes them."""
    for G, ins, outs in [(equiproj.O3(), "3x0e + 0o + 2x0e + 2x0o", "0o + 70x0e + 1o + 9x0e + 0o"),
                         (equiproj.SO3(), "5x0 + 1 + 0", "90x0 + 2 + 3x0"),
                         (equiproj.SO2(), "4x0 + 1 + 2x0", "120x0 + 1 + 0")]:
        ri, ro = Rep.parse(G, ins), Rep.parse(G, outs)
        for dtype in (torch.float64, torch.float32):
            W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64).to(dtype)
            ep, eg, g = _run(W, ri, ro, 0.6, 0.25)
            _check(W, ri, ro, 0.6, 0.25, ep, eg, g, f"{G} {ins} -> {outs} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permuted_fields(dtype, gen):
    """Tensor products and sums in mixed order carry output and input permutations that scatter
    the scalar rows and columns."""
    a, b = Rep.parse(O3, "0e + 1o + 0o"), Rep.parse(O3, "2x0e + 0o")
    ri = (a @ b) + Rep.parse(O3, "3x0e")  # 15 + 3 columns, permuted
    ro = Rep.parse(O3, "1o + 0e") @ Rep.parse(O3, "30x0e")  # 120 rows, permuted: 30 scalar rows among them
    P = plan_for(ri, ro, "cpu")
    assert P.perm_out.numel() or P.perm_in.numel(), "the case must carry a permutation"
    W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64).to(dtype)
    ep, eg, g = _run(W, ri, ro, 0.9, 0.4)
    _check(W, ri, ro, 0.9, 0.4, ep, eg, g, f"permuted {dtype}")


def _layouts(base, gen):
    m, n = base.shape[-2:]
    yield "transposed", base.transpose(-1, -2).contiguous().transpose(-1, -2)
    wide = torch.zeros(m, 2 * n + 1, dtype=base.dtype)
    wide[:, 1::2] = base
    yield "column_sliced", wide[:, 1::2]
    tall = torch.zeros(2 * m, n + 5, dtype=base.dtype)
    tall[::2, 3:3 + n] = base
    yield "row_and_column_window", tall[::2, 3:3 + n]  # unit column stride, rows 2 (n + 5) apart
    batch = torch.randn(3, 2, m, n, generator=gen, dtype=torch.float64).to(base.dtype)
    batch[1, 0] = base
    yield "batched", batch.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts(dtype, gen):
    ri, ro = Rep.parse(O3, "9x0e + 0o + 1o + 4x0e"), Rep.parse(O3, "300x0e + 1o + 11x0e")
    base = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64).to(dtype)
    for layout, W in _layouts(base, gen):
        batch = W.shape[:-2]
        cp = torch.rand(batch, generator=gen, dtype=torch.float64) + 0.1
        cg = torch.rand(batch, generator=gen, dtype=torch.float64) - 0.5
        ep, eg, g = _run(W, ri, ro, cp, cg)
        _check(W, ri, ro, cp, cg, ep, eg, g, f"{layout} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nearly_equivariant(dtype, gen):
    ri, ro = Rep.parse(O3, "20x0e + 0o + 1o + 3x0e"), Rep.parse(O3, "500x0e + 1o + 7x0e")
    W64 = nearly_equivariant(torch.randn(2, ro.dim, ri.dim, dtype=torch.float64, generator=gen), ri, ro, 1e-10, gen)
    W = W64.to(dtype)
    cp, cg = torch.tensor([0.7, 1.3], dtype=torch.float64), torch.tensor([0.0, 0.2], dtype=torch.float64)
    ep, eg, g = _run(W, ri, ro, cp, cg)
    _check(W, ri, ro, cp, cg, ep, eg, g, f"nearly equivariant {dtype}", near=True)
    if dtype == torch.float64:  # the energy ratio the case was built for
        ratio = ep / (ep + eg)
        assert bool(((ratio > 1e-11) & (ratio < 1e-9)).all()), ratio


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_non_finite_weights(dtype, gen):
    """inf and nan in spanning and r = 0 columns: no crash, and the same non-finite pattern as the float64 run."""
    ri, ro = Rep.parse(O3, "6x0e + 0o + 1o + 5x0o"), Rep.parse(O3, "200x0e + 1o")
    W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64)
    W[3, 2] = float("inf")      # a spanning column: E_G inf, E_perp finite
    W[150, 7] = float("nan")    # an r = 0 column (0e <- 0o): E_perp nan
    W = W.to(dtype)
    ep, eg, g = _run(W, ri, ro, 0.5, 0.5)
    ep64, eg64, g64 = _run(W.double(), ri, ro, 0.5, 0.5)
    assert torch.isinf(eg) and torch.isnan(ep), (ep, eg)
    assert torch.equal(torch.isnan(ep), torch.isnan(ep64)) and torch.equal(torch.isinf(eg), torch.isinf(eg64))
    assert torch.equal(torch.isfinite(g), torch.isfinite(g64))
    assert bool(torch.isinf(g[3, 2])) and bool(torch.isnan(g[150, 7]))
    # rows without a non-finite entry are exact
    clean = torch.ones(ro.dim, dtype=torch.bool)
    clean[:4] = False  # row 3 and the 1o field's rows do not mix with row 3; stay clear of the field block
    clean[150] = False
    clean[200:] = False
    Wc = W[clean]
    roc = Rep.parse(O3, f"{int(clean.sum())}x0e")
    ep_c, eg_c, g_c = _run(Wc.contiguous(), ri, roc, 0.5, 0.5)
    assert torch.equal(g_c, g[clean])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_decay_in_place(dtype, isa, gen):
    """The decoupled step W <- W - rate (W - P W) - rate_G P W with the output aliasing the weight
    (spanning and r = 0 pairs add into the rows they read), and into an existing gradient."""
    ri, ro = Rep.parse(O3, "13x0e + 0o + 1o + 2x0o + 0e"), Rep.parse(O3, "333x0e + 1o + 5x0e")
    P = plan_for(ri, ro, "cpu")
    for W0 in (torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64).to(dtype),
               nearly_equivariant(torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64), ri, ro, 1e-10,
                                  gen).to(dtype)):
        rate, rate_G = 0.3, 0.05
        W = W0.clone()
        fused_energies_and_grads([W], [P], [-rate / 2], [-rate_G / 2], outs=[W])
        PW = reference.project(W0.double(), ri, ro)
        want = W0.double() - rate * (W0.double() - PW) - rate_G * PW
        tol = 1e-12 if dtype == torch.float64 else 2e-6
        assert float((W.double() - want).abs().max()) <= tol * float(want.abs().max()), isa
        out0 = torch.randn(W0.shape, generator=gen, dtype=torch.float64).to(dtype)
        out = out0.clone()
        fused_energies_and_grads([W0], [P], [0.7], [0.2], outs=[out])
        want = out0.double() + 2 * 0.7 * (W0.double() - PW) + 2 * 0.2 * PW
        assert float((out.double() - want).abs().max()) <= tol * float(want.abs().max()), isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_baseline_and_best_isa_agree_with_reference(dtype, isa, gen):
    ri, ro = Rep.parse(O3, "11x0e + 0o + 1o + 3x0e"), Rep.parse(O3, "450x0e + 0o + 2e + 17x0e")
    W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64).to(dtype)
    ep, eg, g = _run(W, ri, ro, 0.4, 0.7)
    _check(W, ri, ro, 0.4, 0.7, ep, eg, g, f"{isa} {dtype}")


@pytest.mark.parametrize("add", [False, True], ids=["write", "add"])
@pytest.mark.parametrize("kind", ["spanning", "zero"])
def test_every_tail_length(kind, add, isa, gen):
    """Spans of 1..17 columns (every length of the masked last vector, 0..2 whole vectors before it),
    float32 rows exactly as long as their allocation, gradients written and added."""
    for span in range(1, 18):
        ri = Rep.parse(O3, f"{span}x0e" if kind == "spanning" else f"{span}x0o")
        ro = Rep.parse(O3, "3x0e")
        W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64).float()
        cp, cg = 0.35, 0.85
        if add:
            out0 = torch.randn(W.shape, generator=gen, dtype=torch.float64).float()
            out = out0.clone()
            (ep,), (eg,), _ = fused_energies_and_grads([W], [plan_for(ri, ro, "cpu")], [cp], [cg], outs=[out])
            rp, rg, rgrad = _expected(W, ri, ro, cp, cg)
            want = out0.double() + rgrad
            # one float32 rounding of the sum (the kernel's fma) and of the gradient term
            err = (out.double() - want).abs()
            assert bool((err <= 2 * ULP[torch.float32] * (want.abs() + rgrad.abs())).all()), (span, float(err.max()))
        else:
            ep, eg, g = _run(W, ri, ro, cp, cg)
            _check(W, ri, ro, cp, cg, ep, eg, g, f"{kind} span {span} {isa}")
            continue
        for name, e, r in (("E_perp", ep, rp), ("E_G", eg, rg)):
            assert float((e.double() - r).abs()) <= 1e-6 * float(r.abs()), (span, name)


def test_scaled_basis_is_not_taken_as_spanning(gen):
    """A plan whose 0e -> 0e basis is [2] (not orthonormal) must run the general projection
    P(T) = sum <A, T> A = 4 T, not the spanning route (R = 0): E_perp = |W - 4 W|^2 = 9 |W|^2, and
    with lambda_G = 0 the gradient 2 lambda_perp (W - 4 W)."""
    ri, ro = Rep.parse(O3, "21x0e"), Rep.parse(O3, "50x0e")
    P = plan_for(ri, ro, "cpu")
    basis = P.basis * 2
    for dtype in (torch.float64, torch.float32):
        W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64).to(dtype)
        cp, cg = torch.tensor([0.3], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
        g = torch.empty_like(W)
        ep, eg = torch.ops.equiproj.fused_energies([W], [P.meta], [basis], [P.perm_out], [P.perm_in], [cp], [cg],
                                                   [g], False)
        s = W.double().square().sum()
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        assert abs(float(ep.double().sum()) / float(9 * s) - 1) <= tol
        want = 2 * 0.3 * (W.double() - 4 * W.double())
        assert float((g.double() - want).abs().max()) <= 4 * ULP[dtype] * float(want.abs().max())


def test_results_do_not_depend_on_the_thread_count(gen):
    """Several layers of different sizes in one call (scalar row groups with remainders, long rows,
    a mixed field): energies and gradients bitwise equal for 1 and 2 threads."""
    cases = [("600x0e", "7x0e"), ("3000x0e", "2x0e"), ("37x0e", "300x0e"), ("5x0e", "1000x0e"),
             ("90x0e + 1o + 40x0e", "30x0e + 0o + 1o + 2e + 9x0e"), ("3x0e", "2x0o")]
    reps = [(Rep.parse(O3, i), Rep.parse(O3, o)) for o, i in cases]
    plans = [plan_for(ri, ro, "cpu") for ri, ro in reps]
    previous = torch.get_num_threads()
    try:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            Ws = [torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64).to(dtype) for ri, ro in reps]
            cps, cgs = [0.1 * (k + 1) for k in range(len(Ws))], [0.05 * k for k in range(len(Ws))]
            runs = []
            for threads in (1, 2, 1):
                torch.set_num_threads(threads)
                runs.append(fused_energies_and_grads(Ws, plans, cps, cgs))
            for other in runs[1:]:
                for a, b in zip(runs[0], other):
                    assert all(torch.equal(x, y) for x, y in zip(a, b)), dtype
    finally:
        torch.set_num_threads(previous)


def test_empty_output_field_in_a_plan_is_an_error_not_a_crash():
    """A hand-built plan with an output field of zero copies (the plan check accepts out_copies = 0)
    beside scalar pairs: the call must raise or run, not kill the process."""
    code = textwrap.dedent("""
        import torch, equiproj
        from equiproj import Rep
        from equiproj._plan import plan_for
        G = equiproj.O3()
        P = plan_for(Rep.parse(G, "4x0e + 1o"), Rep.parse(G, "3x0e"), "cpu")
        extra = torch.tensor([[3, 0, 0, 4, 1, 1, 1, 0, 0, 0], [3, 4, 0, 1, 1, 3, 0, 1, 0, 0]])
        try:
            torch.ops.equiproj.fused_energies([torch.randn(3, 7)], [torch.cat([P.meta, extra])], [P.basis],
                                              [P.perm_out], [P.perm_in], [], [], [], False)
        except (ValueError, RuntimeError):
            pass
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit status {proc.returncode}: {proc.stderr[-500:]}"


#: declared layers of many scalar fields: (inputs, outputs) of each nn.Linear in one model
LAYER_SHAPES = [("0e", "600x0e"), ("300x0e", "37x0e"), ("7x0e", "600x0e"), ("13x0e + 0o", "1o + 250x0e"),
                ("2x0o + 1o + 40x0e", "3x0e"), ("0e", "0e")]


def _declared_model(gen, dtype):
    layers = []
    for ins, outs in LAYER_SHAPES:
        ri, ro = Rep.parse(O3, ins), Rep.parse(O3, outs)
        layers.append(declare(nn.Linear(ri.dim, ro.dim), ri, ro))
    model = nn.ModuleList(layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        W = model[3].weight  # one nearly equivariant layer (model[1] is all equivariant: scalars to scalars)
        W.copy_(nearly_equivariant(W.double(), Rep.parse(O3, "13x0e + 0o"), Rep.parse(O3, "1o + 250x0e"), 1e-10, gen))
    return model.to(dtype)


def _reference_copy(model):
    """A float64 copy of ``model`` with exactly its (rounded) values."""
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        for p, q in zip(ref.parameters(), model.parameters()):
            p.copy_(q.double())
            p.grad = None
    return ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_declared_layers_backward_and_decay(dtype, gen, monkeypatch):
    """``ProjectionPenalty(...).backward()`` (into existing and missing ``.grad``) and ``.decay_(rate)``
    on declared layers of many scalar fields, biases included, against the reference penalty."""
    lambdas = dict(lambda_perp={"1": 0.9, "default": 0.4}, lambda_G=0.15)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    model = _declared_model(gen, dtype)
    ref = _reference_copy(model)
    with monkeypatch.context() as mp:
        mp.setenv(ops.ENV_VAR, "reference")
        ref_pen = ProjectionPenalty(ref, **lambdas)
        want_v = ref_pen()
        want_v.backward()
    pen = ProjectionPenalty(model, **lambdas)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    got_v = pen.backward()
    assert abs(float(got_v) - float(want_v)) <= tol * abs(float(want_v))
    for k, (p, q) in enumerate(zip(model.parameters(), ref.parameters())):
        want = q.grad + (1 if k == 0 else 0)
        err = float((p.grad.double() - want).abs().max())
        assert err <= tol * float(want.abs().max()), (k, err)
    # the decoupled step, in place
    before = [p.detach().double().clone() for p in model.parameters()]
    pen.decay_(0.2, 0.05)
    with monkeypatch.context() as mp:
        mp.setenv(ops.ENV_VAR, "reference")
        ref_pen.decay_(0.2, 0.05)
    for k, (p, q, b) in enumerate(zip(model.parameters(), ref.parameters(), before)):
        err = float((p.detach().double() - q.detach()).abs().max())
        assert err <= tol * float(b.abs().max()), (k, err)


def test_penalty_does_not_depend_on_the_thread_count(gen):
    """penalty() (the prepared program and its node), backward() and decay_() with 1 and 2 threads: bitwise equal."""
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            model = _declared_model(torch.Generator().manual_seed(7), torch.float32)
            pen = ProjectionPenalty(model, lambda_perp=0.3, lambda_G=0.2)
            v = pen()
            grads = torch.autograd.grad(v, list(model.parameters()))
            v2 = pen.backward()
            pen.decay_(0.1, 0.02)
            results.append((v.detach(), grads, v2, [p.detach().clone() for p in model.parameters()]))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and float(results[0][2]) == float(other[2])
        assert all(torch.equal(a, b) for a, b in zip(results[0][1], other[1]))
        assert all(torch.equal(a, b) for a, b in zip(results[0][3], other[3]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_trivial_fields_in_a_rotated_basis(dtype, gen):
    """Fields of k copies of the trivial irrep in a random orthonormal basis: a k_out x k_in tile whose
    basis spans it (the spanning route up to 64 entries: 8 x 8; 9 x 9 and 8 x 9 take the general
    kernels), and a field mixing 0e and 0o in one basis, whose tile the basis does not span (r < d_out d_in)."""
    G = equiproj.SO2()

    def rotated(k):
        return Rep.parse(G, f"{k}x0").change_basis(random_orthogonal(k, gen))

    mixed = Rep.parse(O3, "0e + 0o + 0e").change_basis(random_orthogonal(3, gen))
    cases = [(3 * rotated(8) + rotated(9), 40 * rotated(8) + 2 * rotated(9) + rotated(1)),
             (rotated(2) + 5 * rotated(1), 700 * rotated(1) + 3 * rotated(2)),
             (2 * mixed + Rep.parse(O3, "3x0e"), 60 * mixed + Rep.parse(O3, "1o + 5x0e"))]
    for ri, ro in cases:
        W = torch.randn(ro.dim, ri.dim, generator=gen, dtype=torch.float64).to(dtype)
        ep, eg, g = _run(W, ri, ro, 0.45, 0.2)
        _check(W, ri, ro, 0.45, 0.2, ep, eg, g, f"{ri} -> {ro} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_decay_of_a_window_leaves_its_neighbours(dtype, isa, gen):
    """The decoupled step into a window of a larger tensor (rows apart, columns offset): the window is
    stepped as the reference says, the entries around it are not written."""
    ri, ro = Rep.parse(O3, "3x0e + 0o + 2x0e + 0o + 0e"), Rep.parse(O3, "70x0e + 1o + 2x0e")
    P = plan_for(ri, ro, "cpu")
    big = torch.randn(2 * ro.dim, ri.dim + 9, generator=gen, dtype=torch.float64).to(dtype)
    window = big[::2, 4:4 + ri.dim]
    before, W0 = big.clone(), window.clone()
    fused_energies_and_grads([window], [P], [-0.1], [-0.03], outs=[window])
    PW = reference.project(W0.double(), ri, ro)
    want = W0.double() - 0.2 * (W0.double() - PW) - 0.06 * PW
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert float((window.double() - want).abs().max()) <= tol * float(want.abs().max())
    outside = torch.ones(big.shape, dtype=torch.bool)
    outside[::2, 4:4 + ri.dim] = False
    assert torch.equal(big[outside], before[outside])
