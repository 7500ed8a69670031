"""Whole escnn models converted by ``equiproj.nn.from_escnn`` compute what escnn computes (float32, 1e-5, in
train and eval mode), and ``to_escnn`` writes a trained, projected model back (docs/interop.md).

Needs escnn (its own environment: .ci/run builds it); skipped without it. The models cover every
converted escnn module: C4 branches (MultipleModule), C8 and D4 regular fields, SO(2) irreps with norm and gated nonlinearities,
SO(3)/O(3) R3Conv stacks, escnn's Linear.
"""

import copy
import warnings

import pytest
import torch

import equiproj

escnn = pytest.importorskip("escnn")
from escnn import gspaces  # noqa: E402
from escnn import nn as enn  # noqa: E402

pytestmark = pytest.mark.escnn
TOL = 1e-5


def _c8(gen):
    gs = gspaces.rot2dOnR2(8)
    t0 = enn.FieldType(gs, 3 * [gs.trivial_repr])
    t1 = enn.FieldType(gs, 3 * [gs.regular_repr])
    t2 = enn.FieldType(gs, 2 * [gs.regular_repr] + [gs.trivial_repr])
    model = enn.SequentialModule(
        enn.R2Conv(t0, t1, 5, padding=2), enn.InnerBatchNorm(t1), enn.ReLU(t1), enn.PointwiseMaxPool2D(t1, 3, 2, 1),
        enn.R2Conv(t1, t2, 3, padding=1), enn.ELU(t2, alpha=0.7), enn.PointwiseDropout(t2, 0.2),
        enn.FieldDropout(t2, 0.3), enn.PointwiseAvgPoolAntialiased2D(t2, sigma=0.6, stride=2),
        enn.GroupPooling(t2), enn.IdentityModule(enn.FieldType(gs, 3 * [gs.trivial_repr])))
    return model, t0, (2, 13, 13)


def _d4(gen):
    gs = gspaces.flipRot2dOnR2(4)
    t0 = enn.FieldType(gs, 2 * [gs.trivial_repr])
    t1 = enn.FieldType(gs, 2 * [gs.regular_repr] + [gs.quotient_repr((None, 4))])
    t2 = enn.FieldType(gs, 2 * [gs.regular_repr])
    model = enn.SequentialModule(
        enn.R2Conv(t0, t1, 3, padding=1), enn.IIDBatchNorm2d(t1), enn.PointwiseNonLinearity(t1, "p_elu"),
        enn.PointwiseAvgPool2D(t1, 3, 2, 1), enn.R2Conv(t1, t2, 3), enn.PointwiseNonLinearity(t2, "p_sigmoid"),
        enn.R2ConvTransposed(t2, t2, 3), enn.GroupPooling(t2))
    return model, t0, (2, 11, 11)


def _so2(gen):
    gs = gspaces.rot2dOnR2(-1, maximum_frequency=3)
    G = gs.fibergroup
    t0 = enn.FieldType(gs, 2 * [gs.trivial_repr])
    ir = [G.irrep(k) for k in range(4)]
    t1 = enn.FieldType(gs, [ir[1], ir[2], ir[1], ir[3]])
    t_gate_in = enn.FieldType(gs, [ir[0], ir[1], ir[0], ir[2], ir[0], ir[1]])
    gates = ["gate", "gated", "gate", "gated", "gate", "gated"]
    t3 = enn.FieldType(gs, [ir[1], ir[2], ir[1]])
    model = enn.SequentialModule(
        enn.R2Conv(t0, t1, 5, padding=2), enn.NormBatchNorm(t1), enn.NormNonLinearity(t1, "n_relu"),
        enn.R2Conv(t1, t_gate_in, 3, padding=1), enn.GNormBatchNorm(t_gate_in), enn.GatedNonLinearity1(t_gate_in, gates=gates),
        enn.NormNonLinearity(t3, "n_sigmoid"), enn.R2Conv(t3, t3, 3, padding=1), enn.NormNonLinearity(t3, "squash", bias=False),
        enn.NormPool(t3))
    with torch.no_grad():  # escnn starts its norm biases at exp(0) = 1 for every field: make them distinct
        for m in model.modules():
            if isinstance(m, enn.NormNonLinearity):
                if m.log_bias is not None:
                    m.log_bias.normal_(0, 0.5, generator=gen)
            if isinstance(m, enn.GNormBatchNorm):  # and its affine parameters start at 1 and 0
                for p in m.parameters():
                    p.normal_(0.5, 0.3, generator=gen)
    return model, t0, (2, 9, 9)


