"""Sampling from any version: the pipeline's own `__call__`, merged weights, CPU generators per seed.

Because the noise comes from `torch.Generator("cpu").manual_seed(seed)` and the weights are base + the
chain's deltas merged, an exported LoRA loaded into plain diffusers reproduces the same picture (exactly in
float32; in bf16 up to the rounding of the merged weights, see docs/GPU.md).

Each model is sampled the way its pipeline natively samples its step-distilled model: at its family's
`guidance` (no classifier-free guidance), with its family's prompt encoding and latent decoding.
The text encoder runs once per prompt (features kept per process) and leaves the GPU before the
transformer samples; latents are decoded in micro-batches sized to the picture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .families import family
from .models import load_pipeline
from .placement import PhaseLog, Placement, compute_device
from .stack import WeightSwitcher, get_version
from .store import State, atomic_write, user_file_mode

DECODE_PIXELS = 2 * 1024 * 1024  # pixels decoded per VAE call (two 1024 px pictures)
TILE_ABOVE_PIXELS = 1536 * 1536  # larger pictures decode in VAE tiles


class Sampler:
    """A loaded pipeline that can be switched between versions (merge kept per version in memory)."""

    def __init__(self, state: State, device: str | None = None, encoders: bool = True):
        self.state = state
        self.recipe = state.recipe
        self.family = family(state.recipe)
        self.device = compute_device(device)
        self.pipe = load_pipeline(state.recipe, self.device, encoders)
        self.place = Placement(self.pipe, self.device)
        self.switch = WeightSwitcher(self.pipe.transformer)
        self._features: dict[str, object] = {}  # prompt -> text features in CPU memory (this process)
        m = self.recipe["model"]
        self.batches = self.plan_batches()
        tiled = m["height"] * m["width"] > TILE_ABOVE_PIXELS or self.batches.get("decode_tiled")
        if tiled and hasattr(self.pipe.vae, "enable_tiling"):
            self.pipe.vae.enable_tiling()

    def plan_batches(self) -> dict[str, int]:
        """Pictures per pipeline call, latents per VAE decode and prompts per encoder call: from the memory
        accountant on a GPU (what the card's budget holds), fixed sizes on a CPU."""
        from . import memory

        m = self.recipe["model"]
        fixed = {"sample": memory.MAX_SAMPLE_BATCH, "decode": max(1, DECODE_PIXELS // (m["height"] * m["width"])),
                 "encode": memory.MAX_ENCODE_BATCH}
        try:
            plan = memory.device_plan(self.recipe, self.device)
        except Exception as e:  # a plan that cannot be made (no config files, say) costs speed, never the picture
            import logging

            logging.getLogger("dopsd").warning("memory plan unavailable (%s): fixed batch sizes", str(e).splitlines()[0])
            return fixed
        if plan is None:
            return fixed
        return {"sample": max(1, plan.batches["sample"]), "decode": max(1, plan.batches["decode"]),
                "encode": max(1, plan.batches["encode"]), "decode_tiled": plan.batches.get("decode_tiled", 0)}

    def call_kwargs(self, steps: int) -> dict:
        m = self.recipe["model"]
        return {"num_inference_steps": steps, "guidance_scale": self.family.guidance, "height": m["height"],
                "width": m["width"]}

    def prompt_features(self, prompts: list[str]) -> list:
        """Each prompt's text features as the pipeline's own encode_prompt makes them (CPU, float32)."""
        m = self.recipe["model"]
        missing = [p for p in dict.fromkeys(prompts) if p not in self._features]
        if missing:
            self.place.use("encode")
            with torch.no_grad():
                per = self.batches["encode"]
                for i in range(0, len(missing), per):
                    chunk = missing[i : i + per]  # encode_prompt may rewrite the list it is given: pass copies
                    feats = self.family.encode_prompts(self.pipe, list(chunk), m)
                    for p, f in zip(chunk, feats):
                        self._features[p] = f.detach().to("cpu")
        return [self._features[p] for p in prompts]

    def _embeds_arg(self, feats: list):
        return self.family.prompt_embeds(feats, self.device, self.pipe.transformer.dtype)

    def images(self, prompts: list[str], seeds: list[int], steps: int, version: str,
               references: list[Image.Image] | None = None, batch: int | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1]. With references, each prompt is run on the family's reference-image path.
        batch: pictures per pipeline call (default: the plan's); the pictures do not depend on it beyond
        the float rounding of batched kernels."""
        batch = batch or self.batches["sample"]
        get_version(self.state, version)
        if references is not None:
            from .recipe import teacher_text

            prompts = [teacher_text(p, self.recipe["model"]) for p in prompts]
        feats = self.prompt_features(prompts)
        self.place.use("sample")
        self.switch.set(self.state, version)
        latents = []
        with torch.no_grad():
            if references is not None:
                for f, s, ref in zip(feats, seeds, references):
                    r = self.pipe(prompt_embeds=self._embeds_arg([f]), image=[ref], output_type="latent",
                                  generator=torch.Generator("cpu").manual_seed(s), **self.call_kwargs(steps))
                    latents.append(r.images)
            else:
                for i in range(0, len(prompts), batch):
                    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds[i : i + batch]]
                    r = self.pipe(prompt_embeds=self._embeds_arg(feats[i : i + batch]), generator=gens,
                                  output_type="latent", **self.call_kwargs(steps))
                    latents.append(r.images)
            return self.decode(torch.cat(latents))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's own decode of output_type="latent" results, in micro-batches; (B, 3, H, W) on the CPU."""
        vae = self.pipe.vae
        per = self.batches["decode"]
        out = []
        for i in range(0, latents.shape[0], per):
            lat = self.family.decode_input(vae, latents[i : i + per].to(vae.device, vae.dtype))
            img = vae.decode(lat, return_dict=False)[0]
            out.append(self.pipe.image_processor.postprocess(img, output_type="pt").float().cpu())
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


OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def save_image(image: Image.Image, path: Path, meta: dict) -> None:
    """Encoded by the suffix: PNG with one text chunk per field; JPEG with the fields as a JSON comment; WebP
    as a JSON EXIF ImageDescription. Every format says what made it."""
    import io

    fmt = OUTPUT_FORMATS[Path(path).suffix.lower()]
    buf = io.BytesIO()
    if fmt == "PNG":
        info = PngInfo()
        for k, v in meta.items():
            info.add_text(k, v if isinstance(v, str) else json.dumps(v))
        image.save(buf, format="PNG", pnginfo=info)
    elif fmt == "JPEG":
        image.save(buf, format="JPEG", quality=95, comment=json.dumps(meta).encode())
    else:
        exif = Image.Exif()
        exif[0x010E] = json.dumps(meta)  # ImageDescription
        image.save(buf, format="WEBP", quality=95, exif=exif)
    atomic_write(Path(path), buf.getvalue(), mode=user_file_mode())  # the user's picture: their usual mode


def output_path(out: Path | None, version: str, seed: int) -> Path:
    """Where `dopsd sample` writes: a file by its suffix, or a default name inside an existing folder."""
    from .errors import UserError

    default = f"sample-{version}-s{seed}.png"
    if out is None:
        return Path(default)
    out = Path(out)
    if out.is_dir():
        return out / default
    if out.suffix.lower() not in OUTPUT_FORMATS:
        raise UserError(f"--out {out}: the name must end in {', '.join(OUTPUT_FORMATS)} (or be an existing folder)")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    return out


def sample(state: State, prompt: str, version: str | None, steps: int | None, seed: int, n: int, out: Path | None,
           sampler: Sampler | None = None) -> dict:
    from .errors import UserError
    from .stack import get_version

    version = version or state.active_version
    get_version(state, version)  # an unknown id fails before the model loads
    steps = state.recipe["model"]["steps"] if steps is None else steps
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if n < 1:
        raise UserError("-n must be at least 1")
    out = output_path(out, version, seed)
    phases = PhaseLog(sampler.device if sampler else compute_device())
    with phases("load"):
        sampler = sampler or Sampler(state)
    with phases("sample"):
        imgs = sampler.images([prompt] * n, [seed + i for i in range(n)], steps, version)
    pil = [to_pil(x) for x in imgs]
    image = pil[0] if n == 1 else grid(pil)
    meta = {"prompt": prompt, "seed": seed, "steps": steps, "version": version,
            "model": state.recipe["model"]["name"], "n": n}
    save_image(image, out, meta)
    return {"path": str(out), "version": version, "seed": seed, "steps": steps, "prompt": prompt, "n": n,
            "phases": phases.records}
