"""The daemon's log, logs/daemon.log, written by its three kinds of process.

The daemon writes it and alone rotates it (5 MB, three old files). A round's process and the drawing process
append to the same file and follow it when the daemon rotates it: they never rotate it themselves, since two
processes rotating one file lose lines, and a process still writing to a file rotated away holds disk space
that no listing shows. Each line is whole (one write per record, appended).
"""

from __future__ import annotations

import logging
import os
from logging.handlers import RotatingFileHandler, WatchedFileHandler
from pathlib import Path

LOG_BYTES, LOG_BACKUPS = 5_000_000, 3


class _Private:
    """A log file (the first, a rotated one's successor, one reopened after a rotation) made owner-only: it
    names the user's files."""

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


class _Rotating(_Private, RotatingFileHandler):
    pass


class _Following(_Private, WatchedFileHandler):
    pass


def setup_logging(logs: Path, foreground: bool = False, rotate: bool = True, who: str = "") -> None:
    """The `dopsd` logger to logs/daemon.log (and the terminal in the foreground). The daemon rotates it; a
    process apart from it (rotate=False: a round's, the drawing one, `who` naming it in each line) follows it."""
    logging.raiseExceptions = False  # a log line that cannot be written (a full disk) is dropped, not a traceback
    root = logging.getLogger("dopsd")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    try:
        logs.mkdir(exist_ok=True, mode=0o700)
        path = logs / "daemon.log"
        fh = _Rotating(path, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS) if rotate else _Following(path)
    except OSError:  # a full or read-only disk: the terminal (in the foreground) is all there is
        fh = None
    if fh is not None:
        fh.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {who + ': ' if who else ''}%(message)s"))
        root.addHandler(fh)
    if foreground:
        from rich.logging import RichHandler

        root.addHandler(RichHandler(show_path=False))
