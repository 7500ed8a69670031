"""The orbit route: pairs of permutation fields without a basis (docs/math.md §9).

Every backend (C++, the Triton kernel under the interpreter, the pure-torch twin) against the
float64 spatial reference, and for C_4096 against a closed form written with torch ops.
"""

import itertools
import math

import pytest
import torch
from torch import nn

import equiproj
from equiproj import Cyclic, Dihedral, FullOctahedral, Octahedral, Rep
from equiproj import reference
from equiproj._plan import _SMALL_CLOSED_FORM, _SMALL_FIELD, MAX_ORBIT_TABLE, OrbitForm, block_plan, orbit_pair, plan_for
from equiproj.groups._field import monomial_action
from equiproj.grid import kernel_rep
from equiproj.kernels import torch_fused_energies
from equiproj.ops import cpp_available
from equiproj.testing import check_batched_strided_half, nearly_equivariant, relative_error

F64 = torch.float64
needs_cpp = pytest.mark.skipif(not cpp_available(), reason="the C++ extension is not built")


def _square_vertices():
    return torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]], dtype=F64)


def _cube_vertices():
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=3)), dtype=F64)


def _face_centres():
    return torch.cat([torch.eye(3, dtype=F64), -torch.eye(3, dtype=F64)])


def _pairs():
    """(name, rep_in, rep_out) of permutation fields, alone and mixed with irreps fields."""
    out = []
    for N in list(range(1, 18)) + [64]:
        r = Cyclic(N).regular()
        out.append((f"C{N}", 2 * r, 3 * r))
    for N in (1, 2, 3, 4, 5, 8, 17):
        r = Dihedral(N).regular()
        out.append((f"D{N}", 3 * r, 2 * r))
    for G in (Octahedral(), FullOctahedral()):
        out.append((f"{G}", G.regular(), 2 * G.regular()))
    D4, O, Oh = Dihedral(4), Octahedral(), FullOctahedral()
    square = Rep.permutation(D4, points=_square_vertices())  # D4 / (a reflection): a quotient rep
    out.append(("D4-quotient", 2 * square + D4.regular(), 3 * square))
    faces, verts = Rep.permutation(O, points=_face_centres()), Rep.permutation(Oh, points=_cube_vertices())
    out.append(("O-quotient", 2 * faces, O.regular() + faces))
    out.append(("Oh-quotient", verts, 2 * verts + Oh.regular()))
    grid = torch.tensor(list(itertools.product((-1.5, -0.5, 0.5, 1.5), repeat=3)), dtype=F64)
    cube = Rep.permutation(Oh, points=grid)  # one 64-point field of several orbits
    out.append(("Oh-points", cube, cube))
    # mixed: permutation fields with irreps fields (those pairs keep the basis)
    C5, D3 = Cyclic(5), Dihedral(3)
    out.append(("C5-mixed", C5.regular() + C5.standard() + C5.trivial(), 2 * C5.regular() + C5.irrep(2)))
    out.append(("D3-mixed", D3.standard() + 2 * D3.regular(), D3.regular() + D3.irrep((1, 0))))
    return out


PAIRS = {name: (a, b) for name, a, b in _pairs()}


@pytest.fixture(params=sorted(PAIRS))
def pair(request):
    return PAIRS[request.param]


def _grid_pairs():
    C4, D4, O, Oh = Cyclic(4), Dihedral(4), Octahedral(), FullOctahedral()
    return {
        "C4-k3": (2 * C4.regular() @ kernel_rep(C4, (3, 3)), 3 * C4.regular()),
        "C4-k5": (C4.regular() @ kernel_rep(C4, (5, 5)), 2 * C4.regular()),
        "D4-k3": (2 * D4.regular() @ kernel_rep(D4, (3, 3)), D4.regular()),
        "D4-k5": (D4.regular() @ kernel_rep(D4, (5, 5)), 2 * D4.regular()),
        "O-k3": (O.regular() @ kernel_rep(O, (3, 3, 3)), O.regular()),
        "Oh-k3": (Oh.regular() @ kernel_rep(Oh, (3, 3, 3)), Oh.regular()),
        # the whole grid as one permutation field: rep_in ⊗ pixels is one field per input copy, in the
        # weight's own column order (what declare() builds for permutation input fields)
        "C4-k5-field": (3 * C4.regular() @ kernel_rep(C4, (5, 5), orbits=False), 2 * C4.regular()),
        "D4-k3-field": (2 * D4.regular() @ kernel_rep(D4, (3, 3), orbits=False), 3 * D4.regular()),
        "O-k3-field": (O.regular() @ kernel_rep(O, (3, 3, 3), orbits=False), O.regular()),
        "C2-k3-field": (3 * Cyclic(2).regular() @ kernel_rep(Cyclic(2), (3, 3), orbits=False), 2 * Cyclic(2).regular()),
        "Oh-k3-field": (Oh.regular() @ kernel_rep(Oh, (3, 3, 3), orbits=False), Oh.regular()),
        "D4-quotient-k3-field": (Rep.permutation(D4, points=_square_vertices()) @ kernel_rep(D4, (3, 3), orbits=False),
                                 D4.regular()),
    }


GRID_PAIRS = _grid_pairs()


@pytest.fixture(params=sorted(GRID_PAIRS))
def grid_pair(request):
    return GRID_PAIRS[request.param]


def _orbit_rows(rep_in, rep_out):
    return [r for r in plan_for(rep_in, rep_out, "cpu").rows() if r.orbits]


