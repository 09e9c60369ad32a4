"""D-OPSD step time and peak memory on the real-size FLUX.2-klein-4B architecture (random weights).

Times, in one run on one card, at 1024 px (4096 image tokens, 4096 reference tokens), 256 text tokens,
batch 1, LoRA rank 64 (alpha 128) on the attention projections:
  (a) the authors' way: K=4 roll-out, every step re-runs the encoders (Qwen3-4B text encoder for the
      student and teacher prompts, the VAE for the reference image), teacher forward with the reference,
      student forward, and one backward of the summed loss at the end; gradient checkpointing on;
  (b) this project's round code (dopsd_continual.training.dopsd_loss_and_backward): cached features, no
      encoders in memory, a backward per roll-out step; with gradient checkpointing of a share of the blocks
      (1, 0.75, 0.5, 0.25, 0: `train.gradient_checkpointing` in the recipe).
The same for the real-size Z-Image-Turbo-6B architecture: (a) re-runs its Qwen3-4B text encoder for the
student and the Qwen3-VL-4B teacher encoder over [1024 px image, text] every roll-out step; (b) uses cached
features. `dopsd_step_s` is the fastest (b) whose peak is within the budget: the authors' way's peak for
klein, 22 GiB (a 24 GB card) for Z-Image. Then (b) again with the frozen base weights stored as int8
(`train.base_weights = "int8"`) at shares 1, 0.5 and 0: the memory option for 24 GB cards.
Writes bench/results/gpu_round.json (or --out). `--tiny` runs the same code on tiny configs (CPU check).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopsd_continual.families import klein
from dopsd_continual.families.klein import KleinBackend
from dopsd_continual.families.zimage import ZImageBackend
from dopsd_continual.quant import quantize_int8, restore
from dopsd_continual.training import (
    adapter_params,
    add_adapters,
    dopsd_loss_and_backward,
    ema_update,
    remove_adapters,
    set_checkpointing,
    use,
)

SHARES = [1.0, 0.75, 0.5, 0.25, 0.0]
INT8_SHARES = [1.0, 0.5, 0.0]
ZIMAGE_BUDGET_GIB = 22.0
TEACHER_MAX_SIDE = 768  # recipes/z-image-turbo.toml teacher_max_pixels = 768²
ZIMAGE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "to_qkv_mlp_proj",
    "attn.to_out",
]


# Qwen3-4B (the text encoder of both models, and the language half of Qwen3-VL-4B), and a tiny stand-in
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936)
TINY_TE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
               num_key_value_heads=1, head_dim=32, vocab_size=512)


def configs(tiny: bool):
    """FLUX.2-klein-4B: 5 double + 20 single blocks, 24 heads x 128, Qwen3-4B layers 9/18/27 as text features."""
    if tiny:
        tr = dict(patch_size=1, in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=32,
                  num_attention_heads=2, joint_attention_dim=3 * 64, timestep_guidance_channels=256,
                  axes_dims_rope=(8, 8, 8, 8), guidance_embeds=False)
        return tr, TINY_TE, (1, 2, 3), 64, 16
    tr = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
              num_attention_heads=24, joint_attention_dim=3 * 2560, timestep_guidance_channels=256,
              axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False)
    return tr, QWEN3_4B, (9, 18, 27), 1024, 256


def build(tiny: bool, device, dtype):
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    trc, tec, layers, px, txt = configs(tiny)
    with torch.device(device):
        tr = Flux2Transformer2DModel(**trc).to(dtype)
        te = Qwen3ForCausalLM(Qwen3Config(**tec, max_position_embeddings=4096)).to(dtype).eval()
        vae = AutoencoderKLFlux2(block_out_channels=(32, 32, 64, 64), layers_per_block=1) if tiny else AutoencoderKLFlux2()
        vae = vae.to(dtype).eval()
    tr.requires_grad_(False)
    te.requires_grad_(False)
    vae.requires_grad_(False)
    return tr, te, vae, layers, px, txt


def encode_text(te, ids, layers):
    out = te(input_ids=ids, output_hidden_states=True, use_cache=False)
    h = torch.stack([out.hidden_states[k] for k in layers], dim=1)
    b, c, n, d = h.shape
    return h.permute(0, 2, 1, 3).reshape(b, n, c * d)


def encode_image(vae, img):
    from diffusers import Flux2KleinPipeline

    lat = vae.encode(img).latent_dist.mode()
    lat = Flux2KleinPipeline._patchify_latents(lat)
    return Flux2KleinPipeline._pack_latents(lat)


def optimiser_step(opt, student, teacher) -> None:
    """Steps 4-5 of every way measured here: clip, AdamW, EMA teacher."""
    torch.nn.utils.clip_grad_norm_(student, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    ema_update(teacher, student, 0.9999)


def authors_step(tr, te, vae, layers, ids_s, ids_t, image, sigmas, grid, opt, student, teacher):
    """(a): encoders every step, teacher recomputed with the reference, one backward of the summed loss."""
    b = image.shape[0]
    dev = image.device
    x = torch.randn(b, grid[0] * grid[1], 128, device=dev, dtype=tr.dtype)
    losses = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        with torch.no_grad():
            emb_s = encode_text(te, ids_s, layers)
            emb_t = encode_text(te, ids_t, layers)
            ref = encode_image(vae, image)
        txt_ids = klein.latent_ids(b, (1, 1), dev)[:, :1].expand(b, emb_s.shape[1], 4).clone()
        txt_ids[..., 3] = torch.arange(emb_s.shape[1], device=dev)
        img_ids = klein.latent_ids(b, grid, dev)
        ref_ids = klein.reference_ids(b, grid, dev)
        sig = torch.full((b,), s, device=dev)
        use(tr, "teacher")
        with torch.no_grad():
            v_t = klein.velocity(tr, x, sig, emb_t, txt_ids, img_ids, ref, ref_ids).float()
        use(tr, "student")
        v_s = klein.velocity(tr, x, sig, emb_s, txt_ids, img_ids).float()
        losses.append(
            torch.nn.functional.mse_loss(x.float() - s * v_s, x.float() - s * v_t) / (len(sigmas) - 1)
        )
        x = (x.float() + (s_next - s) * v_s).detach().to(tr.dtype)
    torch.stack(losses).sum().backward()
    optimiser_step(opt, student, teacher)


def project_step(backend, feats, sigmas, opt, student, teacher):
    """(b): the round's own code path."""
    noise = torch.randn(len(feats), *feats[0]["latents"].shape, device=backend.device)
    dopsd_loss_and_backward(backend, feats, sigmas, noise)
    optimiser_step(opt, student, teacher)


