"""A state's disk: what it holds by kind, what `dopsd gc` gives back and what it never touches, and a full
disk at each phase of a round and of a scan (a real small file system where this machine lets a test mount
one)."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tree_snapshot
from typer.testing import CliRunner

from dopsd_continual.cli import app
from dopsd_continual.ingest import ingest_paths
from dopsd_continual.rounds import run_round
from dopsd_continual.sampling import Sampler
from dopsd_continual.stack import set_active
from dopsd_continual.toy.packs import write_pack

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from smalldisk import fill, mount_tmpfs, unmount  # noqa: E402

PROMPT = "a large red heart on the left, black background"


def run(*args):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in r.output, r.output
    return r


def test_gc_gives_back_what_no_round_needs_and_every_accepted_version_still_works(tmp_path):
    from dopsd_continual.store import init_state

    write_pack("heart", tmp_path / "drop")
    st = init_state(tmp_path / "s", None, [tmp_path / "drop"])
    ingest_paths(st)
    sampler = Sampler(st)

    def round_(status):
        for row in list(st.db["samples"].rows):
            st.db["samples"].update(row["id"], {"status": "queued"})
        r = run_round(st, steps=2, sampler=sampler)
        st.db["versions"].update(r["version"], {"status": status})
        return r["version"]

    v1 = round_("accepted")
    set_active(st, v1)
    v2 = round_("rejected")  # a candidate of v1 the gate turned down
    v3 = round_("accepted")  # the chain goes on from v1
    set_active(st, v3)
    dropped = next(st.db["samples"].rows)["id"]
    st.close()
    s = tmp_path / "s"
    assert run("queue", "drop", dropped, "--state", s).exit_code == 0

    before = tree_snapshot(s)
    dry = json.loads(run("gc", "--json", "--state", s).stdout)
    assert dry["dry_run"] and set(dry["prunable"]) == {"features"}  # the dropped sample's, at once; the rest waits its days
    assert run("config", "set", "retention.rejected_days", "0", "--state", s).exit_code == 0
    assert run("config", "set", "retention.gate_days", "0", "--state", s).exit_code == 0
    before = tree_snapshot(s)
    dry = json.loads(run("gc", "--json", "--state", s).stdout)
    assert tree_snapshot(s) == before  # a dry run changes nothing
    items = {Path(i["path"]).relative_to(s).as_posix(): i["kind"] for i in dry["items"]}
    assert items[f"adapters/{v2}"] == "candidates" and f"adapters/{v1}" not in items and f"adapters/{v3}" not in items
    gate = {p for p, k in items.items() if k == "gate pictures"}
    assert gate and not any(Path(p).name.startswith(f"{v3}-") for p in gate)  # the active version's are kept
    assert sum(k == "features" for k in items.values()) >= 1  # the dropped sample's
    assert not any(p.startswith("blobs/") or p.startswith("reports/") for p in items)  # originals, reports: never
    use = dry["use_bytes"]
    assert use["originals"] > 0 and use["versions kept"] > 0 and use["candidates"] > 0

    r = run("gc", "--yes", "--json", "--state", s)
    assert r.exit_code == 0 and json.loads(r.stdout)["freed_bytes"] > 0
    assert not (s / "adapters" / v2).exists() and (s / "blobs").exists()
    assert json.loads(run("gc", "--json", "--state", s).stdout)["items"] == []  # done: nothing more to give
    r = run("versions", "promote", v2, "--state", s)
    assert r.exit_code == 1 and "removed by `dopsd gc`" in r.output  # said, not a corrupt version
    assert json.loads(run("versions", "show", v2, "--json", "--state", s).stdout)["status"] == "rejected"
    for v in ("v0", v1, v3):  # every accepted version: rollback, sample, export
        assert run("versions", "rollback", v, "--state", s).exit_code == 0
        assert run("sample", PROMPT, "--version", v, "--out", tmp_path / f"{v}.png", "--state", s).exit_code == 0
        if v != "v0":
            assert run("versions", "export", v, "--out", tmp_path / f"lora-{v}", "--state", s).exit_code == 0
    assert "state disk use" in run("doctor", "--state", s).output


CHILD = """
import sys
from pathlib import Path

import dopsd_continual.placement as placement
from dopsd_continual.cli import app

at, disk = sys.argv[1], Path(sys.argv[2])
sys.path.insert(0, sys.argv[3])  # bench/: smalldisk
real = placement.PhaseLog.__call__


def call(self, name):
    if name == at:
        from smalldisk import fill

        fill(disk)
    return real(self, name)


