"""Train the toy-shapes model: VAE -> base flow model (text and reference paths) -> 4-step distillation.

    python -m dopsd_continual.toy.train --stage all --workdir runs/toy --device cuda \
        --budget vae=75 --budget base=210 --budget distill=140
    python -m dopsd_continual.toy.train --stage export --workdir runs/toy --out dopsd_continual/toy/model

Every stage runs for a wall-clock budget (seconds) on whatever device it is given, checkpoints its
weights to the work dir (safetensors) and resumes from them when run again; optimiser moments restart on
resume. The same script runs on 2 CPU cores (hours) or a GPU (minutes).

Distillation method: on-policy trajectory distillation to the pipeline's own 4-step schedule. The
student starts as the base model; for each of the 4 steps, the frozen base (teacher) integrates its ODE
from the *student's* current state over that step with fine Euler steps, and the student's single step is
regressed onto the teacher's end point. The student then advances with its own step (detached), so it
learns at exactly the states it visits when sampling in 4 steps. Reference batches are distilled the same
way, so the distilled model keeps the reference-image path that D-OPSD's teacher needs. It was chosen
over consistency/adversarial methods because it needs no extra networks, is stable at this size and is
the same roll-out structure as D-OPSD itself.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from ..families import klein
from . import model as toy_model
from .world import held_out_captions, held_out_loose_captions, loosen, random_scene, randomise, render_scenes

DEFAULT_BUDGET = {"vae": 75.0, "base": 210.0, "distill": 140.0, "decoder": 0.0}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ data


def _render_chunk(args: tuple[int, int, list[str], float]) -> tuple[list[str], np.ndarray, np.ndarray]:
    seed, n, held, loose = args
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    held_set = set(held)
    scenes, captions = [], []
    while len(scenes) < n:
        s = random_scene(rng)
        full = s.caption()
        cap = loosen(s, rng, loose).caption() if loose > 0 and rng.random() < 0.5 else full  # loose 0: the same pool as before
        if full not in held_set and cap not in held_set:
            scenes.append(s)
            captions.append(cap)
    alt = [randomise(s.nominal(), rng) for s in scenes]
    a = (render_scenes(scenes) * 255).round().to(torch.uint8).numpy()
    b = (render_scenes(alt) * 255).round().to(torch.uint8).numpy()
    return captions, a, b


def make_pool(n: int, seed: int, workers: int, loose: float = 0.0) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """n training scenes: captions, a rendering A and a second rendering B of the same scene. With loose > 0
    half the captions leave each field unsaid with that probability (`world.loosen`); B then shows the same
    objects in other rotations and jitter, as the reference path's "another picture of it"."""
    held = held_out_captions() + held_out_loose_captions()
    chunk = 500
    jobs = [(seed * 100003 + i, min(chunk, n - i * chunk), held, loose) for i in range(math.ceil(n / chunk))]
    caps, a, b = [], [], []
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            results = list(ex.map(_render_chunk, jobs))
    else:
        results = [_render_chunk(j) for j in jobs]
    for c, x, y in results:
        caps += c
        a.append(torch.from_numpy(x))
        b.append(torch.from_numpy(y))
    return caps, torch.cat(a), torch.cat(b)


# ------------------------------------------------------------------------------------------ checkpoints


def save_state(path: Path, module: torch.nn.Module) -> None:
    from safetensors.torch import save_model

    tmp = path.with_suffix(".tmp")
    save_model(module, str(tmp))  # handles tied weights (the text encoder's embeddings)
    os.replace(tmp, path)


def load_state(path: Path, module: torch.nn.Module) -> bool:
    from safetensors.torch import load_model

    if not path.exists():
        return False
    load_model(module, str(path), device=str(next(module.parameters()).device))
    return True


class Progress:
    def __init__(self, workdir: Path):
        self.path = workdir / "progress.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, stage: str) -> dict:
        return self.data.setdefault(stage, {"steps": 0, "samples": 0, "seconds": 0.0, "done": False})

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------------------ stages


def sigma_batch(b: int, device, shift: float = toy_model.SCHEDULER_SHIFT) -> torch.Tensor:
    u = torch.rand(b, device=device)
    return shift * u / (1 + (shift - 1) * u)


