"""The contract between a model family and the generic code that trains, samples, gates and plans it.

`Family` is what a family module exports (one instance); `Backend` is what `Family.backend` makes for a round
from the loaded pipeline. Everything below is all that `rounds`, `training`, `sampling`, `gate` and `memory`
know about a model: they never ask which one it is.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import torch


class Backend(Protocol):
    """One round's view of the loaded pipeline: cached per-sample features, conditions, velocities, sigmas."""

    transformer: torch.nn.Module
    device: torch.device

    @property
    def encoder_id(self) -> str:
        """A fingerprint of the encoders and prompt template: part of every feature cache key."""

    def features(self, caption: str, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """What a round needs of one sample, computed once and cached: `student_text`, `teacher_text` (the
        caption with the reference image's context) and `latents`, CPU float32."""

    def release_encoders(self) -> None:
        """Features are cached: anything loaded only to compute them may leave memory now."""

    def conditions(self, feats: list[dict], teacher: bool) -> Any:
        """The transformer's condition for a batch of cached features: the student's text, or the teacher's
        reference-image context."""

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any) -> torch.Tensor:
        """The model's velocity (float32) at noisy latents x and noise levels sigma (B,), in the flow convention
        x0 = x - sigma * v."""

    def sigmas(self, k: int, schedule: str | list = "pipeline") -> list[float]:
        """The roll-out's K + 1 noise levels, ending at 0: the pipeline's own K-step schedule, or a given list."""


class Family:
    """A model family. Subclass it, set the class attributes, implement the methods, export one instance."""

    name: str = ""
    pipeline: str = ""  # the diffusers pipeline class (by name) that loads and samples the model
    guidance: float = 1.0  # the guidance_scale at which that pipeline samples the distilled model without CFG
    reference_path: bool = False  # the pipeline draws with a reference image (`image=[...]`): the gate's teacher
    encoder_advice: str = ""  # a setting that makes the encoder phases smaller, for the accountant's advice
    teacher_encoder: str = ""  # the transformers class of a separate teacher encoder (`model.teacher_encoder`)
    teacher_shares_text_encoder: bool = False  # that encoder runs on the text encoder's own weights (one copy)

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline)

    # ------------------------------------------------------------------------------------------ training

    def backend(self, pipe, recipe: dict, device, encoders: bool = True) -> Backend:
        """The round's backend. encoders=False: training on cached features only (no extra encoder loads)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ sampling

    def encode_prompts(self, pipe, prompts: list[str], model: dict) -> list[torch.Tensor]:
        """Each prompt's text features as the pipeline's own `encode_prompt` makes them."""
        raise NotImplementedError

    def prompt_embeds(self, feats: list[torch.Tensor], device, dtype):
        """The pipeline's `prompt_embeds` argument for a batch of those features."""
        return torch.stack(feats).to(device, dtype)

    def decode_input(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """What the pipeline does to `output_type="latent"` results before `vae.decode`."""
        return latents

    # ------------------------------------------------------------------------------- memory accountant

    def text_len(self, model: dict) -> int:
        """Text tokens the transformer sees per prompt (planned at a long prompt where lengths vary)."""
        return model["max_sequence_length"]

    def teacher_text_len(self, model: dict) -> int:
        """Tokens of the teacher's text condition (with its reference image's, where the encoder sees it)."""
        return model["max_sequence_length"]

    def meta_inputs(self, transformer, model: dict, tokens: tuple[int, int], b: int, text_len: int,
                    reference: bool = False):
        """(x, cond) on the `meta` device for b pictures at a latent grid of `tokens`: what `velocity` takes."""
        raise NotImplementedError

    def velocity(self, transformer, x: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        """The transformer's velocity as the pipeline calls it (a Backend's `velocity` uses this too)."""
        raise NotImplementedError


def param_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a module's first tensors: tells two sets of weights apart without reading them all."""
    h = hashlib.sha256()
    for name, p in sorted(module.state_dict().items())[:8]:
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:64].cpu().numpy().tobytes())
    return h.hexdigest()[:12]
