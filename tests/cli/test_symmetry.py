"""``equiproj demo --only symmetry`` (equiproj/cli/experiments/_symmetry.py): its data, its reading of a spectrum, a
tiny run end to end."""

import os

import pytest
import torch

from equiproj.cli import _demo
from equiproj.cli.experiments import _symmetry as sym
from equiproj.groups import Dihedral


def test_chirality_data_has_the_symmetry_it_claims(gen):
    bases = sym.chiral_patterns(3, gen)
    for p in bases:  # chiral: no rotation of the mirror image is the pattern
        assert not any(torch.equal(p, torch.rot90(p.flip(-1), k, (-2, -1))) for k in range(4))
    x, y = sym.chirality_images(5, bases, gen)
    n = 5
    assert x.shape == (8 * n, 1, 12, 12) and y.shape == (8 * n,)
    for k in range(4):  # rotations keep the label, reflections flip it
        assert torch.equal(x[k * n : (k + 1) * n], torch.rot90(x[:n], k, (-2, -1)))
        assert torch.equal(y[k * n : (k + 1) * n], y[:n])
        assert torch.equal(x[(4 + k) * n : (5 + k) * n], torch.rot90(x[:n], k, (-2, -1)).flip(-1))
        assert torch.equal(y[(4 + k) * n : (5 + k) * n], 1 - y[:n])


def test_separation_and_recovered_read_a_spectrum_row():
    lattice = Dihedral(4).subgroups()
    row = {"C1": 0.0, "C2": 1e-9, "D1[0]": 1e-3, "D1[pi/2]": 2e-3, "C4": 2e-9, "D2[0]": 3e-3, "D2[pi/2]": 4e-3,
           "D4": 5e-3}
    assert sym.recovered(row, lattice, 10.0) == "C4"
    assert sym.separation(row, lattice, "C4") == pytest.approx(1e-3 / 2e-9)
    assert sym.separation(row, lattice, "D4") == float("inf")
    assert sym.recovered(row, lattice, 1e7) == "D4"  # nothing stands out that far
    flat = dict.fromkeys(row, 1e-5) | {"C1": 0.0}
    assert sym.recovered(flat, lattice, 10.0) == "D4"
    assert sym.recovered(flat | {"D1[0]": 1e-7}, lattice, 10.0) == "D1[0]"


def test_tiny_run_writes_its_outputs(tmp_path):
    result = sym.run(sym.SymmetryConfig.tiny(), seed=0, out=str(tmp_path), log=lambda m: None)
    assert [r["case"] for r in result["rows"]] == ["chirality"]
    row = result["rows"][0]
    names = Dihedral(4).subgroups().names
    assert all(f"E[{n}]" in row for n in names) and row["E[C1]"] <= 1e-20
    assert all(row[f"E[{a.name}]"] <= row[f"E[{b.name}]"] * (1 + 1e-9) + 1e-15
               for a, b in Dihedral(4).subgroups().covers())
    for f in ("symmetry_results.csv", "symmetry_table.md"):
        assert os.path.getsize(tmp_path / f) > 0
    assert "chirality" in sym.format_table(result)
    assert "symmetry" in _demo.EXPERIMENTS and "symmetry" not in _demo.DEFAULT_EXPERIMENTS