def train_vae(ctx: dict, decoder_only: bool = False) -> None:
    """The VAE on rendered scenes (L1 + MSE). decoder_only: sharpen the decoder alone, so the encoder (and
    the latent space the transformer learned) stays fixed, and so do the batch-norm statistics."""
    stage = "decoder" if decoder_only else "vae"
    dev, work, prog = ctx["device"], ctx["workdir"], ctx["progress"]
    p = prog.get(stage)
    vae = ctx["pipe"].vae.to(dev)
    load_state(work / "vae.safetensors", vae)
    vae.train()
    if decoder_only:
        vae.eval()
        vae.decoder.train()
        vae.requires_grad_(False)
        vae.decoder.requires_grad_(True)
        if getattr(vae, "post_quant_conv", None) is not None:
            vae.post_quant_conv.requires_grad_(True)
    params = [q for q in vae.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=ctx["lr_decoder" if decoder_only else "lr_vae"], weight_decay=0.0)
    pool = ctx["pool_a"]
    bs, t0, last_ck = ctx["batch_vae"], time.time(), time.time()
    budget = ctx["budget"][stage] - p["seconds"]
    while time.time() - t0 < budget:
        idx = torch.randint(len(pool), (bs,))
        x = pool[idx].to(dev).float() / 255 * 2 - 1
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=ctx["amp"]):
            with torch.set_grad_enabled(not decoder_only):
                z = vae.encode(x).latent_dist.mode()
            rec = vae.decode(z).sample
        loss = F.l1_loss(rec.float(), x) + F.mse_loss(rec.float(), x)
        if not decoder_only:
            loss = loss + 1e-6 * z.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        p["steps"] += 1
        p["samples"] += bs
        if p["steps"] % 100 == 0:
            psnr = -10 * math.log10(F.mse_loss((rec.detach().float() + 1) / 2, (x + 1) / 2).item() + 1e-12)
            log(f"{stage} step {p['steps']} loss {loss.item():.4f} psnr {psnr:.1f} dB")
        if time.time() - last_ck > 60:  # checkpoint weights and the time spent, so a killed run resumes
            save_state(work / "vae.safetensors", vae)
            p["seconds"] += time.time() - last_ck
            last_ck = time.time()
            prog.save()
    p["seconds"] += time.time() - last_ck
    vae.eval()
    if not decoder_only:
        set_bn_statistics(ctx)
    save_state(work / "vae.safetensors", vae)
    p["done"] = True
    prog.save()


def set_bn_statistics(ctx: dict) -> None:
    """vae.bn's running statistics are never updated by a forward pass: set them from the training latents."""
    pipe, dev = ctx["pipe"], ctx["device"]
    vae = pipe.vae
    vae.bn.running_mean.zero_()
    vae.bn.running_var.fill_(1.0 - vae.config.batch_norm_eps)
    lats = []
    with torch.no_grad():
        for i in range(0, min(len(ctx["pool_a"]), 8192), 512):
            x = ctx["pool_a"][i : i + 512].to(dev).float() / 255
            tok, _ = klein.encode_images(pipe, x)
            lats.append(tok.float().reshape(-1, tok.shape[-1]))
    lat = torch.cat(lats)
    vae.bn.running_mean.copy_(lat.mean(0))
    vae.bn.running_var.copy_(lat.var(0) - vae.config.batch_norm_eps)
    log(f"vae latent channel std range {lat.std(0).min():.3f}..{lat.std(0).max():.3f}")


