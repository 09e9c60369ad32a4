"""Peak GPU memory and seconds of each sampling-side phase at real size, by batch: the accountant's ground truth.

For FLUX.2-klein-4B and Z-Image-Turbo (random weights, bf16, built straight on the card, no disk), through
the diffusers pipeline as `dopsd_continual.sampling.Sampler` calls it (prompt features from the pipeline's
own `encode_prompt`, `output_type="latent"`, the recipe's steps and native guidance, 1024 px):
  encode     the text encoder over B prompts from recipes/prompts/general.txt (max_sequence_length 512)
  transformer  a whole few-step call of B pictures (peak above the resident weights)
  decode     the VAE decode of B latents
each at several B, with the resident bytes before the call, so that activations = peak - resident.
Then what a picture costs, for the warm-sampler work: one 1024 px picture with the transformer and VAE
resident (warm), the transformer + VAE copied to the card from pinned and from pageable host memory, and
(klein, --cold) a plain `from_pretrained` from local files plus the same call in a fresh process.

Writes --out (bench/results/gpu_activations.json) after every measurement. `--tiny` runs the same code on
tiny configs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from benchinfo import machine  # noqa: E402
from gpu_e2e import klein_modules, tokenizer, versions, zimage_modules  # noqa: E402

GIB = 2**30
PROMPTS = [ln.strip() for ln in (REPO / "recipes" / "prompts" / "general.txt").read_text().splitlines()
           if ln.strip() and not ln.startswith("#")]


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(dev, fn):
    """(result, seconds, peak GiB, resident GiB before) of fn()."""
    sync(dev)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / GIB if cuda else 0.0
    t0 = time.perf_counter()
    out = fn()
    sync(dev)
    s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / GIB if cuda else 0.0
    return out, s, peak, before


def pipeline(name: str, tiny: bool, dev):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, ZImagePipeline

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    build_on = "cpu" if tiny else dev
    if name == "flux2-klein-4b":
        pipe = Flux2KleinPipeline(scheduler=sched, tokenizer=tokenizer(), is_distilled=True, **klein_modules(tiny, build_on))
    else:
        parts = zimage_modules(tiny, build_on)
        parts.pop("teacher_encoder")
        pipe = ZImagePipeline(scheduler=sched, tokenizer=tokenizer(), **parts)
    dtype = torch.float32 if tiny else torch.bfloat16
    pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode(name, pipe, prompts, dev, seq):
    with torch.no_grad():
        if name == "z-image-turbo":
            feats, _ = pipe.encode_prompt(prompt=list(prompts), device=dev, do_classifier_free_guidance=False,
                                          max_sequence_length=seq)
            return list(feats)
        feats, _ = pipe.encode_prompt(prompt=list(prompts), device=dev, max_sequence_length=seq,
                                      text_encoder_out_layers=(1, 2, 3) if pipe.text_encoder.config.num_hidden_layers < 9
                                      else (9, 18, 27))
        return list(feats)


def call(name, pipe, feats, px, steps):
    dtype, dev = pipe.transformer.dtype, pipe.transformer.device
    arg = [f.to(dev, dtype) for f in feats] if name == "z-image-turbo" else torch.stack(feats).to(dev, dtype)
    gens = [torch.Generator("cpu").manual_seed(i) for i in range(len(feats))]
    with torch.no_grad():
        return pipe(prompt_embeds=arg, generator=gens, output_type="latent", num_inference_steps=steps,
                    guidance_scale=0.0 if name == "z-image-turbo" else 1.0, height=px, width=px).images


def decode(name, pipe, lat):
    vae = pipe.vae
    with torch.no_grad():
        lat = lat.to(vae.device, vae.dtype)
        if name == "z-image-turbo":
            lat = lat / vae.config.scaling_factor + vae.config.shift_factor
        return vae.decode(lat, return_dict=False)[0]


def run_model(name, a, row, save, dev):
    px, seq = (64, 32) if a.tiny else (1024, 512)
    steps = 8 if name == "z-image-turbo" else 4
    t0 = time.perf_counter()
    pipe = pipeline(name, a.tiny, dev)
    row["build_s"] = time.perf_counter() - t0
    sizes = {k: sum(p.numel() * p.element_size() for p in m.parameters()) / GIB
             for k, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    row["components_gib"] = sizes
    row["resolution"], row["steps"], row["max_sequence_length"] = px, steps, seq
    save()
    # encode: only the text encoder on the card
    pipe.transformer.to("cpu"), pipe.vae.to("cpu")
    pipe.text_encoder.to(dev)
    row["encode"] = {}
    feats = None
    for b in a.encode_batches:
        f, s, peak, res = measure(dev, lambda b=b: encode(name, pipe, PROMPTS[:b], dev, seq))
        row["encode"][str(b)] = {"seconds": s, "peak_gib": peak, "resident_gib": res}
        feats = [x.to("cpu") for x in f] if feats is None or len(f) > len(feats) else feats
        print(f"  {name} encode B={b}: {s:.2f} s, peak {peak:.2f} GiB (resident {res:.2f})", flush=True)
        save()
    row["feature_shapes"] = [list(x.shape) for x in feats[:3]]
    pipe.text_encoder.to("cpu")
    sync(dev)
    pipe.transformer.to(dev), pipe.vae.to(dev)
    call(name, pipe, [feats[0]], px, steps)  # warm-up: kernels chosen, allocator primed
    row["transformer"], row["decode"] = {}, {}
    lat1 = None
    for b in a.batches:
        try:
            lat, s, peak, res = measure(dev, lambda b=b: call(name, pipe, [feats[i % len(feats)] for i in range(b)], px, steps))
            row["transformer"][str(b)] = {"seconds": s, "per_picture_s": s / b, "peak_gib": peak, "resident_gib": res}
            print(f"  {name} sample B={b}: {s:.2f} s, peak {peak:.2f} GiB (resident {res:.2f})", flush=True)
            lat1 = lat[:1].clone() if lat1 is None else lat1
            del lat
        except torch.OutOfMemoryError:
            row["transformer"][str(b)] = {"oom": True}
            torch.cuda.empty_cache()
        save()
    row["latent_shape"] = list(lat1.shape)
    for b in a.decode_batches:
        try:
            img, s, peak, res = measure(dev, lambda b=b: decode(name, pipe, lat1.expand(b, *lat1.shape[1:]).contiguous()))
            del img
            row["decode"][str(b)] = {"seconds": s, "peak_gib": peak, "resident_gib": res}
            print(f"  {name} decode B={b}: {s:.2f} s, peak {peak:.2f} GiB (resident {res:.2f})", flush=True)
        except torch.OutOfMemoryError:
            row["decode"][str(b)] = {"oom": True}
            torch.cuda.empty_cache()
        save()
    # what one picture costs warm: features known, transformer + VAE resident
    def one():
        return decode(name, pipe, call(name, pipe, [feats[0]], px, steps))

    _, s, peak, _ = measure(dev, one)
    _, s2, _, _ = measure(dev, one)
    row["warm_picture_s"] = min(s, s2)
    print(f"  {name} warm picture: {row['warm_picture_s']:.2f} s", flush=True)
    # the transformer + VAE copied to the card from host memory, pageable and pinned
    mods = [pipe.transformer, pipe.vae]
    for m in mods:
        m.to("cpu")
    sync(dev)
    _, s, _, _ = measure(dev, lambda: [m.to(dev) for m in mods])
    row["to_card_pageable_s"] = s
    for m in mods:
        m.to("cpu")
    if dev.type == "cuda":
        host = [{k: v.pin_memory() for k, v in m.state_dict().items()} for m in mods]

        def from_pinned():
            for m, sd in zip(mods, host):
                m.to_empty(device=dev)
                m.load_state_dict({k: v.to(dev, non_blocking=True) for k, v in sd.items()}, assign=True)

        _, s, _, _ = measure(dev, from_pinned)
        row["to_card_pinned_s"] = s
        del host
    print(f"  {name} to card: pageable {row['to_card_pageable_s']:.2f} s, pinned {row.get('to_card_pinned_s', 0):.2f} s",
          flush=True)
    save()
    if a.cold and name == "flux2-klein-4b":
        folder = Path(a.work) / name
        t0 = time.perf_counter()
        pipe.to("cpu")
        pipe.save_pretrained(folder)
        row["write_weights_s"] = time.perf_counter() - t0
        del pipe
        torch.cuda.empty_cache() if dev.type == "cuda" else None
        layers = ", text_encoder_out_layers=(1, 2, 3)" if a.tiny else ""
        code = (f"import time, torch; t0=time.perf_counter(); from diffusers import Flux2KleinPipeline; "
                f"p=Flux2KleinPipeline.from_pretrained({str(folder)!r}, dtype=torch.bfloat16).to({str(dev)!r}); "
                f"t1=time.perf_counter(); p.set_progress_bar_config(disable=True); "
                f"im=p(prompt='a red bicycle leaning against a brick wall', num_inference_steps={steps}, guidance_scale=1.0, "
                f"height={px}, width={px}, generator=torch.Generator('cpu').manual_seed(0){layers}).images[0]; "
                f"import sys; torch.cuda.synchronize() if torch.cuda.is_available() else None; "
                f"print(t1-t0, time.perf_counter()-t1)")
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
        wall = time.perf_counter() - t0
        if p.returncode == 0:
            load_s, call_s = map(float, p.stdout.strip().splitlines()[-1].split())
            row["cold_plain_diffusers"] = {"process_s": wall, "import_and_load_s": load_s, "first_call_s": call_s}
        else:
            row["cold_plain_diffusers"] = {"error": p.stderr.strip().splitlines()[-1:]}
        print(f"  {name} cold plain diffusers: {row['cold_plain_diffusers']}", flush=True)
        save()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--models", default="flux2-klein-4b,z-image-turbo")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--decode-batches", default="1,2,4")
    ap.add_argument("--encode-batches", default="1,8")
    ap.add_argument("--cold", action="store_true", help="klein: a plain from_pretrained + call in a fresh process")
    ap.add_argument("--work", default="/tmp/dopsd-gpu-activations")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu_activations.json"))
    a = ap.parse_args()
    a.batches = [int(x) for x in a.batches.split(",")]
    a.decode_batches = [int(x) for x in a.decode_batches.split(",")]
    a.encode_batches = [int(x) for x in a.encode_batches.split(",")]
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    result = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "machine": machine(),
              "date": time.strftime("%Y-%m-%d"), "versions": versions(), "tiny": a.tiny,
              "attention": "torch SDPA (diffusers' default; flash/efficient kernels in bf16 on the card)", "models": {}}

    def save():
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2))

    for name in a.models.split(","):
        print(f"{name}:", flush=True)
        row = result["models"].setdefault(name, {})
        try:
            run_model(name, a, row, save, dev)
        except Exception as e:  # one model's failure leaves the other's numbers
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"  {name} failed: {row['error']}", flush=True)
            save()
        torch.cuda.empty_cache() if dev.type == "cuda" else None
    save()


if __name__ == "__main__":
    main()
