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


class _Pipe:  # what Placement uses of a diffusers pipeline: its components, as attributes and as a dict
    def __init__(self):
        for n in ("text_encoder", "transformer", "vae"):
            setattr(self, n, torch.nn.Linear(2, 2))

    @property
    def components(self):
        return {n: getattr(self, n) for n in ("text_encoder", "transformer", "vae")}


def _where(p):
    return {n: (m.weight.device.type if m is not None else None) for n, m in
            ((n, getattr(p, n)) for n in ("text_encoder", "transformer", "vae"))}


@pytest.fixture
def stand_in_card(monkeypatch):
    """The `meta` device as the card (a move is visible as the parameters' device; its tensors hold no data, so
    a copy back to CPU memory is recorded, not made), plain CPU buffers as the pinned slabs. Yields the moves
    Module.to made and the copies back."""
    from dopsd_continual import placement

    moves, copied = [], []
    real_to = torch.nn.Module.to

    def to(self, device, *a, **k):
        moves.append(str(device))
        if str(device) == "cpu" and self.weight.is_meta:
            return self.to_empty(device="cpu")
        return real_to(self, device, *a, **k)

    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr(placement.Placement, "_copy_back", lambda self, host, t: copied.append(tuple(t.shape)) or host)
    monkeypatch.setattr(placement, "_pinned_buffer", lambda size: torch.empty(size, dtype=torch.uint8))
    monkeypatch.setattr(placement, "_pin_room", lambda size: True)
    return moves, copied


def test_a_component_leaves_onto_the_copy_it_kept_copied_back_only_where_the_card_changed_it(stand_in_card):
    """placement.Placement's phase table on the stand-in card: a component's CPU copy is made the first time it
    leaves and kept; leaving again takes it back with no copy unless the card changed a tensor (written in
    place: a merged version); a tensor made on the card (a chain term) and a gradient go to plain CPU memory."""
    from dopsd_continual.placement import Placement

    moves, copied = stand_in_card
    pipe = _Pipe()
    place = Placement(pipe, "meta", pin=True)
    place.use("encode")
    assert _where(pipe) == {"text_encoder": "meta", "transformer": "cpu", "vae": "cpu"} and copied == []
    place.use("sample")  # the text encoder leaves for the first time: its copy is made
    assert _where(pipe) == {"text_encoder": "cpu", "transformer": "meta", "vae": "meta"}
    assert sorted(copied) == [(2,), (2, 2)] and "cpu" not in moves
    encoder = pipe.text_encoder.weight.data_ptr()
    assert place.host["text_encoder"]["weight"].data_ptr() == encoder  # a view into a slab
    place.use("encode")  # the transformer and the VAE leave for the first time
    transformer = pipe.transformer.weight.data_ptr()
    copied.clear()
    place.use("sample")  # the text encoder, unchanged, leaves again: no copy at all
    assert copied == [] and pipe.text_encoder.weight.data_ptr() == encoder
    with torch.no_grad():
        pipe.transformer.weight.add_(1)  # a float32 base's merged version, written in place
    pipe.transformer.register_buffer("chain_A", torch.empty(3, 2, device="meta"))  # made on the card
    pipe.transformer.weight.grad = torch.zeros(2, 2, device="meta")  # a round's last gradient
    place.use("encode")
    assert sorted(copied) == [(2, 2), (2, 2), (3, 2)]  # the weight into its copy, its gradient, the chain term
    assert pipe.transformer.weight.data_ptr() == transformer and "chain_A" not in place.host["transformer"]
    assert pipe.transformer.chain_A.device.type == "cpu" and pipe.transformer.weight.grad.device.type == "cpu"
    assert "cpu" not in moves  # never Module.to("cpu"): every leaving went onto a copy
    copied.clear()
    pipe.transformer.weight.grad = None
    del pipe.transformer._buffers["chain_A"]
    place.use("sample")
    with torch.no_grad():
        pipe.transformer.bias.add_(1)  # changed on the card, then a phase that keeps it there: still seen
    place.use("train")
    place.use("encode")
    assert copied == [(2,)]


def test_a_kept_component_never_moves_again_and_a_one_shot_process_frees_what_leaves(stand_in_card):
    """keep_all moves each component in once and never back; one_shot frees a component leaving the card (and
    keeps no copy of anything), and never one that waits in CPU memory."""
    from dopsd_continual.placement import Placement

    moves, copied = stand_in_card
    kept = _Pipe()
    place = Placement(kept, "meta", keep_all=True, pin=True)
    for phase in ("features", "train", "sample", "encode", "sample", "idle"):
        place.use(phase)
    assert _where(kept) == {"text_encoder": "meta", "transformer": "meta", "vae": "meta"}
    assert "cpu" not in moves and copied == [] and place.host == {}

    once = _Pipe()
    place = Placement(once, "meta", one_shot=True, pin=True)
    place.use("encode")
    place.use("sample")
    assert _where(once) == {"text_encoder": None, "transformer": "meta", "vae": "meta"}
    assert "cpu" not in moves and copied == [] and place.host == {}


