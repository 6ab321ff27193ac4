#!/usr/bin/env bash
# The comparison protocol on the embedded default: SEEDS training runs per arm of the tiny quickstart models
# (the conv U-Net, the DCNv4 U-Net at equal width, the DCNv4 U-Net widened to the conv U-Net's parameters),
# then two comparisons against the conv arm, each with per-arm mean +- std, Welch's 95% interval of the FID
# difference on the per-run FIDs, its p-value and a verdict. Both tables are printed last.
#
#     bash benchmarks/seeds_compare.sh
#
# SEEDS (default "0 1 2"), STEPS (U-Net steps, default the embedded default's 1000), CHECKPOINT (steps between
# checkpoints, the points of the FID curves, default STEPS / 2), NUM_IMAGES (samples per run, default 256),
# SAMPLE_STEPS (sampler steps, default 50) and RUNS (output folder, default outputs/seeds) shrink or move it.
# Finished runs (train_stats.json at STEPS steps) are reused, interrupted ones resume from their last
# checkpoint, and sample folders are reused when their manifest matches.
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS="${SEEDS:-0 1 2}"
STEPS="${STEPS:-1000}"
CHECKPOINT="${CHECKPOINT:-$((STEPS / 2))}"
NUM_IMAGES="${NUM_IMAGES:-256}"
SAMPLE_STEPS="${SAMPLE_STEPS:-50}"
RUNS="${RUNS:-outputs/seeds}"
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=30
mkdir -p "$RUNS"

step() { echo "== $* ($(date +%T))"; }
start=$(date +%s)

declare -A ARM_FLAGS=(
  [conv]="--set model_type=conv"
  [dcnv4]="--set model_type=dcnv4"
  [dcnv4_matched]='--set model_type=dcnv4 --set dcnv4_options={"match":"params"}'
)
for arm in conv dcnv4 dcnv4_matched; do
  for seed in $SEEDS; do
    if python -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['steps'] != $STEPS)" \
        "$RUNS/$arm/seed$seed/train_stats.json" 2>/dev/null; then
      step "train $arm, seed $seed: finished before, reused"
      continue
    fi
    step "train $arm, seed $seed"
    # shellcheck disable=SC2086
    python train_ldm.py --output_dir "$RUNS/$arm/seed$seed" --seed "$seed" --max_train_steps "$STEPS" \
      --checkpointing_steps "$CHECKPOINT" --checkpoints_total_limit 100 --resume_from_checkpoint latest \
      --set "latent_cache_dir=$RUNS/latents" --set "sample_every_steps=0" ${ARM_FLAGS[$arm]} > "$RUNS/$arm.seed$seed.log" 2>&1 \
      || { tail -20 "$RUNS/$arm.seed$seed.log"; exit 1; }
    tail -1 "$RUNS/$arm.seed$seed.log"
  done
done

runs() { for seed in $SEEDS; do echo "$RUNS/$1/seed$seed"; done; }
for arm in dcnv4 dcnv4_matched; do
  step "compare $arm against conv"
  # shellcheck disable=SC2046
  python compare.py --a $(runs "$arm") --b $(runs conv) --output_dir "$RUNS/comparison_$arm" --samples_dir "$RUNS/samples" \
    --num_images "$NUM_IMAGES" --num_inference_steps "$SAMPLE_STEPS" > "$RUNS/comparison_$arm.log" 2>&1 \
    || { tail -20 "$RUNS/comparison_$arm.log"; exit 1; }
done
step "done in $(( $(date +%s) - start )) s on $(nproc) cores"
for arm in dcnv4 dcnv4_matched; do
  echo; echo "## $arm against conv"; cat "$RUNS/comparison_$arm/comparison.md"
done
