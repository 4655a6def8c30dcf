#!/usr/bin/env bash
# The DA-VAE experiment in miniature on Imagenette (issue 13), with the `davae` commands only:
#   1. train-vae   the DA-VAE on train/ at 224² (TAESD3 base, the tiny residual design)
#   2. train-dit   a native LightningDiT at 112² (49 tokens)
#   3. adapt-dit   that model warm-started on the DA-VAE's 224² latents (49 tokens)
#   4. train-dit   a native LightningDiT at 224² (196 tokens) for the wall-clock of 2 + 3
#   5. generate    the same class-balanced samples (same seeds) with (i) native-112 (+ bicubic x2 in
#                  collect.py), (ii) the adapted DA-VAE model, (iii) native-224; timed per image
#   6. eval-fid    FID and KID (clean mode) of each against val/
#   then collect.py writes OUT/results.json and OUT/grid.png.
#
# usage: bash benchmarks/imagenette/run.sh OUT [--smoke] [--scale cpu|gpu]
#   --smoke      every stage with tiny settings (symlinked 40-image subsets, a few steps): about 3 minutes
#   --scale gpu  the same chain sized for about 10 minutes of one GPU
# Data and weights: $IMAGENETTE (default ../shared/data/imagenette224 beside the repository) and $TAESD3
# (default ../shared/weights/taesd3). Rerunning skips finished stages (their final/ or output exists) and
# resumes interrupted ones.
set -euo pipefail

usage() { echo "usage: bash benchmarks/imagenette/run.sh OUT [--smoke] [--scale cpu|gpu]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
case "$OUT" in -*) usage ;; esac
SMOKE=0; SCALE=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --scale) shift; [ $# -gt 0 ] || usage; SCALE=$1 ;;
    *) usage ;;
  esac
  shift
done
case "$SCALE" in cpu|gpu) ;; *) echo "error: --scale must be cpu or gpu, got $SCALE" >&2; exit 2 ;; esac

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DATA=${IMAGENETTE:-$REPO/../shared/data/imagenette224}
TAESD3=${TAESD3:-$REPO/../shared/weights/taesd3}
for need in "$DATA/train" "$DATA/val" "$TAESD3"; do
  [ -d "$need" ] || { echo "error: $need not found (set IMAGENETTE / TAESD3)" >&2; exit 1; }
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export DAVAE_CACHE_DIR="$OUT/cache"   # FID feature cache, inside the run
P="--preset imagenette"

# ------------------------------------------------------------------ sizes
NPC=100             # generated images per class (10 classes: 1,000)
GEN_BS=100
VAE_SET=(); N112_STEPS=1100; ADAPT_STEPS=500; DIT_SET=()
if [ "$SCALE" = gpu ]; then
  VAE_SET=(--set train_vae.steps=6000 --set train_vae.max_images=9469 --set train_vae.batch_size=32)
  N112_STEPS=6000; ADAPT_STEPS=3000
  DIT_SET=(--set train_dit.batch_size=256); GEN_BS=500
