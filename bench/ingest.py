"""Ingest 2,000 small image + caption pairs; compare with `sha256sum` over the same files, same run.

Writes bench/results/ingest.json with pairs/s for both and the ratio.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
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
        t = time.perf_counter()
        subprocess.run(["sha256sum", *map(str, files)], check=True, stdout=subprocess.DEVNULL)
        hash_s = time.perf_counter() - t
        st = init_state(Path(tmp) / "state", None, [drop])
        t = time.perf_counter()
        rep = ingest_paths(st)
        ingest_s = time.perf_counter() - t
        assert len(rep.queued) == n, (len(rep.queued), rep.rejected[:3])
        t = time.perf_counter()
        again = ingest_paths(st)
        rescan_s = time.perf_counter() - t
        assert not again.queued
        st.close()
    out = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
           "date": time.strftime("%Y-%m-%d"), "pairs": n, "megabytes": round(size_mb, 1),
           "sha256sum_s": hash_s, "ingest_s": ingest_s, "rescan_unchanged_s": rescan_s,
           "ingest_pairs_per_s": n / ingest_s, "sha256sum_pairs_per_s": n / hash_s, "ingest_vs_sha256sum": ingest_s / hash_s}
    print(json.dumps(out, indent=2))
    (Path(__file__).parent / "results" / "ingest.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
