"""The daemon and crash safety, with real processes, real signals and real folders."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import make_pair

from dopsd_continual.daemon import Daemon, start_background, stop_background
from dopsd_continual.recipe import RECIPES_DIR
from dopsd_continual.status import daemon_running, status
from dopsd_continual.store import init_state, open_state
from dopsd_continual.toy.packs import write_pack


def fast_recipe(tmp_path: Path, steps=3, gate=False, **daemon) -> Path:
    text = (RECIPES_DIR / "toy-shapes.toml").read_text()
    text, n = re.subn(r"(?m)^steps = \d+( +# optimiser steps)", rf"steps = {steps}\1", text)
    assert n == 1  # the [train] section's steps
    text = text.split("\n[gate]")[0]  # the shipped [gate] and [daemon] tables are replaced below
    d = {"interval_minutes": 60, "min_new_samples": 2, "quiet_seconds": 0, "rescan_seconds": 1, **daemon}
    text += "\n[daemon]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in d.items())
    text += f"\n[gate]\nenabled = {'true' if gate else 'false'}\n"  # the model's own prompts and judges (dopsd-gate.json)
    p = tmp_path / "fast.toml"
    p.write_text(text)
    return p


def wait_for(cond, timeout=60.0, every=0.2):
    """Wait on state (the database, a process), never on a slice of wall time: the limit is only there to end a
    test that is truly stuck, so it is generous (a loaded 2-core machine runs a round many times slower)."""
    timeout = max(timeout, 600.0)
    t = time.time()
    while time.time() - t < timeout:
        if cond():
            return True
        time.sleep(every)
    return False


def count(root, where):
    st = open_state(root)
    try:
        return st.db.execute(f"select count(*) from {where}").fetchone()[0]
    finally:
        st.close()


def test_dropped_file_is_queued_and_the_threshold_runs_one_round(tmp_path, watch):
    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path, min_new_samples=3)), [watch])
    d = Daemon(st.root, install_signals=False)
    d.start()
    try:
        make_pair(watch, "one", seed=1)
        assert wait_for(lambda: count(st.root, "samples where status='queued'") == 1, 20)
        assert count(st.root, "versions") == 1  # below the threshold: no round yet
        make_pair(watch, "two", seed=2)
        (watch / "sub").mkdir()
        make_pair(watch / "sub", "three", seed=3)
        assert wait_for(lambda: count(st.root, "versions where status='accepted'") == 2, 90)
        assert d.rounds_started == 1
        # not twice at once: two concurrent calls, one round
        for i in range(3):
            make_pair(watch, f"more{i}", seed=10 + i)
        assert wait_for(lambda: count(st.root, "samples where status='queued'") >= 2 or count(st.root, "versions") > 2, 20)
        before = d.rounds_started
        threads = [threading.Thread(target=d.round_job, kwargs={"reason": "threshold"}) for _ in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert d.rounds_started - before <= 1
    finally:
        d.shutdown()
    assert not daemon_running(st.root)
    st.close()


def test_round_runs_on_schedule(tmp_path, watch):
    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path, min_new_samples=100, interval_minutes=0.03)), [watch])
    make_pair(watch, "one", seed=1)
    d = Daemon(st.root, install_signals=False)
    d.start()
    try:
        assert wait_for(lambda: count(st.root, "versions where status='accepted'") == 2, 90)
    finally:
        d.shutdown()
    st.close()


def _train_proc(root: Path):
    return subprocess.Popen([sys.executable, "-m", "dopsd_continual.cli_entry", "train", "--json", "--state", str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("when", ["features", "training", "gate"])
def test_kill_9_of_a_round_leaves_everything_recoverable(tmp_path, when):
    drop = tmp_path / "drop"
    write_pack("heart", drop)
    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path, steps=60, gate=(when == "gate"))), [drop])
    from dopsd_continual.ingest import ingest_paths

    ingest_paths(st)
    active = st.active_version
    proc = _train_proc(st.root)
    conds = {
        "features": lambda: count(st.root, "rounds where status='running'") == 1,
        "training": lambda: count(st.root, "rounds where status='running' and progress > 0.2") == 1,
        "gate": lambda: count(st.root, "versions where status='candidate'") == 1,
    }
    assert wait_for(lambda: conds[when]() or proc.poll() is not None, every=0.05)
    assert proc.poll() is None, proc.communicate(timeout=5)  # the round reached the stage while still running
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    st2 = open_state(st.root)
    assert st2.active_version == active
    from dopsd_continual.rounds import recover, round_lock

    with round_lock(st2):
        assert recover(st2) == ["v1"]
    assert st2.db["rounds"].get(1)["status"] == "interrupted"
    versions = {r["id"]: r["status"] for r in st2.db["versions"].rows}
    # a round stopped before its candidate existed leaves no version behind; one stopped in its gate, its candidate
    assert versions == ({"v0": "accepted", "v1": "interrupted"} if when == "gate" else {"v0": "accepted"})
    assert not (st2.adapters / "v1").exists()
    assert st2.db.execute("select count(*) from samples where status != 'queued'").fetchone()[0] == 0
    # the next round succeeds (short)
    from dopsd_continual.rounds import run_round

    r = run_round(st2, steps=2)
    nxt = "v2" if when == "gate" else "v1"
    assert r["version"] == nxt and st2.db["versions"].get(nxt)["status"] == r["verdict"]
    assert st2.active_version == (nxt if r["verdict"] == "accepted" else active)
    st2.close()
    st.close()


def test_kill_9_of_the_daemon_then_status_and_restart(tmp_path, watch):
    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path)), [watch])
    pid = start_background(st.root)
    assert status(st)["running"] and status(st)["pid"] == pid
    os.kill(pid, signal.SIGKILL)
    assert wait_for(lambda: not daemon_running(st.root), 10)
    s = status(st)
    assert s["running"] is False and s["pid"] is None
    pid2 = start_background(st.root)
    assert pid2 != pid and status(st)["running"]
    assert stop_background(st.root)
    assert not status(st)["running"]
    st.close()


def test_sigterm_exits_cleanly_and_one_daemon_per_state(tmp_path, watch):
    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path)), [watch])
    proc = subprocess.Popen([sys.executable, "-m", "dopsd_continual.daemon", "--state", str(st.root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: daemon_running(st.root) and (st.root / "daemon.json").exists(), 30)
    second = subprocess.run([sys.executable, "-m", "dopsd_continual.daemon", "--state", str(st.root)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 1 and "already running" in second.stderr
    said = subprocess.run([sys.executable, "-m", "dopsd_continual.cli_entry", "daemon", "status", "--state", str(st.root)],
                          capture_output=True, text=True, timeout=120).stdout
    assert "queue: empty" in said and "next round: when pairs are queued (the schedule looks next at " in said, said
    said = subprocess.run([sys.executable, "-m", "dopsd_continual.cli_entry", "config", "set", "daemon.quiet_seconds", "5",
                           "--state", str(st.root)], capture_output=True, text=True, timeout=120).stdout
    assert "the running daemon reads [daemon] at its start" in said, said
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert not daemon_running(st.root)
    st.close()


def test_cli_round_while_another_holds_the_lock(tmp_path, watch):
    from typer.testing import CliRunner

    from dopsd_continual.cli import app
    from dopsd_continual.rounds import round_lock

    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path)), [watch])
    make_pair(watch, "a")
    with round_lock(st):
        r = CliRunner().invoke(app, ["train", "--json", "--state", str(st.root)])
    assert r.exit_code == 1 and "another round is running" in r.output
    st.close()


def test_install_service_writes_a_unit(tmp_path, watch):
    from typer.testing import CliRunner

    from dopsd_continual.cli import app

    units = {}
    for name in ("s", "t"):  # two states on one account: two units, neither replaces the other
        init_state(tmp_path / name, None, [watch]).close()
        r = CliRunner().invoke(app, ["daemon", "install-service", "--unit-dir", str(tmp_path / "units"),
                                     "--state", str(tmp_path / name)])
        assert r.exit_code == 0
        (path,) = set((tmp_path / "units").glob("*.service")) - set(units.values())
        units[name] = path
        unit = path.read_text()
        assert "ExecStart=" in unit and str(tmp_path / name) in unit
        assert f"systemctl --user enable --now {path.name}" in r.output
    assert units["s"].name != units["t"].name and units["s"].name.startswith("dopsd-s-")


def test_a_round_the_card_cannot_hold_is_held_with_its_reason_until_something_changes(tmp_path, watch, monkeypatch):
    from dopsd_continual import memory, rounds
    from dopsd_continual.ingest import ingest_paths

    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path, min_new_samples=1)), [watch])
    make_pair(watch, "one", seed=1)
    ingest_paths(st)
    plan = memory.Plan("toy-shapes", 4.0, resident_gib={"train": 9.0}, activation_gib={"train": 1.0},
                       advice=["a larger card"])
    monkeypatch.setattr(memory, "device_plan", lambda recipe, device: plan)
    calls = []
    real = rounds.run_round
    monkeypatch.setattr(rounds, "run_round", lambda *a, **k: calls.append(1) or real(*a, **k))
    d = Daemon(st.root, install_signals=False)
    assert d.round_job("schedule") is None and not calls  # refused before the model loads
    assert d.held["reason"] == "rounds held: toy-shapes does not fit 4 GiB: peak 10.0 GiB in train; a larger card"
    monkeypatch.setattr(memory, "check_fits", lambda *a: calls.append("checked"))
    assert d.round_job("schedule") is None and not calls  # unchanged: not even checked again
    assert count(st.root, "rounds") == 0 and count(st.root, "samples where status='queued'") == 1
    make_pair(watch, "two", seed=2)
    ingest_paths(st)
    monkeypatch.setattr(memory, "device_plan", lambda recipe, device: None)  # e.g. the user changed the card
    assert d.round_job("schedule")["version"] == "v1" and d.held is None
    assert calls == ["checked", 1, "checked"]  # the daemon's check, the round (which checks again)
    d.state.close()
    st.close()


def test_a_failing_round_is_held_once_with_its_fix_and_retried_on_request(tmp_path, watch, monkeypatch, caplog):
    from typer.testing import CliRunner

    from dopsd_continual import rounds
    from dopsd_continual.cli import app
    from dopsd_continual.errors import UserError
    from dopsd_continual.ingest import ingest_paths

    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path, min_new_samples=1)), [watch])
    make_pair(watch, "one", seed=1)
    ingest_paths(st)
    calls = []

    def no_weights(*a, **k):
        calls.append(1)
        raise UserError("the weights of flux2-klein-4b are not on this machine: get them with `dopsd pull`")

    monkeypatch.setattr(rounds, "run_round", no_weights)
    d = Daemon(st.root, install_signals=False)
    assert d.round_job("schedule") is None and len(calls) == 1
    assert "dopsd pull" in d.held["reason"] and "dopsd daemon retry" in d.held["reason"]
    for _ in range(3):  # every later rescan or schedule: not tried again, not logged again
        assert d.round_job("schedule") is None
    assert len(calls) == 1 and sum("rounds held" in r.message for r in caplog.records) == 1
    assert count(st.root, "versions") == 1 and count(st.root, "samples where status='queued'") == 1
    assert CliRunner().invoke(app, ["daemon", "retry", "--state", str(st.root)]).exit_code == 0
    assert d.round_job("schedule") is None and len(calls) == 2  # tried again after `dopsd daemon retry`
    d.state.close()
    st.close()


def test_status_says_how_many_samples_were_set_aside_and_why(tmp_path, watch):
    from dopsd_continual.ingest import ingest_paths
    from dopsd_continual.rounds import commit_verdict

    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path)), [watch])
    for i in range(2):
        make_pair(watch, f"p{i}", seed=i)
    ingest_paths(st)
    new = [dict(r) for r in st.db["samples"].rows]
    limit = st.recipe["gate"]["max_rejections_per_sample"]
    for n in range(limit):
        vid = f"v{n + 1}"
        st.db["versions"].insert({"id": vid, "parent": "v0", "status": "candidate", "created_at": 0, "samples": "[]",
                                  "metrics": "{}", "reasons": "[]"})
        rid = st.db["rounds"].insert({"version": vid, "status": "running", "pid": os.getpid(), "started_at": 0,
                                      "progress": 0, "samples": "[]"}).last_pk
        commit_verdict(st, rid, vid, new, "rejected", ["drift 0.300 on held-out prompts > 0.12"], {})
    s = status(st)["set_aside"]
    assert s["count"] == 2 and s["reasons"] == ["drift 0.300 on held-out prompts > 0.12"]
    assert "queue retry --status set_aside" in s["hint"]
    st.close()


def test_ctrl_c_on_train_says_what_became_of_the_round(tmp_path):
    drop = tmp_path / "drop"
    write_pack("heart", drop)
    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path, steps=2000)), [drop])
    from dopsd_continual.ingest import ingest_paths

    ingest_paths(st)
    proc = subprocess.Popen([sys.executable, "-m", "dopsd_continual.cli_entry", "train", "--state", str(st.root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: count(st.root, "rounds where status='running' and progress > 0") == 1 or proc.poll() is not None,
                    every=0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("stopped: the round ended as interrupted")
    assert count(st.root, "rounds where status='interrupted'") == 1
    assert count(st.root, "samples where status='queued'") == 8
    st.close()


def test_the_processes_apart_follow_the_log_the_daemon_rotates(tmp_path):
    """A round's or the drawing process's lines land in the daemon's current log after the daemon rotates it
    (not in a rotated file, nor in one deleted later), and only the daemon rotates."""
    import logging
    from logging.handlers import RotatingFileHandler

    from dopsd_continual.logs import setup_logging

    logger = logging.getLogger("dopsd")
    saved = list(logger.handlers)
    try:
        setup_logging(tmp_path, rotate=False, who="drawing")
        assert not any(isinstance(h, RotatingFileHandler) for h in logger.handlers)
        logger.info("before the rotation")
        daemon = RotatingFileHandler(tmp_path / "daemon.log", maxBytes=64, backupCount=3)  # the daemon's own
        daemon.emit(logging.makeLogRecord({"msg": "x" * 100}))
        daemon.emit(logging.makeLogRecord({"msg": "the daemon, after its rotation"}))
        daemon.close()
        logger.info("after the rotation")
        current = (tmp_path / "daemon.log").read_text()
        assert "drawing: after the rotation" in current and "the daemon, after its rotation" in current
        rotated = "".join(f.read_text() for f in tmp_path.glob("daemon.log.*"))
        assert "drawing: before the rotation" in rotated and "after" not in rotated
        setup_logging(tmp_path)  # the daemon's own: its next file after a rotation is owner-only too
        (tmp_path / "daemon.log").rename(tmp_path / "old.log")
        logger.handlers[0].doRollover()
        assert (tmp_path / "daemon.log").stat().st_mode & 0o777 == 0o600
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
            h.close()
        for h in saved:
            logger.addHandler(h)


TRIM_PROBE = r"""
import ctypes, sys
from dopsd_continual.daemon import trim_heap