def zimage_configs(tiny: bool):
    """Z-Image-Turbo-6B transformer, its Qwen3-4B text encoder, the Qwen3-VL-4B vision tower, px, text tokens."""
    if tiny:
        tr = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
                  n_heads=2, n_kv_heads=2, cap_feat_dim=64, axes_dims=[8, 12, 12], axes_lens=[1024, 64, 64])
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      deepstack_visual_indexes=[0], num_position_embeddings=64)
        return tr, TINY_TE, vision, 64, 16
    tr = dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
              n_heads=30, n_kv_heads=30, cap_feat_dim=2560, rope_theta=256.0, axes_dims=[32, 48, 48],
              axes_lens=[1024, 512, 512])
    vision = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                  deepstack_visual_indexes=[5, 11, 17], num_position_embeddings=2304)
    return tr, QWEN3_4B, vision, 1024, 256


def build_zimage(tiny: bool, device, dtype):
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    trc, tec, vision, px, txt = zimage_configs(tiny)
    v = tec["vocab_size"]
    special = {
        "image_token_id": v - 4,
        "video_token_id": v - 3,
        "vision_start_token_id": v - 2,
        "vision_end_token_id": v - 1,
    }
    text = dict(
        tec,
        max_position_embeddings=8192,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5e6,
            "mrope_section": [24, 20, 20] if not tiny else [8, 4, 4],
            "mrope_interleaved": True,
        },
    )
    vl_cfg = Qwen3VLConfig(
        text_config=text,
        vision_config=dict(vision, patch_size=16, spatial_merge_size=2, temporal_patch_size=2),
        **special,
    )
    with torch.device(device):
        tr = ZImageTransformer2DModel(**trc).to(dtype)
        te = Qwen3Model(Qwen3Config(**tec, max_position_embeddings=8192)).to(dtype).eval()
        vl = Qwen3VLForConditionalGeneration(vl_cfg).to(dtype).eval()
    for m in (tr, te, vl):
        m.requires_grad_(False)
    for p in tr.parameters():  # pad tokens are created with torch.empty: give every weight a finite value
        if not torch.isfinite(p).all():
            p.data.normal_(0, 0.02)
    return tr, te, vl, special, px, txt


def zimage_vl_inputs(special: dict, px: int, txt: int, device, dtype) -> dict:
    """What the Qwen3-VL processor makes of one px x px image and txt text tokens (patch 16, merge 2)."""
    g = px // 16
    n_img = g * g // 4
    ids = (
        torch.cat(
            [
                torch.tensor([special["vision_start_token_id"]]),
                torch.full((n_img,), special["image_token_id"]),
                torch.tensor([special["vision_end_token_id"]]),
                torch.randint(0, 500, (txt,)),
            ]
        )
        .unsqueeze(0)
        .to(device)
    )
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == special["image_token_id"]).long(),
        "pixel_values": torch.randn(g * g, 3 * 2 * 16 * 16, device=device, dtype=dtype),
        "image_grid_thw": torch.tensor([[1, g, g]], device=device),
    }


