"""Signed orbit tables (``OrbitForm.SIGNED``, docs/math.md §9) on the inputs a demanding user brings:
representations from signed permutation matrices (the Klein group, sign irreps, matrices carrying
rounding noise, reps that are monomial only in some bases), grid convolutions of the subgroups of O_h,
mixed reps with permutations, pairs without an equivariant part, odd copy counts, half precision,
declared convolutions of every geometry and memory format, and the model-level tools (pickling,
caches, ``project_``, ``report``, ``symmetry_spectrum``, ``restrict_``, ``check_equivariance``). Every
check is against the float64 spatial reference (``equiproj.reference``)."""

import copy
import math
import pickle
import warnings

import pytest
import torch
from torch import nn

import equiproj
from equiproj import Cyclic, Dihedral, FullOctahedral, Octahedral, Rep, reference
from equiproj._plan import OrbitForm, plan_for
from equiproj.grid import kernel_rep
from equiproj.groups import Axial, FullTetrahedral, Tetrahedral
from equiproj.groups._field import monomial_action
from equiproj.ops import cpp_available
from equiproj.testing import check_batched_strided_half, nearly_equivariant, relative_error

F64 = torch.float64
needs_cpp = pytest.mark.skipif(not cpp_available(), reason="the C++ extension is not built")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), "torch"]


def _irreps(G, copies=1):
    parts = [copies * psi for psi in G.irreps()]
    return sum(parts[1:], parts[0])


def _forms(rep_in, rep_out):
    return [OrbitForm(r.orbit_form) if r.orbits else None for r in plan_for(rep_in, rep_out, "cpu").rows()]


def _check(W, rep_in, rep_out, ref_in, backend, tol, lambda_G=0.25):
    """Energies and the gradient ``2 (W - P W) + 2 lambda_G P W`` against the reference."""
    e_perp, e_g, grad = equiproj.energies_and_grad(W, rep_in, rep_out, lambda_perp=1.0, lambda_G=lambda_G,
                                                   backend=backend)
    rp, rg = reference.energies(W.double(), ref_in, rep_out)
    PW = reference.project(W.double(), ref_in, rep_out)
    want = 2 * (W.double() - PW) + 2 * lambda_G * PW
    assert relative_error(e_perp, rp) < tol and relative_error(e_g, rg) < tol, (backend, W.dtype)
    assert float((grad.double() - want).abs().max()) <= tol * float(want.abs().max()), (backend, W.dtype)


def _check_all(rep_in, rep_out, ref_in, backend, gen):
    """Random and nearly equivariant weights (E_perp / ||W||^2 ~ 1e-10), float64 and float32."""
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
    _check(W, rep_in, rep_out, ref_in, backend, 1e-12)
    _check(W.float(), rep_in, rep_out, ref_in, backend, 1e-5)
    Wn = nearly_equivariant(W, ref_in, rep_out, 1e-10, gen)
    assert 1e-12 < float(reference.energies(Wn, ref_in, rep_out)[0] / Wn.square().sum()) < 1e-8
    _check(Wn, rep_in, rep_out, ref_in, backend, 1e-6)
    # the C++ kernel keeps float32 residuals to float32 rounding; the twin computes in float32
    _check(Wn.float(), rep_in, rep_out, ref_in, backend, 1e-4 if backend == "cpp" else 2e-3)


# ---- user representations from signed permutation matrices --------------------------------------------
def _klein_on_six(g):
    """D2 (the Klein group, diagonal sign matrices) on R^2 ⊗ R^3: ``g ⊗ P(g)``, P swapping the first two
    points under the reflections with ``g[0, 0] = -1``: every matrix a signed permutation."""
    swap = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=F64)
    P = torch.where((g[..., 0, 0] < 0)[..., None, None], swap, torch.eye(3, dtype=F64))
    return torch.einsum("...ij,...kl->...ikjl", g.to(F64), P).reshape(g.shape[:-2] + (6, 6))


def _sign_on_seven(g):
    """C2 on R^7: the rotation by pi is minus the reversal of the coordinates (a sign irrep times a
    permutation)."""
    flip = -torch.eye(7, dtype=F64).flip(0)
    return torch.where((g[..., 0, 0] < 0)[..., None, None], flip, torch.eye(7, dtype=F64))


def _with_noise(fn, eps):
    """``fn(g)`` plus a deterministic perturbation of size ``eps`` (a function of g)."""
    def noisy(g):
        M = fn(g)
        h = torch.sin(1000 * g.reshape(g.shape[:-2] + (-1,)).sum(-1).to(F64) + 0.3)
        pattern = torch.cos(0.7 * torch.arange(M.shape[-1] ** 2, dtype=F64)).reshape(M.shape[-2:])
        return M + eps * h[..., None, None] * pattern
    return noisy


