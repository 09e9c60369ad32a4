"""Ground-truth scoring of generated toy-shapes images against the renderer.

For a single-object prompt of the world's grammar (or a logo prompt), an image is scored on:
shape, colour, background, position, size, pattern (a small multi-head CNN trained on rendered scenes,
with blur/noise augmentation so that it still reads degraded pictures), foreground-mask IoU against the
renderer's nominal picture, and sharpness (high-frequency energy relative to the renderer's picture,
capped at 1). Each aspect is in [0, 1]; `overall` is their mean.

A loose caption (some of size, colour, position or background unsaid) is scored against the picture it
asked for: an unsaid field takes the value the classifier reads in the image (any value is right), and
the mask IoU and sharpness are then measured against the renderer's picture of that completed scene. So a
clean picture of any of the caption's right answers scores high, and an average of several (a ghosted,
muddy picture) scores low on IoU and sharpness.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..gate import high_freq_energy  # the gate's blur measure: the scorer's sharpness is the same
from .world import (
    COLOUR_NAMES,
    COLOURS,
    PATTERNS,
    POSITION_NAMES,
    SHAPES,
    SIZE_NAMES,
    Scene,
    Thing,
    foreground_mask,
    logo_scene,
    parse_caption,
    render_scenes,
)

HEADS = {
    "shape": SHAPES,
    "colour": COLOUR_NAMES,
    "background": COLOUR_NAMES,
    "position": POSITION_NAMES,
    "size": SIZE_NAMES,
    "pattern": PATTERNS,
}
ASPECTS = list(HEADS) + ["iou", "sharpness"]
SCORER_FILE = "scorer.safetensors"


class SceneClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        ch = [3, 32, 64, 96, 128]
        layers: list[nn.Module] = []
        for a, b in zip(ch[:-1], ch[1:]):
            layers += [nn.Conv2d(a, b, 3, padding=1), nn.GroupNorm(8, b), nn.SiLU(), nn.Conv2d(b, b, 3, padding=1, stride=2), nn.SiLU()]
        self.body = nn.Sequential(*layers)  # 64 -> 4
        self.proj = nn.Linear(128 * 16, 256)
        self.heads = nn.ModuleDict({k: nn.Linear(256, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.silu(self.proj(self.body(x * 2 - 1).flatten(1)))
        return {k: head(h) for k, head in self.heads.items()}


def labels_of(scene: Scene) -> dict[str, int]:
    if scene.logo:
        return {"shape": SHAPES.index("logo"), "colour": COLOUR_NAMES.index("orange"),
                "background": COLOUR_NAMES.index(scene.background), "position": POSITION_NAMES.index("center"),
                "size": SIZE_NAMES.index("large"), "pattern": PATTERNS.index("dotted")}
    t = scene.things[0]
    return {"shape": SHAPES.index(t.shape), "colour": COLOUR_NAMES.index(t.colour),
            "background": COLOUR_NAMES.index(scene.background), "position": POSITION_NAMES.index(t.position),
            "size": SIZE_NAMES.index(t.size), "pattern": PATTERNS.index(t.pattern)}


def random_scoring_scene(rng: np.random.Generator) -> Scene:
    if rng.random() < 0.08:
        return logo_scene(str(rng.choice([c for c in COLOUR_NAMES if c not in ("orange",)])))
    bg = str(rng.choice(COLOUR_NAMES))
    t = Thing(
        shape=str(rng.choice(SHAPES[:-1])),
        colour=str(rng.choice([c for c in COLOUR_NAMES if c != bg])),
        size=str(rng.choice(SIZE_NAMES)),
        position=str(rng.choice(POSITION_NAMES)),
        pattern=str(rng.choice(PATTERNS)),
        rotation=float(rng.uniform(-math.pi, math.pi)),
        dx=float(rng.uniform(-3.5, 3.5)),
        dy=float(rng.uniform(-3.5, 3.5)),
    )
    return Scene(bg, (t,))


def degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur, noise and colour shifts like those of an imperfect generator, so the scorer reads them."""
    b = x.shape[0]
    k = torch.arange(-3, 4, dtype=torch.float32)
    levels = [0.0, 0.6, 1.0, 1.5]
    which = torch.randint(len(levels), (b,), generator=gen)
    out = x.clone()
    for j, s in enumerate(levels[1:], start=1):
        sel = which == j
        if not sel.any():
            continue
        w = torch.exp(-(k**2) / (2 * s * s))
        w = w / w.sum()
        img = x[sel]
        img = F.conv2d(F.pad(img, (3, 3, 0, 0), mode="replicate"), w.view(1, 1, 1, 7).repeat(3, 1, 1, 1), groups=3)
        img = F.conv2d(F.pad(img, (0, 0, 3, 3), mode="replicate"), w.view(1, 1, 7, 1).repeat(3, 1, 1, 1), groups=3)
        out[sel] = img
    out = out + torch.randn(out.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.06
    out = out * (1 + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.12)
    return out.clamp(0, 1)


def train_classifier(n: int = 24000, epochs: int = 6, seed: int = 0, log=print, device: str = "cpu", workers: int = 2) -> SceneClassifier:
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    scenes = [random_scoring_scene(rng) for _ in range(n)]
    from concurrent.futures import ProcessPoolExecutor

    chunks = [scenes[i : i + 1000] for i in range(0, n, 1000)]
    with ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as ex:
        images = torch.cat([(x * 255).round().to(torch.uint8) for x in ex.map(render_scenes, chunks)])
    images = images.float() / 255
    log(f"rendered {n} scoring scenes")
    labels = {k: torch.tensor([labels_of(s)[k] for s in scenes]) for k in HEADS}
    model = SceneClassifier().to(device)
    images = images.to(device)
    labels = {k: v.to(device) for k, v in labels.items()}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (n // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    step = 0
    for ep in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - 127, 128):
            idx = perm[i : i + 128].to(device)
            out = model(degrade(images[idx].cpu(), gen).to(device))
            loss = sum(F.cross_entropy(out[k], labels[k][idx]) for k in HEADS)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
        log(f"scorer epoch {ep + 1}/{epochs} loss {loss.item():.4f}", flush=True)
    return model.cpu().eval()


def load_classifier(model_dir: Path) -> SceneClassifier:
    from safetensors.torch import load_file

    m = SceneClassifier()
    m.load_state_dict(load_file(str(Path(model_dir) / SCORER_FILE)))
    return m.eval()


def complete(spec: Scene, predicted: dict[str, int]) -> Scene:
    """A loose caption's scene with its unsaid fields taken from the classifier's reading of the image."""
    if not spec.loose:
        return spec
    t = spec.things[0]
    t = replace(t, colour=t.colour or COLOUR_NAMES[predicted["colour"]], size=t.size or SIZE_NAMES[predicted["size"]],
                position=t.position or POSITION_NAMES[predicted["position"]])
    return Scene(spec.background or COLOUR_NAMES[predicted["background"]], (t,))


@dataclass
class Scores:
    per_image: list[dict[str, float]]

    def mean(self) -> dict[str, float]:
        keys = ASPECTS + ["overall"]
        return {k: float(np.mean([s[k] for s in self.per_image])) for k in keys}


def score_images(
    classifier: SceneClassifier, images: torch.Tensor, captions: list[str], trigger: str = "[trigger]"
) -> Scores:
    """Score images (B, 3, 64, 64) in [0, 1] against single-object (or logo) captions of the world, loose
    ones included."""
    specs = []
    for c in captions:
        s = parse_caption(c, trigger, loose=True)
        if s is None or (not s.logo and len(s.things) != 1):
            raise ValueError(f"not a single-object caption of the toy world: {c!r}")
        specs.append(s)
    images = images.float().cpu()
    with torch.no_grad():
        out = classifier(images)
    scenes = [complete(s, {k: int(out[k][i].argmax()) for k in HEADS}) for i, s in enumerate(specs)]
    refs = render_scenes(scenes)
    hf_gen, hf_ref = high_freq_energy(images), high_freq_energy(refs)
    results = []
    for i, s in enumerate(scenes):
        want = labels_of(s)
        r = {k: float(out[k][i].argmax() == want[k]) for k in HEADS}
        bg = torch.tensor(COLOURS[s.background], dtype=torch.float32).view(3, 1, 1) / 255
        pred_fg = (images[i] - bg).norm(dim=0) > 0.3
        gt = foreground_mask(s)
        inter = (pred_fg & gt).sum().item()
        union = (pred_fg | gt).sum().item()
        r["iou"] = inter / union if union else 0.0
        r["sharpness"] = float(min(1.0, hf_gen[i] / max(float(hf_ref[i]), 1e-6)))
        r["overall"] = float(np.mean([r[k] for k in ASPECTS]))
        results.append(r)
    return Scores(results)


def main() -> None:
    import argparse

    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description="train the toy-shapes ground-truth scorer")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--n", type=int, default=24000)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    model = train_classifier(a.n, a.epochs, device=a.device, workers=a.workers)
    a.out.mkdir(parents=True, exist_ok=True)
    save_file(model.state_dict(), str(a.out / SCORER_FILE))
    # quick check on fresh, clean renders
    rng = np.random.default_rng(99)
    scenes = [random_scoring_scene(rng) for _ in range(512)]
    with torch.no_grad():
        out = model(render_scenes(scenes))
    for k in HEADS:
        acc = np.mean([int(out[k][i].argmax()) == labels_of(s)[k] for i, s in enumerate(scenes)])
        print(f"held-out accuracy {k}: {acc:.3f}")


if __name__ == "__main__":
    main()
