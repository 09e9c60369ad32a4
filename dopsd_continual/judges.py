"""The gate's judges: metrics that need a scorer the gate itself does not know (CLIP, DINO, the toy world's
ground truth), called by name from the recipe's `[gate] judges` list.

A judge is a class built once per gate from the recipe, called with the round's `Evidence` (the pictures the
gate drew, and a way to draw more through its cache); it returns metrics by name. Its thresholds live in
the recipe's [gate] table and its checks in `checks.CHECKS`, like every other guard's. Shipped judges are
named in `checks.JUDGES`; a judge outside the package is named `package.module:attribute`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .checks import JUDGES
from .errors import UserError

if TYPE_CHECKING:  # importing this module loads no model library (recipe validation reads JUDGES)
    import torch



@dataclass
class Evidence:
    """What the gate measured a candidate on, for a judge to score."""

    recipe: dict
    version: str
    parent: str
    prompts: list[str]  # the held-out prompt of each picture (prompt-major, every seed)
    candidate: torch.Tensor  # (B, 3, H, W) in [0, 1], the candidate's held-out pictures
    parent_images: torch.Tensor  # the parent's, same prompts and seeds
    neighbour_rows: list[int]  # which of those pictures are of prompts next to the round's concept
    round_samples: list[dict]  # caption, sha256, image (PIL at the model's size) of the round's chosen samples
    draw: Callable[[str, str, list[str], list[int]], torch.Tensor]  # (version, tag, prompts, seeds): cached pictures


def names(gate: dict) -> list[str]:
    """The judges a recipe's [gate] table turns on: its `judges` list, and CLIP / DINO where their model is set."""
    out = list(gate.get("judges", []))
    for name, key in (("clip", "clip_model"), ("dino", "dino_model")):
        if gate.get(key) and name not in out:
            out.append(name)
    return out


def resolve(name: str):
    """A judge's class, imported (a typo or a missing module is one line, before a round trains)."""
    from .named import import_named

    return import_named(name, JUDGES, "gate judge")


def load(name: str, recipe: dict):
    return resolve(name)(recipe)


class ClipJudge:
    """CLIP text-image score of the held-out pictures, candidate against parent (gate.clip_model: a local folder)."""

    def __init__(self, recipe: dict):
        from .embed_metrics import ClipScorer

        if not recipe["gate"]["clip_model"]:
            raise UserError("the clip judge needs gate.clip_model (a local folder of CLIP weights)")
        self.clip = ClipScorer(recipe["gate"]["clip_model"])

    def __call__(self, e: Evidence) -> dict:
        m = {"clip_score": float(self.clip.text_image_scores(e.candidate, e.prompts).mean()),
             "clip_score_parent": float(self.clip.text_image_scores(e.parent_images, e.prompts).mean())}
        m["clip_drop"] = m["clip_score_parent"] - m["clip_score"]
        return m


class DinoJudge:
    """DINO similarity of the round's pictures to the text-only samples of their captions, candidate and parent."""

    def __init__(self, recipe: dict):
        from .embed_metrics import DinoScorer

        if not recipe["gate"]["dino_model"]:
            raise UserError("the dino judge needs gate.dino_model (a local folder of DINO weights)")
        self.dino = DinoScorer(recipe["gate"]["dino_model"])

    def __call__(self, e: Evidence) -> dict:
        if not e.round_samples:
            return {}
        import torch

        from .pictures import image_tensor

        caps = [s["caption"] for s in e.round_samples]
        seeds = [1000 + i for i in range(len(caps))]
        targets = torch.stack([image_tensor(s["image"]) for s in e.round_samples])
        return {"dino_concept": float(self.dino.similarity(e.draw(e.version, "concept", caps, seeds), targets).mean()),
                "dino_concept_parent": float(self.dino.similarity(e.draw(e.parent, "concept", caps, seeds), targets).mean())}
