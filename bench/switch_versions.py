"""Switching versions on real-size FLUX.2-klein-4B layers: seconds and peak host memory at chain depth 1, 5 and 20.

Real-size blocks of klein-4B (one double-stream and one single-stream block, bf16, random weights) carry the
recipe's LoRA targets at rank 64; a chain of `depth` random rank-64 deltas is switched onto them:
  - unmerged (the product on a bf16 base, stack.WeightSwitcher): the chain's factors stacked, squashed to
    4x the rounds' rank past it; no weight is written, nothing of a whole weight's size is built;
  - merged on the host (how versions were switched before, and still how a float32 base merges): the
    touched base weights kept in host memory, base + sum(B @ A) built in float32 per weight, rounded to bf16.
Each (way, depth) runs in a fresh process; peak host memory is its ru_maxrss above the memory held once the
blocks were built. Writes bench/results/switch_versions.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def one(way: str, depth: int) -> dict:
    import torch
    from diffusers.models.transformers.transformer_flux2 import (
        Flux2SingleTransformerBlock,
        Flux2TransformerBlock,
    )

    from dopsd_continual.lora import Delta, resolve_targets
    from dopsd_continual.recipe import RECIPES_DIR, load_recipe
    from dopsd_continual.stack import CHAIN_RANK_FACTOR, WeightSwitcher

    torch.manual_seed(0)
    recipe = load_recipe(RECIPES_DIR / "flux2-klein-4b.toml")
    dim, heads = 3072, 24
    with torch.device("cpu"):
        torch.set_default_dtype(torch.bfloat16)
        model = torch.nn.ModuleDict({
            "transformer_blocks": torch.nn.ModuleList([Flux2TransformerBlock(dim, heads, 128, mlp_ratio=3.0)]),
            "single_transformer_blocks": torch.nn.ModuleList([Flux2SingleTransformerBlock(dim, heads, 128, mlp_ratio=3.0)]),
        })
        torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    model.dtype = torch.bfloat16  # what WeightSwitcher reads to choose its way
    names = resolve_targets(model, recipe["train"]["targets"])
    modules = dict(model.named_modules())
    rank = int(recipe["train"]["rank"])
    g = torch.Generator().manual_seed(1)
    chain = [Delta({n: (torch.randn(rank, modules[n].in_features, generator=g) * 1e-3,
                        torch.randn(modules[n].out_features, rank, generator=g) * 1e-3) for n in names}, 2.0)
             for _ in range(depth)]
    weights = sum(modules[n].weight.numel() for n in names)
    before = rss_mib()
    sw = WeightSwitcher(model, mode=way)
    t = time.perf_counter()
    sw.apply(chain)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    term = sum(m._buffers[k].numel() * m._buffers[k].element_size() for m in modules.values()
               for k in ("chain_A", "chain_B") if k in m._buffers)
    return {"way": way, "depth": depth, "switch_s": seconds, "peak_host_mib_above_model": max(0.0, peak - before),
            "touched_weights": weights, "touched_weights_bf16_mib": weights * 2 / 2**20,
            "kept_base_mib": sum(b.numel() * b.element_size() for b in sw.base.values()) / 2**20,
            "term_mib": term / 2**20, "stacked_rank": depth * rank, "max_chain_rank": CHAIN_RANK_FACTOR * rank}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="1,5,20")
    ap.add_argument("--ways", default="unmerged,merge")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "switch_versions.json"))
    a = ap.parse_args()
    if a.one:
        way, depth = a.one.split(":")
        print(json.dumps(one(way, int(depth))))
        return
    import torch
    from benchinfo import machine

    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "layers": "klein-4B: one double-stream + one single-stream block, bf16, the recipe's targets at rank 64",
              "rows": []}
    for depth in [int(d) for d in a.depths.split(",")]:
        for way in a.ways.split(","):
            p = subprocess.run([sys.executable, __file__, "--one", f"{way}:{depth}"], capture_output=True, text=True)
            if p.returncode != 0:
                row = {"way": way, "depth": depth, "error": p.stderr.strip().splitlines()[-1:]}
            else:
                row = json.loads(p.stdout.strip().splitlines()[-1])
            result["rows"].append(row)
            print(row, flush=True)
            Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
