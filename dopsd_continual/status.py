"""What the daemon is doing, read from the state dir alone: the lock a live daemon holds, the status file it
writes, the database's queue and rounds. Below both the daemon and the dashboard (which shows it), so that
neither imports the other."""

from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the store is imported where a status is made: the light `dopsd sample` asks only if a daemon runs
    from .store import State


def _lock_path(root: Path) -> Path:
    return root / "daemon.lock"


def daemon_running(root: Path) -> bool:
    """True if a live process holds the daemon lock (tested by trying to take it)."""
    path = _lock_path(root)
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)  # flock needs no write access: a read-only state is asked too
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def read_status_file(root: Path) -> dict:
    try:
        return json.loads((root / "daemon.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def status(state: State) -> dict:
    from .store import round_alive, shown_status

    running = daemon_running(state.root)
    info = read_status_file(state.root) if running else {}
    shown, queue = shown_status(state), {}
    for status_, n in state.conn.execute("select status, count(*) from samples group by status"):
        queue[shown(status_)] = queue.get(shown(status_), 0) + n
    rnd = None
    row = state.conn.execute("select version, progress, pid from rounds where status='running' order by id desc limit 1").fetchone()
    if row and round_alive(state.root, row[2]):  # the daemon's round, or one `dopsd train` runs, in a live process
        rnd = {"id": row[0], "progress": row[1]}
    elif info.get("starting"):  # the daemon decided on a round and loads what it needs; no version yet
        rnd = {"id": None, "progress": 0.0, "starting": info["starting"]}
    return {"running": running, "pid": info.get("pid") if running else None, "active_version": state.active_version,
            "queue": queue, "round": rnd, "next_round_at": info.get("next_round_at") if running else None,
            "heartbeat_at": info.get("heartbeat_at") if running else None, "ui": info.get("ui") if running else None,
            "held": info.get("held") if running else None, "set_aside": set_aside(state),
            "last_scan": json.loads(state.meta("last_scan") or "null")}


def set_aside(state: State) -> dict | None:
    """How many samples the gate set aside, and the reasons of the rounds that set them aside (most frequent first)."""
    rows = state.conn.execute("select history from samples where status = 'set_aside'").fetchall()
    if not rows:
        return None
    reasons: dict[str, int] = {}
    for (h,) in rows:
        last = next((e for e in reversed(json.loads(h or "[]")) if e.get("reasons")), {})
        for r in last.get("reasons", []) or ["no reason recorded"]:
            reasons[r] = reasons.get(r, 0) + 1
    return {"count": len(rows), "reasons": sorted(reasons, key=reasons.get, reverse=True)[:3],
            "hint": "`dopsd queue retry --status set_aside` brings them back"}


def local_time(iso: str) -> str:
    """An ISO time with its offset, as the user reads it: local, to the second, and how far off."""
    from datetime import datetime

    t = datetime.fromisoformat(iso).astimezone()
    left = (t - datetime.now(t.tzinfo)).total_seconds()
    ahead = (f"in {left / 3600:.1f} h" if left >= 5400 else f"in {left / 60:.0f} min" if left >= 90
             else "now" if left < 30 else f"in {left:.0f} s")
    return f"{t:%Y-%m-%d %H:%M:%S} ({ahead})"