def zimage_authors_step(tr, te, vl, vl_in, ids_s, sigmas, latent_shape, opt, student, teacher):
    """(a) for Z-Image: both encoders every step, teacher with the VL context, one backward of the summed loss."""
    dev = ids_s.device
    backend = zimage_backend(tr, dev)
    x = torch.randn(1, *latent_shape, device=dev)
    losses = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        with torch.no_grad():
            cond_s = [te(input_ids=ids_s, output_hidden_states=True).hidden_states[-2][0]]
            cond_t = [vl(**vl_in, output_hidden_states=True).hidden_states[-2][0]]
        sig = torch.full((1,), s, device=dev)
        use(tr, "teacher")
        with torch.no_grad():
            v_t = backend.velocity(x, sig, cond_t)
        use(tr, "student")
        v_s = backend.velocity(x, sig, cond_s)
        losses.append(torch.nn.functional.mse_loss(x - s * v_s, x - s * v_t) / (len(sigmas) - 1))
        x = (x + (s_next - s) * v_s).detach()
    torch.stack(losses).sum().backward()
    optimiser_step(opt, student, teacher)


def zimage_backend(tr, dev):
    backend = ZImageBackend.__new__(ZImageBackend)
    backend.transformer, backend.device = tr, dev
    return backend


def timed(fn, n: int, sync) -> float:
    """Seconds per call; on a GPU under bf16 autocast, as the recipes' `mixed_precision = "bf16"` runs a round
    (and as the authors' accelerate config does), with the float32 adapters of `add_adapters` on both sides."""
    cuda = sync is not _no_sync
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
        fn()  # warm-up
        sync()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
    return (time.perf_counter() - t) / n


def _no_sync() -> None:
    pass


def measure_shares(
    row, backend, feats, sigmas, opt, student, teacher, steps, sync, cuda, budget_gib, save, prefix="dopsd", shares=SHARES
) -> None:
    """(b) at every checkpointing share; the fastest within the memory budget becomes {prefix}_step_s."""
    tr = backend.transformer
    for share in shares:
        set_checkpointing(tr, share)
        label = f"{prefix}_ckpt_{share:g}"
        peak_reset(cuda)
        try:
            row[f"{label}_step_s"] = timed(
                lambda: project_step(backend, feats, sigmas, opt, student, teacher), steps, sync
            )
            row[f"{label}_peak_gib"] = peak(cuda)
        except torch.OutOfMemoryError:
            row[f"{label}_step_s"], row[f"{label}_peak_gib"] = None, "out of memory"
            opt.zero_grad(set_to_none=True)
        print(label, row[f"{label}_step_s"], row[f"{label}_peak_gib"], flush=True)
        save()
    set_checkpointing(tr, False)
    fits = [
        (row[f"{prefix}_ckpt_{s:g}_step_s"], s)
        for s in shares
        if row[f"{prefix}_ckpt_{s:g}_step_s"] and (not cuda or row[f"{prefix}_ckpt_{s:g}_peak_gib"] <= budget_gib)
    ]
    if fits:
        best, share = min(fits)
        row.update({
            f"{prefix}_step_s": best,
            f"{prefix}_peak_gib": row[f"{prefix}_ckpt_{share:g}_peak_gib"],
            f"{prefix}_checkpointing_share": share,
            "memory_budget_gib": budget_gib,
        })
    save()


def measure_baseline(row, tr, step, a, sync, cuda, save) -> None:
    """(a): the authors' way, with gradient checkpointing on every block, as they train."""
    tr.enable_gradient_checkpointing()
    tr.train()
    peak_reset(cuda)
    row["baseline_step_s"] = timed(step, a.steps, sync)
    row["baseline_peak_gib"] = peak(cuda)
    print("authors' way:", row["baseline_step_s"], row["baseline_peak_gib"], flush=True)
    save()


def finish(row, backend, feats, sigmas, opt, student, teacher, a, sync, cuda, budget_gib, save) -> None:
    """(b) at every share against the budget, the ratio to (a), adapters removed."""
    measure_shares(row, backend, feats, sigmas, opt, student, teacher, a.steps, sync, cuda, budget_gib, save)
    if row.get("dopsd_step_s"):
        row["dopsd_vs_baseline"] = row["dopsd_step_s"] / row["baseline_step_s"]
    originals = quantize_int8(backend.transformer)  # int8 base weights: the 24 GB card option
    measure_shares(row, backend, feats, sigmas, opt, student, teacher, a.steps, sync, cuda, budget_gib, save,
                   prefix="int8", shares=INT8_SHARES)
    restore(backend.transformer, originals)
    remove_adapters(backend.transformer)
    save()


