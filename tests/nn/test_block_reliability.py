"""The blocks follow the user's coordinates whatever the storage of a rep, and stay finite at zero.

* Per-copy inputs and parameters (gates, norm biases, batch-norm scales and biases) meet the copy
  of the same number in the user's channel order, also for reps stored permuted (more than 64
  repeated segments are merged into one segment per field, with a permutation).
* A zero field copy (padding, masked inputs) has a finite gradient through the norm blocks,
  whatever ``eps``; a tiny one does not underflow to a zero norm.
* ``FieldBatchNorm``'s running variance is the unbiased estimate, as ``nn.BatchNorm``'s.
"""

import functools
import operator

import pytest
import torch

import equiproj as ep
from equiproj import Rep
from equiproj.nn import FieldBatchNorm, FieldLayerNorm, Gate, GroupPooling, NormActivation, NormPooling


def copy_slices(copies):
    """The channel slice of each user copy, for copies of the given dims laid out one after another."""
    out, o = [], 0
    for d in copies:
        out.append(slice(o, o + d))
        o += d
    return out


@pytest.mark.parametrize("n", [32, 33, 70])
def test_gate_pairs_gate_k_with_copy_k_whatever_the_storage(n, gen):
    G = ep.O3()
    gated = n * Rep.parse(G, "1o + 2e")  # n > 32: stored as one segment per field, with a permutation
    assert (gated.perm is not None) == (n > 32)
    gate = Gate(Rep.parse(G, "0e"), Rep.parse(G, f"{2 * n}x0e"), gated, act_gates=lambda t: t)
    v = torch.randn(3, gated.dim, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 2 * n, generator=gen, dtype=torch.float64)
    x = torch.cat([torch.zeros(3, 1, dtype=torch.float64), g, v], 1)
    y = gate(x)[:, 1:]
    for k, sl in enumerate(copy_slices([3, 5] * n)):
        torch.testing.assert_close(y[:, sl], v[:, sl] * g[:, k : k + 1], rtol=0, atol=0)


def test_per_copy_parameters_follow_user_copies(gen):
    """A permuted rep and the same rep written without permutation (segment by segment) give the
    same outputs when the per-copy parameters are the same vectors."""
    G = ep.O3()
    n = 33
    permuted = n * Rep.parse(G, "0e + 1o")
    plain = functools.reduce(operator.add, [Rep.parse(G, "0e + 1o")] * n)  # 2n segments, no permutation
    assert permuted.perm is not None and plain.perm is None
    x = torch.randn(4, permuted.dim, 3, generator=gen, dtype=torch.float64)
    for make in (lambda r: NormActivation(r), lambda r: FieldBatchNorm(r), lambda r: FieldLayerNorm(r)):
        a, b = make(permuted).double(), make(plain).double()
        with torch.no_grad():
            for name, p in a.named_parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
                getattr(b, name).copy_(p)
        ya, yb = a(x), b(x)
        torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12, msg=type(a).__name__)


@pytest.mark.parametrize("block", [NormPooling, GroupPooling])
def test_pooling_output_follows_user_copies(block, gen):
    G = ep.Cyclic(4)
    rep = 40 * (G.regular() + G.trivial())  # 80 segments: stored permuted
    assert rep.perm is not None
    x = torch.randn(2, rep.dim, generator=gen, dtype=torch.float64)
    y = block(rep)(x)
    for k, sl in enumerate(copy_slices([4, 1] * 40)):
        part = x[:, sl]
        ref = part.norm(dim=1) if block is NormPooling else part.amax(1)
        torch.testing.assert_close(y[:, k], ref, rtol=1e-14, atol=0)


@pytest.mark.parametrize("make", [lambda r: NormPooling(r), lambda r: NormPooling(r, eps=1e-3),
                                  lambda r: NormActivation(r, eps=0.0),
                                  lambda r: NormActivation(r, eps=0.0, normalize=True, act=torch.relu),
                                  lambda r: NormActivation(r, eps=1e-6, normalize=True)],
                         ids=["pool", "pool-eps", "act", "act-normalize", "act-normalize-eps"])
def test_norm_blocks_have_finite_gradients_at_zero(make, gen):
    rep = Rep.parse(ep.O3(), "2x1o + 0e")
    block = make(rep).double()
    x = torch.randn(4, rep.dim, generator=gen, dtype=torch.float64)
    x[1] = 0.0
    x[2, :3] = 0.0  # one copy of one sample
    x.requires_grad_(True)
    y = block(x)
    assert torch.isfinite(y).all()
    w = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (y * w).sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in block.parameters():
        assert torch.isfinite(p.grad).all()
    # the other samples' gradients are those of the same block on them alone
    x2 = x.detach()[[0, 3]].clone().requires_grad_(True)
    (block(x2) * w[[0, 3]]).sum().backward()
    torch.testing.assert_close(x.grad[[0, 3]], x2.grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype,scale", [(torch.float64, 1e-200), (torch.float32, 1e-30)])
def test_norm_of_tiny_copies_does_not_underflow(dtype, scale, gen):
    rep = Rep.parse(ep.O3(), "3x1o")
    x = torch.randn(2, rep.dim, generator=gen, dtype=torch.float64)
    ref = x.reshape(2, 3, 3).norm(dim=2)
    y = NormPooling(rep)((x * scale).to(dtype))
    torch.testing.assert_close(y.double() / scale, ref, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)


def test_field_batch_norm_running_variance_is_unbiased(gen):
    G = ep.O3()
    rep = Rep.parse(G, "0e + 1o")
    bn = FieldBatchNorm(rep, momentum=1.0).double()
    x = torch.randn(5, rep.dim, 2, generator=gen, dtype=torch.float64)
    bn(x)
    s = x[:, 0].flatten()  # the trivial field: n = 10 values, the mean removed (k = 1)
    torch.testing.assert_close(bn.running_var_0, s.var(unbiased=True).reshape(1), rtol=1e-12, atol=0)
    v = x[:, 1:].flatten()  # the vector field has no invariant part: no mean removed, n = 30 values
    torch.testing.assert_close(bn.running_var_1, v.square().mean().reshape(1), rtol=1e-12, atol=0)
    # nn.BatchNorm on scalar fields alike
    ref = torch.nn.BatchNorm1d(1, momentum=1.0).double()
    ref(x[:, :1])
    torch.testing.assert_close(bn.running_var_0, ref.running_var, rtol=1e-12, atol=0)


def test_field_batch_norm_refuses_a_single_value_per_channel_in_training():
    bn = FieldBatchNorm(Rep.parse(ep.O3(), "2x0e"))
    with pytest.raises(ValueError, match="at least 2 samples"):
        bn(torch.randn(1, 2))
    bn.eval()
    assert torch.isfinite(bn(torch.randn(1, 2))).all()


@pytest.mark.parametrize("block", [FieldBatchNorm, FieldLayerNorm])
def test_field_norms_need_a_positive_eps_and_are_finite_at_zero(block):
    rep = Rep.parse(ep.O3(), "0e + 1o")
    with pytest.raises(ValueError, match="eps must be a number > 0"):
        block(rep, eps=0.0)
    x = torch.zeros(3, rep.dim, 2, requires_grad=True)
    y = block(rep)(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
