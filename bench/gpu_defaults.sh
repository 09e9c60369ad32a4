#!/usr/bin/env bash
# The default round on capped cards: bench/gpu_e2e.py with the recipes' own gate (every default prompt and
# seed at 1024 px), klein-4B capped at 14.5 GiB (a 16 GB card) and Z-Image at 22 GiB (a 24 GB card), training
# shortened. Klein first: its numbers land even if Z-Image runs out of time. The JSON and the log come back
# under $OUT. Needs wheels/ (git-ignored): diffusers 0.42.1 and what the CLI needs beyond the card's image
# (sqlite-utils, sqlite-fts4, click-default-group, lazy-importer, watchdog, apscheduler, tzlocal,
# pillow-heif, starlette, uvicorn), as py3.12 wheels.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | tail -2
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
PYTHONUNBUFFERED=1 timeout "${E2E_TIMEOUT:-440}" python3 bench/gpu_e2e.py --steps "${STEPS:-3}" \
  --caps "${CAPS:-flux2-klein-4b=14.5,z-image-turbo=22}" --timeout 400 --out "$OUT/gpu_e2e_defaults.json"
} 2>&1 | grep --line-buffered -v -i -e warn -e "kept in float32" | tee "$OUT/gpu_e2e_defaults.log"