def _so3(gen):
    gs = gspaces.rot3dOnR3(maximum_frequency=2)
    G = gs.fibergroup
    t0 = enn.FieldType(gs, [gs.trivial_repr])
    t1 = enn.FieldType(gs, [G.irrep(0), G.irrep(1), G.irrep(0), G.irrep(2)])
    gates = ["gate", "gated", "gate", "gated"]
    t2 = enn.FieldType(gs, [G.irrep(1), G.irrep(2)])
    model = enn.SequentialModule(
        enn.R3Conv(t0, t1, 3, padding=1), enn.IIDBatchNorm3d(t1), enn.GatedNonLinearity1(t1, gates=gates),
        enn.R3Conv(t2, t2, 3, padding=1), enn.NormNonLinearity(t2, "n_softplus"), enn.PointwiseAvgPool3D(t2, 3, 2, 1),
        enn.R3ConvTransposed(t2, t2, 3, padding=1), enn.NormPool(t2),
        enn.PointwiseMaxPool3D(enn.FieldType(gs, 2 * [gs.trivial_repr]), 2))
    return model, t0, (2, 7, 7, 7)


def _o3(gen):
    gs = gspaces.flipRot3dOnR3(maximum_frequency=2)
    G = gs.fibergroup
    t0 = enn.FieldType(gs, [gs.trivial_repr])
    t1 = enn.FieldType(gs, [G.irrep(0, 0), G.irrep(1, 1), G.irrep(0, 2), G.irrep(1, 0)])
    model = enn.SequentialModule(
        enn.R3Conv(t0, t1, 3, padding=1), enn.IdentityModule(t1), enn.NormNonLinearity(t1, "n_relu"),
        enn.R3Conv(t1, t1, 3, padding=1), enn.NormPool(t1))
    return model, t0, (2, 6, 6, 6)


def _linear(gen):
    G = gspaces.rot2dOnR2(-1, maximum_frequency=2).fibergroup
    gs = gspaces.no_base_space(G)
    t0 = enn.FieldType(gs, [G.irrep(0), G.irrep(1), G.irrep(2)])
    t1 = enn.FieldType(gs, [G.irrep(0), G.irrep(1), G.irrep(0), G.irrep(2)])
    model = enn.SequentialModule(enn.Linear(t0, t1), enn.IIDBatchNorm1d(t1), enn.NormNonLinearity(t1, "n_relu"),
                                 enn.Linear(t1, t0))
    return model, t0, (4,)


def _c4_branches(gen):
    gs = gspaces.rot2dOnR2(4)
    G = gs.fibergroup
    t0 = enn.FieldType(gs, 2 * [gs.trivial_repr])
    t1 = enn.FieldType(gs, [gs.regular_repr, G.irrep(1), gs.regular_repr, G.irrep(1)])
    branches = [(enn.ReLU(enn.FieldType(gs, 2 * [gs.regular_repr])), "a"),
                (enn.NormNonLinearity(enn.FieldType(gs, 2 * [G.irrep(1)]), "n_sigmoid"), "b")]
    multiple = enn.MultipleModule(t1, ["a", "b", "a", "b"], branches)
    model = enn.SequentialModule(enn.R2Conv(t0, t1, 3, padding=1), multiple,
                                 enn.R2Conv(multiple.out_type, multiple.out_type, 3), enn.NormPool(multiple.out_type))
    return model, t0, (2, 7, 7)


def _so2_tensor(gen):
    gs = gspaces.rot2dOnR2(-1, maximum_frequency=3)
    G = gs.fibergroup
    t0 = enn.FieldType(gs, 2 * [gs.trivial_repr])
    t1 = enn.FieldType(gs, 3 * [G.irrep(1)])
    t2 = enn.FieldType(gs, 3 * [G.irrep(2)])
    model = enn.SequentialModule(enn.R2Conv(t0, t1, 5, padding=2), enn.TensorProductModule(t1, t2),
                                 enn.R2Conv(t2, t1, 3, padding=1), enn.NormPool(t1))
    return model, t0, (2, 9, 9)


