"""``check_equivariance`` itself against an oracle.

Random small networks (declared linear layers around a norm block and a batch norm, modules in
mixed training / eval modes, float64) on random groups and reps: the check's headline error
equals the oracle's (``f(g x)`` against ``rho_out(g) f(x)`` with ``rep.matrix``, computed here);
a projected network passes; a network with one layer broken (a non-equivariant perturbation) is
flagged, with the broken layer named first when its error shows there; and the model comes back
bit-identical: parameters, buffers, and each module's own training flag.
"""

from __future__ import annotations

import time

import torch
from fuzz_draws import build, examples, group_specs, make_group, rep_recipes
from fuzz_oracle import RECORD
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

from equiproj import project
from equiproj.nn import FieldBatchNorm, NormActivation, check_equivariance, declare, project_


@st.composite
def network_cases(draw):
    spec = draw(group_specs())
    if spec[0] == "cyclic":
        spec = ("cyclic", draw(st.integers(1, 8)))
    elif spec[0] == "dihedral":
        spec = ("dihedral", draw(st.integers(1, 4)))
    reps = [draw(rep_recipes(spec, 12, depth=1)) for _ in range(3)]
    return dict(spec=spec, reps=reps, broken=draw(st.sampled_from((None, 0, 3))),
                size=draw(st.sampled_from((1e-1, 1e-3))), modes=draw(st.lists(st.booleans(), min_size=6, max_size=6)),
                seed=draw(st.integers(0, 2**31 - 1)), batch=draw(st.integers(2, 4)))


def oracle_error(model, x, els, r_in, r_out):
    """``max_g max_b |f(g x) - g f(x)| / max(|f(g x)|, |g f(x)|)`` in eval mode, from ``rep.matrix``."""
    flags = [m.training for m in model.modules()]
    model.eval()
    with torch.no_grad():
        y = model(x)
        worst = 0.0
        for g in els:
            gy = model(x @ r_in.matrix(g).T)
            target = y @ r_out.matrix(g).T
            ref = torch.maximum(gy.norm(dim=1), target.norm(dim=1))
            err = (gy - target).norm(dim=1)
            worst = max(worst, float(torch.where(ref > 0, err / ref.clamp_min(1e-300), err).max()))
    for m, f in zip(model.modules(), flags):
        m.training = f
    return worst


@settings(max_examples=examples(1.0))
@given(case=network_cases())
def test_check_equivariance_against_oracle(case):
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    spec = case["spec"]
    G = make_group(spec)
    r_in, h, r_out = (build(spec, r) for r in case["reps"])
    model = nn.Sequential(declare(nn.Linear(r_in.dim, h.dim), r_in, h), NormActivation(h), FieldBatchNorm(h),
                          declare(nn.Linear(h.dim, r_out.dim), h, r_out)).double()
    project_(model)
    x = torch.randn(case["batch"], r_in.dim, generator=gen, dtype=torch.float64)
    model.train()
    with torch.no_grad():
        model(x)  # running statistics
    if case["broken"] is not None:
        layer = model[case["broken"]]
        with torch.no_grad():
            R = project(torch.randn(layer.weight.shape, generator=gen, dtype=torch.float64), *(
                (r_in, h) if case["broken"] == 0 else (h, r_out)), which="non_equivariant")
            layer.weight.add_(case["size"] * R / R.norm().clamp_min(1e-300) * layer.weight.norm())
    for m, flag in zip(model.modules(), case["modes"]):
        m.training = flag  # mixed modes, each module its own
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    els = G.sample(4, generator=gen)

    result = check_equivariance(model, r_in, r_out, x, elements=els)
    assert [m.training for m in model.modules()] == flags
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())

    expected = oracle_error(model, x, els, r_in, r_out)
    RECORD.error(("check headline vs oracle", spec[0], "float64", "broken" if case["broken"] is not None else "projected"),
                 abs(result.max_rel_error - expected), 0.0)
    assert abs(result.max_rel_error - expected) <= 1e-9 + 1e-6 * expected, (result.max_rel_error, expected)
    if result.cannot_judge is None:
        assert result.ok == (expected <= result.tolerance)
    if case["broken"] is None:
        assert expected <= 1e-9, expected  # the oracle agrees that the projected network is equivariant
        assert result.ok or result.cannot_judge is not None, str(result)
        event("a projected network passed" if result.ok else "a projected network: cannot judge")
    else:
        assume(expected > 1e-6)  # the perturbation shows at the output on this batch
        assert not result.ok, str(result)
        event("a broken network flagged")
        if case["broken"] == 0:  # the first typed module breaks it: named
            assert result.first_failure is not None and result.first_failure[0] == "0", str(result)
    RECORD.example("test_check_equivariance_against_oracle", time.perf_counter() - t0)
