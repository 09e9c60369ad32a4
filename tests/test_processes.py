"""Rounds as several data-parallel processes through accelerate's launcher: on the CPU, 2 processes over gloo."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_daemon import fast_recipe, wait_for

from dopsd_continual.daemon import Daemon
from dopsd_continual.ingest import ingest_paths
from dopsd_continual.lora import Delta
from dopsd_continual.rounds import recover, round_lock, run_round
from dopsd_continual.store import init_state, open_state
from dopsd_continual.toy.packs import write_pack

# float32 sums in another order (two half-batches averaged, not one batch): measured 3e-7 over 6 steps
TOLERANCE = 1e-4


def recipe(tmp_path: Path, name: str, processes: int = 1, batch: int = 4, **kw) -> Path:
    p = fast_recipe(tmp_path, **kw)
    text = p.read_text().replace("processes = 1 ", f"processes = {processes} ")
    text = text.replace("\nbatch = 4 ", f"\nbatch = {batch} ")
    assert f"processes = {processes} " in text and f"\nbatch = {batch} " in text
    out = tmp_path / f"{name}.toml"
    out.write_text(text)
    return out


def heart_state(tmp_path: Path, name: str, recipe_path: Path):
    drop = tmp_path / "drop"
    if not drop.exists():
        write_pack("heart", drop)
    st = init_state(tmp_path / name, str(recipe_path), [drop])
    ingest_paths(st)
    return st


def test_two_processes_give_the_delta_of_one_process_with_the_same_global_batch(tmp_path):
    two = heart_state(tmp_path, "two", recipe(tmp_path, "two", processes=2, batch=2, steps=6))
    one = heart_state(tmp_path, "one", recipe(tmp_path, "one", processes=1, batch=4, steps=6))
    r2, r1 = run_round(two), run_round(one)
    assert r2["metrics"]["processes"] == 2 and r1["metrics"]["processes"] == 1
    assert r2["verdict"] == r1["verdict"] == "accepted"
    a, b = Delta.load(two.adapters / "v1" / "delta.safetensors"), Delta.load(one.adapters / "v1" / "delta.safetensors")
    assert a.weights.keys() == b.weights.keys() and a.weights
    for name in a.weights:
        for x, y in zip(a.weights[name], b.weights[name]):
            assert y.abs().max() > 0  # trained, not the zero init
            assert (x - y).norm() <= TOLERANCE * y.norm(), name
    assert r2["metrics"]["loss_first"] == pytest.approx(r1["metrics"]["loss_first"], rel=TOLERANCE)
    assert not (two.cache / "rounds").exists() or not any((two.cache / "rounds").iterdir())  # job files cleaned up
    two.close()
    one.close()


def _snapshot(root: Path) -> dict:
    """What a reader sees after recovery: every row's status, the active pointer, the adapter folders."""
    st = open_state(root)
    try:
        with round_lock(st):
            recover(st)
        return {"active": st.active_version,
                "rounds": [r["status"] for r in st.rows("select status from rounds order by id")],
                "versions": {r["id"]: r["status"] for r in st.rows("select id, status from versions")},
                "samples": sorted({r["status"] for r in st.rows("select status from samples")}),
                "adapters": sorted(p.name for p in st.adapters.iterdir()),
                "training_left": (st.cache / "rounds").exists() and any((st.cache / "rounds").iterdir())}
    finally:
        st.close()


def _train(root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dopsd_continual.cli_entry", "train", "--json", "--state", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _training(root: Path) -> bool:
    st = open_state(root)
    try:
        return st.conn.execute("select count(*) from rounds where status='running' and progress > 0").fetchone()[0] == 1
    finally:
        st.close()


def test_killing_one_rank_leaves_the_state_a_killed_one_process_round_leaves(tmp_path):
    # today's reference: the whole 1-process round killed while training
    one = heart_state(tmp_path, "one", recipe(tmp_path, "one", processes=1, steps=400))
    proc = _train(one.root)
    assert wait_for(lambda: _training(one.root) or proc.poll() is not None, every=0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # two processes, one rank killed while training: the launcher stops the other, the round process remains
    two = heart_state(tmp_path, "two", recipe(tmp_path, "two", processes=2, batch=2, steps=400))
    proc = _train(two.root)
    job = two.cache / "rounds" / "v1"
    assert wait_for(lambda: (_training(two.root) and (job / "rank-1.pid").exists()) or proc.poll() is not None, every=0.05)
    assert proc.poll() is None, proc.communicate()
    import os

    os.kill(int((job / "rank-1.pid").read_text()), signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, (out, err)
    assert err.startswith("error: a training process failed") and len(err.strip().splitlines()) == 1, err
    expected = {"active": "v0", "rounds": ["interrupted"], "versions": {"v0": "accepted"},  # no candidate: no version
                "samples": ["queued"], "adapters": [], "training_left": False}
    assert _snapshot(one.root) == expected
    assert _snapshot(two.root) == expected
    # and the next round runs, on two processes again
    st = open_state(two.root)
    r = run_round(st, steps=2)
    assert r["version"] == "v1" and r["verdict"] == "accepted" and r["metrics"]["processes"] == 2
    st.close()
    one.close()
    two.close()


def test_the_daemon_runs_a_two_process_round(tmp_path):
    drop = tmp_path / "drop"
    write_pack("heart", drop)
    st = init_state(tmp_path / "s", str(recipe(tmp_path, "two", processes=2, batch=2, steps=4, min_new_samples=2)),
                    [drop])
    d = Daemon(st.root, install_signals=False)
    d.start()
    try:
        assert wait_for(lambda: st.conn.execute("select count(*) from rounds where status='done'").fetchone()[0] >= 1)
    finally:
        d.shutdown()
    v = st.rows("select status, metrics from versions where id='v1'")[0]
    assert v["status"] == "accepted" and json.loads(v["metrics"])["processes"] == 2
    assert st.active_version == "v1"
    st.close()


def test_doctor_says_what_processes_would_use(tmp_path):
    from typer.testing import CliRunner

    from dopsd_continual.cli import app

    init_state(tmp_path / "s", str(recipe(tmp_path, "two", processes=2, batch=2))).close()
    r = CliRunner().invoke(app, ["doctor", "--json", "--state", str(tmp_path / "s")])
    report = json.loads(r.output)
    assert report["processes"]["recipe"] == 2
    assert report["processes"]["would_use"] == (report["gpus"][:2] if report["gpus"] else ["cpu", "cpu"])
    r = CliRunner().invoke(app, ["train", "--processes", "0", "--state", str(tmp_path / "s")])
    assert r.exit_code == 2 and "Traceback" not in r.output
