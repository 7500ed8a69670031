"""Whole networks built from declared layers and the equivariant blocks are equivariant after ``project_``
(``check_equivariance`` on a real batch, float32, every element the input grid admits), and the check
names the module that breaks equivariance when a block does not fit its fields."""

import pytest
import torch
from torch import nn

import equiproj as ep
from equiproj import grid
from equiproj.nn import (FieldBatchNorm, Gate, GridPool, GroupPooling, NormActivation, NormPooling, PointwiseActivation,
                         check_equivariance, declare, init_equivariant_, project_)


def image_cnn(G, fields=4, classes=5, head="pool"):
    """RGB -> regular fields (3x3 convs, one strided) -> pooling -> group pooling or a flattened Linear head."""
    rgb, h = 3 * G.trivial(), fields * G.regular()
    layers = [declare(nn.Conv2d(3, h.dim, 3, padding=1), rgb, h), PointwiseActivation(h),
              declare(nn.Conv2d(h.dim, h.dim, 3, stride=2, padding=1), h, h), FieldBatchNorm(h), PointwiseActivation(h),
              GridPool(h, 2, 3, 2),
              declare(nn.Conv2d(h.dim, h.dim, 3, padding=1), h, h), PointwiseActivation(h)]
    if head == "pool":
        layers += [GroupPooling(h), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(fields, classes)]
    else:  # the 8x8 grid flattened into a Linear layer declared with the grid's permutation representation
        layers += [nn.Flatten(), declare(nn.Linear(h.dim * 64, classes), h @ grid.kernel_rep(G, (8, 8)),
                                         classes * G.trivial())]
    return nn.Sequential(*layers)


@pytest.mark.parametrize("G", [ep.Cyclic(4), ep.Dihedral(4)], ids=str)
@pytest.mark.parametrize("head", ["pool", "linear"])
def test_c4_d4_cnn_on_rgb_images(G, head, seed):
    model = image_cnn(G, head=head)
    x = torch.randn(4, 3, 33, 33)  # 33 -> 17 -> 8: every stride keeps the windows centred
    model.train()
    model(x)  # batch-norm statistics
    before = check_equivariance(model, 3 * G.trivial(), 5 * G.trivial(), x)
    assert before.max_rel_error > 1e-3  # a random network is not equivariant: the check can fail
    project_(model)
    result = check_equivariance(model, 3 * G.trivial(), 5 * G.trivial(), x)
    assert result.elements_kind == "all elements" and len(result.per_element) == G.order
    assert result.max_rel_error <= 1e-5 and result.first_failure is None, str(result)


def c8_cnn(hidden):
    """5x5 convs of a C8 CNN: rotations by 45 degrees do not map the grid, so the layers are steerable."""
    G = ep.Cyclic(8)
    act = PointwiseActivation(hidden) if hidden == 2 * G.regular() else nn.ReLU()
    return nn.Sequential(declare(nn.Conv2d(3, hidden.dim, 5, padding=2), 3 * G.trivial(), hidden), act,
                         declare(nn.Conv2d(hidden.dim, hidden.dim, 5, padding=2), hidden, hidden),
                         NormPooling(hidden), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def test_c8_cnn_with_steerable_layers_on_the_grid_subgroup(seed):
    G = ep.Cyclic(8)
    h = 2 * G.regular()
    model = c8_cnn(h)
    assert {ep.nn.declaration(model[i]).case for i in (0, 2)} == {"kernel_space"}
    init_equivariant_(model)
    x = torch.randn(3, 3, 15, 15)
    result = check_equivariance(model, 3 * G.trivial(), NormPooling(h).rep_out, x)
    assert result.elements_kind == "grid subgroup" and len(result.per_element) == 4
    assert result.max_rel_error <= 1e-5, str(result)


def test_relu_on_irrep_fields_is_reported_and_named(seed):
    G = ep.Cyclic(8)
    h = ep.Rep.parse(G, "2x0 + 2x1 + 2x2")
    model = c8_cnn(h)
    project_(model)
    result = check_equivariance(model, 3 * G.trivial(), NormPooling(h).rep_out, torch.randn(3, 3, 15, 15))
    assert result.max_rel_error > 1e-2
    assert result.first_failure is not None and result.first_failure[0] == "1"  # the ReLU
    assert result.modules["0"] < 1e-5  # the conv before it is fine


def test_o3_point_mlp_with_gates(seed):
    G = ep.O3()
    r_in = ep.Rep.parse(G, "4x0e + 2x1o")
    scalars, gates, gated = ep.Rep.parse(G, "8x0e"), ep.Rep.parse(G, "6x0e"), ep.Rep.parse(G, "4x1o + 2x2e")
    gate = Gate(scalars, gates, gated)
    r_out = ep.Rep.parse(G, "2x0e + 1o")
    model = nn.Sequential(declare(nn.Linear(r_in.dim, gate.rep_in.dim), r_in, gate.rep_in), gate,
                          declare(nn.Linear(gate.rep_out.dim, gate.rep_in.dim), gate.rep_out, gate.rep_in),
                          Gate(scalars, gates, gated),
                          declare(nn.Linear(gate.rep_out.dim, r_out.dim), gate.rep_out, r_out))
    x = torch.randn(16, r_in.dim)
    assert check_equivariance(model, r_in, r_out, x).max_rel_error > 1e-2
    project_(model)
    result = check_equivariance(model, r_in, r_out, x, generator=torch.Generator().manual_seed(0))
    assert result.elements_kind == "sampled" and len(result.per_element) == 8
    assert bool((result.elements.det() < 0).any())  # reflections are among them
    assert result.max_rel_error <= 1e-5, str(result)


def test_so3_voxel_cnn_with_gated_irrep_fields(seed):
    G = ep.SO3()
    scalars, gates, gated = ep.Rep.parse(G, "4x0"), ep.Rep.parse(G, "3x0"), ep.Rep.parse(G, "2x1 + 2")
    gate = Gate(scalars, gates, gated)
    model = nn.Sequential(declare(nn.Conv3d(1, gate.rep_in.dim, 3, padding=1), G.trivial(), gate.rep_in), gate,
                          declare(nn.Conv3d(gate.rep_out.dim, gate.rep_in.dim, 3, padding=1), gate.rep_out, gate.rep_in),
                          Gate(scalars, gates, gated), NormPooling(gate.rep_out), nn.AdaptiveAvgPool3d(1),
                          nn.Flatten())
    project_(model)
    result = check_equivariance(model, G.trivial(), NormPooling(gate.rep_out).rep_out, torch.randn(2, 1, 7, 7, 7))
    assert result.elements_kind == "grid subgroup" and len(result.per_element) == 24
    assert result.max_rel_error <= 1e-5, str(result)


def test_tutorial_example_runs(capsys):
    """examples/equivariant_network.py (the tutorial of docs/tutorial.md), tiny, both training modes."""
    import os
    import runpy

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    example = runpy.run_path(os.path.join(root, "examples", "equivariant_network.py"))
    for mode in ("decay", "penalty"):
        result = example["main"](["--tiny", "--mode", mode])
        assert result["after"] <= 1e-5 and 0.0 <= result["accuracy"] <= 1.0
    assert "equivariance error before project_" in capsys.readouterr().out
