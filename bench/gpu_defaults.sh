#!/usr/bin/env bash
# The default round on capped cards: bench/gpu_e2e.py with the recipes' own gate (every default prompt and
# seed at 1024 px), klein-4B capped at 14.5 GiB (a 16 GB card) or Z-Image at 22 GiB (a 24 GB card), training
# shortened. One model per call (MODEL=flux2-klein-4b, the default, or MODEL=z-image-turbo): klein's round
# takes about 5 minutes on an H200, Z-Image's more than 7, so each needs its own 10-minute call. The JSON and
# the log come back under $OUT. Needs wheels/ (git-ignored): diffusers 0.42.1 and what the CLI needs beyond
# the card's image (sqlite-utils, sqlite-fts4, click-default-group, lazy-importer, watchdog, apscheduler,
# tzlocal, pillow-heif, starlette, uvicorn), as py3.12 wheels.
set -u
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-flux2-klein-4b}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | tail -2
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
PYTHONUNBUFFERED=1 timeout "${E2E_TIMEOUT:-570}" python3 bench/gpu_e2e.py --models "$MODEL" --steps "${STEPS:-3}" \
  --caps "${CAPS:-flux2-klein-4b=14.5,z-image-turbo=22}" --timeout "${COMMAND_TIMEOUT:-540}" \
  --no-uncapped-retry --out "$OUT/gpu_e2e_defaults_$MODEL.json"
} 2>&1 | grep --line-buffered -v -i -e warn -e "kept in float32" | tee "$OUT/gpu_e2e_defaults_$MODEL.log"
