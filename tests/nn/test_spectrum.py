"""Layers under a subgroup: ``Declaration.restricted``, ``restrict_``, ``project_(subgroup=)`` and the
symmetry spectrum (docs/math.md §9, docs/tutorial.md).

Oracles, independent of the restriction code:
  * a layer's energy under H: the float64 element average ``1/|H| sum_h rho_out(h) W rho_in(h)^T`` of
    the weight flattened to ``[c_out, c_in k^2]``, with the input rep ``rep_in @ Rep.permutation(G,
    points=grid_points)`` (one dense permutation field, not equiproj.grid's orbit structure); the bias
    as a map from the trivial rep, added as the penalty does (1e-10 relative);
  * equivariance: ``check_equivariance`` on H's elements (grid rotations of real inputs), float64.
"""

import pytest
import torch
from torch import nn

from equiproj import grid
from equiproj.groups import O3, SO2, Cyclic, Dihedral, FullOctahedral, Rep
from equiproj.nn import (check_equivariance, declaration, declare, project_, restrict_, symmetry_spectrum,
                         ProjectionPenalty)


def _d4_model(gen, dtype=torch.float64):
    G = Dihedral(4)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(16, 8, 1)).to(dtype)
    declare(m[0], G.trivial(), G.regular())
    declare(m[2], G.regular(), 2 * G.regular())
    declare(m[4], 2 * G.regular(), G.regular())
    return G, m


def _layer_oracle(m, rep_in, rep_out, h):
    W = m.weight.detach().double()
    k = tuple(W.shape[2:])
    if len(k) and max(k) > 1:
        pix = Rep.permutation(rep_in.group, points=grid.grid_points(k))
        rin = rep_in @ pix
    else:
        rin = rep_in
    W = W.reshape(W.shape[0], -1)
    P = torch.einsum("pij,jk,plk->il", rep_out.matrix(h), W, rin.matrix(h)) / len(h)
    e = float((W - P).square().sum())
    norm = float(W.square().sum())
    if m.bias is not None:
        b = m.bias.detach().double()
        Pb = torch.einsum("pij,j->i", rep_out.matrix(h), b) / len(h)
        e += float((b - Pb).square().sum())
        norm += float(b.square().sum())
    return e, norm


def test_spectrum_equals_the_element_average_per_layer_and_subgroup(gen):
    G, m = _d4_model(gen)
    spectrum = symmetry_spectrum(m)
    assert [s.name for s in spectrum.subgroups] == list(G.subgroups().names)
    reps = [(G.trivial(), G.regular()), (G.regular(), 2 * G.regular()), (2 * G.regular(), G.regular())]
    for H in G.subgroups():
        h = H.group.elements()
        tot_e = tot_n = 0.0
        for name, (ri, ro) in zip(["0", "2", "4"], reps):
            e, n = _layer_oracle(m[int(name)], ri, ro, h)
            assert abs(spectrum.rel_perp[name][H.name] - e / n) <= 1e-10, (name, H.name)
            tot_e, tot_n = tot_e + e, tot_n + n
        assert abs(spectrum.model[H.name] - tot_e / tot_n) <= 1e-10
    assert spectrum.model["C1"] <= 1e-20


@pytest.mark.parametrize("H_name", list(Dihedral(4).subgroups().names))
def test_spectrum_of_a_model_made_exactly_H_equivariant(H_name, gen):
    G, m = _d4_model(gen)
    project_(m, subgroup=H_name)
    spectrum = symmetry_spectrum(m)
    lattice = G.subgroups()
    for K in lattice:
        for layer in list(spectrum.layers) + ["(model)"]:
            v = spectrum.rel_perp[layer][K.name]
            if lattice.includes(K, H_name):
                assert v <= 1e-20, (layer, K.name)
            else:
                assert v > 1e-3, (layer, K.name)


def test_spectrum_monotone_along_the_lattice(gen):
    G, m = _d4_model(gen, dtype=torch.float32)
    project_(m, subgroup="D1[0]")
    with torch.no_grad():  # then a little of everything
        for p in m.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=gen).to(p.dtype))
    spectrum = symmetry_spectrum(m)
    lattice = G.subgroups()
    for row in spectrum.rel_perp.values():
        for a in lattice:
            for b in lattice:
                if lattice.includes(a, b):
                    assert row[a.name] <= row[b.name] * (1 + 1e-9) + 1e-15, (a.name, b.name)
    text = str(spectrum)
    assert "D1[0]" in text and "(model)" in text


