#!/usr/bin/env bash
# The DA-VAE experiment in miniature on Imagenette (issues 13 and 20), with the `davae` commands only:
#   1. train-vae   the DA-VAE on train/ at 224² (TAESD3 base, the `imagenette` preset's design)
#   2. train-dit   a native LightningDiT at 112² (49 tokens) on latents that are exactly the DA-VAE's base
#                  channels (train_dit.latents_from=davae_base)
#   3. adapt-dit   that model warm-started on the DA-VAE's 224² latents (49 tokens)
#   4. generate    the same class-balanced samples (same seeds) with (i) native-112 (+ bicubic x2 in float, the
#                  DA-VAE's own upsampling, collect.py) and (ii) the adapted DA-VAE model; timed per image
#   5. eval-fid    FID and KID (clean mode) of each against val/, and whether the samples show their class: the
#                  accuracy of a linear probe on the FID Inception's features of train/ (and its Inception-Score
#                  formula over the 10 classes), with real val/ images as the probe's ceiling; for (i) and (ii)
#                  also --split 2: the same features dealt into two halves (even/odd seeds), the FID's noise
#   6. measurements that separate the causes:
#      davae_base  (ii)'s own latents decoded without their detail channels (decode --base-only): detail vs drift
#      upscale     `davae upscale` of a class-balanced val subset from 112²: FID/KID and paired PSNR/LPIPS to
#                  the real images
#      rfid        the tokenizer on that val subset, the same metrics: base at 112² + bicubic (upscale's bicubic
#                  baseline) | DA-VAE (its oracle: the detail of the real image) | base at 224²
#      davae_pred  (ii)'s latents decoded with their detail predicted from their base channels (decode
#                  --detail-from-base): what the generated detail's own content is worth
#   7. (iii) a native LightningDiT at 224² (196 tokens) for the training time of 2 + 3, sampled and scored
#   then collect.py writes OUT/results.json and OUT/grid.png.
# The stages run in this order, so an interrupted run has the most important numbers first.
#
# usage: bash benchmarks/imagenette/run.sh OUT [--smoke] [--scale cpu|gpu] [--until STAGE] [--budget MINUTES]
#   --smoke      every stage with tiny settings (symlinked subsets of 20 train / 10 val images, a few steps):
#                about 10 minutes on a 2-core CPU (the CI's longest test)
#   --scale gpu  larger step budgets meant for one GPU (not run on one yet: no measured duration); with --budget
#                the stages that fit one lease run in the order above and a later run continues
#   --until S    stop after stage S and collect what exists; a later run without it continues
#   --budget M   start no stage once M minutes have passed since this invocation started (a stage already
#                running finishes), collect what exists and exit 0; a later run continues (e.g. one lease of a
#                GPU machine, or the rest of a CPU session)
# Data and weights: $IMAGENETTE (default ../shared/data/imagenette224 beside the repository) and $TAESD3
# (default ../shared/weights/taesd3). Rerunning skips finished stages (their final/ or output exists) and
# resumes interrupted ones.
SCRIPT=${BASH_SOURCE[0]}
. "$(dirname "$SCRIPT")/stages.sh"
parse_args "$@"
P="--preset imagenette"

# ------------------------------------------------------------------ sizes
NPC=200             # generated images per class for (i) and (ii) (10 classes: 2,000)
NPC_FULL=50         # (iii), the slow 196-token model (1.2 s per image here): 500
NVAL=50             # val images per class for the tokenizer and upscale measurements (500)
GEN_BS=100
PROBE_PER_CLASS=200  # train images per class for eval-fid's class probe (Inception features, cached once)
VAE_SET=(); N112_STEPS=1100; ADAPT_STEPS=500; DIT_SET=()
if [ "$SCALE" = gpu ]; then
  VAE_SET=(--set train_vae.steps=6000 --set train_vae.max_images=9469 --set train_vae.batch_size=32)
  N112_STEPS=6000; ADAPT_STEPS=3000
  DIT_SET=(--set train_dit.batch_size=256); GEN_BS=500
fi
if [ "$SMOKE" = 1 ]; then
  smoke_subsets 2 1   # 2 train / 1 val image per class
  NPC=2; NPC_FULL=2; NVAL=1; GEN_BS=20; N112_STEPS=6; ADAPT_STEPS=4; PROBE_PER_CLASS=2
  VAE_SET=(--set train_vae.steps=6 --set train_vae.checkpoint_every=3 --set train_vae.stats_images=8 --set train_vae.max_val=4)
  DIT_SET=(--set train_dit.batch_size=8 --set train_dit.checkpoint_every=3 --set train_dit.log_every=2)
fi
ADAPT_SET=("${DIT_SET[@]/train_dit/adapt_dit}")
[ "$SMOKE" = 1 ] && ADAPT_SET+=(--set adapt_dit.checkpoint_every=2 --set adapt_dit.detail_ramp_steps=2)
[ "$SMOKE" = 1 ] && SAMPLE=(--sampling-steps 4) || SAMPLE=()