MODELS = {"c4_branches": _c4_branches, "so2_tensor": _so2_tensor, "c8_regular": _c8, "d4_regular": _d4, "so2_irreps": _so2, "so3_r3conv": _so3, "o3_r3conv": _o3,
          "so2_linear": _linear}


def _outputs(model, plain, t_in, x, seed):
    torch.manual_seed(seed)
    want = model(enn.GeometricTensor(x, t_in)).tensor
    torch.manual_seed(seed)
    got = plain(x)
    return got.detach(), want.detach()


@pytest.mark.parametrize("name", MODELS)
def test_converted_model_computes_what_escnn_computes(name, gen, seed):
    model, t_in, shape = MODELS[name](gen)
    x = torch.randn((8, t_in.size) + shape[1:], generator=gen)
    model.train()
    plain = equiproj.nn.from_escnn(model)
    assert plain.training
    worst = 0.0
    for step in range(2):  # train mode twice (batch statistics, running statistics updated alike), then eval
        got, want = _outputs(model, plain, t_in, x + 0.1 * step, seed + step)
        worst = max(worst, float((got - want).detach().abs().max()))
        torch.testing.assert_close(got, want, rtol=0, atol=TOL * max(1.0, float(want.abs().max())))
    model.eval()
    plain.eval()
    got, want = _outputs(model, plain, t_in, x, seed)
    worst = max(worst, float((got - want).detach().abs().max()))
    torch.testing.assert_close(got, want, rtol=0, atol=TOL * max(1.0, float(want.abs().max())))
    print(f"{name}: largest |output difference| {worst:.2e} (largest |output| {float(want.abs().max()):.2g})")
    assert float(want.std()) > 1e-3  # a model whose output is constant would compare nothing


@pytest.mark.parametrize("name", ["c4_branches", "c8_regular", "d4_regular", "so2_irreps", "so3_r3conv", "so2_linear",
                                  "so2_tensor"])
def test_round_trip_after_training_and_projection(name, gen, seed):
    """escnn -> equiproj -> a few training steps (leaving escnn's basis) -> project_ -> escnn: the escnn model
    computes what the projected equiproj model computes."""
    model, t_in, shape = MODELS[name](gen)
    plain = equiproj.nn.from_escnn(model)
    x = torch.randn((8, t_in.size) + shape[1:], generator=gen)
    penalty = equiproj.nn.ProjectionPenalty(plain, lambda_perp=1e-3)
    # transposed convolutions and tensor squares are not declared (the penalty and project_ do not see them):
    # kept fixed here, they stay in escnn's basis; trained, to_escnn would warn about them
    undeclared = (torch.nn.modules.conv._ConvTransposeNd, equiproj.nn._escnn_blocks.FieldTensorSquare)
    trained = [p for m in plain.modules() if not isinstance(m, undeclared) for p in m.parameters(recurse=False)]
    opt = torch.optim.SGD(trained, lr=1e-2)
    for _ in range(3):
        loss = plain(x).square().mean() + penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert max(r["rel_perp"] for r in equiproj.nn.report(plain).rows) > 1e-8  # training left escnn's basis
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no residual warning after projection
        equiproj.nn.project_(plain)
        back, residuals = equiproj.nn.to_escnn(plain, return_residuals=True)
    assert residuals and max(residuals.values()) < 1e-5, residuals
    plain.eval()
    back.eval()
    want = plain(x)
    got = back(enn.GeometricTensor(x, t_in)).tensor
    torch.testing.assert_close(got, want, rtol=0, atol=TOL * max(1.0, float(want.abs().max())))
    print(f"{name}: round trip |output difference| {float((got - want).abs().max()):.2e}, largest least-squares "
          f"residual {max(residuals.values()):.1e}")


def test_to_escnn_warns_outside_the_basis(gen):
    model, t_in, shape = MODELS["c8_regular"](gen)
    plain = equiproj.nn.from_escnn(model)
    with torch.no_grad():
        plain[0].weight.add_(torch.randn(plain[0].weight.shape, generator=gen))
    with pytest.warns(UserWarning, match="not in escnn's basis"):
        equiproj.nn.to_escnn(plain)


def test_modules_without_counterpart_are_refused_by_name():
    gs = gspaces.rot2dOnR2(4)
    t = enn.FieldType(gs, 2 * [gs.regular_repr])
    with pytest.raises(NotImplementedError, match="escnn's LeakyReLU: use ReLU"):
        equiproj.nn.from_escnn(enn.SequentialModule(enn.R2Conv(t, t, 3), enn.LeakyReLU(t)))


