"""LoRA deltas as plain tensors: resolve targets, read peft adapters out, merge into weights, squash.

A delta is {module_name: (A (r, in), B (out, r))} plus a scale (alpha / r). On disk it is one safetensors
file in diffusers' key layout (`transformer.<module>.lora_A.weight` / `.lora_B.weight`) with the scale in
its metadata, so an export is a copy and `load_lora_weights` reads it. Merging adds scale * B @ A to the
base Linear weights: exact, and sampling from a merged model costs what the base costs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

PREFIX = "transformer."


def resolve_targets(model: torch.nn.Module, suffixes: list[str]) -> list[str]:
    """Full names of the Linear modules whose name ends with one of `suffixes` (at a '.' boundary)."""
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name == s or name.endswith("." + s) for s in suffixes):
            names.append(name)
    if not names:
        raise ValueError(f"no Linear module matches the LoRA targets {suffixes}")
    return names


@dataclass
class Delta:
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, B)
    scale: float

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.weights.values())

    def save(self, path: Path, extra_meta: dict | None = None) -> None:
        from safetensors.torch import save_file

        tensors = {}
        for name, (a, b) in self.weights.items():
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a.detach().float().contiguous().cpu()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = b.detach().float().contiguous().cpu()
        meta = {"scale": repr(self.scale), "rank": str(self.rank), **{k: str(v) for k, v in (extra_meta or {}).items()}}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> Delta:
        from safetensors import safe_open

        weights: dict[str, list] = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                name, kind = key[len(PREFIX):].rsplit(".lora_", 1)
                slot = 0 if kind.startswith("A") else 1
                weights.setdefault(name, [None, None])[slot] = f.get_tensor(key)
        return cls({k: (v[0], v[1]) for k, v in weights.items()}, float(meta.get("scale", "1.0")))

    def product(self, name: str, device=None) -> torch.Tensor:
        """scale x B @ A in float32, computed on `device` (default: where A and B are)."""
        a, b = self.weights[name]
        return self.scale * (b.to(device, torch.float32) @ a.to(device, torch.float32))


def from_peft(model: torch.nn.Module, adapter: str, scale: float) -> Delta:
    """Read one peft adapter's A/B out of a model (names without peft's wrappers), into CPU memory: the
    candidate is saved from there, and the gate that follows needs the card's room."""
    weights: dict[str, list] = {}
    for name, p in model.named_parameters():
        for kind, slot in ((f".lora_A.{adapter}.weight", 0), (f".lora_B.{adapter}.weight", 1)):
            if name.endswith(kind):
                mod = name[: -len(kind)].replace(".base_layer", "")
                weights.setdefault(mod, [None, None])[slot] = p.detach().to("cpu", copy=True)
    return Delta({k: (v[0], v[1]) for k, v in weights.items()}, scale)


@torch.no_grad()
def merge_into(model: torch.nn.Module, deltas: list[Delta], sign: float = 1.0) -> None:
    """W += sign * scale * B @ A for every delta, on the model's plain Linear weights (sum in float32, one rounding)."""
    modules = dict(model.named_modules())
    for d in deltas:
        for name in d.weights:
            lin = modules[name]
            merged = lin.weight.float() + sign * d.product(name).to(lin.weight.device)
            lin.weight.copy_(merged.to(lin.weight.dtype))


def squash(deltas: list[Delta]) -> Delta:
    """Fold a chain into one delta by concatenating along the rank: exact (B1A1 + B2A2 = [B1 B2][A1; A2])."""
    names = sorted({n for d in deltas for n in d.weights})
    out = {}
    for n in names:
        a_parts, b_parts = [], []
        for d in deltas:
            if n in d.weights:
                a, b = d.weights[n]
                a_parts.append(a.float())
                b_parts.append(b.float() * d.scale)  # fold each delta's scale into B
        out[n] = (torch.cat(a_parts, 0), torch.cat(b_parts, 1))
    return Delta(out, 1.0)


def truncate(delta: Delta, rank: int) -> tuple[Delta, float]:
    """SVD truncation of each module's product to `rank`; returns the delta and the worst relative error."""
    out, worst = {}, 0.0
    for n in delta.weights:
        full = delta.product(n)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        r = min(rank, s.numel())
        b = u[:, :r] * s[:r]
        a = vh[:r]
        err = float((full - b @ a).norm() / full.norm().clamp_min(1e-12))
        worst = max(worst, err)
        out[n] = (a, b)
    return Delta(out, 1.0), worst


def adapter_config(delta: Delta) -> dict:
    """The peft LoraConfig fields diffusers needs to load a delta at the right scale (alpha != rank)."""
    r = delta.rank
    return {"r": r, "lora_alpha": delta.scale * r, "target_modules": sorted(delta.weights), "init_lora_weights": True,
            "bias": "none", "use_dora": False, "rank_pattern": {n: a.shape[0] for n, (a, _) in delta.weights.items()},
            "alpha_pattern": {n: delta.scale * a.shape[0] for n, (a, _) in delta.weights.items()}}


def _user_file_mode(path: Path) -> None:
    """The mode a file the user made would have (0666 less the umask); safetensors writes 0600."""
    from .store import user_file_mode

    os.chmod(path, user_file_mode())


def export_diffusers(delta: Delta, out_dir: Path) -> Path:
    """DIR/pytorch_lora_weights.safetensors that `<Pipeline>.load_lora_weights(DIR)` loads at the right scale."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in delta.weights.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = b.float().contiguous()
    cfg = {f"transformer.{k}": v for k, v in adapter_config(delta).items()}  # diffusers packs keys with a prefix
    meta = {"lora_adapter_metadata": json.dumps(cfg), "format": "pt"}
    path = out_dir / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path), metadata=meta)
    _user_file_mode(path)
    return path


def export_comfyui(delta: Delta, out_dir: Path) -> Path:
    """A file ComfyUI's LoRA loader maps for both backends: `transformer.<diffusers module>.lora_{A,B}.weight`
    plus a per-module `.alpha` (ComfyUI has no metadata scale; alpha / rank is the scale).

    Why these names (read in Comfy-Org/ComfyUI, comfy/lora.py at 17358c8f and comfy/utils.py at 09708eae):
    `model_lora_keys_unet` maps, for its Flux class (FLUX.2 included: `model_base.Flux2` subclasses it),
    `transformer.` + every diffusers name that `flux_to_diffusers` lists: double blocks' to_q/to_k/to_v and
    add_q/k/v_proj become slices of img_attn.qkv / txt_attn.qkv, to_out.0 / to_add_out the proj layers,
    single blocks' attn.to_qkv_mlp_proj linear1 and attn.to_out linear2. It does not map `diffusion_model.` +
    diffusers names for Flux, so such a klein file loads nothing. For Z-Image (its Lumina2 class)
    `z_image_to_diffusers` lists layers / noise_refiner / context_refiner attention.to_q/k/v (slices of
    attention.qkv) and attention.to_out.0, under `transformer.` and `diffusion_model.` alike. One prefix,
    `transformer.`, therefore serves both. `tests/test_export_formats.py` derives the accepted names by those
    rules for the real-size module trees and checks every exported key against them.
    """
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in delta.weights.items():
        key = f"{PREFIX}{name}"
        tensors[f"{key}.lora_A.weight"] = a.float().contiguous()
        tensors[f"{key}.lora_B.weight"] = b.float().contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(delta.scale * a.shape[0])
    path = out_dir / "lora_comfyui.safetensors"
    save_file(tensors, str(path))
    _user_file_mode(path)
    return path
