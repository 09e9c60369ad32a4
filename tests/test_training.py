"""The D-OPSD step's math on the embedded toy model (a small FLUX.2-klein), on the CPU."""

import pytest
import torch

from dopsd_continual.families.klein import KleinBackend
from dopsd_continual.lora import Delta, merge_into
from dopsd_continual.training import (
    STUDENT,
    TEACHER,
    FeatureCache,
    adapter_params,
    add_adapters,
    dopsd_loss_and_backward,
    ema_update,
    remove_adapters,
    set_checkpointing,
    sft_loss_and_backward,
    train_delta,
    use,
)


@pytest.fixture(scope="module")
def backend():
    from dopsd_continual.models import load_pipeline
    from dopsd_continual.recipe import load_recipe, resolve_recipe_path

    recipe = load_recipe(resolve_recipe_path(None))
    torch.manual_seed(0)
    return KleinBackend(load_pipeline(recipe, "cpu"), recipe), recipe


@pytest.fixture(scope="module")
def feats(backend):
    from dopsd_continual.toy.packs import PACKS, pack_images

    b, _ = backend
    imgs = torch.from_numpy(pack_images("heart")).permute(0, 3, 1, 2).float() / 255
    return [b.features(s.caption(), imgs[i]) for i, s in enumerate(PACKS["heart"].train)]


@pytest.fixture
def adapters(backend):
    b, recipe = backend
    student = add_adapters(b.transformer, 4, 4, recipe["train"]["targets"])
    # a non-zero B so that gradients reach A too (a fresh adapter has B = 0)
    yield student
    remove_adapters(b.transformer)


def _grads(params):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def test_identical_contexts_give_zero_loss_and_gradients(backend, feats, adapters):
    b, _ = backend
    noise = torch.randn(2, *feats[0]["latents"].shape, generator=torch.Generator().manual_seed(0))
    loss = dopsd_loss_and_backward(b, feats[:2], b.sigmas(4), noise, teacher_same_as_student=True)
    assert loss == 0.0
    assert all(g.abs().max() == 0 for g in _grads(adapters))


def test_reference_context_gives_loss_and_gradients_only_to_the_student(backend, feats, adapters):
    b, _ = backend
    noise = torch.randn(2, *feats[0]["latents"].shape, generator=torch.Generator().manual_seed(0))
    loss = dopsd_loss_and_backward(b, feats[:2], b.sigmas(4), noise)
    assert loss > 0
    assert max(g.abs().max() for g in _grads(adapters)) > 0
    teacher = adapter_params(b.transformer, TEACHER)
    assert all(p.grad is None for p in teacher)
    lora = {id(p) for p in adapters} | {id(p) for p in teacher}
    assert all(p.grad is None for p in b.transformer.parameters() if id(p) not in lora)


def test_per_step_backward_equals_one_backward_of_the_summed_loss(backend, feats, adapters):
    b, _ = backend
    with torch.no_grad():  # give B some weight so every gradient is informative
        for p in adapters:
            p.add_(torch.randn_like(p) * 0.01)
    noise = torch.randn(2, *feats[0]["latents"].shape, generator=torch.Generator().manual_seed(1))
    l1 = dopsd_loss_and_backward(b, feats[:2], b.sigmas(4), noise, per_step_backward=True)
    g1 = _grads(adapters)
    for p in adapters:
        p.grad = None
    l2 = dopsd_loss_and_backward(b, feats[:2], b.sigmas(4), noise, per_step_backward=False)
    g2 = _grads(adapters)
    assert l1 == pytest.approx(l2, rel=1e-6)
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("share", [True, 0.5])
def test_gradient_checkpointing_keeps_loss_and_gradients(backend, feats, adapters, share, monkeypatch):
    b, _ = backend
    with torch.no_grad():
        for p in adapters:
            p.add_(torch.randn_like(p) * 0.01)
    noise = torch.randn(2, *feats[0]["latents"].shape, generator=torch.Generator().manual_seed(1))
    l0 = dopsd_loss_and_backward(b, feats[:2], b.sigmas(4), noise)
    g0 = _grads(adapters)
    for p in adapters:
        p.grad = None
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    n = set_checkpointing(b.transformer, share)
    try:
        l1 = dopsd_loss_and_backward(b, feats[:2], b.sigmas(4), noise)
    finally:
        set_checkpointing(b.transformer, False)
    blocks = len(b.transformer.transformer_blocks) + len(b.transformer.single_transformer_blocks)
    assert n == round(float(share) * blocks) and 0 < n
    assert len({id(f.__self__) for f in calls}) == n  # exactly the chosen blocks were recomputed
    assert l1 == pytest.approx(l0, rel=1e-6)
    for a, c in zip(g0, _grads(adapters)):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-7)


