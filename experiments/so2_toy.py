"""Experiment 1: SO(2) invariance toy (wedge and wavey rings), grid over lambda_G x lambda_perp.

    python experiments/so2_toy.py [--full] [--seed N] [--out DIR] [--threads N]

Without ``--full``: the reduced grid of ``equiproj demo``. The code lives in
``equiproj.cli.experiments`` (``SO2Config``, ``run``) so that ``equiproj demo`` runs it too.
"""

import sys

from equiproj.cli._demo import script_main


def main(argv=None) -> int:
    return script_main(argv, "so2", __doc__.split("\n\n")[0])


if __name__ == "__main__":
    sys.exit(main())
