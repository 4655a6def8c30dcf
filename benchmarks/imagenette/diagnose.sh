#!/usr/bin/env bash
# Why the adapted DA-VAE model does (not) beat the native R/2 model: after run.sh OUT, re-adapt with the
# residual detail view (adapt_dit.detail_view=residual) on the same cached latents and steps, sample and
# score it like (ii), and measure the detail residual z_d - z_base of generated latents of both adapted
# models against the training latents'. Writes OUT/diag/diagnosis.json.
# usage: bash benchmarks/imagenette/diagnose.sh OUT
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: bash benchmarks/imagenette/diagnose.sh OUT" >&2; exit 2; }
OUT=$(cd "$1" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VAL=${IMAGENETTE:-$REPO/../shared/data/imagenette224}/val
export DAVAE_CACHE_DIR="$OUT/cache"
D="$OUT/diag"; mkdir -p "$D"
P=(--preset imagenette)
STEPS=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['steps'])" "$OUT/adapt/final/davae_dit.json")
# labels of the cached latents, so adapt-dit reads them without encoding again
python - "$OUT/adapt/cache/index.jsonl" "$D/labels.jsonl" <<'PY'
import json, sys
with open(sys.argv[2], "w") as f:
    for line in open(sys.argv[1]):
        r = json.loads(line)
        f.write(json.dumps({"image": r["latent"], "label": r["label"]}) + "\n")
PY
[ -d "$D/adapt_residual/final" ] || { davae adapt-dit "${P[@]}" --vae "$OUT/vae/final" --dit "$OUT/native_half/final" \
  --data "$OUT/adapt/cache/latents" --captions "$D/labels.jsonl" --steps "$STEPS" \
  --set adapt_dit.detail_view=residual --out "$D/adapt_residual" --json > "$D/adapt_residual.json.tmp" && mv "$D/adapt_residual.json.tmp" "$D/adapt_residual.json"; }
CLASSES=(); for i in 0 1 2 3 4 5 6 7 8 9; do CLASSES+=(--class-id "$i"); done
for m in raw residual; do
  dit="$OUT/adapt/final"; [ $m = residual ] && dit="$D/adapt_residual/final"
  [ -d "$D/latents_$m" ] || davae generate "${P[@]}" --vae "$OUT/vae/final" --dit "$dit" --out "$D/latents_$m" \
    --num-images 2 --seed 0 --batch-size 20 "${CLASSES[@]}" --save-latents --json > /dev/null
done
python "$HERE/collect.py" diagnose "$OUT"   # the residual statistics first
NPC=$(ls "$OUT/samples/davae" | grep -c '\.png$'); NPC=$((NPC / 10))
[ -f "$D/gen_residual.json" ] || { davae generate "${P[@]}" --vae "$OUT/vae/final" --dit "$D/adapt_residual/final" \
  --out "$D/samples_residual" --num-images "$NPC" --seed 0 --batch-size 100 "${CLASSES[@]}" --json > "$D/gen_residual.json.tmp" && mv "$D/gen_residual.json.tmp" "$D/gen_residual.json"; }
[ -f "$D/fid_residual.json" ] || { davae eval-fid "$D/samples_residual" "$VAL" --kid --mode clean --json > "$D/fid_residual.json.tmp" && mv "$D/fid_residual.json.tmp" "$D/fid_residual.json"; }
python "$HERE/collect.py" diagnose "$OUT"
