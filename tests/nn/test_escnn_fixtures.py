"""The escnn models of tests/nn/test_escnn_models.py without escnn: the committed fixtures
(``data/escnn_model_*.pt``, exported by ``data/export_escnn_models.py`` in an escnn environment) hold each
converted model, an input and escnn's own outputs (two training-mode steps, then eval mode). The
converted blocks must keep reproducing those numbers: 1e-10 relative where escnn's output is float64,
1e-5 where it is float32 (escnn's GatedNonLinearity1, NormPool and GroupPooling write float32)."""

import glob
import os
import subprocess
import sys

import pytest
import torch

import equiproj

DATA = os.path.join(os.path.dirname(__file__), "data")
FIXTURES = sorted(glob.glob(os.path.join(DATA, "escnn_model_*.pt")))


def _name(path):
    return os.path.basename(path)[len("escnn_model_"):-len(".pt")]


def test_fixtures_exist():
    assert {_name(p) for p in FIXTURES} == {"c8_regular", "d4_regular", "so2_irreps", "so3_r3conv", "so2_linear",
                                             "so2_tensor"}
    assert sum(os.path.getsize(p) for p in FIXTURES) < 1 << 20


@pytest.mark.parametrize("path", FIXTURES, ids=_name)
def test_converted_model_reproduces_escnn_outputs(path):
    data = torch.load(path, weights_only=False)
    plain, x, seed, outputs = data["plain"], data["x"], data["seed"], data["outputs"]
    tol = 1e-10 if outputs[0].dtype == torch.float64 else 1e-5  # escnn's last module may write float32
    plain.train()
    for step in range(2):
        torch.manual_seed(seed + step)
        got = plain(x + 0.1 * step).to(outputs[step].dtype)
        torch.testing.assert_close(got, outputs[step], rtol=0, atol=tol * float(outputs[step].abs().max()))
    plain.eval()
    got = plain(x).to(outputs[2].dtype)
    torch.testing.assert_close(got, outputs[2], rtol=0, atol=tol * float(outputs[2].abs().max()))
    rows = equiproj.nn.report(plain).rows
    assert rows and max(r["rel_perp"] for r in rows) < 1e-10  # escnn's kernels are in the declared spaces


def test_fixtures_load_without_escnn():
    probe = ("import sys, torch, glob; [torch.load(p, weights_only=False) for p in glob.glob(sys.argv[1])]; "
             "print('escnn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, os.path.join(DATA, "escnn_model_*.pt")], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
