"""The state directory and its SQLite store (WAL, schema version, migrations) through sqlite-utils."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sqlite3
import stat
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import RoundBusy, UserError
from .files import PRIVATE_DIR, PRIVATE_FILE, atomic_write, fsync_dir, state_dir, user_file_mode  # noqa: F401 (the store's words too)
from .recipe import load_recipe, resolve_recipe_path

if TYPE_CHECKING:
    import sqlite_utils

SCHEMA_VERSION = 1
# SQLite's page cache, per connection, in KiB (SQLite's default is 2,000). A connection's cache fills with the
# pages its queries read, so with the default what the daemon's work held at once (its integrity check, rescans,
# the dashboard's pages) grew with the database: SQLite's high-water mark 4.3 MB at 20,000 pairs, 0.8 MB with
# this. The OS caches the file; the same work took no longer (bench/sqlite_memory.py).
CACHE_KIB = 256
SAMPLE_STATUSES = ("queued", "training", "used", "dropped", "set_aside")


def now() -> float:
    return time.time()


def is_disk_full(e: BaseException) -> bool:
    """A write failed for want of space: the OS's ENOSPC/EDQUOT, SQLite's SQLITE_FULL, or a library that
    wraps the OS error in its own (safetensors: "IoError(Os { code: 28, kind: StorageFull ...")."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    if isinstance(e, sqlite3.OperationalError) and "disk is full" in text:
        return True
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def disk_words(e: BaseException, fallback: Path | None = None) -> str:
    """'the disk is full: PATH (N MB free)': the file a write failed on (else `fallback`, the state) and the
    space left on its file system."""
    import shutil

    path = getattr(e, "filename", None) or ""
    probe = Path(path) if path else fallback
    while probe is not None and not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe or ".").free / 2**20
    except OSError:
        free = None
    where = path or (str(fallback) if fallback else "")
    return f"the disk is full{': ' + where if where else ''}" + (f" ({free:.0f} MB free)" if free is not None else "")


def feature_key(sha: str, caption: str) -> str:
    """The feature cache's name for a sample: its image and its caption (a new caption is a new entry)."""
    import hashlib

    return hashlib.sha256(f"{sha}\0{caption}".encode()).hexdigest()


def save_compact(tensors: dict, path: Path) -> None:
    """Safetensors where float32 tensors that bf16 holds exactly (a bf16 model's pictures and features: every
    value came from bf16) are stored as bf16, half the bytes, and named in the file's metadata; load_compact
    gives the float32 back, bit for bit. Anything else is stored as it is. Two names for one tensor (a family
    whose teacher text is its student text) are stored as two."""
    import torch
    from safetensors.torch import save_file

    out, narrowed, seen = {}, [], set()
    for k, t in tensors.items():
        t = t.contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        if t.dtype == torch.float32 and t.numel() and torch.equal(t.to(torch.bfloat16).float(), t):
            t, _ = t.to(torch.bfloat16), narrowed.append(k)
        out[k] = t
    save_file(out, str(path), metadata={"bf16_of_float32": ",".join(narrowed)})