# ---- the plan ---------------------------------------------------------------------------------------
def test_permutation_pairs_are_orbit_pairs_without_a_basis(pair):
    rep_in, rep_out = pair
    P = plan_for(rep_in, rep_out, "cpu")
    for row in P.rows():
        fo = _field_at(rep_out, row.out_offset)
        fi = _field_at(rep_in, row.in_offset)
        both = fo.permutation is not None and fi.permutation is not None
        closed = both and fo.permutation.regular and fi.permutation.regular and fo.dim == fi.dim
        # the smallest pairs keep the basis (the small-tile kernels are faster), but for C_4 and D_2
        # regular fields, whose 4x4 tiles the one-pass closed-form kernel takes
        both = both and (max(fo.dim, fi.dim) > _SMALL_FIELD or (closed and fo.dim == _SMALL_CLOSED_FORM))
        # a permutation field and a field of signed permutations (an irrep of +-1): signed orbits
        signed = (not both and max(fo.dim, fi.dim) > _SMALL_FIELD and monomial_action(fo) is not None
                  and monomial_action(fi) is not None)
        assert bool(row.orbits) == (both or signed)
        assert (row.orbit_form == OrbitForm.SIGNED) == signed
        both = both or signed
        if both:  # K orbits = dim Hom_G(f_in, f_out), from the characters
            els = rep_in.group.elements()
            chi = lambda f: f.matrix(els).diagonal(dim1=-2, dim2=-1).sum(-1)  # noqa: E731
            assert row.orbits == row.rank == round(float((chi(fo) * chi(fi)).mean()))


def _field_at(rep, offset):
    o = 0
    for c, f in rep.segments:
        if o == offset:
            return f
        o += c * f.dim
    raise AssertionError(f"no field at {offset}")


def test_orbit_tables_are_the_orbits_of_all_elements(gen):
    """The table from the generators' graph against orbits found by brute force over all elements."""
    G = FullOctahedral()
    for fo, fi in ((G.regular(), Rep.permutation(G, points=_cube_vertices())),
                   (Rep.permutation(G, points=_face_centres()), Rep.permutation(G, points=_cube_vertices()))):
        fo, fi = fo.segments[0][1], fi.segments[0][1]
        K, form, data = orbit_pair(fo, fi)
        assert form == OrbitForm.TABLE
        o = data[: fo.dim * fi.dim].long().reshape(fo.dim, fi.dim)
        so, si = fo.permutation.element_table(), fi.permutation.element_table()  # [|G|, d]
        for a, b in [(0, 0), (fo.dim - 1, 3), (2, fi.dim - 1)]:
            orbit = set(zip(so[:, a].tolist(), si[:, b].tolist()))
            assert {(x, y) for x in range(fo.dim) for y in range(fi.dim) if o[x, y] == o[a, b]} == orbit
        sizes = torch.bincount(o.reshape(-1), minlength=K).double()
        torch.testing.assert_close(data[fo.dim * fi.dim :], 1 / sizes, rtol=0, atol=0)


def test_closed_forms_match_the_orbits_of_the_elements():
    for G, form in ((Cyclic(7), OrbitForm.CYCLIC), (Dihedral(5), OrbitForm.DIHEDRAL), (Dihedral(4), OrbitForm.DIHEDRAL)):
        P = plan_for(G.regular(), G.regular(), "cpu")
        (row,) = P.rows()
        assert row.orbit_form == form and P.basis.numel() == 0
        o, inv, _ = P.orbit_index(row, "cpu")
        o = o.reshape(row.d_out, row.d_in)
        table = G.regular_table()  # [|G|, |G|]: sigma of every element
        for a, b in [(0, 1), (3, 2), (row.d_out - 1, 0)]:
            orbit = set(zip(table[:, a].tolist(), table[:, b].tolist()))
            assert {(x, y) for x in range(row.d_out) for y in range(row.d_in) if o[x, y] == o[a, b]} == orbit
        assert torch.equal(inv, torch.full((row.orbits,), 1.0 / row.d_out, dtype=F64))


# ---- energies, gradients, projection against the reference ------------------------------------------
def _check_backend(W, rep_in, rep_out, backend, tol):
    e_perp, e_g, grad = equiproj.energies_and_grad(W, rep_in, rep_out, lambda_perp=1.0, lambda_G=0.25, backend=backend)
    ref_p, ref_g = reference.energies(W.double(), rep_in, rep_out)
    PW = reference.project(W.double(), rep_in, rep_out)
    assert relative_error(e_perp, ref_p) < tol and relative_error(e_g, ref_g) < tol
    want = 2 * (W.double() - PW) + 0.5 * PW
    assert float((grad.double() - want).abs().max()) <= tol * float(want.abs().max())


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_energies_and_gradients_match_the_reference(pair, backend, gen):
    rep_in, rep_out = pair
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
    _check_backend(W, rep_in, rep_out, backend, 1e-12)
    _check_backend(W.float(), rep_in, rep_out, backend, 1e-5)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_grid_convolutions_match_the_reference(grid_pair, backend, gen):
    rep_in, rep_out = grid_pair
    assert _orbit_rows(rep_in, rep_out), "a grid convolution on regular fields is all orbit pairs"
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
    _check_backend(W, rep_in, rep_out, backend, 1e-12)
    _check_backend(W.float(), rep_in, rep_out, backend, 1e-5)


