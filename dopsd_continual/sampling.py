"""Sampling from any version: the pipeline's own `__call__`, merged weights, CPU generators per seed.

Because the noise comes from `torch.Generator("cpu").manual_seed(seed)` and the weights are base + the
chain's deltas merged, an exported LoRA loaded into plain diffusers reproduces the same picture (exactly in
float32; in bf16 up to the rounding of the merged weights, see docs/GPU.md).

Each model is sampled the way its pipeline natively samples its step-distilled model: at its family's
`guidance` (no classifier-free guidance), with its family's prompt encoding and latent decoding.
The text encoder runs once per prompt and leaves the GPU before the transformer samples; `dopsd sample`
keeps each prompt's features on disk (state/cache/prompts/, keyed by the text encoder's files and the prompt
settings), so a prompt seen before needs no text encoder, not even loaded. Latents are decoded in
micro-batches sized to the picture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from PIL import Image

from .families import family
from .files import private_dirs
from .models import load_pipeline
from .pictures import OUTPUT_FORMATS, grid, image_tensor, output_path, request, save_image, to_pil  # noqa: F401 (sampling's own words)
from .placement import PhaseLog, Placement, compute_device
from .stack import WeightSwitcher, get_version
from .store import State

DECODE_PIXELS = 2 * 1024 * 1024  # pixels decoded per VAE call (two 1024 px pictures)
TILE_ABOVE_PIXELS = 1536 * 1536  # larger pictures decode in VAE tiles


PROMPTS_KEPT = 256  # prompt features kept on disk per text encoder (the least recently used go)


class PromptCache:
    """state/cache/prompts/<text encoder files + settings>/<prompt hash>.safetensors: `dopsd sample`'s prompts."""

    def __init__(self, state: State):
        from .models import files_fingerprint

        m = state.recipe["model"]
        files = files_fingerprint(m, "text_encoder")
        self.dir = None
        if files is not None:
            import hashlib
            from importlib.metadata import version

            libs = [version("diffusers"), version("transformers"), torch.__version__]  # encode_prompt's code
            how = json.dumps([files, libs, m["backend"], m["dtype"], m["max_sequence_length"], m["text_encoder_out_layers"]])
            self.dir = state.cache / "prompts" / hashlib.sha256(how.encode()).hexdigest()[:16]

    def path(self, prompt: str) -> Path | None:
        import hashlib

        return None if self.dir is None else self.dir / f"{hashlib.sha256(prompt.encode()).hexdigest()[:32]}.safetensors"

    def has(self, prompts: list[str]) -> bool:
        return all((p := self.path(x)) is not None and p.exists() for x in prompts)

    def get(self, prompt: str):
        from .store import load_compact

        path = self.path(prompt)
        if path is None or not path.exists():
            return None
        try:
            feats = load_compact(path)["features"]
        except Exception:
            path.unlink(missing_ok=True)  # a damaged entry is computed again, never trusted
            return None
        try:
            os.utime(path)  # recently used: kept
        except OSError:
            pass
        return feats

    def put(self, prompt: str, feats) -> None:
        from .store import save_compact

        path = self.path(prompt)
        if path is None:
            return
        try:
            private_dirs(self.dir)
            tmp = path.with_name(path.name + ".tmp")
            save_compact({"features": feats}, tmp)
            tmp.replace(path)
            kept = sorted(self.dir.glob("*.safetensors"), key=lambda f: f.stat().st_mtime, reverse=True)
            for old in kept[PROMPTS_KEPT:]:
                old.unlink(missing_ok=True)
        except OSError:
            pass  # a full or read-only disk costs the next cold sample its text encoder, nothing else


class NoTextEncoder(LookupError):
    """A sampler loaded without its text encoder (every prompt was on disk) met a prompt that is not."""


