#!/usr/bin/env bash
# The second design sweep of BENCHMARKS.md ("Tokenizer design sweep"); the first ran the same script with
# the configurations listed there. Needs the staged inputs (see sweep.py) and diffusers wheels in .whl/.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/sw
nvidia-smi --query-gpu=name --format=csv > "$OUT/env.txt"
python3 benchmarks/tiny_sweep/sweep.py --name cachebuild --steps 0 --out /tmp/sw > /tmp/sw/cachebuild.log 2>&1 || { tail -20 /tmp/sw/cachebuild.log > "$OUT/logs.txt"; exit 1; }
S="--steps 15000 --every 2500 --out /tmp/sw"
r() { n=$1; shift; timeout 250 python3 benchmarks/tiny_sweep/sweep.py --name $n $S "$@" > /tmp/sw/$n.log 2>&1 & }
r pix_lr3 --design pix --lr 3e-4
r pix_lr3_a01 --design pix --lr 3e-4 --align 0.1
r pixz_lr5 --design pixz
r pixz_lr3 --design pixz --lr 3e-4
r pix_lr5_seed1 --design pix --seed 1
r pix_lr5_c256 --design pix --crop 256 --bs 4
r pixz_lr3_a0 --design pixz --lr 3e-4 --align 0
r pix_lr3_deep --design pix --lr 3e-4 --eb 4 --db 4
wait
for f in /tmp/sw/*.log; do echo "== $f"; grep -v -i "warn\|config attr" $f | tail -12; done > "$OUT/logs.txt"
python3 -c "
import json, glob
print(json.dumps({p.split('/')[-1][:-5]: json.load(open(p)) for p in glob.glob('/tmp/sw/*.json')}))" > "$OUT/sweep.json"