def prepare_tokens(ctx: dict) -> None:
    """Latent tokens of both renderings and text features of every caption (plain and with the instruction)."""
    pipe, dev = ctx["pipe"], ctx["device"]
    pipe.vae.to(dev).eval()
    pipe.text_encoder.to(dev).eval()
    ta, tb = [], []
    with torch.no_grad():
        for i in range(0, len(ctx["pool_a"]), 1024):
            a, grid = klein.encode_images(pipe, ctx["pool_a"][i : i + 1024].to(dev).float() / 255)
            b, _ = klein.encode_images(pipe, ctx["pool_b"][i : i + 1024].to(dev).float() / 255)
            ta.append(a.float())
            tb.append(b.float())
    ctx["tok_a"], ctx["tok_b"], ctx["grid"] = torch.cat(ta), torch.cat(tb), grid
    uniq = sorted(set(ctx["captions"]))
    index = {c: i for i, c in enumerate(uniq)}
    ctx["cap_idx"] = torch.tensor([index[c] for c in ctx["captions"]], device=dev)
    plain, instr = [], []
    for i in range(0, len(uniq), 1024):
        chunk = uniq[i : i + 1024]
        plain.append(encode(ctx, chunk)[0])
        instr.append(encode(ctx, [f"{toy_model.TEACHER_INSTRUCTION} {c}" for c in chunk])[0])
    ctx["emb_plain"], ctx["emb_instr"] = torch.cat(plain), torch.cat(instr)
    ctx["emb_empty"] = encode(ctx, [""])[0]
    _, ctx["text_ids"] = encode(ctx, uniq[:1])
    log(f"tokens: {tuple(ctx['tok_a'].shape)}, {len(uniq)} unique captions, text {tuple(ctx['emb_plain'].shape)}")


def encode(ctx: dict, prompts: list[str]):
    return klein.encode_prompts(ctx["pipe"], prompts, toy_model.MAX_SEQUENCE_LENGTH, toy_model.TEXT_OUT_LAYERS)


def batch_conditions(ctx: dict, idx: torch.Tensor, with_ref: bool):
    """Text features (+ reference tokens) for pool indices. Reference: half copies, half other renderings."""
    dev = ctx["device"]
    ci = ctx["cap_idx"][idx]
    b = len(idx)
    text_ids = ctx["text_ids"].expand(b, -1, -1)
    img_ids = klein.latent_ids(b, ctx["grid"], dev)
    if not with_ref:
        emb = ctx["emb_plain"][ci]
        if ctx.get("uncond", 0.0) > 0:  # caption dropout: the empty prompt, what classifier-free guidance contrasts with
            drop = (torch.rand(b, device=dev) < ctx["uncond"]).view(b, 1, 1)
            emb = torch.where(drop, ctx["emb_empty"].expand_as(emb), emb)
        return emb, text_ids, img_ids, None, None
    same = (torch.rand(b, device=dev) < 0.5).view(b, 1, 1)
    ref = torch.where(same, ctx["tok_a"][idx], ctx["tok_b"][idx])
    return ctx["emb_instr"][ci], text_ids, img_ids, ref, klein.reference_ids(b, ctx["grid"], dev)


