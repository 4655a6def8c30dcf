#!/usr/bin/env bash
# After detail.sh: its imagenette-detail adaptation (chain RUN/adapt, 500 steps) continued to 3000 steps in a copy
# (constant lr and the ramp long done, so the resume equals a 3000-step run), then the detail of the same 2,000
# generated bases generated again and scored as detail.sh's same_base stage (eval-fid with the class probe, 2 halves).
# Usage: bash benchmarks/imagenette/adapt_longer.sh [OUT (~/davae-runs/adapt3000)] [CHAIN (~/davae-runs/chain37)]
#   STEPS=N (default 3000): the adaptation's total steps; FROM=RUN (default CHAIN/adapt): the adapt run folder copied
#   and resumed (e.g. an earlier OUT/adapt, to go on from its steps). Rerun, it resumes the adaptation and the upscale.
set -euo pipefail
# (run inside the venv davae is installed in)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
R=${1:-$HOME/davae-runs/adapt3000}; C=${2:-$HOME/davae-runs/chain37}; D=${IMAGENETTE:-$HERE/../../../shared/data/imagenette224}
mkdir -p "$R"
export DAVAE_CACHE_DIR=$C/cache
STEPS=${STEPS:-3000}; FROM=${FROM:-$C/adapt}
[ -d $R/adapt ] || cp -r "$FROM" $R/adapt
t0=$(date +%s)
davae adapt-dit --preset imagenette-detail --vae $C/vae/final --dit $C/native_half/final --data $D/train \
  --steps "$STEPS" --out $R/adapt --resume --json > $R/adapt.json 2> $R/adapt.err
t1=$(date +%s); echo "adapt $((t1-t0)) s" >> $R/times
if [ ! -f $R/same_base_generated/.done ]; then
  davae upscale $C/samples/native_half --from-latents --preset imagenette-detail --vae $C/vae/final \
    --dit $R/adapt/final --save-latents --batch-size 100 --out $R/same_base_generated --json \
    > $R/same_base.json 2> $R/same_base.err
  touch $R/same_base_generated/.done
fi
t2=$(date +%s); echo "same_base $((t2-t1)) s" >> $R/times
davae eval-fid $R/same_base_generated $D/val --kid --mode clean --sharpness --class-probe $D/train \
  --probe-per-class 200 --split 2 --json > $R/fid_generated.json 2> $R/fid.err
t3=$(date +%s); echo "fid $((t3-t2)) s" >> $R/times
echo done >> $R/times