def test_a_trained_tensor_square_is_written_back_or_reported(gen):
    """The tensor square's weight is not declared: written back exactly while in escnn's basis, and reported
    (warned) once it has left it."""
    model, t_in, shape = MODELS["so2_tensor"](gen)
    plain = equiproj.nn.from_escnn(model)
    _, residuals = equiproj.nn.to_escnn(plain, return_residuals=True)
    assert residuals["1"] < 1e-5
    with torch.no_grad():
        plain[1].weight.add_(torch.randn(plain[1].weight.shape, generator=gen))
    with pytest.warns(UserWarning, match="not in escnn's basis"):
        _, residuals = equiproj.nn.to_escnn(plain, return_residuals=True)
    assert residuals["1"] > 1e-2


def test_gated_nonlinearity2_takes_its_two_tensors(gen, seed):
    """escnn's GatedNonLinearity2 (gates and gated fields as two tensors) converted: the same output, its bias
    mapped both ways."""
    gs = gspaces.rot2dOnR2(-1, maximum_frequency=3)
    G = gs.fibergroup
    t_gates = enn.FieldType(gs, 4 * [G.irrep(0)])
    t_gated = enn.FieldType(gs, [G.irrep(2), G.irrep(1), G.irrep(3), G.irrep(1)])
    m = enn.GatedNonLinearity2((t_gates, t_gated))
    plain = equiproj.nn.from_escnn(m)
    assert plain.rep_in.dim == t_gates.size + t_gated.size and plain.rep_out == equiproj.Rep.from_escnn(t_gated)
    g = torch.randn(3, 4, 5, 6, generator=gen)
    x = torch.randn(3, t_gated.size, 5, 6, generator=gen)
    want = m(enn.GeometricTensor(g, t_gates), enn.GeometricTensor(x, t_gated)).tensor
    torch.testing.assert_close(plain(g, x), want, rtol=0, atol=TOL)
    with torch.no_grad():
        plain.bias.add_(torch.randn(plain.bias.shape, generator=gen))
    back = equiproj.nn.to_escnn(plain)
    want = plain(g, x)
    torch.testing.assert_close(back(enn.GeometricTensor(g, t_gates), enn.GeometricTensor(x, t_gated)).tensor, want,
                               rtol=0, atol=TOL)


def test_every_escnn_module_has_a_status():
    missing = [n for n in enn.__all__ if n not in equiproj.nn._escnn.ESCNN_MODULES
               and n not in ("EquivariantModule", "FieldType", "GeometricTensor", "init", "tensor_directsum")
               and not n.startswith("Pointwise") | (n in ("PointwiseAvgPool", "PointwiseMaxPool"))]
    assert not missing, missing


