"""What a state keeps on disk, what it can give back, and `dopsd gc`.

Kept for ever: the user's originals (blobs/), every accepted version and every version on the chain of an
accepted or the active one (rollback, export and sampling of them never break), the database, the
reports. Given back, by the recipe's [retention] table:

    rejected_days    a rejected, interrupted or corrupt candidate's delta, this many days after it was made
                     (its row, metrics and report stay; sampling, promoting or exporting it then says why not)
    gate_days        the gate's cached pictures of versions other than the active one (the next round's
                     parent), this many days after they were drawn: they are drawn again if ever needed
    quarantine_days  files a crashed round left, moved to quarantine/ by the recovery
    disk_budget_gb   when the state uses more than this (0: no budget), the day limits above are not waited for

Also given back at once: prompt and image features of every sample the next round cannot draw: dropped, set
aside, captioned anew, used but outside the active chain's replay pool (train.replay_pool, stack.replay_pool:
a fixed-size uniform subset of the history, so what the features take stays bounded), and features of another
model (after `dopsd init --force`). Features are recomputed from the originals if a sample is ever drawn again
(a retry, a rollback).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .files import walk_files
from .stack import parents, pruned_versions, replay_pool
from .store import State, feature_key, now, round_lock

DAY = 86400.0


def kind_of(rel: list[str], accepted_chain: set[str]) -> str:
    """What a file of the state is, from its path's parts inside the state."""
    top = rel[0] if rel else ""
    if top == "blobs":
        return "originals"
    if top == "adapters":
        return "versions kept" if len(rel) > 1 and rel[1] in accepted_chain else "candidates"
    if top == "cache":
        return {"features": "features", "gate": "gate pictures"}.get(rel[1] if len(rel) > 1 else "", "other caches")
    if top in ("reports", "logs", "quarantine"):
        return top
    if rel and rel[-1].startswith("dopsd.sqlite"):
        return "database"
    return "other"


def kept_versions(state: State) -> set[str]:
    """Every accepted version, the active one, and every version on their chains."""
    parent = parents(state)
    roots = {r[0] for r in state.conn.execute("select id from versions where status = 'accepted'")}
    roots.add(state.active_version)
    out: set[str] = set()
    for v in roots:
        while v in parent and v != "v0" and v not in out:  # a chain with a missing row: what can be named is kept
            out.add(v)
            v = parent.get(v)
    return out


def disk_use(state: State) -> dict[str, int]:
    """Bytes the state holds, by kind (files only; links are not followed)."""
    keep = kept_versions(state)
    use: dict[str, int] = {}
    root = str(state.root)
    for e in walk_files(state.root):  # parts from the string: a Path a file would intern its name
        try:
            k = kind_of(os.path.relpath(e.path, root).split(os.sep), keep)
            use[k] = use.get(k, 0) + e.stat(follow_symlinks=False).st_size
        except OSError:
            continue
    return dict(sorted(use.items(), key=lambda kv: -kv[1]))


def _size(path: Path) -> int:
    """Bytes of a file or a folder's files; what goes while it is counted (a round's, gc's) counts 0."""
    try:
        if path.is_file():
            return path.stat().st_size
        return sum(_entry_size(e) for e in walk_files(path))
    except OSError:
        return 0


def _entry_size(e) -> int:
    try:
        return e.stat(follow_symlinks=False).st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return time.time()  # gone, or going: not offered as old