def test_triton_kernel_matches_the_reference(gen):
    kernels = pytest.importorskip("equiproj.kernels.triton_energies")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (conftest.py)
    cases = [PAIRS[k] for k in ("C7", "C8", "D3", "D4", "Octahedral()", "Oh-quotient", "C5-mixed")]
    cases += [GRID_PAIRS["D4-k3"], GRID_PAIRS["D4-k3-field"], GRID_PAIRS["C4-k5-field"],
              GRID_PAIRS["O-k3-field"]]  # O: a 24 x 648 product tile, its orbits taken in two chunks
    for (rep_in, rep_out), dtype in zip(cases, itertools.cycle([torch.float32, torch.bfloat16, torch.float16])):
        W = torch.randn(2, rep_out.dim, rep_in.dim, generator=gen).to(device=device, dtype=dtype)
        P = plan_for(rep_in, rep_out, device, torch.float32)
        lambda_perp, lambda_G = torch.tensor([1.0, 0.5]), torch.tensor([0.25, 0.0])
        flat = list(W.unbind(0))
        ep, eg, grads = kernels.fused_energies(flat, [P, P], lambda_perp, lambda_G)
        flat = [w.cpu() for w in flat]
        tol = 2e-5 if dtype == torch.float32 else 1e-2  # half precision: the gradient is stored in W's dtype
        for k in range(2):
            ref_p, ref_g = reference.energies(flat[k].double(), rep_in, rep_out)
            PW = reference.project(flat[k].double(), rep_in, rep_out)
            assert relative_error(ep[k].cpu(), ref_p) < 2e-5 and relative_error(eg[k].cpu(), ref_g) < 2e-5
            want = 2 * float(lambda_perp[k]) * (flat[k].double() - PW) + 2 * float(lambda_G[k]) * PW
            assert float((grads[k].cpu().double() - want).abs().max()) <= tol * float(want.abs().max())
        # accumulate into given tensors in place (the decoupled step adds into the weight itself)
        outs = [w.to(device).clone() for w in flat]
        kernels.fused_energies([w.to(device) for w in flat[:1]], [P], lambda_perp[:1], lambda_G[:1], outs=outs[:1])
        outs = [o.cpu() for o in outs]
        ref = flat[0].double() + 2 * (flat[0].double() - reference.project(flat[0].double(), rep_in, rep_out)) \
            + 0.5 * reference.project(flat[0].double(), rep_in, rep_out)
        assert float((outs[0].double() - ref).abs().max()) <= (3e-5 if dtype == torch.float32 else 2e-2) * float(ref.abs().max())


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_batched_non_contiguous_and_half_precision(backend, gen):
    G = Dihedral(5)
    check_batched_strided_half(2 * G.regular() + G.standard(), 3 * G.regular(), backend, gen)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_nearly_equivariant_weights_keep_their_digits(backend, gen):
    for rep_in, rep_out in (PAIRS["C16"], PAIRS["D5"], PAIRS["Oh-quotient"], GRID_PAIRS["C4-k3"],
                            GRID_PAIRS["D4-k3-field"], GRID_PAIRS["Oh-k3-field"], GRID_PAIRS["C2-k3-field"]):
        W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
        Wn = nearly_equivariant(W, rep_in, rep_out, 1e-10, gen)
        ep, eg = equiproj.energies(Wn, rep_in, rep_out, backend=backend)
        rp, rg = reference.energies(Wn, rep_in, rep_out)
        assert 1e-12 < float(rp / Wn.square().sum()) < 1e-8
        assert relative_error(ep, rp) < 1e-6 and relative_error(eg, rg) < 1e-12


def test_gradcheck_float64(gen):
    for rep_in, rep_out in (PAIRS["C7"], PAIRS["D3"], PAIRS["D4-quotient"]):
        for backend in ("torch",) + (("cpp",) if cpp_available() else ()):
            W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen, requires_grad=True)
            torch.autograd.gradcheck(lambda w: equiproj.energies(w, rep_in, rep_out, backend=backend), (W,))


