#!/usr/bin/env bash
# GPU check of the fused Triton kernel, from a bare checkout on a CUDA machine (no internet).
#
#   bash bench/gpu_check.sh            # from the repository root; about 5 minutes
#   bash bench/gpu_check.sh --sweep    # also time tile-size variants first (about 1 more minute)
#
# 1. prints the card and versions;
# 2. makes `equiproj` (with `equiproj.kernels` = kernels/) importable without building the C++
#    extension: an editable pip install without dependencies, else a mirror under /tmp;
# 3. runs the CUDA tests (tests/ops/test_triton.py, tests/ops/test_ops.py, tests/nn/test_nn.py,
#    tests/test_orbit_route.py), continuing whatever they report;
# 4. times the permutation-field layers on the orbit route (bench/bench_layers.py --device cuda);
# 5. prints the benchmark table (bench/gpu_bench.py) LAST.
# Extra arguments go to bench/gpu_bench.py (e.g. --sizes 64,256,1024).
set -u
cd "$(dirname "$0")/.." || exit 1
ROOT=$(pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | head -3
$PY -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"

echo "== making equiproj importable (no C++ extension)"
RUN_DIR=$ROOT
if ! (EQUIPROJ_NO_EXT=1 timeout 120 $PY -m pip install --no-deps --no-build-isolation -e . -q >/tmp/equiproj_pip.log 2>&1 \
      && cd / && $PY -c "import equiproj.kernels" 2>/dev/null); then
    echo "editable install failed (see /tmp/equiproj_pip.log): using a mirror under /tmp/equiproj_mirror"
    RUN_DIR=/tmp/equiproj_mirror
    rm -rf "$RUN_DIR" && mkdir -p "$RUN_DIR"
    cp -r equiproj tests bench conftest.py pyproject.toml "$RUN_DIR"/
    rm -rf "$RUN_DIR/equiproj/kernels" && cp -r kernels "$RUN_DIR/equiproj/kernels"
    export PYTHONPATH="$RUN_DIR${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$RUN_DIR" || exit 1
$PY -c "import equiproj.kernels as k; print('equiproj.kernels from', k.__file__, '| triton kernel:', k.HAS_TRITON)"

echo "== CUDA tests"
TESTS="tests/ops/test_triton.py tests/ops/test_ops.py tests/nn/test_nn.py tests/test_orbit_route.py"
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 4"
timeout 150 $PY -m pytest $TESTS -q -p no:cacheprovider $XDIST -o addopts="" -ra 2>&1 | tail -25
echo "tests exit status: ${PIPESTATUS[0]}"

echo "== permutation-field layers (the orbit route: regular-field linear layers, grid convolutions), x floor"
timeout 150 $PY bench/bench_layers.py --device cuda --rounds 9 || echo "bench_layers exit status: $?"

echo "== benchmark (table last)"
timeout 200 $PY bench/gpu_bench.py --budget-s 120 "$@" || echo "benchmark exit status: $?"
