#!/usr/bin/env bash
# GPU check of the fused Triton kernel, from a bare checkout on a CUDA machine (no internet).
#
#   bash bench/gpu_check.sh            # from the repository root; about 5 minutes
#   bash bench/gpu_check.sh --sweep    # also time tile-size variants first (about 1 more minute)
#
# 1. prints the card and versions;
# 2. makes `equiproj` (with `equiproj.kernels` = kernels/, a mapping only setup.py knows) importable
#    without building the C++ extension: an editable pip install without dependencies;
# 3. runs the CUDA tests (tests/ops/test_triton.py, tests/ops/test_ops.py, tests/nn/test_nn.py, tests/nn/test_program.py,
#    tests/ops/test_orbit_points.py, tests/ops/test_signed_orbits.py,
#    tests/test_orbit_route.py), continuing whatever they report;
# 4. times every kind of layer through the penalty program on the GPU (penalty.backward() into .grad
#    and decay_ as multiples of a warm torch.mul(W, 2, out=buf); equiproj/cli/bench/_layer_kinds.py, one or two kinds per family at quick
#    sizes), the cost per weight of C_N regular fields per route (bench/bench_fused.py's --cn code), and
#    the permutation-field layers on the orbit route (bench/bench_layers.py --device cuda);
# 5. prints the benchmark table (bench/gpu_bench.py) LAST.
# Extra arguments go to bench/gpu_bench.py (e.g. --sizes 64,256,1024).
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | head -3
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"

echo "== making equiproj importable (editable install, no C++ extension)"
LOG=$(mktemp)
if ! (EQUIPROJ_NO_EXT=1 timeout 120 $PY -m pip install --no-deps --no-build-isolation -e . -q >"$LOG" 2>&1 \
      && cd / && $PY -c "import equiproj.kernels" 2>>"$LOG"); then
    tail -20 "$LOG"
    echo "the editable install failed (log above): the package needs it, since equiproj.kernels is the"
    echo "top-level kernels/ folder mapped by setup.py; install setuptools and pip for $PY, or set PYTHON"
    exit 1
fi
$PY -c "import equiproj.kernels as k; print('equiproj.kernels from', k.__file__, '| triton kernel:', k.HAS_TRITON)"

echo "== CUDA tests"
TESTS="tests/ops/test_triton.py tests/ops/test_ops.py tests/nn/test_nn.py tests/nn/test_program.py tests/test_orbit_route.py tests/ops/test_orbit_points.py tests/ops/test_signed_orbits.py"
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 4"
timeout 150 $PY -m pytest $TESTS -q -p no:cacheprovider $XDIST -o addopts="" -ra 2>&1 | tail -25
echo "tests exit status: ${PIPESTATUS[0]}"

echo "== every kind of layer through the penalty program (x floor, CUDA)"
timeout 240 $PY - <<'PYEOF' 2>&1 | tail -30 || echo "layer kinds exit status: $?"
import sys, time, torch
sys.path.insert(0, "bench")
import equiproj
from equiproj.cli.bench._layer_kinds import format_layer_kinds, layer_kind_rows, layer_kinds
# one or two kinds per family: every route, within the step's time limit
rows = layer_kind_rows((1,), quick=True, device="cuda", rounds=15, kinds=layer_kinds(quick=True, every=False))
print(format_layer_kinds(rows))
# C_N regular fields, cost per weight of the gradient into .grad per route (add routes as label=backend)
for N in (4, 16, 64, 256):
    G = equiproj.Cyclic(N)
    rep = max(1, 4096 // N) * G.regular()
    W = torch.randn(rep.dim, rep.dim, device="cuda")
    grad, buf = torch.zeros_like(W), torch.empty_like(W)
    for route in ("triton", "torch"):
        fns = {"floor": lambda: torch.mul(W, 2, out=buf),
               "route": lambda: equiproj.energies_and_grad(W, rep, rep, lambda_perp=1.0, backend=route, out=grad)}
        best = {}
        for k, fn in fns.items():
            fn(); torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
            best[k] = (time.perf_counter() - t) / 20
        print(f"C_{N} regular, {route}: {1e9 * best['route'] / W.numel():.3f} ns/weight, "
              f"{best['route'] / best['floor']:.1f}x floor")
PYEOF

echo "== permutation-field layers (the orbit route: regular-field linear layers, grid convolutions), x floor"
timeout 150 $PY bench/bench_layers.py --device cuda --rounds 9 || echo "bench_layers exit status: $?"

echo "== benchmark (table last)"
timeout 200 $PY bench/gpu_bench.py --budget-s 120 "$@" || echo "benchmark exit status: $?"
