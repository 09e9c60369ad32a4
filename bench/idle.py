"""Idle cost of the daemon with the model released: CPU% of one core and RSS over 60 s.

Starts `python -m dopsd_continual.daemon` on a fresh state dir watching an empty folder, waits for it to
settle, samples /proc/PID/stat and status for DURATION seconds, stops it. Writes bench/results/idle.json.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchinfo import machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopsd_continual.daemon import daemon_running  # noqa: E402
from dopsd_continual.store import init_state  # noqa: E402


def cpu_ticks(pid: int) -> int:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    duration = float(os.environ.get("DURATION", "60"))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "drop").mkdir()
        st = init_state(Path(tmp) / "state", None, [Path(tmp) / "drop"])
        st.close()
        proc = subprocess.Popen([sys.executable, "-m", "dopsd_continual.daemon", "--state", str(Path(tmp) / "state")])
        while not daemon_running(Path(tmp) / "state"):
            time.sleep(0.2)
        time.sleep(5)  # let start-up work (imports, first rescan) finish
        hz = os.sysconf("SC_CLK_TCK")
        t0, c0 = time.time(), cpu_ticks(proc.pid)
        rss = []
        while time.time() - t0 < duration:
            rss.append(rss_mb(proc.pid))
            time.sleep(1)
        cpu = (cpu_ticks(proc.pid) - c0) / hz / (time.time() - t0) * 100
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    out = {"machine": machine(),
           "date": time.strftime("%Y-%m-%d"), "seconds": duration, "cpu_percent_of_one_core": cpu,
           "rss_mb_max": max(rss), "rss_mb_mean": sum(rss) / len(rss), "exit_code_after_sigterm": code}
    print(json.dumps(out, indent=2))
    (Path(__file__).parent / "results" / "idle.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
