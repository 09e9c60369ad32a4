#!/usr/bin/env bash
# Where klein-4B's default round runs out of 14.5 GiB: bench/gpu_e2e.py (klein only, the recipe's gate) once
# through bench/oom_probe.py, which writes the live blocks at the out-of-memory under $OUT, then once with
# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True. Needs wheels/ as bench/gpu_defaults.sh says.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | tail -2
args=(--models flux2-klein-4b --steps 3 --caps flux2-klein-4b=14.5 --no-uncapped-retry --work /tmp/probe)
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
E2E_ENTRY=bench/oom_probe.py OOM_OUT="$OUT" PYTHONUNBUFFERED=1 timeout 150 python3 bench/gpu_e2e.py "${args[@]}" \
  --timeout 140 --out "$OUT/probe_plain.json"
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 timeout "${B_TIMEOUT:-230}" python3 bench/gpu_e2e.py \
  "${args[@]}" --timeout 220 --out "$OUT/probe_expandable.json"
} 2>&1 | grep --line-buffered -v -i -e warn -e "kept in float32" | tee "$OUT/probe.log"