def test_projection_is_the_orbit_mean(pair, gen):
    rep_in, rep_out = pair
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
    PW = equiproj.project(W, rep_in, rep_out)
    torch.testing.assert_close(PW, reference.project(W, rep_in, rep_out), atol=1e-12, rtol=0)
    R = equiproj.project(W, rep_in, rep_out, which="non_equivariant")
    torch.testing.assert_close(R, W - PW, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_accumulate_into_grad_and_into_the_weight(backend, gen):
    rep_in, rep_out = PAIRS["C8"]
    W = torch.randn(rep_out.dim, rep_in.dim, generator=gen)
    P = plan_for(rep_in, rep_out, "cpu")
    grad = torch.randn_like(W)
    expected = grad.double() + 2 * 0.5 * (W.double() - reference.project(W.double(), rep_in, rep_out))
    equiproj.ops.fused_energies_and_grads([W], [P], [0.5], [0.0], outs=[grad]) if backend == "cpp" else None
    if backend == "torch":
        _, _, (g,) = torch_fused_energies([W], [plan_for(rep_in, rep_out, "cpu", torch.float32)],
                                          torch.tensor([0.5]), torch.tensor([0.0]))
        grad += g
    torch.testing.assert_close(grad.double(), expected, atol=1e-5, rtol=1e-5)
    # the decoupled step: W <- W - rate (W - P W), the op adding into W itself
    if backend == "cpp":
        rate = 0.1
        want = W.double() - rate * (W.double() - reference.project(W.double(), rep_in, rep_out))
        equiproj.ops.fused_energies_and_grads([W], [P], [-rate / 2], [0.0], outs=[W])
        torch.testing.assert_close(W.double(), want, atol=1e-5, rtol=1e-5)


@needs_cpp
def test_penalty_backward_and_decay_on_grid_convolutions(seed):
    G = Dihedral(4)
    hidden = 2 * G.regular()
    conv = equiproj.nn.declare(nn.Conv2d(hidden.dim, hidden.dim, 3, bias=False), hidden, hidden)
    model = nn.Sequential(conv)
    penalty = equiproj.nn.ProjectionPenalty(model, lambda_perp=0.5)
    W = conv.weight.detach().clone()
    rep_in = hidden @ kernel_rep(G, (3, 3))
    Wm = W.double().reshape(W.shape[0], -1)
    PW = reference.project(Wm, rep_in, hidden).reshape(W.shape)
    conv.weight.grad = torch.ones_like(W)
    penalty.backward()
    torch.testing.assert_close(conv.weight.grad.double(), 1 + 2 * 0.5 * (W.double() - PW), atol=1e-5, rtol=1e-5)
    penalty.decay_(0.25)
    torch.testing.assert_close(conv.weight.detach().double(), W.double() - 0.25 * (W.double() - PW), atol=1e-5, rtol=1e-5)


def test_grid_field_is_the_grid_in_flatten_order():
    for G, k in ((Cyclic(4), (5, 5)), (Dihedral(4), (3, 3)), (FullOctahedral(), (3, 3, 3))):
        whole, split = kernel_rep(G, k, orbits=False), kernel_rep(G, k)
        assert whole.perm is None and len(whole.segments) == 1 and whole.segments[0][0] == 1
        g = G.elements()
        torch.testing.assert_close(whole.matrix(g), split.matrix(g), atol=0, rtol=0)  # the same representation
        rep_in = 3 * G.regular() @ whole
        assert rep_in.perm is None or torch.equal(rep_in.perm, torch.arange(rep_in.dim))


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_cpp), "torch"])
def test_declared_grid_convolutions_read_the_weight_in_place(backend, gen):
    """declare() on permutation fields: one orbit pair per field-pair type, no permutation of W, and
    energies and gradients of batched, strided and half-precision weights against the reference."""
    O = Octahedral()
    for G, k, conv, rep_out in ((Cyclic(4), (5, 5), nn.Conv2d, 2 * Cyclic(4).regular() + Cyclic(4).trivial()),
                                (Dihedral(4), (3, 3), nn.Conv2d, 2 * Dihedral(4).regular() + Dihedral(4).trivial()),
                                (O, (3, 3, 3), nn.Conv3d, 2 * O.regular())):  # a product pair of 24 x 648 tiles
        rep_in = 3 * G.regular()
        decl = equiproj.nn.declaration(equiproj.nn.declare(conv(rep_in.dim, rep_out.dim, k, bias=False), rep_in, rep_out))
        P = plan_for(decl.weight_rep_in, decl.rep_out, "cpu")
        assert P.identity_perm and all(r.orbits for r in P.rows() if r.d_out > 1)
        ref_in = rep_in @ kernel_rep(G, k)  # the same rep through the grid's orbits
        base = torch.randn(2, decl.weight_rep_in.dim, 2 * rep_out.dim, dtype=F64, generator=gen)
        W = base[..., ::2].transpose(-1, -2)  # [2, m, n], strided
        ep, eg = equiproj.energies(W, decl.weight_rep_in, decl.rep_out, backend=backend)
        rp, rg = reference.energies(W, ref_in, rep_out)
        assert relative_error(ep, rp) < 1e-12 and relative_error(eg, rg) < 1e-12
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
            Wh = W.to(dtype)
            _, _, grad = equiproj.energies_and_grad(Wh, decl.weight_rep_in, decl.rep_out, backend=backend)
            want = 2 * (Wh.double() - reference.project(Wh.double(), ref_in, rep_out))
            assert grad.dtype == dtype and float((grad.double() - want).abs().max()) <= tol * float(want.abs().max())


def test_grid_convolutions_on_regular_fields_are_product_pairs():
    """Regular output fields: rep_in ⊗ pixels is one field per input copy whatever its size, indexed by
    two factor tables (|G| (|G| + k^s) numbers, not |G|^2 k^s); other output fields keep the grid's
    orbits for large products."""
    for G, k, conv, copies in ((Octahedral(), (3, 3, 3), nn.Conv3d, 4), (FullOctahedral(), (3, 3, 3), nn.Conv3d, 2),
                               (Cyclic(4), (5, 5), nn.Conv2d, 96)):
        rep = copies * G.regular()
        m = equiproj.nn.declare(conv(rep.dim, rep.dim, k, bias=False), rep, rep)
        decl = equiproj.nn.declaration(m)
        assert len(decl.weight_rep_in.segments) == 1 and decl.weight_rep_in.perm is None
        P = plan_for(decl.weight_rep_in, decl.rep_out, "cpu")
        (row,) = P.rows()
        assert row.orbit_form == OrbitForm.PRODUCT and P.identity_perm
        assert P.basis.numel() == 1 + G.order * (G.order + math.prod(k))
        assert P.basis.numel() <= 0.015 * m.weight.numel()  # 2 x O_h regular on 3x3x3: 1.4 %; 4 x O: 0.5 %
    Oh = FullOctahedral()
    decl = equiproj.nn.declaration(equiproj.nn.declare(nn.Conv3d(48, 49, 3, bias=False), Oh.regular(),
                                                       Oh.regular() + Oh.trivial()))
    assert len(decl.weight_rep_in.segments) > 1  # one field per orbit of the 27 points: tiles stay small


