# Shared by the Imagenette chains (run.sh: issues 13/20; detail.sh: issue 37). Sourced, not run: the caller sets
# SCRIPT (its path for the usage line) and then calls `parse_args "$@"`, `smoke_subsets NTRAIN NVAL` (--smoke),
# and `stage`/`fid` for its stages, after defining `finish` (what collects its results).
set -euo pipefail

usage() { echo "usage: bash $SCRIPT OUT [--smoke] [--scale cpu|gpu] [--until STAGE] [--budget MINUTES]" >&2; exit 2; }
parse_args() {  # sets OUT SMOKE SCALE UNTIL BUDGET_MIN START_S HERE REPO DATA TAESD3 TRAIN VAL; makes OUT
  [ $# -ge 1 ] || usage
  OUT=$1; shift
  case "$OUT" in -*) usage ;; esac
  SMOKE=0; SCALE=cpu; UNTIL=""; BUDGET_MIN=""; START_S=$(date +%s)
  while [ $# -gt 0 ]; do
    case "$1" in
      --smoke) SMOKE=1 ;;
      --scale) shift; [ $# -gt 0 ] || usage; SCALE=$1 ;;
      --until) shift; [ $# -gt 0 ] || usage; UNTIL=$1 ;;
      --budget) shift; [ $# -gt 0 ] || usage; BUDGET_MIN=$1 ;;
      *) usage ;;
    esac
    shift
  done
  case "$SCALE" in cpu|gpu) ;; *) echo "error: --scale must be cpu or gpu, got $SCALE" >&2; exit 2 ;; esac
  case "$BUDGET_MIN" in ""|*[!0-9.]*|*.*.*|.) [ -z "$BUDGET_MIN" ] || { echo "error: --budget must be a number of minutes, got $BUDGET_MIN" >&2; exit 2; } ;; esac
  HERE=$(cd "$(dirname "$SCRIPT")" && pwd)
  REPO=$(cd "$HERE/../.." && pwd)
  DATA=${IMAGENETTE:-$REPO/../shared/data/imagenette224}
  TAESD3=${TAESD3:-$REPO/../shared/weights/taesd3}
  for need in "$DATA/train" "$DATA/val" "$TAESD3"; do
    [ -d "$need" ] || { echo "error: $need not found (set IMAGENETTE / TAESD3)" >&2; exit 1; }
  done
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  export DAVAE_CACHE_DIR="$OUT/cache"   # FID feature cache, inside the run
  TRAIN="$DATA/train"; VAL="$DATA/val"
  mkdir -p "$OUT/logs" "$OUT/times"
}
smoke_subsets() {  # smoke_subsets NTRAIN NVAL: symlinked subsets (the first N images of each class), never copies
  local split n cls c files f
  mkdir -p "$OUT/data"
  for split in train val; do
    n=$1; [ "$split" = val ] && n=$2
    for cls in "$DATA/$split"/*/; do
      c=$(basename "$cls"); mkdir -p "$OUT/data/$split/$c"
      files=("$cls"*)   # sorted by the glob
      for f in "${files[@]:0:$n}"; do [ -e "$f" ] || continue; ln -sf "$f" "$OUT/data/$split/$c/$(basename "$f")"; done
    done
  done
  TRAIN="$OUT/data/train"; VAL="$OUT/data/val"
}
class_subset() {  # class_subset SRC DST N: the first N images of each class of SRC as symlinks in DST (once)
  local src=$1 dst=$2 n=$3 cls c files f
  [ -e "$dst/.done" ] && return 0
  rm -rf "$dst"
  for cls in "$src"/*/; do
    c=$(basename "$cls"); mkdir -p "$dst/$c"
    files=("$cls"*)
    for f in "${files[@]:0:$n}"; do [ -e "$f" ] || continue; ln -sf "$(readlink -f "$f")" "$dst/$c/$(basename "$f")"; done
  done
  touch "$dst/.done"
}
train_dits() {  # the two DiT stages of both chains; needs P VAE TRAIN N112_STEPS ADAPT_STEPS DIT_SET ADAPT_SET
  stage native_half "$OUT/native_half/final" "$OUT/native_half" \
    davae train-dit $P --vae "$VAE" --data "$TRAIN" --res 112 --steps "$N112_STEPS" --out "$OUT/native_half" \
    --set train_dit.latents_from=davae_base "${DIT_SET[@]}" --json
  stage adapt "$OUT/adapt/final" "$OUT/adapt" \
    davae adapt-dit $P --vae "$VAE" --dit "$OUT/native_half/final" --data "$TRAIN" --steps "$ADAPT_STEPS" \
    --out "$OUT/adapt" "${ADAPT_SET[@]}" --json
}
stop_here() {  # --until: collect what exists and stop after this stage
  if [ -n "$UNTIL" ] && [ "$1" = "$UNTIL" ]; then echo "[--until $UNTIL] stopping"; finish || true; exit 0; fi
}
over_budget() {  # --budget: true once the minutes since this invocation started reach it
  [ -n "$BUDGET_MIN" ] && python -c "import sys; sys.exit(0 if (float(sys.argv[2]) - float(sys.argv[1])) / 60 >= float(sys.argv[3]) else 1)" \
    "$START_S" "$(date +%s)" "$BUDGET_MIN"
}
stage() {  # stage NAME DONE_PATH RUN_DIR cmd...: skip when DONE_PATH exists, --resume when RUN_DIR exists
  local name=$1 done=$2 rundir=$3; shift 3
  if [ -e "$done" ]; then echo "[$name] done ($done)"; stop_here "$name"; return 0; fi
  if over_budget; then
    echo "[--budget $BUDGET_MIN] $(date -u +%H:%M:%S) the budget is spent: stopping before $name (rerun to continue)"
    finish || true; exit 0
  fi
  local extra=()
  if [ -n "$rundir" ] && [ -f "$rundir/config.yaml" ]; then extra=(--resume); echo "[$name] resuming"; fi
  echo "[$name] $(date -u +%H:%M:%S) $*"
  local t0; t0=$(date +%s.%N)
  "$@" "${extra[@]}" > "$OUT/logs/$name.json" 2> "$OUT/logs/$name.err" || {
    echo "[$name] failed; see $OUT/logs/$name.err:" >&2; tail -n 5 "$OUT/logs/$name.err" >&2; exit 1; }
  local t1; t1=$(date +%s.%N)
  python -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$t0" "$t1" >> "$OUT/times/$name"
  if [ -z "$rundir" ]; then touch "$done"; fi   # output stages: their marker
  stop_here "$name"
}
fid() {  # fid KEY GEN_DIR REF_DIR [flags]: eval-fid into logs/fid_KEY.json, with the class probe on train/
  local key=$1 gen=$2 ref=$3; shift 3
  stage "fid_$key" "$OUT/logs/fid_$key.done" "" davae eval-fid "$gen" "$ref" --kid --mode clean --sharpness \
    --class-probe "$TRAIN" --probe-per-class "$PROBE_PER_CLASS" "$@" --json
}

