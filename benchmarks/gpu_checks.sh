#!/usr/bin/env bash
# The GPU checks of issues 4 and 6, in one run on a lent H100/H200 (see BENCHMARKS.md for the results).
# Needs diffusers (and importlib_metadata) as wheels in .whl/ when the machine lacks them. Writes to $OUT.
set -u
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; git rev-parse HEAD 2>/dev/null; date -u;
  python3 -c "import torch, diffusers, peft; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__)"; } > "$OUT/env.txt" 2>&1
b() { echo "== bench $*"; python3 -m davae_cli bench "$@" --json; }
python3 benchmarks/sd35_lora_step.py > "$OUT/lora_step.json" || echo "lora step failed"
python3 benchmarks/sd35_lora_step.py --no-checkpointing --steps 3 > "$OUT/lora_step_nockpt.json" || echo "lora step (no checkpointing) failed"
b --preset sd35m-1024 --res 1024 > "$OUT/bench_1024.json"
b --preset sd35m-2048 --res 2048 > "$OUT/bench_2048.json"
b --preset sd35m-1024 --res 1024 --no-decode --compile > "$OUT/bench_1024_compile.json"
b --preset sd35m-1024 --res 1024 --no-decode --compile --compile-mode reduce-overhead > "$OUT/bench_1024_cudagraphs.json"
b --preset sd35m-2048 --res 2048 --no-decode --compile > "$OUT/bench_2048_compile.json"
echo done