def peak_reset(cuda: bool) -> None:
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(cuda: bool) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


def run_klein(a, dev, dtype, cuda, sync, row, save) -> None:
    t0 = time.time()
    tr, te, vae, layers, px, txt = build(a.tiny, dev, dtype)
    print(f"klein built in {time.time() - t0:.1f}s: transformer {sum(p.numel() for p in tr.parameters()) / 1e9:.2f} B params", flush=True)
    grid = (px // 16, px // 16)
    rank = 8 if a.tiny else 64
    student = add_adapters(tr, rank, 2 * rank, TARGETS)
    teacher = adapter_params(tr, "teacher")
    opt = torch.optim.AdamW(student, lr=2e-5)
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    ids_s = torch.randint(0, 500, (1, txt), device=dev)
    ids_t = torch.randint(0, 500, (1, txt), device=dev)
    image = torch.rand(1, 3, px, px, device=dev, dtype=dtype) * 2 - 1
    measure_baseline(row, tr, lambda: authors_step(tr, te, vae, layers, ids_s, ids_t, image, sigmas, grid, opt, student, teacher),
                     a, sync, cuda, save)
    # features for (b) computed once, then the encoders leave the GPU
    with torch.no_grad():
        feats = [
            {
                "student_text": encode_text(te, ids_s, layers)[0],
                "teacher_text": encode_text(te, ids_t, layers)[0],
                "latents": encode_image(vae, image)[0].float(),
            }
        ]
    te = vae = None  # the encoders leave memory (the timed lambda holds the names)
    backend = KleinBackend.__new__(KleinBackend)
    backend.transformer, backend.device, backend.grid = tr, dev, grid
    finish(row, backend, feats, sigmas, opt, student, teacher, a, sync, cuda, row["baseline_peak_gib"], save)


def run_zimage(a, dev, dtype, cuda, sync, row, save) -> None:
    t0 = time.time()
    tr, te, vl, special, px, txt = build_zimage(a.tiny, dev, dtype)
    print(f"z-image built in {time.time() - t0:.1f}s: transformer {sum(p.numel() for p in tr.parameters()) / 1e9:.2f} B params", flush=True)
    rank = 8 if a.tiny else 64
    student = add_adapters(tr, rank, 2 * rank, ZIMAGE_TARGETS)
    teacher = adapter_params(tr, "teacher")
    opt = torch.optim.AdamW(student, lr=1e-4)
    sigmas = [1.0, 0.9, 0.75, 0.5, 0.0]  # the authors' Z-Image schedule
    latent_shape = (16, px // 8, px // 8)
    ids_s = torch.randint(0, 500, (1, txt), device=dev)
    # the teacher's image bounded as the authors and the recipe do (model.teacher_max_pixels = 768²): a 1024 px
    # image's 1,024 vision tokens + text would overrun the transformer's 1,024 caption positions (axes_lens[0])
    vl_in = zimage_vl_inputs(special, min(px, TEACHER_MAX_SIDE), txt, dev, dtype)
    row["teacher_context_tokens"] = int(vl_in["input_ids"].shape[1])
    measure_baseline(row, tr, lambda: zimage_authors_step(tr, te, vl, vl_in, ids_s, sigmas, latent_shape, opt, student, teacher),
                     a, sync, cuda, save)
    with torch.no_grad():
        feats = [
            {
                "student_text": te(input_ids=ids_s, output_hidden_states=True).hidden_states[-2][0].float(),
                "teacher_text": vl(**vl_in, output_hidden_states=True).hidden_states[-2][0].float(),
                "latents": torch.randn(latent_shape, device=dev),
            }
        ]
    te = vl = None
    finish(row, zimage_backend(tr, dev), feats, sigmas, opt, student, teacher, a, sync, cuda, ZIMAGE_BUDGET_GIB, save)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--models", default="flux2-klein-4b,z-image-turbo")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_round.json"))
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and not a.tiny
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sync = torch.cuda.synchronize if cuda else _no_sync
    results: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "resolution": 64 if a.tiny else 1024,
        "lora_rank": 8 if a.tiny else 64,
        "K": 4,
        "versions": {
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
        },
        "models": {},
    }

    def save():
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=2))

    runners = {"flux2-klein-4b": run_klein, "z-image-turbo": run_zimage}
    for name in a.models.split(","):
        results["models"][name] = {}
        runners[name](a, dev, dtype, cuda, sync, results["models"][name], save)
        if cuda:
            torch.cuda.empty_cache()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
