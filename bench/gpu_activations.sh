#!/usr/bin/env bash
# bench/gpu_activations.py on a lent GPU: the JSON and the log come back under $OUT.
# Needs: wheels/diffusers-*.whl (git-ignored; `pip download --no-deps -d wheels diffusers==0.42.1`).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | tail -2
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
PYTHONUNBUFFERED=1 timeout "${ACT_TIMEOUT:-420}" python3 bench/gpu_activations.py --batches 1,2,4,8,16 \
  --decode-batches 1,2,4,8 --cold --out "$OUT/gpu_activations.json"
} 2>&1 | grep --line-buffered -v -i -e warn -e "kept in float32" -e "Writing model" | tee "$OUT/gpu_activations.log"