def test_a_parked_model_leaves_the_card_whole_and_comes_back_by_phase(stand_in_card):
    """placement.Placement.park: every component leaves, keep_all's too, onto copies it keeps; the next phase
    brings back only what it computes with, and a second park copies nothing (nothing changed on the card)."""
    from dopsd_continual.placement import Placement

    moves, copied = stand_in_card
    pipe = _Pipe()
    place = Placement(pipe, "meta", keep_all=True, pin=True)
    place.use("encode")
    place.use("sample")
    assert _where(pipe) == dict.fromkeys(pipe.components, "meta")
    place.park()
    assert _where(pipe) == dict.fromkeys(pipe.components, "cpu") and len(copied) == 6 and place.phase == "idle"
    place.use("sample")
    assert _where(pipe) == {"text_encoder": "cpu", "transformer": "meta", "vae": "meta"}
    place.park()
    assert len(copied) == 6 and "cpu" not in moves


def test_copies_are_cut_from_slabs_and_a_machine_without_room_keeps_none(monkeypatch, stand_in_card):
    """Pinned copies are views into 256 MiB slabs (the allocator's power-of-two rounding costs nothing); where
    pinning would leave less than half the machine's memory available, nothing is kept."""
    from dopsd_continual import placement

    place = placement.Placement(_Pipe(), "meta", pin=True)
    tensors = [torch.empty(1000, device="meta"), torch.empty(3, 5, dtype=torch.bfloat16, device="meta")]
    views = list(place._copies(tensors))
    assert [v.shape for v in views] == [(1000,), (3, 5)] and views[1].dtype == torch.bfloat16
    assert views[0].untyped_storage().data_ptr() == views[1].untyped_storage().data_ptr()  # one slab
    assert views[0].untyped_storage().nbytes() == placement.SLAB_BYTES
    assert placement._rounded(placement.SLAB_BYTES) == placement.SLAB_BYTES and placement._rounded(5) == 8
    monkeypatch.setattr(placement, "_pin_room", lambda size: False)
    pipe = _Pipe()
    place = placement.Placement(pipe, "meta", pin=True)
    place.use("encode")
    place.use("sample")
    assert place.host["text_encoder"] == {} and _where(pipe)["text_encoder"] == "cpu"


def test_the_warm_model_stays_on_a_card_only_where_a_round_beside_it_keeps_its_room(monkeypatch):
    """memory.room_beside on a stand-in card (its free and total memory given, what the warm model holds taken
    from the free): klein-4B kept whole on the card (transformer, VAE and text encoder: 14.9 GiB) stays on an
    H200 and on a 48 GB card (a round alone there plans a 27 GiB peak), and goes to CPU memory on a 24 GB card,
    where a `dopsd train` beside it would have to plan smaller; capped at 14.5 GiB (a 16 GB card's plan), a
    round on a 32 GB card plans the same beside it, so it stays there. Z-Image kept whole (19.1 GiB) goes on a
    48 GB card (a 31.2 GiB round)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    def card(recipe, total_gib):
        s = memory.accountant(recipe).sizes
        warm = (s["transformer"] + s["vae"] + s["text_encoder"]) * memory.GIB
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (int(total_gib * memory.GIB - warm),
                                                                        int(total_gib * memory.GIB)))

    klein = load_recipe(RECIPES_DIR / "flux2-klein-4b.toml")
    zimage = load_recipe(RECIPES_DIR / "z-image-turbo.toml")
    card(klein, 139.8)
    assert memory.room_beside(klein, "cuda")
    card(klein, 24.0)
    assert not memory.room_beside(klein, "cuda")
    capped = {**klein, "model": {**klein["model"], "memory_budget_gib": 14.5}}
    assert not memory.room_beside(capped, "cuda")
    card(klein, 32.0)
    assert memory.room_beside(capped, "cuda") and not memory.room_beside(klein, "cuda")
    card(klein, 48.0)
    assert memory.room_beside(klein, "cuda") and memory.room_beside(klein, "cpu")
    card(zimage, 48.0)
    assert not memory.room_beside(zimage, "cuda")
    card(zimage, 139.8)
    assert memory.room_beside(zimage, "cuda")


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
