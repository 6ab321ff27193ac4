#!/usr/bin/env bash
# One-call check of the DCNv4 CUDA kernels and the training path on a GPU machine (H100/H200). It builds
# for sm_90. Then, with the GPU to themselves: the operator benchmark, the layer and U-Net step benchmark,
# an Nsight Compute profile of the op's kernels (benchmarks/profile_op.py), and the kernels' build-time
# variants against the default build (benchmarks/compare_builds.py). Then side by side: the CUDA op tests, memcheck
# and racecheck on a few cases, and a resume check of bf16 training (benchmarks/resume_check.py). Logs
# and JSON go to $LOGDIR (benchmarks/out); the tables are printed last. On an H100 the first version of
# these stages (no profile, no variant) took 9 minutes with the twemoji64 training beside them.
#
#     BUDGET=560 bash benchmarks/gpu_check.sh                 # the default stages within 560 s
#     STAGES=twemoji BUDGET=560 bash benchmarks/gpu_check.sh  # the twemoji64 training, in a call of its own
#     STAGES="tests op" bash benchmarks/gpu_check.sh          # of: op unet profile variants tests
#                                                             #     sanitizers resume twemoji
#
# Wheels in .whl/ (diffusers and what else the machine lacks) are installed into /tmp/site first. The
# twemoji64 stage needs the images in .data/twemoji64/images; it trains the VAE and both U-Nets with
# TW_VAE_STEPS and TW_STEPS steps (default 800 each) and, with TW_FID=0 (the default: the machine has no
# Inception weights), writes both models' samples for benchmarks/compare_samples.py to measure
# elsewhere. Beside the tests it did not fit: 800 VAE steps took 136 s and 800 DCNv4 U-Net steps 110 s,
# and the conv U-Net was cut off. With $OUT set (the device tool), the logs come back as
# $OUT/gpu_check_logs.tar.gz and the samples as tar parts of at most 15 MB. Stage time limits: op,
# unet and profile 150 s each, variants 6 x 120 s (the variant builds' tests) and 7 x 120 s (every build's op
# times), tests 300 s, resume 300 s, twemoji64 TW_LIMIT (340 s), each cut to what BUDGET leaves.
set -uo pipefail
cd "$(dirname "$0")/.."