def test_spectrum_on_O3_linear_layers(gen):
    G = O3()
    m = nn.Sequential(nn.Linear(16, 13), nn.Linear(13, 10)).double()
    r0, r1, r2 = Rep.parse(G, "4x0e + 2x1o + 2x1e"), Rep.parse(G, "2x0e + 1o + 1e + 2e"), Rep.parse(G, "0e + 1o + 2e + 0o")
    declare(m[0], r0, r1)
    declare(m[1], r1, r2)
    project_(m, subgroup="D4z")
    spectrum = symmetry_spectrum(m, subgroups=["C4z", "D4z", "O", "SO2z", "SO3", "O3"])
    assert spectrum.model["C4z"] <= 1e-20 and spectrum.model["D4z"] <= 1e-20
    assert min(spectrum.model[n] for n in ("O", "SO2z", "SO3", "O3")) > 1e-3


def test_spectrum_is_one_fused_call_per_subgroup(gen, monkeypatch):
    from equiproj.nn import _declaration
    calls = []
    real = _declaration.energies_many

    def counting(weights, reps, *args, **kwargs):
        calls.append(len(weights))
        return real(weights, reps, *args, **kwargs)

    monkeypatch.setattr(_declaration, "energies_many", counting)
    G, m = _d4_model(gen)
    symmetry_spectrum(m)
    assert len(calls) == len(G.subgroups())
    assert all(n == 6 for n in calls)  # 3 weights and 3 biases in each call


def test_restrict_then_project_is_H_equivariant(gen):
    G, m = _d4_model(gen)
    restrict_(m, "C4")
    H = G.subgroups()["C4"]
    assert all(declaration(layer).group == Cyclic(4) for layer in (m[0], m[2], m[4]))
    assert declaration(m[0]).case == "grid"
    penalty = ProjectionPenalty(m, lambda_perp=1.0)
    assert float(penalty().detach()) > 0
    project_(m)
    assert float(penalty().detach()) <= 1e-20
    x = torch.randn(2, 1, 9, 9, generator=gen, dtype=torch.float64)
    ok = check_equivariance(m, G.trivial(), G.regular(), x, elements=H.group.elements())
    assert ok.max_rel_error < 1e-10 and ok.first_failure is None
    F = G.elements()[4]  # a reflection: not kept
    with torch.no_grad():
        err = (m(grid.act(x, F, G.trivial())) - grid.act(m(x), F, G.regular())).norm() / m(x).norm()
    assert err > 1e-3
    # the restricted reps work in check_equivariance too (H's own elements by default)
    own = check_equivariance(m, G.trivial().restrict(H), G.regular().restrict(H), x)
    assert own.max_rel_error < 1e-10


def test_check_equivariance_of_a_restricted_model_asks_for_the_subgroups_elements(gen):
    G, m = _d4_model(gen)
    restrict_(m, "C4")
    project_(m)
    x = torch.randn(2, 1, 9, 9, generator=gen, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"declared under Cyclic\(4\), not Dihedral\(4\).*default elements.*elements=H.elements\(\)"):
        check_equivariance(m, G.trivial(), G.regular(), x)
    with pytest.raises(ValueError, match=r"declared under Cyclic\(4\).*elements= include elements outside it"):
        check_equivariance(m, G.trivial(), G.regular(), x, elements=G.elements()[3:6])
    H = G.subgroups()["C4"].group
    assert check_equivariance(m, G.trivial(), G.regular(), x, elements=H.elements()[1:3]).max_rel_error < 1e-10
    # a continuous group restricted to a continuous subgroup: its elements are sampled
    G3 = O3()
    lin = nn.Linear(4, 4).double()
    declare(lin, Rep.parse(G3, "0e + 1o"), Rep.parse(G3, "0e + 1o"))
    restrict_(lin, "SO2z")
    with pytest.raises(ValueError, match=r"declared under Axial\(SO2\(\)\).*H.sample"):
        check_equivariance(lin, Rep.parse(G3, "0e + 1o"), Rep.parse(G3, "0e + 1o"), torch.randn(3, 4, dtype=torch.float64))


def test_project_with_subgroup_leaves_declarations(gen):
    G, m = _d4_model(gen)
    before = [declaration(layer) for layer in (m[0], m[2], m[4])]
    project_(m, subgroup=G.subgroups()["D2[pi/2]"])
    assert [declaration(layer) for layer in (m[0], m[2], m[4])] == before
    with pytest.raises(KeyError, match="no subgroup named"):
        project_(m, subgroup="C3")
    with pytest.raises(ValueError, match="not a subgroup"):
        project_(m, subgroup=Cyclic(3))


def test_steerable_conv_restricted_to_a_grid_subgroup(gen):
    G = SO2()
    conv = nn.Conv2d(2, 2, 5, padding=2).double()
    declare(conv, Rep.parse(G, "0 + 0"), Rep.parse(G, "1"))
    assert declaration(conv).case == "kernel_space"
    c4 = declaration(conv).restricted(G.subgroups()["C4"])
    assert c4.case == "grid" and c4.group == Cyclic(4)
    restrict_(conv, "C4")
    project_(conv)
    x = torch.randn(3, 2, 11, 11, generator=gen, dtype=torch.float64)
    rin, rout = Rep.parse(Cyclic(4), "0 + 0"), Rep.parse(Cyclic(4), "1")
    assert check_equivariance(conv, rin, rout, x).max_rel_error < 1e-10


