"""Hypothesis profiles of the fuzz suite, and its error report.

* ``ci`` (the default): a few hundred examples over all fuzz tests, derandomized (the same
  examples on every run), failures printed with their reproduction blob.
* ``long`` (``EQUIPROJ_FUZZ=long``): over 10,000 examples, randomized (each run explores new
  draws; a failure prints its blob for ``@reproduce_failure``).

Each test asks ``fuzz_draws.examples(weight)`` for its share of the profile's ``max_examples``.
With ``EQUIPROJ_FUZZ_REPORT=path`` the largest errors seen (per quantity, backend, dtype and
regime) and the examples run per test are written to ``path`` as JSON at the end of the session
(``python tests/fuzz/summarize_fuzz_report.py path`` prints them as a table).
"""

import json
import os

from fuzz_oracle import RECORD
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("ci", max_examples=40, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=2500, derandomize=False, **_COMMON)
settings.load_profile("long" if os.environ.get("EQUIPROJ_FUZZ", "").strip() == "long" else "ci")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("EQUIPROJ_FUZZ_REPORT")
    if path and RECORD.examples:
        with open(path, "w") as f:
            json.dump(dict(RECORD.as_json(), exitstatus=int(exitstatus)), f, indent=1)