def test_product_orbits_are_the_orbits_of_all_elements():
    """The factor tables of a product pair against orbits found by brute force over all elements."""
    for name in ("C4-k5-field", "D4-k3-field", "O-k3-field", "Oh-k3-field", "C2-k3-field"):
        rep_in, rep_out = GRID_PAIRS[name]
        P = plan_for(rep_in, rep_out, "cpu")
        row = P.rows()[0]
        assert row.orbit_form == OrbitForm.PRODUCT and row.orbits == row.d_in
        o, inv, _ = P.orbit_index(row, "cpu")
        o = o.reshape(row.d_out, row.d_in)
        so = rep_out.segments[0][1].permutation.element_table()
        si = rep_in.segments[0][1].permutation.element_table()
        for a, b in [(0, 0), (row.d_out - 1, 3), (1, row.d_in - 1), (row.d_out // 2, row.d_in // 2)]:
            orbit = set(zip(so[:, a].tolist(), si[:, b].tolist()))
            assert {(x, y) for x in range(row.d_out) for y in range(row.d_in) if o[x, y] == o[a, b]} == orbit
        assert torch.equal(inv, torch.full((row.orbits,), 1.0 / row.d_out, dtype=F64))


def _index_cases(copies: int):
    """(name, rep_in, rep_out) of orbit pairs with an index (products and tables) with ``copies`` input
    copies (1 .. 9 leave 0 .. 3 tiles past the kernel's groups of four), some with tile rows that are
    not whole vectors (18 and 6 columns)."""
    C2, D4, Oh = Cyclic(2), Dihedral(4), FullOctahedral()
    verts = Rep.permutation(Oh, points=_cube_vertices())
    square = Rep.permutation(D4, points=_square_vertices())
    return [("C2-k3", copies * C2.regular() @ kernel_rep(C2, (3, 3), orbits=False), 2 * C2.regular()),
            ("D4-k3", copies * D4.regular() @ kernel_rep(D4, (3, 3), orbits=False), 2 * D4.regular()),
            ("D4-quotient-k3", copies * square @ kernel_rep(D4, (3, 3), orbits=False), D4.regular()),
            ("Oh-quotient", copies * verts, 2 * verts + Oh.regular()),
            ("Oh-faces", copies * Rep.permutation(Oh, points=_face_centres()), verts)]


@needs_cpp
@pytest.mark.parametrize("isa", ["best", "baseline"])
def test_orbit_index_kernels_on_every_copy_count(isa, gen):
    """Products and tables, 1 .. 9 input copies: energies, gradients written, added into a tensor and
    into the weight itself, and nearly equivariant float32 weights, against the reference."""
    previous = torch.ops.equiproj_cpu.set_isa(isa)
    try:
        for copies in (1, 2, 3, 4, 5, 6, 7, 9):
            for name, rep_in, rep_out in _index_cases(copies):
                assert _orbit_rows(rep_in, rep_out), name
                W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
                _check_backend(W, rep_in, rep_out, "cpp", 1e-12)
                _check_backend(W.float(), rep_in, rep_out, "cpp", 1e-5)
                Wn = nearly_equivariant(W, rep_in, rep_out, 1e-10, gen).float()
                ep, _ = equiproj.energies(Wn, rep_in, rep_out, backend="cpp")
                rp, _ = reference.energies(Wn.double(), rep_in, rep_out)
                assert 1e-12 < float(rp / Wn.double().square().sum()) < 1e-8
                assert relative_error(ep, rp) < 1e-5, (name, copies)
                P = plan_for(rep_in, rep_out, "cpu")
                Wf = W.float()
                PW = reference.project(Wf.double(), rep_in, rep_out)
                grad = torch.randn_like(Wf)
                want = grad.double() + 2 * 0.5 * (Wf.double() - PW) + 2 * 0.125 * PW
                equiproj.ops.fused_energies_and_grads([Wf], [P], [0.5], [0.125], outs=[grad])
                torch.testing.assert_close(grad.double(), want, atol=1e-5, rtol=1e-5)
                want = Wf.double() - 0.1 * (Wf.double() - PW)  # the decoupled step, added into W itself
                equiproj.ops.fused_energies_and_grads([Wf], [P], [-0.05], [0.0], outs=[Wf])
                torch.testing.assert_close(Wf.double(), want, atol=1e-5, rtol=1e-5)
    finally:
        torch.ops.equiproj_cpu.set_isa(previous)


def _float32_weights_and_references(W, rep_in, rep_out, gen):
    """W and a nearly equivariant weight made from it (E_perp / ||W||^2 ~ 1e-10), each in float32 with its
    float64 reference: ``(W_f32, E_perp, E_G, P(W_f32))``."""
    for Wd in (W, nearly_equivariant(W, rep_in, rep_out, 1e-10, gen)):
        Wf = Wd.float()
        rp, rg = reference.energies(Wf.double(), rep_in, rep_out)
        yield Wf, rp, rg, reference.project(Wf.double(), rep_in, rep_out)


def _check_float32_on_two_thread_counts(Wf, rep_in, rep_out, P, references, gen, name):
    """The float32 weight ``Wf`` (plan ``P``) against its float64 ``references`` ``(E_perp, E_G, P(Wf))``:
    energies, the gradient written, added into a tensor and added into the weight itself (the decoupled
    step), on one and on two threads, which give the same bits. Returns the gradient written."""
    rp, rg, PW = references
    bits = []
    for n in (1, 2):
        torch.set_num_threads(n)
        ep, eg, fresh = equiproj.energies_and_grad(Wf, rep_in, rep_out, lambda_perp=1.0, lambda_G=0.25, backend="cpp")
        assert relative_error(ep, rp) < 1e-5 and relative_error(eg, rg) < 1e-6, (name, n)
        for grad, lp, lg in ((fresh, 1.0, 0.25), (torch.randn(Wf.shape, generator=gen), 0.5, 0.125)):
            want = 2 * lp * (Wf.double() - PW) + 2 * lg * PW
            if grad is not fresh:  # added into a tensor
                want += grad.double()
                equiproj.ops.fused_energies_and_grads([Wf], [P], [lp], [lg], outs=[grad])
            error = float((grad.double() - want).abs().max())
            assert error <= 1e-6 * float(want.abs().max()), (name, n)
        Wi = Wf.clone()  # the decoupled step, added into the weight itself
        equiproj.ops.fused_energies_and_grads([Wi], [P], [-0.05], [0.0], outs=[Wi])
        step = Wf.double() - 0.1 * (Wf.double() - PW)
        assert float((Wi.double() - step).abs().max()) <= 1e-6 * float(step.abs().max()), (name, n)
        bits.append((ep, eg, fresh, Wi))
    assert all(torch.equal(a, b) for a, b in zip(*bits)), name
    return bits[0][2]


def _product_block_cases(copies: int):
    """(name, rep_in, rep_out) of product pairs whose kernels have 17 .. 32 pixels (5 x 5, 3 x 3 x 3): with
    AVX-512, their column blocks run in two registers (csrc/orbit_products.cpp), with ``copies`` input
    copies of a regular or a quotient field (the 3-D one up to three: its reference is slow), one or two
    output copies."""
    C4, D2, D4, O = Cyclic(4), Dihedral(2), Dihedral(4), Octahedral()
    square = Rep.permutation(D4, points=_square_vertices())
    cases = [("C4-k5", copies * C4.regular() @ kernel_rep(C4, (5, 5), orbits=False), 2 * C4.regular()),
             ("D2-k5", copies * D2.regular() @ kernel_rep(D2, (5, 5), orbits=False), D2.regular()),
             ("D4-quotient-k5", copies * square @ kernel_rep(D4, (5, 5), orbits=False), D4.regular())]
    if copies <= 3:
        cases.append(("O-k3x3x3", copies * O.regular() @ kernel_rep(O, (3, 3, 3), orbits=False), O.regular()))
    return cases


@needs_cpp
@pytest.mark.parametrize("isa", ["best", "avx2"])
def test_product_blocks_of_whole_kernels(isa, gen):
    """Product pairs of 25 and 27 pixels, 1 .. 5 input copies, in float32 (the kernel whose column blocks
    fill two registers where the CPU has AVX-512, the tables' kernel with ``avx2``): energies, the
    gradient written, added into a tensor and into the weight itself, on random and on nearly equivariant
    weights, against the float64 reference; one and two threads give the same bits."""
    previous = torch.ops.equiproj_cpu.set_isa(isa)
    threads = torch.get_num_threads()
    try:
        for copies in (1, 2, 3, 5):
            for name, rep_in, rep_out in _product_block_cases(copies):
                P = plan_for(rep_in, rep_out, "cpu")
                assert {r.orbit_form for r in P.rows()} == {OrbitForm.PRODUCT}, name
                W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
                for Wf, *references in _float32_weights_and_references(W, rep_in, rep_out, gen):
                    _check_float32_on_two_thread_counts(Wf, rep_in, rep_out, P, references, gen, (name, copies))
    finally:
        torch.set_num_threads(threads)
        torch.ops.equiproj_cpu.set_isa(previous)


@needs_cpp
def test_product_pairs_of_2048_rows(gen):
    """A product pair whose regular output field has 2048 rows, twice the row chunk of the closed forms
    (whose chunk kernels do not apply to it), in float32 and float64 on every instruction set, against
    the orbit means formed with torch ops from the plan's orbit of every entry (the reference would
    average over 2048 elements)."""
    G = Cyclic(2048)

    def on_points(M):  # C_2048 turning M points of a circle
        return Rep.permutation(G, action=lambda g: (G.index(g)[..., None] + torch.arange(M)) % M, size=M)

    rep_in, rep_out = on_points(2) @ on_points(32), G.regular()
    P = plan_for(rep_in, rep_out, "cpu")
    (row,) = P.rows()
    assert row.orbit_form == OrbitForm.PRODUCT and row.d_out == 2048 and P.identity_perm
    o = P.orbit_index(row, "cpu")[0].reshape(-1).long()
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
    previous = torch.ops.equiproj_cpu.set_isa("best")
    try:
        for isa in ("best", "avx2", "baseline"):
            torch.ops.equiproj_cpu.set_isa(isa)
            for dtype, tol in ((torch.float32, 1e-5), (F64, 1e-12)):
                Wd = W.to(dtype)
                w = Wd.double().reshape(-1)
                means = torch.zeros(row.orbits, dtype=F64).index_add_(0, o, w) / torch.bincount(o).double()
                PW = means[o]
                ep, eg, grad = equiproj.energies_and_grad(Wd, rep_in, rep_out, lambda_perp=1.0, lambda_G=0.25,
                                                         backend="cpp")
                assert relative_error(ep, (w - PW).square().sum()) < tol, (isa, dtype)
                assert relative_error(eg, PW.square().sum()) < tol, (isa, dtype)
                want = (2 * (w - PW) + 0.5 * PW).reshape(W.shape)
                assert float((grad.double() - want).abs().max()) <= tol * float(want.abs().max()), (isa, dtype)
    finally:
        torch.ops.equiproj_cpu.set_isa(previous)


def _few_orbit_table_cases():
    """(name, weight_rep_in, reference rep_in, rep_out): grid convolutions on irreps fields of C4 and D4, with
    signed orbit tables (entries of sign 0 among them) and unsigned ones: 3 x 3 kernels (1 .. 10 orbits a
    tile: the means in two, four and eight registers) with 8, 9 and 17 copies of each input irrep (the pivot
    pass takes groups of eight tiles: none, one and one tile are left over) and one or two copies of each
    output irrep; and 5 x 5 kernels (6 .. 26 orbits: C4's tiles of 26 stay on the eight-lane pass) with 9."""
    for G in (Cyclic(4), Dihedral(4)):
        irreps = G.irreps()
        for k, copies_in, copies_out in ((3, 8, 1), (3, 9, 2), (3, 17, 1), (5, 9, 1)):
            rep_in = sum((copies_in * p for p in irreps[1:]), copies_in * irreps[0])
            rep_out = sum((copies_out * p for p in irreps[1:]), copies_out * irreps[0])
            m = equiproj.nn.declare(nn.Conv2d(rep_in.dim, rep_out.dim, k, bias=False), rep_in, rep_out)
            weight_rep_in = equiproj.nn.declaration(m).weight_rep_in
            yield f"{G}-k{k}-{copies_in}x{copies_out}", weight_rep_in, rep_in @ kernel_rep(G, (k, k)), rep_out


@needs_cpp
@pytest.mark.parametrize("isa", ["best", "avx2"])
def test_permuted_means_of_few_orbit_tables(isa, gen):
    """Orbit tables of at most sixteen orbits a tile in float32 (with AVX-512, pass 2 of the pivot pass's
    groups of eight tiles reads each entry's mean from registers, csrc/orbit_tables.cpp; the eight-lane pass
    with ``avx2``): energies, the gradient written, added into a tensor and into the weight itself, on random
    and on nearly equivariant weights, against the float64 reference; one and two threads give the same
    bits, and the gradient has the bits of the eight-lane pass (the sign of its zeros too)."""
    previous = torch.ops.equiproj_cpu.set_isa(isa)
    threads = torch.get_num_threads()
    try:
        registers = set()  # registers per table of means (8 K floats, 16 a register) that the cases reach
        for name, weight_rep_in, ref_in, rep_out in _few_orbit_table_cases():
            P = plan_for(weight_rep_in, rep_out, "cpu")
            few = [r for r in P.rows() if r.orbit_form in (OrbitForm.TABLE, OrbitForm.SIGNED) and 0 < r.orbits <= 16]
            assert {r.orbit_form for r in few} == {OrbitForm.TABLE, OrbitForm.SIGNED}, name
            assert min(r.in_copies for r in few) >= 8, name
            registers |= {min(n for n in (2, 4, 8) if 8 * r.orbits <= 16 * n) for r in few}
            W = torch.randn(rep_out.dim, ref_in.dim, dtype=F64, generator=gen)
            for Wf, *references in _float32_weights_and_references(W, ref_in, rep_out, gen):
                grad = _check_float32_on_two_thread_counts(Wf, weight_rep_in, rep_out, P, references, gen, name)
                # the eight-lane pass's bits, the sign of zero included (lambda_perp = 0: the gradient's zeros)
                grads = [grad, equiproj.energies_and_grad(Wf, weight_rep_in, rep_out, lambda_perp=0.0, lambda_G=1.0,
                                                          backend="cpp")[2]]
                torch.ops.equiproj_cpu.set_isa("avx2")
                eight_lanes = [equiproj.energies_and_grad(Wf, weight_rep_in, rep_out, lambda_perp=lp, lambda_G=lg,
                                                          backend="cpp")[2] for lp, lg in ((1.0, 0.25), (0.0, 1.0))]
                torch.ops.equiproj_cpu.set_isa(isa)
                for got, want in zip(grads, eight_lanes):
                    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), name
        assert registers == {2, 4, 8}
    finally:
        torch.set_num_threads(threads)
        torch.ops.equiproj_cpu.set_isa(previous)


@needs_cpp
@pytest.mark.parametrize("isa", ["best", "baseline"])
def test_float32_grid_convolutions_on_both_isas_and_thread_counts(isa, check_penalty_step, gen):
    """Declared grid convolutions with four or more input copies in float32 (the weight read in place:
    with AVX2, pass 2 in float32 lanes with split means, groups of four tiles and the tiles past them):
    energies, ``penalty.backward()`` into ``.grad`` and ``decay_`` against the reference, nearly
    equivariant weights keeping their digits, and the same bits on one and on two threads."""
    previous = torch.ops.equiproj_cpu.set_isa(isa)
    threads = torch.get_num_threads()
    try:
        for G, k, conv, c_in, c_out in ((Cyclic(4), (5, 5), nn.Conv2d, 9, 2),  # 100 columns: 8-steps, a 4-step
                                        (Dihedral(4), (3, 3), nn.Conv2d, 6, 1),  # 72 columns; a pair of tiles
                                        (Octahedral(), (3, 3, 3), nn.Conv3d, 5, 1)):  # 648 columns; a last tile
            rep_in, rep_out = c_in * G.regular(), c_out * G.regular()
            m = equiproj.nn.declare(conv(rep_in.dim, rep_out.dim, k, bias=False), rep_in, rep_out)
            decl = equiproj.nn.declaration(m)
            ref_in = rep_in @ kernel_rep(G, k)  # the same rep through the grid's orbits
            W = torch.randn(rep_out.dim, ref_in.dim, dtype=F64, generator=gen)
            for Wf, rp, rg, PW in _float32_weights_and_references(W, ref_in, rep_out, gen):
                results = []
                for n in (1, 2):
                    torch.set_num_threads(n)
                    ep, eg, grad = equiproj.energies_and_grad(Wf, decl.weight_rep_in, rep_out, lambda_perp=1.0,
                                                             lambda_G=0.25, backend="cpp")
                    results.append((ep, eg, grad))
                    assert relative_error(ep, rp) < 1e-5 and relative_error(eg, rg) < 1e-6, (G, n)
                    want = 2 * (Wf.double() - PW) + 0.5 * PW
                    assert float((grad.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())
                assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))
            check_penalty_step(m, W, ref_in, rep_out)
    finally:
        torch.set_num_threads(threads)
        torch.ops.equiproj_cpu.set_isa(previous)


