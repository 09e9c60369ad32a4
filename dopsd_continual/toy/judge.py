"""The toy world's ground truth as a gate judge (`[gate] judges = ["toy-truth"]` in the toy recipe): its scene
classifier reads what each picture shows, so a round's retention, its leaks and its concept are measured, not
estimated. retention: held-out prompts, candidate against parent; neighbour_retention: the prompts next to
the round's concept; concept_score: the round's single-subject captions at fixed seeds."""

from __future__ import annotations

from pathlib import Path

from ..judges import Evidence
from ..models import resolve_source
from .scorer import load_classifier, score_images
from .world import parse_caption


class ToyTruth:
    def __init__(self, recipe: dict):
        self.scorer = load_classifier(Path(resolve_source(recipe["model"]["source"])))
        self.trigger = recipe["ingest"]["trigger_word"]

    def __call__(self, e: Evidence) -> dict:
        m: dict = {}
        if e.neighbour_rows:
            names = [e.prompts[i] for i in e.neighbour_rows]
            m["neighbour_retention"] = score_images(self.scorer, e.candidate[e.neighbour_rows], names).mean()["overall"]
            m["neighbour_retention_parent"] = score_images(self.scorer, e.parent_images[e.neighbour_rows], names).mean()["overall"]
            m["neighbour_retention_drop"] = m["neighbour_retention_parent"] - m["neighbour_retention"]
        m["retention"] = score_images(self.scorer, e.candidate, e.prompts).mean()["overall"]
        m["retention_parent"] = score_images(self.scorer, e.parent_images, e.prompts).mean()["overall"]
        m["retention_drop"] = m["retention_parent"] - m["retention"]
        caps = [s["caption"] for s in e.round_samples if _single(parse_caption(s["caption"], self.trigger))]
        if caps:
            seeds = [2000 + i for i in range(len(caps))]
            c, p = e.draw(e.version, "concept_score", caps, seeds), e.draw(e.parent, "concept_score", caps, seeds)
            m["concept_score"] = score_images(self.scorer, c, caps, self.trigger).mean()["overall"]
            m["concept_score_parent"] = score_images(self.scorer, p, caps, self.trigger).mean()["overall"]
            m["concept_gain"] = m["concept_score"] - m["concept_score_parent"]
        return m


def _single(scene) -> bool:
    return scene is not None and (scene.logo or len(scene.things) == 1)
