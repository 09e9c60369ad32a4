"""The state directory and its SQLite store (WAL, schema version, migrations) through sqlite-utils."""

from __future__ import annotations

import json
import os
import sqlite3
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from .errors import UserError
from .recipe import load_recipe, resolve_recipe_path

SCHEMA_VERSION = 1
SAMPLE_STATUSES = ("queued", "training", "used", "dropped", "set_aside")


def now() -> float:
    return time.time()


def state_dir(explicit: str | Path | None = None) -> Path:
    return Path(explicit or os.environ.get("DOPSD_STATE") or "state").resolve()


def atomic_write(path: Path, data: bytes) -> None:
    """temp file + fsync + rename (+ fsync of the folder): readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _migrate_1(db: sqlite_utils.Database) -> None:
    db["meta"].create({"key": str, "value": str}, pk="key")
    db["samples"].create(
        {
            "id": int,
            "sha256": str,
            "status": str,
            "caption": str,
            "caption_sha256": str,
            "source_path": str,
            "image_blob": str,
            "caption_blob": str,
            "width": int,
            "height": int,
            "format": str,
            "rounds": str,  # JSON list of round versions that used it
            "rejections": int,  # rounds that used it and were rejected by the gate
            "history": str,  # JSON list of {"at", "event", ...}
            "created_at": float,
            "updated_at": float,
        },
        pk="id",
        not_null={"sha256", "status", "caption"},
        defaults={"rounds": "[]", "rejections": 0, "history": "[]"},
    )
    db["samples"].create_index(["sha256"], unique=True)
    db["samples"].create_index(["status"])
    # every file path seen, with its signature, so a re-scan is idempotent and cheap
    db["files"].create(
        {
            "path": str,
            "signature": str,  # size/mtime of the image and its caption
            "outcome": str,  # queued | duplicate | rejected
            "reason": str,
            "sample_id": int,
            "seen_at": float,
        },
        pk="path",
    )
    db["versions"].create(
        {
            "id": str,
            "parent": str,
            "status": str,
            "created_at": float,
            "objective": str,
            "recipe_hash": str,
            "samples": str,
            "metrics": str,
            "reasons": str,
            "adapter_dir": str,
        },
        pk="id",
    )
    db["rounds"].create(
        {
            "id": int,
            "version": str,
            "status": str,  # running | done | interrupted | failed
            "pid": int,
            "started_at": float,
            "finished_at": float,
            "progress": float,
            "samples": str,
            "message": str,
        },
        pk="id",
    )


MIGRATIONS = {1: _migrate_1}


def open_db(path: Path) -> sqlite_utils.Database:
    conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
    db = sqlite_utils.Database(conn)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=30000")
    migrate(db)
    return db


def migrate(db: sqlite_utils.Database) -> None:
    current = 0
    if "meta" in db.table_names():
        row = db.execute("select value from meta where key='schema_version'").fetchone()
        current = int(row[0]) if row else 0
    if current > SCHEMA_VERSION:
        raise UserError(f"state was written by a newer dopsd (schema {current} > {SCHEMA_VERSION})")
    for v in range(current + 1, SCHEMA_VERSION + 1):
        with db.conn:
            db.execute("BEGIN IMMEDIATE")
            MIGRATIONS[v](db)
            db["meta"].upsert({"key": "schema_version", "value": str(v)}, pk="key")
            if v == 1:
                db["versions"].insert(
                    {"id": "v0", "parent": None, "status": "accepted", "created_at": now(), "objective": None,
                     "recipe_hash": None, "samples": "[]", "metrics": "{}", "reasons": "[]", "adapter_dir": None}
                )
                db["meta"].upsert({"key": "active_version", "value": "v0"}, pk="key")


@dataclass
class State:
    """An initialised state directory: config, recipe, database and folders."""

    root: Path
    config: dict[str, Any]
    recipe: dict[str, Any]
    db: sqlite_utils.Database

    @property
    def blobs(self) -> Path:
        return self.root / "blobs"

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def watch_dirs(self) -> list[Path]:
        return [Path(p) for p in self.config.get("watch", [])]

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("select value from meta where key=?", [key]).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.db["meta"].upsert({"key": key, "value": value}, pk="key")

    @property
    def active_version(self) -> str:
        return self.meta("active_version", "v0") or "v0"

    def close(self) -> None:
        self.db.conn.close()


SUBDIRS = ("blobs", "adapters", "cache", "reports", "logs")


def init_state(root: Path, recipe: str | Path | None = None, watch: list[Path] | None = None) -> State:
    """Create (or update) a state dir. Re-running adds watched folders and keeps everything else."""
    recipe_path = resolve_recipe_path(recipe).resolve()
    load_recipe(recipe_path)  # validate before writing anything
    for w in watch or []:
        if not Path(w).is_dir():
            raise UserError(f"watched folder does not exist or is not a folder: {w}")
    root.mkdir(parents=True, exist_ok=True)
    for d in SUBDIRS:
        (root / d).mkdir(exist_ok=True)
    cfg_path = root / "dopsd.toml"
    cfg = _read_config(cfg_path) if cfg_path.exists() else {"watch": []}
    if recipe is not None or "recipe" not in cfg:
        cfg["recipe"] = str(recipe_path)
    for w in watch or []:
        p = str(Path(w).resolve())
        if p not in cfg["watch"]:
            cfg["watch"].append(p)
    atomic_write(cfg_path, _dump_config(cfg).encode())
    open_db(root / "dopsd.sqlite").conn.close()
    return open_state(root)


def open_state(root: Path) -> State:
    cfg_path = root / "dopsd.toml"
    if not cfg_path.exists():
        raise UserError(f"no state at {root} (run `dopsd init` first, or pass --state DIR)")
    cfg = _read_config(cfg_path)
    recipe = load_recipe(Path(cfg["recipe"]))
    return State(root, cfg, recipe, open_db(root / "dopsd.sqlite"))


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    if not isinstance(cfg.get("recipe"), str):
        raise UserError(f"{path}: missing key recipe")
    cfg.setdefault("watch", [])
    return cfg


def _dump_config(cfg: dict[str, Any]) -> str:
    lines = ["# dopsd state configuration (written by `dopsd init`)", f"recipe = {json.dumps(cfg['recipe'])}"]
    lines.append("watch = [" + ", ".join(json.dumps(w) for w in cfg["watch"]) + "]")
    return "\n".join(lines) + "\n"