@needs_cpp
def test_octahedral_conv3d_grid(seed):
    Oh = FullOctahedral()
    conv = equiproj.nn.declare(nn.Conv3d(48, 48, 3, bias=False), Oh.regular(), Oh.regular())
    penalty = equiproj.nn.ProjectionPenalty(nn.Sequential(conv), lambda_perp=1.0)
    W = conv.weight.detach().double().reshape(48, -1)
    rep_in = Oh.regular() @ kernel_rep(Oh, (3, 3, 3))
    ref_p, _ = reference.energies(W, rep_in, Oh.regular())
    assert relative_error(penalty().detach(), ref_p) < 1e-5


# ---- large regular representations -----------------------------------------------------------------
def test_regular_reps_are_built_without_dense_matrices():
    for G in (Cyclic(65536), Dihedral(65536)):
        rep = G.regular()
        (c, f), = rep.segments
        assert rep.dim == G.order and f.permutation.regular
        assert f._slots is None and f._Q is None  # nothing of size |G| x |G|, not even the slots
        gens = f.permutation.generator_table()
        assert gens.shape == (len(G.generators()), G.order)
        assert torch.equal(gens.sort(1).values, torch.arange(G.order).expand_as(gens))


def test_permutation_reps_are_index_tables():
    Oh = FullOctahedral()
    pts = torch.tensor(list(itertools.product(range(16), repeat=3)), dtype=F64) - 7.5
    rep = Rep.permutation(Oh, points=pts)  # 4096 points
    (c, f), = rep.segments
    assert f._Q is None and f.permutation.element_table().shape == (48, 4096)
    assert sum(s.dim for s in f.slots) == 4096 and f._Q is None  # multiplicities from the characters
    g = Oh.elements()[[5, 17]]
    moved = torch.einsum("gij,nj->gni", g, pts)
    sigma = f.permutation.sigma(g)
    torch.testing.assert_close(pts[sigma], moved)
    with pytest.raises(ValueError, match="onto themselves"):
        Rep.permutation(Oh, points=pts[:-1])


