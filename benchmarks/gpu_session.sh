#!/usr/bin/env bash
# One device call of a GPU session (see benchmarks/README.md), run from the repository root:
#
#   bash benchmarks/gpu_session.sh tests    OUT   # GPU state, then the GPU tests (pytest -m gpu)
#   bash benchmarks/gpu_session.sh flashrnn OUT   # GPU state, then one benchmark suite
#
# Each mode fits one 600 s call: the tests run under a 450 s timeout, a suite
# within its own 480 s budget. OUT receives at most 5 files.
set -o pipefail
mode=${1:?usage: gpu_session.sh tests|SUITE OUT}
out=${2:?usage: gpu_session.sh tests|SUITE OUT}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu,memory.used --format=csv
  python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())"
} 2>&1 | tee "$out/gpu_state.txt"

if [ "$mode" = tests ]; then
  # tests/conftest.py defaults JAX_PLATFORMS to cpu: name the GPU explicitly.
  JAX_PLATFORMS=cuda timeout 450 python3 -m pytest -q -m gpu -p no:cacheprovider -rA tests/test_pallas.py 2>&1 \
    | tee "$out/gpu_tests.log"
  exit "${PIPESTATUS[0]}"
fi
python3 -m benchmarks --suite "$mode" --out "$out" 2>&1 | tee "$out/$mode.log"
