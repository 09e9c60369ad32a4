"""A few rounds of bench/soak.py inside `make test`: the real daemon with rounds in their own processes, pairs
arriving in bursts, the dashboard open, the disk filled once (where a tmpfs can be mounted) and a kill -9
once. The full soak (60 rounds, its figures committed) is `python bench/soak.py`."""

import json
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_short_soak_pauses_on_a_full_disk_survives_a_kill_and_loses_no_pair(tmp_path):
    out = tmp_path / "soak.json"
    p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "soak.py"), "--rounds", "3", "--steps", "3", "--burst", "3",
                          "--disk-mb", "160", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        said, _ = p.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGTERM)  # the soak stops its daemon and unmounts its disk
        said, _ = p.communicate(timeout=180)
        raise AssertionError("the soak did not finish: " + said[-3000:]) from None
    assert p.returncode == 0, said[-3000:]
    res = json.loads(out.read_text())
    events = {e["event"]: e for e in res["events"]}
    assert "daemon exited" not in events and res["exit_code_after_sigterm"] == 0
    kill = events["kill -9"]
    assert kill["restarted"] and res["round_statuses"][kill["killed_round"]] == "interrupted"  # killed mid-round
    if res["full_disk_injected"]:  # a tmpfs could be mounted (root): the daemon paused and said why
        assert "paused" in events["disk full"]["daemon_said"] and "MB free" in events["disk full"]["daemon_said"]
    assert len(res["rows"]) == 3
    by_status = res["samples_by_status"]
    assert sum(by_status.values()) == res["pairs_dropped"] == 9  # every pair taken, none lost
    assert set(by_status) <= {"used", "queued"}, by_status  # none left 'training', none dropped
    assert res["rows"][-1]["dashboard"].get("pages", 0) > 0
    assert res["tracebacks_in_logs"] == 0 and "Traceback" not in said
