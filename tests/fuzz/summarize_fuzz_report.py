"""Print the report of a fuzz run (``EQUIPROJ_FUZZ_REPORT=path pytest tests/fuzz``) as tables.

    python tests/fuzz/summarize_fuzz_report.py path [--all]

First the examples and seconds per test, then per backend and weight dtype the largest relative
error of the energies, of the gradients (normwise) and of the projection for random weights, of
E_perp for nearly equivariant weights (E_perp / ||W||^2 = 1e-4, 1e-8), and the largest
error / tolerance of any check, all regimes (<= 1 passes). ``--all`` lists every (quantity,
backend, dtype, regime) row, the exactly equivariant regime and the errors of quantities ~0 too.
"""

import json
import sys
from collections import defaultdict


def _group(quantity: str, regime: str) -> str | None:
    """The column of a row: random weights by quantity, nearly equivariant E_perp, or none (only err/tol)."""
    if "/" in quantity:  # errors of quantities ~0, relative to ||W|| (not a relative error)
        return None
    if regime == "near" and quantity.endswith("E_perp"):
        return "E_perp near-equivariant"
    if regime != "random":
        return None
    if quantity.endswith(("E_perp", "E_G")):
        return "energies"
    return "projection" if quantity.startswith("project") else "gradients"


def main(argv):
    if not argv:
        print(__doc__)
        return 2
    with open(argv[0]) as f:
        report = json.load(f)
    examples = report["examples"]
    total = sum(v["count"] for v in examples.values())
    print(f"{'test':40s} {'examples':>9s} {'seconds':>9s}")
    for name, v in examples.items():
        print(f"{name:40s} {v['count']:9d} {v['seconds']:9.1f}")
    print(f"{'total':40s} {total:9d} {sum(v['seconds'] for v in examples.values()):9.1f}"
          f"   (session wall time {report['wall_seconds']:.0f} s, exit status {report.get('exitstatus')})\n")

    cols = ["energies", "E_perp near-equivariant", "gradients", "projection"]
    table: dict = defaultdict(lambda: defaultdict(float))
    for e in report["errors"]:
        row = table[(e["backend"], e["dtype"])]
        g = _group(e["quantity"], e["regime"])
        if g is not None:
            row[g] = max(row[g], e["max_relative_error"])
        row["error/tolerance"] = max(row["error/tolerance"], e["max_error_over_tolerance"])
    header = f"{'backend':10s} {'dtype':24s} " + " ".join(f"{c:>24s}" for c in cols + ["error/tolerance"])
    print("largest relative error\n" + header)
    for (backend, dtype), row in sorted(table.items()):
        cells = [f"{row[c]:24.2e}" if c in row else f"{'-':>24s}" for c in cols + ["error/tolerance"]]
        print(f"{backend:10s} {dtype:24s} " + " ".join(cells))
    if "--all" in argv:
        print(f"\n{'quantity':40s} {'backend':10s} {'dtype':24s} {'regime':12s} {'max rel':>10s} {'err/tol':>10s} "
              f"{'checks':>7s}")
        for e in report["errors"]:
            print(f"{e['quantity']:40s} {e['backend']:10s} {e['dtype']:24s} {e['regime']:12s} "
                  f"{e['max_relative_error']:10.2e} {e['max_error_over_tolerance']:10.2e} {e['checks']:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
