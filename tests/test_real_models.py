"""What the real-model path needs, checked on the CPU: float32 training state under a bf16 base, sampling
as each pipeline natively samples, exact version switching in bf16, the end-to-end benchmark's code path."""

import sys
from pathlib import Path

import pytest
import torch

from dopsd_continual.families.klein import KleinBackend
from dopsd_continual.lora import Delta, resolve_targets
from dopsd_continual.models import load_pipeline
from dopsd_continual.recipe import load_recipe, resolve_recipe_path
from dopsd_continual.sampling import Sampler
from dopsd_continual.stack import WeightSwitcher
from dopsd_continual.training import STUDENT, TEACHER, adapter_params, train_delta

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


def _deltas(tr, names, g):
    modules = dict(tr.named_modules())

    def delta(scale):
        return Delta({n: (torch.randn(2, modules[n].in_features, generator=g) * scale,
                          torch.randn(modules[n].out_features, 2, generator=g) * scale) for n in names}, 1.0)

    return delta


def test_versions_on_a_bf16_base_are_applied_unmerged_whole_and_never_touch_a_weight(bf16_backend):
    """A bf16 base keeps its weights; each version is base + its chain's exact low-rank term beside them,
    so nothing of a round rounds away (a bf16 merge would keep only what survives bf16's 8 bits)."""
    backend, _ = bf16_backend
    tr = backend.transformer
    names = resolve_targets(tr, ["to_q", "to_v"])
    modules = dict(tr.named_modules())
    d1, d2 = (_deltas(tr, names, torch.Generator().manual_seed(0))(s) for s in (3e-2, 1e-2))
    weights = {n: p.detach().clone() for n, p in tr.named_parameters()}
    x = torch.randn(3, modules[names[0]].in_features, dtype=torch.bfloat16)
    lin = modules[names[0]]
    bare = lin(x)
    sw = WeightSwitcher(tr, factor_dtype=torch.float32)
    assert sw.mode == "unmerged"
    sw.apply([d1, d2])
    y = lin(x)
    full = sum(d.product(names[0]) for d in (d1, d2))
    ref = x.float() @ (lin.weight.float() + full).t()
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2)  # base + the whole chain, in bf16 compute
    for n in names:  # the term holds the chain exactly, however small a round's update
        m = modules[n]
        assert torch.allclose(m._buffers["chain_B"] @ m._buffers["chain_A"], sum(d.product(n) for d in (d1, d2)), atol=1e-7)
    small = _deltas(tr, names, torch.Generator().manual_seed(2))(1e-4)  # lr-2e-5-sized: a merge rounds it away
    w = lin.weight.float()
    lost = ((w + small.product(names[0])).to(torch.bfloat16).float() - w - small.product(names[0])).norm()
    assert lost / small.product(names[0]).norm() > 0.5
    assert all(torch.equal(p, weights[n]) for n, p in tr.named_parameters())  # no weight was written
    sw.apply([d1])
    assert lin._buffers["chain_A"].shape[0] == 2
    sw.apply([])
    assert torch.equal(lin(x), bare)  # rollback to the base is exact
    assert not any("chain_A" in m._buffers for m in modules.values())


def test_the_chain_term_is_added_into_the_output_where_no_gradient_flows():
    """Sampling adds the term into the layer's own output (no second output-sized tensor: on klein's fused
    projection at the gate's batch that is 2 GiB); training keeps the out-of-place sum autograd needs."""

    class Tiny(torch.nn.Module):
        dtype = torch.bfloat16

        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 32, dtype=torch.bfloat16)

    tr, g = Tiny(), torch.Generator().manual_seed(0)
    d = Delta({"lin": (torch.randn(2, 16, generator=g) * 0.3, torch.randn(32, 2, generator=g) * 0.3)}, 1.0)
    x = torch.randn(4, 5, 16, dtype=torch.bfloat16)
    bare = tr.lin(x)
    sw = WeightSwitcher(tr)
    assert sw.mode == "unmerged" and sw.factor_dtype == torch.bfloat16
    sw.apply([d])
    raw = []
    tr.lin.register_forward_hook(lambda m, a, out: raw.append(out.data_ptr()), prepend=True)
    with torch.no_grad():
        y = tr.lin(x)
    assert y.data_ptr() == raw[-1]  # the layer's own output, added into
    term = (x.float() @ d.weights["lin"][0].t() @ d.weights["lin"][1].t())
    assert torch.allclose(y.float(), bare.float() + term, atol=3e-2)
    assert (y.float() - bare.float()).abs().max() > 0.1  # the term is there
    xg = x.clone().requires_grad_(True)
    yg = tr.lin(xg)
    assert yg.data_ptr() != raw[-1] and torch.equal(yg, y)  # a new tensor, rounded the same way
    yg.float().sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    sw.apply([])


