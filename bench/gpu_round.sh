#!/usr/bin/env bash
# Measure bench/gpu_round.py on a lent GPU and bring the JSON and the log back under $OUT.
# Needs: wheels/diffusers-*.whl (git-ignored; `pip download --no-deps -d wheels diffusers==0.42.1`).
# Klein first (its numbers land even if the Z-Image half runs out of time).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | tail -2
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
PYTHONUNBUFFERED=1 timeout "${ROUND_TIMEOUT:-480}" python3 bench/gpu_round.py --steps "${STEPS:-3}" --out "$OUT/gpu_round.json"
} 2>&1 | grep --line-buffered -v -i warn | tee "$OUT/gpu_round.log"
