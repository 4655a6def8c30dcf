#!/usr/bin/env bash
# Issue 37: do the detail channels carry detail a DiT can generate? The `imagenette-detail` preset (the official
# ImageNet recipe's mechanism in miniature) on Imagenette, with the `davae` commands only:
#   1. ceilings          before any training, on the val subset: (a) PSNR of base 112² + bicubic, base 224², and the
#                        best a high-band decoder can do; (b) the reference detail (the base VAE's own 224² latent,
#                        unshuffled): its share of variance beyond z_base, neighbour correlation, kurtosis; (c) the
#                        alignment floor of a linear head per feature source (davae ceilings)
#   2. vae               train-vae --preset imagenette-detail on train/
#   3. tokenizer         the gates on the val subset (eval-fid --reconstruct --baselines): gap closed, the detail's own
#                        gain (z_d vs z_d predicted from z_base), its structure beyond z_base, and its robustness to
#                        noise of 0.25 detail std
#   4. native_half       a native LightningDiT at 112² on the DA-VAE's base channels (49 tokens)
#   5. adapt             that model warm-started on the DA-VAE's 224² latents (49 tokens), with the preset's detail
#                        noise and detail-loss ramp
#   6. gen_native_half   (i): class-balanced samples of the native model, with their latents (--save-latents)
#   7. same_base         the decisive test: the adapted DiT generates the detail of each of (i)'s latents with the
#                        base held (upscale --from-latents, strength 0), decoded three ways — generated detail |
#                        detail predicted from the base (decode --detail-from-base) | base + bicubic (decode
#                        --base-only) — each scored by FID/KID with --split 2 and by the class probe
#   8. gen_davae         (ii): free generation with the adapted model (same seeds, same 49 tokens), scored the same
#   then collect.py detail writes OUT/results.json (ceilings, tokenizer with its gates, same_base, free generation).
# The stages run in this order, so an interrupted run has the most important numbers first; a rerun skips finished
# stages and resumes interrupted ones. (i)'s own FID is the same_base `base_bicubic` row: the same latents, the
# base decoder at 112² + the DA-VAE's bicubic.
#
# usage: bash benchmarks/imagenette/detail.sh OUT [--smoke] [--scale cpu|gpu] [--until STAGE] [--budget MINUTES]
#   --smoke      every stage with tiny settings on symlinked subsets (1 train / 1 val image per class): every
#                key of results.json written, the CI's check of the chain
#   --scale gpu  larger step budgets meant for one GPU (not run on one yet)
#   --until S / --budget M   as run.sh: stop after stage S / start no stage after M minutes; rerun to continue
# Data and weights: $IMAGENETTE (default ../shared/data/imagenette224) and $TAESD3 (default ../shared/weights/taesd3).
SCRIPT=${BASH_SOURCE[0]}
. "$(dirname "$SCRIPT")/stages.sh"
parse_args "$@"
P="--preset imagenette-detail"

# ------------------------------------------------------------------ sizes
NPC=200             # (i)'s samples per class (10 classes: 2,000), the same bases for the three decodes
NVAL=50             # val images per class for the ceilings and the tokenizer's gates (500)
GEN_BS=100
PROBE_PER_CLASS=200  # train images per class for eval-fid's class probe
VAE_SET=(); N112_STEPS=1100; ADAPT_STEPS=500; DIT_SET=()
if [ "$SCALE" = gpu ]; then
  VAE_SET=(--set train_vae.steps=6000 --set train_vae.max_images=9469 --set train_vae.batch_size=16)
  N112_STEPS=6000; ADAPT_STEPS=3000
  DIT_SET=(--set train_dit.batch_size=256); GEN_BS=500
fi
if [ "$SMOKE" = 1 ]; then
  smoke_subsets 1 1
  NPC=2; NVAL=1; GEN_BS=20; N112_STEPS=3; ADAPT_STEPS=3; PROBE_PER_CLASS=1
  VAE_SET=(--set train_vae.steps=3 --set train_vae.batch_size=2 --set train_vae.checkpoint_every=2
           --set train_vae.stats_images=4 --set train_vae.max_val=2 --set train_vae.warmup_steps=1)
  DIT_SET=(--set train_dit.batch_size=4 --set train_dit.checkpoint_every=2 --set train_dit.log_every=1
           --set train_dit.encode_batch_size=10)
fi
ADAPT_SET=("${DIT_SET[@]/train_dit/adapt_dit}")
[ "$SMOKE" = 1 ] && ADAPT_SET+=(--set adapt_dit.detail_ramp_steps=2 --set adapt_dit.detail_stats_latents=10)
[ "$SMOKE" = 1 ] && SAMPLE=(--sampling-steps 2) || SAMPLE=()

finish() { python "$HERE/collect.py" detail "$OUT" && echo "wrote $OUT/results.json"; }

VALSUB="$OUT/data/valsub"
class_subset "$VAL" "$VALSUB" "$NVAL"

# ------------------------------------------------------------------ the tokenizer, before and after training
stage ceilings "$OUT/logs/ceilings.done" "" \
  davae ceilings "$VALSUB" $P --base-vae "$TAESD3" --res 224 --json
stage vae "$OUT/vae/final" "$OUT/vae" \
  davae train-vae $P --base-vae "$TAESD3" --data "$TRAIN" --val-data "$VAL" --out "$OUT/vae" "${VAE_SET[@]}" --json
VAE="$OUT/vae/final"
stage tokenizer "$OUT/logs/tokenizer.done" "" \
  davae eval-fid "$VALSUB" --reconstruct --vae "$VAE" --res 224 --baselines --kid --json

# ------------------------------------------------------------------ the DiTs
train_dits   # native_half (112², on the DA-VAE's base channels), then adapt (224², the same 49 tokens)

# ------------------------------------------------------------------ the same generated bases, three decodes
CLASSES=(); for i in 0 1 2 3 4 5 6 7 8 9; do CLASSES+=(--class-id "$i"); done
S="$OUT/samples"
stage gen_native_half "$S/native_half/.done" "" \
  davae generate $P --native --base-pipeline "$OUT/native_half/final" --vae "$VAE" --res 112 \
  --out "$S/native_half" --seed 0 --save-latents --num-images "$NPC" --batch-size "$GEN_BS" "${CLASSES[@]}" \
  "${SAMPLE[@]}" --json
stage same_base "$S/same_base_generated/.done" "" \
  davae upscale "$S/native_half" --from-latents $P --vae "$VAE" --dit "$OUT/adapt/final" --save-latents \
  --batch-size "$GEN_BS" --out "$S/same_base_generated" "${SAMPLE[@]}" --json
stage same_base_pred "$S/same_base_pred/.done" "" \
  davae decode "$S/same_base_generated" --vae "$VAE" --dit "$OUT/adapt/final" --detail-from-base \
  --out "$S/same_base_pred" --json
stage same_base_bicubic "$S/same_base_bicubic/.done" "" \
  davae decode "$S/same_base_generated" --vae "$VAE" --dit "$OUT/adapt/final" --base-only \
  --out "$S/same_base_bicubic" --json
for k in generated pred bicubic; do fid "same_base_$k" "$S/same_base_$k" "$VAL" --split 2; done

# ------------------------------------------------------------------ (ii) free generation, the second row
stage gen_davae "$S/davae/.done" "" \
  davae generate $P --vae "$VAE" --dit "$OUT/adapt/final" --out "$S/davae" --seed 0 --num-images "$NPC" \
  --batch-size "$GEN_BS" "${CLASSES[@]}" "${SAMPLE[@]}" --json
fid davae "$S/davae" "$VAL" --split 2

finish
