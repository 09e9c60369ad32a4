"""The state and the dashboard on a shared machine: owner-only files, no links followed, bounded renders."""

import os
import stat
import subprocess
import sys
import threading

import pytest
from starlette.testclient import TestClient
from test_robustness import DROPS, NOBODY, cli
from test_ui import HERE, TOKEN

from dopsd_continual.store import atomic_write, open_state, user_file_mode
from dopsd_continual.web.server import MAX_RENDERS, Dashboard


def mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_a_new_state_and_its_files_are_its_owners_alone(root, tmp_path):
    assert mode(root) == 0o700
    for p in root.rglob("*"):
        if p.is_symlink():
            continue
        assert mode(p) & 0o077 == 0, (p, oct(mode(p)))  # nothing for the group or others, at any depth
    st = open_state(root)  # while a writer has it open, its write-ahead log and shared memory exist
    try:
        st.db["meta"].upsert({"key": "probe", "value": "1"}, pk="key")
        assert mode(root / "dopsd.sqlite") == 0o600 and mode(root / "dopsd.sqlite-wal") == 0o600
        assert mode(root / "dopsd.sqlite-shm") == 0o600
    finally:
        st.close()
    blob = next((root / "blobs").rglob("*.png"))
    if DROPS:  # as another account: neither the state nor a photo in it can be read
        r = cli("versions", "list", "--state", root, user=NOBODY)
        assert r.returncode == 1 and "Traceback" not in r.stderr
        probe = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
                                "-c", f"open({str(blob)!r}, 'rb').read()"], capture_output=True, text=True)
        assert probe.returncode != 0 and "PermissionError" in probe.stderr
    elif os.geteuid() != 0:
        with pytest.raises(PermissionError):  # the same, as far as this account's own modes can show it
            os.chmod(root, 0o000)
            try:
                open(blob, "rb").read()
            finally:
                os.chmod(root, 0o700)


def test_an_older_state_is_tightened_by_the_next_write_and_says_so_once(root):
    for p in [root, *root.rglob("*")]:  # as states were made before
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    r = cli("doctor", "--state", root)
    assert "readable by other accounts" in r.stdout
    first = cli("ingest", "--state", root)
    assert first.returncode == 0 and "now owner-only" in first.stderr
    assert mode(root) == 0o700 and all(mode(p) & 0o077 == 0 for p in root.rglob("*") if not p.is_symlink())
    again = cli("ingest", "--state", root)
    assert again.returncode == 0 and "owner-only" not in again.stderr
    assert "readable by other accounts" not in cli("doctor", "--state", root).stdout


def test_state_files_are_owner_only_from_the_first_byte_and_what_the_user_asks_for_is_theirs(tmp_path, monkeypatch):
    seen = []
    real = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, m=0o777, *a, **k: seen.append((str(p), m)) or real(p, flags, m, *a, **k))
    old = os.umask(0)  # even with no umask at all
    try:
        atomic_write(tmp_path / "ui-token", b"secret")
    finally:
        os.umask(old)
        monkeypatch.undo()
    assert seen and all(m == 0o600 for p, m in seen if "ui-token" in p)  # the temp file is born 0600
    assert mode(tmp_path / "ui-token") == 0o600
    atomic_write(tmp_path / "picture.png", b"x", mode=user_file_mode())
    assert mode(tmp_path / "picture.png") == 0o666 & ~old  # `dopsd sample --out`: the user's usual mode


def test_renders_are_bounded_and_a_round_starts_while_they_wait(root):
    from dopsd_continual.rounds import run_round

    d = Dashboard(root, token=TOKEN)
    c = TestClient(d.app, base_url=HERE, follow_redirects=False)
    c.get(f"/?token={TOKEN}")
    import re

    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', c.get("/versions/v0").text).group(1)
    d.model_lock.acquire()  # a long render in progress: the rest wait behind it
    try:
        codes = [c.post("/actions/sample", data={"version": "v0", "prompt": f"a red heart {i}", "seed": str(i),
                                                 "steps": "2", "csrf": csrf}).status_code for i in range(20)]
        assert codes.count(303) == MAX_RENDERS and codes.count(429) == 20 - MAX_RENDERS
        st = open_state(root)
        try:
            result = run_round(st, steps=1)  # not refused as "another round is running", not made to wait
            assert result["version"] == "v1"
        finally:
            st.close()
    finally:
        d.model_lock.release()
    done = threading.Event()

    def finished():
        return all(j["status"] in ("done", "failed") for j in d.jobs.values())

    for _ in range(6000):
        if finished():
            done.set()
            break
        done.wait(0.1)
    assert done.is_set() and all(j["status"] == "done" for j in d.jobs.values()), d.jobs
    d.close()


