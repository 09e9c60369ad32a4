"""Z-Image-Turbo: the family and its training backend.

Student condition: the pipeline's own prompt encoding (Qwen3 text encoder, hidden_states[-2], padding
removed). Teacher condition: the features of [image, prompt] from a Qwen3-VL encoder whose language model
carries Z-Image's Qwen3 text-encoder weights (the same tensors, shared by matching keys; any mismatch is a
clear error), so
the teacher speaks the student's feature language but has seen the target image.
Velocity: `ZImagePipeline.__call__` feeds t = 1 - sigma and negates the transformer's output.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from ..errors import UserError
from ..recipe import teacher_text
from .base import Family, param_fingerprint


def _suffix(key: str) -> str:
    for prefix in ("model.language_model.", "language_model.", "model.", ""):
        if key.startswith(prefix) and (key[len(prefix):].startswith(("layers.", "norm.", "embed_tokens."))):
            return key[len(prefix):]
    return key


def share_text_weights_with_vl(vl_model, text_encoder) -> int:
    """Make the Qwen3-VL language model use the Qwen3 text encoder's own weight tensors, key by key: the
    features phase then holds one copy of the 4 B language weights, not two. Buffers are copied."""
    params = {_suffix(k): p for k, p in text_encoder.named_parameters() if not k.startswith("lm_head")}
    src = {_suffix(k): v for k, v in text_encoder.state_dict().items() if not k.startswith("lm_head")}
    lm = vl_model.model.language_model
    dst = {_suffix(k): k for k in lm.state_dict()}
    missing = sorted(set(dst) - set(src))
    extra = sorted(set(src) - set(dst))
    if missing or extra:
        raise UserError(
            "the teacher encoder's language model does not match Z-Image's text encoder: "
            f"{len(missing)} key(s) missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
        )
    state = lm.state_dict()
    for suffix, key in dst.items():
        if state[key].shape != src[suffix].shape:
            raise UserError(f"the teacher encoder's {key} has shape {tuple(state[key].shape)}, "
                            f"Z-Image's text encoder has {tuple(src[suffix].shape)}")
    with torch.no_grad():
        for suffix, key in dst.items():
            path, name = key.rsplit(".", 1) if "." in key else ("", key)
            owner = lm.get_submodule(path)
            if suffix in params:
                owner._parameters[name] = params[suffix]  # the same tensor: shared, not copied
            else:
                owner._buffers[name].copy_(src[suffix])
    return len(dst)


class ZImageBackend:
    def __init__(self, pipe, recipe: dict, device, teacher_model, processor):
        self.pipe, self.model, self.device = pipe, recipe["model"], torch.device(device)
        self.transformer = pipe.transformer
        self.teacher_model, self.processor = teacher_model, processor
        f = pipe.vae_scale_factor * 2
        self.grid = (self.model["height"] // f, self.model["width"] // f)

    @property
    def encoder_id(self) -> str:
        m = self.model
        ident = {"source": str(m["source"]), "teacher": str(m["teacher_encoder"]),
                 "te_weights": param_fingerprint(self.pipe.text_encoder), "vae_weights": param_fingerprint(self.pipe.vae),
                 "template": [m["max_sequence_length"], m["teacher_instruction"], m["height"], m["width"],
                              m["teacher_min_pixels"], m["teacher_max_pixels"], m.get("teacher_instruction_position", "after")]}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def release_encoders(self) -> None:
        """Features are cached: the VL teacher encoder leaves memory before training starts."""
        self.teacher_model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def student_text(self, caption: str) -> torch.Tensor:
        with torch.no_grad():
            return self.pipe._encode_prompt([caption], device=self.device, max_sequence_length=self.model["max_sequence_length"])[0]

    def teacher_text(self, caption: str, image: torch.Tensor) -> torch.Tensor:
        """hidden_states[-2] of the VL encoder over [image, instruction + caption] (all tokens)."""
        from PIL import Image

        pil = Image.fromarray((image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8))
        pil = bound_pixels(pil, self.model["teacher_min_pixels"], self.model["teacher_max_pixels"])
        text = teacher_text(caption, self.model)
        inputs = {k: v.to(self.device) for k, v in vl_inputs(*self.processor, pil, text).items()}
        with torch.no_grad():
            out = self.teacher_model(**inputs, output_hidden_states=True)
        return out.hidden_states[-2][0]

    def latents(self, image: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        with torch.no_grad():
            lat = vae.encode((image.unsqueeze(0) * 2 - 1).to(self.device, vae.dtype)).latent_dist.mode()
        return ((lat - vae.config.shift_factor) * vae.config.scaling_factor)[0]

    def features(self, caption: str, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"student_text": self.student_text(caption).float().cpu(),
                "teacher_text": self.teacher_text(caption, image).float().cpu(),
                "latents": self.latents(image).float().cpu()}

    def conditions(self, feats: list[dict], teacher: bool):
        key = "teacher_text" if teacher else "student_text"
        return [f[key].to(self.device, self.transformer.dtype) for f in feats]

    def velocity(self, x, sigma, cond) -> torch.Tensor:
        return FAMILY.velocity(self.transformer, x, sigma, cond)

    def sigmas(self, k: int, schedule="pipeline") -> list[float]:
        if isinstance(schedule, list):
            return [float(s) for s in schedule] + ([0.0] if schedule[-1] != 0 else [])
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

        sched = self.pipe.scheduler
        seq = self.grid[0] * self.grid[1]
        mu = calculate_shift(seq, sched.config.get("base_image_seq_len", 256), sched.config.get("max_image_seq_len", 4096),
                             sched.config.get("base_shift", 0.5), sched.config.get("max_shift", 1.15))
        sched.set_timesteps(sigmas=get_default_z_image_sigmas(k), mu=mu, device="cpu")
        return [float(s) for s in sched.sigmas]


def bound_pixels(image, min_pixels: int, max_pixels: int):
    """Scale (keeping the aspect) into [min_pixels, max_pixels], as the authors bound the teacher's image
    (512^2 to 768^2 pixels: at most 576 image tokens after Qwen3-VL's 32-pixel merged patches)."""
    from PIL import Image

    n = image.width * image.height
    if min_pixels <= n <= max_pixels:
        return image
    f = ((max_pixels if n > max_pixels else min_pixels) / n) ** 0.5
    return image.resize((max(32, round(image.width * f)), max(32, round(image.height * f))), Image.BICUBIC)


def vl_inputs(tokenizer, image_processor, image, text: str) -> dict[str, torch.Tensor]:
    """What Qwen3VLProcessor builds for one [image, text] user turn, without its video processor
    (which needs torchvision): the image's patches, its grid, and one <|image_pad|> per merged patch."""
    img = image_processor(images=[image], return_tensors="pt")
    grid = img["image_grid_thw"]
    n_tokens = int(grid.prod()) // (image_processor.merge_size**2)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if prompt.count("<|image_pad|>") != 1:
        raise UserError("the teacher encoder's chat template must place exactly one <|image_pad|> for an image")
    prompt = prompt.replace("<|image_pad|>", "<|image_pad|>" * n_tokens)
    ids = tokenizer(prompt, return_tensors="pt")
    image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    mm_types = (ids["input_ids"] == image_token).long()  # 1 marks image tokens (M-RoPE needs them), 0 text
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"], "mm_token_type_ids": mm_types,
            "pixel_values": img["pixel_values"], "image_grid_thw": grid}


