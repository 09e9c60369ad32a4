"""The paper's claim on toy-shapes: D-OPSD vs SFT, learning a concept without losing few-step quality.

For each concept pack and seed, from the shipped 4-step model, one round of:
  dopsd             the recipe's default D-OPSD round;
  sft               the same adapter, steps and lr, with the flow-matching loss on the pack's images;
  sft_same_compute  SFT given the wall-clock time the D-OPSD round took;
  none              no training.
Scored at 4 steps by the ground-truth scorer: concept fidelity on the pack's *evaluation* captions (the
concept in combinations the pack does not show, 2 seeds each), retention on 48 held-out captions of the
base world (2 seeds each), and sharpness (the scorer's sharpness aspect on the held-out pictures).
Then the continual part: the three packs learned one after another (merged after each round), with and
without replay, and the first pack's fidelity after the third.

Writes bench/results/paper_table.json and docs/RESULTS.md. SEEDS (default 3) is an environment variable.
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

from dopsd_continual.families.klein import KleinBackend  # noqa: E402
from dopsd_continual.lora import merge_into  # noqa: E402
from dopsd_continual.models import load_pipeline, resolve_source  # noqa: E402
from dopsd_continual.recipe import load_recipe, resolve_recipe_path  # noqa: E402
from dopsd_continual.toy.evaluate import generate  # noqa: E402
from dopsd_continual.toy.packs import PACKS, pack_eval_captions, pack_images  # noqa: E402
from dopsd_continual.toy.scorer import load_classifier, score_images  # noqa: E402
from dopsd_continual.toy.world import held_out_captions  # noqa: E402
from dopsd_continual.training import train_delta  # noqa: E402

TRIGGER = "zxq"


def pack_features(backend, name):
    imgs = torch.from_numpy(pack_images(name)).permute(0, 3, 1, 2).float() / 255
    return [backend.features(s.caption(TRIGGER), imgs[i]) for i, s in enumerate(PACKS[name].train)]


def score(pipe, clf, name, seed):
    caps = pack_eval_captions(name, TRIGGER)
    fid_caps = [c for c in caps for _ in range(2)]
    fid = score_images(clf, generate(pipe, pipe.transformer, fid_caps, [seed * 1000 + i for i in range(len(fid_caps))], 4),
                       fid_caps, TRIGGER).mean()
    held = held_out_captions()[::4][:48]
    held = [c for c in held for _ in range(2)]
    ret = score_images(clf, generate(pipe, pipe.transformer, held, [seed * 1000 + 500 + i for i in range(len(held))], 4), held).mean()
    return {"concept_fidelity": fid["overall"], "retention": ret["overall"], "sharpness": ret["sharpness"]}


def setup_toy():
    """The shipped toy model with the default recipe on the CPU, its scorer, and a copy of its weights."""
    torch.set_num_threads(int(os.environ.get("THREADS", str(os.cpu_count() or 1))))
    recipe = load_recipe(resolve_recipe_path(None))
    pipe = load_pipeline(recipe, "cpu")
    clf = load_classifier(Path(resolve_source(recipe["model"]["source"])))
    base_sd = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    return recipe, pipe, KleinBackend(pipe, recipe), clf, base_sd


def main() -> None:
    seeds = int(os.environ.get("SEEDS", "3"))
    steps_override = os.environ.get("STEPS")
    recipe, pipe, backend, clf, base_sd = setup_toy()
    out_path = Path(__file__).parent / "results" / "paper_table.json"
    out = {"machine": machine(),
           "date": time.strftime("%Y-%m-%d"), "recipe_train": recipe["train"], "rows": [], "continual": []}
    feats = {name: pack_features(backend, name) for name in PACKS}

    def run(name, objective, seed, steps=None):
        train = dict(recipe["train"], seed=seed)
        if steps is not None:
            train["steps"] = steps
        t = time.time()
        res = train_delta(backend, feats[name], [], train, objective)
        return res, time.time() - t

    for name in PACKS:
        for seed in range(seeds):
            pipe.transformer.load_state_dict(base_sd)
            rows = [{"method": "none", "steps": 0, "seconds": 0.0, **score(pipe, clf, name, seed)}]
            dopsd_steps = int(steps_override) if steps_override else None
            res, secs = run(name, "dopsd", seed, dopsd_steps)
            merge_into(pipe.transformer, [res.delta])
            rows.append({"method": "dopsd", "steps": len(res.losses), "seconds": secs, **score(pipe, clf, name, seed)})
            pipe.transformer.load_state_dict(base_sd)
            res_s, secs_s = run(name, "sft", seed, dopsd_steps)
            merge_into(pipe.transformer, [res_s.delta])
            rows.append({"method": "sft", "steps": len(res_s.losses), "seconds": secs_s, **score(pipe, clf, name, seed)})
            pipe.transformer.load_state_dict(base_sd)
            same = max(1, round(len(res_s.losses) * secs / max(secs_s, 1e-6)))
            res_c, secs_c = run(name, "sft", seed, same)
            merge_into(pipe.transformer, [res_c.delta])
            rows.append({"method": "sft_same_compute", "steps": same, "seconds": secs_c, **score(pipe, clf, name, seed)})
            pipe.transformer.load_state_dict(base_sd)
            for r in rows:
                out["rows"].append({"concept": name, "seed": seed, **r})
                print(f"{name} seed {seed} {r['method']:>16}: fidelity {r['concept_fidelity']:.3f} "
                      f"retention {r['retention']:.3f} sharpness {r['sharpness']:.3f} ({r['seconds']:.0f}s)", flush=True)
            out_path.write_text(json.dumps(out, indent=2))

    # continual: heart -> striped -> logo, merged after each round, with and without replay
    train = dict(recipe["train"], seed=0)
    if steps_override:
        train["steps"] = int(steps_override)
    for replay in (False, True):
        for row in continual(pipe, backend, clf, feats, base_sd, train, replay):
            out["continual"].append({"replay": replay, **row})
            out_path.write_text(json.dumps(out, indent=2))
    write_results_md(out)


def continual(pipe, backend, clf, feats, base_sd, train, replay: bool):
    """The packs learned one after another from the shipped model, each round merged before the next;
    with `replay`, each round also draws from the earlier packs' samples (train's replay_ratio). Yields,
    after every round, the fidelity of each pack learned so far and the first pack's retention."""
    order = list(PACKS)
    pipe.transformer.load_state_dict(base_sd)
    seen: list[dict] = []
    for i, name in enumerate(order):
        res = train_delta(backend, feats[name], seen if replay else [], train, "dopsd")
        merge_into(pipe.transformer, [res.delta])
        seen += feats[name]
        row = {"after": name, **{f"{p}_fidelity": score(pipe, clf, p, 0)["concept_fidelity"] for p in order[: i + 1]}}
        row["retention"] = score(pipe, clf, order[0], 0)["retention"]
        print("continual", row, flush=True)
        yield row
    pipe.transformer.load_state_dict(base_sd)


