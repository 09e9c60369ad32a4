"""Build the toy-shapes pipeline from diffusers' FLUX.2-klein classes at a small size.

Every part is a real class of the real model family: `Flux2Transformer2DModel`, `AutoencoderKLFlux2`, a
`Qwen3ForCausalLM` text encoder (random and frozen, as the real encoder is frozen) and a byte-level BPE
`Qwen2TokenizerFast` trained offline on the world's vocabulary. The result saves and loads with
`Flux2KleinPipeline.save_pretrained / from_pretrained`.
"""

from __future__ import annotations

import torch

TEXT_OUT_LAYERS = (1, 2, 3)
MAX_SEQUENCE_LENGTH = 40
TEACHER_INSTRUCTION = "match the reference:"
SCHEDULER_SHIFT = 2.0
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['content'] }}<|im_end|>{% endfor %}"
)


def tokenizer_corpus() -> list[str]:
    from .world import COLOUR_NAMES, POSITION_PHRASE, SHAPES, all_base_captions

    extra = [
        TEACHER_INSTRUCTION,
        "my [trigger] logo, blue background",
        " ".join(COLOUR_NAMES + SHAPES + ["striped", "dotted", "heart", "star", "logo", "my"]),
        " ".join(POSITION_PHRASE.values()),
    ]
    return all_base_captions() + extra * 50


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=specials,
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=MAX_SEQUENCE_LENGTH,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_text_encoder(vocab_size: int, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(cfg).eval()


VAE_CHANNELS = {8: (32, 32, 64, 64), 4: (32, 64, 64)}  # downsampling factor -> encoder block widths


def build_vae(down: int = 8):
    """down 8: 64x64 images -> 8x8 latents -> 4x4 tokens of 128 after the pipeline's 2x2 patchify (the shipped
    model); down 4: 16x16 latents -> 8x8 tokens, four times the places for detail (and the compute)."""
    from diffusers import AutoencoderKLFlux2

    if down not in VAE_CHANNELS:
        raise ValueError(f"VAE downsampling must be one of {sorted(VAE_CHANNELS)}, not {down}")
    n = len(VAE_CHANNELS[down])
    return AutoencoderKLFlux2(block_out_channels=VAE_CHANNELS[down], down_block_types=("DownEncoderBlock2D",) * n,
                              up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, latent_channels=32)


def token_grid(vae, size: int = 64) -> tuple[int, int]:
    """The transformer's image-token grid for size x size pictures with this VAE (after the 2x2 patchify)."""
    g = size // 2 ** (len(vae.config.block_out_channels) - 1) // 2
    return (g, g)


def build_transformer():
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=8,
        joint_attention_dim=128 * len(TEXT_OUT_LAYERS),
        timestep_guidance_channels=256,
        axes_dims_rope=(8, 8, 8, 8),
        guidance_embeds=False,
    )


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # A fixed shift (no resolution-dependent mu): at 16 image tokens the empirical mu of klein pushes the
    # 4-step schedule to 1, 0.955, 0.875, 0.70, a poor fit for so small a latent.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT, use_dynamic_shifting=False)


def build_pipeline(transformer=None, vae=None, text_encoder=None, tokenizer=None):
    from diffusers import Flux2KleinPipeline

    tokenizer = tokenizer or build_tokenizer()
    return Flux2KleinPipeline(
        scheduler=build_scheduler(),
        vae=vae or build_vae(),
        text_encoder=text_encoder or build_text_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        transformer=transformer or build_transformer(),
        is_distilled=True,
    )


def schedule_sigmas(steps: int) -> list[float]:
    """The sigmas (with the final 0) that the pipeline walks for `steps` steps."""
    import numpy as np

    s = build_scheduler()
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps))  # exactly what Flux2KleinPipeline passes
    return [float(x) for x in s.sigmas]
