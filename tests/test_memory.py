"""The memory accountant: counts that add up, plans that fit the promised cards, figures that match the card."""

import json
import sys
from pathlib import Path

import pytest
import torch

from dopsd_continual import memory
from dopsd_continual.recipe import RECIPES_DIR, load_recipe

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20


def test_live_bytes_counts_what_lives_and_not_views_or_resident_tensors():
    w = torch.empty(1024, 1024, device="meta")  # resident: made before the count

    def run(keep_x: bool):
        x = torch.empty(256, 1024, device="meta")  # 1 MiB
        y = x @ w.t()  # +1 MiB (w.t() is a view of a resident tensor: nothing)
        if not keep_x:
            del x
        z = y.relu()  # +1 MiB while y lives
        z.add_(1)  # in place: nothing new
        return z

    assert memory.count(lambda: run(True)) == 3 * MIB
    assert memory.count(lambda: run(False)) == 2 * MIB  # a freed tensor no longer counts


def test_attention_is_counted_as_a_fused_kernel_without_sequence_squared_scores():
    q = torch.empty(1, 8, 4096, 64, device="meta", dtype=torch.bfloat16)

    def run():
        torch.nn.functional.scaled_dot_product_attention(q, q, q)

    counted = memory.count(run)
    out, lse = q.numel() * 2, 8 * 4096 * 4
    assert counted == out + lse  # a materialised score matrix would be 8 x 4096 x 4096 x 2 bytes = 256 MiB
    x = torch.randn(1, 2, 5, 4)  # real tensors still get the real kernel while a count patches the function
    assert torch.allclose(memory._fused_sdpa(x, x, x), memory._SDPA(x, x, x))


@pytest.mark.parametrize("name,card", [("flux2-klein-4b", 14.5), ("z-image-turbo", 22.0), ("flux2-klein-9b", 22.0)])
def test_default_recipes_plan_within_their_cards_at_the_default_gate(name, card):
    """Every phase at the recipe's own defaults (1024 px, the default gate, batch 1 training), activations
    counted by the accountant (not taken from a shrunken run), within the card the recipe promises."""
    recipe = load_recipe(RECIPES_DIR / f"{name}.toml")
    plan = memory.plan(recipe, card)
    assert set(plan.phases) == {"sample", "encode", "features", "train"}
    assert plan.peak_gib <= card, (name, plan.phases)
    assert plan.fits and plan.batches["sample"] >= 1
    assert plan.batches["decode"] >= 1 or plan.batches.get("decode_tiled") == 1
    assert all(v > 0 for v in plan.activation_gib.values())  # counted, never left out
    assert memory.accountant(recipe).sizes["transformer"] > 7  # real size, from the shipped configs
    bigger = memory.plan(recipe, card * 2)
    assert bigger.batches["sample"] >= plan.batches["sample"]


def test_every_component_stays_on_a_card_that_holds_them_all_and_only_there():
    """memory.placement_plan keeps every component on the card where all of them fit beside each phase's
    activations (klein-4B from a 24 GB card on), and plans the phase table where they do not (a 16 GB card);
    kept all, each phase plans with all the weights resident."""
    recipe = load_recipe(RECIPES_DIR / "flux2-klein-4b.toml")
    s = memory.accountant(recipe).sizes
    weights = s["transformer"] + s["vae"] + s["text_encoder"]
    big = memory.plan(recipe, 46.0, keep_all=True)
    assert big.fits and big.keep_all and big.batches["sample"] >= 1
    assert all(r >= weights - 1e-6 for r in big.resident_gib.values()), big.resident_gib
    table = memory.plan(recipe, 46.0)
    assert big.batches["sample"] <= table.batches["sample"] and big.peak_gib > table.peak_gib
    assert memory.plan(recipe, 22.0, keep_all=True).fits  # a 24 GB card holds all of klein-4B's parts too
    assert not memory.plan(recipe, 14.5, keep_all=True).fits and memory.plan(recipe, 14.5).fits  # a 16 GB one not