def train_base(ctx: dict) -> None:
    dev, work, prog = ctx["device"], ctx["workdir"], ctx["progress"]
    p = prog.get("base")
    tr = ctx["pipe"].transformer.to(dev).train()
    load_state(work / "transformer_base.safetensors", tr)
    opt = torch.optim.AdamW(tr.parameters(), lr=ctx["lr_base"], weight_decay=0.0, betas=(0.9, 0.99))
    bs, t0, last_ck = ctx["batch"], time.time(), time.time()
    budget = ctx["budget"]["base"] - p["seconds"]
    n = len(ctx["tok_a"])
    while time.time() - t0 < budget:
        for g in opt.param_groups:
            g["lr"] = ctx["lr_base"] * min(1.0, (p["steps"] + 1) / 300)
        with_ref = p["steps"] % 2 == 1  # img_ids are shared by a batch: alternate text and reference batches
        idx = torch.randint(n, (bs,), device=dev)
        x0 = ctx["tok_a"][idx]
        emb, tids, iids, ref, rids = batch_conditions(ctx, idx, with_ref)
        sigma = sigma_batch(bs, dev)
        noise = torch.randn_like(x0)
        xt = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=ctx["amp"]):
            v = klein.velocity(tr, xt, sigma, emb, tids, iids, ref, rids)
        loss = F.mse_loss(v.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        p["steps"] += 1
        p["samples"] += bs
        if p["steps"] % 200 == 0:
            log(f"base step {p['steps']} loss {loss.item():.4f} ({p['samples'] / 1e6:.2f} M samples)")
        if time.time() - last_ck > 60:
            save_state(work / "transformer_base.safetensors", tr)
            last_ck = time.time()
    p["seconds"] += time.time() - t0
    save_state(work / "transformer_base.safetensors", tr)
    p["done"] = True
    prog.save()


def teacher_segment(teacher, x, s0: float, s1: float, substeps: int, cond, uncond=None, guidance: float = 1.0) -> torch.Tensor:
    sig = np.linspace(s0, s1, substeps + 1)
    return klein.euler_sample(teacher, x, sig, *cond, uncond=uncond, guidance=guidance)


def train_distill(ctx: dict) -> None:
    dev, work, prog = ctx["device"], ctx["workdir"], ctx["progress"]
    p = prog.get("distill")
    p["guidance"] = ctx["guidance"]  # what the student learnt to follow (the eval stage measures against it)
    teacher = ctx["pipe"].transformer.to(dev).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    load_state(work / "transformer_distilled.safetensors", student)
    opt = torch.optim.AdamW(student.parameters(), lr=ctx["lr_distill"], weight_decay=0.0, betas=(0.9, 0.99))
    sigmas = toy_model.schedule_sigmas(4)
    bs, t0, last_ck = ctx["batch_distill"], time.time(), time.time()
    budget = ctx["budget"]["distill"] - p["seconds"]
    n = len(ctx["tok_a"])
    while time.time() - t0 < budget:
        with_ref = p["steps"] % 2 == 1
        idx = torch.randint(n, (bs,), device=dev)
        cond = batch_conditions(ctx, idx, with_ref)
        # text batches: the teacher samples with classifier-free guidance (a guided teacher, as an undistilled
        # model is sampled); reference batches keep the plain teacher (the reference path has no empty prompt)
        guidance = 1.0 if with_ref else ctx["guidance"]
        x = torch.randn_like(ctx["tok_a"][idx])
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=ctx["amp"]):
                target = teacher_segment(teacher, x, s0, s1, ctx["substeps"], cond, ctx["emb_empty"], guidance).float()
                v = klein.velocity(student, x, torch.full((bs,), s0, device=dev), *cond).float()
            x_next = x + (s1 - s0) * v
            loss = F.mse_loss(x_next, target) / (s0 - s1) ** 2 / (len(sigmas) - 1)
            loss.backward()  # per roll-out step: the graphs are disjoint
            total += loss.item()
            x = x_next.detach()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        p["steps"] += 1
        p["samples"] += bs
        if p["steps"] % 25 == 0:
            log(f"distill step {p['steps']} loss {total:.4f}")
        if time.time() - last_ck > 60:
            save_state(work / "transformer_distilled.safetensors", student)
            last_ck = time.time()
    p["seconds"] += time.time() - t0
    save_state(work / "transformer_distilled.safetensors", student)
    ctx["student"] = student.eval()
    p["done"] = True
    prog.save()


# ---------------------------------------------------------------------------------------------- assembly


def build_ctx(args) -> dict:
    dev = torch.device(args.device)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    tok_dir = work / "tokenizer"
    te_path = work / "text_encoder.safetensors"
    pipe = toy_model.build_pipeline(vae=toy_model.build_vae(args.vae_down))
    if tok_dir.exists():
        from transformers import Qwen2TokenizerFast

        pipe.tokenizer = Qwen2TokenizerFast.from_pretrained(tok_dir)
    else:
        pipe.tokenizer.save_pretrained(tok_dir)
    if not load_state(te_path, pipe.text_encoder):
        save_state(te_path, pipe.text_encoder)
    load_state(work / "vae.safetensors", pipe.vae)
    if not load_state(work / "transformer_base.safetensors", pipe.transformer) and args.init_transformer:
        load_state(Path(args.init_transformer), pipe.transformer)  # warm start (the token grid may differ)
        log(f"base transformer initialised from {args.init_transformer}")
    budget = dict(DEFAULT_BUDGET)
    for item in args.budget or []:
        k, _, v = item.partition("=")
        budget[k] = float(v)
    return {
        "device": dev,
        "workdir": work,
        "progress": Progress(work),
        "pipe": pipe,
        "budget": budget,
        "amp": dev.type == "cuda",
        "batch": args.batch,
        "batch_vae": args.batch_vae,
        "batch_distill": args.batch_distill,
        "lr_vae": 1e-3,
        "lr_decoder": 3e-4,
        "lr_base": args.lr,
        "lr_distill": args.lr_distill,
        "substeps": args.substeps,
        "uncond": args.uncond,
        "guidance": args.guidance,
        "eval_ref_steps": args.eval_ref_steps,
        "eval_prompts": args.eval_prompts,
    }


