"""The gate judged by ground truth: a zoo of rounds, labelled by what they did, and thresholds calibrated on
some seeds and reported on others.

Every round runs through the product's own round + gate code (`run_round`, from v0, on a fresh state whose
watched folder holds what the kind puts there). Afterwards the toy world's ground-truth scorer measures,
at the native 4 steps, on held-out prompts the gate never sees (64 prompts x 2 seeds) and on the pack's own
held-out concept prompts, the candidate against its parent. Labels (docs/RESULTS.md, fixed before any
threshold was tuned):
  harmful: retention falls by more than 0.05, or sharpness (high-frequency energy) falls below 0.85 of the
           parent's, or seed diversity falls below 0.70 of the parent's, or retention on the prompts nearest
           the pack's (its concept taken out, bench-only prompts) falls by more than 0.05 (a leak);
  useful:  not harmful, and concept fidelity rises by more than 0.02;
  neutral: the rest.
Kinds: default D-OPSD; lr x10, x20 and x30; five times too long; moderate and damaging SFT; a pack of noise
images; captions swapped between images; blurred, JPEG-crushed and colour-cast training images; one
image repeated (collapse); the concept captioned as a base shape ("a red circle" under a heart) and learnt
at lr x10: the shape bleeds into the base word. Packs alternate by seed (heart, logo). Seeds 0-2 calibrate, 3-4 are held out.

Writes bench/results/gate_zoo.json as rows come in (every guard's value and the ground truth per round; a
run resumes past the rows already there); `python bench/gate_zoo.py --calibrate` then fits thresholds on
the calibration seeds, writes bench/results/gate_validation.json and the table in docs/RESULTS.md.
`make gate-validation` does both from scratch, about 45 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchinfo import machine
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopsd_continual.gate import held_out_prompts, neighbour_prompts, seed_diversity  # noqa: E402
from dopsd_continual.ingest import ingest_paths  # noqa: E402
from dopsd_continual.models import resolve_source  # noqa: E402
from dopsd_continual.recipe import RECIPES_DIR, load_recipe  # noqa: E402
from dopsd_continual.rounds import run_round  # noqa: E402
from dopsd_continual.sampling import Sampler  # noqa: E402
from dopsd_continual.store import init_state  # noqa: E402
from dopsd_continual.toy.packs import pack_eval_captions, write_pack  # noqa: E402
from dopsd_continual.toy.scorer import high_freq_energy, load_classifier, score_images  # noqa: E402
from dopsd_continual.toy.world import held_out_captions  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ZOO = RESULTS / "gate_zoo.json"
SEEDS_ORDER = [0, 3, 1, 4, 2]  # both splits fill as the run goes
CALIBRATION = {0, 1, 2}
PACKS = ["heart", "logo"]
LABEL_MARGINS = {"retention_drop": 0.05, "sharpness_ratio": 0.85, "diversity_ratio": 0.70, "concept_gain": 0.02,
                 "neighbour_drop": 0.05}
GT_SEEDS = [7000, 7001]
BASE = load_recipe(RECIPES_DIR / "toy-shapes.toml")["train"]

# kind -> (round overrides, folder transform)
KINDS: dict[str, tuple[dict, str | None]] = {
    "default": ({}, None),
    "lr_x10": ({"lr": BASE["lr"] * 10}, None),
    "lr_x20": ({"lr": BASE["lr"] * 20}, None),
    "lr_x30": ({"lr": BASE["lr"] * 30}, None),
    "too_long": ({"steps": BASE["steps"] * 5}, None),
    "sft_moderate": ({"objective": "sft"}, None),
    "sft_damaging": ({"objective": "sft", "lr": 3e-3, "steps": 150}, None),
    "noise_pack": ({}, "noise"),
    "swapped_captions": ({}, "swap"),
    "blurred": ({}, "blur"),
    "jpeg_crushed": ({}, "jpeg"),
    "colour_cast": ({}, "cast"),
    "collapse": ({}, "repeat"),
    "bleeding": ({"lr": BASE["lr"] * 10}, "bleed"),
}
GROSS = {"noise_pack", "lr_x30", "collapse", "too_long"}


def make_folder(pack: str, transform: str | None, out: Path, seed: int) -> None:
    """The pack's pairs as a user's folder would hold them after the kind's mistake."""
    src = out.parent / f"{out.name}-src"
    write_pack(pack, src)
    imgs = sorted(src.glob("*.png"))
    caps = [p.with_suffix(".txt").read_text() for p in imgs]
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    for i, p in enumerate(imgs):
        im = Image.open(p).convert("RGB")
        cap = caps[i]
        name, kw = f"{p.stem}.png", {}
        if transform == "noise":
            im = Image.fromarray(rng.integers(0, 256, (im.height, im.width, 3), dtype=np.uint8))
        elif transform == "swap":
            cap = caps[(i + 1) % len(caps)]
        elif transform == "blur":
            im = im.filter(ImageFilter.GaussianBlur(2.5))
        elif transform == "jpeg":
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=4)
            im = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        elif transform == "cast":
            arr = np.asarray(im).astype(np.float32)
            arr = 0.55 * arr + 0.45 * np.array([255, 140, 0], dtype=np.float32)  # an orange cast
            im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        elif transform == "bleed":  # the concept named as a base shape: that word learns the concept
            cap = cap.replace("heart", "circle").replace("my [trigger] logo", "a large circle in the center")
        elif transform == "repeat":
            im, cap = Image.open(imgs[0]).convert("RGB"), caps[0]
            from PIL.PngImagePlugin import PngInfo

            kw["pnginfo"] = PngInfo()
            kw["pnginfo"].add_text("copy", str(i))  # other bytes, the same picture: not a duplicate
        im.save(out / name, format="PNG", **kw)
        (out / name).with_suffix(".txt").write_text(cap)
    shutil.rmtree(src)