def _user_cases():
    D2, C2 = Dihedral(2), Cyclic(2)
    six = Rep.from_matrices(D2, _klein_on_six)
    seven = Rep.from_matrices(C2, _sign_on_seven)
    noisy = Rep.from_matrices(D2, _with_noise(_klein_on_six, 1e-13))
    return {
        "klein-six-to-six": (six, six),
        "klein-six-to-irreps": (six, D2.irrep((1, 1)) + D2.irrep((0, 1)) + 2 * D2.irrep((1, 0))),
        "c2-seven-to-sign": (seven, C2.irrep(1) + 2 * C2.irrep(0)),
        "klein-six-noise-1e-13": (noisy, noisy),
        "klein-six-float32-matrices": (Rep.from_matrices(D2, lambda g: _klein_on_six(g).float()),) * 2,
    }


USER_CASES = _user_cases()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(USER_CASES))
def test_user_signed_permutation_reps(name, backend, gen):
    rep_in, rep_out = USER_CASES[name]
    assert monomial_action(rep_in.segments[0][1]) is not None
    forms = _forms(rep_in, rep_out)
    assert OrbitForm.SIGNED in forms or OrbitForm.TABLE in forms  # the orbit route, not a basis
    _check_all(rep_in, rep_out, rep_in, backend, gen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reps_monomial_only_in_some_bases(backend, gen):
    """D4's two-dimensional irrep rotated by 30 degrees is not monomial (a basis pair); rotated by 45
    degrees, or by a signed permutation, it is (signed pairs). Both routes match the reference."""
    D4 = Dihedral(4)

    def rot(t):
        return torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]], dtype=F64)

    for Q, monomial in ((rot(math.pi / 6), False), (rot(math.pi / 4), True),
                        (torch.tensor([[0.0, -1.0], [-1.0, 0.0]], dtype=F64), True)):
        f = D4.irrep((1, 1)).change_basis(Q)
        assert (monomial_action(f.segments[0][1]) is not None) == monomial
        fields = f + D4.irrep((1, 2))
        rep_in, ref_in = fields @ kernel_rep(D4, (3, 3), orbits=False), fields @ kernel_rep(D4, (3, 3))
        rep_out = D4.irrep((1, 1)) + f + D4.regular()
        forms = _forms(rep_in, rep_out)
        assert OrbitForm.SIGNED in forms and (None not in forms) == monomial
        _check_all(rep_in, rep_out, ref_in, backend, gen)


# ---- grid convolutions of subgroups of O_h, mixed reps --------------------------------------------------
def _subgroups_of_oh():
    L = FullOctahedral().subgroups()
    return {"T": Tetrahedral(), "Td": FullTetrahedral(), "S4z": L["S4z"].group, "C2vz": L["C2vz"].group,
            "D4z": Axial(Dihedral(4))}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["T", "Td", "S4z", "C2vz", "D4z"])
def test_declared_grid_convs_of_subgroups_of_oh(name, backend, gen):
    G = _subgroups_of_oh()[name]
    rep = _irreps(G)
    decl = equiproj.nn.declaration(equiproj.nn.declare(nn.Conv3d(rep.dim, rep.dim, 3, bias=False), rep, rep))
    assert OrbitForm.SIGNED in _forms(decl.weight_rep_in, decl.rep_out)
    _check_all(decl.weight_rep_in, decl.rep_out, rep @ kernel_rep(G, (3, 3, 3)), backend, gen)


