"""A fresh daemon's size after its first round (the anonymous memory it logs then, what `daemon.renew_mb` is
counted from) against the state it starts on and against the dashboard's pages.

    python bench/fresh_size.py STATE [STATE ...] [--grow N_VERSIONS N_SAMPLES] [--repeats 1] [--out FILE]

Each STATE is copied (the copy's logs, lock and status dropped) and given a new, empty watched folder; `new`
is a fresh toy state with the soak's settings. --grow adds a copy of the first STATE other than `new` with N_VERSIONS more
versions on its chain (small random deltas, each with the gate metrics, reasons and samples of its newest
version) and its samples copied N_SAMPLES/their number times over (new hashes, rows only: no originals or
features behind the copies): a synthetic history far longer than the run that made it, listed as `grown`. The daemon is the real one; one burst of 6 new pairs arrives, a round runs, and its log
line is read. Each state is measured with the dashboard open on both of the soak's pages (fetched every 2 s,
as bench/soak.py does), on the overview alone, on the queue alone, and with no page fetched. Writes
bench/results/fresh_size.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from benchinfo import machine
from soak import browse, drop_burst, soak_settings, start_daemon

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dopsd_continual.store import _dump_config, _read_config, init_state, open_state, set_settings  # noqa: E402

SOAK_SETTINGS = soak_settings(burst=6, steps=10, renew_mb=0.5)  # as the soak that made the state ran
DASHBOARD = {"both pages": ("/", "/queue"), "overview": ("/",), "queue": ("/queue",), "none": ()}


def copy_state(src: str, dst: Path, drop: Path) -> None:
    if src == "new":
        init_state(dst, None, [drop]).close()
        set_settings(dst, SOAK_SETTINGS)
        return
    shutil.copytree(src, dst, symlinks=True)
    for name in ("daemon.json", "daemon.lock", "ui-token"):
        (dst / name).unlink(missing_ok=True)
    shutil.rmtree(dst / "logs", ignore_errors=True)
    (dst / "logs").mkdir(mode=0o700)
    cfg = _read_config(dst / "dopsd.toml")
    cfg["watch"] = [str(drop)]
    (dst / "dopsd.toml").write_text(_dump_config(cfg))


def grow(src: str, dst: Path, versions: int, samples: int) -> dict:
    from sample_latency import make_chain

    shutil.copytree(src, dst, symlinks=True)
    st = open_state(dst)
    try:
        newest = dict(st.db["versions"].get(st.active_version))
        make_chain(st, versions, seed=7)
        rows = [dict(r) for r in st.db.query("select * from samples order by id")]
        with st.db.conn:
            st.db.execute("update versions set metrics = ?, reasons = ?, samples = ? where objective = 'bench'",
                          [newest["metrics"], newest["reasons"], newest["samples"]])
            top = max(r["id"] for r in rows)
            for k in range(max(0, samples // len(rows) - 1)):
                copies = [dict(r, id=top + 1 + i, sha256=secrets.token_hex(32), source_path=f"{r['source_path']}.copy{k}")
                          for i, r in enumerate(rows)]
                top += len(rows)
                st.db["samples"].insert_all(copies)
        return {"versions": st.conn.execute("select count(*) from versions").fetchone()[0],
                "samples": st.conn.execute("select count(*) from samples").fetchone()[0]}
    finally:
        st.close()


def trial(src: str, pages: tuple[str, ...], seed: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="dopsd-fresh-"))
    drop, root = tmp / "drop", tmp / "state"
    drop.mkdir()
    try:
        copy_state(src, root, drop)
        daemon = start_daemon(root, tmp / "daemon.out")
        stop, seen = threading.Event(), {}
        tab = threading.Thread(target=browse, args=(root, stop, seen, pages), daemon=True)
        tab.start()
        try:
            time.sleep(5)  # the tab open before the pairs arrive, as in the soak
            drop_burst(drop / f"fresh{seed}", 6, np.random.default_rng(10_000 + seed))  # pairs no state has seen
            size, t = None, time.time()
            while size is None and time.time() - t < 600:
                time.sleep(1)
                log = root / "logs" / "daemon.log"
                m = re.search(r"after its first round: ([\d.]+) MB", log.read_text() if log.exists() else "")
                size = float(m.group(1)) if m else None
        finally:
            stop.set()
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(120)
        return {"after_first_round_mb": size, "pages_fetched": seen.get("pages", 0), "page_errors": seen.get("errors", 0)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("states", nargs="+")
    ap.add_argument("--grow", type=int, nargs=2, metavar=("N_VERSIONS", "N_SAMPLES"))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fresh_size.json"))
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dopsd-fresh-grown-"))
    states = {s: {"path": s} for s in a.states}  # by label: a path, `new`, `grown`
    try:
        if a.grow:
            src = next((s for s in a.states if s != "new"), None)
            if src is None:
                ap.error("--grow copies a STATE other than `new`")
            states["grown"] = dict(grow(src, work / "grown", *a.grow), path=str(work / "grown"), grown_from=src)
        for s in states.values():
            if s["path"] != "new" and "versions" not in s:
                st = open_state(Path(s["path"]))
                s.update({n: st.conn.execute(f"select count(*) from {n}").fetchone()[0] for n in ("versions", "samples")})
                st.close()
        result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]),
                  "states": states, "rows": []}
        for rep in range(a.repeats):
            for name, pages in DASHBOARD.items():
                for label, s in states.items():
                    row = {"state": label, "dashboard": name, "repeat": rep, **trial(s["path"], pages, rep)}
                    result["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
