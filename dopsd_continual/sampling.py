"""Sampling from any version: the pipeline's own `__call__`, merged weights, CPU generators per seed.

Because the noise comes from `torch.Generator("cpu").manual_seed(seed)` and the weights are base + the
chain's deltas merged, an exported LoRA loaded into plain diffusers reproduces the same picture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .models import load_pipeline
from .stack import WeightSwitcher, get_version
from .store import State, atomic_write


class Sampler:
    """A loaded pipeline that can be switched between versions (merge kept per version in memory)."""

    def __init__(self, state: State, device: str | None = None):
        self.state = state
        self.recipe = state.recipe
        self.pipe = load_pipeline(state.recipe, device)
        self.switch = WeightSwitcher(self.pipe.transformer)

    def call_kwargs(self, steps: int) -> dict:
        m = self.recipe["model"]
        kw = {"num_inference_steps": steps, "guidance_scale": 1.0, "height": m["height"], "width": m["width"],
              "max_sequence_length": m["max_sequence_length"]}
        if m["backend"] == "flux2-klein":
            kw["text_encoder_out_layers"] = tuple(m["text_encoder_out_layers"])
        return kw

    def images(self, prompts: list[str], seeds: list[int], steps: int, version: str,
               references: list[Image.Image] | None = None, batch: int = 32) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1]. With references, each prompt is run on klein's reference-image path."""
        get_version(self.state, version)
        self.switch.set(self.state, version)
        out = []
        with torch.no_grad():
            if references is not None:
                instr = self.recipe["model"]["teacher_instruction"]
                for p, s, ref in zip(prompts, seeds, references):
                    r = self.pipe(prompt=f"{instr} {p}", image=[ref], generator=torch.Generator("cpu").manual_seed(s),
                                  output_type="pt", **self.call_kwargs(steps))
                    out.append(r.images.float().cpu())
            else:
                for i in range(0, len(prompts), batch):
                    ps, ss = prompts[i : i + batch], seeds[i : i + batch]
                    gens = [torch.Generator("cpu").manual_seed(s) for s in ss]
                    r = self.pipe(prompt=ps, generator=gens, output_type="pt", **self.call_kwargs(steps))
                    out.append(r.images.float().cpu())
        return torch.cat(out)


def image_tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255


def to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray((img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or min(len(images), 8)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    return sheet


def save_png(image: Image.Image, path: Path, meta: dict) -> None:
    import io

    info = PngInfo()
    for k, v in meta.items():
        info.add_text(k, v if isinstance(v, str) else json.dumps(v))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write(Path(path), buf.getvalue())


def sample(state: State, prompt: str, version: str | None, steps: int | None, seed: int, n: int, out: Path | None,
           sampler: Sampler | None = None) -> dict:
    version = version or state.active_version
    steps = steps or state.recipe["model"]["steps"]
    if n < 1:
        from .errors import UserError

        raise UserError("-n must be at least 1")
    sampler = sampler or Sampler(state)
    imgs = sampler.images([prompt] * n, [seed + i for i in range(n)], steps, version)
    pil = [to_pil(x) for x in imgs]
    image = pil[0] if n == 1 else grid(pil)
    out = Path(out) if out else Path(f"sample-{version}-s{seed}.png")
    meta = {"prompt": prompt, "seed": seed, "steps": steps, "version": version,
            "model": state.recipe["model"]["name"], "n": n}
    save_png(image, out, meta)
    return {"path": str(out), "version": version, "seed": seed, "steps": steps, "prompt": prompt, "n": n}
