"""GPU memory per phase of the shipped real-model recipes from the product's accountant, and its error.

`dopsd_continual.memory` plans each phase from the real-size module trees on `meta` (resident bytes) and
activations counted by running the phase's own forward on `meta`. Here:
  1. every peak measured on a card (bench/results/gpu_activations.json: the sampling call, the VAE decode
     and the text encoder at several batches; bench/results/gpu_e2e.json: the product's own round and
     `dopsd sample`) is set beside the accountant's figure for the same shapes, with the error;
  2. the calibration factors that would fit the measurements best are printed beside the ones the
     product uses (memory.CALIBRATION);
  3. each shipped recipe is planned at its defaults for a 16 GB card (14.5 GiB usable), a 24 GB card
     (22 GiB) and a 48 GB card (46 GiB): the batches the product would run at and each phase's GiB.
Writes bench/results/memory_plan.json. tests/test_memory.py holds the errors within 15%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dopsd_continual import memory  # noqa: E402
from dopsd_continual.doctor import usable_gib  # noqa: E402
from dopsd_continual.recipe import RECIPES_DIR, load_recipe  # noqa: E402

RESULTS = REPO / "bench" / "results"
CARDS = {f"{gb}gb": usable_gib(gb) for gb in (16, 24, 48)}  # 14.5, 22 and 46 GiB: what `dopsd doctor --card-gb` plans with
SHIPPED = ("flux2-klein-4b", "z-image-turbo", "flux2-klein-9b")


def gpu_e2e_recipe(name: str) -> dict:
    """The recipe gpu_e2e ran: the shipped one (its round shortened; training settings as shipped)."""
    return load_recipe(RECIPES_DIR / f"{name}.toml")


def compare(name: str, acct: memory.Accountant, act: dict, e2e: dict) -> list[dict]:
    """[{what, measured_gib, planned_gib, error}] for every measured peak of this model."""
    rows = []
    s = acct.sizes
    sample_res = s["transformer"] + s["vae"]
    p = acct.plan(0)
    sf, sp = acct.linear("sample", lambda b: memory.sample_bytes(acct.recipe, acct.parts, b))
    df, dp = acct.linear("decode", lambda b: memory.decode_bytes(acct.recipe, acct.parts, b))
    ef, ep = acct.linear("encode", lambda b: memory.encode_bytes(acct.recipe, acct.parts, b))
    m = act.get("models", {}).get(name, {})
    for b, r in m.get("transformer", {}).items():
        if "peak_gib" in r:
            rows.append({"what": f"sampling call, {b} pictures (gpu_activations)", "measured_gib": r["peak_gib"],
                         "planned_gib": sample_res + sf + sp * int(b), "phase": "sample",
                         "counted_activation_gib": sp * int(b) + sf, "measured_activation_gib": r["peak_gib"] - r["resident_gib"]})
    for b, r in m.get("decode", {}).items():
        if "peak_gib" in r:
            rows.append({"what": f"VAE decode, {b} pictures (gpu_activations)", "measured_gib": r["peak_gib"],
                         "planned_gib": sample_res + df + dp * int(b), "phase": "decode",
                         "counted_activation_gib": df + dp * int(b), "measured_activation_gib": r["peak_gib"] - r["resident_gib"]})
    for b, r in m.get("encode", {}).items():
        rows.append({"what": f"text encoder, {b} prompts (gpu_activations)", "measured_gib": r["peak_gib"],
                     "planned_gib": s["text_encoder"] + ef + ep * int(b), "phase": "encode",
                     "counted_activation_gib": ef + ep * int(b), "measured_activation_gib": r["peak_gib"] - r["resident_gib"]})
    row = e2e.get("models", {}).get(name, {})
    phases = row.get("round", {}).get("phases", {})
    if phases.get("train", {}).get("peak_gib"):
        rows.append({"what": "round's train phase, batch 1 (gpu_e2e)", "measured_gib": phases["train"]["peak_gib"],
                     "planned_gib": p.phases["train"] - acct.chain_term_gib(), "phase": "train"})  # it trained from v0
    if phases.get("features", {}).get("peak_gib"):
        planned = p.phases["features"]
        if "teacher_encoder" in s:  # the measured run held the text encoder and Qwen3-VL's copy of it at once
            planned += s["text_encoder"]
        rows.append({"what": "round's features phase (gpu_e2e" + (", two copies of Qwen3-4B then" if "teacher_encoder" in s
                     else "") + ")", "measured_gib": phases["features"]["peak_gib"], "planned_gib": planned, "phase": "features"})
    if phases.get("gate", {}).get("peak_gib"):  # 2 prompts x 2 seeds: 4 pictures a call, decoded 2 at a time
        sample_act = max(sf + 4 * sp, df + 2 * dp)
        if name.startswith("flux2-klein"):
            sample_act = max(sample_act, memory.sample_bytes(acct.recipe, acct.parts, 1, True) / memory.GIB)
        rows.append({"what": "round's gate, 4 pictures a call (gpu_e2e)", "measured_gib": phases["gate"]["peak_gib"],
                     "planned_gib": sample_res + sample_act, "phase": "gate"})
    shot = row.get("sample", {}).get("phases", {}).get("sample", {})
    if shot.get("peak_gib"):
        rows.append({"what": "`dopsd sample`, 1 picture (gpu_e2e)", "measured_gib": shot["peak_gib"],
                     "planned_gib": sample_res + max(sf + sp, df + dp), "phase": "sample"})
    for r in rows:
        r["error"] = r["planned_gib"] / r["measured_gib"] - 1
    return rows


def fitted_calibration(rows: list[dict]) -> dict:
    """The factor per phase that would make counted activations match the measured ones (median ratio)."""
    out = {}
    for phase in ("sample", "decode", "encode"):
        ratios = [r["measured_activation_gib"] / (r["counted_activation_gib"] / memory.CALIBRATION[phase])
                  for r in rows if r.get("phase") == phase and r.get("counted_activation_gib")]
        if ratios:
            out[phase] = statistics.median(ratios)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(RESULTS / "memory_plan.json"))
    a = ap.parse_args()
    act = json.loads((RESULTS / "gpu_activations.json").read_text())
    e2e = json.loads((RESULTS / "gpu_e2e.json").read_text())
    result = {"date": time.strftime("%Y-%m-%d"), "calibration": memory.CALIBRATION, "headroom": memory.HEADROOM,
              "measured_on": {"gpu_activations": f"{act['device']}, {act['date']}", "gpu_e2e": f"{e2e['device']}, {e2e['date']}"},
              "cards_gib": CARDS, "models": {}}
    for name in SHIPPED:
        path = RECIPES_DIR / f"{name}.toml"
        if not path.exists():
            continue
        recipe = load_recipe(path)
        acct = memory.accountant(recipe)
        rows = compare(name, acct, act, e2e)
        plans = {card: acct.plan(gib).to_dict() for card, gib in CARDS.items()}
        result["models"][name] = {"components_gib": acct.sizes, "comparison": rows, "fitted_calibration": fitted_calibration(rows),
                                  "max_abs_error": max((abs(r["error"]) for r in rows), default=None), "plans": plans}
        print(f"{name}:")
        for r in rows:
            print(f"  {r['what']:<58} measured {r['measured_gib']:6.2f}  planned {r['planned_gib']:6.2f}  {r['error']:+.1%}")
        for card in plans:
            print(f"  {card}: {acct.plan(CARDS[card]).line()}")
        Path(a.out).write_text(json.dumps(result, indent=2))
    Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
