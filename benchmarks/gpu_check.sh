#!/usr/bin/env bash
# Device-machine entry point (run from the repository root): installs the package, then the GPU check script, then the
# projection tests compiled for the GPU, then the end-to-end attribution check. Writes logs, JSON and markdown under $OUT (or
# benchmarks/results/gpu when OUT is unset) and prints the short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${OUT:-benchmarks/results/gpu}
mkdir -p "$out_dir"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
# The kernels are importable only as source_proj.kernels, so the package is installed first.
if python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out_dir/pip.log" 2>&1; then
    timeout "${GPU_CHECK_TIMEOUT:-300}" python3 benchmarks/gpu_check.py --out "$out_dir" "$@" 2>&1 | tee "$out_dir/gpu_check.log"
    timeout "${GPU_TEST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider tests/test_triton_projection.py \
        "tests/test_projection.py::test_triton_randint4x_is_the_reference_philox" 2>&1 | tail -15 | tee "$out_dir/pytest.log"
    # End to end: SourceAttributor with the Triton kernel against the CPU path (digits model).
    timeout "${GPU_E2E_TIMEOUT:-180}" python3 benchmarks/gpu_e2e.py --out "$out_dir" 2>&1 | tee "$out_dir/gpu_e2e.log"
else
    echo "editable install failed (see pip.log): nothing run"
fi
cat "$out_dir/gpu_check.md" 2>/dev/null
