"""The ComfyUI export against the names ComfyUI's LoRA loader maps, for the real-size module trees.

The rules below restate what Comfy-Org/ComfyUI's `comfy/lora.py` (`model_lora_keys_unet`, commit 17358c8f)
and `comfy/utils.py` (`flux_to_diffusers`, `z_image_to_diffusers`, commit 09708eae) map: for each model class,
the LoRA key prefixes it accepts and the native weight (and row slice) each one patches. The module trees
are the real FLUX.2-klein-4B and Z-Image-Turbo transformers built on the `meta` device; the LoRA targets
are the shipped recipes'. Every exported key must be accepted, no targeted module may be dropped, and a
LoRA on a slice of a fused weight must have the slice's height.
"""

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dopsd_continual.lora import Delta, export_comfyui, resolve_targets
from dopsd_continual.recipe import RECIPES_DIR, load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu_round import configs, zimage_configs  # noqa: E402  the real-size configs the GPU benchmarks use


def flux_rules(depth: int, depth_single: int, hidden: int) -> dict[str, tuple[str, tuple | None]]:
    """diffusers module name -> (native weight, (dim, start, length) or None), as ComfyUI's Flux class maps."""
    m: dict[str, tuple[str, tuple | None]] = {}
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, leaf in enumerate(("to_q", "to_k", "to_v")):
            m[f"{src}.attn.{leaf}"] = (f"{dst}.img_attn.qkv", (0, j * hidden, hidden))
        for j, leaf in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            m[f"{src}.attn.{leaf}"] = (f"{dst}.txt_attn.qkv", (0, j * hidden, hidden))
        for a, b in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                     ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin"),
                     ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"),
                     ("ff_context.net.2", "txt_mlp.2"), ("ff.linear_in", "img_mlp.0"), ("ff.linear_out", "img_mlp.2"),
                     ("ff_context.linear_in", "txt_mlp.0"), ("ff_context.linear_out", "txt_mlp.2")):
            m[f"{src}.{a}"] = (f"{dst}.{b}", None)
    for i in range(depth_single):
        src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, leaf in enumerate(("to_q", "to_k", "to_v")):
            m[f"{src}.attn.{leaf}"] = (f"{dst}.linear1", (0, j * hidden, hidden))
        m[f"{src}.proj_mlp"] = (f"{dst}.linear1", (0, 3 * hidden, 4 * hidden))
        for a, b in (("norm.linear", "modulation.lin"), ("proj_out", "linear2"),
                     ("attn.to_qkv_mlp_proj", "linear1"), ("attn.to_out", "linear2")):  # the last two: FLUX.2
            m[f"{src}.{a}"] = (f"{dst}.{b}", None)
    for a, b in (("proj_out", "final_layer.linear"), ("x_embedder", "img_in"), ("context_embedder", "txt_in"),
                 ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                 ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")):
        m[a] = (b, None)
    return m


def flux_prefixes(name: str) -> set[str]:
    u = name.replace(".", "_")
    return {f"transformer.{name}", name, f"lycoris_{u}", f"lora_transformer_{u}"}


def z_image_rules(n_layers: int, n_refiner: int, dim: int) -> dict[str, tuple[str, tuple | None]]:
    m: dict[str, tuple[str, tuple | None]] = {}
    blocks = [f"layers.{i}" for i in range(n_layers)] + [f"{g}.{i}" for g in ("context_refiner", "noise_refiner")
                                                         for i in range(n_refiner)]
    for b in blocks:
        for j, leaf in enumerate(("to_q", "to_k", "to_v")):
            m[f"{b}.attention.{leaf}"] = (f"{b}.attention.qkv", (0, j * dim, dim))
        for a, c in (("attention.to_out.0", "attention.out"), ("feed_forward.w1", "feed_forward.w1"),
                     ("feed_forward.w2", "feed_forward.w2"), ("feed_forward.w3", "feed_forward.w3"),
                     ("adaLN_modulation.0", "adaLN_modulation.0")):
            m[f"{b}.{a}"] = (f"{b}.{c}", None)
    return m


def z_image_prefixes(name: str) -> set[str]:
    return {f"diffusion_model.{name}", f"transformer.{name}", f"lycoris_{name.replace('.', '_')}", name}


def meta_klein():
    from diffusers import Flux2Transformer2DModel

    tr_cfg = configs(False)[0]
    with torch.device("meta"):
        model = Flux2Transformer2DModel(**tr_cfg)
    hidden = tr_cfg["num_attention_heads"] * tr_cfg["attention_head_dim"]
    return model, flux_rules(tr_cfg["num_layers"], tr_cfg["num_single_layers"], hidden), flux_prefixes, "flux2-klein-4b"


def meta_z_image():
    from diffusers import ZImageTransformer2DModel

    tr_cfg = zimage_configs(False)[0]
    with torch.device("meta"):
        model = ZImageTransformer2DModel(**tr_cfg)
    return model, z_image_rules(tr_cfg["n_layers"], tr_cfg["n_refiner_layers"], tr_cfg["dim"]), z_image_prefixes, "z-image-turbo"


@pytest.mark.parametrize("build", [meta_klein, meta_z_image], ids=["klein-4b", "z-image-turbo"])
def test_every_exported_key_is_one_comfyui_maps(build, tmp_path):
    model, rules, prefixes, recipe = build()
    targets = load_recipe(RECIPES_DIR / f"{recipe}.toml")["train"]["targets"]
    modules = dict(model.named_modules())
    names = resolve_targets(model, targets)
    weights = {}
    for n in names:  # rank 1, shaped as the real modules
        lin = modules[n]
        weights[n] = (torch.zeros(1, lin.in_features), torch.zeros(lin.out_features, 1))
    path = export_comfyui(Delta(weights, 2.0), tmp_path)
    with safe_open(str(path), "pt") as f:
        keys = {k: f.get_slice(k).get_shape() for k in f.keys()}
    accepted = {p: n for n in rules for p in prefixes(n)}
    stems = {k.rsplit(".lora_", 1)[0] if ".lora_" in k else k[: -len(".alpha")] for k in keys}
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha")) for k in keys)
    unmapped = sorted(s for s in stems if s not in accepted)
    assert not unmapped, unmapped[:5]
    assert {accepted[s] for s in stems} == set(names)  # every targeted module exported, none dropped
    for s in stems:  # what ComfyUI reads for each: up (lora_B), down (lora_A), alpha
        assert {f"{s}.lora_A.weight", f"{s}.lora_B.weight", f"{s}.alpha"} <= set(keys)
        native, piece = rules[accepted[s]]
        if piece is not None:  # a slice of a fused weight: the LoRA's rows are the slice's
            assert keys[f"{s}.lora_B.weight"][0] == piece[2], (s, native, piece)
    assert len(stems) == len(names) and len(names) > 50
