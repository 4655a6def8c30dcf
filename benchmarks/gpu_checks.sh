#!/usr/bin/env bash
# The GPU checks of issue 14 in one run on a lent H100/H200, sized to the device time (15 min in all, the
# machine's start included): `davae generate` end to end, native vs DA-VAE, SD3.5 Medium architecture with
# random weights (--random-weights: transformer, VAE, CLIP-L/CLIP-G/T5-XXL), 1024² and 2048², batch 1 and 10,
# eager and compiled; `bench` with the text encoders at batch 10; the SDPA backends; FLUX.1-dev at 4096²
# with s = 4 and at 2048² with s = 2 (issue 15); the tiled decode's seam error and memory. Steps run in priority order and each only while the budget (BUDGET_S, default 500 s)
# lasts, so a short lease still returns the first ones. Everything lands in $OUT/results.jsonl (one JSON
# object per line: {"check": name, "seconds": wall, "result": the command's JSON}) and $OUT/log.
#   bash benchmarks/gpu_checks.sh                # on the GPU machine (diffusers wheels in .whl/ when missing)
#   SMOKE=1 bash benchmarks/gpu_checks.sh        # the same steps on the tiny preset on a CPU, in ~2 minutes
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"; RES="$OUT/results.jsonl"; LOG="$OUT/log"; : > "$RES"; : > "$LOG"
BUDGET_S=${BUDGET_S:-500}; T0=$SECONDS; SCRATCH=$(mktemp -d)
if [ "${SMOKE:-0}" = 1 ]; then
  P1=tiny; P2=tiny; R1=128; R2=256; ST=(--sampling-steps 2); ST2=(--sampling-steps 2); DEV=(--device cpu); TILE_PRESET=tiny
else
  P1=sd35m-1024; P2=sd35m-2048; R1=1024; R2=2048; ST=(); ST2=(--sampling-steps 10); DEV=(); TILE_PRESET=sd35m-2048
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; git rev-parse HEAD 2>/dev/null; date -u;
  python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"; } > "$OUT/env.txt" 2>&1

# check NAME CMD...: run CMD (which prints one JSON document) if the budget allows, append it to results.jsonl
check() {
  local name=$1; shift
  local left=$((BUDGET_S - (SECONDS - T0)))
  if [ $left -le 20 ]; then echo "== skip $name (budget spent)" | tee -a "$LOG"; return; fi
  echo "== $name: $*" | tee -a "$LOG"
  local t=$SECONDS
  if timeout "$left" "$@" > "$SCRATCH/out.json" 2>> "$LOG"; then
    python3 -c "import json,sys; print(json.dumps({'check': sys.argv[1], 'seconds': int(sys.argv[2]), 'result': json.load(open(sys.argv[3]))}))" \
      "$name" $((SECONDS - t)) "$SCRATCH/out.json" >> "$RES" || echo "   (output was not JSON)" >> "$LOG"
  else
    echo "   failed or timed out after $((SECONDS - t)) s" | tee -a "$LOG"
  fi
}
gen() {  # gen NAME PRESET RES MODE(native|davae) BATCH IMAGES [flags]
  local name=$1 preset=$2 res=$3 mode=$4 bs=$5 n=$6; shift 6
  local native=(); [ "$mode" = native ] && native=(--native)
  check "$name" python3 -m davae_cli generate --preset "$preset" --random-weights "${native[@]}" --res "$res" \
    --prompt "a lighthouse at dusk, photo" --num-images "$n" --batch-size "$bs" --out "$SCRATCH/$name" "${DEV[@]}" "$@" --json
}
# 1. generate, eager, batch 1 (3 images: the first batch warms up; the steady state is the other two)
for m in native davae; do gen "gen_${R1}_${m}_b1" $P1 $R1 $m 1 3 "${ST[@]}"; done
# 2. batch 10, the paper's setting (2 batches: the second is the steady state)
for m in native davae; do gen "gen_${R1}_${m}_b10" $P1 $R1 $m 10 20 "${ST[@]}"; done
# 3. 2048², batch 1
for m in native davae; do gen "gen_${R2}_${m}_b1" $P2 $R2 $m 1 2 "${ST[@]}"; done
# 4. compiled, 1024², batch 1 (the first image includes the compilation)
for m in native davae; do gen "gen_${R1}_${m}_b1_compile" $P1 $R1 $m 1 3 "${ST[@]}" --compile; done
# 5. bench with the text encoders at batch 10, and the SDPA backends (a few steps each)
check "bench_${R1}_b10_text" python3 -m davae_cli bench --preset $P1 --res $R1 --batch-size 10 --text-encoders \
  --repeats 2 --warmup 1 "${DEV[@]}" --json
for a in default flash efficient cudnn; do
  [ "${SMOKE:-0}" = 1 ] && [ $a != default ] && continue  # the fused kernels are CUDA-only
  check "bench_${R1}_attn_$a" python3 -m davae_cli bench --preset $P1 --res $R1 --sampling-steps 5 --no-decode \
    --attention $a --repeats 2 --warmup 1 "${DEV[@]}" --json
done
# 6. FLUX.1-dev (issue 15), full architecture, bf16: s = 4 at 4096² (native: 65,536 tokens, ~10 s a step, so
#    2 steps), s = 2 at 2048², and compiled; per-step times are what compare
if [ "${SMOKE:-0}" = 1 ]; then FX=(--preset tiny-flux --res 256); FX2=(--preset tiny-flux --res 128); else
  FX=(--preset flux-4096 --res 4096); FX2=(--preset flux-2048 --res 2048); fi
check "bench_flux_s4" python3 -m davae_cli bench "${FX[@]}" --sampling-steps 2 --repeats 1 --warmup 1 --no-decode "${DEV[@]}" --json
check "bench_flux_s2" python3 -m davae_cli bench "${FX2[@]}" --sampling-steps 5 --repeats 2 --warmup 1 --no-decode "${DEV[@]}" --json
check "bench_flux_s4_compile" python3 -m davae_cli bench "${FX[@]}" --sampling-steps 2 --repeats 1 --warmup 1 --no-decode \
  --compile "${DEV[@]}" --json
# 7. the decoders at 2048²: whole vs tiled (seam error, time, peak memory); the DA-VAE decoder too; FLUX's at 4096²
#    tiled only (the whole decode is what must not be needed)
for w in native davae; do
  check "tiled_decode_${R2}_$w" python3 benchmarks/tiled_decode.py --preset $TILE_PRESET --res $R2 --which $w \
    --tile 64 --tile 32 "${DEV[@]}"
done
if [ "${SMOKE:-0}" = 1 ]; then FT=(--preset tiny-flux --res 256); else FT=(--preset flux-4096 --res 4096); fi
check "tiled_decode_flux_davae" python3 benchmarks/tiled_decode.py "${FT[@]}" --which davae --no-whole --tile 64 "${DEV[@]}"
# 8. 2048², batch 10 (10 steps to fit the lease; per-step times are what compare), and compiled batch 1
for m in native davae; do gen "gen_${R2}_${m}_b10" $P2 $R2 $m 10 20 "${ST2[@]}"; done
for m in native davae; do gen "gen_${R2}_${m}_b1_compile" $P2 $R2 $m 1 2 "${ST[@]}" --compile; done
rm -rf "$SCRATCH"
echo "done in $((SECONDS - T0)) s: $(wc -l < "$RES") results in $RES" | tee -a "$LOG"
