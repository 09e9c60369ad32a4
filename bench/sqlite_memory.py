"""What SQLite's page caches leave in the daemon, against how many pairs the state holds. The daemon's own work
(its start-up recovery with the database's integrity check, the watcher, two rescans, gc after a round, the
next round's key, the dashboard's overview and queue pages five times each, the heartbeat) on a state of N
pairs marked trained on, with no versions beyond the base (what a long history adds is bench/fresh_size.py's),
in a fresh process each time, with SQLite's default page cache (2,000 KiB a connection) and with the state's
(store.CACHE_KIB), side by side on the same states:
- SQLite's high-water mark (sqlite3_memory_highwater: the most its allocator held at once);
- the process's anonymous resident memory after that work (collected and trimmed, as the daemon does after a
  round) less what it held before the daemon was made;
- the seconds the work took.

    python bench/sqlite_memory.py [--pairs 0 3000 20000] [--per-folder 100] [--out FILE]

Pairs are small distinct PNGs with captions, --per-folder to a folder, ingested and marked used (as if
trained on). Writes bench/results/sqlite_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchinfo import machine
from walk_memory import write_pairs

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SQLITE_DEFAULT_KIB = 2000  # SQLITE_DEFAULT_CACHE_SIZE (-2000): what a connection caches unless told otherwise


def measure(root: Path, cache_kib: int) -> dict:
    """The daemon's work on this state, in this (fresh) process, with this page cache a connection."""
    import _sqlite3
    import ctypes
    import gc
    import http.cookiejar
    import urllib.request

    from dopsd_continual import store
    from dopsd_continual.daemon import Daemon, limit_arenas, trim_heap
    from dopsd_continual.renewal import resident_mb
    from dopsd_continual.rounds import recover, round_lock

    store.CACHE_KIB = cache_kib
    highwater = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_highwater
    highwater.restype, highwater.argtypes = ctypes.c_int64, [ctypes.c_int]
    limit_arenas()  # as the daemon's main() does
    gc.collect()
    trim_heap()
    before = resident_mb()
    highwater(1)
    t = time.perf_counter()
    d = Daemon(root, install_signals=False, rounds_apart=True)
    d.cfg = dict(d.cfg, ui_port=0)
    with round_lock(d.state, wait=True):
        recover(d.state)
    observers = d._start_observers()
    d.rescan_job()
    d.rescan_job()
    d.collect_garbage()
    d.round_key()
    d.room_for_a_round()
    ui = d._start_ui()
    token = (root / "ui-token").read_text().strip()
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    for _ in range(5):
        for page in ("/", "/queue"):
            with browser.open(f"http://127.0.0.1:{ui.port}{page}?token={token}", timeout=120) as r:
                r.read()
    d._write_status(None)
    seconds = time.perf_counter() - t
    peak = highwater(0)
    gc.collect()
    trim_heap()
    row = {"cache_kib": cache_kib, "sqlite_highwater_mb": round(peak / 2**20, 2),
           "anon_growth_mb": round(resident_mb() - before, 2), "seconds": round(seconds, 2)}
    for o in observers:
        o.stop()
        o.join()
    ui.stop()
    d.state.close()
    return row


def make_state(tmp: Path, n: int, per_folder: int, rng: np.random.Generator) -> Path:
    from dopsd_continual.ingest import ingest_paths
    from dopsd_continual.store import init_state

    drop = tmp / "drop"
    write_pairs(drop, n, per_folder, rng)
    st = init_state(tmp / "state", None, [drop])
    try:
        if n:
            assert len(ingest_paths(st).queued) == n
            with st.db.conn:
                st.db.execute("update samples set status = 'used'")
    finally:
        st.close()
    return tmp / "state"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[0, 3000, 20000])
    ap.add_argument("--per-folder", type=int, default=100)
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # the child: a state to measure
    ap.add_argument("--cache-kib", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "sqlite_memory.json"))
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(Path(a.measure), a.cache_kib)))
        return
    from dopsd_continual.store import CACHE_KIB

    os.environ["DOPSD_STABILITY_SECONDS"] = "0"
    rng = np.random.default_rng(0)
    rows = []
    for n in a.pairs:
        with tempfile.TemporaryDirectory() as tmp:
            root = make_state(Path(tmp), n, a.per_folder, rng)
            row = {"pairs": n, "database_mb": round((root / "dopsd.sqlite").stat().st_size / 2**20, 2)}
            for name, kib in (("sqlite_default", SQLITE_DEFAULT_KIB), ("state_cache", CACHE_KIB)):
                out = subprocess.run([sys.executable, __file__, "--measure", str(root), "--cache-kib", str(kib)],
                                     capture_output=True, text=True, check=True, cwd=REPO / "bench")
                row[name] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    Path(a.out).write_text(json.dumps({
        "machine": machine(), "date": time.strftime("%Y-%m-%d"), "per_folder": a.per_folder, "rows": rows,
        "what": "the daemon's own work on a state of N pairs already trained on, in a fresh process: SQLite's "
                "high-water mark, the anonymous memory it left (collected and trimmed) and its seconds, with "
                "SQLite's default page cache and with the state's"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
