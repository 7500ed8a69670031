"""pytest-benchmark: the exact energy + gradient on the layers of the ``equiproj bench`` suite.

Cases (the suite of ``equiproj bench``): the O(3) MLP layer 64x0e+32x1o+16x2e, the C8-regular
2-D conv (32 fields, k=5, steerable), the O(3) 3-D conv of l <= 2 fields (k=5, steerable), the
linear 4096 x 4096 layer with 1024x0e+1024x1o, and a read+write pass over the same bytes (the
bandwidth floor). Methods: the pure-torch spectral path and every fused backend that answers on
this device (``equiproj.cli.bench.available_backends``).

``pytest bench/ --benchmark-only`` times the full-size layers for regression tracking. With
``--benchmark-disable`` (CI) each case runs once, at the reduced size that ``equiproj bench``
verifies, and is checked against the float64 reference.
"""

from __future__ import annotations

import pytest
import torch

from equiproj.cli import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = bench.Settings.for_mode("default", device=DEVICE)
LAYERS = [L for L in bench.suite(SETTINGS) if not isinstance(L, tuple)]
BACKENDS = ["torch"] + [b for b, why in bench.available_backends(DEVICE).items() if why is None]


def _layer(benchmark, layer):
    """The full-size layer when timing, the reduced (verified) one when benchmarks are disabled."""
    return layer.verification_layer() if benchmark.disabled else layer


@pytest.mark.benchmark(group="suite-exact")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", LAYERS, ids=lambda L: L.key)
def test_exact_energy_and_gradient(benchmark, layer, backend):
    L = _layer(benchmark, layer)
    W = torch.randn(L.shape, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_()

    def step():
        e_perp, e_g = L.energies(W, backend)
        (g,) = torch.autograd.grad(e_perp.sum(), W)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return e_perp, e_g, g

    e_perp, e_g, g = benchmark(step)
    # reduced layers: the float64 reference; full size: the float64 torch path (verified by `equiproj bench`)
    rp, rg = L.reference(W) if benchmark.disabled else (e.double().cpu() for e in L.energies(W.detach().double(), "torch"))
    torch.testing.assert_close(e_perp.double().cpu(), rp, rtol=1e-4, atol=0)
    torch.testing.assert_close(e_g.double().cpu(), rg, rtol=1e-4, atol=0)
    assert torch.isfinite(g).all() and g.shape == W.shape


@pytest.mark.benchmark(group="suite-floor")
@pytest.mark.parametrize("layer", LAYERS, ids=lambda L: L.key)
def test_floor_read_write(benchmark, layer):
    L = _layer(benchmark, layer)
    src = torch.randn(L.shape).to(DEVICE)
    dst = torch.empty_like(src)

    def step():
        torch.mul(src, 2.0, out=dst)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
    torch.testing.assert_close(dst, 2 * src)