class GroundTruth:
    """The scorer's view of a version at 4 steps: held-out retention, sharpness, seed diversity, concept."""

    def __init__(self, recipe: dict):
        gate = set(held_out_prompts(recipe))
        self.prompts = [c for c in held_out_captions() if c not in gate][:64]
        self.scorer = load_classifier(Path(resolve_source(recipe["model"]["source"])))
        self.trigger = recipe["ingest"]["trigger_word"]

    def measure(self, sampler: Sampler, vid: str, pack: str) -> dict:
        prompts = [p for p in self.prompts for _ in GT_SEEDS]
        seeds = [s for _ in self.prompts for s in GT_SEEDS]
        imgs = sampler.images(prompts, seeds, 4, vid)
        caps = pack_eval_captions(pack)
        cimgs = sampler.images([c for c in caps for _ in GT_SEEDS], [s + 100 for _ in caps for s in GT_SEEDS], 4, vid)
        near = neighbour_prompts(caps, self.prompts, self.trigger)
        nimgs = sampler.images([p for p in near for _ in GT_SEEDS], [s + 200 for _ in near for s in GT_SEEDS], 4, vid)
        return {
            "neighbours": score_images(self.scorer, nimgs, [p for p in near for _ in GT_SEEDS]).mean()["overall"],
            "retention": score_images(self.scorer, imgs, prompts).mean()["overall"],
            "sharpness": float(high_freq_energy(imgs).mean()),
            "diversity": seed_diversity(imgs, len(GT_SEEDS)),
            "concept": score_images(self.scorer, cimgs, [c for c in caps for _ in GT_SEEDS], self.trigger).mean()["overall"],
        }


def label(gt: dict, parent: dict) -> tuple[str, dict]:
    d = {
        "retention_drop": parent["retention"] - gt["retention"],
        "sharpness_ratio": gt["sharpness"] / parent["sharpness"],
        "diversity_ratio": gt["diversity"] / parent["diversity"],
        "concept_gain": gt["concept"] - parent["concept"],
    }
    if "neighbours" in gt and "neighbours" in parent:  # rows measured before the neighbour guard have none
        d["neighbour_drop"] = parent["neighbours"] - gt["neighbours"]
    harmful = (d["retention_drop"] > LABEL_MARGINS["retention_drop"] or d["sharpness_ratio"] < LABEL_MARGINS["sharpness_ratio"]
               or d["diversity_ratio"] < LABEL_MARGINS["diversity_ratio"]
               or d.get("neighbour_drop", 0.0) > LABEL_MARGINS["neighbour_drop"])
    if harmful:
        return "harmful", d
    return ("useful" if d["concept_gain"] > LABEL_MARGINS["concept_gain"] else "neutral"), d


