"""8-bit base weights during a round (`train.base_weights = "int8"`): error bounds, memory, exact restore."""

import pytest
import torch
from torch import nn

from dopsd_continual.quant import Int8Linear, frozen_linears, quantize_int8, restore, storage_bytes


def _frozen_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    m.requires_grad_(False)
    return m


def test_int8_linear_matches_the_float_layer_within_quantisation_error_and_restores_exactly():
    m = _frozen_mlp()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(16, 64, requires_grad=True)
    y0 = m(x)
    (g0,) = torch.autograd.grad(y0.square().sum(), x)
    weight_bytes = sum(lin.weight.numel() * 4 for _, lin in frozen_linears(m))
    total = storage_bytes(m)
    originals = quantize_int8(m)
    assert all(isinstance(lin, Int8Linear) for lin in (m[0], m[2]))
    assert isinstance(m[0], nn.Linear)  # still a Linear: peft wraps it like any other
    # 1 byte a weight instead of 4 (plus one float32 scale per output channel)
    assert total - storage_bytes(m) == weight_bytes - weight_bytes // 4 - 4 * (128 + 32)
    y1 = m(x)
    (g1,) = torch.autograd.grad(y1.square().sum(), x)
    assert (y1 - y0).norm() / y0.norm() < 0.01
    assert (g1 - g0).norm() / g0.norm() < 0.01
    assert not torch.equal(y1, y0)  # it is quantised
    restore(m, originals)
    assert all(type(lin) is nn.Linear for lin in (m[0], m[2]))
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for p in m.parameters())


def test_backward_keeps_int8_codes_not_dequantised_weights():
    """The autograd graph must not hold a float copy of any weight (that would undo the memory saving)."""
    m = _frozen_mlp()
    shapes = {tuple(lin.weight.shape) for _, lin in frozen_linears(m)}
    quantize_int8(m)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(8, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    y.sum().backward()
    weights_saved = [(s, d) for s, d in saved if s in shapes]
    assert weights_saved and all(d == torch.int8 for _, d in weights_saved)


def test_bf16_autocast_runs_through_int8_layers():
    m = _frozen_mlp()
    quantize_int8(m)
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.fixture(scope="module")
def toy():
    from dopsd_continual.families.klein import KleinBackend
    from dopsd_continual.models import load_pipeline
    from dopsd_continual.recipe import load_recipe, resolve_recipe_path
    from dopsd_continual.toy.packs import PACKS, pack_images

    recipe = load_recipe(resolve_recipe_path(None))
    b = KleinBackend(load_pipeline(recipe, "cpu"), recipe)
    imgs = torch.from_numpy(pack_images("heart")).permute(0, 3, 1, 2).float() / 255
    feats = [b.features(s.caption(), imgs[i]) for i, s in enumerate(PACKS["heart"].train)]
    return b, recipe, feats


def test_dopsd_loss_and_gradients_on_int8_base_weights_stay_close(toy):
    from dopsd_continual.training import add_adapters, dopsd_loss_and_backward, remove_adapters

    b, recipe, feats = toy
    student = add_adapters(b.transformer, 4, 4, recipe["train"]["targets"], seed=0)
    try:
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for p in student:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        noise = torch.randn(2, *feats[0]["latents"].shape, generator=torch.Generator().manual_seed(1))
        l0 = dopsd_loss_and_backward(b, feats[:2], b.sigmas(4), noise)
        g0 = torch.cat([p.grad.flatten() for p in student])
        for p in student:
            p.grad = None
        originals = quantize_int8(b.transformer)
        assert len(originals) > 20
        l1 = dopsd_loss_and_backward(b, feats[:2], b.sigmas(4), noise)
        g1 = torch.cat([p.grad.flatten() for p in student])
        restore(b.transformer, originals)
    finally:
        remove_adapters(b.transformer)
    assert abs(l1 - l0) / l0 < 0.03  # measured 0.011
    assert (g1 - g0).norm() / g0.norm() < 0.1  # measured 0.043 on this small fp32 model
    assert torch.nn.functional.cosine_similarity(g0, g1, dim=0) > 0.998


def test_a_round_on_int8_base_weights_trains_a_close_delta_and_leaves_the_base_untouched(toy):
    from dopsd_continual.training import train_delta

    b, recipe, feats = toy
    before = {k: v.clone() for k, v in b.transformer.state_dict().items()}
    full = storage_bytes(b.transformer)
    during = []
    train = dict(recipe["train"], steps=4, batch=2, seed=3)
    native = train_delta(b, feats, [], train, "dopsd").delta
    q = train_delta(b, feats, [], dict(train, base_weights="int8"), "dopsd",
                    progress=lambda *a: during.append(storage_bytes(b.transformer))).delta
    after = b.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert during and max(during) < 0.45 * full  # fp32 toy weights: most of them stored at 1 byte instead of 4
    update = {n: b_ @ a for n, (a, b_) in native.weights.items()}  # module -> B A
    num = sum((q.weights[n][1] @ q.weights[n][0] - u).norm() ** 2 for n, u in update.items())
    den = sum(u.norm() ** 2 for u in update.values())
    assert den > 0 and (num / den).sqrt() < 0.2  # the trained update BA: measured 0.097 apart


def test_recipe_names_a_bad_base_weights_value(tmp_path):
    from dopsd_continual.errors import UserError
    from dopsd_continual.recipe import load_recipe, resolve_recipe_path

    text = resolve_recipe_path(None).read_text()
    assert 'base_weights = "native"' in text
    text = text.replace('base_weights = "native"', 'base_weights = "int4"', 1)
    (tmp_path / "r.toml").write_text(text)
    with pytest.raises(UserError, match="base_weights"):
        load_recipe(tmp_path / "r.toml")


def test_a_conversion_that_fails_part_way_restores_the_layers_it_had_converted(monkeypatch):
    m = _frozen_mlp()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    calls = []
    real = torch.Tensor.round

    def failing_round(self, *a, **k):  # the second layer's conversion runs out of memory
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "round", failing_round)
    with pytest.raises(torch.OutOfMemoryError):
        quantize_int8(m)
    assert len(calls) == 2 and all(type(lin) is nn.Linear for lin in (m[0], m[2]))
    after = m.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # a later merge lands on the exact weights
