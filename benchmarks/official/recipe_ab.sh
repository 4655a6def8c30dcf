#!/usr/bin/env bash
# Issue 22, part 5: what the official recipes change, measured on the CPU with the `tiny` preset.
#   A. tokenizer: ours (the tiny preset's losses) vs the official SD3 tokenizer losses (KL summed over C·h·w,
#      alignment 0.2 on the sampled z, the base VAE's own reconstruction as the target, L1 x2, AdamW (0.9, 0.99)
#      wd 1e-4, cosine to 1e-5); held-out PSNR/SSIM on the 8 scikit-image photos + the detail-structure statistics.
#   B. DiT objective: adapt-dit on the same DA-VAE, velocity MSE (ours) vs x0 + min((1-sigma)/sigma, 5) (official
#      SD3 trainer); both runs see the same batches, sigmas and noise (same seed), so their logged velocity
#      errors (`loss_base`, `loss_detail`: plain velocity MSE whatever the objective) compare step by step.
# usage: bash benchmarks/official/recipe_ab.sh OUT [STEPS_VAE] [STEPS_DIT]   (resumable: finished runs are kept)
set -euo pipefail
OUT=${1:?usage: recipe_ab.sh OUT [STEPS_VAE] [STEPS_DIT]}
STEPS_VAE=${2:-2500}
STEPS_DIT=${3:-300}
SHARED=${SHARED:-$(cd "$(dirname "$0")/../../.." && pwd)/shared}
TAESD3=${TAESD3:-$SHARED/weights/taesd3}
DATA=${DATA:-$SHARED/data/sun_hays80}
mkdir -p "$OUT"
COMMON=(--preset tiny --base-vae "$TAESD3" --data "$DATA" --val-data skimage --json
        --set train_vae.steps="$STEPS_VAE" --set train_vae.eval_every="$STEPS_VAE")
OFFICIAL=(--set loss.kl_reduction=sum --set loss.align=0.2 --set loss.align_on=sample
          --set loss.recon_target=base_reconstruction --set loss.l1=2.0 --set "train_vae.betas=[0.9,0.99]"
          --set train_vae.weight_decay=1e-4 --set train_vae.lr_schedule=cosine --set train_vae.lr_end=1e-5)
run() {  # run NAME CMD...: skipped when NAME/final exists
  local name=$1; shift
  if [ -d "$OUT/$name/final" ]; then echo "[$name] done"; return; fi
  echo "[$name] $(date +%T) $*"
  "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
}
run vae_ours davae train-vae "${COMMON[@]}" --out "$OUT/vae_ours"
run vae_official davae train-vae "${COMMON[@]}" "${OFFICIAL[@]}" --out "$OUT/vae_official"
# captions: every image "a photograph" (the tiny text encoders are random; the official SD3 loader gives every
# image an empty caption anyway)
python - "$DATA" "$OUT/captions.jsonl" <<'EOF'
import json, sys
from pathlib import Path
files = sorted(p for p in Path(sys.argv[1]).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
Path(sys.argv[2]).write_text("".join(json.dumps({"image": str(p), "prompt": "a photograph"}) + "\n" for p in files))
EOF
DIT=(--preset tiny --vae "$OUT/vae_ours/final" --data "$DATA" --captions "$OUT/captions.jsonl" --json
     --set adapt_dit.steps="$STEPS_DIT" --set adapt_dit.checkpoint_every="$STEPS_DIT" --set adapt_dit.log_every=1)
run dit_velocity davae adapt-dit "${DIT[@]}" --out "$OUT/dit_velocity"
run dit_x0_ratio davae adapt-dit "${DIT[@]}" --set adapt_dit.loss_target=x0 --set adapt_dit.loss_weighting=snr_ratio \
    --out "$OUT/dit_x0_ratio"
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
res = {}
for name in ("vae_ours", "vae_official"):
    r = json.loads((out / f"{name}.json").read_text())
    res[name] = r
for name in ("dit_velocity", "dit_x0_ratio"):
    rows = [json.loads(x) for x in (out / name / "log.jsonl").read_text().splitlines()]
    rows = [x for x in rows if "loss_base" in x]

    def mean(xs, k):
        v = [x[k] for x in xs if k in x]
        return sum(v) / max(1, len(v))

    last = rows[len(rows) // 2:]
    w = max(1, len(rows) // 8)  # the curve: means over 8 windows of steps (the same batches and sigmas in both runs)
    res[name] = {"steps": len(rows), "second_half_mean": {k: mean(last, k) for k in ("loss_base", "loss_detail", "loss")},
                 "curve": {"window": w, **{k: [round(mean(rows[i:i + w], k), 4) for i in range(0, len(rows), w)]
                                           for k in ("loss_base", "loss_detail")}}}
(out / "summary.json").write_text(json.dumps(res, indent=1))
print(json.dumps({k: v for k, v in res.items() if k.startswith("dit")}, indent=1))
EOF