def run_zoo(seeds: list[int], kinds: list[str]) -> None:
    rows = json.loads(ZOO.read_text())["rows"] if ZOO.exists() else []
    done = {(r["kind"], r["seed"]) for r in rows}
    tmp = Path(tempfile.mkdtemp(prefix="gate-zoo-"))
    os.environ["DOPSD_STABILITY_SECONDS"] = "0"
    sampler = gt = None
    parents: dict[str, dict] = {}
    v0_cache = tmp / "v0-cache"
    v0_cache.mkdir()
    try:
        for seed in seeds:
            pack = PACKS[seed % len(PACKS)]
            for kind in kinds:
                if (kind, seed) in done:
                    continue
                overrides, transform = KINDS[kind]
                work = tmp / f"{kind}-{seed}"
                make_folder(pack, transform, work / "drop", seed)
                recipe = work / "r.toml"
                recipe.write_text((RECIPES_DIR / "toy-shapes.toml").read_text().replace("\nseed = 0", f"\nseed = {seed}"))
                st = init_state(work / "s", str(recipe), [work / "drop"])
                (st.cache / "gate").mkdir(parents=True, exist_ok=True)
                for f in v0_cache.iterdir():  # the parent's gate samples are the same for every round from v0
                    shutil.copy(f, st.cache / "gate" / f.name)
                ingest_paths(st)
                if sampler is None:
                    sampler, gt = Sampler(st), GroundTruth(st.recipe)
                sampler.state, sampler.switch.current = st, None
                t = time.time()
                r = run_round(st, sampler=sampler, **overrides)
                seconds = time.time() - t
                for f in (st.cache / "gate").glob("v0-*"):
                    shutil.copy(f, v0_cache / f.name)
                sampler.switch.current = None
                if pack not in parents:
                    parents[pack] = gt.measure(sampler, "v0", pack)
                truth = gt.measure(sampler, r["version"], pack)
                lab, deltas = label(truth, parents[pack])
                rows.append({"kind": kind, "seed": seed, "pack": pack,
                             "split": "calibration" if seed in CALIBRATION else "held_out", "label": lab,
                             "ground_truth": deltas, "verdict_shipped": r["verdict"], "reasons_shipped": r["reasons"],
                             "guards": {k: v for k, v in r["metrics"].items() if isinstance(v, (int, float))},
                             "round_seconds": seconds})
                print(f"{kind:16s} seed {seed} {pack:6s}: {lab:8s} shipped gate {r['verdict']:8s} "
                      f"retention {-deltas['retention_drop']:+.3f} sharp {deltas['sharpness_ratio']:.2f} "
                      f"div {deltas['diversity_ratio']:.2f} concept {deltas['concept_gain']:+.3f} "
                      f"neighbours {-deltas.get('neighbour_drop', 0.0):+.3f} ({seconds:.0f}s)", flush=True)
                st.close()
                shutil.rmtree(work, ignore_errors=True)
                ZOO.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                           "label_margins": LABEL_MARGINS, "rows": rows}, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- calibration

# guard -> direction: "max" rejects above the threshold, "min" below it
GUARDS = {"drift": "max", "sharpness_ratio": "min", "colour_shift": "max", "seed_diversity_ratio": "min",
          "few_step_gap_ratio": "max", "concept_gap_ratio": "max", "neighbour_drift": "max", "retention_drop": "max",
          "concept_gain": "min", "neighbour_retention_drop": "max"}
TOY_ONLY = {"retention_drop", "concept_gain", "neighbour_retention_drop"}  # need the toy world's scorer: not available for real models
RECIPE_KEYS = {"drift": "max_drift", "sharpness_ratio": "min_sharpness_ratio", "colour_shift": "max_colour_shift",
               "seed_diversity_ratio": "min_seed_diversity_ratio", "few_step_gap_ratio": "max_few_step_gap_ratio",
               "concept_gap_ratio": "max_concept_gap_ratio", "retention_drop": "max_retention_drop",
               "concept_gain": "min_concept_gain", "neighbour_drift": "max_neighbour_drift",
               "neighbour_retention_drop": "max_neighbour_retention_drop"}


def fails(guard: str, value: float, threshold: float) -> bool:
    return value > threshold if GUARDS[guard] == "max" else value < threshold


def _errors(rows: list[dict], thresholds: dict[str, float]) -> int:
    """Harmful rounds accepted plus useful rounds rejected (neutral rounds cost nothing either way)."""
    bad = 0
    for r in rows:
        rejected = verdict(r, thresholds)[0] == "rejected"
        bad += (r["label"] == "harmful" and not rejected) + (r["label"] == "useful" and rejected)
    return bad


