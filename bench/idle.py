"""Idle cost of the daemon with the model released: CPU% of one core and RSS over 60 s, before any round
and again after one.

Starts `python -m dopsd_continual.daemon` on a fresh toy state dir watching an empty folder, waits for it
to settle, samples /proc/PID/stat and status for DURATION seconds; then drops the toy heart pack, waits
for the round's verdict (database state), lets the daemon settle and samples again. With the recipe's
`keep_warm_seconds = 0` the round runs in a process of its own, so the daemon's memory afterwards is its
idle size. Stops it. Writes bench/results/idle.json.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchinfo import machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopsd_continual.status import daemon_running  # noqa: E402
from dopsd_continual.store import init_state, set_settings  # noqa: E402
from dopsd_continual.toy.packs import write_pack  # noqa: E402


def cpu_ticks(pid: int) -> int:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def watch(pid: int, duration: float) -> dict:
    hz = os.sysconf("SC_CLK_TCK")
    t0, c0 = time.time(), cpu_ticks(pid)
    rss = []
    while time.time() - t0 < duration:
        rss.append(rss_mb(pid))
        time.sleep(1)
    return {"cpu": (cpu_ticks(pid) - c0) / hz / (time.time() - t0) * 100, "rss_max": max(rss),
            "rss_mean": sum(rss) / len(rss)}


def main() -> None:
    duration = float(os.environ.get("DURATION", "60"))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "drop").mkdir()
        st = init_state(Path(tmp) / "state", None, [Path(tmp) / "drop"])
        st.close()
        set_settings(Path(tmp) / "state", {"daemon.quiet_seconds": 2})  # the round soon after the drop
        proc = subprocess.Popen([sys.executable, "-m", "dopsd_continual.daemon", "--state", str(Path(tmp) / "state")])
        while not daemon_running(Path(tmp) / "state"):
            time.sleep(0.2)
        time.sleep(5)  # let start-up work (imports, first rescan) finish
        idle = watch(proc.pid, duration)
        write_pack("heart", Path(tmp) / "drop" / "heart")
        db = Path(tmp) / "state" / "dopsd.sqlite"
        t = time.time()
        verdict = None
        while verdict is None and time.time() - t < 1800 and proc.poll() is None:
            time.sleep(1)
            c = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
            row = c.execute("select status, pid from rounds where status != 'running' order by id desc limit 1").fetchone()
            c.close()
            verdict = row
        time.sleep(5)  # the round's process has ended; the daemon's clean-up and next rescan
        after = watch(proc.pid, duration)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "seconds": duration,
           "cpu_percent_of_one_core": idle["cpu"], "rss_mb_max": idle["rss_max"], "rss_mb_mean": idle["rss_mean"],
           "after_a_round": {"round": verdict[0] if verdict else None,
                             "round_in_another_process": bool(verdict and verdict[1] != proc.pid),
                             "cpu_percent_of_one_core": after["cpu"], "rss_mb_max": after["rss_max"],
                             "rss_mb_mean": after["rss_mean"]},
           "exit_code_after_sigterm": code}
    print(json.dumps(out, indent=2))
    (Path(__file__).parent / "results" / "idle.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
