"""The public energy functions inside a ``torch.autocast`` region compute what they compute outside it.

Autocast would run the projection's einsums and matrix products in bfloat16/float16 (relative
errors ~1e-3) and refuses to stack float16 with bfloat16 tensors; every function and backend
turns it off for its own arithmetic (energies in float32, float64 for float64 weights).

Tolerance: relative 1e-6 (max |difference| / max |value|, per output) between the call inside an
autocast region and the same call outside it, for the results, their dtypes, and the gradients
(autograd's ``backward`` is called outside the region, as torch recommends for autocast).
"""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

import equiproj as ep
from equiproj import ops
from equiproj.testing import mixed_reps

TOL = 1e-6


def _so3_irreps(gen):
    G = ep.SO3()
    return ep.Rep.parse(G, "3x0 + 2x1 + 2"), ep.Rep.parse(G, "2x0 + 1 + 3x2")


def _so3_change_of_basis(gen):
    return mixed_reps(ep.SO3(), gen)  # a random orthogonal change of basis on rep_in, a tensor product


def _so2_permuted(gen):
    G = ep.SO2()
    return ep.Rep.parse(G, "0 + 1") @ ep.Rep.parse(G, "1 + 2"), ep.Rep.parse(G, "2x0 + 3x1 + 2")


CASES = {"so3_irreps": _so3_irreps, "so3_change_of_basis": _so3_change_of_basis, "so2_permuted": _so2_permuted}

#: (device, autocast dtype, backends computing on it)
REGIONS = [("cpu", torch.bfloat16, ("cpp", "torch", "reference"))]
if torch.cuda.is_available():
    REGIONS += [("cuda", dt, ("triton", "torch", "reference")) for dt in (torch.float16, torch.bfloat16)]

WITH_BACKEND = ("energies", "energies_many", "energies_and_grad", "energies_and_grads_many")
WITHOUT_BACKEND = ("project", "project_non_equivariant", "energy_breakdown", "energy_breakdown_equivariant")


def _params():
    for device, dt, backends in REGIONS:
        region = f"{device}-{str(dt).removeprefix('torch.')}"
        for fn in WITH_BACKEND:
            for b in backends:
                yield pytest.param(device, dt, fn, b, id=f"{region}-{fn}-{b}")
        for fn in WITHOUT_BACKEND:
            yield pytest.param(device, dt, fn, None, id=f"{region}-{fn}")


def _call(fn: str, W, ri, ro, backend) -> list[torch.Tensor]:
    """The outputs of ``fn`` as a list of tensors (the gradient-returning functions: energies and gradients)."""
    if fn == "energies":
        return list(ep.energies(W, ri, ro, backend=backend))
    if fn == "energies_many":
        return list(ep.energies_many([W, 2 * W], [(ri, ro), (ri, ro)], backend=backend))
    if fn == "energies_and_grad":
        return list(ep.energies_and_grad(W, ri, ro, lambda_perp=1.0, lambda_G=0.25, backend=backend))
    if fn == "energies_and_grads_many":
        e_perp, e_g, grads = ep.energies_and_grads_many([W, 2 * W], [(ri, ro), (ri, ro)], lambda_perp=[1.0, 0.5],
                                                        lambda_G=[0.25, 0.0], backend=backend)
        return [e_perp, e_g, *grads]
    if fn.startswith("project"):
        return [ep.project(W, ri, ro, which="non_equivariant" if fn.endswith("non_equivariant") else "equivariant")]
    which = "equivariant" if fn.endswith("_equivariant") else "non_equivariant"
    return list(ep.energy_breakdown(W, ri, ro, which=which).values())


def _run(fn, W0, ri, ro, backend, region) -> list[torch.Tensor]:
    """Outputs of ``fn`` called inside ``region`` and, for the differentiable functions, the gradient
    of a weighted sum of them, taken outside the region."""
    differentiable = fn not in ("energies_and_grad", "energies_and_grads_many")
    W = W0.clone().requires_grad_(differentiable)
    with region:
        out = _call(fn, W, ri, ro, backend)
    if differentiable:
        loss = sum((k + 1) * o.float().sum() for k, o in enumerate(out))
        out.append(torch.autograd.grad(loss, W)[0])
    return [o.detach() for o in out]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("device", "autocast_dtype", "fn", "backend"), list(_params()))
def test_same_results_under_autocast(device, autocast_dtype, fn, backend, case, gen):
    if backend == "cpp" and not ops.cpp_available():
        pytest.skip("the C++ extension equiproj._C is not built")
    ri, ro = CASES[case](gen)
    W = torch.randn(2, ro.dim, ri.dim, generator=gen).to(device)  # float32, a batch of two
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a backend fallback warning is not what is tested here
        plain = _run(fn, W, ri, ro, backend, contextlib.nullcontext())
        cast = _run(fn, W, ri, ro, backend, torch.autocast(device, dtype=autocast_dtype))
    assert len(cast) == len(plain)
    for k, (c, p) in enumerate(zip(cast, plain)):
        assert c.dtype == p.dtype and c.shape == p.shape, (k, c.dtype, p.dtype)
        assert _rel(c, p) <= TOL, (k, _rel(c, p))


@pytest.mark.parametrize(("device", "autocast_dtype", "fn", "backend"),
                         [p for p in _params() if p.values[2] in ("energies", "energies_and_grad",
                                                                  "energies_and_grads_many", "project")])
def test_half_precision_weights_under_autocast(device, autocast_dtype, fn, backend, gen):
    """float16 and bfloat16 weights (energies in float32, gradients in the weight's dtype) inside a region
    of the other half dtype: the same results (stacking float16 with bfloat16 under autocast would fail)."""
    if backend == "cpp" and not ops.cpp_available():
        pytest.skip("the C++ extension equiproj._C is not built")
    ri, ro = _so3_change_of_basis(gen)
    for wdt in (torch.float16, torch.bfloat16):
        W = torch.randn(3, ro.dim, ri.dim, generator=gen).to(device=device, dtype=wdt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plain = _run(fn, W, ri, ro, backend, contextlib.nullcontext())
            cast = _run(fn, W, ri, ro, backend, torch.autocast(device, dtype=autocast_dtype))
        for k, (c, p) in enumerate(zip(cast, plain)):
            assert c.dtype == p.dtype and c.shape == p.shape, (wdt, k, c.dtype, p.dtype)
            assert _rel(c, p) <= TOL, (wdt, k, _rel(c, p))


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_compiled_under_autocast(backend, gen):
    """``torch.compile(fullgraph=True)`` of the energies inside an autocast region traces the switch
    of region and gives the eager values. The gradient is compared for the fused backend only: its
    backward is the kernel; the pure-torch twin's backward is an autograd graph, which a compiled
    graph traces under the caller's autocast region (torch's ``backward_pass_autocast`` default)."""
    if backend == "cpp" and not ops.cpp_available():
        pytest.skip("the C++ extension equiproj._C is not built")
    torch._dynamo.reset()
    ri, ro = _so3_change_of_basis(gen)
    W = torch.randn(ro.dim, ri.dim, generator=gen, requires_grad=True)

    def loss(w):
        e_perp, e_g = ep.energies(w, ri, ro, backend=backend)
        return e_perp + 0.5 * e_g

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = compiled(W)
    assert value.dtype == torch.float32 and _rel(value.detach(), loss(W).detach()) <= TOL
    if backend != "torch":
        (g_comp,) = torch.autograd.grad(value, W)
        (g_eager,) = torch.autograd.grad(loss(W), W)
        assert _rel(g_comp, g_eager) <= TOL
