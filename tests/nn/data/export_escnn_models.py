"""Export the escnn models of tests/nn/test_escnn_models.py as float64 fixtures for environments without
escnn: per model the converted equiproj model (pickled, before any step), the input, the seeds, and
escnn's own outputs (two training-mode steps, then eval mode), in float64 where escnn computes in float64
(its GatedNonLinearity1 and NormPool write float32 outputs: models with them are exported in float32).

Run in an escnn environment (numpy < 2), from the repository root:

    python tests/nn/data/export_escnn_models.py
"""

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import equiproj  # noqa: E402
from escnn import nn as enn  # noqa: E402
from test_escnn_models import MODELS  # noqa: E402

#: small models only (the fixtures stay well under 1 MB together)
EXPORTED = ("c8_regular", "d4_regular", "so2_irreps", "so3_r3conv", "so2_linear", "so2_tensor")


#: the dtype escnn computes each model in
DTYPES = {"c8_regular": torch.float64, "d4_regular": torch.float64, "so2_irreps": torch.float32,
          "so3_r3conv": torch.float32, "so2_linear": torch.float64, "so2_tensor": torch.float32}


def export(name: str, seed: int = 1234) -> None:
    dtype = DTYPES[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model, t_in, shape = MODELS[name](gen)
    model = model.to(dtype)
    model.train()
    plain = equiproj.nn.from_escnn(model)
    x = torch.randn((4, t_in.size) + shape[1:], generator=gen, dtype=torch.float64).to(dtype)
    outputs = []
    for step in range(2):
        torch.manual_seed(seed + step)
        outputs.append(model(enn.GeometricTensor(x + 0.1 * step, t_in)).tensor.detach())
    model.eval()
    outputs.append(model(enn.GeometricTensor(x, t_in)).tensor.detach())
    torch.save({"plain": plain, "x": x, "seed": seed, "outputs": outputs},
               os.path.join(HERE, f"escnn_model_{name}.pt"))


if __name__ == "__main__":  # one model per process: escnn caches bases across models, dtype included
    for name in sys.argv[1:] or EXPORTED:
        export(name)
        print("exported", name)