def test_quotient_decomposition_on_demand(gen):
    """A permutation field's Q is derived when a pair with an irreps field needs it, in the order of its slots."""
    O = Octahedral()
    faces = Rep.permutation(O, points=_face_centres())
    f = faces.segments[0][1]
    g = O.sample(5, generator=gen)
    from equiproj.groups._decompose import block_diag_irreps
    torch.testing.assert_close(f.Q @ block_diag_irreps(f.slots, g) @ f.Q.T, f.matrix(g), atol=1e-10, rtol=0)
    rep_in, rep_out = faces + O.standard(), 2 * faces
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
    assert relative_error(equiproj.energies(W, rep_in, rep_out)[0], reference.energies(W, rep_in, rep_out)[0]) < 1e-12


def _cyclic_oracle(W: torch.Tensor, N: int):
    """E_perp, E_G of a C_N regular x regular weight from its wrapped diagonals: orbit k is the
    entries (a, (a + k) mod N), whose sum is diagonal k plus diagonal k - N."""
    W = W.double()
    sums = torch.stack([W.diagonal(k).sum() + (W.diagonal(k - N).sum() if k else 0) for k in range(N)])
    e_g = sums.square().sum() / N
    means = sums / N
    e_perp = sum(((W.diagonal(k) - means[k]).square().sum()
                  + ((W.diagonal(k - N) - means[k]).square().sum() if k else 0)) for k in range(N))
    return e_perp, e_g