def export(ctx: dict, out: Path) -> None:
    """Write the distilled pipeline in from_pretrained layout (transformer stored in fp16 to stay small)."""
    pipe = ctx["pipe"]
    work = ctx["workdir"]
    distilled = copy.deepcopy(pipe.transformer)
    load_state(work / "transformer_distilled.safetensors", distilled)
    out_pipe = toy_model.build_pipeline(
        transformer=distilled.cpu().to(torch.float16),
        vae=copy.deepcopy(pipe.vae).cpu().to(torch.float16),
        text_encoder=pipe.text_encoder.cpu(),
        tokenizer=pipe.tokenizer,
    )
    out.mkdir(parents=True, exist_ok=True)
    out_pipe.save_pretrained(out, safe_serialization=True)
    scorer = work / "scorer.safetensors"
    if scorer.exists():  # shipped with the model, in fp16 like the rest
        from safetensors.torch import load_file, save_file

        save_file({k: v.half() for k, v in load_file(str(scorer)).items()}, str(out / "scorer.safetensors"))
        # the gate's defaults for this model (gate.model_defaults): its world's prompts, judged by that scorer
        (out / "dopsd-gate.json").write_text(json.dumps({"prompts": "toy-shapes", "judges": ["toy-truth"]}) + "\n")
    log(f"exported to {out} (weights stored in fp16; from_pretrained loads them as float32)")