OUTDIR="${LOGDIR:-benchmarks/out}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUTDIR/wheels.log" 2>&1 || { echo "gpu_check: installing .whl/*.whl failed; see $OUTDIR/wheels.log"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
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

STAGES="${STAGES:-op unet profile variants tests sanitizers resume}"
wants() { [[ " $STAGES " == *" $1 "* ]]; }
status=0
tests_rc=skipped
bench_rc=skipped
step() { echo "== $* ($(date +%T))"; }
# BUDGET (seconds, optional): the whole script's time, e.g. under a remote command's limit. Each later
# stage's time limit is cut to what is left of it, keeping 30 s to pack and print the results.
limit() {
  local want=$1 left
  if [ "${BUDGET:-0}" -gt 0 ]; then
    left=$((BUDGET - SECONDS - 30))
    [ "$left" -lt "$want" ] && want=$left
    [ "$want" -lt 10 ] && want=10
  fi
  echo "$want"
}

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
if not torch.cuda.is_available():
    print("no GPU: a dry run (the CUDA tests skip; the op and U-Net benchmarks fail on --device cuda)")
raise SystemExit(0 if has or not torch.cuda.is_available() else 1)
EOF
if [ "${PIPESTATUS[0]}" -ne 0 ]; then
  echo "gpu_check: the build failed or has no CUDA kernels; see $OUTDIR/build.log"
  exit 1
fi

# The kernels' build-time variants (csrc/cuda/dcnv4_cuda.cu) against the default build:
#   before   both directions as they were before the redesign: int64 indices, K a runtime value
#   unroll9  the forward's whole point loop unrolled; the 16-bit backward at 4 channels a lane (8-byte words)
#   wide     two 16-byte words a corner: 8 fp32 channels a lane in both directions, 16 half ones in the forward
#   wide9    wide with the forward's whole point loop unrolled (the fewest instructions a point-channel)
#   skip0    the backward sends no atomic for a corner of weight zero (3 of 4 at zero offsets)
#   acc16    the 16-bit backward accumulates grad_value in its own type (16-byte bf16x8/f16x8 reductions)
# Each compiles in a build folder of its own, in the background from the script's start (4 jobs each), so
# that the GPU does not wait for them. Then each one's GPU tests (the op's cases, forward and both backward
# kernels, every dtype), then every build's op times one after the other on the quiet GPU.
declare -A BUILD_FLAGS=(
  [default]=""
  [before]="-DDCNV4_FWD_INDEX64 -DDCNV4_FWD_K_RUNTIME -DDCNV4_BWD_INDEX64 -DDCNV4_BWD_K_RUNTIME"
  [unroll9]="-DDCNV4_FWD_K9_UNROLL=9 -DDCNV4_BWD16_V=4"
  [wide]="-DDCNV4_FWD32_V=8 -DDCNV4_FWD16_V=16 -DDCNV4_BWD32_V=8"
  [wide9]="-DDCNV4_FWD32_V=8 -DDCNV4_FWD16_V=16 -DDCNV4_BWD32_V=8 -DDCNV4_FWD_K9_UNROLL=9"
  [skip0]="-DDCNV4_BWD_SKIP_ZERO"
  [acc16]="-DDCNV4_BWD16_ACC16"
)
VARIANT_BUILDS="before unroll9 wide wide9 skip0 acc16"
if wants variants; then
  step "building the kernel variants in the background: $VARIANT_BUILDS"
  for b in $VARIANT_BUILDS; do
    rm -f "$OUTDIR/build_$b.rc"  # an earlier call's result must not stand for this build
    ( UNET_DCNV4_NVCC_FLAGS="${BUILD_FLAGS[$b]}" MAX_JOBS=4 timeout 600 "$PY" -c \
        "from unet_dcnv4.ops import load_extension; load_extension()" >"$OUTDIR/build_$b.log" 2>&1
      echo $? >"$OUTDIR/build_$b.rc" ) &
  done
fi

if wants op; then
  step "operator benchmark"
  timeout "$(limit 150)" "$PY" benchmarks/bench_op.py --device cuda --out "$OUTDIR/bench_op.json" >"$OUTDIR/bench.log" 2>&1
  bench_rc=$?
  [ "$bench_rc" -eq 0 ] || { status=1; tail -n 30 "$OUTDIR/bench.log"; }
fi

# The layer and U-Net benchmarks need diffusers (carried as wheels in .whl/ on a machine without it);
# without it they are skipped, not failed.
unet_rc=skipped
if wants unet; then
  if "$PY" -c "import diffusers" 2>/dev/null; then
    step "layer and U-Net step benchmark"
    timeout "$(limit 150)" "$PY" benchmarks/bench_unet.py --device cuda --out "$OUTDIR/bench_unet.json" \
      >"$OUTDIR/bench_unet.log" 2>&1
    unet_rc=$?
    [ "$unet_rc" -eq 0 ] || { status=1; tail -n 30 "$OUTDIR/bench_unet.log"; }
  else
    echo "== layer and U-Net benchmark skipped: diffusers is not installed"
  fi
fi

# Where the op's kernels spend their time: Nsight Compute's speed-of-light, memory and occupancy
# sections of one forward and one backward per dtype at a U-Net shape (the second call of each).
if wants profile && command -v ncu >/dev/null; then
  step "ncu profile of the op's kernels (64x32x32x256, G=16)"
  timeout "$(limit 150)" ncu --clock-control none -k regex:"forward_kernel|backward_kernel" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --csv --page details \
    "$PY" benchmarks/profile_op.py >"$OUTDIR/ncu.csv" 2>"$OUTDIR/ncu.log"
  echo "ncu rc=$?"
  "$PY" - "$OUTDIR/ncu.csv" <<'EOF2' | tee "$OUTDIR/ncu_summary.txt"
import csv, re, sys
wanted = ["Duration", "Memory Throughput", "DRAM Throughput", "L1/TEX Hit Rate", "L2 Hit Rate",
          "Compute (SM) Throughput", "Achieved Occupancy", "Registers Per Thread"]
rows = {}
with open(sys.argv[1], newline="") as f:
    lines = [line for line in f if line.startswith('"')]
for r in csv.DictReader(lines):
    match = re.search(r"\w+_kernel<[^>]*>", r["Kernel Name"])
    kernel = match.group(0) if match else r["Kernel Name"][:60]
    rows.setdefault((int(r["ID"]), kernel), {})[r["Metric Name"]] = f'{r["Metric Value"]} {r["Metric Unit"]}'.strip()
print("kernel | " + " | ".join(wanted))
for (i, kernel), m in sorted(rows.items()):
    print(f"{i} {kernel} | " + " | ".join(m.get(w, "-") for w in wanted))
EOF2
fi

# bench_build NAME FLAGS DTYPES: bench_op.py --quick at offsets of std 2 and 0 with the kernels built with the
# nvcc FLAGS (UNET_DCNV4_NVCC_FLAGS, a build folder of their own), into $OUTDIR/bench_NAME.json and .log.
bench_build() {
  UNET_DCNV4_NVCC_FLAGS="$2" timeout "$(limit 120)" "$PY" benchmarks/bench_op.py --device cuda --quick \
    --dtypes "$3" --offset_std 2 0 --out "$OUTDIR/bench_$1.json" >"$OUTDIR/bench_$1.log" 2>&1 ||
    echo "bench_op.py with the $1 build failed; see $OUTDIR/bench_$1.log"
}

# wait_build NAME: waits for the background build NAME; false (and a line saying so) if it failed.
wait_build() {
  local waited=0
  while [ ! -f "$OUTDIR/build_$1.rc" ] && [ "$waited" -lt "$(limit 300)" ]; do sleep 2; waited=$((waited + 2)); done
  [ "$(cat "$OUTDIR/build_$1.rc" 2>/dev/null)" = 0 ] && return 0
  echo "the $1 build failed or did not finish; see $OUTDIR/build_$1.log"
  status=1
  return 1
}
if wants variants; then
  step "kernel builds: tests of the variant builds, then every build's op times"
  for b in $VARIANT_BUILDS; do
    wait_build "$b" || continue
    UNET_DCNV4_NVCC_FLAGS="${BUILD_FLAGS[$b]}" timeout "$(limit 120)" "$PY" -m pytest tests/test_ops.py \
      tests/test_cuda.py -q -p no:cacheprovider -k "(kernel_forward_backward and cuda) or backward_matches_autograd" \
      >"$OUTDIR/variant_tests_$b.log" 2>&1 || { status=1; echo "the $b build's GPU tests failed"; }
    echo "$b: $(grep -v "^DEBUG" "$OUTDIR/variant_tests_$b.log" | tail -n 1)"
  done
  for b in default $VARIANT_BUILDS; do
    [ "$b" = default ] || [ "$(cat "$OUTDIR/build_$b.rc" 2>/dev/null)" = 0 ] || continue
    bench_build "$b" "${BUILD_FLAGS[$b]}" float32,bfloat16
  done
  "$PY" benchmarks/compare_builds.py "$OUTDIR" default $VARIANT_BUILDS | tee "$OUTDIR/bench_builds.txt"
fi

# Side by side: the GPU is shared from here on, so nothing below is timed for a table.
resume_rc=skipped
twemoji_rc=skipped
if wants resume; then
  step "resume check in the background (bf16, 40 steps, checkpoint at 20)"
  ( rm -rf /tmp/resume_check
    timeout "$(limit 300)" "$PY" benchmarks/resume_check.py --root /tmp/resume_check --out "$OUTDIR/resume.json" \
      >"$OUTDIR/resume.log" 2>&1
    echo $? >"$OUTDIR/resume.rc" ) &
fi
if wants twemoji; then
  if [ -d .data/twemoji64/images ]; then
    step "twemoji64 training in the background (VAE ${TW_VAE_STEPS:-800}, U-Nets ${TW_STEPS:-800} steps)"
    ( rm -rf /tmp/twemoji64
      FID="${TW_FID:-0}" RUNS=/tmp/twemoji64 VAE_STEPS="${TW_VAE_STEPS:-800}" STEPS="${TW_STEPS:-800}" \
        timeout "$(limit "${TW_LIMIT:-340}")" bash benchmarks/twemoji64_compare.sh >"$OUTDIR/twemoji.log" 2>&1
      echo $? >"$OUTDIR/twemoji.rc" ) &
  else
    echo "== twemoji64 skipped: no .data/twemoji64/images"
  fi
fi

if wants sanitizers && command -v compute-sanitizer >/dev/null; then
  step "compute-sanitizer memcheck and racecheck in the background"
  ( timeout "$(limit 150)" compute-sanitizer --tool memcheck --report-api-errors no --print-limit 20 --error-exitcode 97 \
      "$PY" -m pytest tests/test_cuda.py tests/test_ops.py -q -p no:cacheprovider \
      -k "(13x9 or D264 or far_offsets or scale_D1 or misaligned) and float32 and not cpu and not compile and not full_cuda_build" \
      >"$OUTDIR/memcheck.log" 2>&1
    echo $? >"$OUTDIR/memcheck.rc"
    # The tiled backward's shared memory.
    timeout "$(limit 90)" compute-sanitizer --tool racecheck --print-limit 20 --error-exitcode 98 \
      "$PY" -m pytest tests/test_cuda.py -q -p no:cacheprovider \
      -k "backward and tiled and (13x9 or stride2 or 28x28) and float32" >"$OUTDIR/racecheck.log" 2>&1
    echo $? >"$OUTDIR/racecheck.rc" ) &
fi

if wants tests; then
  step "tests: tests/test_cuda.py tests/test_ops.py"
  XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 6")
  # The full-build test is left out: the build step above just did the same build.
  timeout "$(limit 300)" "$PY" -m pytest tests/test_cuda.py tests/test_ops.py -q -p no:cacheprovider -rfE $XDIST \
    -k "not full_cuda_build" >"$OUTDIR/tests.log" 2>&1
  tests_rc=$?
  grep -v "^DEBUG" "$OUTDIR/tests.log" | tail -n 25
  [ "$tests_rc" -eq 0 ] || status=1
  # A test that crashed its worker: its C++ backtrace, for the next session to read.
  crashed=$(grep -oE "crashed while running '[^']+'" "$OUTDIR/tests.log" | head -n 1 | cut -d"'" -f2)
  if [ -n "$crashed" ] && command -v cuda-gdb >/dev/null; then
    step "backtrace of the crash in $crashed"
    timeout "$(limit 90)" cuda-gdb -batch -ex run -ex bt --args "$PY" -m pytest "$crashed" -q -p no:cacheprovider \
      >"$OUTDIR/crash_bt.log" 2>&1
    grep -E "^#[0-9]+ " "$OUTDIR/crash_bt.log" | cut -c1-240 | head -n 16
  fi
fi

step "waiting for the background stages"
wait
[ -f "$OUTDIR/resume.rc" ] && resume_rc=$(cat "$OUTDIR/resume.rc")
[ -f "$OUTDIR/twemoji.rc" ] && twemoji_rc=$(cat "$OUTDIR/twemoji.rc")
for rc in "$resume_rc" "$twemoji_rc"; do [ "$rc" = skipped ] || [ "$rc" -eq 0 ] || status=1; done
# A sanitizer stopped at its time limit (124) is reported, not counted as a failure.
for tool in memcheck racecheck; do
  [ -f "$OUTDIR/$tool.rc" ] || continue
  rc=$(cat "$OUTDIR/$tool.rc")
  echo "$tool: rc=$rc; $(grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUTDIR/$tool.log" | tail -n 2 | tr '\n' ' ')"
  [ "$rc" -eq 0 ] || [ "$rc" -eq 124 ] || status=1