def test_a_kept_component_never_moves_again_and_a_one_shot_process_frees_what_leaves(monkeypatch):
    """placement.Placement on a stand-in pipeline and a stand-in card (the `meta` device: a move is visible as
    the parameters' device): the table moves each component in and out by phase, each leaving onto the CPU
    copy it kept, copied back only where the card may have changed it (the transformer); keep_all moves each
    in once; one_shot frees a component leaving the card, and never one that waits in CPU memory."""
    from dopsd_continual.placement import Placement

    class Pipe:  # what Placement uses of a diffusers pipeline: its components, as attributes and as a dict
        def __init__(self):
            for n in ("text_encoder", "transformer", "vae"):
                setattr(self, n, torch.nn.Linear(2, 2))

        @property
        def components(self):
            return {n: getattr(self, n) for n in ("text_encoder", "transformer", "vae")}

    pipe = Pipe

    def where(p):
        return {n: (m.weight.device.type if m is not None else None) for n, m in
                ((n, getattr(p, n)) for n in ("text_encoder", "transformer", "vae"))}

    moves = []
    real_to = torch.nn.Module.to
    def to(self, device, *a, **k):  # every move recorded; a stand-in "card" has no data to copy back
        moves.append(str(device))
        if str(device) == "cpu" and self.weight.is_meta:
            return self.to_empty(device="cpu")
        return real_to(self, device, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    copied = []  # a stand-in card's tensors have no data: a copy back is recorded, not made
    monkeypatch.setattr(Placement, "_copy_back", lambda self, host, t: copied.append(tuple(t.shape)) or host)
    table = pipe()
    encoder_weight, transformer_weight = table.text_encoder.weight.data_ptr(), table.transformer.weight.data_ptr()
    place = Placement(table, "meta")
    place.use("encode")
    assert where(table) == {"text_encoder": "meta", "transformer": "cpu", "vae": "cpu"}
    place.use("sample")
    assert where(table) == {"text_encoder": "cpu", "transformer": "meta", "vae": "meta"}
    assert "cpu" not in moves and copied == []  # the text encoder left onto the CPU copy it kept: no copy at all
    assert table.text_encoder.weight.data_ptr() == encoder_weight
    table.transformer.register_buffer("chain_A", torch.empty(3, 2, device="meta"))  # made on the card
    table.transformer.weight.grad = torch.zeros(2, 2, device="meta")  # a round's last gradient: copied along
    place.use("encode")  # the transformer, whose weights the card may change, is copied back, into its own copy
    assert where(table) == {"text_encoder": "meta", "transformer": "cpu", "vae": "cpu"}
    assert sorted(copied) == [(2,), (2, 2), (2, 2), (3, 2)] and table.transformer.weight.data_ptr() == transformer_weight
    assert table.transformer.chain_A.device.type == "cpu" and table.transformer.weight.grad.device.type == "cpu"
    assert "cpu" not in moves
    table.transformer.weight.grad = None
    del table.transformer._buffers["chain_A"]  # gone while in CPU memory: its copy goes at the next departure
    place.use("sample")
    place.use("encode")
    assert set(place.host["transformer"]) == {"weight", "bias"}

    moves.clear()
    kept = pipe()
    place = Placement(kept, "meta", keep_all=True)
    for phase in ("features", "train", "sample", "encode", "sample", "idle"):
        place.use(phase)
    assert where(kept) == {"text_encoder": "meta", "transformer": "meta", "vae": "meta"}
    assert "cpu" not in moves  # nothing went back

    moves.clear()
    once = pipe()
    place = Placement(once, "meta", one_shot=True)
    place.use("encode")
    place.use("sample")
    assert where(once) == {"text_encoder": None, "transformer": "meta", "vae": "meta"} and "cpu" not in moves


def test_the_warm_model_stays_on_a_card_only_where_a_round_beside_it_keeps_its_room(monkeypatch):
    """memory.room_beside on a stand-in card (its free and total memory given): the warm klein-4B (its
    transformer and VAE on the card, 7.4 GiB) stays on an H200 and on a 48 GB card (a round alone plans a 27
    GiB peak there), and goes to CPU memory on a 24 GB card, where a `dopsd train` beside it would have to
    plan smaller; a recipe capped at 14.5 GiB plans the same beside it there, so it stays."""
    recipe = load_recipe(RECIPES_DIR / "flux2-klein-4b.toml")
    s = memory.accountant(recipe).sizes
    warm = (s["transformer"] + s["vae"]) * memory.GIB

    def card(total_gib):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (int(total_gib * memory.GIB - warm), int(total_gib * memory.GIB)))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    card(139.8)
    assert memory.room_beside(recipe, "cuda")
    card(24.0)
    assert not memory.room_beside(recipe, "cuda")
    capped = {**recipe, "model": {**recipe["model"], "memory_budget_gib": 14.5}}
    assert memory.room_beside(capped, "cuda")
    card(48.0)
    assert memory.room_beside(recipe, "cuda") and memory.room_beside(recipe, "cpu")


def test_a_parked_model_leaves_the_card_whole_and_comes_back_by_phase(monkeypatch):
    """placement.Placement.park on the stand-in card: every component leaves, keep_all's too, onto CPU
    copies it keeps; the next phase brings back only what it computes with, and a second park copies back
    only the transformer (the text encoder and the VAE leave onto the copies they kept)."""
    from dopsd_continual.placement import Placement

    pipe = torch.nn.Module()
    for n in ("text_encoder", "transformer", "vae"):
        setattr(pipe, n, torch.nn.Linear(2, 2))
    pipe.components = {n: getattr(pipe, n) for n in ("text_encoder", "transformer", "vae")}
    copied = []
    monkeypatch.setattr(Placement, "_copy_back", lambda self, host, t: copied.append(t) or host)
    place = Placement(pipe, "meta", keep_all=True)
    place.use("encode")
    place.use("sample")
    assert {n: m.weight.device.type for n, m in pipe.components.items()} == dict.fromkeys(pipe.components, "meta")
    place.park()
    assert {n: m.weight.device.type for n, m in pipe.components.items()} == dict.fromkeys(pipe.components, "cpu")
    assert len(copied) == 6  # no copy kept yet (keep_all): each weight and bias copied back once
    copied.clear()
    place.use("sample")
    assert {n: m.weight.device.type for n, m in pipe.components.items()} == {
        "text_encoder": "cpu", "transformer": "meta", "vae": "meta"}
    place.park()
    assert len(copied) == 2 and place.phase == "idle"  # the transformer's weight and bias only