def test_escnn_types_are_reps_everywhere(gen):
    gs = gspaces.rot2dOnR2(4)
    t_in, t_out = enn.FieldType(gs, [gs.trivial_repr]), enn.FieldType(gs, 2 * [gs.regular_repr])
    x = enn.GeometricTensor(torch.randn(1, 1, 5, 5, generator=gen), t_in)
    for obj in (t_in, x, gs.trivial_repr):
        assert equiproj.Rep.from_escnn(obj).segments == equiproj.Cyclic(4).trivial().segments
    assert repr(equiproj.Rep.from_escnn(enn.FieldType(gs, 3 * [gs.trivial_repr]))) == "Rep(Cyclic(4), '3x0')"
    conv = equiproj.nn.declare(torch.nn.Conv2d(1, 8, 3), t_in, t_out)
    assert equiproj.nn.declaration(conv).rep_out == equiproj.Rep.from_escnn(t_out)
    W = torch.randn(8, 1, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(equiproj.energies(W, t_in, t_out),
                               equiproj.energies(W, equiproj.Rep.from_escnn(t_in), equiproj.Rep.from_escnn(t_out)))
    with pytest.raises(TypeError, match="from_escnn"):
        equiproj.nn.declare(enn.R2Conv(t_in, t_out, 3), t_in, t_out)
    for gspace, group in ((gspaces.octaOnR3(), equiproj.Octahedral()), (gspaces.fullOctaOnR3(), equiproj.FullOctahedral())):
        r = equiproj.Rep.from_escnn(enn.FieldType(gspace, [gspace.trivial_repr, gspace.regular_repr]))
        assert r.group == group and r.dim == 1 + group.order


def test_check_equivariance_reads_escnn_types_on_a_converted_model(gen):
    """check_equivariance takes escnn field types and follows the converted blocks (their rep_in/rep_out):
    the converted C8 model is equivariant under the grid's 90-degree rotations."""
    model, t_in, shape = MODELS["c8_regular"](gen)
    plain = equiproj.nn.from_escnn(model).eval()
    x = torch.randn((4, t_in.size) + shape[1:], generator=gen)
    result = equiproj.nn.check_equivariance(plain, t_in, model.out_type, x)
    assert result.max_rel_error < 1e-5, result


def test_to_escnn_of_a_conv_declared_by_hand(gen):
    """A plain conv declared with an escnn layer's reps and kernel space, trained and projected, written into
    that escnn layer: the same outputs; a layer of another shape is refused."""
    gs = gspaces.rot2dOnR2(8)
    t_in, t_out = enn.FieldType(gs, 2 * [gs.trivial_repr]), enn.FieldType(gs, [gs.regular_repr])
    conv_e = enn.R2Conv(t_in, t_out, 5, padding=2)
    space, rep_in, rep_out = equiproj.kernel_spaces.escnn_conv_declaration(conv_e)
    plain = equiproj.nn.declare(torch.nn.Conv2d(2, 8, 5, padding=2), t_in, t_out, kernel_space=space)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(plain.weight.shape, generator=gen))
    equiproj.nn.project_(plain)
    back, residuals = equiproj.nn.to_escnn(plain, like=conv_e, return_residuals=True)
    assert max(residuals.values()) < 1e-5
    x = torch.randn(2, 2, 9, 9, generator=gen)
    want = plain(x)
    torch.testing.assert_close(back(enn.GeometricTensor(x, t_in)).tensor, want, rtol=0,
                               atol=TOL * float(want.detach().abs().max()))
    with pytest.raises(ValueError, match="not the same layer shape"):
        equiproj.nn.to_escnn(torch.nn.Conv2d(2, 16, 5), like=conv_e)
    with pytest.raises(ValueError, match="was not converted by from_escnn"):
        equiproj.nn.to_escnn(torch.nn.Sequential(torch.nn.ReLU()), like=enn.SequentialModule(enn.ReLU(t_out)))


def test_gnorm_batchnorm_with_a_change_of_basis_is_equivariant(gen):
    """escnn's GNormBatchNorm on regular fields (irreps through a change of basis) fails in escnn 1.0.11 itself
    (a view of a non-contiguous tensor); the converted block is checked by equivariance there instead,
    with statistics that are not the identity."""
    gs = gspaces.flipRot2dOnR2(4)
    t = enn.FieldType(gs, [gs.regular_repr, gs.trivial_repr, gs.regular_repr])
    m = enn.GNormBatchNorm(t)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.5, 0.3, generator=gen)
    plain = equiproj.nn.from_escnn(m)
    assert any(n.startswith("change_of_basis") for n, _ in plain.named_buffers())
    x = torch.randn(4, t.size, 7, 7, generator=gen) + 1.0
    plain.train()
    plain(x)  # running statistics away from their start
    result = equiproj.nn.check_equivariance(plain.eval(), t, t, x)
    assert result.max_rel_error < 1e-5, result
    out = plain(x)
    assert float((out - x).detach().abs().max()) > 1e-2  # the block does something


