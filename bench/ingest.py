"""Ingest 2,000 small image + caption pairs; compare with `sha256sum` over the same files, same run.

Each is timed REPEATS times (default 3; ingestion into a fresh state dir each time) and the median kept:
file-creation times on a shared VM vary run to run. Writes bench/results/ingest.json.
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

import numpy as np
from benchinfo import machine
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopsd_continual.ingest import ingest_paths  # noqa: E402
from dopsd_continual.store import init_state  # noqa: E402


def main() -> None:
    n = int(os.environ.get("N", "2000"))
    os.environ["DOPSD_STABILITY_SECONDS"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        drop = Path(tmp) / "drop"
        drop.mkdir()
        rng = np.random.default_rng(0)
        files = []
        for i in range(n):
            arr = rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)
            p = drop / f"img{i:05d}.png"
            Image.fromarray(arr).save(p)
            (drop / f"img{i:05d}.txt").write_text(f"a photo number {i}")
            files += [p, p.with_suffix(".txt")]
        size_mb = sum(f.stat().st_size for f in files) / 1e6
        os.sync()
        repeats = int(os.environ.get("REPEATS", "3"))
        hashes, ingests = [], []
        for r in range(repeats):
            t = time.perf_counter()
            subprocess.run(["sha256sum", *map(str, files)], check=True, stdout=subprocess.DEVNULL)
            hashes.append(time.perf_counter() - t)
            st = init_state(Path(tmp) / f"state{r}", None, [drop])
            t = time.perf_counter()
            rep = ingest_paths(st)
            ingests.append(time.perf_counter() - t)
            assert len(rep.queued) == n, (len(rep.queued), rep.rejected[:3])
            if r < repeats - 1:
                st.close()
        hash_s, ingest_s = statistics.median(hashes), statistics.median(ingests)
        t = time.perf_counter()
        again = ingest_paths(st)
        rescan_s = time.perf_counter() - t
        assert not again.queued
        st.close()
    out = {"machine": machine(),
           "date": time.strftime("%Y-%m-%d"), "pairs": n, "megabytes": round(size_mb, 1),
           "repeats": repeats, "sha256sum_s": hash_s, "ingest_s": ingest_s, "sha256sum_runs_s": hashes, "ingest_runs_s": ingests, "rescan_unchanged_s": rescan_s,
           "ingest_pairs_per_s": n / ingest_s, "sha256sum_pairs_per_s": n / hash_s, "ingest_vs_sha256sum": ingest_s / hash_s}
    print(json.dumps(out, indent=2))
    (Path(__file__).parent / "results" / "ingest.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
