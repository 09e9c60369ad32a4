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


def setup_logging(logs: Path, foreground: bool = False, who: str | None = None) -> None:
    """The `dopsd` logger to logs/daemon.log (and the terminal in the foreground). who: a process apart from
    the daemon ("drawing"; a round's process passes "" to write as the daemon does), which follows the file."""
    logging.raiseExceptions = False  # a log line that cannot be written (a full disk) is dropped, not a traceback
    root = logging.getLogger("dopsd")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    path = logs / "daemon.log"
    try:
        logs.mkdir(exist_ok=True, mode=0o700)
        if not path.exists():  # the log names the user's files: owner-only from its first line
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        if who is None:
            fh = RotatingFileHandler(path, maxBytes=LOG_BYTES, backupCount=LOG_BACKUPS)
        else:
            fh = WatchedFileHandler(path)
    except OSError:  # a full or read-only disk: the terminal (in the foreground) is all there is
        fh = None
    if fh is not None:
        fh.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {who + ': ' if who else ''}%(message)s"))
        root.addHandler(fh)
    if foreground:
        from rich.logging import RichHandler

        root.addHandler(RichHandler(show_path=False))