#: (group, rep_in, rep_out, plain layer) for to_escnn without like: every group escnn has, conv and linear
_NEW_LAYERS = {
    "c8_conv": (lambda: equiproj.Cyclic(8), lambda G: 2 * G.trivial(), lambda G: G.regular() + G.trivial(),
                lambda: torch.nn.Conv2d(2, 9, 5, padding=2)),
    "d3_conv": (lambda: equiproj.Dihedral(3), lambda G: G.regular(), lambda G: G.irrep((1, 1)) + G.trivial(),
                lambda: torch.nn.Conv2d(6, 3, 5, padding=2, stride=2)),
    "d4_conv": (lambda: equiproj.Dihedral(4), lambda G: G.regular() + G.irrep((1, 0)), lambda G: G.irrep((1, 1)) + G.trivial(),
                lambda: torch.nn.Conv2d(9, 3, 3, padding=1)),
    "so2_conv": (lambda: equiproj.SO2(), lambda G: G.irrep(0) + G.irrep(1), lambda G: G.irrep(2) + G.irrep(0) + G.irrep(1),
                 lambda: torch.nn.Conv2d(3, 5, 5, padding=2)),
    "o2_conv": (lambda: equiproj.O2(), lambda G: G.irrep((0, 0)) + G.irrep((1, 1)), lambda G: G.irrep((1, 1)) + G.irrep((1, 0)) + G.irrep((0, 0)),
                lambda: torch.nn.Conv2d(3, 4, 5, padding=2, dilation=1)),
    "so3_conv": (lambda: equiproj.SO3(), lambda G: G.irrep(0) + G.irrep(1), lambda G: G.irrep(1) + G.irrep(0) + G.irrep(2),
                 lambda: torch.nn.Conv3d(4, 9, 3, padding=1)),
    "o3_conv": (lambda: equiproj.O3(), lambda G: G.irrep((0, 1)), lambda G: G.irrep((1, -1)) + G.irrep((0, 1)),
                lambda: torch.nn.Conv3d(1, 4, 3, padding=1)),
    "octa_conv": (lambda: equiproj.Octahedral(), lambda G: G.trivial(), lambda G: G.regular(),
                  lambda: torch.nn.Conv3d(1, 24, 3, padding=1)),
    "full_octa_conv": (lambda: equiproj.FullOctahedral(), lambda G: G.trivial(), lambda G: G.trivial() + G.regular(),
                       lambda: torch.nn.Conv3d(1, 49, 3, padding=1)),
    "so2_linear": (lambda: equiproj.SO2(), lambda G: G.irrep(0) + G.irrep(1), lambda G: G.irrep(2) + G.irrep(0) + G.irrep(1),
                   lambda: torch.nn.Linear(3, 5)),
    "o3_linear": (lambda: equiproj.O3(), lambda G: G.irrep((0, 1)) + G.irrep((1, -1)), lambda G: G.irrep((1, -1)) + G.irrep((0, 1)),
                  lambda: torch.nn.Linear(4, 4)),
    "d4_linear": (lambda: equiproj.Dihedral(4), lambda G: G.regular(), lambda G: G.irrep((1, 1)) + 2 * G.trivial(),
                  lambda: torch.nn.Linear(8, 4)),
}


def _declared_in_escnn_span(name):
    """A plain layer declared with the kernel space of escnn's own layer of its reps (the conv's equivariant
    kernels are then exactly escnn's basis), with random weights projected onto it."""
    from equiproj.groups._escnn_out import escnn_field_type, escnn_gspace

    group, rep_in, rep_out, make = _NEW_LAYERS[name]
    G = group()
    layer = make()
    dims = layer.weight.dim() - 2
    space = None
    if dims:
        gs = escnn_gspace(G, dims, 2)
        cls = enn.R2Conv if dims == 2 else enn.R3Conv
        ref = cls(escnn_field_type(rep_in(G), gs), escnn_field_type(rep_out(G), gs), layer.kernel_size[0],
                  padding=layer.padding[0], stride=layer.stride[0])
        space = equiproj.kernel_spaces.escnn_conv_declaration(ref)[0]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Conv2d: a stride")  # the inputs here have odd sizes
        layer = equiproj.nn.declare(layer, rep_in(G), rep_out(G), kernel_space=space)
    return layer, G, rep_in(G), rep_out(G)


