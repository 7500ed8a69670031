"""Drop-in approximate equivariance for ordinary PyTorch models.

Three steps turn an existing training loop into a regularised one::

    equiproj.nn.declare(model.conv1, rep_in, rep_out)               # how G acts (once, in code)
    penalty = equiproj.nn.ProjectionPenalty(model, lambda_perp=1e-2)  # finds every declared layer
    loss = task_loss + penalty()                                       # in the loop

``declare`` attaches a declaration to an ``nn.Linear`` or ``nn.Conv1d/2d/3d`` without touching
its forward pass, parameters, state_dict or speed (a plain attribute, no hooks). Declarations are
not stored in the state_dict (the code that builds the model declares again before
``load_state_dict``); a whole pickled model (``torch.save(model)``, ``torch.load(...,
weights_only=False)``) and ``copy.deepcopy`` carry them.

Every declared layer is in one of these cases (``declaration(layer).case``; ``report`` shows it):

=================  ===========================================================================
``"linear"``       ``nn.Linear``: W ``[out, in]`` maps ``rep_in`` to ``rep_out``. Exact.
``"grid"``         conv whose kernel grid G maps onto itself (subgroups of D4 on square 2-D
                   kernels, Octahedral/FullOctahedral on cubic 3-D kernels, any size): the
                   kernel ``K [c_out, c_in, *k]`` flattened to ``[c_out, c_in * prod(k)]`` maps
                   ``rep_in @ grid.kernel_rep(G, k)`` to ``rep_out``. Exact. Axis convention:
                   :mod:`equiproj.grid` (x along axis -1, y along -2, z along -3).
``"pointwise"``    1x1(x1) conv, any group: the kernel is a channel map. Exact.
``"channels"``     ``kernel_space="channels"``: G acts on the channels only, every kernel tap
                   separately (e.g. internal symmetries, 1-D convs). Exact.
``"kernel_space"`` rotations that do not map the grid onto itself (C_N with N not in
                   {1, 2, 4}, SO(2), O(2), SO(3), O(3)): equivariant means a sampled
                   band-limited equivariant kernel (the steerable kernels of escnn's R2Conv/R3Conv,
                   :mod:`equiproj.kernel_spaces`); everything else counts as non-equivariant.
                   Exact within that definition, not a grid symmetry. ``from_escnn`` turns escnn
                   convolutions and models into declared plain ones.
``"translation"``  ``declare_translations``: a periodic locally connected layer
                   (:mod:`equiproj.translation`); equivariant iff it is a convolution. Exact.
=================  ===========================================================================

A bias is a map from the trivial representation to ``rep_out`` and is included in every
energy (``declare(..., bias=False)`` leaves it out).

The penalty calls the energy functions once per kind of layer (the multi-layer fused op for all
matrix-form layers), inside ``torch.autocast(enabled=False)`` so that AMP never lowers its
precision, and as one eager call (``torch.compiler.disable``) inside ``torch.compile``d code: a
graph break, so ``fullgraph=True`` cannot include the penalty. FSDP2 (DTensor) parameters are
gathered with ``full_tensor()`` (differentiable): every rank computes the same penalty, and each
shard receives its slice of the gradient. DDP needs nothing special. ``ProjectionPenalty``,
``project_`` and ``report`` on FSDP2 models are collectives: call them on every rank.
"""

from ._blocks import (FieldBatchNorm, FieldLayerNorm, Gate, GridPool, GroupPooling, NormActivation, NormPooling,
                      PointwiseActivation, centred_grid)
from ._check import EquivarianceCheck, check_equivariance, default_tolerance, equivariance_sweep
from ._declaration import Declaration, KernelSpaceDeclaration, MatrixDeclaration, TranslationDeclaration
from ._declare import NoKernelSpaceError, declaration, declare, declare_translations, declared_layers, undeclare
from ._escnn import from_escnn, to_escnn
from ._layers import ApproxEquivariantConv2d, ApproxEquivariantConv3d, ApproxEquivariantLinear
from ._penalty import ProjectionPenalty, layer_energies
from ._project import project_
from ._report import Report, report
from ._restrict import restrict_
from ._spectrum import SymmetrySpectrum, symmetry_spectrum
from ._training import constant, cosine, init_equivariant_, linear_warmup

__all__ = [
    "declare", "declare_translations", "undeclare", "declaration", "declared_layers",
    "Declaration", "MatrixDeclaration", "KernelSpaceDeclaration", "TranslationDeclaration", "NoKernelSpaceError",
    "ProjectionPenalty", "layer_energies", "project_", "init_equivariant_", "report", "Report",
    "constant", "linear_warmup", "cosine",
    "ApproxEquivariantLinear", "ApproxEquivariantConv2d", "ApproxEquivariantConv3d",
    "PointwiseActivation", "Gate", "NormActivation", "FieldBatchNorm", "FieldLayerNorm", "GroupPooling", "NormPooling",
    "GridPool", "centred_grid", "check_equivariance", "EquivarianceCheck", "from_escnn", "to_escnn",
    "equivariance_sweep", "default_tolerance", "restrict_", "symmetry_spectrum", "SymmetrySpectrum",
]
