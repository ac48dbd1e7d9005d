#!/usr/bin/env bash
# The GPU check: the many-client benchmark, the throughput benchmark and a CUDA test subset,
# on one CUDA device, with everything written under a results folder.
#
#     bash bench/gpu_check.sh [RESULTS_DIR]      (run from the repository root)
#
# RESULTS_DIR defaults to $OUT. PYTHON (default: python) is the interpreter; it needs torch
# with CUDA and this package's dependencies (pytest, ray and flwr for the runtime test).
#
# 1. bench/many_clients.py (all four setups) and bench/throughput.py (the default config) with
#    --set device=cuda, each for train.precision=fp32 and bf16: many_clients_<p>.txt,
#    throughput_<p>.txt.
# 2. pytest with MONA_SFL_TEST_DEVICE=cuda, which puts the tiny run (tests/conftest.py) and the
#    models of these tests on the GPU: split gradients equal unsplit (tests/test_models.py,
#    tests/test_core.py), batched equals per-client (tests/test_batched.py), bf16
#    (tests/test_precision.py) and local = Ray = Flower (tests/test_runtimes_agree.py, the Ray
#    actors sharing the GPU). Tolerances and bitwise claims were measured on CPU; a failure on
#    CUDA is a finding to read in pytest.txt (e.g. TF32 convolutions, nondeterministic cuDNN
#    kernels), not necessarily a bug. pytest.txt and pytest.xml (JUnit).
# 3. env.txt (nvidia-smi, torch, CUDA), the load, and summary.txt: each step's exit status and
#    wall time.
#
# Each step has its own time limit (110 s per many-client run, 50 s per throughput run, 240 s
# for the tests: 9 minutes and a half at most in all, so one 10-minute device command holds
# it); a step that hits its limit is recorded with rc=124 and the next one runs.
# Without CUDA it writes nothing and exits with status 2. Exit status 1 when any step failed.
set -u

PY="${PYTHON:-python}"
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" FLWR_TELEMETRY_ENABLED=0

if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
    echo "gpu_check: no CUDA: $PY cannot import torch; nothing run" >&2
    exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); nothing run" >&2
    exit 2
fi

R="${1:-${OUT:-}}"
if [ -z "$R" ]; then
    echo "gpu_check: give the results folder as the first argument (or set OUT)" >&2
    exit 64
fi
mkdir -p "$R" || exit 1

failed=0
step() {  # step NAME TIMEOUT_S OUTFILE COMMAND... : run, log its status and time to summary.txt
    local name=$1 limit=$2 out=$3 t0 rc
    shift 3
    t0=$(date +%s)
    echo "[$(date -u +%T)] $name" >&2
    timeout "$limit" "$@" >"$R/$out" 2>&1
    rc=$?
    [ $rc -eq 0 ] || failed=1
    printf '%-28s rc=%-3s %4ss  %s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$out" | tee -a "$R/summary.txt" >&2
}

{
    date -u
    nvidia-smi 2>&1 || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0)); print("cudnn.allow_tf32", torch.backends.cudnn.allow_tf32, "matmul.allow_tf32", torch.backends.cuda.matmul.allow_tf32)'
    echo "load: $(cat /proc/loadavg 2>/dev/null)"
} >"$R/env.txt" 2>&1

for p in fp32 bf16; do
    step "many_clients $p" 110 "many_clients_$p.txt" "$PY" bench/many_clients.py --steps 3 --warmup 1 --set device=cuda --set "train.precision=$p"
    step "throughput $p" 50 "throughput_$p.txt" "$PY" bench/throughput.py --set device=cuda --set "train.precision=$p"
done

step "pytest (cuda)" 240 pytest.txt env MONA_SFL_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider --junitxml="$R/pytest.xml" \
    "tests/test_models.py::test_split_gradients_equal_unsplit_exactly" \
    "tests/test_core.py::test_split_step_matches_unsplit_gradients_for_many_clients" \
    tests/test_batched.py tests/test_precision.py tests/test_runtimes_agree.py

echo "load after: $(cat /proc/loadavg 2>/dev/null)" >>"$R/env.txt"
echo "gpu_check: results in $R (summary.txt)" >&2
exit $failed
