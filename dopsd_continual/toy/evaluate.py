"""Score a toy transformer with the ground-truth scorer: held-out prompts, step counts, the reference path.

Samples are made exactly as `Flux2KleinPipeline.__call__` makes them (same noise from a CPU generator per
seed, same sigmas, same tokens), only batched.
"""

from __future__ import annotations

import numpy as np
import torch

from ..families import klein
from . import model as toy_model
from .packs import PACKS, pack_images
from .scorer import score_images
from .world import LOGO_WORD


def pipeline_noise(seeds: list[int], device, grid: tuple[int, int] = (4, 4)) -> torch.Tensor:
    """The pipeline's initial latents for 64x64 ((1, 128, *grid) per seed), packed to tokens."""
    from diffusers import Flux2KleinPipeline

    noise = [torch.randn((1, 128, *grid), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds]
    return Flux2KleinPipeline._pack_latents(torch.cat(noise)).to(device)


def final_latents(
    pipe,
    transformer,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    ref_images: torch.Tensor | None = None,
    batch: int = 256,
    guidance: float = 1.0,
) -> torch.Tensor:
    """The sampler's final latent tokens (before decoding). With ref_images, the prompts get the teacher
    instruction and the images ride along as reference tokens. guidance > 1: classifier-free guidance
    against the empty prompt, as the pipeline samples an undistilled model."""
    dev = next(transformer.parameters()).device
    sigmas = toy_model.schedule_sigmas(steps)
    grid = toy_model.token_grid(pipe.vae)
    uncond = None
    if guidance != 1.0:
        uncond, _ = klein.encode_prompts(pipe, [""], toy_model.MAX_SEQUENCE_LENGTH, toy_model.TEXT_OUT_LAYERS)
    out = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i : i + batch], seeds[i : i + batch]
        ref = ref_ids = None
        if ref_images is not None:
            ps = [f"{toy_model.TEACHER_INSTRUCTION} {p}" for p in ps]
            ref, _ = klein.encode_images(pipe, ref_images[i : i + batch].to(dev))
            ref_ids = klein.reference_ids(len(ps), grid, dev)
        emb, text_ids = klein.encode_prompts(pipe, ps, toy_model.MAX_SEQUENCE_LENGTH, toy_model.TEXT_OUT_LAYERS)
        ids = klein.latent_ids(len(ps), grid, dev)
        noise = pipeline_noise(ss, dev, grid)
        out.append(klein.euler_sample(transformer, noise, sigmas, emb, text_ids, ids, ref, ref_ids, uncond=uncond, guidance=guidance))
    return torch.cat(out)


def decode_latents(pipe, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Images (B, 3, 64, 64) in [0, 1] from final latent tokens, on the CPU."""
    with torch.no_grad():
        grid = toy_model.token_grid(pipe.vae)
        return torch.cat([klein.decode(pipe, x[i : i + batch], grid).cpu() for i in range(0, len(x), batch)])


def trajectory_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative RMS distance of final latents to the reference solution of the same noise and prompt.

    With the base model's 128-step solution as reference this is how far a few-step sampler lands from
    where the flow actually goes: the error step distillation exists to remove, measured before the VAE
    decoder (which at this model's size hides small latent differences from every image metric).
    """
    return float((x - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt())


def generate(
    pipe,
    transformer,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    ref_images: torch.Tensor | None = None,
    batch: int = 256,
) -> torch.Tensor:
    """Images (B, 3, 64, 64) in [0, 1]. With ref_images, the prompts get the teacher instruction."""
    return decode_latents(pipe, final_latents(pipe, transformer, prompts, seeds, steps, ref_images, batch), batch)


def score_prompts(pipe, transformer, classifier, prompts, steps, seed0=0, ref_images=None) -> dict[str, float]:
    seeds = [seed0 + i for i in range(len(prompts))]
    imgs = generate(pipe, transformer, prompts, seeds, steps, ref_images)
    return score_images(classifier, imgs, prompts).mean()


def concept_rows(pipe, transformer, classifier, steps: int = 4) -> dict[str, dict[str, dict[str, float]]]:
    """Per pack: text alone vs text + the pack image as reference (the D-OPSD teacher), on the pack's captions."""
    rows = {}
    for name, pack in PACKS.items():
        caps = [s.caption(LOGO_WORD) for s in pack.train]
        refs = torch.from_numpy(pack_images(name)).permute(0, 3, 1, 2).float() / 255
        rows[name] = {
            "text_only": score_prompts(pipe, transformer, classifier, caps, steps, seed0=500),
            "with_reference": score_prompts(pipe, transformer, classifier, caps, steps, seed0=500, ref_images=refs),
        }
    return rows


def sample_sheet(pipe, transformer, prompts: list[str], steps: int) -> np.ndarray:
    imgs = generate(pipe, transformer, prompts, list(range(len(prompts))), steps)
    return (imgs.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