class Sampler:
    """A loaded pipeline that can be switched between versions (merge kept per version in memory)."""

    def __init__(self, state: State, device: str | None = None, encoders: bool = True,
                 prompt_cache: bool | PromptCache = False, one_shot: bool = False):
        """prompt_cache: prompt features on disk (True: this state's PromptCache, or one already made);
        one_shot: this process draws once and exits (placement.Placement's one_shot)."""
        self.state = state
        if isinstance(prompt_cache, bool):
            prompt_cache = PromptCache(state) if prompt_cache else None
        self.prompt_cache = None if state.readonly else prompt_cache
        self.recipe = state.recipe
        self.family = family(state.recipe)
        self.device = compute_device(device)
        self.pipe = load_pipeline(state.recipe, self.device, encoders)
        self.switch = WeightSwitcher(self.pipe.transformer)
        self._features: dict[str, object] = {}  # prompt -> text features in CPU memory (this process)
        m = self.recipe["model"]
        self.batches = self.plan_batches()
        self.place = Placement(self.pipe, self.device, keep_all=bool(self.batches.get("keep_all")), one_shot=one_shot)
        tiled = m["height"] * m["width"] > TILE_ABOVE_PIXELS or self.batches.get("decode_tiled")
        if tiled and hasattr(self.pipe.vae, "enable_tiling"):
            self.pipe.vae.enable_tiling()

    def rest(self) -> None:
        """Between pictures (the daemon's drawing process, a dashboard's renders): the model stays on the card
        where a round beside it would still have its room (memory.room_beside), else waits in pinned CPU
        memory, from where the next picture brings it back."""
        from . import memory

        try:
            stays = memory.room_beside(self.recipe, self.device)
        except Exception as e:  # no plan (no config files, say): the card is left to others
            import logging

            logging.getLogger("dopsd").warning("memory plan unavailable (%s): the model waits in CPU memory",
                                               str(e).splitlines()[0])
            stays = False
        if not stays:
            self.place.park()

    def plan_batches(self) -> dict[str, int]:
        """Pictures per pipeline call, latents per VAE decode and prompts per encoder call: from the memory
        accountant on a GPU (what the card's budget holds), fixed sizes on a CPU."""
        from . import memory

        m = self.recipe["model"]
        fixed = {"sample": memory.MAX_SAMPLE_BATCH, "decode": max(1, DECODE_PIXELS // (m["height"] * m["width"])),
                 "encode": memory.MAX_ENCODE_BATCH}
        try:
            plan = memory.placement_plan(self.recipe, self.device)
        except Exception as e:  # a plan that cannot be made (no config files, say) costs speed, never the picture
            import logging

            logging.getLogger("dopsd").warning("memory plan unavailable (%s): fixed batch sizes", str(e).splitlines()[0])
            return fixed
        if plan is None:
            return fixed
        return {"sample": max(1, plan.batches["sample"]), "decode": max(1, plan.batches["decode"]),
                "encode": max(1, plan.batches["encode"]), "decode_tiled": plan.batches.get("decode_tiled", 0),
                "keep_all": int(plan.keep_all)}

    def call_kwargs(self, steps: int) -> dict:
        m = self.recipe["model"]
        return {"num_inference_steps": steps, "guidance_scale": self.family.guidance, "height": m["height"],
                "width": m["width"]}

    def prompt_features(self, prompts: list[str]) -> list:
        """Each prompt's text features as the pipeline's own encode_prompt makes them (CPU, float32)."""
        m = self.recipe["model"]
        missing = [p for p in dict.fromkeys(prompts) if p not in self._features]
        if missing and self.prompt_cache is not None:
            for p in list(missing):
                if (f := self.prompt_cache.get(p)) is not None:
                    self._features[p] = f
                    missing.remove(p)
        if missing and getattr(self.pipe, "text_encoder", None) is None:
            raise NoTextEncoder(f"{len(missing)} prompt(s) not on disk and no text encoder loaded")
        if missing:
            self.place.use("encode")
            with torch.no_grad():
                per = self.batches["encode"]
                for i in range(0, len(missing), per):
                    chunk = missing[i : i + per]  # encode_prompt may rewrite the list it is given: pass copies
                    feats = self.family.encode_prompts(self.pipe, list(chunk), m)
                    for p, f in zip(chunk, feats):
                        self._features[p] = f.detach().to("cpu")
                        if self.prompt_cache is not None:
                            self.prompt_cache.put(p, self._features[p])
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


def draw(state: State, req: dict, sampler: Sampler | None = None) -> tuple[Image.Image, dict, dict]:
    """The picture (a grid for n > 1), the fields its file carries, and what each phase cost. Without a
    sampler one is loaded here, without the text encoder when the prompt's features are on disk."""
    phases = PhaseLog(sampler.device if sampler else compute_device())
    with phases("load"):
        if sampler is None:
            prompts = PromptCache(state)
            cached = prompts.has([req["prompt"]]) and not state.readonly
            sampler = Sampler(state, encoders=not cached, prompt_cache=prompts, one_shot=True)
    n, seed = req["n"], req["seed"]
    job = ([req["prompt"]] * n, [seed + i for i in range(n)], req["steps"], req["version"])
    with phases("sample"):
        try:
            imgs = sampler.images(*job)
        except NoTextEncoder:  # the prompt's features went from disk since we looked: load the encoder after all
            sampler = Sampler(state, prompt_cache=True)
            imgs = sampler.images(*job)
    pil = [to_pil(x) for x in imgs]
    image = pil[0] if n == 1 else grid(pil)
    meta = {"prompt": req["prompt"], "seed": seed, "steps": req["steps"], "version": req["version"],
            "model": state.recipe["model"]["name"], "n": n}
    return image, meta, phases.records


def sample(state: State, prompt: str, version: str | None, steps: int | None, seed: int, n: int, out: Path | None,
           sampler: Sampler | None = None) -> dict:
    """`dopsd sample` in this process: draw, then write the file."""
    req = request(state, prompt, version, steps, seed, n)
    out = output_path(out, req["version"], seed)
    image, meta, phases = draw(state, req, sampler)
    save_image(image, out, meta)
    return {"path": str(out), **req, "phases": phases}


def render(state: State, sampler: Sampler, job: dict) -> dict:
    """A picture asked of a loaded model, by the CLI through the daemon or by the dashboard: {"kind": "sample",
    "req": request(...)} -> {"png", "meta", "phases"}; {"kind": "compare", "a", "b"} -> {"png", "prompts"} (both
    versions on the gate's first held-out prompts and seed, a over b)."""
    from .errors import UserError
    from .pictures import encoded  # PNG: lossless, so a client encodes its file as it would have

    if job.get("kind") == "sample":
        r = job["req"]
        req = request(state, r["prompt"], r.get("version"), r.get("steps"), r.get("seed", 0), r.get("n", 1))
        image, meta, phases = draw(state, req, sampler)
        return {"png": encoded(image, "PNG", meta), "meta": meta, "phases": phases}  # lossless, fields inside
    if job.get("kind") == "compare":
        from .gate import held_out_prompts

        prompts = held_out_prompts(state.recipe)[:6]
        seeds = [int(s) for s in state.recipe["gate"]["seeds"]][:1] * len(prompts)
        rows = [sampler.images(prompts, seeds, state.recipe["model"]["steps"], v) for v in (job["a"], job["b"])]
        sheet = grid([to_pil(x) for row in rows for x in row], cols=len(prompts))
        return {"png": encoded(sheet, "PNG", {}), "prompts": prompts}
    raise UserError(f"unknown picture job {job.get('kind')!r}")