def test_ema_update_formula():
    t = [torch.nn.Parameter(torch.tensor([1.0, 2.0]))]
    s = [torch.nn.Parameter(torch.tensor([3.0, -2.0]))]
    ema_update(t, s, 0.9)
    torch.testing.assert_close(t[0].data, torch.tensor([0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2]))


def test_a_round_is_reproducible_from_its_seed(backend, feats):
    b, recipe = backend
    train = dict(recipe["train"], steps=3, batch=2, seed=7)
    first = train_delta(b, feats, [], train, "dopsd").delta
    torch.rand(1000)  # whatever used the global RNG in between must not matter
    second = train_delta(b, feats, [], train, "dopsd").delta
    other = train_delta(b, feats, [], dict(train, seed=8), "dopsd").delta
    for name, (a, bb) in first.weights.items():
        torch.testing.assert_close(a, second.weights[name][0], rtol=0, atol=0)
        torch.testing.assert_close(bb, second.weights[name][1], rtol=0, atol=0)
    assert any(not torch.equal(a, other.weights[n][0]) for n, (a, _) in first.weights.items())


def test_loss_falls_and_the_saved_delta_reloads_to_the_same_outputs(backend, feats, tmp_path):
    b, recipe = backend
    train = dict(recipe["train"], steps=24, batch=4, lr=2e-3)
    res = train_delta(b, feats, [], train, "dopsd")
    first, last = sum(res.losses[:6]) / 6, sum(res.losses[-6:]) / 6
    assert last < first
    res.delta.save(tmp_path / "d.safetensors")
    back = Delta.load(tmp_path / "d.safetensors")
    assert back.scale == res.delta.scale and set(back.weights) == set(res.delta.weights)
    cond = b.conditions(feats[:2], teacher=False)
    x = torch.randn(2, *feats[0]["latents"].shape, generator=torch.Generator().manual_seed(3))
    sig = torch.full((2,), 0.8)
    base = {k: v.clone() for k, v in b.transformer.state_dict().items()}
    with torch.no_grad():
        merge_into(b.transformer, [res.delta])
        v1 = b.velocity(x, sig, cond)
        b.transformer.load_state_dict(base)
        merge_into(b.transformer, [back])
        v2 = b.velocity(x, sig, cond)
        b.transformer.load_state_dict(base)
        v0 = b.velocity(x, sig, cond)
    torch.testing.assert_close(v1, v2)
    assert (v1 - v0).abs().max() > 1e-5  # the delta does something


def test_merged_delta_matches_the_live_peft_adapter(backend, feats, adapters):
    b, recipe = backend
    with torch.no_grad():
        for p in adapters:
            p.add_(torch.randn_like(p) * 0.02)
    from dopsd_continual.lora import from_peft

    cond = b.conditions(feats[:2], teacher=False)
    x = torch.randn(2, *feats[0]["latents"].shape, generator=torch.Generator().manual_seed(4))
    sig = torch.full((2,), 0.6)
    use(b.transformer, STUDENT)
    with torch.no_grad():
        live = b.velocity(x, sig, cond)
    delta = from_peft(b.transformer, STUDENT, 1.0)
    remove_adapters(b.transformer)
    base = {k: v.clone() for k, v in b.transformer.state_dict().items()}
    with torch.no_grad():
        merge_into(b.transformer, [delta])
        merged = b.velocity(x, sig, cond)
    b.transformer.load_state_dict(base)
    torch.testing.assert_close(live, merged, rtol=1e-4, atol=1e-5)
    add_adapters(b.transformer, 4, 4, recipe["train"]["targets"])  # the fixture removes them again


def test_cached_features_equal_fresh_ones(backend, tmp_path):
    from dopsd_continual.toy.packs import pack_images

    b, _ = backend
    img = torch.from_numpy(pack_images("striped")[0]).permute(2, 0, 1).float() / 255
    cache = FeatureCache(tmp_path, b.encoder_id)
    fresh = b.features("a caption", img)
    first = cache.get("abc", "a caption", lambda: b.features("a caption", img))
    again = cache.get("abc", "a caption", lambda: pytest.fail("should come from the cache"))
    assert cache.hits == 1 and cache.misses == 1
    for k in fresh:
        torch.testing.assert_close(first[k], fresh[k])
        torch.testing.assert_close(again[k], fresh[k])


