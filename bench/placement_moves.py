"""What a phase switch costs where the card cannot hold every component at once (a 16 or 24 GB card): the
switch from the text encoder's phase to sampling's (transformer and VAE arrive, the text encoder leaves) and
back, on a recipe's real-size pipeline, two ways in one run:

- to:      each component copied back with Module.to("cpu") when it leaves and to the card when it comes
           (how components moved before);
- pinned:  placement.Placement as it runs: a component's copy is made in pinned slabs the first time it
           leaves (its first switch back, reported apart), then each leaves onto it with no copy at all (nothing
           changed on the card) and comes back from pinned memory, asynchronously.

Medians of --cycles switches each way, seconds, and the bytes that cross; the result file is written after each
way. Needs a GPU: on a CPU nothing moves and the result says so. `python bench/placement_moves.py --recipe PATH [--cycles 5] [--out FILE]`
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchinfo import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def nbytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "placement_moves.json"))
    a = ap.parse_args()

    import torch

    from dopsd_continual.models import load_pipeline
    from dopsd_continual.placement import PHASES, Placement, compute_device
    from dopsd_continual.recipe import load_recipe

    recipe = load_recipe(Path(a.recipe))
    device = compute_device()
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "recipe": recipe["model"]["name"],
              "device": str(device), "cycles": a.cycles}
    if device.type != "cuda":
        result["note"] = "no GPU: Placement moves nothing on a CPU, so there is nothing to time"
        Path(a.out).write_text(json.dumps(result, indent=2))
        print(result["note"])
        return
    pipe = load_pipeline(recipe, device)
    parts = {n: m for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    result["gib"] = {n: round(nbytes(m) / 2**30, 3) for n, m in parts.items()}
    crossing = {"sample": sum(nbytes(parts[n]) for n in PHASES["sample"] if n in parts),
                "encode": sum(nbytes(parts[n]) for n in PHASES["encode"] if n in parts)}
    result["gib_arriving"] = {k: round(v / 2**30, 3) for k, v in crossing.items()}

    def old_use(phase: str) -> None:  # the plain way: copied back to CPU memory, copied to the card
        for n, m in parts.items():
            if n not in PHASES[phase]:
                m.to("cpu")
        torch.cuda.empty_cache()
        for n in PHASES[phase]:
            if n in parts:
                parts[n].to(device)

    def timed(use, phase: str) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        use(phase)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    def run(use) -> dict:
        first = timed(use, "sample")
        first_back = timed(use, "encode")
        times = {"sample": [], "encode": []}
        for _ in range(a.cycles):
            for phase in ("sample", "encode"):
                times[phase].append(timed(use, phase))
        out = {"first_switch_s": round(first, 3), "first_switch_back_s": round(first_back, 3)}
        for phase, ts in times.items():
            med = statistics.median(ts)
            out[f"to_{phase}_s"] = round(med, 3)
            out[f"to_{phase}_gb_per_s_arriving"] = round(crossing[phase] / 1e9 / med, 1)
        return out

    result["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name()}
    old_use("idle")
    result["to"] = run(old_use)
    print("to", result["to"], flush=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    old_use("idle")
    pinned = Placement(pipe, device)
    result["pinned"] = run(pinned.use)
    result["pinned"]["pinned_gib"] = round(pinned.pinned_bytes / 2**30, 3)
    print("pinned", result["pinned"], flush=True)
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