def load_compact(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        narrowed = set(filter(None, ((f.metadata() or {}).get("bf16_of_float32") or "").split(",")))
        return {k: f.get_tensor(k).float() if k in narrowed else f.get_tensor(k) for k in f.keys()}


def pid_alive(pid: int | None) -> bool:
    """The process is there (a row left 'running' by a dead process does not count)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def round_alive(root: Path, pid: int | None) -> bool:
    """A round's row that says running belongs to a round in progress: its process lives and a round holds
    round.running (store.round_running). The pid alone is not enough: a round in the daemon's own process
    whose clean-up could not write (a full disk) leaves its row running under a live pid."""
    if not pid_alive(pid):
        return False
    try:
        fd = os.open(Path(root) / "round.running", os.O_RDONLY)
    except OSError:
        return True  # no round here has made the file: one started by an older version, alive by its pid
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a probe: held for microseconds, a round waits for it
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


@contextmanager
def flock_held(path: Path):
    """An exclusive flock on `path` (made owner-only if absent) for the block; waits for its holder."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases it, also when the process dies


def round_running(state: State):
    """Held by a round from before its row is written until its verdict or its clean-up is (round_alive)."""
    return flock_held(state.root / "round.running")


def shown_status(state: State):
    """Sample statuses as every reader shows them: 'training' with no round in progress (round_alive) is
    'queued' (its round ended before it could say so, a full disk say; the next round's recovery writes it)."""
    if any(round_alive(state.root, pid) for (pid,) in state.conn.execute("select pid from rounds where status = 'running'")):
        return lambda s: s
    return lambda s: "queued" if s == "training" else s


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


def open_db(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """The state's database. readonly: opened as immutable (a backup, a read-only mount), no migration.

    A plain connection: commands that only read (`versions list`, `queue list`, `daemon status`) never
    import sqlite-utils, which imports numpy; writes wrap the connection in sqlite-utils (State.db).
    """
    try:
        if readonly:
            if not path.is_file():
                raise UserError(f"no database at {path}")
            wal = Path(f"{path}-wal")  # committed rows may live there still: read them (immutable would not),
            base = path.resolve().as_uri()  # where SQLite may open its shared memory; else the file as it is
            uris = [f"{base}?mode=ro", f"{base}?mode=ro&immutable=1"] if wal.exists() and wal.stat().st_size else [
                f"{base}?mode=ro&immutable=1"]
            for i, uri in enumerate(uris):
                try:
                    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
                    conn.execute("select count(*) from sqlite_master").fetchone()  # a damaged file fails here
                    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
                    break
                except sqlite3.OperationalError:
                    if i == len(uris) - 1:
                        raise
            found = _schema_version(conn)
            if found != SCHEMA_VERSION:
                raise UserError(f"a read-only state must be at schema {SCHEMA_VERSION} (found {found if found else 'none'}); "
                                "open it once where it can be written")
            return conn
        path = Path(path)
        if not path.exists():  # created owner-only before SQLite opens it: its WAL and shared memory take its mode
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))
        conn = sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        migrate(conn)
        return conn
    except sqlite3.DatabaseError as e:
        code = (getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF  # FULL, IOERR, CANTOPEN: a full disk's answers;
        if not readonly and code in (13, 10, 14) and (is_disk_full(e) or _nearly_full(Path(path).parent)):  # never CORRUPT
            from .errors import DiskFull

            raise DiskFull(f"{disk_words(e, Path(path).parent)}: the state's database cannot take a write "
                           "(SQLite needs room for its journal)") from None
        raise UserError(f"{path} cannot be used as the state's database ({e}); restore it from a backup") from None


def _nearly_full(folder: Path) -> bool:
    import shutil

    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def _schema_version(conn: sqlite3.Connection) -> int:
    if conn.execute("select 1 from sqlite_master where type='table' and name='meta'").fetchone() is None:
        return 0
    row = conn.execute("select value from meta where key='schema_version'").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection) -> None:
    current = _schema_version(conn)
    if current > SCHEMA_VERSION:
        raise UserError(f"state was written by a newer dopsd (schema {current} > {SCHEMA_VERSION})")
    if current == SCHEMA_VERSION:
        return
    import sqlite_utils

    db = sqlite_utils.Database(conn)
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
    conn: sqlite3.Connection
    readonly: bool = False
    readonly_reason: str = ""  # why a writable state opened read-only (a full disk)

    @cached_property
    def db(self) -> sqlite_utils.Database:
        """The database through sqlite-utils, for writes and table helpers (imported on first use)."""
        import sqlite_utils

        return sqlite_utils.Database(self.conn)

    def rows(self, sql: str, params: list | tuple = ()) -> list[dict[str, Any]]:
        """A read as dicts on the plain connection (what the read-only commands use)."""
        cur = self.conn.execute(sql, params)
        names = [c[0] for c in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

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
        """Watched folders; a relative path in dopsd.toml is relative to the state dir."""
        return [self.root / Path(p).expanduser() for p in self.config.get("watch", [])]

    def meta(self, key: str, default: str | None = None) -> str | None:
        row = self.conn.execute("select value from meta where key=?", [key]).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        self.db["meta"].upsert({"key": key, "value": value}, pk="key")

    @property
    def active_version(self) -> str:
        return self.meta("active_version", "v0") or "v0"

    def close(self) -> None:
        self.conn.close()


SUBDIRS = ("blobs", "adapters", "cache", "reports", "logs")


def init_state(root: Path, recipe: str | Path | None = None, watch: list[Path] | None = None,
               force: bool = False) -> State:
    """Create (or update) a state dir. Re-running adds watched folders and keeps everything else.

    Moving a state whose versions were trained on one model to a recipe for another model is refused
    unless force: the versions stay on disk, but they cannot apply to the other model, so the active
    pointer goes back to v0 (the new base).
    """
    recipe_path = resolve_recipe_path(recipe).resolve()
    new_recipe = load_recipe(recipe_path)  # validate before writing anything
    for w in watch or []:
        if not Path(w).is_dir():
            raise UserError(f"watched folder does not exist or is not a folder: {w}")
    if root.exists() and _readonly(root):
        raise UserError(f"state at {root} is read-only: `dopsd init` needs to write")
    cfg_path = root / "dopsd.toml"
    cfg = _read_config(cfg_path) if cfg_path.exists() else {"watch": []}
    switch = None
    if recipe is not None and "recipe" in cfg and (root / "dopsd.sqlite").exists():
        switch = _model_switch(root, cfg, new_recipe, force)
    fresh = not root.exists()
    root.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    if fresh:
        os.chmod(root, PRIVATE_DIR)
    else:
        tighten_state(root)
    for d in SUBDIRS:
        (root / d).mkdir(exist_ok=True, mode=PRIVATE_DIR)
    if recipe is not None or "recipe" not in cfg:
        cfg["recipe"] = str(recipe_path)
    for w in watch or []:
        p = str(Path(w).resolve())
        if p not in cfg["watch"]:
            cfg["watch"].append(p)
    atomic_write(cfg_path, _dump_config(cfg).encode())
    conn = open_db(root / "dopsd.sqlite")
    if switch:  # the old model's versions stay listed, but never load onto the new model
        foreign = foreign_versions(conn)
        for (vid,) in conn.execute("select id from versions where id != 'v0'").fetchall():
            foreign.setdefault(vid, switch)
        with conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("insert or replace into meta (key, value) values (?, ?)",
                             [("foreign_versions", json.dumps(foreign)), ("active_version", "v0")])
    conn.close()
    return open_state(root)


def _model_switch(root: Path, cfg: dict[str, Any], new_recipe: dict[str, Any], force: bool) -> str | None:
    """The old model's name when the state moves to another model and has versions; refuses without force."""
    try:
        old = load_recipe(_recipe_path(root, cfg["recipe"]))["model"]
    except UserError:
        return None  # the old recipe is gone or broken: nothing to compare with
    new = new_recipe["model"]
    if (old["backend"], old["source"]) == (new["backend"], new["source"]):
        return None
    conn = open_db(root / "dopsd.sqlite")
    try:
        foreign = foreign_versions(conn)
        n = sum(1 for (v,) in conn.execute("select id from versions where id != 'v0'") if v not in foreign)
    finally:
        conn.close()
    if n == 0:
        return None
    if not force:
        raise UserError(f"this state has {n} version(s) trained on {old['name']}; they cannot apply to {new['name']}. "
                        "`dopsd init --recipe ... --force` switches the model: the versions stay on disk for "
                        f"{old['name']}, and the active version becomes v0 (the new base)")
    return old["name"]


def open_state(root: Path) -> State:
    cfg_path = root / "dopsd.toml"
    if not cfg_path.exists():
        raise UserError(f"no state at {root} (run `dopsd init` first, or pass --state DIR)")
    cfg = _read_config(cfg_path)
    recipe = with_settings(load_recipe(_recipe_path(root, cfg["recipe"])), cfg["settings"], str(cfg_path))
    readonly = _readonly(root)
    from .errors import DiskFull

    try:
        return State(root, cfg, recipe, open_db(root / "dopsd.sqlite", readonly=readonly), readonly=readonly)
    except DiskFull as e:  # a full disk: everything can still be read
        conn = open_db(root / "dopsd.sqlite", readonly=True)
        if conn.execute("pragma quick_check").fetchone()[0] != "ok":  # damage is damage, full disk or not
            conn.close()
            raise UserError(f"{root / 'dopsd.sqlite'} cannot be used as the state's database (it is damaged); "
                            "restore it from a backup") from None
        return State(root, cfg, recipe, conn, readonly=True, readonly_reason=str(e))


def readable_by_others(root: Path) -> bool:
    """The state folder lets another account in (group or other permission bits)."""
    try:
        return bool(root.stat().st_mode & 0o077)
    except OSError:
        return False


def tighten_state(root: Path) -> bool:
    """An older state (0755 / 0644) made owner-only: folders 0700, files 0600, links left alone. Returns whether
    anything changed; a state already private costs one stat."""
    if not readable_by_others(root):
        return False
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
                if stat.S_ISDIR(st.st_mode):
                    os.chmod(p, PRIVATE_DIR)
                elif stat.S_ISREG(st.st_mode):
                    os.chmod(p, PRIVATE_FILE)
            except OSError:
                continue  # a file that vanished or is not ours: the folder's 0700 still closes it
    os.chmod(root, PRIVATE_DIR)
    return True


def read_inside(root: Path, path: Path) -> bytes:
    """A regular file of the state, read without following a link and only if it lies inside root: a link
    planted in a state (one shared read-only, say) never serves another file."""
    real_root = os.path.realpath(root)
    parent = os.path.realpath(Path(path).parent)
    if os.path.commonpath([real_root, parent]) != real_root:
        raise OSError(f"{path} is outside the state")
    fd = os.open(os.path.join(parent, Path(path).name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _readonly(root: Path) -> bool:
    """This process may not write the state dir or its database (a backup, a mount, another user's state)."""
    db_path = root / "dopsd.sqlite"
    return not os.access(root, os.W_OK) or (db_path.exists() and not os.access(db_path, os.W_OK))


def foreign_versions(conn: sqlite3.Connection) -> dict[str, str]:
    """Versions trained on a model the state has since left (`init --force`): id -> that model's name."""
    row = conn.execute("select value from meta where key='foreign_versions'").fetchone()
    return json.loads(row[0]) if row else {}


def _recipe_path(root: Path, value: str) -> Path:
    """The config's recipe: an absolute path, a path relative to the state dir, or a shipped recipe's name."""
    p = Path(value).expanduser()
    if not p.is_absolute() and (root / p).exists():
        return root / p
    return resolve_recipe_path(p if p.is_absolute() else value)


CONFIG_KEYS = {"recipe": "a string (a recipe path or a shipped recipe's name)", "watch": "a list of folder paths",
               "settings": "a table of recipe keys and values (`dopsd config set`)"}
FIXED_BY_INIT = {"model.name", "model.backend", "model.source"}  # another model: `dopsd init --recipe ... --force`


def with_settings(recipe: dict[str, Any], settings: dict[str, Any], where: str, stored: bool = True) -> dict[str, Any]:
    """The recipe with the state's own settings over it ("section.key": value), validated like a recipe.
    stored=False: the settings are a change not yet written (its refusal names no file and no unset)."""
    import copy

    from .recipe import validate

    if not settings:
        return recipe
    out = copy.deepcopy(recipe)
    for dotted, value in settings.items():
        section, _, key = dotted.partition(".")
        if dotted in FIXED_BY_INIT:
            raise UserError(f"{where}: {dotted} is the model itself; `dopsd init --recipe ... --force` changes it"
                            + (f" (`dopsd config unset {dotted}` removes the setting)" if stored else ""))
        if section not in out or key not in out[section]:
            raise UserError(f"{where}: unknown setting {dotted!r} (a recipe key as section.key, e.g. daemon.quiet_seconds"
                            + (f"; `dopsd config unset {dotted}` removes it)" if stored else ")"))
        out[section][key] = value
    try:
        return validate(out, f"{where} [settings]" if stored else where)
    except UserError as e:
        raise UserError(f"{e} (`dopsd config unset KEY` goes back to the recipe's value)" if stored else str(e)) from None


def _read_config(path: Path) -> dict[str, Any]:
    """dopsd.toml, checked key by key: each problem is one line naming the key."""
    try:
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    for k in cfg:
        if k not in CONFIG_KEYS:
            raise UserError(f"{path}: unknown key {k!r} (known: {', '.join(CONFIG_KEYS)})")
    if not isinstance(cfg.get("recipe"), str) or not cfg["recipe"].strip():
        raise UserError(f"{path}: recipe must be {CONFIG_KEYS['recipe']}, got {cfg.get('recipe')!r}")
    if not isinstance(cfg.setdefault("settings", {}), dict):
        raise UserError(f"{path}: settings must be {CONFIG_KEYS['settings']}")
    flat = {}
    for k, v in cfg["settings"].items():  # "daemon.quiet_seconds" = 10, or written by hand as daemon.quiet_seconds = 10
        if isinstance(v, dict):
            flat.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flat[k] = v
    cfg["settings"] = flat
    watch = cfg.setdefault("watch", [])
    if not isinstance(watch, list) or not all(isinstance(w, str) and w.strip() for w in watch):
        raise UserError(f"{path}: watch must be {CONFIG_KEYS['watch']} (strings), got {watch!r}")
    return cfg


def _dump_config(cfg: dict[str, Any]) -> str:
    lines = ["# dopsd state configuration (written by `dopsd init`)", f"recipe = {toml_value(cfg['recipe'])}"]
    lines.append("watch = [" + ", ".join(toml_value(w) for w in cfg["watch"]) + "]")
    if cfg.get("settings"):
        lines += ["", "# the state's own settings over the recipe (`dopsd config set KEY VALUE`, `dopsd config unset KEY`)",
                  "[settings]"] + [f"{toml_value(k)} = {toml_value(v)}" for k, v in sorted(cfg["settings"].items())]
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != {k: v for k, v in cfg.items() if k != "settings" or v}:  # what is written reads back
        raise UserError("the state's configuration would not read back as written; nothing was changed")
    return text


def toml_value(v: Any) -> str:
    """A TOML literal that reads back as `v` (strings in UTF-8 with their control characters escaped)."""
    import math

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")) if not math.isfinite(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    text = str(v)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{text.encode('utf-8', 'surrogateescape')!r} is not UTF-8 text: dopsd.toml cannot hold it") from None
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def state_settings(root: Path) -> dict[str, Any]:
    """The state's own settings as written, without opening its recipe."""
    cfg_path = root / "dopsd.toml"
    if not cfg_path.exists():
        raise UserError(f"no state at {root} (run `dopsd init` first, or pass --state DIR)")
    return _read_config(cfg_path)["settings"]


def set_settings(root: Path, changes: dict[str, Any], remove: tuple[str, ...] = ()) -> dict[str, Any]:
    """Change the state's settings (validated against its recipe before anything is written); the new
    effective recipe."""
    cfg_path = root / "dopsd.toml"
    if not cfg_path.exists():
        raise UserError(f"no state at {root} (run `dopsd init` first, or pass --state DIR)")
    cfg = _read_config(cfg_path)
    settings = {k: v for k, v in {**cfg["settings"], **changes}.items() if k not in remove}
    base = load_recipe(_recipe_path(root, cfg["recipe"]))
    if changes:  # the value given, alone first: its refusal is about it, and nothing is written
        with_settings(base, changes, "refused, nothing written", stored=False)
    recipe = with_settings(base, settings, f"{cfg_path}")
    cfg["settings"] = settings
    atomic_write(cfg_path, _dump_config(cfg).encode())
    return recipe


@contextmanager
def round_lock(state: State, wait: bool = False):
    """An OS lock (flock) shared by `dopsd train` and the daemon: one round at a time per state dir."""
    path = state.root / "round.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                raise RoundBusy(f"another round is running (pid {holder or '?'}); try again when it finishes") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock, also when the process dies
