"""The regression gate: held-out prompts at fixed seeds, candidate vs parent, at the native step count.

Metrics that need no downloads, each a plain function of image tensors (B, 3, H, W) in [0, 1]:
- drift: mean absolute pixel change on held-out prompts (they have nothing to do with the new samples);
- sharpness_ratio: high-frequency energy of the candidate over the parent's (the blur of naive tuning);
- colour_shift: change of per-channel mean and std; seed_diversity_ratio: spread across seeds (collapse);
- few_step_gap_ratio: |native-step - many-step| of the candidate over the parent's own gap;
- concept_gap: on the round's own captions, distance of the text-only sample to the teacher's
  reference-conditioned sample (did the student learn what the teacher shows), candidate vs parent;
  its ratio is the guard that separates a good round from plain SFT on the distilled model, which moves
  the few-step outputs away from what the model's own reference path draws (bench/gate_validation.py).
- neighbour_drift: on the prompts nearest the round's captions that do not name the round's concept (its
  trigger word and the words no held-out prompt uses), candidate vs parent: a round that turns "a green
  striped circle" into the heart it was shown changes what it was never asked to change.
The judges the recipe lists (`[gate] judges`: CLIP, DINO, the toy world's ground truth; judges.py) add
their own metrics from the same pictures. A candidate is accepted only if every guard holds; thresholds live
in the recipe's [gate] table.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from . import judges
from .checks import ALWAYS, checks
from .families import family
from .files import private_dirs
from .store import State, atomic_write, load_compact, save_compact

REPORT_CELL_PX = 256  # the side a report's pictures are shown at, at most: reports are kept for ever

# -------------------------------------------------------------------------------------------- metrics


def high_freq_energy(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute Laplacian per image (B,), the blur measure."""
    k = torch.tensor([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=x.dtype, device=x.device).view(1, 1, 3, 3)
    g = x.mean(1, keepdim=True)
    return F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), k).abs().mean(dim=(1, 2, 3))


def drift(cand: torch.Tensor, parent: torch.Tensor) -> float:
    return float((cand - parent).abs().mean())


def sharpness_ratio(cand: torch.Tensor, parent: torch.Tensor) -> float:
    return float(high_freq_energy(cand).mean() / high_freq_energy(parent).mean().clamp_min(1e-8))


def colour_shift(cand: torch.Tensor, parent: torch.Tensor) -> float:
    mc, mp = cand.mean(dim=(0, 2, 3)), parent.mean(dim=(0, 2, 3))
    sc, sp = cand.std(dim=(0, 2, 3)), parent.std(dim=(0, 2, 3))
    return float(((mc - mp).abs() + (sc - sp).abs()).mean())


def seed_diversity(images: torch.Tensor, n_seeds: int) -> float:
    """Mean per-pixel std across seeds of the same prompt (images ordered prompt-major)."""
    x = images.view(-1, n_seeds, *images.shape[1:])
    return float(x.std(dim=1).mean())


def few_step_gap(native: torch.Tensor, many: torch.Tensor) -> float:
    return float((native - many).abs().mean())


def ratio(a: float, b: float, eps: float = 1e-3) -> float:
    return (a + eps) / (b + eps)


# --------------------------------------------------------------------------------------------- prompts


def model_defaults(recipe: dict) -> dict:
    """What a model folder says of its own gate (`dopsd-gate.json`: "prompts", "judges"), where the recipe leaves
    them at their defaults: the toy model names its world's prompts and its ground-truth judge this way."""
    from .models import resolve_source

    try:
        source = resolve_source(recipe["model"]["source"])
        if isinstance(source, Path) and (source / "dopsd-gate.json").is_file():
            return json.loads((source / "dopsd-gate.json").read_text())
    except Exception:  # an unreadable or unresolvable model: the recipe's own settings
        pass
    return {}


def prompts_spec(recipe: dict):
    spec = recipe["gate"]["prompts"]
    return model_defaults(recipe).get("prompts", spec) if spec == "default" else spec


def judge_names(recipe: dict) -> list[str]:
    """The recipe's judges, or the model's own where the recipe lists none (CLIP / DINO where their model is set)."""
    g = dict(recipe["gate"])
    if not g.get("judges"):
        g["judges"] = list(model_defaults(recipe).get("judges", []))
    return judges.names(g)


