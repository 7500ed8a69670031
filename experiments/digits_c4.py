"""Handwritten digits (scikit-learn's load_digits, no download) under 90-degree rotations drawn from a
non-uniform orientation prior, with a C4-declared CNN: no penalty, projection penalty, decoupled step,
strictly projected, data-level penalty at equal time, residual pathways; accuracy against lambda.

    python experiments/digits_c4.py [--full] [--seed N] [--out DIR] [--threads N] [--upright P]

Without ``--full``: the short version of ``equiproj demo --only digits``. Needs scikit-learn
(``pip install scikit-learn``, or ``pip install 'equiproj[experiments]'``). The code lives in
``equiproj.cli.experiments`` (``DigitsConfig``, ``run``) so that ``equiproj demo`` runs it too.
"""

import sys

from equiproj.cli._demo import script_main


def main(argv=None) -> int:
    return script_main(argv, "digits", __doc__.split("\n\n")[0], param="upright",
                       param_help="probability that a digit is upright (the rest share 90, 180, 270 degrees)")


if __name__ == "__main__":
    sys.exit(main())