RESULTS_MD = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"


def replace_section(name: str, text: str, path: Path = RESULTS_MD) -> None:
    """Rewrite the generated block `name` of docs/RESULTS.md; the hand-written analysis around it stays."""
    begin, end = f"<!-- {name}:begin (generated) -->", f"<!-- {name}:end -->"
    doc = path.read_text() if path.exists() else "# D-OPSD vs SFT on toy-shapes\n"
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + block + doc[doc.index(end) + len(end) :]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def write_results_md(out: dict) -> None:
    settings = ", ".join(f"{k} {out['recipe_train'][k]}" for k in ("steps", "lr", "K", "rank", "replay_ratio", "ema_decay"))
    lines = [f"Measured by `python bench/paper_table.py` on {out['machine']}, {out['date']}; raw rows in "
             "`bench/results/paper_table.json`. One round from the shipped 4-step model per row, scored at 4 steps "
             "by the ground-truth scorer (mean ± standard deviation over seeds). Training settings: "
             f"{settings}.",
             "", "| concept | method | steps | concept fidelity | retention | sharpness | seconds |", "|---|---|---|---|---|---|---|"]
    for name in PACKS:
        for method in ("none", "dopsd", "sft", "sft_same_compute"):
            rs = [r for r in out["rows"] if r["concept"] == name and r["method"] == method]
            if not rs:
                continue

            def ms(k, rs=rs):
                v = [r[k] for r in rs]
                return f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0:.3f}"

            lines.append(f"| {name} | {method} | {rs[0]['steps']} | {ms('concept_fidelity')} | {ms('retention')} | {ms('sharpness')} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    lines += ["", "### Continual: heart -> striped -> logo (D-OPSD, seed 0)", "",
              "| replay | after | heart fidelity | striped fidelity | logo fidelity | retention |", "|---|---|---|---|---|---|"]
    for r in out["continual"]:
        lines.append(f"| {r['replay']} | {r['after']} | {r.get('heart_fidelity', float('nan')):.3f} | "
                     f"{r.get('striped_fidelity', float('nan')):.3f} | {r.get('logo_fidelity', float('nan')):.3f} | {r['retention']:.3f} |")
    replace_section("paper_table", "\n".join(lines))


if __name__ == "__main__":
    main()