@needs_cpp
def test_c4096_regular_layer(gen):
    N = 4096
    r = Cyclic(N).regular()
    P = plan_for(r, r, "cpu")
    W = torch.randn(N, N, generator=gen)
    assert P.basis.numel() == 0 and P.meta.numel() * 8 < 0.01 * W.numel() * 4  # the plan is a row
    assert all(t.numel() < N * N for t in (P.meta, P.basis, P.perm_out, P.perm_in))
    ep, eg = equiproj.energies(W, r, r, backend="cpp")
    rp, rg = _cyclic_oracle(W, N)
    assert relative_error(ep, rp) < 1e-5 and relative_error(eg, rg) < 1e-5
    sl = W[:64, :64].clone()  # a small slice: the same closed form against the element average of C_64
    r64 = Cyclic(64).regular()
    assert relative_error(_cyclic_oracle(sl, 64)[0], reference.energies(sl.double(), r64, r64)[0]) < 1e-10


def test_orbit_tables_have_a_size_limit():
    assert MAX_ORBIT_TABLE <= 2**24  # exact in a float32 basis
    G = Cyclic(7)
    angles = 2 * math.pi * torch.arange(7, dtype=F64) / 7
    points = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    rep = Rep.permutation(G, points=points[[0, 2, 1, 3, 4, 5, 6]])  # not in cyclic order
    K, form, data = orbit_pair(rep.segments[0][1], rep.segments[0][1])
    assert K == 7 and form == OrbitForm.TABLE and data.numel() == 49 + 7  # a table: not flagged as the regular rep
    # in cyclic order the orbits of the pairs are (b - a) mod 7: the closed form, no table
    rep = Rep.permutation(G, points=points)
    K, form, data = orbit_pair(rep.segments[0][1], rep.segments[0][1])
    assert K == 7 and form == OrbitForm.CYCLIC and data.numel() == 0


def test_energy_breakdown_with_permutation_fields(gen):
    rep_in, rep_out = PAIRS["D3-mixed"]
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
    parts = equiproj.energy_breakdown(W, rep_in, rep_out)
    assert abs(sum(float(v.sum()) for v in parts.values()) - float(reference.energies(W, rep_in, rep_out)[0])) < 1e-9
    assert block_plan(rep_in, rep_out).packed_cpu.meta.shape[1] == 10
