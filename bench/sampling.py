"""Sampling latency vs LoRA stack depth (1, 4, 16), merged vs unmerged, on the toy model, on this CPU.

Merged: the version's chain folded into the weights (what `dopsd sample` does). Unmerged: every delta
live as a peft adapter. Median of N 4-step 64x64 samples after warm-up. Writes bench/results/sampling.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from benchinfo import machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopsd_continual.lora import Delta, merge_into, resolve_targets  # noqa: E402
from dopsd_continual.models import load_pipeline  # noqa: E402
from dopsd_continual.recipe import load_recipe, resolve_recipe_path  # noqa: E402

PROMPT = "a large red circle in the center, blue background"


def random_delta(tr, targets, rank, seed) -> Delta:
    g = torch.Generator().manual_seed(seed)
    mods = dict(tr.named_modules())
    w = {}
    for n in resolve_targets(tr, targets):
        lin = mods[n]
        w[n] = (torch.randn(rank, lin.in_features, generator=g) * 0.01, torch.randn(lin.out_features, rank, generator=g) * 0.01)
    return Delta(w, 1.0)


def time_calls(pipe, n) -> float:
    kw = dict(prompt=PROMPT, num_inference_steps=4, height=64, width=64, max_sequence_length=40,
              text_encoder_out_layers=(1, 2, 3), guidance_scale=1.0)
    for _ in range(3):
        pipe(generator=torch.Generator("cpu").manual_seed(0), **kw)
    ts = []
    for i in range(n):
        t = time.perf_counter()
        pipe(generator=torch.Generator("cpu").manual_seed(i), **kw)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    n = int(os.environ.get("N", "30"))
    recipe = load_recipe(resolve_recipe_path(None))
    pipe = load_pipeline(recipe, "cpu")
    tr = pipe.transformer
    targets = recipe["train"]["targets"]
    base_sd = {k: v.clone() for k, v in tr.state_dict().items()}
    out = {"machine": machine(),
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "samples_per_point": n, "rows": []}
    base = time_calls(pipe, n)
    out["base_s"] = base
    print(f"base: {base * 1000:.1f} ms", flush=True)
    from peft import LoraConfig

    for depth in (1, 4, 16):
        deltas = [random_delta(tr, targets, 8, s) for s in range(depth)]
        tr.load_state_dict(base_sd)
        merge_into(tr, deltas)
        merged = time_calls(pipe, n)
        tr.load_state_dict(base_sd)
        names = []
        for i, d in enumerate(deltas):
            cfg = LoraConfig(r=8, lora_alpha=8, target_modules=sorted(d.weights))
            name = f"d{i}"
            tr.add_adapter(cfg, adapter_name=name)
            names.append(name)
            with torch.no_grad():
                for mn, p in tr.named_parameters():
                    for kind, slot in ((f".lora_A.{name}.weight", 0), (f".lora_B.{name}.weight", 1)):
                        if mn.endswith(kind):
                            p.copy_(d.weights[mn[: -len(kind)].replace(".base_layer", "")][slot])
        tr.set_adapters(names)
        unmerged = time_calls(pipe, n)
        tr.unload_lora()
        row = {"depth": depth, "merged_s": merged, "unmerged_s": unmerged, "merged_vs_base": merged / base,
               "unmerged_vs_base": unmerged / base}
        out["rows"].append(row)
        print(f"depth {depth}: merged {merged * 1000:.1f} ms ({merged / base:.3f}x base), "
              f"unmerged {unmerged * 1000:.1f} ms ({unmerged / base:.3f}x)", flush=True)
    path = Path(__file__).parent / "results" / "sampling.json"
    path.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