def load_teacher_encoder(source: str, text_encoder, device):
    """Qwen3-VL from a Hugging Face id or folder, its language model replaced by Z-Image's text encoder."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration

    if not source:
        raise UserError("model.teacher_encoder is not set: Z-Image's teacher needs a Qwen3-VL (id or folder)")
    try:
        vl = Qwen3VLForConditionalGeneration.from_pretrained(source, dtype=text_encoder.dtype)
        processor = (AutoTokenizer.from_pretrained(source), AutoImageProcessor.from_pretrained(source))
    except OSError as e:
        raise UserError(f"cannot load the teacher encoder {source}: {str(e).splitlines()[0]}") from None
    share_text_weights_with_vl(vl, text_encoder)
    return vl.to(device).eval(), processor  # lives only through a round's features phase (release_encoders)


class ZImage(Family):
    name = "z-image-turbo"
    pipeline = "ZImagePipeline"
    guidance = 0.0  # its pipeline turns CFG on for any value above 0 (twice the cost, not the distilled picture)
    reference_path = False  # the teacher's context is a VL encoder's features, not a pipeline path
    encoder_advice = "lower model.teacher_max_pixels or "
    teacher_encoder = "Qwen3VLForConditionalGeneration"  # its language model: the text encoder's tensors
    teacher_shares_text_encoder = True

    def backend(self, pipe, recipe: dict, device, encoders: bool = True) -> ZImageBackend:
        vl, processor = load_teacher_encoder(recipe["model"]["teacher_encoder"], pipe.text_encoder, device) if encoders else (None, None)
        return ZImageBackend(pipe, recipe, device, vl, processor)

    def encode_prompts(self, pipe, prompts: list[str], model: dict) -> list[torch.Tensor]:
        feats, _ = pipe.encode_prompt(prompt=list(prompts), device=pipe.text_encoder.device,
                                      do_classifier_free_guidance=False, max_sequence_length=model["max_sequence_length"])
        return list(feats)

    def prompt_embeds(self, feats, device, dtype):
        return [f.to(device, dtype) for f in feats]  # one variable-length tensor per prompt

    def decode_input(self, vae, latents):
        return latents / vae.config.scaling_factor + vae.config.shift_factor

    def text_len(self, model: dict) -> int:
        return 128  # a prompt's own length, planned at a long prompt's

    def teacher_text_len(self, model: dict) -> int:
        return model["teacher_max_pixels"] // (32 * 32) + 128  # the bounded image's merged patches + the text

    def meta_inputs(self, transformer, model: dict, tokens: tuple[int, int], b: int, text_len: int,
                    reference: bool = False):
        x = torch.empty(b, transformer.config.in_channels, *tokens, device="meta")
        cond = [torch.empty(text_len, transformer.config.cap_feat_dim, device="meta", dtype=transformer.dtype)
                for _ in range(b)]
        return x, cond

    def velocity(self, transformer, x, sigma, cond) -> torch.Tensor:
        """`ZImagePipeline.__call__` feeds t = 1 - sigma and negates the transformer's output."""
        xs = list(x.to(transformer.dtype).unsqueeze(2).unbind(0))
        out = transformer(xs, (1 - sigma).to(transformer.dtype), cond, return_dict=False)[0]
        return -torch.stack([o.float() for o in out]).squeeze(2)


FAMILY = ZImage()