def test_a_long_chain_is_squashed_to_its_leading_directions_on_the_device(bf16_backend):
    backend, _ = bf16_backend
    tr = backend.transformer
    names = resolve_targets(tr, ["to_q"])
    make = _deltas(tr, names, torch.Generator().manual_seed(1))
    chain = [make(1e-3) for _ in range(5)]  # stacked rank 10
    exact = sum(d.product(names[0]) for d in chain)
    sw = WeightSwitcher(tr, max_rank=6, factor_dtype=torch.float32)
    sw.apply(chain)
    m = dict(tr.named_modules())[names[0]]
    a, b = m._buffers["chain_A"], m._buffers["chain_B"]
    assert a.shape[0] == 6 and b.shape[1] == 6
    s = torch.linalg.svdvals(exact)
    best = s[6:].square().sum().sqrt()  # Eckart-Young: nothing of rank 6 comes closer
    assert torch.allclose((b @ a - exact).norm(), best, rtol=1e-3)
    sw.apply([])


def test_version_switching_merges_exactly_on_a_float32_base():
    recipe = load_recipe(resolve_recipe_path(None))
    tr = load_pipeline(recipe, "cpu").transformer
    names = resolve_targets(tr, ["to_q", "to_v"])
    modules = dict(tr.named_modules())
    d1, d2 = (_deltas(tr, names, torch.Generator().manual_seed(0))(s) for s in (1e-2, 1e-3))
    base = {n: modules[n].weight.detach().clone() for n in names}
    sw = WeightSwitcher(tr)
    assert sw.mode == "merge"
    sw.apply([d1])
    v1 = {n: modules[n].weight.detach().clone() for n in names}
    assert all(torch.equal(v1[n], base[n] + d1.product(n)) for n in names)
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
        "max_sequence_length": 32, "steps": 3, "dtype": "float32"}})  # the tiny weights' own dtype, as the pipeline loads them
    st = init_state(tmp_path / "s", str(recipe), [])
    ours = Sampler(st).images(PROMPTS, [3, 4], 3, "v0")
    pipe = ZImagePipeline.from_pretrained(tmp_path / "z")
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator("cpu").manual_seed(s) for s in (3, 4)]
    theirs = pipe(prompt=PROMPTS, generator=gens, num_inference_steps=3, height=64, width=64, guidance_scale=0.0,
                  max_sequence_length=32, output_type="pt").images
    assert (ours - theirs).abs().max() < 1e-5
    st.close()


def test_two_switchers_on_one_transformer_add_the_chain_once(bf16_backend):
    backend, _ = bf16_backend
    tr = backend.transformer
    names = resolve_targets(tr, ["to_q"])
    d = _deltas(tr, names, torch.Generator().manual_seed(3))(3e-2)
    lin = dict(tr.named_modules())[names[0]]
    x = torch.randn(2, lin.in_features, dtype=torch.bfloat16)
    WeightSwitcher(tr).apply([d])
    once = lin(x)
    WeightSwitcher(tr).apply([d])
    assert torch.equal(lin(x), once)
    WeightSwitcher(tr).apply([])


def test_the_toy_model_in_bf16_runs_a_round_the_gate_and_sampling_on_the_cpu(tmp_path):
    """The recipe's dtype holds on every device: the bf16 path (unmerged versions, float32 adapters) end to end."""
    import re

    from conftest import make_pair

    from dopsd_continual.ingest import ingest_paths
    from dopsd_continual.recipe import RECIPES_DIR
    from dopsd_continual.rounds import run_round
    from dopsd_continual.sampling import sample
    from dopsd_continual.stack import rollback
    from dopsd_continual.store import init_state

    text = (RECIPES_DIR / "toy-shapes.toml").read_text()
    text = re.sub(r'(?m)^dtype = "float32"', 'dtype = "bfloat16"', text) if 'dtype = "float32"' in text else \
        text.replace("[model]\n", '[model]\ndtype = "bfloat16"\n', 1)
    recipe = tmp_path / "bf16.toml"
    recipe.write_text(text)
    drop = tmp_path / "drop"
    for i in range(3):
        make_pair(drop, f"p{i}", caption="a large red circle in the center, blue background", seed=i)
    st = init_state(tmp_path / "s", str(recipe), [drop])
    ingest_paths(st)
    sampler = Sampler(st)
    assert sampler.pipe.transformer.dtype == torch.bfloat16 and sampler.switch.mode == "unmerged"
    r = run_round(st, steps=2, lr=1e-2, sampler=sampler)
    assert r["verdict"] in ("accepted", "rejected") and "drift" in r["metrics"]
    v = r["version"]
    assert all(p.dtype == torch.bfloat16 for p in sampler.pipe.transformer.parameters())  # nothing merged into it
    one = sample(st, "a large red circle", v, None, 0, 1, tmp_path / "v.png", sampler=sampler)
    base = sample(st, "a large red circle", "v0", None, 0, 1, tmp_path / "v0.png", sampler=sampler)
    again = sample(st, "a large red circle", v, None, 0, 1, tmp_path / "v2.png", sampler=sampler)
    from PIL import Image

    def px(p):
        return torch.from_numpy(__import__("numpy").asarray(Image.open(p).convert("RGB"))).float()

    assert not torch.equal(px(one["path"]), px(base["path"]))  # the version is applied
    assert torch.equal(px(one["path"]), px(again["path"]))  # and switching back and forth is exact
    if r["verdict"] == "accepted":
        rollback(st, "v0")
    st.close()