def rss_mb():
    return int(dict(l.split(":", 1) for l in open("/proc/self/status"))["VmRSS"].split()[0]) / 1024

if not hasattr(ctypes.CDLL(None), "malloc_trim"):
    print("not glibc"); sys.exit(0)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 * 1024) for _ in range(1600)]  # 100 MB in chunks below glibc's mmap threshold
for b in blocks:
    ctypes.memset(b, 1, 64 * 1024)
pin = blocks.pop()  # the last chunk stays: the heap cannot shrink from its top by itself
for b in blocks:
    libc.free(b)
before = rss_mb()
trim_heap()
print(before - rss_mb())
"""


def test_trim_heap_hands_freed_memory_inside_the_heap_back_to_the_system(tmp_path):
    """The daemon's trim (after each round, and from its heartbeat) gives back free pages below a live chunk,
    which glibc keeps by itself: a long-lived daemon's resident memory does not keep its peaks."""
    r = subprocess.run([sys.executable, "-c", TRIM_PROBE], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert r.returncode == 0, r.stderr
    if r.stdout.strip() == "not glibc":
        pytest.skip("malloc_trim is glibc's")
    assert float(r.stdout) > 50, r.stdout  # of the 100 MB freed below the pinned chunk


def test_a_daemon_that_grew_renews_in_place_keeping_its_pid_lock_socket_and_token(tmp_path, watch):
    """daemon.renew_mb: once a round has settled its size, a daemon grown that far past it (here: any growth)
    stops its work and execs itself anew: the same pid, the lock held throughout (a second daemon is refused),
    the dashboard's listening socket handed over (the same socket: the port was never free for another account
    to take) and its token kept; the renewed daemon takes the next drop. A stop while it renews again ends it."""
    import http.cookiejar
    import urllib.request

    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path, min_new_samples=1, renew_mb=0.001, ui=True,
                                                    ui_port=0)), [watch])
    log = st.logs / "daemon.log"
    proc = subprocess.Popen([sys.executable, "-m", "dopsd_continual.daemon", "--state", str(st.root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: daemon_running(st.root) and read_status(st.root).get("ui"))
        token = (st.root / "ui-token").read_text()
        port = int(read_status(st.root)["ui"].rstrip("/").rsplit(":", 1)[1])  # any free one: kept across renewals
        tab = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))  # a browser's
        listener = listening_inode(port)
        assert tab.open(f"http://127.0.0.1:{port}/?token={token}", timeout=60).status == 200 and listener
        make_pair(watch, "one", seed=1)
        assert wait_for(lambda: log.exists() and "renewing in place" in log.read_text())
        assert wait_for(lambda: log.read_text().count(f"daemon started (pid {proc.pid})") == 2)
        assert daemon_running(st.root) and proc.poll() is None
        second = subprocess.run([sys.executable, "-m", "dopsd_continual.daemon", "--state", str(st.root)],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "already running" in second.stderr
        assert wait_for(lambda: read_status(st.root).get("pid") == proc.pid and read_status(st.root).get("ui"))
        assert (st.root / "ui-token").read_text() == token
        assert listening_inode(port) == listener  # handed over, never closed and bound again
        assert tab.open(f"http://127.0.0.1:{port}/", timeout=60).status == 200  # its cookie: the tab stays signed in
        kids = subprocess.run(["ps", "--ppid", str(proc.pid), "-o", "stat="], capture_output=True, text=True).stdout
        assert "Z" not in kids, kids  # the old image's resource tracker was ended, not left a zombie
        make_pair(watch, "two", seed=2)  # the renewed daemon works: it takes the drop and trains on it
        assert wait_for(lambda: count(st.root, "versions where status='accepted'") == 3)
        assert wait_for(lambda: log.read_text().count("renewing in place:") == 2)  # grown again: a stop meets it
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    text = log.read_text()
    assert code == 0 and not daemon_running(st.root) and not (st.root / "daemon.json").exists(), text[-3000:]
    assert text.rstrip().endswith("daemon stopped") and "Traceback" not in text, text[-3000:]
    st.close()


def listening_inode(port: int) -> str | None:
    """The inode of the socket listening on 127.0.0.1:port (/proc/net/tcp), None if none."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == f"0100007F:{port:04X}" and f[3] == "0A":
            return f[9]
    return None


def read_status(root: Path) -> dict:
    try:
        return json.loads((root / "daemon.json").read_text())
    except (OSError, ValueError):
        return {}


def test_a_renewal_waits_for_a_restart_when_the_new_image_would_differ_or_could_not_start(tmp_path, watch, monkeypatch, caplog):
    """A renewal never upgrades the daemon, applies [daemon] settings that wait for a restart, or starts while a
    `dopsd train` holds the round (the new image would wait on it): it is put off, said once in the log."""
    import logging

    from dopsd_continual import daemon as daemon_module
    from dopsd_continual.store import round_lock, set_settings

    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path)), [watch])
    d = Daemon(st.root, install_signals=False)
    try:
        assert d._can_start_again()
        with round_lock(st):  # a CLI round in progress
            assert not d._can_start_again()
        assert d._can_start_again() and d._renew_refused is None
        set_settings(st.root, {"daemon.quiet_seconds": 5})
        with caplog.at_level(logging.INFO, logger="dopsd"):
            assert not d._can_start_again() and not d._can_start_again()
        assert caplog.text.count("not renewing in place") == 1 and "[daemon] settings changed" in caplog.text
        set_settings(st.root, {}, remove=("daemon.quiet_seconds",))
        d._renew_refused = None  # (looked at again after 10 minutes)
        assert d._can_start_again()
        monkeypatch.setattr(daemon_module, "code_fingerprint", lambda: "another install")
        assert not d._can_start_again() and "the installed dopsd changed" in d._renew_refused[0]
    finally:
        d.state.close()
        st.close()



def test_a_renewal_lets_the_jobs_under_way_end_without_holding_the_scheduler_they_call(tmp_path, watch):
    """shutdown for a renewal waits for the scheduler's jobs under way (a scan would be cut by the exec), and not
    inside the scheduler's own shutdown, which holds the lock that a job's get_job needs (a deadlock)."""
    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path)), [watch])
    d = Daemon(st.root, install_signals=False)
    d.start()
    started, ended = threading.Event(), threading.Event()

    def scan_like():  # as rescan_job does: work, then the scheduler again
        started.set()
        time.sleep(1.0)
        d.scheduler.get_job("round")
        ended.set()

    d.scheduler.add_job(d._counted(scan_like), id="scan-like")
    assert started.wait(600)
    with d.round_lock, d.model_busy:  # as the heartbeat that decided the renewal holds them
        d.renewing = True
        done = threading.Thread(target=lambda: setattr(d, "kept", d.shutdown()), daemon=True)
        done.start()
        done.join(600)
        assert not done.is_alive() and ended.is_set() and d.kept  # the job ended first; the lock kept for the exec
    assert (st.root / "daemon.json").exists() and daemon_running(st.root)  # (the new image's to take)
    os.close(d._lock_fd)
    d.state.close()
    st.close()
