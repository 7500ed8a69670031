"""pytest-benchmark: the baselines of ``equiproj.baselines`` on the ``equiproj bench`` suite layers.

* the operator-level sample-based penalty (energy + gradient) at a fixed K = 64 samples (the
  time at the K needed for 1% error scales linearly: ``equiproj bench`` reports that K);
* the dense projector's energy + gradient where its basis fits (the O(3) 3-D conv row, and the
  MLP layer when timing), and its build;
* the training-step overhead of the data-level penalty (K=1) and of the projection penalty on
  the suite's small O(3) MLP.

``pytest bench/ --benchmark-only`` times the full-size layers; with ``--benchmark-disable`` (CI)
each case runs once at a reduced size and its result is checked.
"""

from __future__ import annotations

import math

import pytest
import torch

from equiproj import baselines
from equiproj.cli import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = bench.Settings.for_mode("default", device=DEVICE)
LAYERS = [L for L in bench.suite(SETTINGS) if not isinstance(L, tuple)]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.mark.benchmark(group="baseline-sampled")
@pytest.mark.parametrize("layer", LAYERS, ids=lambda L: L.key)
def test_sampled_operator_penalty(benchmark, layer):
    L = layer.verification_layer() if benchmark.disabled else layer
    K = 4 if benchmark.disabled else 64
    gen = torch.Generator().manual_seed(0)
    W = L.in_band(torch.randn(L.shape, generator=gen)).to(DEVICE).requires_grad_()

    def step():
        e = L.defects(W, L.group.sample(K, generator=gen)).mean()
        (g,) = torch.autograd.grad(e, W)
        _sync()
        return e, g

    e, g = benchmark(step)
    assert torch.isfinite(e) and float(e.detach()) > 0 and g.shape == W.shape
    if benchmark.disabled:  # statistical check of the estimator on this layer: 2 E_perp within 5 s.e.
        d = L.defects(W.detach(), L.group.sample(400, generator=gen)).double()
        exact = 2 * float(L.reference(W)[0])
        assert abs(float(d.mean()) - exact) < 5 * float(d.std()) / math.sqrt(len(d))


def _dense_layers():
    out = []
    for L in LAYERS:
        if L.key.startswith("o3conv"):
            out.append(L)
        elif L.key == "mlp":
            out.append(L)
    return out


@pytest.mark.benchmark(group="baseline-dense")
@pytest.mark.parametrize("layer", _dense_layers(), ids=lambda L: L.key)
def test_dense_projector(benchmark, layer):
    L = layer.dense_check_layer() if benchmark.disabled else layer
    dtype = torch.float64 if benchmark.disabled else torch.float32
    try:
        dense = L.dense(dtype, DEVICE, max_bytes=SETTINGS.dense_max_bytes)
    except MemoryError as e:
        pytest.skip(str(e))
    W = torch.randn(L.shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(DEVICE).requires_grad_()

    def step():
        e_perp, e_g = L.dense_energies(dense, W)
        (g,) = torch.autograd.grad(e_perp.sum(), W)
        _sync()
        return e_perp, e_g

    e_perp, e_g = benchmark(step)
    rp, rg = L.reference(W) if benchmark.disabled else (e.double().cpu() for e in L.energies(W.detach().double(), "torch"))
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(e_perp.double().cpu(), rp, rtol=tol, atol=0)
    torch.testing.assert_close(e_g.double().cpu(), rg, rtol=tol, atol=1e-12)


@pytest.mark.benchmark(group="baseline-dense-build")
def test_dense_projector_build(benchmark):
    L = next(L for L in LAYERS if L.key == "mlp")
    L = L.dense_check_layer() if benchmark.disabled else L
    dense = benchmark.pedantic(lambda: L.dense(torch.float32, DEVICE, method="irreps"), rounds=1 if benchmark.disabled else 3)
    N, D = L.dense_size()
    assert dense.Q.shape == (N, D)


@pytest.mark.benchmark(group="training-step")
@pytest.mark.parametrize("penalty", ["none", "projection", "data_k1"])
def test_training_step_overhead(benchmark, penalty):
    from equiproj import O3, energies_many

    model, reps, r_in, r_out = bench.small_model(O3())
    model = model.to(DEVICE)
    params = list(model.parameters())
    weights = [m.weight for m in model if isinstance(m, torch.nn.Linear)]
    gen = torch.Generator().manual_seed(2)
    B = 16 if benchmark.disabled else SETTINGS.overhead_batch
    x = torch.randn(B, r_in.dim, generator=gen).to(DEVICE)
    y = torch.randn(B, r_out.dim, generator=gen).to(DEVICE)

    def step():
        fx = model(x)
        loss = torch.nn.functional.mse_loss(fx, y)
        if penalty == "projection":
            loss = loss + 1e-2 * energies_many(weights, reps)[0].sum()
        elif penalty == "data_k1":
            loss = loss + 1e-2 * baselines.sampled_data_penalty(model, x, O3(), act_in=r_in, act_out=r_out,
                                                                num_samples=1, generator=gen, fx=fx)
        grads = torch.autograd.grad(loss, params)
        _sync()
        return loss, grads

    loss, grads = benchmark(step)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
