"""The gate's checks: each metric, its threshold key in the recipe's [gate] table, and the reason a failure
gives. Plain data and one function, importable without a model library (the CLI's and the dashboard's
read-only views show them)."""

from __future__ import annotations

# (metric, threshold key, the side that fails, the reason when it fails): the gate's whole verdict
CHECKS = (
    ("drift", "max_drift", ">", "drift {v:.3f} on held-out prompts > {t}"),
    ("sharpness_ratio", "min_sharpness_ratio", "<", "sharpness ratio {v:.2f} < {t} (few-step blur)"),
    ("colour_shift", "max_colour_shift", ">", "colour shift {v:.3f} > {t}"),
    ("seed_diversity_ratio", "min_seed_diversity_ratio", "<", "seed diversity ratio {v:.2f} < {t} (collapse)"),
    ("few_step_gap_ratio", "max_few_step_gap_ratio", ">", "few-step gap ratio {v:.2f} > {t}"),
    ("concept_gap_ratio", "max_concept_gap_ratio", ">", "the student did not move toward its reference-conditioned "
                                                          "teacher on the round's samples (gap ratio {v:.2f} > {t})"),
    ("neighbour_drift", "max_neighbour_drift", ">", "drift {v:.3f} on prompts next to the round's concept > {t} "
                                                      "(the concept leaks into what was not asked for)"),
    ("neighbour_retention_drop", "max_neighbour_retention_drop", ">", "retention on prompts next to the round's "
                                                                       "concept dropped {v:.3f} > {t} (a leak)"),
    ("clip_drop", "max_clip_drop", ">", "CLIP text-image score dropped {v:.3f} > {t}"),
    ("retention_drop", "max_retention_drop", ">", "retention dropped {v:.3f} > {t}"),
    ("concept_gain", "min_concept_gain", "<", "concept gain {v:.3f} < {t}"),
)
# the shipped judges (judges.py), by the name a recipe's `[gate] judges` gives them
JUDGES = {
    "clip": "dopsd_continual.judges:ClipJudge",
    "dino": "dopsd_continual.judges:DinoJudge",
    "toy-truth": "dopsd_continual.toy.judge:ToyTruth",
}
# measured on every round (Gate.verdict insists)
ALWAYS = {"drift", "sharpness_ratio", "colour_shift", "seed_diversity_ratio", "few_step_gap_ratio"}


def checks(m: dict, g: dict) -> list[dict]:
    """Each of the gate's checks that applies to these metrics: value, threshold, and whether it passed."""
    out = []
    for metric, key, fails, reason in CHECKS:
        if metric not in m or key not in g:
            continue  # a guard this model has no scorer for, or a version the gate did not judge
        v, t = m[metric], g[key]
        failed = v > t if fails == ">" else v < t
        out.append({"metric": metric, "value": v, "threshold": t, "limit": "max" if fails == ">" else "min",
                    "passed": not failed, "reason": reason.format(v=v, t=t)})
    return out
