"""The transient memory of the daemon-side work that grows with a state's history: the peak under tracemalloc
of one call each of the versions list (as the CLI builds it, and as the dashboard's pages build it: its gate
metrics unread), the retention plan, the daemon's gc after a round, round_key and room_for_a_round, on states
of 20, 60 and 120 versions that each carry the gate metrics, reasons and report of one real round (the toy
recipe, its default gate, 10 steps). Writes bench/results/versions_list_memory.json.

    python bench/versions_list_memory.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from benchinfo import machine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_kb(fn) -> int:
    fn()  # once before: imports and caches are not the history's cost
    tracemalloc.start()
    try:
        fn()
        return round(tracemalloc.get_traced_memory()[1] / 1024)
    finally:
        tracemalloc.stop()


def main() -> None:
    from sample_latency import make_chain

    from dopsd_continual.daemon import Daemon
    from dopsd_continual.ingest import ingest_paths
    from dopsd_continual.retention import plan
    from dopsd_continual.rounds import run_round
    from dopsd_continual.stack import list_versions
    from dopsd_continual.store import init_state, open_state, set_settings
    from dopsd_continual.toy.packs import write_pack

    os.environ["DOPSD_STABILITY_SECONDS"] = "0"  # the pack was just written: take it at once
    work = Path(tempfile.mkdtemp(prefix="dopsd-versions-memory-"))
    try:
        write_pack("heart", work / "drop")
        st = init_state(work / "real", None, [work / "drop"])
        st.close()
        set_settings(work / "real", {"train.steps": 10})
        st = open_state(work / "real")
        ingest_paths(st)
        run_round(st)
        real = dict(st.db["versions"].get("v1"))
        report = {ext: (st.reports / f"v1.{ext}").read_bytes() for ext in ("json", "png")}
        st.close()
        result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "metrics_bytes_per_version":
                  len(real["metrics"]), "peak_kb": {}}
        for depth in (20, 60, 120):
            root = work / f"s{depth}"
            st = init_state(root, None, [])
            make_chain(st, depth)
            for i in range(1, depth + 1):  # each version as a gate leaves it: its metrics, reasons and report
                st.db["versions"].update(f"v{i}", {"metrics": real["metrics"], "reasons": real["reasons"]})
                for ext, data in report.items():
                    (st.reports / f"v{i}.{ext}").write_bytes(data)
            st.close()
            d = Daemon(root, install_signals=False)

            def fresh(fn, root=root):
                def call():
                    s = open_state(root)
                    try:
                        return fn(s)
                    finally:
                        s.close()
                return call

            result["peak_kb"][str(depth)] = {
                "list_versions (the CLI's)": peak_kb(fresh(list_versions)),
                "list_versions, metrics unread (the dashboard's)": peak_kb(fresh(lambda s: list_versions(s, with_metrics=False))),
                "retention.plan": peak_kb(fresh(plan)),
                "collect_garbage": peak_kb(d.collect_garbage),
                "round_key": peak_kb(d.round_key),
                "room_for_a_round": peak_kb(d.room_for_a_round),
            }
            d.state.close()
            print(depth, result["peak_kb"][str(depth)], flush=True)
        out = ROOT / "bench" / "results" / "versions_list_memory.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