done
[ -f "$OUTDIR/twemoji.log" ] && tail -n 8 "$OUTDIR/twemoji.log"

if [ -n "${OUT:-}" ]; then
  # The device tool brings back at most 8 files of 16 MiB: one archive of the logs (with the twemoji64
  # runs' small files) and the samples in parts.
  mkdir -p "$OUTDIR/twemoji64"
  if wants twemoji && [ -d /tmp/twemoji64 ]; then
    (cd /tmp/twemoji64 && find . \( -name "*.json" -o -name "*.yaml" -o -name "grid.png" -o -name "step-*.png" \) \
      -not -path "*/images/*" -not -path "*/checkpoints/*" | tar cf - -T -) | tar xf - -C "$OUTDIR/twemoji64"
    for model in dcnv4 conv; do
      [ -d "/tmp/twemoji64/samples_$model/images" ] &&
        tar cf - -C /tmp/twemoji64 "samples_$model" | split -b 15m - "$OUT/samples_$model.tar.part"
    done
  fi
  tar czf "$OUT/gpu_check_logs.tar.gz" -C "$OUTDIR" .
fi

step "done: tests rc=$tests_rc, op benchmark rc=$bench_rc, U-Net benchmark rc=$unet_rc, resume rc=$resume_rc, twemoji64 rc=$twemoji_rc; logs in $OUTDIR"
[ -f "$OUTDIR/resume.log" ] && tail -n 4 "$OUTDIR/resume.log"
# The tables: the op benchmark prints its table after its JSON lines.
[ -f "$OUTDIR/bench_unet.log" ] && grep -v "^W[0-9]" "$OUTDIR/bench_unet.log" | tail -n 20
[ -f "$OUTDIR/bench.log" ] && sed -n '/^shape (N,H,W,C,G)/,$p' "$OUTDIR/bench.log"
exit "$status"
