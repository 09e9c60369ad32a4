"""What `dopsd` itself runs on real-size models: every phase's seconds and peak GPU memory, under a cap.

For FLUX.2-klein-4B and Z-Image-Turbo (with its Qwen3-VL-4B teacher encoder), in one run on one card:
  1. write real-size random-weight pipelines in `from_pretrained` layout to local folders (no downloads;
     random weights say nothing of image quality, all of time and memory);
  2. write the shipped recipe with `source` (and `teacher_encoder`) pointing at those folders, the round
     shortened to --steps optimiser steps, the recipe's own gate (every default prompt and seed at 1024 px;
     --short-gate: two prompts), and `model.memory_budget_gib` = the model's cap from --caps, else
     --budget-gib (the product caps its own process: 14.5 for a 16 GB card, 22 for a 24 GB card);
  3. run the product's command line as a user does, each command its own process:
     `dopsd init`, `dopsd ingest` of two generated 1024 px pairs, `dopsd train --json` (load, features,
     train, gate), `dopsd sample --json`, `dopsd versions export` (diffusers and ComfyUI).
The round and `sample` report each phase's seconds and peak allocated GPU memory themselves; this script
collects them with each command's wall time into --out (bench/results/gpu_e2e.json), written after every
command so a time limit still leaves data. A command that runs out of memory under the cap is run once more
uncapped, to say by how much it exceeds the budget.

`--tiny` runs the same code on tiny configs on the CPU (tests/test_bench.py runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from benchinfo import machine  # noqa: E402
from gpu_round import QWEN3_4B, configs, zimage_configs  # noqa: E402

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHAT = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = ["a bowl of ramen on a wooden table, steam rising", "a red bicycle leaning against a brick wall"]
CAPTIONS = ["a photo of my zxq mug on a desk", "my zxq mug on a windowsill, morning light"]


# ------------------------------------------------------------------------------------ weights on disk


def tokenizer(max_length: int = 4096):
    """A byte-level Qwen tokenizer (ids fit any Qwen vocabulary) with the chat and vision tokens."""
    from dopsd_continual.toy.model import build_tokenizer

    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    tok.chat_template = CHAT
    tok.model_max_length = max_length
    return tok


def text_config(tiny: bool, vocab: int) -> dict:
    from gpu_round import TINY_TE

    cfg = dict(TINY_TE if tiny else QWEN3_4B)
    cfg["vocab_size"] = max(cfg["vocab_size"], vocab)
    return dict(cfg, max_position_embeddings=8192, tie_word_embeddings=True)


def klein_modules(tiny: bool, device) -> dict:
    """FLUX.2-klein-4B's transformer, Qwen3-4B text encoder and VAE (random weights; `meta` for sizes only)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    trc, _, _, _, _ = configs(tiny)
    with torch.device(device):
        return {
            "transformer": Flux2Transformer2DModel(**trc),
            "text_encoder": Qwen3ForCausalLM(Qwen3Config(**text_config(tiny, len(tokenizer())))),
            "vae": AutoencoderKLFlux2(block_out_channels=(32, 32, 64, 64), layers_per_block=1) if tiny else AutoencoderKLFlux2(),
        }


def build_klein(tiny: bool, folder: Path, device) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipe = Flux2KleinPipeline(scheduler=sched, tokenizer=tokenizer(), is_distilled=True, **klein_modules(tiny, device))
    pipe.to(dtype=torch.float32 if tiny else torch.bfloat16)
    pipe.save_pretrained(folder)


