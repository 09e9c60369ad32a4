#!/usr/bin/env bash
# Train the toy-shapes model on a lent GPU in one go and bring the results back under $OUT.
# Needs: wheels/diffusers-*.whl (git-ignored; `pip download --no-deps -d wheels diffusers==0.42.1`).
# TOY_ARGS passes more options to the training script, e.g. TOY_ARGS="--vae-down 4 --loose 0.3" for the
# 8x8-token model with loose captions (about twice the compute per sample: scale the budgets with it).
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | tail -2
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date -u
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
PYTHONUNBUFFERED=1 python3 -m dopsd_continual.toy.scorer --out runs/toy_model --n ${SCORER_N:-32000} --epochs ${SCORER_EPOCHS:-10} --workers ${WORKERS:-16} --device ${DEVICE:-cuda}
} 2>&1 | grep --line-buffered -v -i warn | tee "$OUT/scorer.log"
PYTHONUNBUFFERED=1 timeout "${TRAIN_TIMEOUT:-540}" python3 -m dopsd_continual.toy.train --stage all \
  --workdir runs/toy --out runs/toy_model --scorer runs/toy_model --device ${DEVICE:-cuda} --pool ${POOL:-40000} --workers ${WORKERS:-16} \
  --batch ${BATCH:-512} --batch-distill ${BATCH:-512} --budget vae=${VAE_S:-65} --budget base=${BASE_S:-215} --budget distill=${DISTILL_S:-125} \
  ${TOY_ARGS:-} \
  2>&1 | grep --line-buffered -v -i warn | tee "$OUT/train.log"
cp runs/toy/eval.json runs/toy/samples.png runs/toy/progress.json "$OUT/" 2>/dev/null
python3 - <<'PY'
import os, torch
from safetensors.torch import load_file, save_file
sd = load_file("runs/toy/transformer_base.safetensors")
save_file({k: v.half() for k, v in sd.items()}, os.environ.get("OUT", "/tmp/out") + "/transformer_base_fp16.safetensors")
PY
tar czf /tmp/toy_model.tgz -C runs toy_model && split -b 12M /tmp/toy_model.tgz "$OUT/toy_model.tgz.part-"
ls -la "$OUT"
