"""Quick start: add the exact projection penalty to an existing PyTorch training loop.

A small CNN is meant to be (approximately) invariant to rotations by 90 degrees (the group
C4). Nothing about the model changes: we declare how C4 acts on three of its layers, build the
penalty once, and add it to the loss. Runs in a few seconds on a CPU (and in CI).
"""

import torch
from torch import nn

import equiproj
from equiproj.nn import ProjectionPenalty, declare, project_, report

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
images, labels = torch.randn(64, 1, 12, 12), torch.randint(0, 3, (64,))

# How C4 acts: on the image (one scalar channel), on hidden features (2 copies of C4's regular
# representation: channels permute as the image rotates), and on the 3 class scores (invariant).
C4 = equiproj.Cyclic(4)
hidden = 2 * C4.regular()
for layer, rep_in, rep_out in [(model[0], C4.trivial(), hidden), (model[2], hidden, hidden), (model[6], hidden, 3 * C4.trivial())]:
    declare(layer, rep_in, rep_out)                              # 1. declare (code, not checkpoint)
penalty = ProjectionPenalty(model, lambda_perp=1e-1)             # 2. build the penalty once

for step in range(30):
    loss = nn.functional.cross_entropy(model(images), labels) + penalty()   # 3. add it to the loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

print(report(model))                 # per layer: ||W||^2, E_perp, E_perp/||W||^2, defect bound
project_(model)                      # optional: make the model exactly equivariant
with torch.no_grad():
    x = torch.randn(1, 1, 12, 12)
    print("invariance error after project_:", float((model(torch.rot90(x, 1, dims=(-1, -2))) - model(x)).abs().max()))
