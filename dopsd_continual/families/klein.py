"""FLUX.2-klein (and the toy model, which is klein at a small size): the family, its training backend, and its
tensors the way `Flux2KleinPipeline.__call__` builds them, for training loops.

The pipeline's `__call__` is the reference; these helpers call its own static methods so that a training
step sees exactly the tokens, position ids and timesteps that sampling sees:
- text: `encode_prompt` (chat template, padded to max_sequence_length, stacked hidden layers);
- image latents: VAE mode -> 2x2 patchify -> batch-norm statistics -> packed tokens;
- a reference image: the same tokens appended after the noisy ones, position ids with t = 10;
- velocity: `transformer(..., timestep=sigma)`; x0 = x - sigma * v; Euler step x += (s' - s) * v.
"""

from __future__ import annotations

import hashlib
import json

import torch

from ..recipe import teacher_text
from .base import Family, param_fingerprint


def encode_prompts(pipe, prompts: list[str], max_sequence_length: int, out_layers) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        embeds, text_ids = pipe.encode_prompt(
            prompt=list(prompts),
            device=pipe.text_encoder.device,
            max_sequence_length=max_sequence_length,
            text_encoder_out_layers=tuple(out_layers),
        )
    return embeds, text_ids


def encode_images(pipe, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """images (B, 3, H, W) in [0, 1] -> packed normalised latent tokens (B, N, C) and the token grid (h, w)."""
    vae = pipe.vae
    x = (images * 2 - 1).to(device=vae.device, dtype=vae.dtype)
    lat = pipe._encode_vae_image(x, generator=None)
    return pipe._pack_latents(lat), (lat.shape[2], lat.shape[3])


def latent_ids(batch: int, grid: tuple[int, int], device) -> torch.Tensor:
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline._prepare_latent_ids(torch.empty(batch, 1, grid[0], grid[1])).to(device)


def reference_ids(batch: int, grid: tuple[int, int], device) -> torch.Tensor:
    from diffusers import Flux2KleinPipeline

    ids = Flux2KleinPipeline._prepare_image_ids([torch.empty(1, 1, grid[0], grid[1])])
    return ids.repeat(batch, 1, 1).to(device)


def velocity(
    transformer,
    x: torch.Tensor,
    sigma: torch.Tensor,
    embeds: torch.Tensor,
    text_ids: torch.Tensor,
    img_ids: torch.Tensor,
    ref: torch.Tensor | None = None,
    ref_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The model's velocity at noisy tokens x (B, N, C) and noise level sigma (B,), as the pipeline calls it."""
    n = x.shape[1]
    hidden, ids = x, img_ids
    if ref is not None:
        hidden = torch.cat([x, ref], dim=1)
        ids = torch.cat([img_ids, ref_ids], dim=1)
    out = transformer(
        hidden_states=hidden.to(transformer.dtype),
        timestep=sigma.to(hidden.dtype),
        guidance=None,
        encoder_hidden_states=embeds,
        txt_ids=text_ids,
        img_ids=ids,
        return_dict=False,
    )[0]
    return out[:, :n]


def decode(pipe, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Packed normalised tokens -> images (B, 3, H, W) in [0, 1], as the pipeline's end does."""
    ids = latent_ids(tokens.shape[0], grid, tokens.device)
    lat = pipe._unpack_latents_with_ids(tokens, ids, grid[0], grid[1])
    vae = pipe.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(lat.device, lat.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(lat.device, lat.dtype)
    lat = pipe._unpatchify_latents(lat * std + mean)
    img = vae.decode(lat.to(vae.dtype), return_dict=False)[0]
    return ((img.float() + 1) / 2).clamp(0, 1)


def euler_sample(
    transformer, noise, sigmas, embeds, text_ids, img_ids, ref=None, ref_ids=None, *, uncond=None, guidance: float = 1.0
) -> torch.Tensor:
    """The pipeline's Euler loop on tokens (no grad). With uncond (the empty prompt's features, (1, L, D) or
    (B, L, D)) and guidance > 1: classifier-free guidance as the pipeline does it for an undistilled model,
    v = v(uncond) + guidance * (v(prompt) - v(uncond)), both halves in one batch."""
    x = noise
    guided = uncond is not None and guidance != 1.0
    b = x.shape[0]
    if guided:
        embeds = torch.cat([embeds, uncond.expand(b, -1, -1).to(embeds.dtype)])
        text_ids, img_ids = torch.cat([text_ids, text_ids]), torch.cat([img_ids, img_ids])
        if ref is not None:
            ref, ref_ids = torch.cat([ref, ref]), torch.cat([ref_ids, ref_ids])
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            xin = torch.cat([x, x]) if guided else x
            sig = torch.full((xin.shape[0],), float(s), device=x.device)
            v = velocity(transformer, xin, sig, embeds, text_ids, img_ids, ref, ref_ids).to(x.dtype)
            if guided:
                v = v[b:] + guidance * (v[:b] - v[b:])
            x = x + (float(s_next) - float(s)) * v
    return x


# ------------------------------------------------------------------------------------------- backend


class KleinBackend:
    """klein behind the training interface (`base.Backend`): the teacher sees the target's latents as
    reference tokens after the noisy ones, with the instructed caption."""

    def __init__(self, pipe, recipe: dict, device: torch.device | str = "cpu"):
        self.pipe = pipe
        self.model = recipe["model"]
        self.device = torch.device(device)
        self.transformer = pipe.transformer
        h, w = self.model["height"], self.model["width"]
        f = pipe.vae_scale_factor * 2
        self.grid = (h // f, w // f)

    @property
    def encoder_id(self) -> str:
        """Identifies the encoders and the prompt template: part of every cache key."""
        te = self.pipe.text_encoder.config.to_dict() if hasattr(self.pipe.text_encoder.config, "to_dict") else {}
        ident = {
            "source": str(self.model["source"]),
            "te": {k: te.get(k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
            "te_weights": param_fingerprint(self.pipe.text_encoder),
            "vae_weights": param_fingerprint(self.pipe.vae),
            "template": [self.model["max_sequence_length"], list(self.model["text_encoder_out_layers"]),
                         self.model["teacher_instruction"], self.model["height"], self.model["width"],
                         self.model.get("teacher_instruction_position", "after")],
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def release_encoders(self) -> None:
        """klein's encoders are the pipeline's own: the placement's next phase takes them off the GPU."""

    def encode(self, captions: list[str]) -> torch.Tensor:
        emb, _ = encode_prompts(self.pipe, captions, self.model["max_sequence_length"], self.model["text_encoder_out_layers"])
        return emb

    def features(self, caption: str, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything a round needs of one sample, computed once (then cached): no encoder runs while training."""
        with torch.no_grad():
            tokens, _ = encode_images(self.pipe, image.unsqueeze(0).to(self.device))
            return {
                "student_text": self.encode([caption])[0].float().cpu(),
                "teacher_text": self.encode([teacher_text(caption, self.model)])[0].float().cpu(),
                "latents": tokens[0].float().cpu(),
            }

    def text_ids(self, batch: int, length: int) -> torch.Tensor:
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline._prepare_text_ids(torch.empty(batch, length, 1)).to(self.device)

    def conditions(self, feats: list[dict], teacher: bool):
        b = len(feats)
        key = "teacher_text" if teacher else "student_text"
        emb = torch.stack([f[key] for f in feats]).to(self.device, self.transformer.dtype)
        cond = [emb, self.text_ids(b, emb.shape[1]), latent_ids(b, self.grid, self.device)]
        if teacher:
            ref = torch.stack([f["latents"] for f in feats]).to(self.device)
            return (*cond, ref, reference_ids(b, self.grid, self.device))
        return (*cond, None, None)

    def velocity(self, x, sigma, cond) -> torch.Tensor:
        return velocity(self.transformer, x, sigma, *cond).float()

    def sigmas(self, k: int, schedule="pipeline") -> list[float]:
        if isinstance(schedule, list):
            return [float(s) for s in schedule] + ([0.0] if schedule[-1] != 0 else [])
        import numpy as np
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        sched = self.pipe.scheduler
        mu = compute_empirical_mu(self.grid[0] * self.grid[1], k)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / k, k), mu=mu, device="cpu")
        return [float(s) for s in sched.sigmas]


# -------------------------------------------------------------------------------------------- family


class Klein(Family):
    name = "flux2-klein"
    pipeline = "Flux2KleinPipeline"
    guidance = 1.0  # distilled: no classifier-free guidance
    reference_path = True  # the pipeline's `image=[...]` puts reference tokens after the noisy ones

    def backend(self, pipe, recipe: dict, device, encoders: bool = True) -> KleinBackend:
        return KleinBackend(pipe, recipe, device)

    def encode_prompts(self, pipe, prompts: list[str], model: dict) -> list[torch.Tensor]:
        emb, _ = encode_prompts(pipe, prompts, model["max_sequence_length"], model["text_encoder_out_layers"])
        return list(emb)

    def meta_inputs(self, transformer, model: dict, tokens: tuple[int, int], b: int, text_len: int,
                    reference: bool = False):
        grid = (tokens[0] // 2, tokens[1] // 2)
        n = grid[0] * grid[1]
        dev, cfg = "meta", transformer.config
        x = torch.empty(b, n, cfg.in_channels, device=dev, dtype=torch.float32)
        emb = torch.empty(b, text_len, cfg.joint_attention_dim, device=dev, dtype=transformer.dtype)
        ids = latent_ids(b, grid, dev)
        txt = torch.zeros(b, text_len, 4, dtype=torch.long, device=dev)
        if reference:
            return x, (emb, txt, ids, torch.empty(b, n, cfg.in_channels, device=dev), reference_ids(b, grid, dev))
        return x, (emb, txt, ids, None, None)

    def velocity(self, transformer, x, sigma, cond) -> torch.Tensor:
        return velocity(transformer, x, sigma, *cond).float()


FAMILY = Klein()
