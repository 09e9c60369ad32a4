"""Files written safely, and where the state is: what both the full command line and the light `dopsd sample`
(client.py) use, so this imports nothing beyond the standard library."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError


def state_dir(explicit: str | Path | None = None) -> Path:
    root = Path(explicit or os.environ.get("DOPSD_STATE") or "state").resolve()
    if root.exists() and not root.is_dir():
        raise UserError(f"state path {root} is a file, not a state directory")
    return root


PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600  # the state is its owner's alone (docs/security.md)


def user_file_mode() -> int:
    """The mode a file the user made would have: 0666 less the umask (for what leaves the state)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """temp file + fsync + rename (+ fsync of the folder): readers see the old file or the new one. The file
    has `mode` from its first byte (owner-only unless the caller writes for the user: user_file_mode())."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")  # per writer, threads too
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        os.fchmod(fd, mode)  # a leftover temp of another mode, or a umask wider than asked, is narrowed too
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # nothing half-written stays behind
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private_dirs(path: Path) -> None:
    """path and every missing folder above it, owner-only (mkdir's mode covers only the last of them)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir(mode=PRIVATE_DIR, exist_ok=True)


def walk_files(root: Path, skip: set[str] = frozenset()) -> Iterator[os.DirEntry]:
    """Every regular file under root, links not followed, a folder at a time. What a walk holds is one folder's
    entries and the folders still to walk, not every path it has seen (Path.rglob keeps a set of those, which
    grows with the state). A folder that goes, or cannot be read, during the walk is passed over, and so is
    each folder whose real path is in skip."""
    todo = [str(root)]
    while todo:
        try:
            with os.scandir(todo.pop()) as entries:
                for e in entries:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            if not skip or os.path.realpath(e.path) not in skip:
                                todo.append(e.path)
                        elif e.is_file(follow_symlinks=False):
                            yield e
                    except OSError:
                        continue
        except OSError:
            continue