def evaluate_all(ctx: dict, scorer_dir: Path) -> dict:
    """The model-card table: held-out prompts at several step counts, and the reference path on the packs."""
    from PIL import Image

    from .evaluate import concept_rows, decode_latents, final_latents, sample_sheet, trajectory_error
    from .scorer import load_classifier, score_images

    pipe, dev, work = ctx["pipe"], ctx["device"], ctx["workdir"]
    pipe.vae.to(dev).eval()
    pipe.text_encoder.to(dev).eval()
    clf = load_classifier(scorer_dir)
    base = pipe.transformer.to(dev).eval()
    distilled = copy.deepcopy(base)
    load_state(work / "transformer_distilled.safetensors", distilled)
    ref_steps = ctx["eval_ref_steps"]
    wd = ctx["progress"].get("distill").get("guidance", 1.0)  # the distillation teacher's guidance
    table: dict = {"trajectory_reference": f"base @ {ref_steps} steps"}
    if wd != 1.0:
        table["trajectory_reference_guided"] = f"base @ {ref_steps} steps with guidance {wd:g} (the distillation's teacher)"
    settings = [("base", base, 4, 1.0), ("base", base, 8, 1.0), ("base", base, 32, 1.0)]
    w = ctx["guidance"]
    if w != 1.0:  # the base sampled as an undistilled model is: with classifier-free guidance
        settings += [(f"base cfg {w:g}", base, steps, w) for steps in (4, 8, 32)]
    settings += [("distilled", distilled, steps, 1.0) for steps in (1, 2, 4, 32)]
    table["guidance"] = w
    n = ctx["eval_prompts"]  # key suffix -> prompts
    prompt_sets = {"": held_out_captions()[:n], "_loose": held_out_loose_captions()[:n]}
    for suffix, prompts in prompt_sets.items():
        key = f"rows{suffix}"
        table[f"held_out_prompts{suffix}"] = len(prompts)
        table[key] = []
        seeds = list(range(len(prompts)))
        reference = final_latents(pipe, base, prompts, seeds, ref_steps)
        reference_guided = final_latents(pipe, base, prompts, seeds, ref_steps, guidance=wd) if wd != 1.0 else None
        for label, tr, steps, g in settings:
            t = time.time()
            latents = final_latents(pipe, tr, prompts, seeds, steps, guidance=g)  # sampled once: scored and measured
            sc = score_images(clf, decode_latents(pipe, latents), prompts).mean()
            sc["trajectory_error"] = trajectory_error(latents, reference)
            if reference_guided is not None:  # where the guided flow ends: what the guided teacher distilled
                sc["trajectory_error_guided"] = trajectory_error(latents, reference_guided)
            table[key].append({"model": label, "steps": steps, "guidance": g, **sc})
            log(f"eval {key} {label} @ {steps} steps: overall {sc['overall']:.3f}, iou {sc['iou']:.3f}, "
                f"trajectory error {sc['trajectory_error']:.3f} ({time.time() - t:.1f}s)")
    table["concepts"] = {"base": concept_rows(pipe, base, clf), "distilled": concept_rows(pipe, distilled, clf)}
    for m, rows in table["concepts"].items():
        for name, r in rows.items():
            log(f"concept {name} ({m}): text {r['text_only']['overall']:.3f} ref {r['with_reference']['overall']:.3f}")
    table["progress"] = ctx["progress"].data
    (work / "eval.json").write_text(json.dumps(table, indent=2))
    sheet = []
    for tr, steps in [(base, 4), (base, 32), (distilled, 4)]:
        for prompts in prompt_sets.values():
            sheet.append(np.concatenate(list(sample_sheet(pipe, tr, prompts[:12], steps)), axis=1))
    Image.fromarray(np.concatenate(sheet, axis=0)).save(work / "samples.png")
    return table


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["vae", "base", "distill", "all", "decoder", "eval", "export"], required=True)
    ap.add_argument("--scorer", default="runs/scorer", help="folder with scorer.safetensors (for eval)")
    ap.add_argument("--workdir", default="runs/toy")
    ap.add_argument("--out", default="dopsd_continual/toy/model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", action="append", help="STAGE=SECONDS (wall clock), repeatable")
    ap.add_argument("--pool", type=int, default=40000, help="training scenes rendered up front")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batch-vae", type=int, default=128)
    ap.add_argument("--batch-distill", type=int, default=256)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--lr-distill", type=float, default=1e-4)
    ap.add_argument("--substeps", type=int, default=6, help="teacher Euler steps per student step")
    ap.add_argument("--vae-down", type=int, default=8, choices=sorted(toy_model.VAE_CHANNELS),
                    help="VAE downsampling: 8 gives 4x4 image tokens (the shipped model), 4 gives 8x8")
    ap.add_argument("--loose", type=float, default=0.0,
                    help="half the captions leave each of size/colour/position/background unsaid with this probability")
    ap.add_argument("--uncond", type=float, default=0.0,
                    help="share of text batches' captions replaced by the empty prompt (for classifier-free guidance)")
    ap.add_argument("--guidance", type=float, default=1.0,
                    help="distill stage: the teacher's classifier-free guidance on text batches (needs a base trained "
                         "with --uncond); eval stage: adds base rows sampled with this guidance")
    ap.add_argument("--eval-ref-steps", type=int, default=128,
                    help="eval stage: the base's step count whose end points trajectory errors are measured against")
    ap.add_argument("--eval-prompts", type=int, default=200, help="eval stage: held-out prompts per set (at most 200)")
    ap.add_argument("--init-transformer", default=None,
                    help="safetensors to start the base transformer from when the work dir has none (warm start)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    ctx = build_ctx(args)
    if args.stage == "export":
        export(ctx, Path(args.out))
        return
    if args.stage == "eval":
        evaluate_all(ctx, Path(args.scorer))
        return
    t = time.time()
    caps, a, b = make_pool(args.pool, args.seed, args.workers, args.loose)
    ctx.update(captions=caps, pool_a=a, pool_b=b)
    log(f"rendered {len(caps)} scenes x2 in {time.time() - t:.1f}s")
    stages = ["vae", "base", "distill"] if args.stage == "all" else [args.stage]
    for st in stages:
        if st not in ("vae", "decoder"):
            ctx["pipe"].vae.to(ctx["device"]).eval()
            if "tok_a" not in ctx:
                prepare_tokens(ctx)
        log(f"stage {st}: budget {ctx['budget'][st]:.0f}s")
        {"vae": train_vae, "base": train_base, "distill": train_distill, "decoder": lambda c: train_vae(c, decoder_only=True)}[st](ctx)
    if args.stage == "all":
        export(ctx, Path(args.out))
        if (Path(args.scorer) / "scorer.safetensors").exists():
            evaluate_all(ctx, Path(args.scorer))
    log("done")


if __name__ == "__main__":
    main()
