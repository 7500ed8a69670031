"""escnn's own kernels under equiproj's default kernel space: the table of docs/interop.md.

For escnn's default ``R2Conv`` (SO(2) and O(2) with maximum frequency 2, 3, 4) and ``R3Conv``
(SO(3) with maximum frequency 3, O(3) with 2) at k = 3, 5, 7: random escnn weights (stock escnn,
float32 sampling), the expanded filter copied into a plain ``nn.Conv2d``/``Conv3d``
(``equiproj.kernel_spaces.escnn_conv_to_torch``), declared with the reps of the field types and
no kernel space argument (the default one), and ``equiproj.nn.report``'s ``E_perp / ||W||^2``.
Also: the size of escnn's basis against ``dim V``, and the largest difference between the plain
conv's output and escnn's.

Needs escnn (and equiproj importable in that environment)::

    python bench/escnn_parity.py > bench/results/escnn_parity.md   # in an environment with escnn
"""

from __future__ import annotations

import sys
import time

import torch


def layers():
    from escnn import gspaces

    out = []
    for L in (2, 3, 4):
        out.append((f"SO(2), rot2dOnR2(-1, {L})", gspaces.rot2dOnR2(-1, L), "0+1+2 -> 1+0+2+1",
                    lambda G: [G.irrep(0), G.irrep(1), G.irrep(2)], lambda G: [G.irrep(1), G.irrep(0), G.irrep(2), G.irrep(1)]))
    for L in (2, 3, 4):
        out.append((f"O(2), flipRot2dOnR2(-1, {L})", gspaces.flipRot2dOnR2(-1, L), "(0,0)+(1,0)+(1,1)+(1,2) -> (1,1)+(0,0)+(1,2)+(1,0)",
                    lambda G: [G.irrep(0, 0), G.irrep(1, 0), G.irrep(1, 1), G.irrep(1, 2)],
                    lambda G: [G.irrep(1, 1), G.irrep(0, 0), G.irrep(1, 2), G.irrep(1, 0)]))
    out.append(("SO(3), rot3dOnR3(3)", gspaces.rot3dOnR3(3), "0+1+2+regular_1 -> 1+0+2",
                lambda G: [G.irrep(0), G.irrep(1), G.irrep(2), G.bl_regular_representation(1)],
                lambda G: [G.irrep(1), G.irrep(0), G.irrep(2)]))
    out.append(("O(3), flipRot3dOnR3(2)", gspaces.flipRot3dOnR3(2), "0e+1e+2e+regular_1 -> 0o+1o+2o+0e",
                lambda G: [G.irrep(0, 0), G.irrep(1, 1), G.irrep(0, 2), G.bl_regular_representation(1)],
                lambda G: [G.irrep(1, 0), G.irrep(1, 1), G.irrep(1, 2), G.irrep(0, 0)]))
    return out


def main() -> None:
    import escnn
    from escnn import nn

    import equiproj
    from equiproj.kernel_spaces import DenseKernelBasis, default_kernel_space, escnn_conv_to_torch

    torch.manual_seed(0)
    print(f"escnn {escnn.__version__}, equiproj {equiproj.__version__}, torch {torch.__version__}; stock escnn "
          "(float32 bases), random weights N(0, 1)\n")
    print("| gspace | fields (escnn irreps) | k | escnn basis = dim V | report E_perp / ‖W‖² (float32 conv) "
          "| E_perp / ‖W‖² (float64) | max |plain − escnn| output | s |")
    print("|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for label, gs, fields, fin, fout in layers():
        G = gs.fibergroup
        for k in (3, 5, 7):
            t0 = time.perf_counter()
            t_in, t_out = nn.FieldType(gs, fin(G)), nn.FieldType(gs, fout(G))
            conv = (nn.R2Conv if gs.dimensionality == 2 else nn.R3Conv)(t_in, t_out, k, padding=k // 2)
            with torch.no_grad():
                conv.weights.normal_()
                conv.bias.normal_()
            ri, ro = equiproj.Rep.from_escnn(t_in), equiproj.Rep.from_escnn(t_out)
            plain = escnn_conv_to_torch(conv)
            equiproj.nn.declare(plain, ri, ro)  # the default kernel space
            row = equiproj.nn.report(plain).rows[0]
            W = plain.weight.detach().double()
            sp = default_kernel_space(ri.group, k)
            rel64 = float(sp.energies(W, ri, ro)[0] / W.square().sum())
            dim_v = DenseKernelBasis.size(sp, ri, ro)[1]
            x = torch.randn((1, t_in.size) + (9,) * gs.dimensionality)
            conv.eval()
            with torch.no_grad():
                diff = float((conv(nn.GeometricTensor(x, t_in)).tensor - plain(x)).abs().max())
            worst = max(worst, row["rel_perp"], rel64)
            print(f"| {label} | {fields} | {k} | {conv.basisexpansion.dimension()} = {dim_v} | {row['rel_perp']:.1e} | "
                  f"{rel64:.1e} | {diff:.1e} | {time.perf_counter() - t0:.1f} |", flush=True)
    print(f"\nlargest E_perp / ‖W‖²: {worst:.1e} (bound 1e-10). The remainder is escnn's float32 sampling "
          "(radii, widths, points and Clebsch-Gordan coefficients in float32): with its bases built in float64 "
          "(tests/kernel_spaces/data/export_escnn_fixtures.py) escnn's kernels give below 1e-20 "
          "(tests/kernel_spaces/test_escnn_parity.py).")
    if worst > 1e-10:
        sys.exit(1)


if __name__ == "__main__":
    main()
