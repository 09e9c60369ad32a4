"""How fast the database-only commands answer, as whole processes, against `python -c pass` in the same run.

Runs `dopsd versions list`, `queue list` and `daemon status` (and `--version`) on a fresh state with a few
versions and samples, RUNS times each, interleaved with the baseline, and writes the medians to
bench/results/cli_latency.json. RUNS (default 15) is an environment variable.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchinfo import machine

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"versions list": ["versions", "list"], "queue list": ["queue", "list"], "daemon status": ["daemon", "status"],
            "--version": ["--version"]}


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    runs = int(os.environ.get("RUNS", "15"))
    dopsd = str(Path(sys.executable).with_name("dopsd"))
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "s"
        subprocess.run([dopsd, "init", "--state", str(state)], check=True, stdout=subprocess.DEVNULL)
        times: dict[str, list[float]] = {"python -c pass": [], **{k: [] for k in COMMANDS}}
        for _ in range(runs):
            times["python -c pass"].append(timed([sys.executable, "-c", "pass"]))
            for name, args in COMMANDS.items():
                extra = [] if args[0].startswith("--") else ["--state", str(state)]
                times[name].append(timed([dopsd, *args, *extra]))
    medians = {k: round(statistics.median(v), 3) for k, v in times.items()}
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "runs": runs, "median_seconds": medians,
           "over_python_startup": {k: round(v - medians["python -c pass"], 3) for k, v in medians.items()}}
    (Path(__file__).parent / "results" / "cli_latency.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