def calibrate(rows: list[dict], guards: list[str], start: dict[str, float] | None = None, passes: int = 3) -> dict[str, float]:
    """Thresholds fitted on the calibration seeds: coordinate descent over the guards, each taking the
    threshold (a midpoint between observed values, or off) that minimises harmful-accepted plus
    useful-rejected with the others fixed; among equally good thresholds the middle one (the widest margin
    on both sides). Starts from `start` (the shipped thresholds). A guard that, at the end, rejects no
    harmful calibration round on its own is dropped."""
    cal = [r for r in rows if r["split"] == "calibration"]
    t = {g: v for g, v in (start or {}).items() if g in guards}
    for _ in range(passes):
        for g in guards:
            vals = sorted({r["guards"][g] for r in cal if g in r["guards"]})
            if not vals:
                continue
            cands = [(a + b) / 2 for a, b in zip(vals, vals[1:])] + [vals[0] - 1e-6, vals[-1] + 1e-6]
            cands = sorted(cands)
            costs = [_errors(cal, {**t, g: c}) for c in cands]
            off = _errors(cal, {k: v for k, v in t.items() if k != g})
            best = min(costs)
            if off <= best:
                t.pop(g, None)
                continue
            tied = [c for c, e in zip(cands, costs) if e == best]
            t[g] = tied[len(tied) // 2]
    for g in list(t):  # keep only guards that catch something on their own
        if not any(r["label"] == "harmful" and verdict(r, t)[1] == [g] for r in cal):
            t.pop(g)
    return t


def verdict(row: dict, thresholds: dict[str, float]) -> tuple[str, list[str]]:
    failed = [g for g, t in thresholds.items() if g in row["guards"] and fails(g, row["guards"][g], t)]
    return ("rejected" if failed else "accepted"), failed


def confusion(rows: list[dict], key: str) -> dict:
    harmful = [r for r in rows if r["label"] == "harmful"]
    useful = [r for r in rows if r["label"] == "useful"]
    fa = sum(r[key] == "accepted" for r in harmful)
    fr = sum(r[key] == "rejected" for r in useful)
    by_kind: dict[str, dict] = {}
    for r in rows:
        k = by_kind.setdefault(r["kind"], {})
        cell = f"{r['label']}/{r[key]}"
        k[cell] = k.get(cell, 0) + 1
    return {"harmful": len(harmful), "useful": len(useful), "neutral": len(rows) - len(harmful) - len(useful),
            "false_accepts": fa, "false_rejects": fr,
            "false_accept_rate": fa / len(harmful) if harmful else None,
            "false_reject_rate": fr / len(useful) if useful else None,
            "gross_harmful_accepted": sum(r[key] == "accepted" for r in harmful if r["kind"] in GROSS),
            "by_kind": by_kind}


def run_calibration() -> dict:
    zoo = json.loads(ZOO.read_text())
    rows = zoo["rows"]
    shipped = load_recipe(RECIPES_DIR / "toy-shapes.toml")["gate"]
    start = {g: float(shipped[k]) for g, k in RECIPE_KEYS.items() if not (g == "concept_gain" and shipped[k] == -1)}  # -1: off
    toy_gate = calibrate(rows, list(GUARDS), start)
    real_gate = calibrate(rows, [g for g in GUARDS if g not in TOY_ONLY], start)
    for r in rows:
        r["verdict_at_run"] = r["verdict_shipped"]  # what the recipe of the day said when the round ran
        r["verdict_shipped"] = verdict(r, start)[0]  # the shipped recipe's thresholds now, on the recorded guards
        r["verdict"], r["failed"] = verdict(r, toy_gate)
        r["verdict_real_guards"], r["failed_real_guards"] = verdict(r, real_gate)
    held = [r for r in rows if r["split"] == "held_out"]
    alone = {}
    for g in toy_gate:
        alone[g] = sum(r["failed"] == [g] for r in rows if r["label"] == "harmful")
    out = {
        "machine": zoo["machine"], "date": zoo["date"], "label_margins": zoo["label_margins"],
        "thresholds": {RECIPE_KEYS[g]: round(t, 4) for g, t in toy_gate.items()},
        "thresholds_real_guards": {RECIPE_KEYS[g]: round(t, 4) for g, t in real_gate.items()},
        "guards_dropped": [g for g in GUARDS if g not in toy_gate],
        "rejections_by_this_guard_alone": alone,
        "held_out": confusion(held, "verdict"),
        "held_out_real_guards": confusion(held, "verdict_real_guards"),
        "held_out_shipped_gate": confusion(held, "verdict_shipped"),
        "calibration": confusion([r for r in rows if r["split"] == "calibration"], "verdict"),
        "rows": [{"kind": r["kind"], "seed": r["seed"], "pack": r["pack"], "split": r["split"], "label": r["label"],
                  "verdict": r["verdict"], "failed": r["failed"], "verdict_real_guards": r["verdict_real_guards"],
                  "verdict_shipped": r["verdict_shipped"], "verdict_at_run": r["verdict_at_run"], "ground_truth": r["ground_truth"], "guards": r["guards"]}
                 for r in rows],
    }
    (RESULTS / "gate_validation.json").write_text(json.dumps(out, indent=2))
    write_results_md(out)
    return out


def write_results_md(out: dict) -> None:
    from paper_table import replace_section

    rows = out["rows"]
    lines = [f"Measured by `python bench/gate_zoo.py && python bench/gate_zoo.py --calibrate` on {out['machine']}, "
             f"{out['date']}; raw rows in `bench/results/gate_zoo.json`, verdicts in `bench/results/gate_validation.json`. "
             "Each cell: rounds per ground-truth label (h harmful, u useful, n neutral) and how many of them each gate "
             "accepted, over all seeds (calibration 0-2 and held-out 3-4).", "",
             "| kind | rounds | labels | fitted gate accepts | fitted, real-model guards accept | shipped recipe accepts |",
             "|---|---|---|---|---|---|"]

    def acc(rs, key):
        return ", ".join(f"{lab[0]} {sum(r[key] == 'accepted' for r in rs if r['label'] == lab)}/"
                         f"{sum(r['label'] == lab for r in rs)}" for lab in ("harmful", "useful", "neutral")
                         if any(r["label"] == lab for r in rs))

    for kind in KINDS:
        rs = [r for r in rows if r["kind"] == kind]
        if not rs:
            continue
        labs = ", ".join(f"{lab[0]} {n}" for lab in ("harmful", "useful", "neutral") if (n := sum(r["label"] == lab for r in rs)))
        lines.append(f"| {kind} | {len(rs)} | {labs} | {acc(rs, 'verdict')} | {acc(rs, 'verdict_real_guards')} | "
                     f"{acc(rs, 'verdict_shipped')} |")
    lines += ["", "Held-out seeds only:", "", "| gate | harmful | useful | false accepts | false rejects | gross kinds accepted |",
              "|---|---|---|---|---|---|"]
    for key, name in (("held_out", "fitted on seeds 0-2 (all guards)"), ("held_out_real_guards", "fitted, real-model guards only"),
                      ("held_out_shipped_gate", "shipped recipe")):
        c = out[key]
        fa = "-" if c["false_accept_rate"] is None else f"{c['false_accepts']} ({100 * c['false_accept_rate']:.0f}%)"
        fr = "-" if c["false_reject_rate"] is None else f"{c['false_rejects']} ({100 * c['false_reject_rate']:.0f}%)"
        lines.append(f"| {name} | {c['harmful']} | {c['useful']} | {fa} | {fr} | {c['gross_harmful_accepted']} |")
    lines += ["", "Thresholds set on the calibration seeds: " + ", ".join(f"`{k} = {v}`" for k, v in out["thresholds"].items())
              + "; real-model guards only: " + ", ".join(f"`{k} = {v}`" for k, v in out["thresholds_real_guards"].items())
              + ". Guards that caught no harmful calibration round and were dropped: "
              + (", ".join(out["guards_dropped"]) or "none") + ". Harmful rounds each guard rejected alone: "
              + ", ".join(f"{k} {v}" for k, v in out["rejections_by_this_guard_alone"].items()) + "."]
    replace_section("gate_validation", "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calibrate", action="store_true", help="calibrate on the rows in gate_zoo.json")
    ap.add_argument("--seeds", default=",".join(map(str, SEEDS_ORDER)))
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--rows", default=None, help="the rows file (default bench/results/gate_zoo.json)")
    a = ap.parse_args()
    if a.rows:
        globals()["ZOO"] = Path(a.rows)
    if a.calibrate:
        out = run_calibration()
        print(json.dumps({k: out[k] for k in ("thresholds", "thresholds_real_guards", "guards_dropped",
                                               "rejections_by_this_guard_alone")}, indent=2))
        for k in ("held_out", "held_out_real_guards", "held_out_shipped_gate"):
            print(k, {x: out[k][x] for x in ("harmful", "useful", "neutral", "false_accept_rate", "false_reject_rate",
                                             "gross_harmful_accepted")})
        return
    run_zoo([int(s) for s in a.seeds.split(",")], a.kinds.split(","))


if __name__ == "__main__":
    main()
