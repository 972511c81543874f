#!/usr/bin/env bash
# The GPU checks in one go, everything under one folder:
#   bash benchmarks/gpu_check.sh [OUT]        (default OUT: runs/gpu_check-<date>)
# 1. tests/test_gpu.py (CUDA == CPU in float32, bfloat16 bounds, --memory-gb on the device,
#    a tiny `knowloc reproduce` on cuda);
# 2. benchmarks/precision.py --device cuda (float32 vs bfloat16/float16, per method);
# 3. benchmarks/throughput.py (local vs Ray on the CPUs, then the GPU section: Gemma float32
#    and bfloat16, a LLaMA-3-8B-sized model in bfloat16, projected GPU-hours).
# Each step's output goes to OUT/<step>.log (and .json); a failing step does not stop the
# others; the exit status is that of the first failing step.
set -u
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "gpu_check: torch sees no CUDA device" >&2; exit 2; }
{ nvidia-smi || true; python -c "import torch, knowloc; print(torch.__version__, knowloc.__file__)"; } \
    > "$OUT/machine.txt" 2>&1
status=0
step() {  # step NAME CMD...: run, tee into OUT/NAME.log, remember the first failure
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}
step tests python -m pytest -q -rs tests/test_gpu.py --junitxml="$OUT/tests.xml"
step precision python benchmarks/precision.py --device cuda --json "$OUT/precision.json"
step throughput python benchmarks/throughput.py --device cuda --json "$OUT/throughput.json"
echo "gpu_check: results in $OUT (exit $status)"
exit "$status"
