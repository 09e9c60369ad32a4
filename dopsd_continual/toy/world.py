"""The toy-shapes world: a deterministic renderer of 64x64 scenes and their captions.

A scene is a background colour and one or two objects. Each object has a shape, a colour, a size, a
position and a fill pattern; rotation and a few pixels of jitter are drawn at random and are *not* in the
caption, so one caption has many right pictures (the multi-modality that makes few-step sampling of an
undistilled model blur). Rendering is vectorised in torch (4x supersampled, then averaged), so the same
code makes one picture on a CPU or a batch of thousands on a GPU.

Base-world vocabulary: shapes circle/square/triangle, patterns solid/dotted. Concept packs use things the
base model never sees: the heart shape, the striped pattern and a fixed "logo" arrangement.

Loose captions leave some of an object's size, colour and position, or the background, unsaid ("a red
circle", "a large square at the top, blue background"): a scene field set to None. A loose caption has
many right pictures that differ in colour and place, so it curves the model's flow (docs/toy-model.md
measures how much, and that at 4x4 latent tokens the images still do not change with the step count).
Training captions are loosened at random (`loosen`); a fixed held-out set of loose captions
(`held_out_loose_captions`) measures them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

import numpy as np
import torch

SIZE = 64
SUPERSAMPLE = 4

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 215, 40),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "orange": (245, 135, 25),
    "purple": (140, 50, 190),
}
COLOUR_NAMES = list(COLOURS)
BASE_SHAPES = ["circle", "square", "triangle"]
CONCEPT_SHAPES = ["heart"]
SHAPES = BASE_SHAPES + CONCEPT_SHAPES + ["logo"]  # "logo" is the composite identity (scorer class only)
BASE_PATTERNS = ["solid", "dotted"]
PATTERNS = BASE_PATTERNS + ["striped"]
SIZES = {"small": (6.5, 8.0), "large": (11.5, 13.5)}
SIZE_NAMES = list(SIZES)
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (16.0, 32.0),
    "right": (48.0, 32.0),
    "center": (32.0, 32.0),
    "top": (32.0, 16.0),
    "bottom": (32.0, 48.0),
}
POSITION_NAMES = list(POSITIONS)
POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "center": "in the center",
    "top": "at the top",
    "bottom": "at the bottom",
}
JITTER = 2.5
LOGO_WORD = "[trigger]"


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str | None  # None: left unsaid by a loose caption
    size: str | None
    position: str | None
    pattern: str = "solid"
    rotation: float = 0.0  # radians, not captioned
    dx: float = 0.0  # jitter in pixels, not captioned
    dy: float = 0.0


@dataclass(frozen=True)
class Scene:
    background: str | None  # None: left unsaid by a loose caption
    things: tuple[Thing, ...] = field(default_factory=tuple)
    logo: bool = False  # the composite identity: a fixed arrangement, captioned "my [trigger] logo"

    def caption(self, trigger: str = LOGO_WORD) -> str:
        if self.logo:
            return f"my {trigger} logo, {self.background} background"
        parts = []
        for t in self.things:
            words = ["a", t.size, t.colour] + ([t.pattern] if t.pattern != "solid" else []) + [t.shape]
            words.append(POSITION_PHRASE[t.position] if t.position else None)
            parts.append(" ".join(w for w in words if w))
        return " and ".join(parts) + (f", {self.background} background" if self.background else "")

    @property
    def loose(self) -> bool:
        """True when the caption leaves something unsaid (a field is None)."""
        return self.background is None or any(None in (t.colour, t.size, t.position) for t in self.things)

    def nominal(self) -> Scene:
        """The same scene with no rotation or jitter (the scorer's reference picture)."""
        return replace(self, things=tuple(replace(t, rotation=0.0, dx=0.0, dy=0.0) for t in self.things))


_THING_RE = re.compile(
    r"a (?:(?P<size>small|large) )?(?:(?P<colour>" + "|".join(COLOURS) + r") )?(?:(?P<pattern>dotted|striped) )?"
    r"(?P<shape>[a-z]+)(?: (?P<pos>on the left|on the right|in the center|at the top|at the bottom))?"
)
_PHRASE_POSITION = {v: k for k, v in POSITION_PHRASE.items()}


def parse_caption(caption: str, trigger: str = LOGO_WORD, loose: bool = False) -> Scene | None:
    """Invert `Scene.caption` (nominal scene). None when the text is not in the world's grammar; with
    loose=False also when it leaves anything unsaid, with loose=True unsaid fields are None."""
    caption = caption.strip()
    m = re.fullmatch(r"my (?P<trigger>\S+) logo, (?P<bg>[a-z]+) background", caption)
    if m:
        if m["bg"] not in COLOURS:
            return None
        return logo_scene(m["bg"])
    body, bg = caption, None
    if caption.endswith(" background") and ", " in caption:
        body, _, bg = caption.rpartition(", ")
        bg = bg.removesuffix(" background")
        if bg not in COLOURS:
            return None
    things = []
    for chunk in body.split(" and "):
        m = _THING_RE.fullmatch(chunk)
        if not m or m["shape"] not in SHAPES[:-1]:
            return None
        pos = _PHRASE_POSITION[m["pos"]] if m["pos"] else None
        things.append(Thing(m["shape"], m["colour"], m["size"], pos, m["pattern"] or "solid"))
    scene = Scene(bg, tuple(things))
    return scene if loose or not scene.loose else None


def loosen(scene: Scene, rng: np.random.Generator, p: float) -> Scene:
    """The scene's caption with each of the background and every object's size, colour and position left
    unsaid with probability p (the shape and pattern are always said). Logos stay as they are."""
    if scene.logo or p <= 0:
        return scene
    drop = lambda v: None if rng.random() < p else v  # noqa: E731
    things = tuple(replace(t, size=drop(t.size), colour=drop(t.colour), position=drop(t.position)) for t in scene.things)
    return Scene(drop(scene.background), things)


def logo_scene(background: str) -> Scene:
    """The composite identity: a large orange dotted circle with a small black triangle and a small
    white square stacked on it, always in the same place."""
    return Scene(
        background,
        (
            Thing("circle", "orange", "large", "center", "dotted"),
            Thing("triangle", "black", "small", "top", "solid", dy=8.0),
            Thing("square", "white", "small", "bottom", "solid", rotation=math.pi / 4, dy=-9.0),
        ),
        logo=True,
    )


def contrast_colour(colour: str) -> str:
    return "black" if colour in ("white", "yellow") else "white"


def random_scene(
    rng: np.random.Generator,
    shapes: list[str] | None = None,
    patterns: list[str] | None = None,
    max_things: int = 2,
) -> Scene:
    """A random base-world scene (1..max_things objects, distinct positions, colours unlike the background)."""
    shapes = shapes or BASE_SHAPES
    patterns = patterns or BASE_PATTERNS
    bg = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    n = 1 if max_things == 1 or rng.random() < 0.55 else 2
    positions = rng.permutation(POSITION_NAMES)[:n]
    things = []
    for pos in positions:
        colour = rng.choice([c for c in COLOUR_NAMES if c != bg])
        things.append(
            Thing(
                shape=str(rng.choice(shapes)),
                colour=str(colour),
                size=str(rng.choice(SIZE_NAMES)),
                position=str(pos),
                pattern=str(rng.choice(patterns, p=_pattern_probs(patterns))),
                rotation=float(rng.uniform(-math.pi, math.pi)),
                dx=float(rng.uniform(-JITTER, JITTER)),
                dy=float(rng.uniform(-JITTER, JITTER)),
            )
        )
    return Scene(bg, tuple(things))


def _pattern_probs(patterns: list[str]) -> list[float]:
    w = [2.0 if p == "solid" else 1.0 for p in patterns]
    return [x / sum(w) for x in w]


def randomise(scene: Scene, rng: np.random.Generator) -> Scene:
    """Draw the uncaptioned freedoms (rotation, jitter) for a nominal scene, e.g. one parsed from a prompt."""
    if scene.logo:
        return scene
    return replace(
        scene,
        things=tuple(
            replace(
                t,
                rotation=float(rng.uniform(-math.pi, math.pi)),
                dx=float(rng.uniform(-JITTER, JITTER)),
                dy=float(rng.uniform(-JITTER, JITTER)),
            )
            for t in scene.things
        ),
    )


# ---------------------------------------------------------------------------------------------- rendering


def _grid(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    n = SIZE * SUPERSAMPLE
    c = (torch.arange(n, device=device, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x, y


def _inside(shape: str, u: torch.Tensor, v: torch.Tensor, r: float) -> torch.Tensor:
    """Membership in a shape of radius r centred at the origin, in the shape's own (rotated) frame."""
    if shape == "circle":
        return u * u + v * v <= r * r
    if shape == "square":
        h = r * 0.82
        return (u.abs() <= h) & (v.abs() <= h)
    if shape == "triangle":
        # equilateral, circumradius r*1.1, apex up (v grows downwards in image space)
        R = r * 1.15
        inside = torch.ones_like(u, dtype=torch.bool)
        for k in range(3):
            a = -math.pi / 2 + k * 2 * math.pi / 3  # vertex directions
            nx, ny = -math.cos(a), -math.sin(a)  # edge opposite each vertex has inward normal towards it
            inside &= (u * nx + v * ny) <= R * 0.5
        return inside
    if shape == "heart":
        s = r * 0.95
        x, y = u / s, -(v / s) + 0.25
        return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


def _pattern(pattern: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Where the pattern's second colour shows (in the object's own frame)."""
    if pattern == "solid":
        return torch.zeros_like(u, dtype=torch.bool)
    if pattern == "dotted":
        pu = torch.remainder(u + 2.5, 5.0) - 2.5
        pv = torch.remainder(v + 2.5, 5.0) - 2.5
        return pu * pu + pv * pv <= 1.3**2
    if pattern == "striped":
        return torch.remainder(u + v, 6.0) < 3.0
    raise ValueError(f"unknown pattern {pattern!r}")


def render_scenes(scenes: list[Scene], device: torch.device | str = "cpu") -> torch.Tensor:
    """Render scenes to a float tensor (B, 3, 64, 64) in [0, 1]. Deterministic for a given scene list."""
    device = torch.device(device)
    gx, gy = _grid(device)
    out = []
    for scene in scenes:
        if scene.loose:
            raise ValueError(f"a loose scene has no single picture (fill its unsaid fields first): {scene.caption()!r}")
        img = torch.tensor(COLOURS[scene.background], device=device, dtype=torch.float32).view(3, 1, 1) / 255.0
        img = img.expand(3, *gx.shape).clone()
        for t in scene.things:
            cx, cy = POSITIONS[t.position]
            cx, cy = cx + t.dx, cy + t.dy
            r = sum(SIZES[t.size]) / 2
            cos, sin = math.cos(t.rotation), math.sin(t.rotation)
            du, dv = gx - cx, gy - cy
            u = cos * du + sin * dv
            v = -sin * du + cos * dv
            mask = _inside(t.shape, u, v, r)
            fill = torch.tensor(COLOURS[t.colour], device=device, dtype=torch.float32) / 255.0
            second = torch.tensor(COLOURS[contrast_colour(t.colour)], device=device, dtype=torch.float32) / 255.0
            pat = _pattern(t.pattern, u, v)
            colour = torch.where(pat.unsqueeze(0), second.view(3, 1, 1), fill.view(3, 1, 1))
            img = torch.where(mask.unsqueeze(0), colour, img)
        out.append(torch.nn.functional.avg_pool2d(img.unsqueeze(0), SUPERSAMPLE))
    return torch.cat(out)


def render(scene: Scene) -> np.ndarray:
    """One scene as a uint8 HxWx3 array."""
    return to_uint8(render_scenes([scene])[0])


def to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def foreground_mask(scene: Scene, device: torch.device | str = "cpu") -> torch.Tensor:
    """(64, 64) bool: where the scene's objects are (union), at pixel resolution."""
    gx, gy = _grid(torch.device(device))
    m = torch.zeros_like(gx, dtype=torch.bool)
    for t in scene.things:
        cx, cy = POSITIONS[t.position]
        r = sum(SIZES[t.size]) / 2
        cos, sin = math.cos(t.rotation), math.sin(t.rotation)
        du, dv = gx - cx - t.dx, gy - cy - t.dy
        m |= _inside(t.shape, cos * du + sin * dv, -sin * du + cos * dv, r)
    return torch.nn.functional.avg_pool2d(m.float()[None, None], SUPERSAMPLE)[0, 0] > 0.5


# ---------------------------------------------------------------------------------------- prompt sets


def all_base_captions(max_things: int = 1) -> list[str]:
    """Every single-object caption of the base world (8 bg x 7 colours x 3 shapes x 2 sizes x 5 pos x 2)."""
    caps = []
    for bg in COLOUR_NAMES:
        for colour in COLOUR_NAMES:
            if colour == bg:
                continue
            for shape in BASE_SHAPES:
                for size in SIZE_NAMES:
                    for pos in POSITION_NAMES:
                        for pattern in BASE_PATTERNS:
                            caps.append(Scene(bg, (Thing(shape, colour, size, pos, pattern),)).caption())
    return caps


def held_out_loose_captions(n: int = 200, seed: int = 4321) -> list[str]:
    """A fixed set of single-object loose captions (1-3 of size, colour, position, background unsaid),
    never used for training: the prompts on which an undistilled model's few-step samples average modes."""
    rng = np.random.default_rng(seed)
    fields = ["size", "colour", "position", "background"]
    out: set[str] = set()
    caps = all_base_captions()
    while len(out) < n:
        s = parse_caption(caps[rng.integers(len(caps))])
        gone = set(rng.permutation(fields)[: rng.integers(1, 4)])
        t = replace(s.things[0], **{f: None for f in ("size", "colour", "position") if f in gone})
        out.add(Scene(None if "background" in gone else s.background, (t,)).caption())
    return sorted(out)


def held_out_captions(n: int = 200, seed: int = 1234) -> list[str]:
    """A fixed set of single-object base-world captions never used for training the base model."""
    caps = all_base_captions()
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(caps))[:n]
    return sorted(caps[i] for i in idx)