def held_out_prompts(recipe: dict) -> list[str]:
    """gate.prompts: a list; a shipped list by name (recipes/prompts/NAME.txt; "default": the model folder's
    choice, else general.txt); or a file (one prompt a line, # comments)."""
    from .recipe import RECIPES_DIR

    spec = prompts_spec(recipe)
    if isinstance(spec, list):
        return [str(p) for p in spec]
    shipped = RECIPES_DIR / "prompts" / f"{'general' if spec == 'default' else spec}.txt"
    path = shipped if "/" not in spec and shipped.is_file() else Path(spec).expanduser()
    if not path.is_file():
        from .errors import UserError

        raise UserError(f"gate.prompts file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"[\w\[\]]+", text.lower())


def _edit_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def neighbour_prompts(captions: list[str], pool: list[str], trigger: str = "") -> list[str]:
    """For each caption, the pool's prompt nearest to it (fewest words changed) that names nothing of the
    round's concept: neither the trigger word nor any word of the caption that the pool never uses. In
    the pool's order for ties; each neighbour once."""
    vocab = {w for p in pool for w in _words(p)}
    out: list[str] = []
    for cap in captions:
        words = _words(cap)
        concept = {w for w in words if w not in vocab} | ({trigger.lower()} if trigger else set())
        allowed = [p for p in pool if not concept & set(_words(p)) and _words(p) != words]  # never itself
        if not allowed:
            continue
        best = min(allowed, key=lambda p: _edit_distance(words, _words(p)))
        if best not in out:
            out.append(best)
    return out


# ------------------------------------------------------------------------------------------------ gate


class Gate:
    def __init__(self, state: State, sampler):
        self.state, self.sampler = state, sampler
        self.recipe = state.recipe
        self.g = self.recipe["gate"]
        self.steps = self.recipe["model"]["steps"]
        self.prompts = held_out_prompts(self.recipe)
        self.seeds = [int(s) for s in self.g["seeds"]]
        self.family = family(self.recipe)
        self._judges: list | None = None

    # samples of a version are deterministic: cache them per version and prompt set
    def _cached(self, vid: str, tag: str, prompts: list[str], seeds: list[int], steps: int, refs=None) -> torch.Tensor:

        m = self.recipe["model"]  # which model drew them (another after `init --force` never reuses them)
        how = [m["name"], m["backend"], str(m["source"]), m["dtype"], m["height"], m["width"],
               getattr(getattr(self.sampler, "switch", None), "mode", None)]
        key = hashlib.sha256(json.dumps([tag, prompts, seeds, steps, refs is not None, how]).encode()).hexdigest()[:16]
        path = self.state.cache / "gate" / f"{vid}-{key}.safetensors"
        if path.exists():
            try:
                return load_compact(path)["images"]
            except Exception:
                path.unlink(missing_ok=True)
        imgs = self.sampler.images(prompts, seeds, steps, vid, references=refs)
        if not self.state.readonly:  # a read-only state is evaluated without keeping the samples
            private_dirs(path.parent)
            save_compact({"images": imgs}, path)  # bf16 where that is exact: a bf16 model's pictures
        return imgs

    def held_out(self, vid: str) -> torch.Tensor:
        prompts = [p for p in self.prompts for _ in self.seeds]
        seeds = [s for _ in self.prompts for s in self.seeds]
        return self._cached(vid, "held_out", prompts, seeds, self.steps)

    def many_step(self, vid: str) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = self.prompts[:8]
        seeds = [self.seeds[0]] * len(prompts)
        native = self._cached(vid, "gap_native", prompts, seeds, self.steps)
        many = self._cached(vid, "gap_many", prompts, seeds, self.steps * 8)
        return native, many

    def judges(self) -> list:
        """The recipe's judges, built on first use (a judge may load a scorer)."""
        if self._judges is None:
            self._judges = [judges.load(n, self.recipe) for n in judge_names(self.recipe)]
        return self._judges

    def texts(self, round_samples: list[dict]) -> list[str]:
        """Every text the gate samples: its held-out prompts, the round's captions and, where the family draws
        on a reference path, the teacher's instructed captions. Encoded in one visit of the text encoder."""
        caps = [s["caption"] for s in round_samples]
        out = list(self.prompts) + caps
        if self.family.reference_path:
            from .recipe import teacher_text

            out += [teacher_text(c, self.recipe["model"]) for c in caps]
        return out

    def metrics(self, vid: str, parent: str, round_samples: list[dict]) -> dict:
        t0 = time.time()
        self.sampler.prompt_features(self.texts(round_samples))  # the transformer then stays on the GPU
        cand, par = self.held_out(vid), self.held_out(parent)
        n_seeds = len(self.seeds)
        m: dict = {
            "drift": drift(cand, par),
            "sharpness_ratio": sharpness_ratio(cand, par),
            "colour_shift": colour_shift(cand, par),
            "seed_diversity_ratio": ratio(seed_diversity(cand, n_seeds), seed_diversity(par, n_seeds)) if n_seeds > 1 else 1.0,
        }
        cn, cm = self.many_step(vid)
        pn, pm = self.many_step(parent)
        m["few_step_gap"] = few_step_gap(cn, cm)
        m["few_step_gap_ratio"] = ratio(m["few_step_gap"], few_step_gap(pn, pm))
        if round_samples and self.family.reference_path:
            caps = [s["caption"] for s in round_samples]
            seeds = [1000 + i for i in range(len(caps))]
            refs = [s["image"] for s in round_samples]
            teacher = self._cached(parent, "teacher:" + ",".join(s["sha256"][:12] for s in round_samples), caps, seeds, self.steps, refs)
            stud_c = self._cached(vid, "concept", caps, seeds, self.steps)
            stud_p = self._cached(parent, "concept", caps, seeds, self.steps)
            m["concept_gap"] = float((stud_c - teacher).abs().mean())
            m["concept_gap_parent"] = float((stud_p - teacher).abs().mean())
            m["concept_gap_ratio"] = ratio(m["concept_gap"], m["concept_gap_parent"], eps=1e-6)
        neighbours = set(neighbour_prompts([s["caption"] for s in round_samples], self.prompts,
                                           self.recipe["ingest"]["trigger_word"]))
        per_picture = [p for p in self.prompts for _ in self.seeds]
        rows = [i for i, p in enumerate(per_picture) if p in neighbours]
        if rows:  # the held-out pictures of those prompts (every seed): nothing more to draw
            m["neighbour_drift"] = drift(cand[rows], par[rows])
        evidence = judges.Evidence(self.recipe, vid, parent, per_picture, cand, par, rows, round_samples,
                                   lambda v, tag, caps, seeds: self._cached(v, tag, caps, seeds, self.steps))
        for judge in self.judges():
            m.update(judge(evidence))
        m["gate_seconds"] = time.time() - t0
        return m

    def verdict(self, m: dict) -> list[str]:
        missing = ALWAYS - set(m)
        if missing:  # the gate measures these on every round: one missing is a bug, never a pass
            raise RuntimeError(f"the gate measured no {', '.join(sorted(missing))}")
        return [c["reason"] for c in checks(m, self.g) if not c["passed"]]

    def report(self, vid: str, parent: str, m: dict, reasons: list[str], round_samples: list[dict]) -> Path:
        """reports/<vid>.json and reports/<vid>.png (rows: parent, candidate; held-out then concept prompts; each
        picture at most REPORT_CELL_PX on a side)."""
        from .pictures import to_pil

        verdict = "rejected" if reasons else "accepted"
        body = {"version": vid, "parent": parent, "verdict": verdict, "reasons": reasons, "metrics": m,
                "thresholds": self.g, "held_out_prompts": self.prompts, "seeds": self.seeds}
        atomic_write(self.state.reports / f"{vid}.json", json.dumps(body, indent=2).encode())
        k = min(len(self.prompts), 12)
        cols = [self.held_out(parent)[:: len(self.seeds)][:k], self.held_out(vid)[:: len(self.seeds)][:k]]
        if round_samples:
            caps = [s["caption"] for s in round_samples]
            seeds = [1000 + i for i in range(len(caps))]
            cols[0] = torch.cat([cols[0], self._cached(parent, "concept", caps, seeds, self.steps)[:6]])
            cols[1] = torch.cat([cols[1], self._cached(vid, "concept", caps, seeds, self.steps)[:6]])
        from PIL import Image

        def cell(x) -> np.ndarray:  # kept for ever, so small: 36 pictures at 1024 px would be 38 megapixels
            pic = to_pil(x)
            if max(pic.size) > REPORT_CELL_PX:
                pic.thumbnail((REPORT_CELL_PX, REPORT_CELL_PX), Image.LANCZOS)
            return np.asarray(pic)

        rows = [np.concatenate([cell(x) for x in c], axis=1) for c in cols]

        sheet = Image.fromarray(np.concatenate(rows, axis=0))
        if sheet.height < 256:
            sheet = sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST)
        import io

        buf = io.BytesIO()
        sheet.save(buf, format="PNG")
        atomic_write(self.state.reports / f"{vid}.png", buf.getvalue())
        return self.state.reports / f"{vid}.json"