def plan(state: State, at: float | None = None) -> list[dict]:
    """What gc would give back now: [{"path", "bytes", "kind", "why"}]. Over the budget, what the days
    would still keep goes too, oldest first, until the state is under it."""
    r = state.recipe["retention"]
    at = time.time() if at is None else at
    keep, pruned, due, later = kept_versions(state), pruned_versions(state), [], []

    def offer(when: float, days: float, item: dict) -> None:
        (due if at - float(when) >= days * DAY else later).append((float(when), item))

    for vid, status, created in state.conn.execute("select id, status, created_at from versions where id != 'v0'"):
        folder = state.adapters / vid
        if vid in keep or vid in pruned or status in ("candidate", "accepted", "corrupt") or not folder.exists():
            continue  # a corrupt one's files are the user's evidence (and it may have been accepted once)
        offer(created, r["rejected_days"], {"path": folder, "bytes": _size(folder), "kind": "candidates", "version": vid,
                                            "why": f"{status} candidate older than {r['rejected_days']} days"})
    active = state.active_version
    gate = state.cache / "gate"
    for f in sorted(gate.glob("*.safetensors")) if gate.exists() else []:
        if f.name.split("-", 1)[0] != active:
            offer(_mtime(f), r["gate_days"], {"path": f, "bytes": _size(f), "kind": "gate pictures",
                  "why": f"pictures of a version other than the active one, older than {r['gate_days']} days"})
    live = {feature_key(sha, cap) for sha, cap in state.conn.execute(
        "select sha256, caption from samples where status in ('queued', 'training')")}
    try:
        pool = replay_pool(state, state.recipe["train"]["replay_pool"])
    except Exception:  # a chain with a missing row: every used sample's features are kept
        pool = [dict(r) for r in state.db["samples"].rows_where("status = 'used'")]
    live |= {feature_key(r["sha256"], r["caption"]) for r in pool}
    feats = state.cache / "features"
    for e in sorted(walk_files(feats), key=lambda e: e.path):
        if e.name.split(".", 1)[0] not in live or e.name.endswith(".tmp"):  # a failed write's leftover too
            offer(0, 0, {"path": Path(e.path), "bytes": _entry_size(e), "kind": "features",
                         "why": "features of a sample the next round cannot draw (dropped, set aside, captioned anew, "
                                "outside the replay pool), or a leftover"})
    q = state.root / "quarantine"
    for f in sorted(q.iterdir()) if q.exists() else []:
        offer(_mtime(f), r["quarantine_days"], {"path": f, "bytes": _size(f), "kind": "quarantine",
              "why": f"left by a crashed round, older than {r['quarantine_days']} days"})
    out = [i for _, i in due]
    if r["disk_budget_gb"] > 0 and later:  # only then is the whole state walked
        over = sum(disk_use(state).values()) - sum(i["bytes"] for i in out) - r["disk_budget_gb"] * 2**30
        for _, item in sorted(later, key=lambda w: w[0]):
            if over <= 0:
                break
            out.append({**item, "why": item["why"] + f"; sooner, the state being over its {r['disk_budget_gb']} GB budget"})
            over -= item["bytes"]
    return out


def collect(state: State, items: list[dict]) -> int:
    """Remove what plan() listed; a version's delta is recorded as pruned first (its row stays). Bytes freed.
    What needs no record goes first: on a full disk that makes the room the record needs."""
    freed = _remove([i for i in items if not i.get("version")])
    versions = {i["version"]: i["why"] for i in items if i.get("version")}
    if versions:  # recorded before its delta goes, and checked again in the same transaction: a version the
        with state.conn:  # user promoted or made active since the plan is kept
            state.conn.execute("BEGIN IMMEDIATE")
            keep = kept_versions(state)
            status = dict(state.conn.execute("select id, status from versions"))
            versions = {v: w for v, w in versions.items() if v not in keep and status.get(v) not in ("accepted", "candidate", "corrupt")}
            pruned = pruned_versions(state)
            day = time.strftime("%Y-%m-%d", time.localtime(now()))
            pruned.update({v: f"removed by `dopsd gc` on {day} ({why})" for v, why in versions.items()})
            state.conn.execute("insert or replace into meta (key, value) values ('pruned_versions', ?)", [json.dumps(pruned)])
    return freed + _remove([i for i in items if i.get("version") in versions])


def _remove(items: list[dict]) -> int:
    freed = 0
    for i in items:
        p = Path(i["path"])
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
            freed += i["bytes"]
        except OSError:
            continue  # gone already, or not ours to remove: the next gc looks again
    return freed


def summary(items: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for i in items:
        k = out.setdefault(i["kind"], {"files": 0, "bytes": 0})
        k["files"] += 1
        k["bytes"] += i["bytes"]
    return out



def disk_report(state: State) -> dict:
    """What the dashboard shows: use by kind, what gc would give back now by kind, the budget, free space."""
    for attempt in range(3):  # a folder a round or gc removes during the walk: walked again
        try:
            use, items = disk_use(state), plan(state)
            break
        except OSError:
            if attempt == 2:
                raise
    try:
        free = shutil.disk_usage(state.root).free
    except OSError:
        free = None
    kinds = summary(items)
    return {"use": use, "total": sum(use.values()), "prunable": kinds,
            "prunable_total": sum(k["bytes"] for k in kinds.values()), "free": free,
            "budget_gb": state.recipe["retention"]["disk_budget_gb"]}


def gc_now(state: State) -> tuple[int, int]:
    """The policy applied now, between rounds (the round lock held, so no round's files go under it):
    (items removed, bytes freed). A round in progress: nothing now, the next call does it."""
    from .errors import RoundBusy
    try:
        with round_lock(state, wait=False):
            items = plan(state)
            return len(items), collect(state, items)
    except RoundBusy:
        return 0, 0