fi
TRAIN="$DATA/train"; VAL="$DATA/val"
if [ "$SMOKE" = 1 ]; then
  # symlinked subsets (4 train / 2 val images per class), never copies
  mkdir -p "$OUT/data"
  for split in train val; do
    n=4; [ "$split" = val ] && n=2
    for cls in "$DATA/$split"/*/; do
      c=$(basename "$cls"); mkdir -p "$OUT/data/$split/$c"
      files=("$cls"*)   # sorted by the glob
      for f in "${files[@]:0:$n}"; do ln -sf "$f" "$OUT/data/$split/$c/$(basename "$f")"; done
    done
  done
  TRAIN="$OUT/data/train"; VAL="$OUT/data/val"
  NPC=2; GEN_BS=20; N112_STEPS=6; ADAPT_STEPS=4
  VAE_SET=(--set train_vae.steps=6 --set train_vae.checkpoint_every=3 --set train_vae.stats_images=8)
  DIT_SET=(--set train_dit.batch_size=8 --set train_dit.checkpoint_every=3 --set train_dit.log_every=2)
fi
ADAPT_SET=("${DIT_SET[@]/train_dit/adapt_dit}")
[ "$SMOKE" = 1 ] && ADAPT_SET+=(--set adapt_dit.checkpoint_every=2 --set adapt_dit.detail_ramp_steps=2)
[ "$SMOKE" = 1 ] && SAMPLE=(--sampling-steps 4) || SAMPLE=()

mkdir -p "$OUT/logs" "$OUT/times"
stage() {  # stage NAME DONE_PATH RUN_DIR cmd...: skip when DONE_PATH exists, --resume when RUN_DIR exists
  local name=$1 done=$2 rundir=$3; shift 3
  if [ -e "$done" ]; then echo "[$name] done ($done)"; return 0; fi
  local extra=()
  if [ -n "$rundir" ] && [ -f "$rundir/config.yaml" ]; then extra=(--resume); echo "[$name] resuming"; fi
  echo "[$name] $(date -u +%H:%M:%S) $*"
  local t0; t0=$(date +%s.%N)
  "$@" "${extra[@]}" > "$OUT/logs/$name.json" 2> "$OUT/logs/$name.err" || {
    echo "[$name] failed; see $OUT/logs/$name.err:" >&2; tail -n 5 "$OUT/logs/$name.err" >&2; exit 1; }
  local t1; t1=$(date +%s.%N)
  python -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$t0" "$t1" >> "$OUT/times/$name"
}

stage vae "$OUT/vae/final" "$OUT/vae" \
  davae train-vae $P --base-vae "$TAESD3" --data "$TRAIN" --val-data "$VAL" --out "$OUT/vae" "${VAE_SET[@]}" --json
VAE="$OUT/vae/final"

stage native_half "$OUT/native_half/final" "$OUT/native_half" \
  davae train-dit $P --vae "$VAE" --data "$TRAIN" --res 112 --steps "$N112_STEPS" --out "$OUT/native_half" \
  "${DIT_SET[@]}" --json

stage adapt "$OUT/adapt/final" "$OUT/adapt" \
  davae adapt-dit $P --vae "$VAE" --dit "$OUT/native_half/final" --data "$TRAIN" --steps "$ADAPT_STEPS" \
  --out "$OUT/adapt" "${ADAPT_SET[@]}" --json

# the native 224² model gets the training-loop time of native-112 + adaptation (the cost DA-VAE avoids)
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

CLASSES=(); for i in 0 1 2 3 4 5 6 7 8 9; do CLASSES+=(--class-id "$i"); done
GEN=(--num-images "$NPC" --seed 0 --batch-size "$GEN_BS" "${CLASSES[@]}" "${SAMPLE[@]}" --json)
stage gen_native_half "$OUT/samples/native_half/.done" "" \
  davae generate $P --native --base-pipeline "$OUT/native_half/final" --vae "$VAE" --res 112 \
  --out "$OUT/samples/native_half" "${GEN[@]}"
touch "$OUT/samples/native_half/.done"
stage gen_davae "$OUT/samples/davae/.done" "" \
  davae generate $P --vae "$VAE" --dit "$OUT/adapt/final" --out "$OUT/samples/davae" "${GEN[@]}"
touch "$OUT/samples/davae/.done"
stage gen_native_full "$OUT/samples/native_full/.done" "" \
  davae generate $P --native --base-pipeline "$OUT/native_full/final" --vae "$VAE" --res 224 \
  --out "$OUT/samples/native_full" "${GEN[@]}"
touch "$OUT/samples/native_full/.done"

# (i): the native 112² samples upsampled x2 (bicubic) to 224²
stage upsample "$OUT/samples/native_half_bicubic/.done" "" \
  python "$HERE/collect.py" upsample "$OUT/samples/native_half" "$OUT/samples/native_half_bicubic"
touch "$OUT/samples/native_half_bicubic/.done"

for key in native_half_bicubic davae native_full; do
  stage "fid_$key" "$OUT/logs/fid_$key.done" "" \
    davae eval-fid "$OUT/samples/$key" "$VAL" --kid --mode clean --json
  touch "$OUT/logs/fid_$key.done"
done

python "$HERE/collect.py" results "$OUT" --per-class "$NPC"
echo "wrote $OUT/results.json and $OUT/grid.png"
