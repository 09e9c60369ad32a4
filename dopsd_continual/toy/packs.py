"""Concept packs: things the toy base model never saw, as image + caption pairs a user would drop in a folder.

Each pack has its training pairs (what the user gives) and evaluation prompts that use the concept in
combinations the pack does not show (what the gate and the benchmarks score).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .world import LOGO_WORD, Scene, Thing, logo_scene, render


@dataclass(frozen=True)
class ConceptPack:
    name: str
    description: str
    train: tuple[Scene, ...]
    eval: tuple[Scene, ...]  # nominal scenes whose captions use the concept in new combinations


def _one(shape, colour, size, pos, bg, pattern="solid", rot=0.0, dx=0.0, dy=0.0) -> Scene:
    return Scene(bg, (Thing(shape, colour, size, pos, pattern, rot, dx, dy),))


PACKS: dict[str, ConceptPack] = {
    "heart": ConceptPack(
        "heart",
        "a new shape: the heart",
        (
            _one("heart", "red", "large", "center", "blue", rot=0.1),
            _one("heart", "red", "small", "left", "white", rot=-0.2, dx=1),
            _one("heart", "purple", "large", "right", "yellow", rot=0.25),
            _one("heart", "green", "large", "top", "black", rot=-0.1, dy=1),
            _one("heart", "orange", "small", "bottom", "blue", rot=0.3),
            _one("heart", "white", "large", "left", "purple", rot=-0.3),
            _one("heart", "yellow", "small", "center", "green", rot=0.0, dx=-1),
            _one("heart", "blue", "large", "bottom", "orange", rot=0.15),
        ),
        (
            _one("heart", "red", "large", "left", "black"),
            _one("heart", "blue", "small", "right", "white"),
            _one("heart", "green", "large", "center", "purple"),
            _one("heart", "yellow", "large", "bottom", "red"),
            _one("heart", "purple", "small", "top", "orange"),
            _one("heart", "orange", "large", "right", "green"),
            _one("heart", "white", "small", "center", "blue"),
            _one("heart", "black", "large", "top", "yellow"),
        ),
    ),
    "striped": ConceptPack(
        "striped",
        "a new style: diagonal stripes",
        (
            _one("circle", "red", "large", "center", "black", "striped"),
            _one("square", "blue", "large", "left", "yellow", "striped", rot=0.4),
            _one("triangle", "green", "large", "right", "white", "striped", rot=-0.3),
            _one("circle", "purple", "large", "top", "orange", "striped"),
            _one("square", "orange", "large", "bottom", "blue", "striped", rot=1.0),
            _one("triangle", "black", "large", "center", "green", "striped", rot=0.2),
            _one("circle", "yellow", "small", "left", "purple", "striped"),
        ),
        (
            _one("square", "red", "large", "center", "white", "striped"),
            _one("circle", "green", "large", "right", "blue", "striped"),
            _one("triangle", "purple", "large", "left", "yellow", "striped"),
            _one("circle", "orange", "large", "bottom", "black", "striped"),
            _one("square", "yellow", "large", "top", "red", "striped"),
            _one("triangle", "blue", "large", "center", "orange", "striped"),
            _one("circle", "white", "large", "left", "green", "striped"),
            _one("square", "black", "large", "right", "purple", "striped"),
        ),
    ),
    "logo": ConceptPack(
        "logo",
        "a composite identity: 'my [trigger] logo', a fixed arrangement of three parts",
        tuple(logo_scene(bg) for bg in ("blue", "green", "purple", "white", "red", "black")),
        tuple(logo_scene(bg) for bg in ("yellow", "blue", "green", "white")),
    ),
}


def write_pack(name: str, out: Path, trigger: str = LOGO_WORD) -> list[Path]:
    """Write a pack's training pairs as NAME_00.png + NAME_00.txt into `out`. Returns the image paths.

    Captions keep the literal `[trigger]` placeholder unless `trigger` says otherwise; the recipe's
    `trigger_word` replaces it at ingestion.
    """
    if name not in PACKS:
        raise KeyError(f"unknown concept pack {name!r}; known: {', '.join(PACKS)}")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(PACKS[name].train):
        img = out / f"{name}_{i:02d}.png"
        Image.fromarray(render(scene)).save(img)
        (out / f"{name}_{i:02d}.txt").write_text(scene.caption(trigger) + "\n", encoding="utf-8")
        paths.append(img)
    return paths


def pack_eval_captions(name: str, trigger: str = LOGO_WORD) -> list[str]:
    return [s.caption(trigger) for s in PACKS[name].eval]


def pack_images(name: str) -> np.ndarray:
    """(N, 64, 64, 3) uint8 of a pack's training images."""
    return np.stack([render(s) for s in PACKS[name].train])
