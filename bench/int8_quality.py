"""What storing the frozen base weights in 8 bits during a round (`train.base_weights = "int8"`) costs in
quality, on toy-shapes: for every concept pack and seed, the recipe's default D-OPSD round from the shipped
model with native (float32) and with int8 base weights, both scored at 4 steps by the ground-truth scorer
(concept fidelity on the pack's evaluation captions, retention on held-out captions), plus how far apart
the two trained updates are. The toy model runs in float32, so int8 is a larger step down here than from a
real model's bf16.

Writes bench/results/int8_quality.json and its block in docs/RESULTS.md. SEEDS (default 2).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchinfo import machine

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_table import pack_features, replace_section, score, setup_toy  # noqa: E402

from dopsd_continual.lora import merge_into  # noqa: E402
from dopsd_continual.toy.packs import PACKS  # noqa: E402
from dopsd_continual.training import train_delta  # noqa: E402


def update_distance(a, b) -> float:
    """Relative distance between two deltas' full updates B A, over all modules."""
    num = den = 0.0
    for n, (a1, b1) in a.weights.items():
        a2, b2 = b.weights[n]
        u = b1 @ a1
        num += float((b2 @ a2 - u).norm() ** 2)
        den += float(u.norm() ** 2)
    return (num / den) ** 0.5


def main() -> None:
    seeds = int(os.environ.get("SEEDS", "2"))
    recipe, pipe, backend, clf, base_sd = setup_toy()
    out_path = Path(__file__).parent / "results" / "int8_quality.json"
    out = {"machine": machine(),
           "date": time.strftime("%Y-%m-%d"), "recipe_train": recipe["train"], "rows": []}
    for name in PACKS:
        feats = pack_features(backend, name)
        for seed in range(seeds):
            deltas = {}
            for weights in ("native", "int8"):
                pipe.transformer.load_state_dict(base_sd)
                t = time.time()
                res = train_delta(backend, feats, [], dict(recipe["train"], seed=seed, base_weights=weights), "dopsd")
                secs = time.time() - t
                merge_into(pipe.transformer, [res.delta])
                deltas[weights] = res.delta
                row = {"concept": name, "seed": seed, "base_weights": weights, "seconds": secs,
                       **score(pipe, clf, name, seed)}
                out["rows"].append(row)
                print(row, flush=True)
            out["rows"][-1]["update_distance_to_native"] = update_distance(deltas["native"], deltas["int8"])
            out_path.write_text(json.dumps(out, indent=2))
    pipe.transformer.load_state_dict(base_sd)
    write_md(out)


def write_md(out: dict) -> None:
    lines = [f"Measured by `python bench/int8_quality.py` on {out['machine']}, {out['date']}; raw rows in "
             "`bench/results/int8_quality.json`. The recipe's default D-OPSD round from the shipped model, with the "
             "frozen base weights native (float32) or int8 during the round; mean over seeds, scored at 4 steps.",
             "", "| concept | base weights | concept fidelity | retention | sharpness | update distance to native |",
             "|---|---|---|---|---|---|"]
    for name in PACKS:
        for weights in ("native", "int8"):
            rs = [r for r in out["rows"] if r["concept"] == name and r["base_weights"] == weights]
            m = {k: statistics.mean(r[k] for r in rs) for k in ("concept_fidelity", "retention", "sharpness")}
            dist = f"{statistics.mean(r['update_distance_to_native'] for r in rs):.3f}" if weights == "int8" else "-"
            lines.append(f"| {name} | {weights} | {m['concept_fidelity']:.3f} | {m['retention']:.3f} | {m['sharpness']:.3f} | {dist} |")
    replace_section("int8_quality", "\n".join(lines))


if __name__ == "__main__":
    main()
