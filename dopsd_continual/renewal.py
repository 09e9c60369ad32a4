"""A daemon renewed in place: the same process (pid) runs a new image of itself (exec), so that what the old
image's allocators kept is gone, while what the outside world holds on to carries across:

- the daemon's lock (its descriptor, inherited: no second daemon can start in between);
- the dashboard's listening socket (inherited: the port is never free for another account to take, and a
  browser's connection made meanwhile waits in its backlog for the new image);
- a stop (SIGTERM/SIGINT) that arrives meanwhile: blocked in the exec-ing thread it stays pending for the new
  image's handlers; one another thread took is written by Python's C handler to a pipe the new image reads.

Each is handed over as an environment variable naming a descriptor; the new image takes it only when it is
what it should be (the same lock file, locked by this process; a listening socket on the configured address;
a pipe), so a stray variable is ignored. Linux (glibc or not); elsewhere a daemon does not renew."""
from __future__ import annotations

import os
import signal
import socket
import stat
import time
from pathlib import Path

LOCK_FD, UI_FD, STOP_FD = "DOPSD_LOCK_FD", "DOPSD_UI_FD", "DOPSD_STOP_FD"
STOPS = {signal.SIGTERM, signal.SIGINT}


def supported() -> bool:
    return os.path.isdir("/proc/self/fd") and hasattr(os, "execve") and hasattr(signal, "pthread_sigmask")


def resident_mb() -> float | None:
    """This process's resident anonymous memory (Linux: what its allocators hold, not the mapped libraries),
    or None where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon:"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def sqlite_mb() -> float | None:
    """What SQLite's allocator holds in this process (its page caches, statements and schemas), or None where
    the library does not say. Read through the module Python's sqlite3 is built on, linked in or shared."""
    try:
        import _sqlite3
        import ctypes

        used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
        used.restype = ctypes.c_int64
        held = used()
    except Exception:  # a build that does not say (no shared module, hidden symbols, another runtime)
        return None
    return held / 2**20 if held > 0 else None  # 0 with a connection open: a build that keeps no count


def code_fingerprint() -> str:
    """The installed package's files and the interpreter as they are now (names, sizes, times): a renewal
    runs the same code as the image it replaces, never an upgrade installed under it."""
    import hashlib
    import sys

    h = hashlib.sha256()
    files = [p for p in Path(__file__).parent.rglob("*") if "__pycache__" not in p.parts]
    for path in sorted(files) + [Path(sys.executable)]:
        try:
            st = path.stat()
        except OSError:
            h.update(f"{path}:gone".encode())
            continue
        if stat.S_ISREG(st.st_mode):
            h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def renewed() -> bool:
    """Whether this image is a renewal (a lock was handed to it); read before kept_lock takes the variable."""
    return os.environ.get(LOCK_FD, "").isdigit()


def _handed(name: str) -> int | None:
    value = os.environ.pop(name, "")
    return int(value) if value.isdigit() else None


def kept_lock(lock_path: Path) -> int | None:
    """The lock's descriptor handed across the exec, if it is `lock_path`'s and still locked by this process
    (flock on the same open file succeeds only for its holder); None otherwise."""
    import fcntl

    fd = _handed(LOCK_FD)
    if fd is None:
        return None
    try:
        held = os.fstat(fd)
    except OSError:
        return None
    if not stat.S_ISREG(held.st_mode):  # not a lock file: a stray variable, the descriptor not ours to close
        return None
    try:
        path = os.stat(lock_path)
        if (held.st_dev, held.st_ino) == (path.st_dev, path.st_ino):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.set_inheritable(fd, False)
            return fd
    except OSError:
        pass
    os.close(fd)  # another file, or locked by another process: not a lock to keep (nor to conflict with)
    return None


def lock_free(path: Path) -> bool:
    """Whether no process holds an flock on `path` (looked at without writing to it or keeping it)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def kept_listener(host: str, port: int) -> socket.socket | None:
    """The dashboard's listening socket handed across the exec, if it listens on host (and on port, unless the
    port is 0: any); None otherwise (then the dashboard binds anew)."""
    fd = _handed(UI_FD)
    if fd is None:
        return None
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        name = sock.getsockname()
        wanted = socket.getaddrinfo(host, None, sock.family, socket.SOCK_STREAM)[0][4][0]
        if sock.type == socket.SOCK_STREAM and listening and name[0] == wanted and (port == 0 or name[1] == port):
            sock.set_inheritable(False)
            return sock
    except OSError:
        pass
    sock.close()
    return None


def stop_arrived() -> bool:
    """Whether a stop reached the previous image while it renewed (the pipe its signal wakeup fd wrote to)."""
    fd = _handed(STOP_FD)
    if fd is None:
        return False
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):  # a stray variable: not ours to read or close
            return False
        os.set_blocking(fd, False)
        got = os.read(fd, 64)
    except OSError:
        return False
    try:
        os.close(fd)
    except OSError:
        pass
    return any(b in STOPS for b in got)


def end_resource_tracker(wait: float = 5.0) -> None:
    """multiprocessing's resource tracker (a child of this process) ends and is reaped now: after the exec
    nothing would reap it (a zombie a renewal). It ends when every holder of its pipe closed it; one that does
    not within `wait` seconds is killed."""
    try:
        from multiprocessing import resource_tracker

        tracker = resource_tracker._resource_tracker
        lock, fd, pid = tracker._lock, tracker._fd, tracker._pid
    except (ImportError, AttributeError):
        return
    if fd is None or pid is None:
        return
    with lock:
        os.close(fd)
        tracker._fd = None
        deadline = time.monotonic() + wait
        try:
            while os.waitpid(pid, os.WNOHANG) == (0, 0):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.05)
        except ChildProcessError:
            pass
        tracker._pid = None


def close_on_exec(keep: set[int]) -> None:
    """Every descriptor but `keep` and the standard three closes at the exec: one a library opened without
    close-on-exec (inotify's) would otherwise outlive its image, once a renewal. Marked, not closed: should the
    exec fail, the process stops with its files (the database's, the log) as they were."""
    for fd in map(int, os.listdir("/proc/self/fd")):
        if fd > 2 and fd not in keep:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass
