"""The gate's cost per round against the size of the drop: 8 new pairs against 500, on the toy model.

Each case is a fresh state with N generated pairs ingested and one round (the toy recipe, shortened to
--steps optimiser steps so the training part stays small; the gate at the recipe's own settings). Reported:
the round's gate seconds, how many samples the round took and trained on, and how many captions the gate
drew. The gate samples at most rounds.GATE_CONCEPTS of the round's captions, so its cost should not grow
with the drop. Writes bench/results/gate_cost.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from benchinfo import machine  # noqa: E402

from dopsd_continual.ingest import ingest_paths  # noqa: E402
from dopsd_continual.rounds import GATE_CONCEPTS, run_round  # noqa: E402
from dopsd_continual.store import init_state  # noqa: E402

CAPTIONS = ["a large red circle in the center, blue background", "a small green square on the left, white background",
            "two yellow triangles at the top, black background", "a blue heart in the center, white background"]


def case(n: int, steps: int, root: Path) -> dict:
    drop = root / "drop"
    drop.mkdir(parents=True)
    rng = np.random.default_rng(n)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(drop / f"p{i:04d}.png")
        (drop / f"p{i:04d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)], encoding="utf-8")
    import os

    os.environ["DOPSD_STABILITY_SECONDS"] = "0"
    st = init_state(root / "s", None, [drop])
    try:
        assert len(ingest_paths(st).queued) == n
        t0 = time.perf_counter()
        r = run_round(st, steps=steps)
        m = r["metrics"]
        return {"new_pairs": n, "round_s": time.perf_counter() - t0, "gate_s": m["gate_seconds"],
                "samples_taken": m["samples_taken"], "samples_trained": m["samples_trained"],
                "gate_captions": min(GATE_CONCEPTS, m["samples_taken"]), "verdict": r["verdict"]}
    finally:
        st.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="8,500")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gate_cost.json"))
    a = ap.parse_args()
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "model": "toy-shapes (CPU)",
              "train_steps": a.steps, "rows": []}
    for n in [int(x) for x in a.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="dopsd-gate-cost-") as tmp:
            row = case(n, a.steps, Path(tmp))
        result["rows"].append(row)
        print(row, flush=True)
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
