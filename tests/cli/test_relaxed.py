"""The residual-pathway baseline of the experiments (equiproj/cli/experiments/_relaxed.py): wrapping, the merged
weights, and one training step of regime 'rpp'."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import equiproj.nn as eqnn
from equiproj import Cyclic
from equiproj.cli.experiments._digits import C4DigitNet
from equiproj.cli.experiments._relaxed import ResidualPathway, free_parameters, merged_copy, relaxed_step, residual_pathway_
from equiproj.cli.experiments._training import relative_e_perp


def test_residual_pathways_start_as_the_model_and_merge_to_the_same_function(seed, gen):
    torch.manual_seed(seed)
    model = C4DigitNet(fields=2)
    x = torch.randn(5, 1, 8, 8, generator=gen)
    before = model(x)
    declared = [m for _, m, _ in eqnn.declared_layers(model)]
    residual_pathway_(model)
    paths = [m for m in model.modules() if isinstance(m, ResidualPathway)]
    assert [p.equivariant for p in paths] == declared  # every declared layer, the same objects
    assert all(eqnn.declaration(p.free) is None for p in paths)
    assert len(free_parameters(model)) == 2 * len(paths)
    assert all(float(p.detach().abs().max()) == 0 for p in free_parameters(model))
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    with torch.no_grad():
        for p in free_parameters(model):
            p.normal_(generator=gen)
    model, x = model.double(), x.double()
    merged = merged_copy(model)
    assert not any(isinstance(m, ResidualPathway) for m in merged.modules())
    torch.testing.assert_close(merged(x), model(x), rtol=1e-12, atol=1e-12)
    assert residual_pathway_(model) is model  # idempotent
    assert len([m for m in model.modules() if isinstance(m, ResidualPathway)]) == len(paths)


def test_rpp_step_keeps_the_equivariant_branch_projected_and_penalises_the_free_one(seed, gen):
    torch.manual_seed(seed)
    model = residual_pathway_(C4DigitNet(fields=2))
    eqnn.init_equivariant_(model)
    x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    step = relaxed_step(model, "rpp", 1e-2, 1e-2, F.cross_entropy, None)
    for _ in range(3):
        step(x, y)
    assert relative_e_perp(model) < 1e-12  # the declared (equivariant) branches
    assert sum(float(p.detach().square().sum()) for p in free_parameters(model)) > 0
    assert relative_e_perp(merged_copy(model)) > 1e-8  # the function is no longer equivariant
    # a huge L2 price keeps the free branch at zero
    model = residual_pathway_(C4DigitNet(fields=2))
    step = relaxed_step(model, "rpp", 1e6, 1e-3, F.cross_entropy, None)
    for _ in range(3):
        step(x, y)
    assert max(float(p.detach().abs().max()) for p in free_parameters(model)) < 1e-2
    G = Cyclic(4)
    check = eqnn.check_equivariance(merged_copy(model), G.trivial(), 10 * G.trivial(), x)
    assert check.max_rel_error < 1e-2


def test_rpp_refuses_models_without_pathways():
    with pytest.raises(ValueError, match="residual_pathway_"):
        relaxed_step(C4DigitNet(fields=1), "rpp", 1e-2, 1e-3, F.cross_entropy, None)
    with pytest.raises(ValueError, match="not declared"):
        ResidualPathway(nn.Linear(3, 3))
    layer = eqnn.declare(nn.Linear(4, 4), Cyclic(4).regular(), Cyclic(4).regular())
    with pytest.raises(ValueError, match="wrap it"):
        residual_pathway_(layer)
