"""What a state keeps on disk per sample and per version for the shipped real-model recipes, at their
defaults, from the real-size module trees on `meta` (no weights needed).

Per sample (the feature cache, store.save_compact: a bf16 model's values stored as bf16):
  the student's and the teacher's text condition at the lengths the transformer sees them (klein: padded to
  max_sequence_length, as its pipeline feeds them; Z-Image: a prompt's own tokens, counted here at a long
  prompt's 128, and the VL teacher's bounded image patches), and the target's latent tokens.
Per version: the delta (float32 A and B on every target layer, lora.Delta.save), and the gate's pictures of
  one version (held-out prompts x seeds, the few-step gap's 16, the round's concept pictures), stored as bf16.
And what the retention policy keeps of them (recipe [retention], train.replay_pool).

    python bench/disk_sizes.py      # writes bench/results/disk_sizes.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchinfo import machine  # noqa: E402

from dopsd_continual import memory  # noqa: E402
from dopsd_continual.gate import held_out_prompts  # noqa: E402
from dopsd_continual.recipe import RECIPES_DIR, load_recipe  # noqa: E402
from dopsd_continual.rounds import GATE_CONCEPTS  # noqa: E402

SHIPPED = ("flux2-klein-4b", "flux2-klein-9b", "z-image-turbo")
MB = 2**20
BF16 = 2


def text_values(cond) -> int:
    """Values of the text condition in a family's meta `cond` for one picture: its first floating tensor."""
    flat = list(cond) if isinstance(cond, (list, tuple)) else [cond]
    return next(t.numel() for t in flat if t is not None and t.dtype.is_floating_point)


def sizes(name: str) -> dict:
    recipe = load_recipe(RECIPES_DIR / f"{name}.toml")
    parts = memory.meta_modules(recipe, ("transformer", "vae"))
    x, cond = memory._inputs(recipe, parts, 1, memory.text_len(recipe))
    _, tcond = memory._inputs(recipe, parts, 1, memory.teacher_text_len(recipe))
    per_sample = (text_values(cond) + text_values(tcond) + x.numel()) * BF16
    delta = memory.lora_parameters(parts["transformer"], recipe["train"]) * 4
    m, g = recipe["model"], recipe["gate"]
    picture = 3 * m["height"] * m["width"] * BF16
    held = len(held_out_prompts(recipe)) * len(g["seeds"])
    gate_pictures = held + 16 + 3 * GATE_CONCEPTS
    pool = int(recipe["train"]["replay_pool"])
    return {
        "height": m["height"], "width": m["width"], "rank": recipe["train"]["rank"],
        "student_text_tokens": memory.text_len(recipe), "teacher_text_tokens": memory.teacher_text_len(recipe),
        "per_sample_mb": {"student_text": round(text_values(cond) * BF16 / MB, 2),
                          "teacher_text": round(text_values(tcond) * BF16 / MB, 2),
                          "latents": round(x.numel() * BF16 / MB, 2), "total": round(per_sample / MB, 2)},
        "per_version_mb": {"delta": round(delta / MB, 1), "gate_pictures": round(gate_pictures * picture / MB, 1),
                           "gate_pictures_count": gate_pictures},
        "kept": {"replay_pool": pool, "replay_features_mb": round(pool * per_sample / MB, 1),
                 "note": "features: the queue's and the replay pool's; gate pictures: the active version's (others "
                         f"after {recipe['retention']['gate_days']} day); deltas: every accepted version's, "
                         f"rejected ones for {recipe['retention']['rejected_days']} days"},
    }


def main() -> None:
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
           "method": "arithmetic on the real-size module trees on `meta` (dopsd_continual/configs), at each "
                     "recipe's defaults", "recipes": {}}
    for name in SHIPPED:
        out["recipes"][name] = s = sizes(name)
        print(f"{name}: per sample {s['per_sample_mb']['total']} MB ({s['per_sample_mb']}), per version: delta "
              f"{s['per_version_mb']['delta']} MB, gate pictures {s['per_version_mb']['gate_pictures']} MB; "
              f"replay pool of {s['kept']['replay_pool']}: {s['kept']['replay_features_mb']} MB", flush=True)
    path = REPO / "bench" / "results" / "disk_sizes.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
