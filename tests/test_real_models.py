"""What the real-model path needs, checked on the CPU: float32 training state under a bf16 base, sampling
as each pipeline natively samples, exact version switching in bf16, the end-to-end benchmark's code path."""

import sys
from pathlib import Path

import pytest
import torch

from dopsd_continual.lora import Delta, resolve_targets
from dopsd_continual.models import load_pipeline
from dopsd_continual.recipe import load_recipe, resolve_recipe_path
from dopsd_continual.sampling import Sampler
from dopsd_continual.stack import WeightSwitcher
from dopsd_continual.training import STUDENT, TEACHER, KleinBackend, adapter_params, train_delta

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
PROMPTS = ["a large red circle in the center, blue background", "a small green square on the left, white background"]


@pytest.fixture(scope="module")
def bf16_backend():
    recipe = load_recipe(resolve_recipe_path(None))
    pipe = load_pipeline(recipe, "cpu")
    pipe.transformer.to(torch.bfloat16)
    return KleinBackend(pipe, recipe), recipe


def test_adapters_optimiser_and_ema_are_float32_under_a_bf16_base(bf16_backend):
    from dopsd_continual.toy.packs import PACKS, pack_images

    backend, recipe = bf16_backend
    imgs = torch.from_numpy(pack_images("heart")).permute(0, 3, 1, 2).float() / 255
    feats = [backend.features(s.caption(), imgs[i]) for i, s in enumerate(PACKS["heart"].train[:2])]
    train = dict(recipe["train"], steps=3, batch=1, lr=2e-5, ema_decay=0.999, K=2)
    seen = []

    def progress(step, total, loss):
        tr = backend.transformer
        student, teacher = adapter_params(tr, STUDENT), adapter_params(tr, TEACHER)
        a = [p for n, p in sorted(tr.named_parameters()) if f"lora_A.{STUDENT}" in n]
        seen.append({"dtypes": {p.dtype for p in student + teacher}, "grad": {p.grad.dtype for p in student if p.grad is not None},
                     "a": torch.cat([p.detach().flatten() for p in a]).clone(),
                     "teacher_b": torch.cat([p.detach().flatten() for n, p in sorted(tr.named_parameters())
                                             if f"lora_B.{TEACHER}" in n]).clone()})

    res = train_delta(backend, feats, [], train, "dopsd", progress)
    assert all(s["dtypes"] == {torch.float32} and s["grad"] == {torch.float32} for s in seen)
    assert next(iter(res.delta.weights.values()))[0].dtype == torch.float32
    # at lr 2e-5, AdamW moves (nearly) every entry of A by ~lr; in bf16 most of those updates round away
    moved = (seen[2]["a"] != seen[1]["a"]).float().mean()
    assert moved > 0.95
    # the EMA teacher at decay 0.999 follows the student by 0.1% a step: visible in float32
    assert seen[2]["teacher_b"].abs().max() > 0
    assert backend.transformer.dtype == torch.bfloat16 and not any("lora" in n for n, _ in backend.transformer.named_parameters())


def test_version_switching_is_exact_in_bf16_and_keeps_only_touched_weights(bf16_backend):
    backend, _ = bf16_backend
    tr = backend.transformer
    names = resolve_targets(tr, ["to_q", "to_v"])
    g = torch.Generator().manual_seed(0)
    modules = dict(tr.named_modules())

    def delta(scale):
        return Delta({n: (torch.randn(2, modules[n].in_features, generator=g) * scale,
                          torch.randn(modules[n].out_features, 2, generator=g) * scale) for n in names}, 1.0)

    d1, d2 = delta(1e-2), delta(1e-3)
    base = {n: modules[n].weight.detach().clone() for n in names}
    sw = WeightSwitcher(tr)
    sw.apply([d1])
    v1 = {n: modules[n].weight.detach().clone() for n in names}
    for n in names:  # one rounding of base + B @ A computed in float32
        assert torch.equal(v1[n], (base[n].float() + d1.product(n)).to(torch.bfloat16))
    sw.apply([d1, d2])
    sw.apply([d1])
    assert all(torch.equal(modules[n].weight, v1[n]) for n in names)  # back to v1 bit for bit
    sw.apply([])
    assert all(torch.equal(modules[n].weight, base[n]) for n in names)  # rollback to the base is exact
    assert set(sw.base) == set(names)  # no second copy of the whole transformer


def test_klein_sampler_equals_the_pipeline_call(tmp_path):
    from dopsd_continual.store import init_state

    st = init_state(tmp_path / "s", None, [])
    sampler = Sampler(st)
    m = st.recipe["model"]
    ours = sampler.images(PROMPTS, [3, 4], m["steps"], "v0")
    gens = [torch.Generator("cpu").manual_seed(s) for s in (3, 4)]
    theirs = sampler.pipe(prompt=PROMPTS, generator=gens, num_inference_steps=m["steps"], height=m["height"],
                          width=m["width"], max_sequence_length=m["max_sequence_length"],
                          text_encoder_out_layers=tuple(m["text_encoder_out_layers"]), output_type="pt").images
    assert (ours - theirs).abs().max() < 1e-5
    st.close()


def test_zimage_sampler_equals_the_pipeline_call_without_guidance(tmp_path):
    """Z-Image-Turbo is sampled with guidance 0.0 (its pipeline runs CFG for any value above 0)."""
    from diffusers import ZImagePipeline
    from gpu_e2e import build_zimage, write_recipe

    from dopsd_continual.store import init_state

    build_zimage(True, tmp_path / "z", tmp_path / "vl", "cpu")
    recipe = write_recipe("z-image-turbo", tmp_path / "z.toml", {"model": {
        "source": str(tmp_path / "z"), "teacher_encoder": str(tmp_path / "vl"), "height": 64, "width": 64,
        "max_sequence_length": 32, "steps": 3}})
    st = init_state(tmp_path / "s", str(recipe), [])
    ours = Sampler(st).images(PROMPTS, [3, 4], 3, "v0")
    pipe = ZImagePipeline.from_pretrained(tmp_path / "z")
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(s) for s in (3, 4)]
    theirs = pipe(prompt=PROMPTS, generator=gens, num_inference_steps=3, height=64, width=64, guidance_scale=0.0,
                  max_sequence_length=32, output_type="pt").images
    assert (ours - theirs).abs().max() < 1e-5
    st.close()
