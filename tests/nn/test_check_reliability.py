"""``check_equivariance`` never misleads: it leaves the model exactly as it was, cannot be fooled by
tiny or constant outputs, blames the right place when untyped modules are involved, refuses what
it cannot compare with a message that says what to pass, and measures off-grid rotations by
resampling (with interpolation error) when asked."""

import io

import pytest
import torch
from torch import nn

import equiproj as ep
from equiproj import Rep
from equiproj.nn import (FieldBatchNorm, NormPooling, PointwiseActivation, check_equivariance, declare,
                         default_tolerance, equivariance_sweep, init_equivariant_, project_)
from equiproj.nn._check import _resample


def c4_mlp(dtype=torch.float32, project=True):
    G = ep.Cyclic(4)
    r_in, h = 2 * G.regular(), 3 * G.regular()
    model = nn.Sequential(declare(nn.Linear(r_in.dim, h.dim), r_in, h), FieldBatchNorm(h), PointwiseActivation(h),
                          declare(nn.Linear(h.dim, h.dim), h, h)).to(dtype)
    if project:
        project_(model)
    return model, r_in, h


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_model_comes_back_bit_identical_with_mixed_modes(seed):
    model, r_in, h = c4_mlp()
    x = torch.randn(6, r_in.dim)
    model.train()
    model(x)
    model(x * 2 + 1)  # running statistics away from their initial values
    model[1].eval()  # as from_escnn leaves them: the top level in training mode, a batch norm in eval mode
    before_state, before_flags = state(model), [m.training for m in model.modules()]
    before_out = model(x)
    result = check_equivariance(model, r_in, h, x)
    assert result.ok, str(result)
    assert [m.training for m in model.modules()] == before_flags
    after = state(model)
    assert after.keys() == before_state.keys()
    for k in after:
        assert torch.equal(after[k], before_state[k]), k
    assert torch.equal(model(x), before_out)
    assert result.restored == []