def test_sft_and_dopsd_share_everything_but_the_loss(backend, feats):
    b, recipe = backend
    train = dict(recipe["train"], steps=2, batch=2)
    d = train_delta(b, feats, [], train, "dopsd").delta
    s = train_delta(b, feats, [], train, "sft").delta
    assert set(d.weights) == set(s.weights) and d.scale == s.scale
    assert all(d.weights[k][0].shape == s.weights[k][0].shape for k in d.weights)


def test_sft_loss_is_flow_matching(backend, feats, adapters):
    b, _ = backend
    noise = torch.randn(2, *feats[0]["latents"].shape, generator=torch.Generator().manual_seed(0))
    loss = sft_loss_and_backward(b, feats[:2], noise, torch.tensor([0.5, 0.9]))
    assert loss > 0 and max(g.abs().max() for g in _grads(adapters)) > 0


def test_a_setup_error_leaves_the_transformer_as_it_was(backend, feats):
    """A bad value met after the adapters are added (here the step count) still removes them, and switches
    checkpointing off again: the next round and sampling see the plain transformer."""
    b, recipe = backend
    before = {k: v.clone() for k, v in b.transformer.state_dict().items()}
    train = {**recipe["train"], "steps": "many", "gradient_checkpointing": True}
    with pytest.raises(ValueError):
        train_delta(b, feats[:2], [], train, "dopsd")
    assert not any("lora" in n for n, _ in b.transformer.named_modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in b.transformer.modules())
    after = b.transformer.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not b.transformer.training


def test_a_big_drop_is_learned_over_rounds_and_used_means_trained_on(tmp_path):
    """500 pairs at once: each round takes what its steps can draw `views_per_sample` times, marks used only the
    samples some step drew, leaves the rest queued; the gate's concept set stays bounded."""
    import json
    import re

    from conftest import make_pair
    from test_daemon import fast_recipe

    from dopsd_continual.ingest import ingest_paths
    from dopsd_continual.rounds import GATE_CONCEPTS, gate_choice, run_round
    from dopsd_continual.store import init_state
    from dopsd_continual.training import new_per_round

    drop = tmp_path / "drop"
    for i in range(500):
        make_pair(drop, f"p{i:03d}", caption="a small red circle in the center, white background", seed=i, size=(32, 32))
    recipe = fast_recipe(tmp_path, steps=12)
    recipe.write_text(re.sub(r"(?m)^replay_ratio = .*$", "replay_ratio = 0.25\nviews_per_sample = 1", recipe.read_text(), count=1))
    st = init_state(tmp_path / "s", str(recipe), [drop])
    assert len(ingest_paths(st).queued) == 500
    for round_no in range(2):
        queued_before = st.conn.execute("select count(*) from samples where status='queued'").fetchone()[0]
        r = run_round(st)
        m = r["metrics"]
        assert m["samples_taken"] == len(r["samples"]) == new_per_round(dict(st.recipe["train"]), round_no > 0)
        assert m["samples_taken"] < 100 and 0 < m["samples_trained"] <= m["samples_taken"]
        rows = {row["id"]: row for row in st.rows("select id, status, rounds, history from samples")}
        used_now = [i for i in r["samples"] if rows[i]["status"] == "used"]
        assert len(used_now) == m["samples_trained"]  # used = trained on, nothing else
        for i in r["samples"]:
            if rows[i]["status"] == "queued":  # taken, never drawn: back in the queue, no round recorded
                assert json.loads(rows[i]["rounds"]) == [] and "drew it in no step" in rows[i]["history"]
        queued_after = st.conn.execute("select count(*) from samples where status='queued'").fetchone()[0]
        assert queued_after == queued_before - m["samples_trained"]
    assert len(gate_choice([dict(sha256=f"{i:04x}") for i in range(500)])) == GATE_CONCEPTS
    st.close()


def test_a_rejected_batch_is_not_retrained_unchanged(tmp_path, monkeypatch):
    from conftest import make_pair
    from test_daemon import fast_recipe

    from dopsd_continual import rounds
    from dopsd_continual.ingest import ingest_paths
    from dopsd_continual.store import init_state

    drop = tmp_path / "drop"
    for i in range(3):
        make_pair(drop, f"p{i}", seed=i)
    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path, steps=2)), [drop])
    ingest_paths(st)
    real = rounds.commit_verdict
    monkeypatch.setattr(rounds, "commit_verdict", lambda state, rid, vid, new, verdict, reasons, metrics, seen=None:
                        real(state, rid, vid, new, "rejected", ["forced for the test"], metrics, seen))
    first = rounds.run_round(st)
    second = rounds.run_round(st)
    assert first["metrics"]["seed"] != second["metrics"]["seed"]  # another seed: other noise, other batches
    assert first["metrics"]["loss_first"] != second["metrics"]["loss_first"]
    st.close()
