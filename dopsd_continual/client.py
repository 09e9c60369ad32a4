"""`dopsd sample` answered by a running daemon, in a light process; and the client's side of the daemon's socket.

The command's options are read here without the CLI's libraries (typer and rich take most of a cold
command's start), the request goes over the daemon's socket (ask_daemon_raw; serve.py is the daemon's side),
and the PNG file is the daemon's own lossless bytes, which are the bytes an in-process `dopsd sample` writes
(pictures.encoded of the same picture and fields; another format is encoded from that picture as the full
command encodes it). Anything else goes to the full command, with the same files and output either way:
--help, an option or a value this reader does not take, a path the full command refuses, and every answer but
a picture (no daemon, a busy or departed one, a refusal), which the full command is handed (ANSWERED) instead
of asking again: it says a refusal in its own words or draws in its own process. Imports nothing beyond the
standard library and this package's light modules (files, pictures, status) until a picture needs PIL.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import struct
import sys
from pathlib import Path

OPTIONS = {"--version": "version", "--steps": "steps", "--seed": "seed", "-n": "n", "--out": "out", "--state": "state"}
FLAGS = {"--json": "as_json", "--no-wait": "no_wait"}
RANGES = {"steps": (1, 1000), "seed": (0, None), "n": (1, 64)}  # as the full command's options allow


ANSWERED: list[dict | None] = []  # what the daemon answered a light `dopsd sample` (client.py) in this process


def ask_daemon_raw(root: Path, req: dict, on_wait=None, timeout: float = 5.0) -> dict | None:
    """The daemon's last answer to a request, as it sent it ({"png", "meta", "phases", "req"}, {"busy"},
    {"error", "user"}, {"gone"}); None when no daemon answers (none running, another account's, or it went
    away mid-request). on_wait(words) hears each "waiting" line."""
    from .status import daemon_running, read_status_file

    try:
        path = read_status_file(root).get("sample_socket") if daemon_running(root) else None
    except OSError:  # a state we cannot lock-test (read-only): no daemon to ask
        path = None
    if not path:
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
        if _peer_uid(s) != os.getuid():  # only our own daemon hears our prompts and writes our files
            return None
        s.settimeout(None)  # the picture takes what it takes; a daemon that dies closes the socket
        s.sendall(json.dumps(req).encode() + b"\n")
        f = s.makefile("rb")
        while True:
            line = f.readline()
            if not line:
                return None  # the daemon went away mid-request
            msg = json.loads(line)
            if "waiting" not in msg:
                return msg
            if on_wait:
                on_wait(msg["waiting"])
    except (OSError, ValueError):
        return None
    finally:
        s.close()


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def parse(argv: list[str]) -> dict | None:
    """`dopsd sample`'s arguments (after the word sample) as the full command reads them, or None for
    anything this reader leaves to it."""
    a = {"prompt": None, "version": None, "steps": None, "seed": 0, "n": 1, "out": None, "state": None,
         "as_json": False, "no_wait": False}
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if arg in FLAGS:
            a[FLAGS[arg]] = True
        elif name in OPTIONS and name.startswith("--") and eq:
            a[OPTIONS[name]] = value
        elif arg in OPTIONS:
            a[OPTIONS[arg]] = next(it, None)
            if a[OPTIONS[arg]] is None:
                return None
        elif arg.startswith("-") or a["prompt"] is not None:
            return None  # --help, an unknown option, a second argument, "--": the full command's to answer
        else:
            a["prompt"] = arg
    if a["prompt"] is None:
        return None
    if a["state"] == "":
        return None  # the full command reads an empty path as the current folder
    for key, (low, high) in RANGES.items():
        if a[key] is None:
            continue
        if not re.fullmatch(r"[+-]?[0-9]+", str(a[key])):  # ASCII digits only, as the full command takes them
            return None
        a[key] = int(a[key])
        if a[key] < low or (high is not None and a[key] > high):
            return None
    return a


def sample(argv: list[str]) -> bool:
    """True when the daemon drew the picture and its file and output are written; False: run the full command
    (handed what the daemon answered, when it was asked, so that it does not ask again)."""
    a = parse(argv)
    if a is None:
        return False
    try:
        return _sample(a)
    except KeyboardInterrupt:  # Ctrl-C while it waits for a round: as the full command ends it
        sys.stderr.write("\nAborted!\n")
        raise SystemExit(1) from None


def _sample(a: dict) -> bool:
    from .files import atomic_write, state_dir, user_file_mode
    from .pictures import OUTPUT_FORMATS as formats
    from .pictures import output_path, wrote_words

    try:
        root = state_dir(a["state"])
        out = Path(a["out"]) if a["out"] is not None else None
        output_path(out, "v0", 0)  # checked before the daemon is asked (the name itself waits for the version)
    except Exception:  # a state path that is a file, a name or folder refused: the full command says so
        return False
    req = {"prompt": a["prompt"], "version": a["version"], "steps": a["steps"], "seed": a["seed"], "n": a["n"],
           "no_wait": a["no_wait"]}

    def waiting(what: str) -> None:
        sys.stderr.write(f"waiting for {what}\n")
        sys.stderr.flush()

    msg = ask_daemon_raw(root, req, on_wait=waiting)
    try:
        done = msg["req"]
        path = output_path(out, done["version"], done["seed"])
        data = base64.b64decode(msg["png"], validate=True)
        if formats[path.suffix.lower()] != "PNG":  # encoded from the same picture, as the full command does
            import io

            from PIL import Image

            from .pictures import encoded

            data = encoded(Image.open(io.BytesIO(data)), formats[path.suffix.lower()], msg["meta"])
        atomic_write(path, data, mode=user_file_mode())
        res = {"path": str(path), **done, "phases": msg["phases"], "drawn_by": "daemon"}
    except Exception:  # no picture (no daemon, a busy or departed one, a refusal), or a file it could not write:
        ANSWERED.append(msg)  # the full command takes it from here and says what happened in its own words
        return False
    if a["as_json"]:
        sys.stdout.write(json.dumps(res, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(wrote_words(res) + "\n")
    return True