def test_a_tied_weight_is_kept_once_and_stays_tied():
    """A tensor two modules share (a tied embedding) has one CPU copy, and going onto it keeps the tie."""
    from dopsd_continual.placement import _rebind, _tensors

    enc = torch.nn.Linear(2, 2)
    enc.twin = torch.nn.Linear(2, 2)
    enc.twin.weight = enc.weight
    entries = {key: owners for key, owners, _ in _tensors(enc)}
    assert sorted(entries) == ["bias", "twin.bias", "weight"] and len(entries["weight"]) == 2
    copy = torch.ones(2, 2)
    _rebind(entries["weight"], copy)
    assert enc.twin.weight is enc.weight and enc.weight.data_ptr() == copy.data_ptr()


def test_plans_within_15_percent_of_every_peak_measured_on_the_card():
    sys.path.insert(0, str(ROOT / "bench"))
    import memory_plan

    act = json.loads((ROOT / "bench/results/gpu_activations.json").read_text())
    e2e = json.loads((ROOT / "bench/results/gpu_e2e.json").read_text())
    for name in ("flux2-klein-4b", "z-image-turbo"):
        rows = memory_plan.compare(name, memory.accountant(load_recipe(RECIPES_DIR / f"{name}.toml")), act, e2e)
        kinds = {r["what"].split(",")[0] for r in rows}
        assert {"sampling call", "VAE decode", "text encoder", "round's train phase", "round's gate"} <= kinds
        bad = [(r["what"], round(r["error"], 3)) for r in rows if abs(r["error"]) > 0.15]
        assert not bad, (name, bad)


def test_a_small_card_shrinks_batches_tiles_the_decode_and_says_what_to_change():
    recipe = load_recipe(RECIPES_DIR / "z-image-turbo.toml")
    small = memory.plan(recipe, 14.5)
    assert not small.fits and small.peak_phase == "train"
    assert 'train.base_weights = "int8"' in small.line()
    assert small.batches["decode"] == 0 and small.batches.get("decode_tiled") == 1  # one picture decodes in tiles
    klein = memory.plan(load_recipe(RECIPES_DIR / "flux2-klein-4b.toml"), 10.0)
    assert not klein.fits and klein.advice


def test_the_accountant_keeps_its_counts_and_plans_again_without_building_the_model(tmp_path):
    recipe = load_recipe(RECIPES_DIR / "flux2-klein-4b.toml")
    first = memory.Accountant(recipe, cache_dir=tmp_path)
    p1 = first.plan(14.5)
    again = memory.Accountant(recipe, cache_dir=tmp_path)
    p2 = again.plan(14.5)
    assert again._parts is None  # every count came from the cache
    assert p1.to_dict() == p2.to_dict()


def test_sampler_batches_come_from_the_plan_and_do_not_change_the_pictures(state, monkeypatch):
    from dopsd_continual.sampling import Sampler

    full = Sampler(state)
    prompts = ["a small red circle", "a large blue square", "two green triangles"]
    ref = full.images(prompts, [0, 1, 2], 2, "v0")
    plan = memory.Plan("toy-shapes", 1.0, batches={"sample": 2, "decode": 1, "encode": 2})
    monkeypatch.setattr(memory, "placement_plan", lambda recipe, device: plan)
    small = Sampler(state)
    assert small.batches == {"sample": 2, "decode": 1, "encode": 2, "decode_tiled": 0, "keep_all": 0}
    out = small.images(prompts, [0, 1, 2], 2, "v0")
    assert (out - ref).abs().max() < 1e-4  # the same pictures, up to the rounding of batched kernels


def test_a_round_that_cannot_fit_is_refused_before_it_starts(state, monkeypatch, watch):
    from conftest import make_pair

    from dopsd_continual.errors import DoesNotFit
    from dopsd_continual.ingest import ingest_paths
    from dopsd_continual.rounds import run_round

    make_pair(watch, "a")
    ingest_paths(state, [watch])
    plan = memory.Plan("toy-shapes", 4.0, resident_gib={"train": 9.0}, activation_gib={"train": 1.0},
                       advice=['set train.base_weights = "int8" (train 3.9 GiB)'])
    monkeypatch.setattr(memory, "device_plan", lambda recipe, device: plan)
    with pytest.raises(DoesNotFit, match="does not fit 4 GiB: peak 10.0 GiB in train; set train.base_weights"):
        run_round(state, steps=1)
    assert state.conn.execute("select count(*) from rounds").fetchone()[0] == 0  # nothing started
    assert state.conn.execute("select status from samples").fetchone()[0] == "queued"
