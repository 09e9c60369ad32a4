"""A new user's first hour, as the README's typical session says it, in fresh processes: a watched folder
that does not exist yet, the daemon's timings shortened with `dopsd config set` (no file edited), a drop,
a trained version, a sample from it, a rollback."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_typical_session_reaches_a_trained_version_without_editing_a_file(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("DOPSD_STABILITY_SECONDS", None)  # the product's own wait for a file to settle
    env.pop("DOPSD_STATE", None)

    def dopsd(*args, timeout=600):
        r = subprocess.run([sys.executable, "-m", "dopsd_continual.cli_entry", *map(str, args)], capture_output=True,
                           text=True, env=env, cwd=home, timeout=timeout)
        assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
        return r

    drop = home / "dopsd-drop"
    r = dopsd("init", "--watch", drop)  # README: dopsd init --watch ~/dopsd-drop
    assert r.returncode == 0 and drop.is_dir() and "created" in (r.stdout + r.stderr).lower(), r.stdout + r.stderr
    assert dopsd("config", "set", "daemon.quiet_seconds", "2").returncode == 0
    r = dopsd("daemon", "start")
    assert r.returncode == 0, r.stderr
    try:
        assert dopsd("toy", "pack", "heart", "--out", drop).returncode == 0  # the user's image + caption pairs
        deadline = time.time() + 900  # waits on the database: a loaded machine is slow, not wrong
        versions = []
        while time.time() < deadline:
            versions = json.loads(dopsd("versions", "list", "--json").stdout)
            if any(v["id"] == "v1" and v["status"] in ("accepted", "rejected") for v in versions):
                break
            time.sleep(2)
        v1 = next((v for v in versions if v["id"] == "v1"), None)
        assert v1 is not None and v1["status"] in ("accepted", "rejected"), (versions, dopsd("daemon", "status").stdout)
        status = dopsd("daemon", "status").stdout
        assert "running: yes" in status and "queue:" in status
        pid = json.loads(dopsd("daemon", "status", "--json").stdout)["pid"]
        import sqlite3

        c = sqlite3.connect(f"{(home / 'state' / 'dopsd.sqlite').as_uri()}?mode=ro", uri=True)
        round_pid = c.execute("select pid from rounds where version = 'v1'").fetchone()[0]
        c.close()
        assert round_pid != pid  # the round ran in a process of its own ...
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps and "libc10" not in maps  # ... so the daemon never loaded the model's libraries
        r = dopsd("sample", "a large red heart on the left, black background", "--version", "v1", "-n", "2",
                  "--out", "hearts.png")
        assert r.returncode == 0 and (home / "hearts.png").stat().st_size > 0, r.stderr
        if v1["status"] == "accepted":
            r = dopsd("versions", "rollback")
            assert r.returncode == 0 and "active: v0" in r.stdout
    finally:
        r = dopsd("daemon", "stop")
    assert r.returncode == 0 and "daemon stopped" in r.stdout
    assert "running: no" in dopsd("daemon", "status").stdout
