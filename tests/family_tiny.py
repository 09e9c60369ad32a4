"""A test-only model family, written by following docs/families.md: diffusers' FLUX.2-klein pipeline class at
tiny random weights, with choices of its own where the guide offers them: the teacher sees the caption's plain
text (no instruction) beside the target's latents, roll-outs use a linear schedule, and the gate has no
reference path to sample. It uses the pipeline's own methods, nothing of the package's klein module.

A recipe names it `model.backend = "family_tiny:FAMILY"` (this folder on PYTHONPATH); `build(folder)`
writes its weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from diffusers import Flux2KleinPipeline

from dopsd_continual.families import Family, param_fingerprint


def _ids(b: int, grid: tuple[int, int], n_text: int, device, reference: bool):
    txt = Flux2KleinPipeline._prepare_text_ids(torch.empty(b, n_text, 1)).to(device)
    img = Flux2KleinPipeline._prepare_latent_ids(torch.empty(b, 1, *grid)).to(device)
    ref = Flux2KleinPipeline._prepare_image_ids([torch.empty(1, 1, *grid)]).repeat(b, 1, 1).to(device) if reference else None
    return txt, img, ref


class TinyBackend:
    def __init__(self, pipe, recipe: dict, device):
        self.pipe, self.model, self.device = pipe, recipe["model"], torch.device(device)
        self.transformer = pipe.transformer
        f = pipe.vae_scale_factor * 2
        self.grid = (self.model["height"] // f, self.model["width"] // f)

    @property
    def encoder_id(self) -> str:
        ident = [param_fingerprint(self.pipe.text_encoder), param_fingerprint(self.pipe.vae),
                 self.model["max_sequence_length"], self.model["height"], self.model["width"]]
        return "tiny-" + hashlib.sha256(repr(ident).encode()).hexdigest()[:12]

    def release_encoders(self) -> None:
        pass

    def features(self, caption: str, image: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            text = FAMILY.encode_prompts(self.pipe, [caption], self.model)[0].float().cpu()
            vae = self.pipe.vae
            lat = self.pipe._encode_vae_image((image.unsqueeze(0) * 2 - 1).to(vae.device, vae.dtype), generator=None)
            return {"student_text": text, "teacher_text": text, "latents": self.pipe._pack_latents(lat)[0].float().cpu()}

    def conditions(self, feats: list[dict], teacher: bool):
        emb = torch.stack([f["student_text"] for f in feats]).to(self.device, self.transformer.dtype)
        txt, img, ref_ids = _ids(len(feats), self.grid, emb.shape[1], self.device, teacher)
        ref = torch.stack([f["latents"] for f in feats]).to(self.device) if teacher else None
        return emb, txt, img, ref, ref_ids

    def velocity(self, x, sigma, cond) -> torch.Tensor:
        return FAMILY.velocity(self.transformer, x, sigma, cond)

    def sigmas(self, k: int, schedule="pipeline") -> list[float]:
        if isinstance(schedule, list):
            return [float(s) for s in schedule] + ([0.0] if schedule[-1] != 0 else [])
        return [1 - i / k for i in range(k)] + [0.0]


class Tiny(Family):
    name = "tiny"
    pipeline = "Flux2KleinPipeline"
    guidance = 1.0
    reference_path = False

    def backend(self, pipe, recipe, device, encoders=True):
        return TinyBackend(pipe, recipe, device)

    def encode_prompts(self, pipe, prompts, model):
        emb, _ = pipe.encode_prompt(prompt=list(prompts), device=pipe.text_encoder.device,
                                    max_sequence_length=model["max_sequence_length"],
                                    text_encoder_out_layers=tuple(model["text_encoder_out_layers"]))
        return list(emb)

    def meta_inputs(self, transformer, model, tokens, b, text_len, reference=False):
        grid = (tokens[0] // 2, tokens[1] // 2)
        c = transformer.config
        x = torch.empty(b, grid[0] * grid[1], c.in_channels, device="meta")
        emb = torch.empty(b, text_len, c.joint_attention_dim, device="meta", dtype=transformer.dtype)
        txt, img, ref_ids = _ids(b, grid, text_len, "meta", reference)
        return x, (emb, txt, img, torch.empty_like(x) if reference else None, ref_ids)

    def velocity(self, transformer, x, sigma, cond):
        emb, txt, img, ref, ref_ids = cond
        n = x.shape[1]
        hidden, ids = (x, img) if ref is None else (torch.cat([x, ref], 1), torch.cat([img, ref_ids], 1))
        out = transformer(hidden_states=hidden.to(transformer.dtype), timestep=sigma.to(hidden.dtype), guidance=None,
                          encoder_hidden_states=emb, txt_ids=txt, img_ids=ids, return_dict=False)[0]
        return out[:, :n].float()


FAMILY = Tiny()


class CountJudge:
    """A judge from outside the package (`[gate] judges = ["family_tiny:CountJudge"]`): what it was shown."""

    def __init__(self, recipe: dict):
        self.seeds = len(recipe["gate"]["seeds"])

    def __call__(self, evidence) -> dict:
        return {"judged_pictures": float(len(evidence.prompts)), "judged_concepts": float(len(evidence.round_samples))}


def build(folder: Path) -> None:
    """Tiny random weights through the pipeline's own `save_pretrained`, for `from_pretrained` to load."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from gpu_e2e import build_klein

    torch.manual_seed(0)
    build_klein(True, folder, "cpu")
