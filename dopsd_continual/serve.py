"""The daemon draws `dopsd sample`'s pictures with the model it keeps warm.

The channel is a Unix socket in the state dir (`sample.sock`; owner-only like the dir, and every peer's uid
checked against the daemon's); nothing listens on the network. Where the state dir's path is too long for a
socket name, the socket lives in $XDG_RUNTIME_DIR (or /tmp/dopsd-UID: a folder of this account's alone, or
none at all); daemon.json names it either way, and the client checks the daemon's uid as the daemon checks its.

The model itself lives in a process of the daemon's own (`Drawer`, spawned at the first picture, ended when the
daemon releases the warm model), so the daemon never imports a model library and is small again after.

One request a connection, one JSON line: {"prompt", "version", "steps", "seed", "n", "no_wait"}. The daemon
answers with JSON lines: {"waiting": "round v7, step 120/300"} while a round holds the model (never beside a
round, exactly as a dashboard render waits: rounds.render_turn), then {"png": base64, "meta": {...},
"phases": {...}, "req": the request as checked (its version filled in)} or {"error": "one line"}; with no_wait,
a round in progress is answered {"busy": ...} at once. The client writes the file itself, with the same
fields an in-process `dopsd sample` writes: the same picture, the same file. A client that gets no answer (no daemon, a daemon killed mid-request) draws in its
own process.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import socket
import socketserver
import threading
import time
from pathlib import Path

from .client import ANSWERED, _peer_uid, ask_daemon_raw  # the client's side of the socket

log = logging.getLogger("dopsd.daemon")
SOCKET_NAME = "sample.sock"
MAX_SOCKET_PATH = 100  # sockaddr_un holds 108 bytes with the terminating NUL; a margin


def socket_path(root: Path) -> Path:
    """Where the daemon of this state dir listens: in the state dir, or in the runtime dir when that path is
    too long for a socket's name."""
    path = Path(root).resolve() / SOCKET_NAME
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        return path
    run = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/dopsd-{os.getuid()}")
    return run / f"dopsd-{hashlib.sha256(os.fsencode(path)).hexdigest()[:16]}.sock"


def _own_private_dir(folder: Path) -> None:
    """The socket's folder: created owner-only, or refused unless it is a real folder of ours that no one else
    can enter (a folder in /tmp another account made first would let it stand in for the daemon)."""
    import stat

    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OSError(f"{folder} is not a folder of this account's alone: no sample socket there")


class SampleService:
    """The daemon's side: a thread that serves requests one at a time on the daemon's warm sampler."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.root = daemon.root
        self.path = socket_path(self.root)
        self.server: socketserver.ThreadingUnixStreamServer | None = None

    def start(self) -> SampleService:
        service = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                service.handle(self.connection, self.rfile, self.wfile)

        _own_private_dir(self.path.parent)
        self.path.unlink(missing_ok=True)  # a socket a killed daemon left (the daemon lock says it is ours)
        old = os.umask(0o177)
        try:
            self.server = socketserver.ThreadingUnixStreamServer(str(self.path), Handler)
        finally:
            os.umask(old)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="dopsd-sample", daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.path.unlink(missing_ok=True)

    def handle(self, conn: socket.socket, rfile, wfile) -> None:
        def send(msg: dict) -> None:
            wfile.write(json.dumps(msg).encode() + b"\n")
            wfile.flush()

        try:
            if _peer_uid(conn) != os.getuid():
                send({"error": "not this daemon's user"})
                return
            req = json.loads(rfile.readline(1 << 20) or b"{}")
            send(self.answer(req, send))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (Ctrl-C): nothing to answer
        except Exception as e:  # one line back, the whole story in the log; the daemon goes on
            log.exception("sample request failed")
            try:  # not the user's doing (out of memory, a bug): the CLI draws in its own process instead
                send({"gone": str(e).splitlines()[0] if str(e) else type(e).__name__})
            except OSError:
                pass

    def answer(self, req: dict, send) -> dict:
        from .errors import ModelBusy, UserError
        from .pictures import request, seeds_words
        from .store import open_state

        st = open_state(self.root)
        try:
            try:
                req = {**request(st, str(req.get("prompt", "")), req.get("version"), req.get("steps"),
                                 int(req.get("seed", 0)), int(req.get("n", 1))), "no_wait": bool(req.get("no_wait"))}
            except UserError as e:
                return {"error": str(e), "user": True}  # the user's to fix: the CLI says it and stops
            last = [None]

            def waiting(what: str) -> None:
                words = what if what == "another picture" else round_words(st)
                if words != last[0]:
                    last[0] = words
                    send({"waiting": words})

            t = time.monotonic()
            try:
                with self.daemon.model_turn(st, waiting, self.daemon.stop_event.is_set, req["no_wait"]) as drawer:
                    res = drawer({"kind": "sample", "req": {k: req[k] for k in ("prompt", "version", "steps", "seed", "n")}})
            except ModelBusy as e:
                return {"busy": round_words(st) if str(e).startswith(("round", "a round")) else str(e)}
            except (InterruptedError, DrawerGone) as e:
                return {"gone": str(e) or "the daemon is stopping"}
            log.info("drew for dopsd sample: %s, %d steps, %s, in %.2f s", req["version"], req["steps"],
                     seeds_words(req["seed"], req["n"]), time.monotonic() - t)  # not the prompt: what ran, not what was asked
            return {"png": base64.b64encode(res["png"]).decode(), "meta": res["meta"], "phases": res["phases"],
                    "req": {k: req[k] for k in ("prompt", "version", "steps", "seed", "n")}}
        finally:
            st.close()


class DrawerGone(Exception):
    """The drawing process ended without an answer (killed, out of memory, a crash)."""


class Drawer:
    """The daemon's drawing process: holds the warm model and draws `sampling.render` jobs sent over a pipe."""

    def __init__(self, root: Path):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of the daemon's threads or locks
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_drawer_main, args=(str(root), child), name="dopsd-drawer", daemon=True)
        self.proc.start()
        child.close()

    def alive(self) -> bool:
        return self.proc.is_alive()

    def __call__(self, job: dict) -> dict:
        from .errors import UserError

        try:
            self.conn.send(job)
            while not self.conn.poll(1.0):  # a killed process is noticed, not waited for
                if not self.proc.is_alive():
                    raise EOFError
            kind, body = self.conn.recv()
        except (EOFError, OSError):
            raise DrawerGone("the drawing process ended") from None
        if kind == "user":
            raise UserError(body)
        if kind != "ok":
            raise DrawerGone(body)
        return body

    def kill(self) -> None:
        """Ended at once (a picture in progress is answered "gone": its CLI draws it itself)."""
        self.proc.kill()
        self.proc.join(5)

    def close(self, timeout: float = 30.0) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.conn.close()


