"""A few rounds of bench/soak.py inside `make test`: the real daemon with rounds in their own processes, pairs
arriving in bursts, the dashboard open, the disk filled once (where a tmpfs can be mounted) and a kill -9
once. The full soak (its figures committed: 120 rounds) is `python bench/soak.py --rounds 120 --steps 10`."""

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


def test_the_soak_summary_reads_growth_per_round_from_the_rows_of_each_daemons_life(monkeypatch):
    """bench/soak.py's summary on made-up rows: flat memory reads 0 per round; a creep of 0.1 MB a round reads
    0.1 in each half of the first daemon's life; the restarted daemon's first five rounds are left out."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import soak

    def rows(step):
        out = []
        for i in range(1, 61):
            rss = 60 + (step * i if i <= 40 else 55 + step * (i - 40))  # the daemon restarted after round 40, lower
            out.append({"round": i, "rss_mb": rss, "fds": 24, "threads": 12, "disk_total_mb": 9.0,
                        "disk_bytes": {"features": 1 << 20}})
        return out

    for step, want in ((0.0, 0.0), (0.1, 0.1)):
        result = {"rows": rows(step), "events": [{"event": "kill -9", "after_round": 40}]}
        soak.summarize(result)
        per = result["summary"]["rss_mb_per_round"]
        assert list(per) == ["rounds 6-22", "rounds 23-40", "rounds 46-60"], per
        assert all(abs(v - want) < 1e-6 for v in per.values()), per
        assert result["summary"]["disk_mb_by_kind"]["features"] == {"rounds_6_to_15": 1.0, "last_10": 1.0}