def _c3_on_5x5x5():
    """C3 about a body diagonal (a subgroup of O_h) on 5x5x5 kernels: its two-dimensional irrep is not
    monomial, and its basis over the whole grid (2 x 125 coordinates) would have about 80 maps per pair,
    so declare() takes the grid's orbits."""
    H = FullOctahedral().subgroups()["C3[-111]"].group
    rep = H.irreps()[0] + H.irreps()[1]
    decl = equiproj.nn.declaration(equiproj.nn.declare(nn.Conv3d(rep.dim, rep.dim, 5, bias=False), rep, rep))
    return decl, rep @ kernel_rep(H, (5, 5, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_declared_grid_conv_on_non_monomial_irreps(backend, gen):
    decl, ref_in = _c3_on_5x5x5()
    assert monomial_action(decl.rep_in.segments[-1][1]) is None
    _check_all(decl.weight_rep_in, decl.rep_out, ref_in, backend, gen)


def test_declared_grid_conv_on_non_monomial_irreps_keeps_a_small_plan():
    decl, ref_in = _c3_on_5x5x5()
    declared = plan_for(decl.weight_rep_in, decl.rep_out, "cpu").basis.numel()
    assert declared <= plan_for(ref_in, decl.rep_out, "cpu").basis.numel()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_reps_with_permutations(backend, gen):
    """Regular fields, point sets, monomial irreps and non-monomial irreps in one rep, with a
    permutation on the input (D8, O_h) or on the output (D4 on a grid)."""
    D8, Oh, D4 = Dihedral(8), FullOctahedral(), Dihedral(4)
    a = 2 * D8.regular() + 3 * D8.irrep((1, 2)) + 2 * D8.irrep((1, 1)) + D8.irrep((0, 4))
    d8 = (Rep(D8, a.segments, perm=torch.randperm(a.dim, generator=gen)),
          D8.irrep((1, 2)) + D8.irrep((1, 3)) + D8.regular() + 3 * D8.irrep((1, 2)))
    faces = Rep.permutation(Oh, points=torch.cat([torch.eye(3, dtype=F64), -torch.eye(3, dtype=F64)]))
    b = 2 * faces + Oh.irrep("T1u") + Oh.irrep("Eg") + 3 * Oh.irrep("T2g") + Oh.regular()
    oh = (Rep(Oh, b.segments, perm=torch.randperm(b.dim, generator=gen)),
          Oh.irrep("T1u") + 2 * faces + Oh.irrep("A2u") + 2 * Oh.irrep("T2g"))
    c = 2 * D4.irrep((1, 1)) + D4.regular() + D4.irrep((1, 2))
    fields = D4.irrep((1, 1)) + D4.irrep((0, 2))
    d4 = (fields @ kernel_rep(D4, (3, 3), orbits=False), Rep(D4, c.segments, perm=torch.randperm(c.dim, generator=gen)),
          fields @ kernel_rep(D4, (3, 3)))
    for rep_in, rep_out, *ref in (d8, oh, d4):
        assert OrbitForm.SIGNED in _forms(rep_in, rep_out)
        _check_all(rep_in, rep_out, ref[0] if ref else rep_in, backend, gen)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_pairs_without_an_equivariant_part(backend, gen):
    """Monomial pairs whose every orbit is sign-inconsistent (P(W) = 0: E_perp = ||W||^2, E_G = 0), and a
    signed pair with some inconsistent entries (sign 0 in the table)."""
    Oh, C2 = FullOctahedral(), Cyclic(2)
    faces = Rep.permutation(Oh, points=torch.cat([torch.eye(3, dtype=F64), -torch.eye(3, dtype=F64)]))
    trivial6 = Rep.from_matrices(C2, lambda g: torch.eye(6, dtype=F64).expand(g.shape[:-2] + (6, 6)))
    for rep_in, rep_out in ((2 * faces, 3 * Oh.irrep("A2u")), (trivial6, 2 * C2.irrep(1))):
        W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
        for X in (W, W.float()):
            ep, eg, grad = equiproj.energies_and_grad(X, rep_in, rep_out, lambda_perp=1.0, lambda_G=0.5,
                                                      backend=backend)
            norm_sq = float(X.double().square().sum())
            assert relative_error(ep, norm_sq) < 1e-6 and 0.0 <= float(eg) <= 1e-15 * norm_sq
            torch.testing.assert_close(grad, 2 * X)
    C4 = Cyclic(4)  # a sign irrep on the centre pixel of a 3x3 kernel has no equivariant part there
    rep_in, rep_out = C4.irrep(2) @ kernel_rep(C4, (3, 3), orbits=False), C4.irrep(1) + C4.irrep(0)
    P = plan_for(rep_in, rep_out, "cpu")
    signed = [r for r in P.rows() if r.orbits and r.orbit_form == OrbitForm.SIGNED]
    assert signed and any(bool((P.orbit_index(r, "cpu")[2] == 0).any()) for r in signed)
    _check_all(rep_in, rep_out, C4.irrep(2) @ kernel_rep(C4, (3, 3)), backend if backend != "reference" else "torch",
               gen)


# ---- the C++ kernel: copy counts, instruction sets, threads, precisions ---------------------------------
@needs_cpp
@pytest.mark.parametrize("isa", ["best", "baseline"])
def test_cpp_odd_copy_counts_threads_and_isas(isa, gen):
    """Groups of 4, 2 and 1 tiles: 1, 2, 3, 5 and 7 input copies, 1 to 3 output copies; float32 and
    float64, random and nearly equivariant; the same bits on one and on two threads."""
    D4 = Dihedral(4)
    pix, pix_orbits = kernel_rep(D4, (3, 3), orbits=False), kernel_rep(D4, (3, 3))
    previous = torch.ops.equiproj_cpu.set_isa(isa)
    threads = torch.get_num_threads()
    try:
        for ci, co in ((1, 1), (2, 3), (3, 2), (5, 1), (7, 3)):
            fields = ci * D4.irrep((1, 1)) + ci * D4.irrep((0, 2))
            rep_in, ref_in = fields @ pix, fields @ pix_orbits
            rep_out = co * D4.irrep((1, 2)) + co * D4.irrep((1, 1)) + D4.regular()
            W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
            for X, tol in ((W, 1e-12), (W.float(), 1e-5), (nearly_equivariant(W, ref_in, rep_out, 1e-10, gen), 1e-6)):
                results = []
                for n in (1, 2):
                    torch.set_num_threads(n)
                    results.append(equiproj.energies_and_grad(X, rep_in, rep_out, lambda_perp=1.0, lambda_G=0.25,
                                                              backend="cpp"))
                assert all(torch.equal(a, b) for a, b in zip(*results)), (ci, co, X.dtype)
                _check(X, rep_in, rep_out, ref_in, "cpp", tol)
    finally:
        torch.set_num_threads(threads)
        torch.ops.equiproj_cpu.set_isa(previous)


def _pivot_cases():
    """(name, rep_in, reference rep_in, rep_out) with eight input copies or more of one field pair type
    of at most 32 orbits of at most 8 entries, whose float32 orbit sums take the pivot pass in groups of
    eight tiles: signed tables (C4 and D4 irreps on grids; entries of sign 0 among them) with their
    orbit tables (the scalar pairs), and orbit products (C4 regular on a 2x2 grid, C2 regular on a 3x3
    grid)."""
    C4, D4, C2 = Cyclic(4), Dihedral(4), Cyclic(2)
    out = []
    for ci in (8, 11, 19):
        c4, d4 = _irreps(C4, ci), _irreps(D4, ci)
        out += [(f"C4-irreps-k3-{ci}", c4 @ kernel_rep(C4, (3, 3), orbits=False), c4 @ kernel_rep(C4, (3, 3)),
                 _irreps(C4)),
                (f"D4-irreps-k5-{ci}", d4 @ kernel_rep(D4, (5, 5), orbits=False), d4 @ kernel_rep(D4, (5, 5)),
                 2 * D4.irrep((1, 1)) + D4.irrep((0, 2))),
                (f"C4-regular-k2-{ci}", ci * C4.regular() @ kernel_rep(C4, (2, 2), orbits=False),
                 ci * C4.regular() @ kernel_rep(C4, (2, 2)), C4.regular()),
                (f"C2-regular-k3-{ci}", ci * C2.regular() @ kernel_rep(C2, (3, 3), orbits=False),
                 ci * C2.regular() @ kernel_rep(C2, (3, 3)), 2 * C2.regular())]
    return out


def _largest_orbit(rep_in, rep_out) -> int:
    P = plan_for(rep_in, rep_out, "cpu")
    invs = [P.orbit_index(r, "cpu")[1] for r in P.rows() if r.orbits]
    return round(max(float((1 / inv[inv > 0]).max()) for inv in invs))


@needs_cpp
def test_cpp_pivot_pass_in_groups_of_eight_tiles(gen):
    """float32 orbit sums of eight tiles at a time as differences from each orbit's first entry, then
    the rest of the tiles in groups of 4, 2, 1 (8, 11 and 19 copies): random and nearly equivariant
    weights (E_perp / ||W||^2 ~ 1e-10) against the float64 reference and against the float64 sums of
    the baseline kernels, the same bits on one and two threads, and the gradient added into a buffer."""
    threads = torch.get_num_threads()
    try:
        for name, rep_in, ref_in, rep_out in _pivot_cases():
            forms = {f for f in _forms(rep_in, rep_out) if f is not None}
            assert forms and forms <= {OrbitForm.SIGNED, OrbitForm.TABLE, OrbitForm.PRODUCT}, name
            assert max(r.orbits for r in plan_for(rep_in, rep_out, "cpu").rows()) <= 32, name
            assert _largest_orbit(rep_in, rep_out) <= 8, name
            W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
            Wn = nearly_equivariant(W, ref_in, rep_out, 1e-10, gen)
            for X in (W.float(), Wn.float()):
                rp, rg = reference.energies(X.double(), ref_in, rep_out)
                PW = reference.project(X.double(), ref_in, rep_out)
                want = 2 * (X.double() - PW) + 0.5 * PW
                results = []
                for n in (1, 2):
                    torch.set_num_threads(n)
                    results.append(equiproj.energies_and_grad(X, rep_in, rep_out, lambda_perp=1.0, lambda_G=0.25,
                                                              backend="cpp"))
                assert all(torch.equal(a, b) for a, b in zip(*results)), name
                ep, eg, grad = results[0]
                # E_perp keeps float32's digits of the residual: observed 1e-8 relative on both kinds
                assert relative_error(ep, rp) < 1e-6 and relative_error(eg, rg) < 1e-6, (name, float(rp))
                assert float((grad.double() - want).abs().max()) <= 4 * 2**-23 * float(want.abs().max()), name
                previous = torch.ops.equiproj_cpu.set_isa("baseline")  # float64 orbit sums
                try:
                    bp, bg, bgrad = equiproj.energies_and_grad(X, rep_in, rep_out, lambda_perp=1.0, lambda_G=0.25,
                                                               backend="cpp")
                finally:
                    torch.ops.equiproj_cpu.set_isa(previous)
                assert relative_error(ep, bp) < 1e-6 and relative_error(eg, bg) < 1e-6, name
                assert float((grad - bgrad).abs().max()) <= 4 * 2**-23 * float(want.abs().max()), name
            # one orbit of entries of 3e18: its sum's square overflows float32, E_G (n m^2) does not
            one = torch.zeros(rep_out.dim, rep_in.dim, dtype=F64)
            one[0, 0] = 1.0
            big = reference.project(one, ref_in, rep_out)
            big = (big * (3e18 / big.abs().max())).float()
            ep, eg = equiproj.energies(big, rep_in, rep_out, backend="cpp")
            rp, rg = reference.energies(big.double(), ref_in, rep_out)
            assert relative_error(eg, rg) < 1e-6 and float(ep) <= 1e-6 * float(rg), name
            # the gradient added into a buffer: one pass reads every tile before it writes
            layer = nn.Linear(rep_in.dim, rep_out.dim, bias=False)
            with torch.no_grad():
                layer.weight.copy_(W)
            equiproj.nn.declare(layer, rep_in, rep_out)
            start = torch.randn(layer.weight.shape, generator=gen)
            layer.weight.grad = start.clone()
            equiproj.nn.ProjectionPenalty(layer, lambda_perp=0.5).backward()
            PW = reference.project(layer.weight.detach().double(), ref_in, rep_out)
            added = layer.weight.grad.double() - start.double()
            assert float((added - (layer.weight.detach().double() - PW)).abs().max()) <= 1e-5, name
            if name.endswith("-11"):  # batched, strided and half-precision weights of these pairs (staged in
                # float64, so through the float64 sums: the route around the pass)
                check_batched_strided_half(rep_in, rep_out, "cpp", gen, reference_rep_in=ref_in)
            # a batch of float32 weights, contiguous: each item as alone, bit for bit
            B = torch.stack([W.float(), Wn.float()])
            together = equiproj.energies_and_grad(B, rep_in, rep_out, lambda_perp=1.0, lambda_G=0.25, backend="cpp")
            for i in range(2):
                alone = equiproj.energies_and_grad(B[i], rep_in, rep_out, lambda_perp=1.0, lambda_G=0.25,
                                                   backend="cpp")
                assert all(torch.equal(t[i], a) for t, a in zip(together, alone)), name
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_batched_and_strided_3d(backend, gen):
    O = Octahedral()
    fields = O.irrep("T1") + O.irrep("A2") + O.irrep("E")
    rep_in, ref_in = fields @ kernel_rep(O, (3, 3, 3), orbits=False), fields @ kernel_rep(O, (3, 3, 3))
    rep_out = O.irrep("T2") + O.irrep("T1") + O.irrep("A1")
    base = torch.randn(3, rep_in.dim, 2 * rep_out.dim, dtype=F64, generator=gen)
    W = base[..., ::2].transpose(-1, -2)  # [3, m, n], strided both ways
    assert not W.is_contiguous()
    ep, eg = equiproj.energies(W, rep_in, rep_out, backend=backend)
    rp, rg = reference.energies(W, ref_in, rep_out)
    assert ep.shape == (3,) and relative_error(ep, rp) < 1e-12 and relative_error(eg, rg) < 1e-12
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        Wh = W.to(dtype)
        ep, eg, grad = equiproj.energies_and_grad(Wh, rep_in, rep_out, backend=backend)
        rp, rg = reference.energies(Wh.double(), ref_in, rep_out)
        assert relative_error(ep, rp) < 1e-5 and relative_error(eg, rg) < 1e-5
        want = 2 * (Wh.double() - reference.project(Wh.double(), ref_in, rep_out))
        assert grad.dtype == dtype and float((grad.double() - want).abs().max()) <= tol * float(want.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_layers_autograd_and_breakdown(backend, gen):
    """energies_many / energies_and_grads_many over layers of mixed dtypes (gradients added into
    ``outs``), autograd of the energies, project and energy_breakdown."""
    C4, D4, O = Cyclic(4), Dihedral(4), Octahedral()
    cases = []
    for G, k, ci, co in ((C4, (3, 3), 2, 1), (D4, (5, 5), 1, 2), (O, (3, 3, 3), 1, 1)):
        ri, ro = _irreps(G, ci), _irreps(G, co)
        cases.append((ri @ kernel_rep(G, k, orbits=False), ro, ri @ kernel_rep(G, k)))
    dtypes = (torch.float32, F64, torch.float32)
    Ws = [torch.randn(c[1].dim, c[0].dim, generator=gen, dtype=dt) for c, dt in zip(cases, dtypes)]
    pairs = [(c[0], c[1]) for c in cases]
    ep, eg = equiproj.energies_many(Ws, pairs, backend=backend)
    lp, lg = [1.0, 0.5, 0.25], [0.0, 0.1, 0.2]
    outs = [torch.randn_like(w) for w in Ws]
    before = [o.double().clone() for o in outs]
    equiproj.energies_and_grads_many(Ws, pairs, lambda_perp=lp, lambda_G=lg, backend=backend, outs=outs)
    for i, (rep_in, rep_out, ref_in) in enumerate(cases):
        rp, rg = reference.energies(Ws[i].double(), ref_in, rep_out)
        assert relative_error(ep[i], rp) < 1e-6 and relative_error(eg[i], rg) < 1e-6
        PW = reference.project(Ws[i].double(), ref_in, rep_out)
        want = before[i] + 2 * lp[i] * (Ws[i].double() - PW) + 2 * lg[i] * PW
        assert float((outs[i].double() - want).abs().max()) < 1e-5 * float(want.abs().max())
        W = Ws[i].double().requires_grad_()
        e_perp, e_g = equiproj.energies(W, rep_in, rep_out, backend=backend)
        (g,) = torch.autograd.grad(e_perp + 0.3 * e_g, W)
        torch.testing.assert_close(g, 2 * (W.detach() - PW) + 0.6 * PW, atol=1e-12, rtol=0)
        torch.testing.assert_close(equiproj.project(W.detach(), rep_in, rep_out), PW, atol=1e-12, rtol=0)
        parts = equiproj.energy_breakdown(W.detach(), rep_in, rep_out)
        parts_ref = equiproj.energy_breakdown(W.detach(), ref_in, rep_out)  # the same rep, orbit by orbit
        assert parts.keys() == parts_ref.keys() and relative_error(sum(parts.values()), rp) < 1e-12
        assert max(float((parts[k] - parts_ref[k]).abs()) for k in parts) < 1e-12 * float(rp)


# ---- the Triton kernel under the interpreter ------------------------------------------------------------
def _triton_check(rep_in, rep_out, ref_in, dtype, gen):
    kernels = pytest.importorskip("equiproj.kernels.triton_energies")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    W = torch.randn(rep_out.dim, rep_in.dim, generator=gen).to(dtype)
    P = plan_for(rep_in, rep_out, device, torch.float32)
    ep, eg, grads = kernels.fused_energies([W.to(device)], [P], torch.tensor([1.0]), torch.tensor([0.25]))
    x = W.double()
    rp, rg = reference.energies(x, ref_in, rep_out)
    PW = reference.project(x, ref_in, rep_out)
    assert relative_error(ep[0].cpu(), rp) < 2e-5 and relative_error(eg[0].cpu(), rg) < 2e-5
    want = 2 * (x - PW) + 0.5 * PW
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    assert float((grads[0].cpu().double() - want).abs().max()) <= tol * float(want.abs().max())


def _d4_copies(ci, co):
    D4 = Dihedral(4)
    fields = ci * D4.irrep((1, 1))
    return (fields @ kernel_rep(D4, (3, 3), orbits=False), co * D4.irrep((1, 2)) + co * D4.irrep((1, 1)),
            fields @ kernel_rep(D4, (3, 3)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_signed_tables_with_one_input_copy(dtype, gen):
    """One input copy per field-pair type (one tile per program along the columns), several output
    copies, a sign-inconsistent centre pixel."""
    rep_in, rep_out, ref_in = _d4_copies(1, 3)
    assert OrbitForm.SIGNED in _forms(rep_in, rep_out)
    _triton_check(rep_in, rep_out, ref_in, dtype, gen)


def test_triton_signed_tables_on_nearly_equivariant_float32_weights(gen):
    """float32 throughout (no split means): E_perp of a weight with E_perp / ||W||^2 ~ 1e-10 keeps about
    four digits (the C++ kernel keeps float32 rounding)."""
    kernels = pytest.importorskip("equiproj.kernels.triton_energies")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    O = Octahedral()
    fields = O.irrep("T1")
    rep_in, ref_in = fields @ kernel_rep(O, (3, 3, 3), orbits=False), fields @ kernel_rep(O, (3, 3, 3))
    rep_out = 2 * O.irrep("T1") + O.irrep("T2")
    W = torch.randn(rep_out.dim, rep_in.dim, dtype=F64, generator=gen)
    Wn = nearly_equivariant(W, ref_in, rep_out, 1e-10, gen).float()
    P = plan_for(rep_in, rep_out, device, torch.float32)
    ep, eg, _ = kernels.fused_energies([Wn.to(device)], [P], torch.tensor([1.0]), torch.tensor([0.0]))
    rp, rg = reference.energies(Wn.double(), ref_in, rep_out)
    assert relative_error(ep[0].cpu(), rp) < 1e-3 and relative_error(eg[0].cpu(), rg) < 1e-5


@pytest.mark.parametrize("case", ["signed", "table"])
def test_triton_orbit_tables_with_several_input_copies(case, gen):
    if case == "signed":
        rep_in, rep_out, ref_in = _d4_copies(2, 1)
    else:  # a plain orbit table: two copies of the six faces of the cube
        Oh = FullOctahedral()
        faces = Rep.permutation(Oh, points=torch.cat([torch.eye(3, dtype=F64), -torch.eye(3, dtype=F64)]))
        rep_in, rep_out, ref_in = 2 * faces, faces, 2 * faces
    _triton_check(rep_in, rep_out, ref_in, torch.float32, gen)


# ---- declared models -------------------------------------------------------------------------------------
def _reference_layer(m):
    """(E_perp, E_G, P(W) shaped like the weight, P(b) or None) of a declared grid conv, bias included."""
    d = equiproj.nn.declaration(m)
    G = d.rep_out.group
    ref_in = d.rep_in @ kernel_rep(G, tuple(m.kernel_size))
    W = m.weight.detach().double().reshape(m.weight.shape[0], -1)
    ep, eg = reference.energies(W, ref_in, d.rep_out)
    PW = reference.project(W, ref_in, d.rep_out).reshape(m.weight.shape)
    Pb = None
    if m.bias is not None:
        b = m.bias.detach().double()[:, None]
        bp, bg = reference.energies(b, G.trivial(), d.rep_out)
        ep, eg = ep + bp, eg + bg
        Pb = reference.project(b, G.trivial(), d.rep_out)[:, 0]
    return float(ep), float(eg), PW, Pb


def _geometry_model():
    C4 = Cyclic(4)
    ri, ro = _irreps(C4, 3), _irreps(C4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the strided conv's warning about input sizes
        return nn.Sequential(
            equiproj.nn.declare(nn.Conv2d(ri.dim, ro.dim, 5, padding=2, bias=True), ri, ro),
            equiproj.nn.declare(nn.Conv2d(ro.dim, ro.dim, 3, stride=2, padding=1, bias=True), ro, ro),
            equiproj.nn.declare(nn.Conv2d(ro.dim, ri.dim, 3, dilation=2, padding="same", bias=False), ro, ri),
        ), ri


def test_penalty_on_convs_of_every_geometry(seed):
    model, _ = _geometry_model()
    for m in model:
        d = equiproj.nn.declaration(m)
        assert d.weight_rep_in.perm is None and OrbitForm.SIGNED in _forms(d.weight_rep_in, d.rep_out)
    pen = equiproj.nn.ProjectionPenalty(model, lambda_perp=0.5, lambda_G=0.1)
    refs = [_reference_layer(m) for m in model]
    assert relative_error(pen().detach(), sum(0.5 * r[0] + 0.1 * r[1] for r in refs)) < 1e-6
    ep, eg = pen.energies()
    for i, r in enumerate(refs):
        assert relative_error(ep[i], r[0]) < 1e-6 and relative_error(eg[i], r[1]) < 1e-6
    # backward adds into existing gradients, one of them non-contiguous
    grads = [torch.randn_like(m.weight) for m in model]
    grads[1] = torch.randn(tuple(reversed(model[1].weight.shape))).permute(3, 2, 1, 0)
    for m, g in zip(model, grads):
        m.weight.grad = g.clone()
    pen.backward()
    for m, g, r in zip(model, grads, refs):
        W = m.weight.detach().double()
        want = g.double() + (W - r[2]) + 0.2 * r[2]
        torch.testing.assert_close(m.weight.grad.double(), want, atol=1e-6, rtol=1e-6)
        if m.bias is not None:
            b = m.bias.detach().double()
            torch.testing.assert_close(m.bias.grad.double(), (b - r[3]) + 0.2 * r[3], atol=1e-6, rtol=1e-6)
    before = [m.weight.detach().double().clone() for m in model]
    pen.decay_(0.25, 0.1)
    for m, W, r in zip(model, before, refs):
        torch.testing.assert_close(m.weight.detach().double(), W - 0.25 * (W - r[2]) - 0.1 * r[2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_penalty_on_channels_last_weights(dims, seed):
    G, conv, fmt = (Dihedral(4), nn.Conv2d, torch.channels_last) if dims == 2 else \
        (Octahedral(), nn.Conv3d, torch.channels_last_3d)
    ri, ro = _irreps(G, 2), _irreps(G, 1)
    m = equiproj.nn.declare(conv(ri.dim, ro.dim, 3, bias=False), ri, ro).to(memory_format=fmt)
    assert not m.weight.is_contiguous()
    ep, eg, PW, _ = _reference_layer(m)
    pen = equiproj.nn.ProjectionPenalty(m, lambda_perp=1.0, lambda_G=0.5)
    assert relative_error(pen().detach(), ep + 0.5 * eg) < 1e-6
    W = m.weight.detach().double()
    g0 = torch.randn_like(m.weight)
    m.weight.grad = g0.clone()
    pen.backward()
    torch.testing.assert_close(m.weight.grad.double(), g0.double() + 2 * (W - PW) + PW, atol=1e-6, rtol=1e-6)
    m.weight.grad = None
    pen().backward()
    torch.testing.assert_close(m.weight.grad.double(), 2 * (W - PW) + PW, atol=1e-6, rtol=1e-6)
    pen.decay_(0.3)
    torch.testing.assert_close(m.weight.detach().double(), W - 0.3 * (W - PW), atol=1e-6, rtol=1e-6)
    assert m.weight.is_contiguous(memory_format=fmt)


def test_pickle_copy_and_caches(seed):
    model, _ = _geometry_model()
    pen = equiproj.nn.ProjectionPenalty(model, lambda_perp=0.5, lambda_G=0.1)
    want = sum(0.5 * r[0] + 0.1 * r[1] for r in (_reference_layer(m) for m in model))
    value = pen().detach()
    model_blob, penalty_blob = pickle.dumps(model), pickle.dumps(pen)
    equiproj.clear_caches()
    m2, pen2 = pickle.loads(model_blob), pickle.loads(penalty_blob)
    equiproj.clear_caches()
    for m in m2:
        d = equiproj.nn.declaration(m)
        assert OrbitForm.SIGNED in _forms(d.weight_rep_in, d.rep_out)
    pen3 = equiproj.nn.ProjectionPenalty(m2, lambda_perp=0.5, lambda_G=0.1)
    pen4 = copy.deepcopy(pen)
    for p in (pen, pen2, pen3, pen4, equiproj.nn.ProjectionPenalty(copy.deepcopy(model), 0.5, 0.1)):
        assert relative_error(p().detach(), want) < 1e-6 and torch.equal(p().detach(), value)


def test_pickled_user_rep_keeps_the_signed_route(gen):
    """A rep from a closure is pickled by its decomposition: the unpickled field (its matrices from the
    decomposition) is still monomial and takes the same route, after the caches are cleared."""
    D2 = Dihedral(2)
    rep = Rep.from_matrices(D2, lambda g: _klein_on_six(g))
    blob = pickle.dumps(nn.Sequential(equiproj.nn.declare(nn.Linear(6, 6, bias=False), rep, rep)))
    equiproj.clear_caches()
    m = pickle.loads(blob)[0]
    d = equiproj.nn.declaration(m)
    assert monomial_action(d.rep_in.segments[0][1]) is not None and OrbitForm.SIGNED in _forms(d.rep_in, d.rep_out)
    W = torch.randn(6, 6, dtype=F64, generator=gen)
    _check(W, d.rep_in, d.rep_out, rep, "cpp" if cpp_available() else "torch", 1e-12)


def test_model_tools_on_signed_routes(seed):
    """report, project_ (also under a subgroup), restrict_, init_equivariant_, symmetry_spectrum and
    check_equivariance on declared D4 and O convolutions of irreps fields."""
    for G, conv, k, sub in ((Dihedral(4), nn.Conv2d, (3, 3), "C4"), (Octahedral(), nn.Conv3d, (3, 3, 3), "T")):
        ri, ro = _irreps(G, 2), _irreps(G, 1)
        model = nn.Sequential(equiproj.nn.declare(conv(ri.dim, ro.dim, k[0], bias=True), ri, ro))
        m = model[0]
        W = m.weight.detach().double().reshape(ro.dim, -1)
        b = m.bias.detach().double()[:, None]
        ref_in = ri @ kernel_rep(G, k)
        ep, eg, _, _ = _reference_layer(m)
        row = equiproj.nn.report(model).rows[0]
        assert relative_error(row["e_perp"], ep) < 1e-10
        spectrum = equiproj.nn.symmetry_spectrum(model)
        for j, H in enumerate(spectrum.subgroups):
            want = reference.energies(W, ref_in.restrict(H), ro.restrict(H))[0] + \
                reference.energies(b, G.trivial().restrict(H), ro.restrict(H))[0]
            assert abs(float(spectrum.e_perp[0, j]) - float(want)) <= 1e-10 * float(W.square().sum())
        H = G.subgroups()[sub]
        projected = copy.deepcopy(model)
        equiproj.nn.project_(projected, subgroup=sub)
        PH = reference.project(W, ref_in.restrict(H), ro.restrict(H))
        torch.testing.assert_close(projected[0].weight.detach().double().reshape(ro.dim, -1), PH, atol=1e-6, rtol=0)
        restricted = copy.deepcopy(model)
        equiproj.nn.restrict_(restricted, sub)
        e_perp, _ = equiproj.nn.ProjectionPenalty(restricted, lambda_perp=1.0).energies()
        want = reference.energies(W, ref_in.restrict(H), ro.restrict(H))[0] + \
            reference.energies(b, G.trivial().restrict(H), ro.restrict(H))[0]
        assert relative_error(e_perp[0], want) < 1e-6
        equiproj.nn.init_equivariant_(model)
        Wi = model[0].weight.detach().double().reshape(ro.dim, -1)
        assert relative_error(Wi.norm(), W.norm()) < 1e-6
        assert float(reference.energies(Wi, ref_in, ro)[0] / Wi.square().sum()) < 1e-13
        x = torch.randn(2, ri.dim, *(7,) * len(k))
        assert equiproj.nn.check_equivariance(model, ri, ro, x).ok


# ---- plan sizes -----------------------------------------------------------------------------------------
def _layer_table_grid_irreps():
    from equiproj.cli.bench._kinds import layer_kinds
    return {k.name: k for k in layer_kinds(quick=False) if k.route == "grid" and "irreps" in k.name}


def _plan_fraction(name):
    m = _layer_table_grid_irreps()[name].build()
    d = equiproj.nn.declaration(m)
    P = plan_for(d.weight_rep_in, d.rep_out, "cpu")
    return P.basis.numel() / m.weight.numel()


@pytest.mark.parametrize("name", ["Conv2d 384->384 k=3, C4 irreps (grid)", "Conv2d 384->384 k=5, C4 irreps (grid)",
                                  "Conv2d 384->384 k=3, D4 irreps (grid)", "Conv2d 384->384 k=5, D4 irreps (grid)"])
def test_plans_of_2d_irreps_grid_convs_are_small(name):
    assert _plan_fraction(name) <= 0.01


@pytest.mark.parametrize("G", [Octahedral(), FullOctahedral()], ids=str)
def test_plans_of_3d_irreps_grid_convs_do_not_grow_with_the_copies(G):
    """A plan holds one table or basis per field-pair type, shared by every copy: the 3-D irreps grid
    convs of the layer table (4 to 9 copies per irrep) hold 3-10 % of their weight's entries, a layer
    with 16 times the weights the same numbers."""
    sizes = []
    for copies in (2, 8):
        rep = sum((copies * p for p in G.irreps()[1:]), copies * G.irreps()[0])
        m = equiproj.nn.declare(nn.Conv3d(rep.dim, rep.dim, 3, bias=False), rep, rep)
        d = equiproj.nn.declaration(m)
        sizes.append(plan_for(d.weight_rep_in, d.rep_out, "cpu").basis.numel())
    assert sizes[0] == sizes[1]