def zimage_modules(tiny: bool, device) -> dict:
    """Z-Image-Turbo's transformer, Qwen3-4B text encoder, FLUX.1 VAE and the Qwen3-VL-4B teacher encoder."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    trc, _, vision, _, _ = zimage_configs(tiny)
    tok = tokenizer()
    text = text_config(tiny, len(tok))
    trc = dict(trc, cap_feat_dim=text["hidden_size"])
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(t) for k, t in
           (("image", "<|image_pad|>"), ("video", "<|video_pad|>"), ("vision_start", "<|vision_start|>"),
            ("vision_end", "<|vision_end|>"))}
    mrope = [8, 4, 4] if tiny else [24, 20, 20]
    vl_cfg = Qwen3VLConfig(
        text_config=dict(text, rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": mrope,
                                                "mrope_interleaved": True}),
        vision_config=dict(vision, patch_size=16, spatial_merge_size=2, temporal_patch_size=2),
        **ids,
    )
    with torch.device(device):
        tr = ZImageTransformer2DModel(**trc)
        if device != "meta":
            for p in tr.parameters():  # pad tokens are created with torch.empty: give every weight a finite value
                if not torch.isfinite(p).all():
                    p.data.normal_(0, 0.02)
        if tiny:
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
                                latent_channels=16, norm_num_groups=8, scaling_factor=0.3611, shift_factor=0.1159)
        else:  # the FLUX.1 VAE that Z-Image uses: 16 latent channels, 8x down
            vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                                layers_per_block=2, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                                use_quant_conv=False, use_post_quant_conv=False)
        return {"transformer": tr, "text_encoder": Qwen3Model(Qwen3Config(**text)), "vae": vae,
                "teacher_encoder": Qwen3VLForConditionalGeneration(vl_cfg)}


def build_zimage(tiny: bool, folder: Path, vl_folder: Path, device) -> None:
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    dtype = torch.float32 if tiny else torch.bfloat16
    parts = zimage_modules(tiny, device)
    vl = parts.pop("teacher_encoder")
    tok = tokenizer()
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    pipe = ZImagePipeline(scheduler=sched, tokenizer=tok, **parts)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(folder)
    del pipe, parts
    vl.to(dtype).save_pretrained(vl_folder)
    processor_cls = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    processor_cls(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32,
                  max_pixels=1024 * 1024).save_pretrained(vl_folder)
    tok.save_pretrained(vl_folder)


# -------------------------------------------------------------------------------------------- recipe


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(toml_value(x) for x in v) + "]"


def write_recipe(shipped: str, path: Path, changes: dict) -> Path:
    """The shipped recipe with `changes` ({section: {key: value}}) applied, as TOML."""
    from dopsd_continual.recipe import RECIPES_DIR, load_recipe

    recipe = load_recipe(RECIPES_DIR / f"{shipped}.toml")
    for section, kv in changes.items():
        recipe[section].update(kv)
    lines = []
    for section, kv in recipe.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in kv.items() if v is not None]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------- run


def dopsd(args: list[str], env: dict, timeout: float) -> tuple[dict | None, float, str]:
    """One `dopsd` command in its own process: (its JSON, or None; wall seconds; the error line, if any)."""
    t0 = time.perf_counter()
    entry = os.environ.get("E2E_ENTRY")  # bench/oom_probe.py: the live blocks at an out-of-memory
    cmd = [sys.executable, entry] if entry else [sys.executable, "-m", "dopsd_continual.cli_entry"]
    p = subprocess.run([*cmd, *args], capture_output=True, text=True,
                       env=env, timeout=timeout, cwd=REPO)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        lines = p.stderr.strip().splitlines() or ["(no output)"]
        print("\n".join("    | " + ln for ln in lines[-12:]), flush=True)
        tail = lines[-1]
        return None, seconds, tail
    try:
        return json.loads(p.stdout), seconds, ""
    except json.JSONDecodeError:
        return {}, seconds, ""


def make_pairs(folder: Path, px: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        yy, xx = np.mgrid[0:px, 0:px] / px  # smooth gradients plus noise: a photo-sized PNG, not a flat one
        arr = np.stack([xx, yy, (xx + yy) / 2], -1) * 200 + rng.integers(0, 55, (px, px, 3))
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"pair{i}.png")
        (folder / f"pair{i}.txt").write_text(caption, encoding="utf-8")


MODELS = {  # name: its shipped recipe
    "flux2-klein-4b": "flux2-klein-4b",
    "z-image-turbo": "z-image-turbo",
}


def run_model(name: str, a, row: dict, save) -> None:
    work = Path(a.work) / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    build_device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    weights, vl = work / "weights", work / "teacher_encoder"
    if name == "z-image-turbo":
        build_zimage(a.tiny, weights, vl, build_device)
    else:
        build_klein(a.tiny, weights, build_device)
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    row["write_weights_s"] = time.perf_counter() - t0
    row["weights_gib"] = sum(f.stat().st_size for f in work.rglob("*.safetensors")) / 2**30
    save()
    px = 64 if a.tiny else 1024
    budget = a.caps.get(name, a.budget_gib)
    row["budget_gib"] = budget
    model = {"source": str(weights), "memory_budget_gib": budget}
    if a.tiny:
        model |= {"height": px, "width": px, "max_sequence_length": 32, "text_encoder_out_layers": [1, 2, 3],
                  "teacher_min_pixels": 64 * 64, "teacher_max_pixels": 64 * 64}
    if name == "z-image-turbo":
        model["teacher_encoder"] = str(vl)
    changes = {"model": model, "train": {"steps": a.steps}, "ingest": {"min_side": 32}}
    if a.short_gate:
        changes["gate"] = {"prompts": PROMPTS}
    recipe = write_recipe(MODELS[name], work / "recipe.toml", changes)
    row["recipe"] = str(recipe)
    if a.prepare_only:  # the weights and the recipe for another benchmark (bench/gpu_sample.sh): kept
        save()
        return
    make_pairs(work / "drop", px)
    state = work / "state"
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, DOPSD_STABILITY_SECONDS="0", PYTHONUNBUFFERED="1")
    row["commands"] = {}

    def step(key: str, args: list[str], budget_retry: bool = False) -> dict | None:
        out, seconds, err = dopsd([*args, "--state", str(state)], env, a.timeout)
        row["commands"][key] = {"seconds": seconds, "ok": out is not None, **({"error": err} if err else {})}
        print(f"  {name} {key}: {seconds:.1f} s {'ok' if out is not None else 'FAILED: ' + err}", flush=True)
        save()
        if out is None and budget_retry and a.uncapped_retry and "out of GPU memory" in err:  # how much does it need uncapped?
            write_recipe(MODELS[name], recipe, {**changes, "model": dict(model, memory_budget_gib=0)})
            out2, s2, err2 = dopsd([*args, "--state", str(state)], env, a.timeout)
            write_recipe(MODELS[name], recipe, changes)
            m = (out2 or {}).get("metrics", out2 or {})
            row["commands"][key + "_uncapped"] = {"seconds": s2, "ok": out2 is not None, **({"error": err2} if err2 else {}),
                                                  "phases": m.get("phases", {})}
            save()
        return out

    step("init", ["init", "--recipe", str(recipe), "--watch", str(work / "drop")])
    ingest = step("ingest", ["ingest", "--json"])
    row["queued"] = len(ingest.get("queued", [])) if ingest else 0
    round_ = step("train", ["train", "--json"], budget_retry=True)
    if round_:
        m = round_["metrics"]
        row["round"] = {"version": round_["version"], "verdict": round_["verdict"], "reasons": round_["reasons"],
                        "phases": m.get("phases", {}), "train_seconds": m.get("train_seconds"),
                        "gate_seconds": m.get("gate_seconds")}
        vid = round_["version"]
        shot = step("sample", ["sample", PROMPTS[0], "--version", vid, "--json", "--out", str(work / "sample.png")],
                    budget_retry=True)
        if shot:
            row["sample"] = {"phases": shot.get("phases", {}), "steps": shot["steps"]}
        for fmt in ("diffusers", "comfyui"):
            step(f"export_{fmt}", ["versions", "export", vid, "--format", fmt, "--out", str(work / f"export-{fmt}")])
    peaks = [p["peak_gib"] for part in (row.get("round", {}), row.get("sample", {}))
             for p in part.get("phases", {}).values() if p.get("peak_gib") is not None]
    row["peak_gib"] = max(peaks) if peaks else None
    row["within_budget"] = all(c["ok"] for k, c in row["commands"].items() if not k.endswith("_uncapped")) and (
        row["peak_gib"] is None or budget <= 0 or row["peak_gib"] <= budget)
    try:  # the accountant's plan for this recipe under this cap, beside what was measured
        from dopsd_continual import memory
        from dopsd_continual.recipe import load_recipe

        plan = memory.plan(load_recipe(recipe), budget)
        row["plan"] = {"phases": plan.phases, "batches": plan.batches, "fits": plan.fits}
    except Exception as e:
        row["plan"] = {"error": f"{type(e).__name__}: {e}"}
    save()
    if not a.keep:
        shutil.rmtree(work / "weights", ignore_errors=True)
        shutil.rmtree(work / "teacher_encoder", ignore_errors=True)


def versions() -> dict:
    import diffusers
    import peft
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (the same code path)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--steps", type=int, default=3, help="optimiser steps of the shortened round")
    ap.add_argument("--budget-gib", type=float, default=22.0, help="the cap for models --caps does not name")
    ap.add_argument("--caps", default="", help="per-model caps, e.g. flux2-klein-4b=14.5,z-image-turbo=22")
    ap.add_argument("--short-gate", action="store_true", help="two held-out prompts instead of the recipe's gate")
    ap.add_argument("--timeout", type=float, default=420.0, help="seconds per command")
    ap.add_argument("--work", default=None, help="default: a folder on the disk with the most free space")
    ap.add_argument("--keep", action="store_true", help="keep the written weights")
    ap.add_argument("--prepare-only", action="store_true",
                    help="write the weights and the recipe (its path in the JSON's models.NAME.recipe), run nothing")
    ap.add_argument("--no-uncapped-retry", dest="uncapped_retry", action="store_false",
                    help="after an out-of-memory, do not run the command again without the cap")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_e2e.json"))
    a = ap.parse_args()
    a.caps = {k: float(v) for k, v in (kv.split("=") for kv in a.caps.split(",") if kv)}
    if a.work is None:
        roots = [Path("/tmp"), REPO / "runs"]
        (REPO / "runs").mkdir(exist_ok=True)
        a.work = str(max(roots, key=lambda r: shutil.disk_usage(r).free) / "dopsd-gpu-e2e")
    cuda = torch.cuda.is_available()
    result = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "machine": machine(),
              "date": time.strftime("%Y-%m-%d"), "versions": versions(), "tiny": a.tiny, "budget_gib": a.budget_gib,
              "resolution": 64 if a.tiny else 1024, "train_steps": a.steps,
              "gate": "two held-out prompts" if a.short_gate else "the recipe's default", "models": {}}

    def save():
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2, default=str))

    for name in a.models.split(","):
        print(f"{name}:", flush=True)
        row = result["models"].setdefault(name, {})
        try:
            run_model(name, a, row, save)
        except Exception as e:  # one model's failure still leaves the other's numbers
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"  {name} failed: {row['error']}", flush=True)
            save()
    save()


if __name__ == "__main__":
    main()