@pytest.mark.parametrize("name", _NEW_LAYERS)
def test_to_escnn_builds_the_escnn_layer_of_a_declared_layer(name, gen):
    """Without like: the escnn layer is built from the declared reps and the layer's geometry; its field
    types are the reps (read back by Rep.from_escnn), its output the plain layer's, its residual tiny."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    layer, G, rep_in, rep_out = _declared_in_escnn_span(name)
    with torch.no_grad():
        layer.weight.normal_(generator=gen)
        layer.bias.normal_(generator=gen)
    equiproj.nn.project_(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back, residuals = equiproj.nn.to_escnn(layer, return_residuals=True)
    expected = {0: "Linear", 2: "R2Conv", 3: "R3Conv"}[layer.weight.dim() - 2]
    assert type(back).__name__ == expected
    assert equiproj.Rep.from_escnn(back.in_type).segments == rep_in.segments
    assert equiproj.Rep.from_escnn(back.out_type).segments == rep_out.segments
    assert max(residuals.values()) < 1e-5, residuals
    assert back.bias is not None  # every rep_out here has an invariant field
    x = torch.randn((3, rep_in.dim) + (7,) * (layer.weight.dim() - 2), generator=gen)
    back.eval()
    want = layer(x).detach()
    got = back(enn.GeometricTensor(x, back.in_type)).tensor
    torch.testing.assert_close(got, want, rtol=0, atol=TOL * max(1.0, float(want.abs().max())))


def test_to_escnn_reports_what_escnn_cannot_hold(gen):
    """A layer of equiproj's exact grid space (larger than escnn's band-limited basis) warns with its
    residual; a bias on fields without an invariant part is reported lost; a given gspace is used."""
    G = equiproj.Dihedral(4)
    layer = equiproj.nn.declare(torch.nn.Conv2d(8, 8, 3, padding=1), G.regular(), G.regular())
    with torch.no_grad():
        layer.weight.normal_(generator=gen)
    equiproj.nn.project_(layer)
    assert equiproj.nn.report(layer).rows[0]["rel_perp"] < 1e-10
    with pytest.warns(UserWarning, match="not in escnn's basis"):
        _, residuals = equiproj.nn.to_escnn(layer, gspaces.flipRot2dOnR2(4, axis=0.0), return_residuals=True)
    assert residuals["."] > 1e-3
    lin = equiproj.nn.declare(torch.nn.Linear(2, 2), G.irrep((1, 1)), G.irrep((1, 1)), bias=False)
    with torch.no_grad():
        lin.bias.fill_(1.0)
    with pytest.warns(UserWarning, match="bias"):
        back, residuals = equiproj.nn.to_escnn(lin, return_residuals=True)
    assert back.bias is None and residuals[". bias"] == 1.0


def test_to_escnn_refuses_what_it_cannot_build():
    G = equiproj.Cyclic(4)
    with pytest.raises(ValueError, match="not declared"):
        equiproj.nn.to_escnn(torch.nn.Conv2d(4, 4, 3))
    with pytest.raises(ValueError, match="R\\^3"):
        equiproj.nn.to_escnn(equiproj.nn.declare(torch.nn.Conv2d(4, 4, 3), G.regular(), G.regular()), gspaces.rot3dOnR3())
    with pytest.raises(NotImplementedError, match="channels only"):
        equiproj.nn.to_escnn(equiproj.nn.declare(torch.nn.Conv3d(4, 4, 3), G.regular(), G.regular(), kernel_space="channels"))
    with pytest.raises(NotImplementedError, match="stride"):
        C2 = equiproj.Cyclic(2)  # its rotation keeps the axes: declare takes a different stride per axis (and warns)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = equiproj.nn.declare(torch.nn.Conv2d(2, 2, 3, stride=(1, 2)), C2.regular(), C2.regular())
        equiproj.nn.to_escnn(layer)
    with pytest.raises(ValueError, match="not the gspace's"):
        equiproj.nn.to_escnn(equiproj.nn.declare(torch.nn.Conv2d(4, 4, 3), G.regular(), G.regular()), gspaces.rot2dOnR2(8))
    with pytest.raises(NotImplementedError, match="no escnn gspace"):
        H = equiproj.groups.Tetrahedral()
        equiproj.nn.to_escnn(equiproj.nn.declare(torch.nn.Conv3d(1, 1, 3), H.trivial(), H.trivial()))
    with pytest.raises(TypeError, match="like="):
        equiproj.nn.to_escnn(torch.nn.Conv2d(4, 4, 3), enn.R2Conv(*(2 * [enn.FieldType(gspaces.rot2dOnR2(4), [gspaces.rot2dOnR2(4).regular_repr])]), 3))


def test_to_escnn_of_a_model_converted_elsewhere_needs_like(gen):
    model, _, _ = MODELS["c8_regular"](gen)
    plain = copy.deepcopy(equiproj.nn.from_escnn(model))
    with pytest.raises(ValueError, match="pass like="):
        equiproj.nn.to_escnn(plain)
    assert type(equiproj.nn.to_escnn(plain, like=model)).__name__ == "SequentialModule"
    with pytest.raises(ValueError, match="gspace= is for a declared layer"):
        equiproj.nn.to_escnn(plain, gspaces.rot2dOnR2(8), like=model)
