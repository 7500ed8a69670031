"""Shared pytest setup for tests/ and bench/.

* Without a GPU, Triton kernels run in the interpreter: ``TRITON_INTERPRET`` must be set before
  any module defining ``@triton.jit`` kernels is imported.
* ``seed`` / ``gen``: every random test is seeded from its own test id, so a failure replays
  exactly (``EQUIPROJ_TEST_SEED=n`` shifts all seeds, to explore other draws). ``seed`` also
  seeds torch's global generator (layer initialisation uses it).
* Doctests (``pytest --doctest-modules equiproj``): each starts from ``torch.manual_seed(0)``; one
  whose example imports an optional package that is not installed (escnn, e3nn) is skipped.
"""

import importlib.util
import os
import re
import zlib

import pytest
import torch
from _pytest.doctest import DoctestItem

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def seed(request) -> int:
    s = (zlib.crc32(request.node.nodeid.encode()) + int(os.environ.get("EQUIPROJ_TEST_SEED", "0"))) % 2**31
    torch.manual_seed(s)
    return s


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pytest_report_header(config):
    return f"equiproj tests: seeds from test ids (EQUIPROJ_TEST_SEED={os.environ.get('EQUIPROJ_TEST_SEED', '0')})"


#: optional packages a doctest may import; its example is skipped where the package is missing
OPTIONAL_IN_DOCTESTS = ("escnn", "e3nn", "matplotlib", "sklearn", "phi")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not isinstance(item, DoctestItem):
            continue
        source = "".join(e.source for e in item.dtest.examples)
        for name in OPTIONAL_IN_DOCTESTS:
            if re.search(rf"^\s*(from|import)\s+{name}\b", source, re.M) and importlib.util.find_spec(name) is None:
                item.add_marker(pytest.mark.skip(reason=f"the example needs {name}, which is not installed"))


@pytest.fixture(autouse=True)
def _seeded_doctest(request):
    if isinstance(request.node, DoctestItem):
        torch.manual_seed(0)


# scripts that make the committed fixtures need the peer libraries (escnn): run by hand, never collected
collect_ignore = ["tests/nn/data/export_escnn_models.py"]


@pytest.fixture
def check_triton(gen):
    """``check(rep_in, rep_out, dtype, reference_rep_in=None)``: the Triton kernel (under the interpreter
    without a GPU) on two random weights of ``dtype`` with different coefficients, energies and gradients
    against the float64 reference on ``reference_rep_in`` (default ``rep_in``: the same representation),
    then the decoupled step, the gradient added into the first weight itself."""
    kernels = pytest.importorskip("equiproj.kernels.triton_energies")
    from equiproj import reference
    from equiproj._plan import plan_for
    from equiproj.testing import relative_error

    device = "cuda" if torch.cuda.is_available() else "cpu"

    def check(rep_in, rep_out, dtype, reference_rep_in=None):
        ref_in = rep_in if reference_rep_in is None else reference_rep_in
        W = torch.randn(2, rep_out.dim, rep_in.dim, generator=gen).to(dtype)
        P = plan_for(rep_in, rep_out, device, torch.float32)
        lambda_perp, lambda_G = torch.tensor([1.0, 0.5]), torch.tensor([0.25, 0.0])
        flat = [w.to(device) for w in W.unbind(0)]
        ep, eg, grads = kernels.fused_energies(flat, [P, P], lambda_perp, lambda_G)
        tol = 2e-5 if dtype == torch.float32 else 1e-2  # half precision: the gradient is stored in W's dtype
        for k in range(2):
            x = W[k].double()
            ref_p, ref_g = reference.energies(x, ref_in, rep_out)
            PW = reference.project(x, ref_in, rep_out)
            assert relative_error(ep[k].cpu(), ref_p) < 2e-5 and relative_error(eg[k].cpu(), ref_g) < 2e-5
            want = 2 * float(lambda_perp[k]) * (x - PW) + 2 * float(lambda_G[k]) * PW
            assert float((grads[k].cpu().double() - want).abs().max()) <= tol * float(want.abs().max())
        out = flat[0].clone()
        kernels.fused_energies([out], [P], torch.tensor([-0.05]), torch.tensor([0.0]), outs=[out])
        x = W[0].double()
        want = x - 0.1 * (x - reference.project(x, ref_in, rep_out))
        assert float((out.cpu().double() - want).abs().max()) <= 10 * tol * float(x.abs().max())

    return check


@pytest.fixture
def check_penalty_step(gen):
    """``check(module, W, rep_in, rep_out)``: for a declared ``module`` given the float32 weight ``W``
    (as ``[m, n]``, the rep pair's shape), ``ProjectionPenalty(module, lambda_perp=0.5).backward()`` adds
    ``2 * 0.5 (W - P W)`` to an existing ``.grad`` and ``decay_(0.25)`` sets the weight to
    ``W - 0.25 (W - P W)``, both to 1e-5 of the float64 reference projection on ``(rep_in, rep_out)``."""
    from equiproj import reference
    from equiproj.nn import ProjectionPenalty

    def check(module, W, rep_in, rep_out):
        shape = module.weight.shape
        with torch.no_grad():
            module.weight.copy_(W.float().reshape(shape))
        penalty = ProjectionPenalty(module, lambda_perp=0.5)
        Wf = W.float().double()
        PW = reference.project(Wf, rep_in, rep_out)
        grad0 = torch.randn(shape, generator=gen)
        module.weight.grad = grad0.clone()
        penalty.backward()
        want = grad0.double() + (2 * 0.5 * (Wf - PW)).reshape(shape)
        torch.testing.assert_close(module.weight.grad.double(), want, atol=1e-5, rtol=1e-5)
        penalty.decay_(0.25)
        want = (Wf - 0.25 * (Wf - PW)).reshape(shape)
        torch.testing.assert_close(module.weight.detach().double(), want, atol=1e-5, rtol=1e-5)

    return check
