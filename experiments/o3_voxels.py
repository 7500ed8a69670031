"""Experiment 3: O(3) voxel shapes (label weakly orientation-dependent) with an O(3)-declared 3-D
CNN: no penalty, projection penalty, data-level sample-based penalty at equal wall-clock time,
strictly projected (and, in the full run, the projection energy as a decoupled step).

    python experiments/o3_voxels.py [--full] [--seed N] [--out DIR] [--threads N] [--breaking B]

Without ``--full``: the short version of ``equiproj demo``. The code lives in
``equiproj.cli.experiments`` (``VoxelConfig``, ``run``) so that ``equiproj demo`` runs it too.
"""

import sys

from equiproj.cli._demo import script_main


def main(argv=None) -> int:
    return script_main(argv, "voxels", __doc__.split("\n\n")[0], param="breaking",
                       param_help="probability that a near-vertical stick / ring gets the other label")


if __name__ == "__main__":
    sys.exit(main())
