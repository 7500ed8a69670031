"""pytest-benchmark: the fused Triton kernel against the pure-torch paths, energies + gradient.

Compared in one run, same weights (field dims 1, 3, 5: SO(3) ``Nx0 + Nx1 + Nx2``):

* ``fused``: ``equiproj.kernels.fused_energies`` with coefficients (one pass: energies + grad);
* ``twin``: ``equiproj.kernels.torch_fused_energies`` (the kernel's pure-torch twin);
* ``torch_autograd``: ``equiproj.energies`` + ``backward`` (the core pure-torch path).

On CUDA the weight is 2048 x 2048 float32 (16 MiB); on the CPU the kernel runs in the Triton
interpreter, so the shape is tiny and only the ratio between the two torch paths means anything.
CI runs this file with ``--benchmark-disable`` as a test: each path runs once and is checked
against the twin. ``bench/gpu_bench.py`` gives the full GPU table (bandwidth, sizes, dtypes).
"""

from __future__ import annotations

import os

import pytest
import torch

import equiproj
from equiproj._plan import block_plan
from equiproj.kernels import HAS_TRITON, fused_energies, torch_fused_energies

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
KERNEL_RUNS = HAS_TRITON and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.fixture(scope="module")
def layer():
    G = equiproj.SO3()
    n = 227 if CUDA else 2  # 9n = 2043 on CUDA
    rep = equiproj.Rep.parse(G, f"{n}x0 + {n}x1 + {n}x2")
    W = torch.randn(rep.dim, rep.dim, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    P = block_plan(rep, rep).packed(DEVICE, torch.float32)
    lambda_perp, lambda_G = torch.tensor([1.0], device=DEVICE), torch.tensor([0.5], device=DEVICE)
    expected = torch_fused_energies([W], [P], lambda_perp, lambda_G)
    return rep, W, P, lambda_perp, lambda_G, expected


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _check(out, expected):
    (ep,), (eg,), (g,) = out
    (tp,), (tg,), (tgrad,) = expected
    torch.testing.assert_close(ep.float(), tp.float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(eg.float(), tg.float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(g, tgrad, rtol=1e-4, atol=1e-5)


@pytest.mark.benchmark(group="fused-energies")
@pytest.mark.skipif(not KERNEL_RUNS, reason="needs triton and a GPU, or TRITON_INTERPRET=1")
def test_fused(benchmark, layer):
    rep, W, P, cp, cg, expected = layer

    def run():
        out = fused_energies([W], [P], cp, cg)
        _sync()
        return out

    _check(benchmark(run), expected)


@pytest.mark.benchmark(group="fused-energies")
def test_twin(benchmark, layer):
    rep, W, P, cp, cg, expected = layer

    def run():
        out = torch_fused_energies([W], [P], cp, cg)
        _sync()
        return out

    _check(benchmark(run), expected)


@pytest.mark.benchmark(group="fused-energies")
def test_torch_autograd(benchmark, layer):
    rep, W, P, cp, cg, expected = layer
    Wg = W.clone().requires_grad_()

    def run():
        Wg.grad = None
        ep, eg = equiproj.energies(Wg, rep, rep)
        (cp * ep + cg * eg).sum().backward()
        _sync()
        return [ep.detach()], [eg.detach()], [Wg.grad]

    _check(benchmark(run), expected)
