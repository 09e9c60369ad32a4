"""What the daemon's walks hold, against how many files there are: the peak of Python's allocations
(tracemalloc) during
- one rescan of watched folders already ingested: the daemon's (unchanged files counted) beside `dopsd
  ingest`'s report (unchanged files listed);
- one count of the state's disk use by kind, and the dashboard's disk report (that count and what gc would
  give back, every 30 s while the overview is open), beside a Path.rglob walk of the same state summing the
  same sizes (how the count walked before).

    python bench/walk_memory.py [--pairs 2000 20000] [--per-folder 100] [--out FILE]

Pairs are small distinct PNGs with captions, --per-folder to a folder (as drops arrive: a folder a burst);
the state then holds two originals a pair. Writes bench/results/walk_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from benchinfo import machine
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopsd_continual.files import walk_files  # noqa: E402
from dopsd_continual.ingest import ingest_paths  # noqa: E402
from dopsd_continual.retention import disk_report, disk_use  # noqa: E402
from dopsd_continual.store import init_state, open_state  # noqa: E402


def peak_mb(fn, *args, **kwargs) -> tuple[float, float]:
    """(peak MB of Python allocations while fn runs, seconds)."""
    tracemalloc.start()
    t = time.perf_counter()
    try:
        fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1] / 2**20, time.perf_counter() - t
    finally:
        tracemalloc.stop()


def write_pairs(drop: Path, n: int, per_folder: int, rng: np.random.Generator) -> None:
    """n small distinct PNGs with captions, per_folder to a folder (as drops arrive: a folder a burst)."""
    drop.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        folder = drop / f"burst{i // per_folder:04d}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(f"a photo number {i}")


def rglob_sizes(st) -> int:
    """The state's bytes as the walk was written before: Path.rglob, a Path a file."""
    return sum(p.stat().st_size for p in st.root.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--per-folder", type=int, default=100)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "walk_memory.json"))
    a = ap.parse_args()
    os.environ["DOPSD_STABILITY_SECONDS"] = "0"
    rng = np.random.default_rng(0)
    rows = []
    for n in a.pairs:
        with tempfile.TemporaryDirectory() as tmp:
            drop = Path(tmp) / "drop"
            write_pairs(drop, n, a.per_folder, rng)
            init_state(Path(tmp) / "state", None, [drop]).close()
            st = open_state(Path(tmp) / "state")
            try:
                first = ingest_paths(st)
                assert len(first.queued) == n, (len(first.queued), first.rejected[:3])
                row = {"pairs": n, "folders": -(-n // a.per_folder)}
                for name, listing in (("daemon_rescan", False), ("ingest_report", True)):
                    mb, s = peak_mb(ingest_paths, st, full=listing)
                    row[f"{name}_peak_mb"], row[f"{name}_s"] = round(mb, 3), round(s, 3)
                for name, fn in (("disk_use", disk_use), ("disk_report", disk_report), ("rglob_walk", rglob_sizes)):
                    mb, s = peak_mb(fn, st)
                    row[f"{name}_peak_mb"], row[f"{name}_s"] = round(mb, 3), round(s, 3)
                row["state_files"] = sum(1 for _ in walk_files(st.root))
                rows.append(row)
                print(json.dumps(row), flush=True)
            finally:
                st.close()
    out = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "per_folder": a.per_folder, "rows": rows,
           "what": "peak of Python allocations (tracemalloc) during one rescan of folders already ingested, and "
                   "during one count of the state's disk use"}
    Path(a.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
