"""Experiment 2: smoke plume with a C4-declared CNN: no penalty, projection penalty, data-level
sample-based penalty (equal wall-clock time and equal steps), strictly projected.

    python experiments/smoke_c4.py [--full] [--seed N] [--out DIR] [--threads N] [--wind W]

Without ``--full``: the short version of ``equiproj demo``. The code lives in
``equiproj.cli.experiments`` (``SmokeConfig``, ``run``) so that ``equiproj demo`` runs it too.
"""

import sys

from equiproj.cli._demo import script_main


def main(argv=None) -> int:
    return script_main(argv, "smoke", __doc__.split("\n\n")[0], param="wind",
                       param_help="strength of the symmetry-breaking wind")


if __name__ == "__main__":
    sys.exit(main())