def test_a_render_waits_for_a_running_round_and_a_round_for_at_most_the_render_in_progress(root):
    from contextlib import ExitStack

    from dopsd_continual.rounds import render_lock, render_turn
    from dopsd_continual.store import round_running

    st = open_state(root)
    try:
        waited = []
        with st.conn:
            st.conn.execute("insert into rounds (version, status, pid, started_at, progress, samples) "
                            "values ('v9', 'running', ?, 0, 0, '[]')", [os.getpid()])
        held = ExitStack()
        held.enter_context(round_running(st))  # a round in progress holds it from before its row to its end
        stop = threading.Event()
        def render():
            with pytest.raises(InterruptedError):  # it never got its turn: the round still ran when it stopped
                with render_turn(st, on_wait=waited.append, stop=stop.is_set, every=0.01):
                    pass

        t = threading.Thread(target=render, daemon=True)
        t.start()
        for _ in range(2000):
            if waited:
                break
            threading.Event().wait(0.01)
        assert waited and waited[0] == "round v9"  # the render waits while the round runs
        stop.set()
        t.join(10)
        with st.conn:
            st.conn.execute("update rounds set status = 'done' where version = 'v9'")
        held.close()
        with render_turn(st):
            got = threading.Event()
            th = threading.Thread(target=lambda: [render_lock(st).__enter__(), got.set()], daemon=True)
            th.start()
            assert not got.wait(0.3)  # a round's lock waits for the render in progress
        assert got.wait(10)  # and takes it as soon as the render is done
    finally:
        st.close()


def test_a_stopped_server_with_event_streams_open_logs_no_traceback(root, capfd):
    import tempfile
    from pathlib import Path

    import httpx

    from dopsd_continual.web.server import Server

    before = set(Path(tempfile.gettempdir()).glob("dopsd-ui-*"))
    for how in ("stop", "signal"):  # Server.stop(), and what Ctrl-C does: uvicorn's own should_exit
        s = Server(root, "127.0.0.1", 0, TOKEN).start()
        url = f"http://127.0.0.1:{s.port}"
        with httpx.Client(base_url=url) as h:
            h.get(f"/?token={TOKEN}")
            with h.stream("GET", "/events") as r:
                next(r.iter_lines())
                if how == "stop":
                    s.stop()
                else:
                    s.server.should_exit = True
                    s.thread.join(20)
                    assert not s.thread.is_alive()
        err = capfd.readouterr().err
        assert "Traceback" not in err and "CancelledError" not in err and "ERROR" not in err, (how, err)
    assert set(Path(tempfile.gettempdir()).glob("dopsd-ui-*")) == before  # no temporary folder left by a server


def test_folders_made_on_the_way_are_owner_only_too(state, tmp_path):
    """A prompt's features (state/cache/prompts/<encoder>/) and any folder made with its parents are 0700 at
    every level, whatever the umask."""
    import torch

    from dopsd_continual.files import private_dirs
    from dopsd_continual.sampling import PromptCache

    old = os.umask(0o022)
    try:
        cache = PromptCache(state)
        cache.put("a red circle", torch.zeros(2, 3))
        for p in (state.cache / "prompts", cache.dir, cache.path("a red circle")):
            assert mode(p) & 0o077 == 0, (p, oct(mode(p)))
        private_dirs(tmp_path / "a" / "b" / "c")
        assert [mode(tmp_path / x) for x in ("a", "a/b", "a/b/c")] == [0o700] * 3
    finally:
        os.umask(old)
