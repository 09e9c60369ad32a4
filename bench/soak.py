"""The daemon for months, compressed: many rounds on the toy model, pairs arriving in bursts, the dashboard
open, a full disk injected once and cleared, a kill -9 once. Per round: the state's disk use by kind, the
daemon's resident memory, open file descriptors and threads.

    python bench/soak.py [--rounds 60] [--steps 30] [--burst 6] [--history 0] [--pairs 0] [--renew-mb MB] [--idle S]
                         [--keep DIR] [--out FILE]

--history N starts on a chain of N versions made at once, and --pairs N on N pairs already in the watched folder
(--burst to a folder), ingested and trained on (their samples marked used, no training), so that a short run
sees what months leave behind.
--idle S leaves the daemon idle S seconds after each round before the next burst: without it the next burst
lands as a round ends, and what the daemon does only when idle (renewing itself in place) never comes.

The daemon is the real one (`python -m dopsd_continual.daemon`, rounds in their own processes), on a fresh
toy state whose settings (`dopsd config set`, no file edited) shorten its waits, keep the recipe's gate and
give back at once what the retention policy allows (rejected_days = gate_days = 0), so disk use per round
should be flat. Rounds are shortened to --steps optimiser steps so that 60 fit in well under an hour on 2
cores. Where this process may mount a tmpfs (root), the state lives on one of --disk-mb, filled once before
a burst (the daemon must pause, say why, and resume when the filler goes); elsewhere that step is skipped
and the result says so. Writes bench/results/soak.json as rows come in.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from benchinfo import machine
from PIL import Image
from smalldisk import fill, mount_tmpfs, unmount

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dopsd_continual.retention import disk_use  # noqa: E402
from dopsd_continual.store import init_state, open_state, set_settings  # noqa: E402
from dopsd_continual.toy.world import random_scene, render  # noqa: E402


def proc_stats(pid: int) -> dict:
    """Resident memory (and its part in anonymous pages: the heap, as against mapped library files), open
    descriptors and threads."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    field = {ln.split(":")[0]: ln.split(":")[1].strip() for ln in status if ":" in ln}
    return {"rss_mb": int(field["VmRSS"].split()[0]) / 1024, "rss_anon_mb": int(field["RssAnon"].split()[0]) / 1024,
            "threads": int(field["Threads"]), "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def slope(rows: list[dict], key: str) -> float:
    """Least-squares growth of key per round over these rows."""
    xs, ys = np.array([r["round"] for r in rows], float), np.array([r[key] for r in rows], float)
    return float(np.polyfit(xs, ys, 1)[0]) if len(rows) > 2 else 0.0


def finished_rounds(db: Path) -> list[tuple]:
    c = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        return c.execute("select id, version, status, message from rounds where status != 'running' order by id").fetchall()
    finally:
        c.close()


def finished_rounds_by_version(db: Path) -> list[tuple]:
    return [(r[1], r[2]) for r in finished_rounds(db)]


def drop_burst(folder: Path, n: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        scene = random_scene(rng)
        Image.fromarray(render(scene)).save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(scene.caption() + "\n")


def daemon_status(state: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "dopsd_continual.cli_entry", "daemon", "status", "--json", "--state",
                        str(state)], capture_output=True, text=True, env=ENV, timeout=120)
    return json.loads(r.stdout) if r.returncode == 0 else {}


def start_daemon(state: Path, log: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "dopsd_continual.daemon", "--state", str(state)], env=ENV,
                         stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    t = time.time()
    while time.time() - t < 120 and not daemon_status(state).get("running"):
        time.sleep(0.5)
    return p


def soak_settings(burst: int, steps: int, renew_mb: float | None) -> dict:
    """The state's settings for a soak: short waits, a round per burst, the dashboard on a free port, what the
    retention policy allows given back at once; renew_mb None: the recipe's."""
    settings = {"daemon.quiet_seconds": 1, "daemon.min_new_samples": burst, "daemon.rescan_seconds": 5,
                "daemon.ui": True, "daemon.ui_port": 0, "train.steps": steps, "retention.rejected_days": 0,
                "retention.gate_days": 0}
    if renew_mb is not None:
        settings["daemon.renew_mb"] = renew_mb
    return settings


def browse(state: Path, stop: threading.Event, seen: dict, pages: tuple[str, ...] = ("/", "/queue")) -> None:
    """The dashboard open in a browser: its pages fetched every 2 s, the token once and then its cookie, as a
    tab would (a refused connection while the daemon is down, after the kill -9, is counted too)."""
    import http.cookiejar

    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    while not stop.wait(2):
        try:
            url = json.loads((state / "daemon.json").read_text()).get("ui")
        except (OSError, ValueError):
            continue
        token = (state / "ui-token").read_text().strip() if (state / "ui-token").exists() else ""
        if not url:
            continue
        for page in pages:
            try:
                with browser.open(f"{url.rstrip('/')}{page}?token={token}", timeout=30) as r:
                    seen["pages"] = seen.get("pages", 0) + (r.status == 200)
            except Exception as e:  # counted, not fatal: the soak measures the daemon
                seen["errors"] = seen.get("errors", 0) + 1
                seen["last_error"] = str(e)[:200]


def summarize(result: dict) -> None:
    """result["summary"]: the means of rounds 6-15 against the last 10 (memory, descriptors, threads, disk by kind)
    and resident memory's growth per round."""
    rows = result["rows"]
    if len(rows) >= 20:
        first, last = rows[5:15], rows[-10:]

        def mean(rs, k):
            return round(sum(r[k] for r in rs) / len(rs), 2)

        result["summary"] = {k: {"rounds_6_to_15": mean(first, k), "last_10": mean(last, k)}
                             for k in ("rss_mb", "rss_anon_mb", "fds", "threads", "disk_total_mb") if k in rows[0]}
        # resident memory's growth per round: the first daemon's rounds after its first five, in halves, and the
        # daemon restarted after the kill -9 from its own sixth round on
        killed = next((e["after_round"] for e in result["events"] if e["event"] == "kill -9"), len(rows))
        before = [r for r in rows if 5 < r["round"] <= killed]
        after = [r for r in rows if r["round"] > killed + 5]
        half = len(before) // 2
        result["summary"]["rss_mb_per_round"] = {
            f"rounds {part[0]['round']}-{part[-1]['round']}": round(slope(part, "rss_mb"), 4)
            for part in (before[:half], before[half:], after) if len(part) > 2}
        kinds = sorted({k for r in rows for k in r["disk_bytes"]})

        def mb(rs, k):
            return round(sum(r["disk_bytes"].get(k, 0) for r in rs) / len(rs) / 2**20, 2)

        result["summary"]["disk_mb_by_kind"] = {k: {"rounds_6_to_15": mb(first, k), "last_10": mb(last, k)}
                                                for k in kinds}


ENV = dict(os.environ, PYTHONPATH=str(REPO), DOPSD_STABILITY_SECONDS="0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--burst", type=int, default=6)
    ap.add_argument("--disk-mb", type=int, default=400)
    ap.add_argument("--history", type=int, default=0, help="start on a chain of this many versions")
    ap.add_argument("--pairs", type=int, default=0, help="start on this many pairs already ingested and used")
    ap.add_argument("--renew-mb", type=float, default=None, help="daemon.renew_mb (default: the recipe's)")
    ap.add_argument("--idle", type=float, default=0.0, help="seconds the daemon is left idle after each round")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "soak.json"))
    ap.add_argument("--keep", default=None, help="copy the state here at the end (for a later look)")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stopped from outside: the daemon and the mount go too
    tmp = Path(tempfile.mkdtemp(prefix="dopsd-soak-"))
    disk = tmp / "disk"
    mounted = mount_tmpfs(disk, a.disk_mb)
    state, drop = disk / "state", tmp / "drop"
    drop.mkdir()
    st = init_state(state, None, [drop])
    if a.history:  # months already behind it: a chain of versions made at once (small random deltas, no training)
        from sample_latency import make_chain

        make_chain(st, a.history)
    if a.pairs:  # months of drops already behind it: in the folder, ingested, trained on
        from dopsd_continual.ingest import ingest_paths

        rng0 = np.random.default_rng(1)
        for b in range(-(-a.pairs // a.burst)):
            drop_burst(drop / f"before{b}", min(a.burst, a.pairs - b * a.burst), rng0)
        os.environ["DOPSD_STABILITY_SECONDS"] = "0"
        ingest_paths(st)
        with st.db.conn:
            st.db.execute("update samples set status = 'used'")
    st.close()
    settings = soak_settings(a.burst, a.steps, a.renew_mb)
    set_settings(state, settings)
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rounds_asked": a.rounds, "steps": a.steps,
              "history": a.history, "pairs_before": a.pairs, "idle_s": a.idle, "renew_mb": a.renew_mb,
              "burst": a.burst, "settings": settings, "full_disk_injected": mounted, "events": [], "rows": []}

    def save() -> None:
        Path(a.out).write_text(json.dumps(result, indent=2))

    log = tmp / "daemon-stdout.log"
    daemon = start_daemon(state, log)
    stop, seen = threading.Event(), {}
    browser = threading.Thread(target=browse, args=(state, stop, seen), daemon=True)
    browser.start()
    rng = np.random.default_rng(0)
    db = state / "dopsd.sqlite"
    full_at, kill_at = a.rounds // 3, 2 * a.rounds // 3
    bursts, t0 = 0, time.time()
    try:
        while len(finished_rounds(db)) < a.rounds:
            done = len(finished_rounds(db))
            if done == full_at and mounted and not any(e["event"] == "disk full" for e in result["events"]):
                filler = fill(disk)
                drop_burst(drop / f"burst{bursts}", a.burst, rng)
                bursts += 1
                t = time.time()
                while time.time() - t < 600 and "paused" not in str(daemon_status(state).get("held") or ""):
                    time.sleep(1)
                held = daemon_status(state).get("held")
                filler.unlink()
                result["events"].append({"event": "disk full", "after_round": done, "daemon_said": held,
                                         "paused_within_s": round(time.time() - t, 1)})
                save()
            elif done == kill_at and not any(e["event"] == "kill -9" for e in result["events"]):
                drop_burst(drop / f"burst{bursts}", a.burst, rng)
                bursts += 1
                t = time.time()
                while time.time() - t < 600 and not (killed := (daemon_status(state).get("round") or {}).get("id")):
                    time.sleep(0.2)
                os.kill(daemon.pid, signal.SIGKILL)  # the round has its row: it is in progress, whatever its phase
                daemon.wait()
                daemon = start_daemon(state, log)
                result["events"].append({"event": "kill -9", "after_round": done, "killed_round": killed,
                                         "restarted": daemon_status(state).get("running")})
                save()
            else:
                drop_burst(drop / f"burst{bursts}", a.burst, rng)
                bursts += 1
            t = time.time()
            while len(finished_rounds(db)) == done and time.time() - t < 900 and daemon.poll() is None:
                time.sleep(1)
            time.sleep(a.idle)  # months have hours between rounds: what a daemon does only when idle (renewal)
            if daemon.poll() is not None:
                result["events"].append({"event": "daemon exited", "code": daemon.returncode})
                break
            st = open_state(state)
            try:
                use = disk_use(st)
            finally:
                st.close()
            rows = finished_rounds(db)
            last = rows[-1] if rows else None
            result["rows"].append({"round": len(rows), "version": last[1] if last else None,
                                   "status": last[2] if last else None, "verdict": last[3] if last else None,
                                   "seconds_since_start": round(time.time() - t0, 1), "bursts": bursts,
                                   "disk_bytes": use, "disk_total_mb": round(sum(use.values()) / 2**20, 2),
                                   **proc_stats(daemon.pid), "dashboard": dict(seen)})
            print(f"round {len(rows)}: {last[1] if last else '-'} {last[3] if last else ''} "
                  f"disk {sum(use.values()) / 2**20:.1f} MB rss {result['rows'][-1]['rss_mb']:.0f} MB "
                  f"fds {result['rows'][-1]['fds']} threads {result['rows'][-1]['threads']}", flush=True)
            save()
    finally:
        stop.set()
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=120)
        except subprocess.TimeoutExpired:
            daemon.kill()
        result["exit_code_after_sigterm"] = daemon.returncode
        result["pairs_dropped"] = bursts * a.burst
        logs = [f.read_text(errors="replace") for f in (log, state / "logs" / "daemon.log") if f.exists()]
        result["tracebacks_in_logs"] = sum(t.count("Traceback") for t in logs)
        result["renewals"] = sum(t.count("renewing in place:") for t in logs)  # daemon.renew_mb
        result["images_after_first_round"] = [  # each image's (a start's, a renewal's) size, and SQLite's part
            {"at": ln[:19], "rss_anon_mb": float(m[1]), "sqlite_mb": float(m[2]) if m[2] else None}
            for t in logs[1:] for ln in t.splitlines()
            if (m := re.search(r"after its first round: ([\d.]+) MB .*SQLite (?:([\d.]+) MB)?", ln))]
        result["traceback_excerpts"] = [t[max(0, i - 300): i + 3000] for t in logs for i in
                                        [j for j in range(len(t)) if t.startswith("Traceback", j)][:3]]
        result["round_statuses"] = dict(finished_rounds_by_version(db))
        c = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=30)
        try:
            result["samples_by_status"] = dict(c.execute("select status, count(*) from samples group by status"))
        finally:
            c.close()
        summarize(result)
        save()
        if a.keep:
            shutil.copytree(state, a.keep, symlinks=True, dirs_exist_ok=True)
        if mounted:
            unmount(disk)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
