#!/usr/bin/env bash
# One-call check of the DCNv4 CUDA kernels on a GPU machine (H100/H200): build for sm_90, run the CUDA
# and CPU op tests, memcheck and racecheck on a few CUDA cases, the operator benchmark, then (where
# diffusers is installed) the layer and U-Net step benchmark. Logs and JSON go to $OUT (or
# benchmarks/out); the tables are printed last.
#
#     bash benchmarks/gpu_check.sh                      # every stage
#     STAGES="tests op" bash benchmarks/gpu_check.sh    # some of: tests sanitizers op unet
#
# The build always runs (a few minutes the first time on a machine, cached after). The stages' time
# limits add up to more than 10 minutes at worst (tests 6, sanitizers 3.5, unet 3; op has no limit and
# is estimated at 1-2). None of it has run on a GPU yet: where one call may take 10 minutes, split the
# stages over two calls, e.g. STAGES="tests sanitizers" then STAGES="op unet".
set -uo pipefail
cd "$(dirname "$0")/.."

OUTDIR="${OUT:-benchmarks/out}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
# The checkout is installed in editable mode without its dependencies (nothing is fetched): the build
# finds the kernels' sources through the installed package. diffusers is not needed for the op and its
# tests.
if ! "$PY" -m pip install --quiet --no-deps --no-build-isolation -e . >"$OUTDIR/install.log" 2>&1; then
  echo "gpu_check: pip install -e . failed (it needs setuptools>=70.1); see $OUTDIR/install.log"
  exit 1
fi
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=9.0
export MAX_JOBS="${MAX_JOBS:-16}"
export UNET_DCNV4_BUILD_DIR="${UNET_DCNV4_BUILD_DIR:-/tmp/unet_dcnv4_build}"

STAGES="${STAGES:-tests sanitizers op unet}"
wants() { [[ " $STAGES " == *" $1 "* ]]; }
status=0
tests_rc=skipped
bench_rc=skipped
step() { echo "== $* ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1 | tee "$OUTDIR/gpu.txt"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$OUTDIR/gpu.txt"

step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
"$PY" - <<'EOF' 2>&1 | tee "$OUTDIR/build.log"
import time
import torch
t0 = time.time()
from unet_dcnv4.ops import load_extension
load_extension()
has = torch._C._dispatch_has_kernel_for_dispatch_key("unet_dcnv4::dcnv4_forward", "CUDA")
print(f"build and load: {time.time() - t0:.1f} s; CUDA kernels registered: {has}")
raise SystemExit(0 if has else 1)
EOF
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  echo "gpu_check: the build failed or has no CUDA kernels; see $OUTDIR/build.log"
  exit 1
fi

if wants tests; then
  step "tests: tests/test_cuda.py tests/test_ops.py"
  # The full-build test is left out: the build step above just did the same build.
  timeout 360 "$PY" -m pytest tests/test_cuda.py tests/test_ops.py -q -p no:cacheprovider -rfE \
    -k "not full_cuda_build" >"$OUTDIR/tests.log" 2>&1
  tests_rc=$?
  tail -n 25 "$OUTDIR/tests.log"
  [ "$tests_rc" -eq 0 ] || status=1
fi

if wants sanitizers && command -v compute-sanitizer >/dev/null; then
  step "compute-sanitizer memcheck on a few CUDA cases"
  timeout 120 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 20 --error-exitcode 97 \
    "$PY" -m pytest tests/test_cuda.py tests/test_ops.py -q -p no:cacheprovider \
    -k "(13x9 or D264 or far_offsets or scale_D1 or misaligned) and float32 and not cpu and not compile and not full_cuda_build" \
    >"$OUTDIR/memcheck.log" 2>&1
  mc_rc=$?
  grep -E "ERROR SUMMARY|passed|failed" "$OUTDIR/memcheck.log" | tail -n 3
  [ "$mc_rc" -eq 124 ] && echo "memcheck: stopped at its time limit (not counted as a failure)"
  [ "$mc_rc" -ne 0 ] && [ "$mc_rc" -ne 124 ] && status=1

  step "compute-sanitizer racecheck of the tiled backward's shared memory"
  timeout 90 compute-sanitizer --tool racecheck --print-limit 20 --error-exitcode 98 \
    "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider \
    -k "backward and tiled and (13x9 or stride2 or 28x28) and float32" >"$OUTDIR/racecheck.log" 2>&1
  rc_rc=$?
  grep -E "RACECHECK SUMMARY|ERROR SUMMARY|passed|failed" "$OUTDIR/racecheck.log" | tail -n 3
  [ "$rc_rc" -eq 124 ] && echo "racecheck: stopped at its time limit (not counted as a failure)"
  [ "$rc_rc" -ne 0 ] && [ "$rc_rc" -ne 124 ] && status=1
fi

if wants op; then
  step "operator benchmark"
  "$PY" benchmarks/bench_op.py --device cuda --out "$OUTDIR/bench_op.json" >"$OUTDIR/bench.log" 2>&1
  bench_rc=$?
  [ "$bench_rc" -eq 0 ] || { status=1; tail -n 30 "$OUTDIR/bench.log"; }
fi

# The layer and U-Net benchmarks need diffusers (carried as wheels on a machine without it, see
# ../.library/device/README.md); without it they are skipped, not failed.
unet_rc=skipped
if wants unet; then
  if "$PY" -c "import diffusers" 2>/dev/null; then
    step "layer and U-Net step benchmark"
    timeout 180 "$PY" benchmarks/bench_unet.py --device cuda --out "$OUTDIR/bench_unet.json" \
      >"$OUTDIR/bench_unet.log" 2>&1
    unet_rc=$?
    [ "$unet_rc" -eq 0 ] || { status=1; tail -n 30 "$OUTDIR/bench_unet.log"; }
  else
    echo "== layer and U-Net benchmark skipped: diffusers is not installed"
  fi
fi

step "done: tests rc=$tests_rc, op benchmark rc=$bench_rc, U-Net benchmark rc=$unet_rc; logs in $OUTDIR"
# The tables: the op benchmark prints its table after its JSON lines.
[ -f "$OUTDIR/bench_unet.log" ] && grep -v "^W[0-9]" "$OUTDIR/bench_unet.log" | tail -n 20
[ -f "$OUTDIR/bench.log" ] && sed -n '/^shape (N,H,W,C,G)/,$p' "$OUTDIR/bench.log"
exit "$status"