def test_spectrum_refuses_mixed_groups_and_undeclared_models():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no layers declared"):
        symmetry_spectrum(m)
    declare(m[0], Cyclic(4).irrep(1), Cyclic(4).irrep(1))
    declare(m[1], SO2().irrep(1), SO2().irrep(1))
    with pytest.raises(ValueError, match="different groups"):
        symmetry_spectrum(m)


def test_spectrum_plot(tmp_path, gen):
    pytest.importorskip("matplotlib")
    G, m = _d4_model(gen)
    project_(m, subgroup="C4")
    path = symmetry_spectrum(m).plot(tmp_path / "spectrum.png", title="C4")
    assert path.stat().st_size > 1000


def test_spectrum_plot_of_the_35_subgroups_of_Oh(tmp_path, gen):
    pytest.importorskip("matplotlib")
    G = FullOctahedral()
    m = nn.Sequential(nn.Linear(6, 9), nn.Linear(9, 4)).double()
    declare(m[0], Rep.parse(G, "A1g + A2u + T1u + A1u"), Rep.parse(G, "T1u + T2g + Eg + A1g"))
    declare(m[1], Rep.parse(G, "T1u + T2g + Eg + A1g"), Rep.parse(G, "A1g + T1u"))
    project_(m, subgroup="D3d[-111]")
    spectrum = symmetry_spectrum(m)
    assert len(spectrum.model) == 35
    for name in ("C1", "Ci", "C3[-111]", "D3[-111]", "S6[-111]", "C3v[-111]", "D3d[-111]"):
        assert spectrum.model[name] <= 1e-20, name
    assert min(spectrum.model[n] for n in ("Th", "Td", "O", "Oh", "D4hz", "C4z")) > 1e-3
    path = spectrum.plot(tmp_path / "spectrum.png", title="O_h")
    assert path.stat().st_size > 1000


def test_spectrum_over_every_subgroup_tells_conjugate_mirrors_apart(gen):
    """A model made exactly equivariant under the mirror y -> -y of O_h: over every subgroup (conjugates
    apart) the spectrum is 0 on Csy and C1 only among the mirrors, each value the element average."""
    G = FullOctahedral()
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    m = nn.Sequential(nn.Linear(6, 9), nn.Linear(9, 4)).double()
    reps = [(Rep.parse(G, "A1g + A2u + T1u + A1u"), Rep.parse(G, "T1u + T2g + Eg + A1g")),
            (Rep.parse(G, "T1u + T2g + Eg + A1g"), Rep.parse(G, "A1g + T1u"))]
    for layer, (ri, ro) in zip(m, reps):
        declare(layer, ri, ro)
    project_(m, subgroup="Csy")  # a name of G.subgroups(conjugates=True)
    lattice = G.subgroups(conjugates=True)
    spectrum = symmetry_spectrum(m, subgroups=lattice)
    assert spectrum.lattice is lattice and len(spectrum.model) == 98
    assert spectrum.model["Csy"] <= 1e-20 and min(spectrum.model["Csx"], spectrum.model["Csz"]) > 1e-3
    for K in lattice:
        tot_e = tot_n = 0.0
        for layer, (ri, ro) in zip(m, reps):
            e, n = _layer_oracle(layer, ri, ro, K.group.elements())
            tot_e, tot_n = tot_e + e, tot_n + n
        assert abs(spectrum.model[K.name] - tot_e / tot_n) <= 1e-10, K.name
    # a few subgroups by name: their own lattice, with the literal inclusions among them
    few = symmetry_spectrum(m, subgroups=["C1", "Csx", "Csy", "C2vz", "Oh"])
    assert few.lattice.names == ("C1", "Csx", "Csy", "C2vz", "Oh")
    assert few.lattice.includes("Csy", "C2vz") and not few.lattice.includes("Csx", "Csy")
    assert few.model["Csy"] == spectrum.model["Csy"] and few.model["C2vz"] == spectrum.model["C2vz"]


def test_spectrum_plot_over_every_subgroup_of_D4(tmp_path, gen):
    pytest.importorskip("matplotlib")
    G, m = _d4_model(gen)
    project_(m, subgroup="D1[pi]")  # the mirror x -> -x, conjugate to D1[0] (y -> -y) in D4
    spectrum = symmetry_spectrum(m, subgroups=G.subgroups(conjugates=True))
    assert spectrum.model["D1[pi]"] <= 1e-20 < 1e-3 < spectrum.model["D1[0]"]
    assert spectrum.plot(tmp_path / "spectrum.png").stat().st_size > 1000
