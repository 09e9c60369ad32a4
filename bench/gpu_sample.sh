#!/usr/bin/env bash
# `dopsd sample` on a card (item 2 of the GPU list): bench/sample_latency.py on a real-size random-weight model
# at 1024 px (MODEL=flux2-klein-4b, the default, or MODEL=z-image-turbo), RUNS runs each (default 3): a plain
# `from_pretrained` plus pipeline call, a cold `dopsd sample` (new prompt; prompt seen before), and `dopsd
# sample` through a warm daemon at version depth 0, 1, 5 and 20. The weights are written first by
# bench/gpu_e2e.py --prepare-only. WHAT=moves runs bench/placement_moves.py on the same weights instead: a
# phase switch as a 16 or 24 GB card pays it (Module.to both ways against the kept pinned copies); one call
# each. JSON and log under $OUT. Needs wheels/ as bench/gpu_defaults.sh says.
set -u
OUT=${OUT:-/tmp/out}
MODEL=${MODEL:-flux2-klein-4b}
WHAT=${WHAT:-latency}
WORK=${WORK:-/tmp/dopsd-gpu-sample}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | tail -2
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
python3 bench/gpu_e2e.py --models "$MODEL" --prepare-only --work "$WORK" --out "$OUT/gpu_sample_prepare_$MODEL.json"
RECIPE=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['models'][sys.argv[2]]['recipe'])" \
  "$OUT/gpu_sample_prepare_$MODEL.json" "$MODEL")
if [ "$WHAT" = moves ]; then
  timeout 420 python3 bench/placement_moves.py --recipe "$RECIPE" --out "$OUT/placement_moves_$MODEL.json"
else
  RUNS=${RUNS:-3} timeout "${SAMPLE_TIMEOUT:-480}" python3 bench/sample_latency.py --recipe "$RECIPE" \
    --out "$OUT/sample_latency_$MODEL.json"
fi
} 2>&1 | grep --line-buffered -v -i -e warn -e "kept in float32" | tee "$OUT/gpu_sample_${WHAT}_$MODEL.log"