finish() { python "$HERE/collect.py" results "$OUT" --per-class "$NPC" && echo "wrote $OUT/results.json and $OUT/grid.png"; }

# ------------------------------------------------------------------ the models
stage vae "$OUT/vae/final" "$OUT/vae" \
  davae train-vae $P --base-vae "$TAESD3" --data "$TRAIN" --val-data "$VAL" --out "$OUT/vae" "${VAE_SET[@]}" --json
VAE="$OUT/vae/final"

train_dits   # native_half (112², on the DA-VAE's base channels), then adapt (224², the same 49 tokens)

# ------------------------------------------------------------------ (i) against (ii)
CLASSES=(); for i in 0 1 2 3 4 5 6 7 8 9; do CLASSES+=(--class-id "$i"); done
GEN=(--num-images "$NPC" --batch-size "$GEN_BS" "${CLASSES[@]}" "${SAMPLE[@]}" --json)
stage gen_native_half "$OUT/samples/native_half/.done" "" \
  davae generate $P --native --base-pipeline "$OUT/native_half/final" --vae "$VAE" --res 112 \
  --out "$OUT/samples/native_half" --seed 0 "${GEN[@]}"
stage gen_davae "$OUT/samples/davae/.done" "" \
  davae generate $P --vae "$VAE" --dit "$OUT/adapt/final" --out "$OUT/samples/davae" --seed 0 --save-latents "${GEN[@]}"
stage upsample "$OUT/samples/native_half_bicubic/.done" "" \
  python "$HERE/collect.py" upsample "$OUT/samples/native_half" "$OUT/samples/native_half_bicubic"
# --split 2: each model's samples also scored as two disjoint halves (seeds of even and odd offset within each
# class, NPC/2 per class), from the same features: the FID's noise
fid native_half_bicubic "$OUT/samples/native_half_bicubic" "$VAL" --split 2
fid davae "$OUT/samples/davae" "$VAL" --split 2

# ------------------------------------------------------------------ what separates the causes
# (ii)'s own latents without their detail channels: the base VAE at 112² + the same bicubic
stage davae_base "$OUT/samples/davae_base/.done" "" \
  davae decode "$OUT/samples/davae" --vae "$VAE" --dit "$OUT/adapt/final" --base-only --out "$OUT/samples/davae_base" --json
fid davae_base "$OUT/samples/davae_base" "$VAL"
# a class-balanced val subset (symlinks) for the tokenizer and upscale measurements
VALSUB="$OUT/data/valsub"
class_subset "$VAL" "$VALSUB" "$NVAL"
# upscale each val image from 112² (its class given), scored against the originals (FID/KID, paired PSNR/LPIPS)
stage upscale "$OUT/samples/upscale/.done" "" \
  davae upscale "$VALSUB" $P --vae "$VAE" --dit "$OUT/adapt/final" --class-from-folders --res 224 \
  --batch-size "$GEN_BS" --out "$OUT/samples/upscale" "${SAMPLE[@]}" --json
fid upscale "$OUT/samples/upscale" "$VALSUB" --paired
# the tokenizer on the same val subset, the same metrics: base at 112² + bicubic (upscale's "bicubic" baseline)
# | DA-VAE reconstruction (the detail an oracle would give: upscale's "oracle") | base at 224² | DA-VAE with z_d
# predicted from z_base
stage rfid "$OUT/logs/rfid.done" "" davae eval-fid "$VALSUB" --reconstruct --vae "$VAE" --res 224 --baselines --kid --json

# (ii)'s own latents decoded by the DA-VAE with their detail channels replaced by the linear prediction from
# their base channels: the decoder's own upsampling of the generated z_base, without the generated detail
stage davae_pred "$OUT/samples/davae_pred/.done" "" \
  davae decode "$OUT/samples/davae" --vae "$VAE" --dit "$OUT/adapt/final" --detail-from-base --out "$OUT/samples/davae_pred" --json
fid davae_pred "$OUT/samples/davae_pred" "$VAL"

# ------------------------------------------------------------------ (iii) native 224², same training time
BUDGET=$(python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
a = json.load(open(f"{out}/native_half/final/davae_native.json"))["train_seconds"]
b = json.load(open(f"{out}/adapt/final/davae_dit.json"))["train_seconds"]
print(f"{(a + b) / 60:.4f}")
PY
)
stage native_full "$OUT/native_full/final" "$OUT/native_full" \
  davae train-dit $P --vae "$VAE" --data "$TRAIN" --res 224 --max-minutes "$BUDGET" --out "$OUT/native_full" \
  "${DIT_SET[@]}" --json
stage gen_native_full "$OUT/samples/native_full/.done" "" \
  davae generate $P --native --base-pipeline "$OUT/native_full/final" --vae "$VAE" --res 224 \
  --out "$OUT/samples/native_full" --seed 0 --num-images "$NPC_FULL" --batch-size "$GEN_BS" "${CLASSES[@]}" \
  "${SAMPLE[@]}" --json
fid native_full "$OUT/samples/native_full" "$VAL"

finish
