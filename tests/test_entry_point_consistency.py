"""Every entry point behaves alike on the same input: NaN weights refused by the projection as by the
energies, energies in the weights' accumulation dtype whatever the backend or the mix of layers,
meta-device weights refused by name, ASCII-only representation strings, schedules defined at
every step."""

import math

import pytest
import torch

import equiproj as ep
from equiproj import Rep
from equiproj.nn import constant, cosine, linear_warmup


def c4():
    G = ep.Cyclic(4)
    return G, 2 * G.regular()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("which", ["equivariant", "non_equivariant"])
def test_project_refuses_non_finite_weights_like_the_energies(bad, which, gen):
    G, r = c4()
    W = torch.randn(r.dim, r.dim, generator=gen)
    W[1, 2] = bad
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        ep.energies(W, r, r)
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        ep.project(W, r, r, which=which)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_reference_backend_returns_the_dtype_of_the_other_backends(dtype, gen):
    G, r = c4()
    W = torch.randn(r.dim, r.dim, generator=gen).to(dtype)
    fast = ep.energies(W, r, r, backend="torch")
    ref = ep.energies(W, r, r, backend="reference")
    assert [e.dtype for e in ref] == [e.dtype for e in fast]
    torch.testing.assert_close(ref[0].double(), fast[0].double(), rtol=1e-5, atol=1e-6)
    e_perp, e_g, grad = ep.energies_and_grad(W, r, r, lambda_perp=1.0, lambda_G=0.0, backend="reference")
    assert e_perp.dtype == fast[0].dtype and grad.dtype == dtype


def test_energies_many_keeps_float64_layers_in_float64(gen):
    G, r = c4()
    W64 = torch.randn(r.dim, r.dim, generator=gen, dtype=torch.float64)
    W64 = ep.project(W64, r, r) + 1e-9 * W64  # nearly equivariant: float32 would round its energy away
    W32 = torch.randn(r.dim, r.dim, generator=gen)
    e_perp, _ = ep.energies_many([W32, W64], [(r, r), (r, r)])
    assert e_perp.dtype == torch.float64
    alone, _ = ep.energies(W64, r, r)
    torch.testing.assert_close(e_perp[1], alone, rtol=1e-12, atol=0)
    e_perp, _, _ = ep.energies_and_grads_many([W32, W64], [(r, r), (r, r)], lambda_perp=[1.0, 1.0],
                                              lambda_G=[0.0, 0.0])
    assert e_perp.dtype == torch.float64 and e_perp[1] == alone


def test_meta_device_weights_get_a_clear_error():
    G, r = c4()
    W = torch.empty(r.dim, r.dim, device="meta")
    for fn in (lambda: ep.energies(W, r, r), lambda: ep.project(W, r, r),
               lambda: ep.energies_many([W], [(r, r)]),
               lambda: ep.energies_and_grad(W, r, r, lambda_perp=1.0, lambda_G=0.0)):
        with pytest.raises(ValueError, match="meta device.*materialise"):
            fn()


@pytest.mark.parametrize("text", ["\u0663x0", "2x\u0661", "\uff13x0", "2x0 + \u0968x1"])
def test_rep_strings_take_ascii_digits_only(text):
    with pytest.raises(ValueError, match="ASCII"):
        Rep.parse(ep.SO2(), text)
    assert Rep.parse(ep.SO2(), "3x0 + 2x1").dim == 7


@pytest.mark.parametrize("schedule", [constant(0.5), linear_warmup(0.5, 10), cosine(0.5, 10), cosine(0.5, 10, 0),
                                      cosine(0.5, 10, warmup=3, final=0.1)])
def test_schedules_treat_negative_steps_as_step_zero(schedule):
    for step in (-5, -1):
        assert schedule(step) == schedule(0)
