"""Gradients added in place by the C++ kernels that read the weight rows in place (float32/float64,
unit column stride, no column permutation): r = 0 tiles, tiles with a basis (square tiles up to 5 x 5
and any shape), the trace form of fields up to dimension 5 and orbit pairs add into the output
directly (which may be the weight itself); the trace form of larger fields goes through a staging
buffer. Against the float64 reference, on every instruction set (AVX2 with and without the AVX-512
tiles, the baseline)."""

import pytest
import torch

from equiproj import O3, SO3, Cyclic, Dihedral, Rep, reference
from equiproj._plan import plan_for
from equiproj.ops import cpp_available, fused_energies_and_grads
from equiproj.testing import nearly_equivariant

pytestmark = pytest.mark.skipif(not cpp_available(), reason="the C++ extension is not built")

TOL = {torch.float64: 1e-12, torch.float32: 2e-6}


@pytest.fixture(params=["best", "avx2", "baseline"])
def isa(request):
    previous = torch.ops.equiproj_cpu.set_isa(request.param)
    yield request.param
    torch.ops.equiproj_cpu.set_isa(previous)


def _reps():
    G = O3()
    # 0e-0e (1x1 tiles), 0e-1o (r = 0), 1o-1o / 2e-2e (trace form, d = 3, 5), 3o-3o (d = 7: staged),
    # with enough copies for the vector loops and their tails
    ri = Rep.parse(G, "5x0e + 6x1o + 5x2e + 1x3o")
    ro = Rep.parse(G, "3x0e + 5x1o + 2x2e + 1x3o")
    D = Dihedral(6)
    # the trace form on rows of over a thousand columns: the float32 kernel's chunks, last chunk and tail
    S = SO3()
    # tiles with a basis: C5's 2 x 2 tiles of rank 2 (four tiles per vector, then two one by one);
    # D5's 2 x 10 and 10 x 2 tiles (whole vectors of 8 and 4 columns, then the last two columns)
    C, D5 = Cyclic(5), Dihedral(5)
    return [(ri, ro), (2 * D.regular() + D.standard(), D.regular() + 3 * D.trivial()),
            (Rep.parse(C, "6x1 + 0"), Rep.parse(C, "3x1 + 2x0")),
            (5 * D5.regular() + D5.standard(), 2 * D5.standard() + D5.regular()),
            (Rep.parse(S, "340x1 + 0"), Rep.parse(S, "3x1 + 0")), (Rep.parse(S, "201x2 + 0"), Rep.parse(S, "0 + 2x2"))]


def _expected(W, out, ri, ro, cp, cg):
    PW = reference.project(W.double(), ri, ro)
    return out.double() + 2 * cp * (W.double() - PW) + 2 * cg * PW


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_add_into_an_existing_gradient_and_into_the_weight(dtype, isa, gen):
    for ri, ro in _reps():
        P = plan_for(ri, ro, "cpu")
        W = torch.randn(ro.dim, ri.dim, dtype=torch.float64, generator=gen).to(dtype)
        out = torch.randn(W.shape, dtype=torch.float64, generator=gen).to(dtype)
        out0 = out.clone()
        fused_energies_and_grads([W], [P], [0.7], [0.2], outs=[out])
        want = _expected(W, out0, ri, ro, 0.7, 0.2)
        assert float((out.double() - want).abs().max()) <= TOL[dtype] * float(want.abs().max())
        # the decoupled step W <- W - rate (W - P W) - rate_G P W, added into W itself
        for W0 in (W.clone(), nearly_equivariant(W.double(), ri, ro, 1e-10, gen).to(dtype)):
            step = W0.clone()
            fused_energies_and_grads([step], [P], [-0.15], [-0.01], outs=[step])
            want = _expected(W0, W0, ri, ro, -0.15, -0.01)
            assert float((step.double() - want).abs().max()) <= TOL[dtype] * float(want.abs().max())
