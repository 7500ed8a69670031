"""The penalty follows the model; convolutions whose geometry cannot keep the grid symmetry are refused or
warned about; clear errors for meta-device models and missing weights; undeclared layers in reports."""

import warnings

import pytest
import torch
from torch import nn

import equiproj as ep
from equiproj import reference
from equiproj.nn import ProjectionPenalty, centred_grid, declare, project_, report, undeclare
from equiproj.testing import relative_error as rel

G = ep.SO3()
R = ep.Rep.parse(G, "2x0 + 1")


def mlp():
    return nn.Sequential(declare(nn.Linear(R.dim, R.dim).double(), R, R), nn.Tanh(),
                         nn.Linear(R.dim, R.dim).double())


def ref(layer, ri, ro):
    W = torch.cat([layer.weight.detach(), layer.bias.detach()[:, None]], 1)
    return reference.energies(W, ri + G.trivial(), ro)[0]


def test_penalty_sees_layers_declared_after_it_was_built(seed):
    model = mlp()
    pen = ProjectionPenalty(model, 1.0)
    assert pen.names == ["0"]
    declare(model[2], R, R)
    assert pen.names == ["0"] and rel(pen(), ref(model[0], R, R) + ref(model[2], R, R)) < 1e-10
    assert pen.names == ["0", "2"]
    undeclare(model[2])
    assert rel(pen(), ref(model[0], R, R)) < 1e-10 and pen.names == ["0"]


def test_penalty_follows_a_redeclaration(seed):
    model = mlp()
    pen = ProjectionPenalty(model, 1.0)
    other = ep.Rep.parse(G, "1 + 2x0")  # the same dimension, another order of the fields
    declare(model[0], other, other)
    fresh = ProjectionPenalty(model, 1.0)
    assert float(pen()) == float(fresh()) and rel(pen(), ref(model[0], other, other)) < 1e-10


def test_penalty_follows_a_module_swap(seed):
    model = mlp()
    pen = ProjectionPenalty(model, {"0": 2.0})
    model[0] = declare(nn.Linear(R.dim, R.dim).double(), R, R)
    pen.backward()
    assert model[0].weight.grad is not None
    torch.testing.assert_close(pen().detach(), 2.0 * ref(model[0], R, R), rtol=1e-10, atol=0)
    # a subset given as module objects: the swapped-out module is an error
    old = model[0]
    pen = ProjectionPenalty(model, 1.0, layers=[old])
    model[0] = declare(nn.Linear(R.dim, R.dim).double(), R, R)
    with pytest.raises(ValueError, match="not part of the model"):
        pen()


def test_lambdas_as_tensors_and_schedules(seed):
    model = mlp()
    pen = ProjectionPenalty(model, torch.tensor(0.5))
    assert pen.lambda_perp == [0.5]
    schedule = ep.nn.linear_warmup(1.0, steps=4)
    values = []
    for step in range(6):
        pen.set_lambdas(lambda_perp=torch.tensor(schedule(step)))
        values.append(float(pen()))
    e = float(ref(model[0], R, R))
    assert values == pytest.approx([0.0, 0.25 * e, 0.5 * e, 0.75 * e, e, e], rel=1e-10)
    with pytest.raises(TypeError, match="lambda_perp must be a number"):
        ProjectionPenalty(model, lambda_perp=None)
    with pytest.raises(ValueError, match=">= 0"):
        pen.set_lambdas(lambda_perp=torch.tensor(-1.0))


def test_meta_device_model_is_a_clear_error():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(R.dim, R.dim))
    declare(model[0], R, R)
    pen = ProjectionPenalty(model, 1.0)  # building it is fine: nothing is read
    for fn in (pen, pen.backward, lambda: project_(model), lambda: report(model)):
        with pytest.raises(ValueError, match="meta device.*materialise"):
            fn()


@pytest.mark.parametrize("kw", [dict(dilation=(1, 2), padding=(1, 2)), dict(stride=(1, 2), padding=1),
                                dict(padding=(0, 1)), dict(kernel_size=(3, 5), padding=(1, 2))])
def test_anisotropic_convs_are_refused_under_rotations(kw):
    C4 = ep.Cyclic(4)
    kw = {"kernel_size": 3, **kw}
    with pytest.raises(ValueError, match="treats the axes differently"):
        declare(nn.Conv2d(4, 4, **kw), C4.regular(), C4.regular())
    # a group that never swaps the axes (the reflection y -> -y) takes them
    D1 = ep.Dihedral(1)
    declare(nn.Conv2d(2, 2, **kw), D1.regular(), D1.regular())


def test_anisotropic_dilation_breaks_what_the_check_refuses(seed):
    """The refused layer is really not equivariant after projection: the energy alone cannot see it."""
    C4 = ep.Cyclic(4)
    conv = nn.Conv2d(4, 4, 3, padding=(1, 2), dilation=(1, 2)).double()
    declare(nn.Conv2d(4, 4, 3, padding=1).double(), C4.regular(), C4.regular())  # the same kernel grid
    plain = declare(nn.Conv2d(4, 4, 3, padding=1).double(), C4.regular(), C4.regular())
    project_(plain)
    with torch.no_grad():
        conv.weight.copy_(plain.weight)
        conv.bias.copy_(plain.bias)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    g = C4.elements()[1]
    err = (conv(ep.grid.act(x, g, C4.regular())) - ep.grid.act(conv(x), g, C4.regular())).norm() / conv(x).norm()
    assert float(err) > 0.1


def test_strided_convs_warn_with_the_condition_and_centred_grid_is_right(seed):
    C4 = ep.Cyclic(4)
    with pytest.warns(UserWarning, match=r"n % 2 == 1"):
        conv = declare(nn.Conv2d(4, 4, 3, stride=2, padding=1).double(), C4.regular(), C4.regular())
    project_(conv)
    g = C4.elements()[1]
    for n in (31, 32, 33):
        x = torch.randn(2, 4, n, n, dtype=torch.float64)
        err = float((conv(ep.grid.act(x, g, C4.regular())) - ep.grid.act(conv(x), g, C4.regular())).abs().max())
        assert (err < 1e-12) == centred_grid(n, 3, 2, 1) == (n % 2 == 1), (n, err)
    with pytest.raises(ValueError, match="padding='same'"):
        declare(nn.Conv2d(4, 4, 2, padding="same"), C4.regular(), C4.regular())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        declare(nn.Conv2d(4, 4, 3, padding="same"), C4.regular(), C4.regular())  # stride 1: no warning


def test_report_lists_undeclared_layers(seed):
    model = mlp()
    model.add_module("conv", nn.Conv1d(2, 3, 3))
    r = report(model)
    assert [u["name"] for u in r.undeclared] == ["2", "conv"]
    assert f"2: Linear ({R.dim}, {R.dim}) is not declared" in str(r) and r.as_dict()["undeclared"][1]["module"] == "Conv1d"


def test_the_stride_warning_names_each_strided_axis():
    """A group that never swaps the axes takes a stride on one axis only; the warning gives that
    axis's condition (it read the first axis, whose stride was 1)."""
    D1 = ep.Dihedral(1)
    with pytest.warns(UserWarning, match=r"stride of 2 on axes \[1\].*\(n \+ 2\*1 - 3\) % 2 == 0"):
        declare(nn.Conv2d(2, 2, 3, stride=(1, 2), padding=1), D1.regular(), D1.regular())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        declare(nn.Conv2d(2, 2, 3, padding=(0, 1)), D1.regular(), D1.regular())