def _drawer_main(root: str, conn) -> None:
    """The drawing process: one warm model (loaded again when the recipe's [model] changes), one job at a time,
    until the daemon says stop or goes away."""
    import logging
    import signal

    from .errors import UserError
    from .logs import setup_logging
    from .placement import empty_host_cache
    from .sampling import Sampler, render
    from .store import open_state

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon's to act on: it ends this process when it goes
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    setup_logging(Path(root) / "logs", rotate=False, who="drawing")
    log = logging.getLogger("dopsd")
    sampler = None
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        st = open_state(Path(root))
        try:
            if sampler is None or sampler.recipe["model"] != st.recipe["model"]:
                sampler = None  # the old model goes before the new one loads
                empty_host_cache()
                sampler = Sampler(st, prompt_cache=True)
            sampler.state = st
            conn.send(("ok", render(st, sampler, job)))
        except UserError as e:
            conn.send(("user", str(e)))
        except Exception as e:  # the daemon's log has it; the CLI draws in its own process instead
            log.exception("drawing failed")
            conn.send(("failed", str(e).splitlines()[0] if str(e) else type(e).__name__))
        finally:
            st.close()
        try:  # after the answer (the picture does not wait for it), and after a failure too: a CLI drawing
            if sampler is not None:  # in its own process instead needs the card
                sampler.rest()
        except Exception:
            log.exception("moving the warm model off the card failed")
            sampler = None  # loaded again for the next picture


def round_words(st) -> str:
    """"round v7, step 120/300" for the round in progress (or "a round" before it has a row)."""
    from .rounds import running_round

    vid = running_round(st)
    row = st.conn.execute("select version, progress from rounds where version = ? and status = 'running'", [vid]).fetchone()
    if row is None:
        return "a round"
    steps = int(st.recipe["train"]["steps"])
    return f"round {row[0]}, step {round((row[1] or 0) * steps)}/{steps}"


def ask_daemon(root: Path, req: dict, on_wait=None, timeout: float = 5.0):
    """The daemon's picture for a request: (PIL image, meta, phases); ("busy", words) with no_wait while a
    round runs; None when no daemon answers (none running, or it went away): draw in this process then."""
    from PIL import Image

    from .errors import UserError

    msg = ANSWERED.pop() if ANSWERED else ask_daemon_raw(root, req, on_wait, timeout)
    if msg is None:
        return None
    if "busy" in msg:
        return "busy", msg["busy"]
    if msg.get("user"):
        raise UserError(str(msg.get("error", "")))
    if "png" not in msg:  # stopping, out of memory, a bug: this process draws instead
        return None
    try:
        image = Image.open(io.BytesIO(base64.b64decode(msg["png"])))
        image.load()
        return image, msg["meta"], msg["phases"]
    except (OSError, ValueError, KeyError, Image.DecompressionBombError):
        return None