class CountingLinear(nn.Module):
    """An equivariant layer whose forward bumps a counter buffer and scales its input in place."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.calls += 1
        x.mul_(2.0)  # in place: each run must get a fresh copy of the input
        return self.layer(x)


def test_forward_side_effects_are_undone_and_inputs_are_fresh_copies(seed):
    G = ep.Cyclic(4)
    r = 2 * G.regular()
    model = CountingLinear(declare(nn.Linear(r.dim, r.dim), r, r))
    project_(model)
    x = torch.randn(5, r.dim)
    x0 = x.clone()
    result = check_equivariance(model, r, r, x)
    assert result.ok, str(result)
    assert int(model.calls) == 0 and result.restored == ["buffer calls"]
    assert torch.equal(x, x0)


def test_tiny_non_equivariant_float64_output_is_flagged(seed):
    G = ep.Cyclic(4)
    r = 2 * G.regular()
    layer = declare(nn.Linear(r.dim, r.dim, bias=False), r, r).double()  # random: not equivariant
    model = nn.Sequential(layer)
    x = torch.randn(4, r.dim, dtype=torch.float64) * 1e-200
    result = check_equivariance(model, r, r, x)
    assert not result.ok and result.max_rel_error > 1e-2, str(result)
    assert 0 < result.max_abs_error < 1e-190 and 1e-202 < result.output_norm < 1e-195
    assert result.cannot_judge is None
    project_(model)
    assert check_equivariance(model, r, r, x).ok  # and the projected one passes at that scale


class Scaled(nn.Module):
    def __init__(self, layer, factor):
        super().__init__()
        self.layer, self.factor = layer, factor

    def forward(self, x):
        return self.factor * self.layer(x)


class NearlyConstant(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return 1e8 + 1e-3 * self.layer(x)


def test_output_too_constant_or_too_small_cannot_be_judged(seed):
    G = ep.Cyclic(4)
    r = 2 * G.regular()
    model = NearlyConstant(nn.Linear(r.dim, r.dim))  # non-equivariant, hidden below float32 rounding
    x = torch.randn(4, r.dim)
    result = check_equivariance(model, r, r, x)
    assert result.cannot_judge is not None and "barely varies" in result.cannot_judge
    assert not result.ok and "cannot judge" in str(result)
    result = check_equivariance(Scaled(nn.Linear(r.dim, r.dim), 0.0), r, r, x)
    assert not result.ok and "too small" in result.cannot_judge


def test_error_entering_in_untyped_modules_is_not_pinned_on_the_next_typed_one(seed):
    G = ep.Cyclic(4)
    r = 2 * G.regular()
    model = nn.Sequential(declare(nn.Linear(r.dim, r.dim), r, r), nn.ReLU(), nn.Linear(r.dim, r.dim),  # undeclared
                          nn.BatchNorm1d(r.dim), declare(nn.Linear(r.dim, r.dim), r, r))
    project_(model)
    x = torch.randn(6, r.dim)
    result = check_equivariance(model, r, r, x)
    assert not result.ok
    assert result.first_failure is not None and result.first_failure[0] == "4"
    assert result.entered_after == "1" and result.untyped_between == ["2", "3"]
    assert "'1' (which passed)" in str(result) and "['2', '3']" in str(result)
    assert result.worst_module[0] == "4" and result.worst_module[1] == result.modules["4"]
    assert result.tolerance == default_tolerance(torch.float32) == 1e-4
    # with nothing typed after the untyped module, the output carries the blame
    tail = nn.Sequential(declare(nn.Linear(r.dim, r.dim), r, r), nn.Linear(r.dim, r.dim))
    project_(tail)
    result = check_equivariance(tail, r, r, x)
    assert not result.ok and result.first_failure is None
    assert result.entered_after == "0" and result.untyped_between == ["1"]


def test_typed_failure_without_untyped_modules_is_named_directly(seed):
    model, r_in, h = c4_mlp(project=False)
    result = check_equivariance(model, r_in, h, torch.randn(6, r_in.dim))
    assert result.first_failure[0] == "0" and result.untyped_between == [] and result.entered_after is None


def test_clear_errors_for_what_cannot_be_compared(seed):
    model, r_in, h = c4_mlp()
    x = torch.randn(4, r_in.dim)
    with pytest.raises(ValueError, match="rep_out .* has dimension 8"):
        check_equivariance(model, r_in, 2 * ep.Cyclic(4).regular(), x)
    with pytest.raises(ValueError, match="empty"):
        check_equivariance(model, r_in, h, x[:0])

    class DictOut(nn.Module):
        def forward(self, x):
            return {"y": x}

    with pytest.raises(TypeError, match="tuple of them"):
        check_equivariance(DictOut(), r_in, r_in, x)

    class TupleOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, x):
            return self.m(x), x.sum(1, keepdim=True)

    result = check_equivariance(TupleOut(), r_in, (h, ep.Cyclic(4).trivial()), x)
    assert result.ok, str(result)
    with pytest.raises(ValueError, match="one rep per output"):
        check_equivariance(TupleOut(), r_in, h, x)


def test_resampling_matches_the_exact_action_on_grid_elements(gen):
    for n in (7, 6):
        t = torch.randn(2, 3, n, n, generator=gen, dtype=torch.float64)
        for g in ep.Dihedral(4).elements():
            torch.testing.assert_close(_resample(t, g), ep.grid.act(t, g), rtol=1e-12, atol=1e-12)
    t3 = torch.randn(1, 2, 4, 4, 4, generator=gen, dtype=torch.float64)
    for g in ep.FullOctahedral().elements():
        if True:
            torch.testing.assert_close(_resample(t3, g), ep.grid.act(t3, g), rtol=1e-12, atol=1e-12)


def c8_cnn():
    G = ep.Cyclic(8)
    h = 2 * G.regular()
    model = nn.Sequential(declare(nn.Conv2d(3, h.dim, 5, padding=2), 3 * G.trivial(), h), PointwiseActivation(h),
                          declare(nn.Conv2d(h.dim, h.dim, 5, padding=2), h, h), NormPooling(h))
    init_equivariant_(model)
    return model, G, h


def test_off_grid_rotation_is_measured_by_resampling(seed):
    model, G, h = c8_cnn()
    x = torch.randn(2, 3, 33, 33)
    for _ in range(2):  # smooth images: interpolation is milder
        x = torch.nn.functional.avg_pool2d(x, 5, 1, 2)
    r45 = torch.tensor([[0.5**0.5, -(0.5**0.5)], [0.5**0.5, 0.5**0.5]], dtype=torch.float64)
    r90 = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
    result = check_equivariance(model, 3 * G.trivial(), NormPooling(h).rep_out, x, elements=torch.stack([r90, r45]))
    assert result.resampled and result.elements_kind == "given"
    assert result.per_element[0] < 1e-5  # exact on the grid
    assert 1e-4 < result.per_element[1] < 0.5  # interpolation error, but of the order of a working model
    # a model that is not C8-equivariant shows a larger error at 45 degrees
    broken = nn.Sequential(nn.Conv2d(3, h.dim, 5, padding=2), NormPooling(h))
    bad = check_equivariance(broken, 3 * G.trivial(), NormPooling(h).rep_out, x, elements=r45[None])
    assert bad.per_element[0] > 2 * result.per_element[1]
    # an element outside the group is refused
    with pytest.raises(ValueError, match="not elements"):
        check_equivariance(model, 3 * G.trivial(), NormPooling(h).rep_out, x,
                           elements=torch.tensor([[[0.8, -0.6], [0.6, 0.8]]], dtype=torch.float64))


def test_pointwise_model_commutes_with_resampling_exactly(seed):
    G = ep.SO2()
    r = Rep.parse(G, "2x0 + 1")
    model = nn.Sequential(declare(nn.Conv2d(r.dim, r.dim, 1), r, r))
    project_(model)
    x = torch.randn(2, r.dim, 9, 9, dtype=torch.float64)
    model.double()
    result = check_equivariance(model, r, r, x, elements=torch.stack([ep.nn._check._rotation(a, 2, None)
                                                                      for a in (30.0, 45.0, 200.0)]))
    assert result.resampled and result.max_rel_error < 1e-12, str(result)


def test_sweep_prints_errors_over_angles(seed):
    model, G, h = c8_cnn()
    x = torch.randn(2, 3, 21, 21)
    out = io.StringIO()
    rows = equivariance_sweep(model, 3 * G.trivial(), NormPooling(h).rep_out, x, file=out)
    assert [a for a, _, _ in rows] == [45.0 * k for k in range(8)]
    text = out.getvalue()
    assert "resampled" in text and "exact" in text and len(text.splitlines()) == 9
    exact = [rel for a, rel, _ in rows if a % 90 == 0]
    assert max(exact) < 1e-5
    rows = equivariance_sweep(model, 3 * G.trivial(), NormPooling(h).rep_out, x, angles=[0, 30, 45], file=out)
    assert [a for a, _, _ in rows] == [0.0, 45.0] and "skipped" in out.getvalue()