placement.PhaseLog.__call__ = call
sys.argv = ["dopsd", "train", "--steps", "2", "--state", str(disk / "s")]
app()
"""


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if not mount_tmpfs(disk, 160):
        pytest.skip("this machine does not let the test mount a small file system (needs root)")
    yield disk
    unmount(disk)


def test_a_full_disk_at_each_phase_is_one_line_loses_nothing_and_the_next_round_trains_the_same_samples(small_disk, tmp_path):
    disk = small_disk
    drop = tmp_path / "drop"
    write_pack("heart", drop)
    snapshot = tree_snapshot(drop)
    s = disk / "s"
    assert run("init", "--state", s, "--watch", drop).exit_code == 0
    filler = fill(disk)  # a scan on a full disk: one line, the user's files untouched, taken later
    r = run("ingest", "--state", s)
    assert r.exit_code == 1 and "the disk is full" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    filler.unlink()
    assert tree_snapshot(drop) == snapshot
    assert len(json.loads(run("ingest", "--json", "--state", s).stdout)["queued"]) == 8
    ids = sorted(r["id"] for r in json.loads(run("queue", "list", "--json", "--state", s).stdout))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    for phase in ("load", "features", "train", "gate"):
        p = subprocess.run([sys.executable, "-c", CHILD, phase, str(disk), str(ROOT / "bench")], capture_output=True,
                           text=True, env=env, timeout=600)
        out = p.stdout + p.stderr
        assert p.returncode == 1 and "Traceback" not in out, (phase, out[-3000:])
        lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and "disk is full" in lines[0], (phase, p.stderr)
        (disk / "filler").unlink()
        queue = json.loads(run("queue", "list", "--json", "--state", s).stdout)
        assert sorted(r["id"] for r in queue) == ids and {r["status"] for r in queue} == {"queued"}, (phase, queue)
        assert tree_snapshot(drop) == snapshot
    r = run("train", "--steps", "2", "--json", "--state", s)
    assert r.exit_code == 0, r.output
    took = sorted(json.loads(r.stdout)["samples"])
    assert took and took == ids[: len(took)]  # the same samples, the oldest first, as before the full disks
    queue = {q["id"]: q["status"] for q in json.loads(run("queue", "list", "--json", "--state", s).stdout)}
    assert sorted(queue) == ids and all(queue[i] == "queued" for i in ids if i not in took)  # nothing lost


def test_caches_keep_a_bf16_models_values_in_half_the_bytes_and_give_them_back_bit_for_bit(tmp_path):
    import torch
    from safetensors import safe_open

    from dopsd_continual.store import load_compact, save_compact

    from_bf16 = torch.randn(64, 64).to(torch.bfloat16).float()  # a bf16 model's pictures, held in float32
    full = torch.randn(64, 64)  # float32 values bf16 cannot hold: kept as they are
    native = torch.randn(8).to(torch.bfloat16)  # stored bf16 on purpose: comes back bf16
    save_compact({"a": from_bf16, "b": full, "c": native}, tmp_path / "f.safetensors")
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as f:
        assert {k: f.get_tensor(k).dtype for k in f.keys()} == {"a": torch.bfloat16, "b": torch.float32, "c": torch.bfloat16}
    back = load_compact(tmp_path / "f.safetensors")
    assert torch.equal(back["a"], from_bf16) and back["a"].dtype == torch.float32
    assert torch.equal(back["b"], full) and back["c"].dtype == torch.bfloat16


def test_the_replay_pool_is_a_fixed_size_subset_that_new_samples_change_one_at_a_time_and_gc_keeps_only_its_features(tmp_path):
    """train.replay_pool bounds what replay keeps: of the chain's used samples, the `size` with the smallest
    fixed hash. A new version on the chain changes the pool by at most one sample per new sample, a sample
    enters it only in the round that trained it, and gc gives back the features of the rest."""
    from dopsd_continual.retention import plan
    from dopsd_continual.rounds import select_samples
    from dopsd_continual.stack import replay_pool
    from dopsd_continual.store import feature_key, init_state

    write_pack("heart", tmp_path / "a")
    write_pack("logo", tmp_path / "b")
    st = init_state(tmp_path / "s", None, [tmp_path / "a", tmp_path / "b"])
    ingest_paths(st)
    ids = [r["id"] for r in st.db["samples"].rows_where(order_by="id")]
    assert len(ids) >= 10
    feats = st.cache / "features" / "enc"
    feats.mkdir(parents=True)
    for r in st.db["samples"].rows:  # a feature file per sample, as rounds leave them
        (feats / f"{feature_key(r['sha256'], r['caption'])}.safetensors").write_bytes(b"x" * 100)

    def version(vid, parent, samples):
        st.db["versions"].insert({"id": vid, "parent": parent, "status": "accepted", "created_at": 0.0,
                                  "samples": json.dumps(samples), "metrics": "{}", "reasons": "[]"})
        for i in samples:
            st.db["samples"].update(i, {"status": "used"})
        st.conn.execute("update meta set value = ? where key = 'active_version'", [vid])
        st.conn.commit()

    version("v1", "v0", ids[:6])
    version("v2", "v1", ids[6:8])
    assert st.active_version == "v2"
    everything = replay_pool(st, 0)
    assert [r["id"] for r in everything] == ids[:8]
    pool = replay_pool(st, 4)
    assert len(pool) == 4 and {r["id"] for r in pool} < set(ids[:8])
    assert [r["id"] for r in pool] == sorted(r["id"] for r in pool)  # by id, as the whole pool was
    assert select_samples(st, pool=4)[1] == pool
    assert select_samples(st)[1] == everything  # the recipe's default pool (64) holds the whole history

    before = {r["id"] for r in pool}
    version("v3", "v2", [ids[8]])
    after = {r["id"] for r in replay_pool(st, 4)}
    assert len(after) == 4 and after <= before | {ids[8]} and len(before - after) <= 1
    assert replay_pool(st, 4, "v2") == pool  # another chain, another pool: the one it had

    st.recipe["train"]["replay_pool"] = 4
    gone = {Path(i["path"]).name.split(".")[0] for i in plan(st) if i["kind"] == "features"}
    rows = {r["id"]: r for r in st.db["samples"].rows}
    key = {i: feature_key(rows[i]["sha256"], rows[i]["caption"]) for i in rows}
    kept = after | {i for i in rows if rows[i]["status"] == "queued"}
    assert gone == {key[i] for i in rows} - {key[i] for i in kept}  # the rest of the history's go
    assert {key[i] for i in ids[9:]} <= {key[i] for i in kept}  # the queue's stay


def test_a_running_row_a_failed_clean_up_left_in_a_live_process_is_not_a_round_in_progress(tmp_path):
    """A round in the daemon's own process (keep_warm_seconds > 0) whose clean-up cannot write leaves its row
    'running' under the daemon's live pid: readers must show its samples as queued, and renders must not wait
    for it; while a round really holds round.running, they see it."""
    from dopsd_continual.rounds import running_round
    from dopsd_continual.status import status
    from dopsd_continual.store import init_state, round_running, shown_status

    write_pack("heart", tmp_path / "drop")
    st = init_state(tmp_path / "s", None, [tmp_path / "drop"])
    ingest_paths(st)
    sid = next(st.db["samples"].rows)["id"]
    st.db["samples"].update(sid, {"status": "training"})
    st.db["rounds"].insert({"version": "v1", "status": "running", "pid": os.getpid(), "started_at": 0.0,
                            "progress": 0.0, "samples": json.dumps([sid])})
    with round_running(st):  # a round in progress, here or in another process
        assert shown_status(st)("training") == "training" and running_round(st) == "v1"
        assert status(st)["round"]["id"] == "v1"
    assert shown_status(st)("training") == "queued" and running_round(st) is None  # what the failed one left
    assert status(st)["round"] is None and status(st)["queue"].get("training") is None
    assert json.loads(run("queue", "list", "--json", "--state", tmp_path / "s").stdout)[0]["status"] == "queued"


def test_the_daemons_status_is_written_in_place_when_the_disk_takes_no_new_file(tmp_path, monkeypatch):
    """On a full disk the status file cannot be replaced by a new one; it is rewritten in its own blocks, so
    `daemon status` still says why rounds paused, and nothing of a longer status before it stays behind."""
    import dopsd_continual.daemon as daemon_mod
    from dopsd_continual.daemon import Daemon
    from dopsd_continual.status import read_status_file
    from dopsd_continual.store import init_state

    st = init_state(tmp_path / "s", None, [])
    d = Daemon(st.root, install_signals=False)
    d.held = {"key": "x", "reason": "a long reason " * 100}
    d._write_status(None)
    before = (st.root / "daemon.json").stat().st_size

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(daemon_mod, "atomic_write", full)
    d.pause_rounds("the disk is full: here (0 MB free)")
    d._write_status(None)  # the heartbeat's write (the scheduler's, in a running daemon)
    info = read_status_file(st.root)
    assert info["held"].startswith("rounds paused: the disk is full: here (0 MB free)")
    assert (st.root / "daemon.json").stat().st_size <= before
    d.held = {"key": "x", "reason": "short"}
    d._write_status(None)
    assert read_status_file(st.root)["held"] == "short"
    st.close()


def test_the_states_walk_takes_each_regular_file_once_and_follows_no_link(tmp_path):
    from dopsd_continual.files import walk_files
    from dopsd_continual.retention import disk_use
    from dopsd_continual.store import init_state

    st = init_state(tmp_path / "state", None, [])
    try:
        (st.blobs / "ab").mkdir(parents=True)
        (st.blobs / "ab" / "abc.png").write_bytes(b"x" * 100)
        (st.root / "reports" / "v1").mkdir(parents=True)
        (st.root / "reports" / "v1" / "report.json").write_bytes(b"y" * 10)
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        (outside / "big.bin").write_bytes(b"z" * 5000)
        (st.root / "reports" / "loop").symlink_to(st.root)  # a link back up, and one out: neither walked
        (st.root / "reports" / "out").symlink_to(outside)
        (st.root / "reports" / "file-link").symlink_to(outside / "big.bin")
        os.mkfifo(st.root / "reports" / "pipe")
        walked = sorted(os.path.relpath(e.path, st.root) for e in walk_files(st.root))
        assert "blobs/ab/abc.png" in walked and "reports/v1/report.json" in walked
        assert not any(p.startswith(("reports/loop", "reports/out", "reports/file-link", "reports/pipe")) for p in walked)
        assert len(walked) == len(set(walked))
        use = disk_use(st)
        assert use["originals"] == 100 and use["reports"] == 10 and use["database"] > 0
        assert sum(use.values()) == sum(os.path.getsize(os.path.join(st.root, p)) for p in walked)
        assert list(walk_files(tmp_path / "gone")) == []  # a folder gone meanwhile: nothing, no error
    finally:
        st.close()


def test_recovery_removes_the_states_half_written_files_and_never_a_file_in_a_watched_folder(tmp_path):
    from dopsd_continual.rounds import recover
    from dopsd_continual.store import init_state

    st = init_state(tmp_path / "state", None, [])
    drop = st.root / "drop"  # watched folders may lie inside the state (their paths are relative to it)
    drop.mkdir()
    st.close()
    st = init_state(tmp_path / "state", None, [drop])
    try:
        (st.root / "reports").mkdir(exist_ok=True)
        leftover = st.root / "reports" / ".report.json.tmp-12-34"
        leftover.write_text("half")
        users = drop / ".holiday.jpg.tmp-1"  # the user's, whatever its name
        users.write_text("mine")
        recover(st)
        assert not leftover.exists() and users.read_text() == "mine"
    finally:
        st.close()


def test_every_connection_to_the_states_database_keeps_a_small_page_cache(tmp_path):
    """A long-lived daemon keeps the high-water mark of its connections' page caches: each is bounded at
    store.CACHE_KIB (bench/sqlite_memory.py), on a state opened for writing and for reading only."""
    from dopsd_continual.store import CACHE_KIB, init_state, open_db, open_state

    assert 0 < CACHE_KIB < 2000  # below SQLite's default of 2,000 KiB a connection
    init_state(tmp_path / "state", None, []).close()
    st = open_state(tmp_path / "state")
    try:
        assert st.conn.execute("pragma cache_size").fetchone()[0] == -CACHE_KIB
    finally:
        st.close()
    ro = open_db(tmp_path / "state" / "dopsd.sqlite", readonly=True)  # no WAL left: opened as immutable
    try:
        assert ro.execute("pragma cache_size").fetchone()[0] == -CACHE_KIB
    finally:
        ro.close()
    st = open_state(tmp_path / "state")  # a writer holds rows in its WAL: read-only, not immutable
    try:
        with st.conn:
            st.conn.execute("insert or replace into meta (key, value) values ('probe', '1')")
        assert (tmp_path / "state" / "dopsd.sqlite-wal").stat().st_size > 0
        ro = open_db(tmp_path / "state" / "dopsd.sqlite", readonly=True)
        try:
            assert ro.execute("select value from meta where key = 'probe'").fetchone()[0] == "1"
            assert ro.execute("pragma cache_size").fetchone()[0] == -CACHE_KIB
        finally:
            ro.close()
    finally:
        st.close()
