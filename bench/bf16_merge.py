"""How much of a round's update survives merging into bf16 weights, and what that does to a picture.

On the toy model with its base in bf16 (CPU): train a D-OPSD delta (float32 adapters, as every round), then
  - weight error: || bf16(W + dW) - W - dW || / || dW || over the touched Linear weights (float32 sum,
    one rounding, as `WeightSwitcher` merges), for the toy recipe's lr and for the real klein recipe's 2e-5;
  - picture error: the same prompts and seeds sampled from the bf16 merged weights against the exact
    float32-adapter path (peft, unmerged), as mean |pixel difference| relative to the delta's own effect.
Writes bench/results/bf16_merge.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from benchinfo import machine  # noqa: E402

from dopsd_continual.families import klein  # noqa: E402
from dopsd_continual.families.klein import KleinBackend  # noqa: E402
from dopsd_continual.models import load_pipeline  # noqa: E402
from dopsd_continual.recipe import load_recipe, resolve_recipe_path  # noqa: E402
from dopsd_continual.stack import WeightSwitcher  # noqa: E402
from dopsd_continual.toy.packs import PACKS, pack_images  # noqa: E402
from dopsd_continual.training import train_delta  # noqa: E402


def main() -> None:
    recipe = load_recipe(resolve_recipe_path(None))
    pipe = load_pipeline(recipe, "cpu")
    pipe.transformer.to(torch.bfloat16)
    backend = KleinBackend(pipe, recipe)
    imgs = torch.from_numpy(pack_images("heart")).permute(0, 3, 1, 2).float() / 255
    feats = [backend.features(s.caption(), imgs[i]) for i, s in enumerate(PACKS["heart"].train)]
    prompts = [s.caption() for s in PACKS["heart"].train[:4]]
    emb = backend.encode(prompts).to(torch.bfloat16)
    b = len(prompts)
    ids = (backend.text_ids(b, emb.shape[1]), klein.latent_ids(b, backend.grid, "cpu"))
    noise = torch.randn(b, backend.grid[0] * backend.grid[1], 128, generator=torch.Generator().manual_seed(0))
    sigmas = backend.sigmas(recipe["model"]["steps"])
    modules = dict(pipe.transformer.named_modules())
    rows = []
    for lr in (float(recipe["train"]["lr"]), 2e-5):
        train = dict(recipe["train"], lr=lr, steps=60)
        delta = train_delta(backend, feats, [], train, "dopsd").delta
        base = {n: modules[n].weight.detach().float().clone() for n in delta.weights}
        sw = WeightSwitcher(pipe.transformer, mode="merge")  # the bf16 merge this bench measures
        x_base = klein.euler_sample(pipe.transformer, noise, sigmas, emb, *ids)
        sw.apply([delta])
        err = sum(float((modules[n].weight.float() - base[n] - delta.product(n)).norm() ** 2) for n in delta.weights) ** 0.5
        size = sum(float(delta.product(n).norm() ** 2) for n in delta.weights) ** 0.5
        x_merged = klein.euler_sample(pipe.transformer, noise, sigmas, emb, *ids)
        sw.apply([])
        x_exact = _unmerged(pipe.transformer, delta, noise, sigmas, emb, ids)
        effect = float((x_exact - x_base).abs().mean())
        rows.append({"lr": lr, "steps": 60, "weight_relative_error": err / max(size, 1e-30),
                     "latent_error_merged_vs_exact": float((x_merged - x_exact).abs().mean()),
                     "latent_effect_of_delta": effect})
        print(rows[-1], flush=True)
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "model": "toy-shapes, transformer in bf16",
           "rows": rows}
    (REPO / "bench" / "results" / "bf16_merge.json").write_text(json.dumps(out, indent=2))


def _unmerged(transformer, delta, noise, sigmas, emb, ids):
    """The delta as a float32 peft adapter on the bf16 base: the exact path (what an exported LoRA does)."""
    from bf16_versions import _peft

    return _peft(transformer, delta, lambda: klein.euler_sample(transformer, noise, sigmas, emb, *ids))


if __name__ == "__main__":
    main()
