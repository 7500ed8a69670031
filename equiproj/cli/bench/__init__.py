"""``equiproj bench``: verification against the float64 reference, then micro-benchmarks of the exact
energy + gradient against the baselines of :mod:`equiproj.baselines`.

What the default suite measures (``run_suite``; ``--quick`` is smaller, ``--full`` larger):

1. Verification. Every available backend (``"torch"`` and the fused backends that answer on
   this device) on every suite layer against the float64 reference (:mod:`equiproj.reference`;
   for steerable conv layers the reference quadrature on the kernel-space coefficients plus the
   out-of-band energy), on random float32 and float64 weights and on nearly equivariant float32
   weights (E_perp / ||W||^2 ~ 1e-7); the dense projector and the sample-based penalty are
   checked too. Large layers are verified at a reduced multiplicity with the same fields. Then
   the per-group table of ``equiproj verify``.
2. Timing of energy + gradient (``E_perp`` and ``dE_perp/dW``) per layer and method, with
   warm-up and repeats (median, interquartile spread), float32:
   fused backends, the pure-torch spectral path, ``torch.compile`` of it, the dense projector
   (build time and memory in the notes), a read+write pass over the same bytes (the bandwidth
   floor), and the operator-level sample-based penalty at the ``K`` that gives 1% relative RMS
   error of ``2 E_perp``. ``K = var / (0.01 * 2 E_perp)^2`` is derived from the variance of ``N``
   independent draws (the table says ``N``); where affordable it is confirmed by repeated
   K-sample estimates; the time at ``K`` is measured, or extrapolated from a measured chunk of
   samples when it would take too long (the table says which).
3. The per-step overhead of the data-level sample-based penalty (one augmented copy) next to
   that of the projection penalty, for the same small O(3) MLP.

Fused rows appear for the fused backends that answer on this device.

Modules: ``_suite`` (settings, layers), ``_timing`` (backends, measurements, one layer's timings),
``_verification``, ``_overhead`` (the training-step overhead), ``_run`` (the whole run),
``_report`` (text and JSON), ``_plot`` (PNG).
"""

from ._overhead import small_model, time_overhead
from ._plot import check_plot_available, write_plot
from ._report import format_report, overhead_finding, ratio_text, spread_text, verdict, write_json
from ._run import machine_info, ratios, run_suite
from ._suite import FUSED_BACKENDS, LAYER_KEYS, LinearLayer, Settings, SteerableConvLayer, suite
from ._timing import available_backends, bandwidth_text, is_noisy, measure, measure_once, relative_spread
from ._verification import verification_ok, verify_layer, verify_many

__all__ = ["Settings", "LinearLayer", "SteerableConvLayer", "suite", "FUSED_BACKENDS", "LAYER_KEYS",
           "available_backends", "measure", "measure_once", "relative_spread", "is_noisy", "bandwidth_text",
           "verify_layer", "verify_many", "verification_ok", "small_model", "time_overhead",
           "run_suite", "machine_info", "ratios", "format_report", "spread_text", "ratio_text", "overhead_finding",
           "verdict", "write_json", "check_plot_available", "write_plot"]
