"""A small real file system for the tests and the soak that fill a disk: a tmpfs where this process may
mount one (root), and a filler that writes until the file system says no."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path


def mount_tmpfs(where: Path, mb: int) -> bool:
    """A tmpfs of `mb` MB at `where` (made 0700); False where this process may not mount one."""
    where.mkdir(parents=True, exist_ok=True)
    return os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={mb}m,mode=0700", "tmpfs", str(where)], capture_output=True).returncode == 0


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write folder/filler until the file system says no: the disk is full from here on (remove the file to
    give the room back)."""
    f = folder / "filler"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return f
