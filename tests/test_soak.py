"""A few rounds of bench/soak.py inside `make test`: the real daemon with rounds in their own processes, pairs
arriving in bursts, the dashboard open, the disk filled once (where a tmpfs can be mounted) and a kill -9
once. The full soak (60 rounds, its figures committed) is `python bench/soak.py`."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_short_soak_pauses_on_a_full_disk_survives_a_kill_and_loses_no_pair(tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--rounds", "3", "--steps", "3", "--burst", "3",
                        "--disk-mb", "160", "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    events = {e["event"]: e for e in res["events"]}
    assert "daemon exited" not in events and res["exit_code_after_sigterm"] == 0
    assert events["kill -9"]["restarted"]
    if res["full_disk_injected"]:  # a tmpfs could be mounted (root): the daemon paused and said why
        assert "paused" in events["disk full"]["daemon_said"] and "MB free" in events["disk full"]["daemon_said"]
    else:
        assert os.geteuid() != 0
    assert len(res["rows"]) == 3 and all(row["status"] in ("done", "interrupted") for row in res["rows"])
    by_status = res["samples_by_status"]
    assert sum(by_status.values()) == res["pairs_dropped"] == 9  # every pair taken, none lost
    assert set(by_status) <= {"used", "queued"}, by_status  # none left 'training', none dropped
    assert res["rows"][-1]["dashboard"].get("pages", 0) > 0
    assert "Traceback" not in r.stdout + r.stderr
