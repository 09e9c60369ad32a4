"""Versions, rollback, the tree, squash, corruption, export round trip: real rounds on the toy model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dopsd_continual.errors import UserError
from dopsd_continual.ingest import ingest_paths
from dopsd_continual.rounds import run_round
from dopsd_continual.sampling import Sampler, sample
from dopsd_continual.stack import chain, list_versions, load_delta, rollback, set_active, squash_version
from dopsd_continual.toy.packs import write_pack

PROMPT = "a large red heart on the left, black background"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from dopsd_continual.store import init_state

    root = tmp_path_factory.mktemp("stack")
    write_pack("heart", root / "drop")
    st = init_state(root / "state", None, [root / "drop"])
    ingest_paths(st)
    sampler = Sampler(st)
    yield st, sampler, root
    st.close()


def _requeue(st):
    for row in list(st.db["samples"].rows):
        st.db["samples"].update(row["id"], {"status": "queued"})


def _img(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_versions_rollback_tree_squash_export(world, tmp_path):
    st, sampler, root = world
    base_png = tmp_path / "v0.png"
    sample(st, PROMPT, "v0", None, 7, 1, base_png, sampler)

    r1 = run_round(st, steps=6, lr=2e-3, sampler=sampler)
    assert r1["version"] == "v1" and r1["parent"] == "v0"
    set_active(st, "v1")  # whatever the gate said, continue the chain from v1
    _requeue(st)
    r2 = run_round(st, steps=6, lr=2e-3, sampler=sampler)
    assert r2["parent"] == "v1"
    set_active(st, "v2")
    assert chain(st, "v2") == ["v1", "v2"]

    # squash by concatenation reproduces the chain
    sq = squash_version(st, "v2")
    a = sampler.images([PROMPT], [3], 4, "v2")
    b = sampler.images([PROMPT], [3], 4, sq["version"])
    assert sq["relative_error"] == 0.0
    assert (a - b).abs().max() < 1e-4

    # rollback to the base reproduces its picture exactly; the rolled-back versions still exist
    assert rollback(st, "v0") == "v0"
    again = tmp_path / "again.png"
    res = sample(st, PROMPT, None, None, 7, 1, again, sampler)
    assert res["version"] == "v0"
    assert np.array_equal(_img(base_png), _img(again))
    ids = {v["id"] for v in list_versions(st)}
    assert {"v1", "v2"} <= ids and (st.adapters / "v1").is_dir()

    # a tree: a new round after the rollback branches from v0; both branches are kept
    _requeue(st)
    r4 = run_round(st, steps=4, sampler=sampler)
    assert r4["parent"] == "v0"
    assert chain(st, "v2") == ["v1", "v2"] and chain(st, r4["version"]) == [r4["version"]]

    # PNG metadata
    meta = Image.open(again).text
    assert meta["prompt"] == PROMPT and meta["seed"] == "7" and meta["steps"] == "4" and meta["version"] == "v0"
    assert meta["model"] == "toy-shapes"

    # diffusers export loads in plain diffusers and reproduces our sample within 1/255 mean
    from diffusers import Flux2KleinPipeline

    from dopsd_continual.models import resolve_source
    from dopsd_continual.stack import export_version

    out = tmp_path / "export"
    export_version(st, "v2", "diffusers", out)
    plain = Flux2KleinPipeline.from_pretrained(resolve_source(st.recipe["model"]["source"]))
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(out)
    img = plain(prompt=PROMPT, num_inference_steps=4, height=64, width=64, max_sequence_length=40,
                text_encoder_out_layers=(1, 2, 3), generator=torch.Generator("cpu").manual_seed(3), output_type="pt").images
    ours = sampler.images([PROMPT], [3], 4, "v2")
    assert (img.float() - ours).abs().mean() < 1 / 255
    base_img = sampler.images([PROMPT], [3], 4, "v0")
    assert (ours - base_img).abs().mean() > (img.float() - ours).abs().mean()  # the LoRA was really applied

    # ComfyUI naming
    from safetensors import safe_open

    cpath = export_version(st, "v2", "comfyui", tmp_path / "comfy")
    with safe_open(str(cpath), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("transformer.") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert oct(cpath.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # the user's normal file mode, not 0600


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_eval_runs_the_gate_metrics_for_a_version(world):
    from typer.testing import CliRunner

    from dopsd_continual.cli import app

    st, _, _ = world
    r = CliRunner().invoke(app, ["eval", "v1", "--json", "--state", str(st.root)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["version"] == "v1" and out["parent"] == "v0" and out["verdict"] in ("accepted", "rejected")
    for k in ("drift", "sharpness_ratio", "colour_shift", "seed_diversity_ratio", "few_step_gap_ratio",
              "concept_gap", "retention", "concept_score"):
        assert k in out["metrics"]
    r = CliRunner().invoke(app, ["eval", "v0", "--state", str(st.root)])
    assert r.exit_code == 1 and "base model" in r.output


def test_corrupted_adapter_is_detected_and_never_loaded(world):
    st, sampler, _ = world
    vid = next(v["id"] for v in list_versions(st) if v["id"] != "v0" and v["status"] != "corrupt")
    path = st.adapters / vid / "delta.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="corrupt"):
        load_delta(st, vid)
    assert st.db["versions"].get(vid)["status"] == "corrupt"
    with pytest.raises(UserError):
        set_active(st, vid)


def test_cli_versions_json_shapes(world):
    from typer.testing import CliRunner

    from dopsd_continual.cli import app

    st, _, _ = world
    r = CliRunner().invoke(app, ["versions", "list", "--json", "--state", str(st.root)])
    rows = json.loads(r.stdout)
    assert rows[0]["id"] == "v0" and rows[0]["status"] == "accepted"
    assert all({"id", "parent", "status", "active", "metrics"} <= set(v) for v in rows)
    assert sum(v["active"] for v in rows) == 1
    r = CliRunner().invoke(app, ["versions", "rollback", "v0", "--json", "--state", str(st.root)])
    assert json.loads(r.stdout) == {"active": "v0"}
    r = CliRunner().invoke(app, ["versions", "rollback", "--state", str(st.root)])
    assert r.exit_code == 1 and "nothing to roll back" in r.output
    r = CliRunner().invoke(app, ["versions", "show", "v99", "--state", str(st.root)])
    assert r.exit_code == 1 and "no version" in r.output


def test_diffusers_export_keeps_the_scale_when_alpha_differs_from_rank(tmp_path):
    """alpha != rank: without the adapter metadata a reloaded LoRA would have the wrong scale."""
    from diffusers import Flux2KleinPipeline

    from dopsd_continual.lora import Delta, export_diffusers, merge_into, resolve_targets
    from dopsd_continual.models import resolve_source

    src = resolve_source("embedded:toy-shapes")
    pipe = Flux2KleinPipeline.from_pretrained(src)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    mods = dict(pipe.transformer.named_modules())
    weights = {n: (torch.randn(4, mods[n].in_features, generator=g) * 0.05,
                   torch.randn(mods[n].out_features, 4, generator=g) * 0.05)
               for n in resolve_targets(pipe.transformer, ["to_q", "to_v", "attn.to_out"])}
    delta = Delta(weights, 2.0)  # alpha 8, rank 4
    export_diffusers(delta, tmp_path / "lora")
    from dopsd_continual.families import klein

    emb, tids = klein.encode_prompts(pipe, [PROMPT], 40, (1, 2, 3))
    from dopsd_continual.toy.model import token_grid

    grid = token_grid(pipe.vae)
    x = torch.randn(1, grid[0] * grid[1], 128, generator=g)
    ids = klein.latent_ids(1, grid, "cpu")
    sig = torch.tensor([0.7])

    def v(tr):
        with torch.no_grad():
            return klein.velocity(tr, x, sig, emb, tids, ids)

    base = v(pipe.transformer)
    with torch.no_grad():
        merge_into(pipe.transformer, [delta])
    merged = v(pipe.transformer)
    plain = Flux2KleinPipeline.from_pretrained(src)
    plain.load_lora_weights(tmp_path / "lora")
    loaded = v(plain.transformer)
    effect = (merged - base).abs().mean()
    assert effect > 1e-3
    assert (loaded - merged).abs().mean() < 0.01 * effect  # a wrong scale (1 instead of 2) would be 0.5 * effect


def test_the_dashboards_versions_list_leaves_the_metrics_unread(state):
    """list_versions(with_metrics=False), which every dashboard page builds: the same versions and fields, the
    gate metrics left empty (the pages show none; parsing every version's is a long history's cost)."""
    state.db["versions"].insert({"id": "v1", "parent": "v0", "status": "accepted", "created_at": 1.0, "objective": "dopsd",
                                 "recipe_hash": "", "samples": "[1, 2]", "metrics": json.dumps({"concept": 0.9}),
                                 "reasons": "[]", "adapter_dir": "adapters/v1"})
    full, light = list_versions(state), list_versions(state, with_metrics=False)
    assert [v["metrics"] for v in full] == [{}, {"concept": 0.9}] and [v["metrics"] for v in light] == [{}, {}]
    assert [{k: x for k, x in v.items() if k != "metrics"} for v in full] == [
        {k: x for k, x in v.items() if k != "metrics"} for v in light]


def test_chains_are_read_at_once_and_a_damaged_table_gives_an_error_not_a_hang(state):
    """stack.chain and retention.kept_versions read the versions' parents once (not a query per hop: a history
    of months is hundreds deep); a parent that loops (a damaged table) is an error, a missing one names itself."""
    from dopsd_continual.retention import kept_versions

    def add(vid, parent, status="accepted"):
        state.db["versions"].insert({"id": vid, "parent": parent, "status": status, "created_at": 1.0, "objective": "dopsd",
                                     "recipe_hash": "", "samples": "[]", "metrics": "{}", "reasons": "[]",
                                     "adapter_dir": f"adapters/{vid}"})

    for i in range(1, 301):
        add(f"v{i}", f"v{i - 1}", "accepted" if i % 3 else "rejected")
    add("v400", "v401")  # v400 <-> v401: a loop
    add("v401", "v400", "rejected")
    add("v500", "v499")  # its parent's row is gone
    reads = []
    state.conn.set_trace_callback(reads.append)
    try:
        assert chain(state, "v300") == [f"v{i}" for i in range(1, 301)]
    finally:
        state.conn.set_trace_callback(None)
    assert len([r for r in reads if "versions" in r]) == 1, reads
    with pytest.raises(UserError, match="loops"):
        chain(state, "v400")
    with pytest.raises(UserError, match="no version 'v499'"):
        chain(state, "v500")
    assert kept_versions(state) == {f"v{i}" for i in range(1, 300)} | {"v400", "v401", "v500"}  # v300: rejected
