"""The daemon: watch folders, rescan, schedule rounds, survive crashes.

One daemon per state dir, held by an OS lock on state/daemon.lock (the kernel drops it when the process
dies, so a dead daemon's leftovers never make `status` say running). Watchdog observers and a periodic
rescan feed the same ingestion code as `dopsd ingest`; APScheduler runs the jobs (max_instances=1,
coalesce, generous misfire grace). A round runs when the schedule fires or when enough new samples have
arrived, and only after a quiet period since the last drop. SIGTERM/SIGINT stop new work, abandon a
running round at its next training step (its samples go back to the queue) and exit 0.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import gc
import json
import logging
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

from . import renewal
from .errors import ModelBusy, RoundBusy, UserError
from .logs import setup_logging
from .renewal import code_fingerprint, resident_mb
from .status import _lock_path, daemon_running, read_status_file
from .store import State, atomic_write, disk_words, is_disk_full, now, open_state, user_file_mode

log = logging.getLogger("dopsd.daemon")


STATUS_BYTES = 16384  # daemon.json is written padded to this, so that a full disk can still take the status in place
STOP_GRACE_SECONDS = 30  # a round asked to stop that has not within this is ended (inside shutdown's 60 s)
MALLOC_ARENAS = 2  # glibc's arenas for the daemon's threads (its default is 8 a core: each keeps what it once held)
TRIM_EVERY_SECONDS = 60.0  # the heartbeat hands freed memory back to the system at most this often


@functools.cache
def _glibc():
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): its allocator is left as it is
        return None
    if not hasattr(libc, "malloc_trim"):
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return libc


def limit_arenas() -> None:
    """Few malloc arenas for a long-lived process: glibc gives each thread that allocates at once an arena
    of its own, up to 8 a core, and an arena keeps its high-water mark. The daemon's threads (the scheduler's
    jobs, the dashboard's and the socket's requests) each touching a long history's rows grew a resident
    memory that crept with the history. Called before those threads start."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-8, MALLOC_ARENAS)  # M_ARENA_MAX


def trim_heap() -> None:
    """Hand freed malloc memory back to the system (free pages inside the arenas too, not only at their top)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class ChildOOM(Exception):
    """The round's own process ran out of GPU memory."""


class RoundDied(Exception):
    """The round's own process ended without an answer (killed, or it crashed)."""


class RoundFailed(Exception):
    """The round's own process hit a bug; its traceback is logged, this carries the one line."""


def _mb_words(mb: float | None) -> str:
    return "an unknown amount" if mb is None else f"{mb:.1f} MB"


def _round_apart(root: str, conn, foreground: bool = False) -> None:
    """One round in its own process, started by the daemon: the result, or what stopped it, goes back
    through `conn`. Signals are the daemon's to act on: it asks through `conn` ("stop"), and when the
    daemon itself is gone the pipe closes, which stops the round the same way."""
    import traceback

    from .errors import DoesNotFit, RoundBusy
    from .rounds import abandon_quietly, run_round

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop = threading.Event()

    def listen() -> None:
        try:
            while conn.recv() != "stop":
                pass
        except (EOFError, OSError):
            pass
        stop.set()

    def tell(answer: tuple) -> None:
        try:
            conn.send(answer)
        except OSError:  # the daemon is gone (killed): the round's row and samples already say what happened
            pass

    threading.Thread(target=listen, daemon=True, name="dopsd-round-stop").start()
    st = open_state(Path(root))
    setup_logging(st.logs, foreground, rotate=False)  # the daemon's log (and terminal, in the foreground)
    try:
        from .memory import check_fits
        from .placement import compute_device

        check_fits(st.recipe, compute_device())  # before the model loads
        tell(("ok", run_round(st, should_stop=stop.is_set), ""))
    except BaseException as e:
        oom = type(e).__name__ == "OutOfMemoryError"
        from .errors import DiskFull

        if is_disk_full(e):
            e = DiskFull(disk_words(e, Path(root)))
        kind = ("busy" if isinstance(e, RoundBusy) else "disk" if isinstance(e, DiskFull) else "fits" if isinstance(e, DoesNotFit)
                else "oom" if oom
                else "stopped" if isinstance(e, InterruptedError) else "user" if isinstance(e, UserError) else "bug")
        if kind != "busy":
            abandon_quietly(st, {"oom": "the round ran out of GPU memory", "stopped": "the daemon was stopped",
                                 "bug": "the round failed; see logs/daemon.log"}.get(kind, f"the round failed: {e}"))
        tell((kind, str(e), traceback.format_exc() if kind == "bug" else ""))
    finally:
        st.close()
        conn.close()


class Daemon:
    def __init__(self, root: Path, foreground: bool = False, on_round=None, install_signals: bool = True,
                 rounds_apart: bool = False):
        self.root = Path(root)
        self.state = open_state(self.root)
        if self.state.readonly_reason:  # it would run on a stale, read-only view: say why it cannot start
            self.state.close()
            raise UserError(f"{self.state.readonly_reason}; the daemon needs room to start")
        self.cfg = self.state.recipe["daemon"]
        # a round in its own process leaves nothing of the model in the daemon's memory; with the model kept
        # warm between rounds (keep_warm_seconds > 0) rounds run in the daemon, which holds it
        self.rounds_apart = rounds_apart and float(self.cfg["keep_warm_seconds"]) <= 0
        self.foreground = foreground
        self.stop_event = threading.Event()
        self.last_drop = 0.0
        self.rounds_started = 0
        self.on_round = on_round  # callback(result dict), used by the demo to print verdicts
        self.install_signals = install_signals
        self._lock_fd: int | None = None
        self._sampler = None
        self._sampler_used = 0.0
        self._warm_until = 0.0  # a sample request keeps the model loaded until then (daemon.sample_warm_seconds)
        self.service = None  # serve.SampleService: `dopsd sample` drawn by this daemon
        self._drawer = None  # serve.Drawer: the process that holds the warm model for pictures
        self.model_busy = threading.Lock()  # one picture at a time on the warm model (CLI samples, dashboard renders)
        self.round_lock = threading.Lock()
        self.held: dict | None = None  # {"reason", "key"}: rounds held until the queue or the recipe changes
        self.starting: str | None = None  # what a round does before it has a version (loading the model)
        self.logged_rejections: set[tuple[str, str]] = set()  # (path, reason) once per daemon, not per rescan
        self.round_pid: int | None = None  # the process of the last round run apart
        self.scan_disk_full = False
        self._beat = threading.Lock()  # one writer of daemon.json at a time (the scheduler's beat, a round, a hold)
        self._stopped = False
        self._trimmed = time.monotonic()
        self._settled_mb: float | None = None  # resident after the first round: what renew_mb is counted from
        self.renewing = False  # set by the heartbeat: run_forever stops everything and runs this daemon anew
        self._stop_asked = False  # a signal's: never cleared, it wins over any renewal
        self._renewed = False  # this image is a renewal (it adopted the lock)
        self._renewable = False  # only a daemon that owns its process (run_forever), not one inside the demo
        self._renew_refused: tuple[str, float] | None = None  # why a renewal waits, and until when (monotonic)
        self._ui_fd: int | None = None  # the dashboard's listening socket, kept open across a renewal
        self._code = code_fingerprint()  # the installed package as this image loaded it
        self._jobs_running = 0  # scheduler jobs under way: a renewal lets them end before the exec
        self._jobs_idle = threading.Condition()
        for name in ("round_job", "rescan_job", "heartbeat"):  # every job the scheduler runs, counted
            setattr(self, name, self._counted(getattr(self, name)))

    # ----------------------------------------------------------------------------------------- lifecycle
    def acquire(self) -> None:
        kept = renewal.kept_lock(_lock_path(self.root))  # renewed in place: the lock was held across the exec
        if kept is not None:
            self._lock_fd, self._renewed = kept, True
            return
        fd = os.open(_lock_path(self.root), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            info = read_status_file(self.root)
            raise UserError(f"a daemon is already running for {self.root} (pid {info.get('pid', '?')})") from None
        self._lock_fd = fd

    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        from .rounds import recover, round_lock

        if self.install_signals:  # first: a stop while it starts ends it as any stop does (run_forever's)
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
            if renewal.stop_arrived():  # a stop that reached another thread of the image before
                self._stop_asked = True
                self.stop_event.set()
            # held pending across a renewal's exec: delivered now, to the handlers above. No thread exists yet,
            # so none (nor any child process) starts with these blocked
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})
        self.acquire()
        setup_logging(self.state.logs, self.foreground)
        if self._stop_asked:
            log.info("a stop arrived while the daemon renewed itself: stopping")
        from .store import tighten_state

        if tighten_state(self.root):
            log.info("%s was readable by other accounts; it is now owner-only (folders 0700, files 0600)", self.root)
        try:
            with round_lock(self.state, wait=not self._renewed):  # renewed: no round of its own was cut short
                interrupted = recover(self.state)
        except RoundBusy:  # a `dopsd train` that started as it renewed: its own clean-up is its own
            interrupted = []
        if interrupted:
            log.info("recovered interrupted rounds: %s", ", ".join(interrupted))
        self.service = self._start_service()  # before the first heartbeat names its socket
        self.scheduler = BackgroundScheduler(job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": 3600})
        cron = self.cfg["cron"]
        trigger = CronTrigger.from_crontab(cron) if cron else IntervalTrigger(seconds=float(self.cfg["interval_minutes"]) * 60)
        self.scheduler.add_job(self.round_job, trigger, id="round", kwargs={"reason": "schedule"})
        self.scheduler.add_job(self.rescan_job, IntervalTrigger(seconds=float(self.cfg["rescan_seconds"])), id="rescan",
                               next_run_time=datetime.now())
        self.scheduler.add_job(self.heartbeat, IntervalTrigger(seconds=2), id="heartbeat", next_run_time=datetime.now())
        self.scheduler.start()
        self.observers = self._start_observers()
        self.ui = self._start_ui() if self.cfg["ui"] else None
        log.info("daemon started (pid %d), watching %d folder(s)", os.getpid(), len(self.state.watch_dirs))

    def _start_ui(self):
        """The dashboard in this process (`[daemon] ui = true`), with DOPSD_UI_TOKEN or a made-up token written to
        <state>/ui-token, owner-only from its creation; `dopsd daemon status` prints the address with it."""
        from .web.server import Server, token_for, url

        host, port = self.cfg["ui_host"], int(self.cfg["ui_port"])
        saved = self.root / "ui-token"
        if self._renewed and saved.is_file() and not os.environ.get("DOPSD_UI_TOKEN"):  # renewed: an open tab stays in
            token = saved.read_text().strip()
        else:
            token = token_for(host, os.environ.get("DOPSD_UI_TOKEN"))
            atomic_write(saved, token.encode())  # 0600 from the first byte
        kept = renewal.kept_listener(host, port) if self._renewed else None  # the port was never free meanwhile
        try:
            ui = Server(self.root, host, port, token, warm=self, sock=kept).start()  # renders share the warm model
        except UserError as e:
            if kept is not None:
                kept.close()
            log.error("dashboard not started: %s", e)
            return None
        log.info("dashboard at %s (its token: ui-token, or `dopsd daemon status`)", url(host, ui.port))
        return ui

    def _start_service(self):
        from .serve import SampleService

        try:
            return SampleService(self).start()
        except OSError as e:  # `dopsd sample` then draws in its own process, as without a daemon
            log.error("sample service not started: %s", e)
            return None

    def _ui_url(self) -> str | None:
        """The dashboard's address without its token (daemon.json is no place for it); None without one."""
        if getattr(self, "ui", None) is None:  # the first heartbeat runs before the dashboard starts
            return None
        from .web.server import url

        return url(self.ui.host, self.ui.port)

    def _on_signal(self, signum, frame) -> None:
        log.info("signal %d: stopping", signum)
        self._stop_asked = True  # wins over a renewal under way
        self.stop_event.set()

    def run_forever(self) -> None:
        limit_arenas()  # a process that lives for months: before its threads start
        self._renewable = renewal.supported()
        self.start()
        try:
            while not self.stop_event.wait(0.5):
                pass
        finally:
            kept = self.shutdown()
        if kept:
            self.renew()

    def renew(self) -> None:
        """This daemon anew in the same process (exec, renewal.py): the same pid (a service manager sees no
        change), the lock and the dashboard's socket held throughout, the dashboard's token kept; everything the
        old image's allocators kept is gone. Its rounds, pictures and jobs had ended (shutdown waited). A stop
        is never lost: SIGTERM/SIGINT are blocked in this thread before the exec (pending, they reach the new
        image's handlers), and one another thread took meanwhile goes through the signal wakeup fd's pipe."""
        renewal.end_resource_tracker()  # before the signals are blocked: a stop meanwhile is handled here
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        signal.pthread_sigmask(signal.SIG_BLOCK, renewal.STOPS)
        handed = [fd for fd in (self._lock_fd, self._ui_fd, r) if fd is not None]

        def stop_here() -> None:  # as a stop ends: the lock, the socket and the status go
            signal.set_wakeup_fd(-1)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, renewal.STOPS)
            (self.root / "daemon.json").unlink(missing_ok=True)
            for fd in handed + [w]:
                os.close(fd)
            self._lock_fd = self._ui_fd = None
            log.info("daemon stopped")

        if self._stop_asked:  # one came at the last moment (the handler ran when the block began): it stops
            return stop_here()
        for fd in handed:
            os.set_inheritable(fd, True)
        renewal.close_on_exec(set(handed) | {w})
        env = dict(os.environ, **{renewal.LOCK_FD: str(self._lock_fd), renewal.STOP_FD: str(r)})
        if self._ui_fd is not None:
            env[renewal.UI_FD] = str(self._ui_fd)
        args = [sys.executable, "-m", "dopsd_continual.daemon", "--state", str(self.root)]
        logging.shutdown()  # every line written before the image goes
        try:
            os.execve(sys.executable, args + (["--foreground"] if self.foreground else []), env)
        except OSError as e:  # the interpreter went since the check: stop as a stop would, and say why
            log.error("the daemon could not renew itself (%s: %s)", sys.executable, e.strerror or e)
            stop_here()
            raise UserError(f"the daemon could not renew itself ({sys.executable}: {e.strerror or e}); "
                            "`dopsd daemon start` starts it again") from None

    def shutdown(self, timeout: float = 60.0) -> bool:
        """Everything stops: the dashboard, the socket, the watchers, the scheduler; a picture or a round in
        progress has a moment to end. True when it stopped for a renewal and no stop came meanwhile: then the
        lock, the dashboard's socket and daemon.json are kept for the new image (run_forever's renew)."""
        self.stop_event.set()
        renewing = self.renewing  # the heartbeat that decided it holds the model and round locks: none to wait for
        if renewing and getattr(self, "ui", None):
            try:
                self._ui_fd = os.dup(self.ui.sock.fileno())  # the port stays taken, for the new image
            except OSError:  # its thread ended and closed it: the new image binds anew
                self._ui_fd = None
        if getattr(self, "ui", None):
            self.ui.stop()
        if self.service is not None:
            self.service.stop()
        if renewing:
            pass  # no picture runs and no model is warm (the heartbeat checked, under the locks it keeps)
        elif self.model_busy.acquire(timeout=10):  # a picture in progress has a moment to end
            try:
                self.release_drawer()
            finally:
                self.model_busy.release()
        elif self._drawer is not None:  # a long one is not waited for: its CLI draws it itself
            self._drawer.kill()
        for o in getattr(self, "observers", []):
            o.stop()
        if hasattr(self, "scheduler"):
            self.scheduler.shutdown(wait=False)  # (waiting inside it would hold the lock the jobs' get_job needs)
        with self._jobs_idle:  # renewed, a scan under way ends first (the exec would cut it); a stop does not wait
            while renewing and self._jobs_running and not self._stop_asked:
                self._jobs_idle.wait(0.5)
        t = time.time()
        while not renewing and self.round_lock.locked() and time.time() - t < timeout:  # abandoned at its next step
            time.sleep(0.1)
        for o in getattr(self, "observers", []):
            o.join(timeout=5)
        with self._beat:
            self._stopped = True  # no heartbeat after this brings daemon.json back
            keep = renewing and not self._stop_asked  # (a stop after this is renew's to honour)
            if not keep:  # renewed, the next image rewrites it
                (self.root / "daemon.json").unlink(missing_ok=True)
        if keep:
            log.info("daemon stopped; renewing in place")
            return True
        for fd in (self._lock_fd, self._ui_fd):
            if fd is not None:
                os.close(fd)
        self._lock_fd = self._ui_fd = None
        log.info("daemon stopped")
        return False

    def _counted(self, job):
        """A scheduler job that shutdown can wait for (a renewal lets the jobs under way end)."""
        @functools.wraps(job)
        def run(*args, **kwargs):
            with self._jobs_idle:
                self._jobs_running += 1
            try:
                return job(*args, **kwargs)
            finally:
                with self._jobs_idle:
                    self._jobs_running -= 1
                    self._jobs_idle.notify_all()
        return run

    # -------------------------------------------------------------------------------------------- watch
    def _start_observers(self):
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        daemon = self

        class Dropped(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.is_directory or event.event_type in ("opened", "closed_no_write"):
                    return
                daemon.file_event()

        observers = []
        for folder in self.state.watch_dirs:
            if not folder.is_dir():
                log.warning("watched folder %s is missing; the rescan will pick it up when it is back", folder)
                continue
            o = PollingObserver(timeout=1) if self.cfg["polling"] else Observer()
            o.schedule(Dropped(), str(folder), recursive=True)
            o.start()
            observers.append(o)
        return observers

    def file_event(self) -> None:
        """Debounce: an ingest runs once files have been quiet for the stability period."""
        from .ingest import stability_seconds

        self.last_drop = time.time()
        if self.stop_event.is_set():
            return
        delay = stability_seconds(self.state) + 0.5
        self.scheduler.add_job(self.rescan_job, "date", run_date=datetime.now() + timedelta(seconds=delay),
                               id="ingest-soon", replace_existing=True)

    # --------------------------------------------------------------------------------------------- jobs
    def rescan_job(self) -> None:
        from .errors import DiskFull
        from .ingest import ingest_paths

        if self.stop_event.is_set():
            return
        try:
            st = open_state(self.root)
            try:
                if st.readonly_reason:  # a full disk: the state opened for reading only
                    raise DiskFull(st.readonly_reason)
                rep = ingest_paths(st, full=False)  # counted: what it holds follows what changed
            finally:
                st.close()
        except DiskFull as e:
            self.pause_scans(str(e))
            return
        except UserError as e:  # a problem the user can fix (a bad setting): one line, and the next scan tries again
            log.error("scan: %s", e)
            return
        except Exception as e:  # anything else is a bug, logged whole; it never stops the daemon
            if is_disk_full(e):  # said once; the next scan that can write takes the files
                self.pause_scans(disk_words(e, self.root))
                return
            log.exception("ingest failed")
            return
        if self.scan_disk_full:
            log.info("scan: there is room again")
            self.scan_disk_full = False
            if self.held is not None and self.held["key"] == "disk":
                self.held = None  # the next round looks at the room itself
        news = [r for r in rep.rejected if (r["path"], r["reason"]) not in self.logged_rejections]
        if rep.queued or news or rep.updated:  # what is new since the last scan, once
            log.info("ingest: %d queued, %d duplicates, %d rejected, %d pending", len(rep.queued), len(rep.duplicates),
                     len(news), len(rep.pending))
            for r in news:
                log.info("rejected %s: %s", r["path"], r["reason"])
                self.logged_rejections.add((r["path"], r["reason"]))
        if rep.queued:
            self.last_drop = time.time()
        if rep.pending:
            self.file_event()
        self.maybe_trigger_round()

    def queued_count(self) -> int:
        return self.state.conn.execute("select count(*) from samples where status='queued'").fetchone()[0]

    def maybe_trigger_round(self) -> None:
        """The sample threshold: enough new samples and a quiet period since the last drop."""
        if self.queued_count() >= int(self.cfg["min_new_samples"]):
            quiet = float(self.cfg["quiet_seconds"]) - (time.time() - self.last_drop)
            run_at = datetime.now() + timedelta(seconds=max(0.0, quiet))
            self.scheduler.add_job(self.round_job, "date", run_date=run_at, id="round-threshold",
                                   replace_existing=True, kwargs={"reason": "threshold"})

    def pause_scans(self, why: str) -> None:
        """A scan that found the disk full: said once (daemon status, the log) until a scan can write again."""
        if not self.scan_disk_full:
            self.hold("disk", f"paused: {why}. New files stay where they are; they are taken, and rounds resume, by "
                      "themselves when there is room (`dopsd gc` shows what the state can give back)")
        self.scan_disk_full = True

    def pause_rounds(self, why: str) -> None:
        """No room for a round: said once (daemon status, the dashboard, the log); room_for_a_round ends it."""
        self.hold("disk", f"rounds paused: {why}. They resume by themselves when there is room (`dopsd gc` shows "
                  "what the state can give back)")

    def room_for_a_round(self) -> bool:
        """False while the state's disk has less room than the last round said it needs (rounds paused,
        daemon status says so); the pause ends by itself when the room is there."""
        import shutil

        try:
            need = int(self.state.meta("disk_need_bytes") or 0)
            free = shutil.disk_usage(self.root).free
        except (OSError, ValueError):
            return True
        if free < need:
            self.pause_rounds(f"{self.root} has {free / 2**20:.0f} MB free, a round needs about {need / 2**20:.0f} MB")
            return False
        if self.held is not None and self.held["key"] == "disk":
            log.info("there is room again (%.0f MB free): rounds resume", free / 2**20)
            self.held = None
        return True

    def round_job(self, reason: str = "schedule") -> dict | None:
        from .errors import DiskFull, DoesNotFit, RoundBusy

        if self.stop_event.is_set() or not self.round_lock.acquire(blocking=False):
            return None
        try:
            if self.queued_count() < (1 if reason == "schedule" else int(self.cfg["min_new_samples"])):
                return None
            if time.time() - self.last_drop < float(self.cfg["quiet_seconds"]):
                self.maybe_trigger_round()  # try again after the quiet period
                return None
            key = self.round_key()
            if not self.room_for_a_round():
                return None
            if self.held is not None and self.held["key"] == key:
                return None  # the same round, unchanged, would fail the same way: held (daemon status says why)
            self.held = None
            self.rounds_started += 1
            log.info("round starting (%s): %d queued sample(s)", reason, self.queued_count())
            self.set_starting("loading the model")
            st = open_state(self.root)
            if st.readonly_reason:  # a full disk: no round can write
                st.close()
                self.set_starting(None)
                self.pause_rounds(st.readonly_reason)
                return None
            with self.model_busy:  # a picture in progress finishes first; later ones wait for the round's end
                self._warm_until = 0.0
                self.release_drawer()  # the round loads its model: the one kept warm for pictures goes first
            try:
                result = self.round_apart() if self.rounds_apart else self.round_here(st)
            except RoundBusy as e:
                log.info("%s", e)
                return None
            except DiskFull as e:
                self.pause_rounds(str(e))
                return None
            except DoesNotFit as e:
                self.hold(key, f"rounds held: {e}")
                return None
            except (torch_oom(), ChildOOM) as e:
                from .rounds import abandon_running

                abandon_running(st, "the round ran out of GPU memory")
                self.hold(key, "rounds held: the last round ran out of GPU memory "
                          f"({str(e).splitlines()[0][:160]}); a new drop, a recipe change or `dopsd train` tries again")
                return None
            except InterruptedError:
                from .rounds import abandon_running

                abandon_running(st, "the daemon was stopped")
                log.info("round abandoned: the daemon is stopping")
                return None
            except UserError as e:  # something the user must fix (no weights, a bad recipe, no GPU): once
                from .rounds import abandon_running

                abandon_running(st, f"the round failed: {e}")
                self.hold(key, f"rounds held: {e}. Fix it, then `dopsd daemon retry` (a new drop or a recipe "
                          "change retries too)")
                return None
            except RoundDied as e:
                from .rounds import abandon_running

                abandon_running(st, str(e), pid=self.round_pid)  # interrupted, its samples queued again
                self.hold(key, f"rounds held: {e}. `dopsd daemon retry` tries again")
                return None
            except Exception as e:
                if is_disk_full(e):  # a write failed on the way: the same pause, the round's samples queued again
                    from .rounds import abandon_quietly

                    abandon_quietly(st, "the disk is full")
                    self.pause_rounds(disk_words(e, self.root))
                    return None
                if not isinstance(e, RoundFailed):
                    log.exception("round failed")  # a bug: the whole traceback, once
                from .rounds import abandon_running

                abandon_running(st, "the round failed; see logs/daemon.log")
                self.hold(key, f"rounds held: the last round failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}; "
                          "logs/daemon.log has the details). `dopsd daemon retry` tries again")
                return None
            finally:
                st.close()
                if self.starting:
                    self.set_starting(None)
            log.info("round %s %s%s", result["version"], result["verdict"],
                     "" if not result["reasons"] else ": " + "; ".join(result["reasons"]))
            self.collect_garbage()
            self.trim()  # what the round's bookkeeping here freed (its training ran in a process of its own)
            if self._settled_mb is None and self._sampler is None:  # (with keep_warm_seconds > 0: never renews)
                self._settled_mb = resident_mb()  # just trimmed, warm: its libraries loaded, its threads started
                if self._settled_mb is not None:
                    log.info("after its first round: %.1f MB resident (anonymous), of which SQLite %s", self._settled_mb,
                             _mb_words(renewal.sqlite_mb()))
            if self.on_round:
                self.on_round(result)
            return result
        finally:
            self._sampler_used = time.time()
            if float(self.cfg["keep_warm_seconds"]) <= 0:
                self.release_model()
            elif self._sampler is not None:
                self._sampler.place.park()  # kept loaded in CPU memory; the GPU holds nothing between rounds
            self.round_lock.release()

    def round_key(self) -> str:
        """What the next round would be: its queued samples and the recipe (a held round waits for a change)."""
        from .recipe import recipe_hash

        st = open_state(self.root)  # the recipe as it is now (a user may have edited it)
        try:
            ids = [r[0] for r in st.conn.execute("select id from samples where status='queued' order by id")]
            return json.dumps([ids, recipe_hash(st.recipe), st.meta("retry_requested")])  # `dopsd daemon retry`
        finally:
            st.close()

    def hold(self, key: str, reason: str) -> None:
        if self.held is None or self.held["reason"] != reason:
            log.warning("%s", reason)  # once, not at every trigger
        self.held = {"key": key, "reason": reason}
        if getattr(self, "scheduler", None) is not None:
            self.heartbeat()  # `daemon status` and the dashboard say it now, not at the next beat

    def collect_garbage(self) -> None:
        """The retention policy after a round (recipe [retention]; `dopsd gc` shows the same list)."""
        from .retention import gc_now

        try:
            st = open_state(self.root)
            try:
                if st.recipe["retention"]["after_each_round"]:
                    n, freed = gc_now(st)
                    if n:
                        log.info("gc: %d item(s), %.1f MB given back (recipe [retention])", n, freed / 2**20)
            finally:
                st.close()
        except Exception as e:  # never the round's verdict's concern
            if is_disk_full(e):
                log.warning("gc after the round could not finish: %s", disk_words(e, self.root))
            else:
                log.exception("gc after the round failed")

    def round_here(self, st: State) -> dict:
        """The round in this process, on the model the daemon holds (loaded now if it is not)."""
        from .memory import check_fits
        from .placement import compute_device
        from .rounds import run_round

        check_fits(st.recipe, compute_device())  # before the model loads
        sampler = self.sampler(st)
        self.set_starting(None)  # from here the round's own row says where it is
        return run_round(st, sampler=sampler, should_stop=self.stop_event.is_set)

    def round_apart(self) -> dict:
        """The round in a process of its own (spawned: nothing of this one is copied into it); the daemon
        waits for its answer and passes a stop on. What failed comes back as the exception round_here
        would have raised."""
        import multiprocessing as mp

        from .errors import DiskFull, DoesNotFit, RoundBusy

        ctx = mp.get_context("spawn")
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_round_apart, args=(str(self.root), there, self.foreground),
                           name="dopsd-round")
        proc.start()
        there.close()
        answer, asked = None, None
        try:
            while answer is None:
                if here.poll(0.5):
                    answer = here.recv()
                elif not proc.is_alive() and not here.poll(0):
                    break
                if self.stop_event.is_set() and asked is None:
                    here.send("stop")  # it stops at its next training step
                    asked = time.time()
                if asked is not None and time.time() - asked > STOP_GRACE_SECONDS:
                    log.info("the round did not stop within %d s (loading, or its gate): ended", STOP_GRACE_SECONDS)
                    proc.kill()  # its round is recovered like a crash: interrupted, samples queued again
        except (EOFError, OSError):
            pass
        finally:
            proc.join(timeout=30)
            if proc.is_alive():  # answered but hangs on its way out: it must not keep memory the next round needs
                proc.kill()
                proc.join(timeout=30)
            here.close()
        self.round_pid = proc.pid
        if answer is None:
            code = proc.exitcode
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
            raise RoundDied(f"the round's process ended without a result ({how}"
                            + ("; the kernel ends a process that runs the machine out of memory this way" if code == -9 else "")
                            + ")")
        kind, payload, trace = answer
        if kind == "ok":
            return payload
        if kind == "bug":
            log.error("round failed in its process:\n%s", trace.rstrip())
        raise {"busy": RoundBusy, "disk": DiskFull, "fits": DoesNotFit, "oom": ChildOOM, "stopped": InterruptedError, "user": UserError,
               "bug": RoundFailed}[kind](payload)

    def sampler(self, st: State):
        from .sampling import Sampler

        if self._sampler is not None and self._sampler.recipe["model"] != st.recipe["model"]:
            self.release_model()  # `dopsd config set model.…` or `init --force`: the model drawn with is the recipe's
        if self._sampler is None:
            self._sampler = Sampler(st)
        self._sampler.state = st
        return self._sampler

    @contextmanager
    def model_turn(self, st: State, on_wait=None, stop=None, no_wait: bool = False):
        """The warm model for one picture (a `dopsd sample` request, a dashboard render): never beside a round of
        this daemon (from the moment it decides on one to its end) nor of another process, nor beside another
        picture. on_wait(what) says what it waits for; with no_wait a wait raises ModelBusy at once. The model
        is loaded if none is (with prompt features on disk) and kept daemon.sample_warm_seconds after. What it
        gives is a serve.Drawer: the model lives in a process of its own, never in the daemon's."""
        from .rounds import render_turn
        from .serve import Drawer

        while True:
            if stop is not None and stop():
                raise InterruptedError("the daemon is stopping")
            if self.model_busy.acquire(timeout=0.5):
                try:
                    if not self.round_lock.locked():
                        with render_turn(st, on_wait=None if no_wait else on_wait, stop=stop, busy=no_wait):
                            self._warm_until = time.time() + float(self.cfg["sample_warm_seconds"])
                            if not self.rounds_apart:  # rounds run here on a warm model: pictures share it
                                from .sampling import render

                                sampler = self.sampler(st)
                                try:
                                    yield functools.partial(render, st, sampler)
                                finally:
                                    sampler.rest()  # as the drawing process does between pictures
                                return
                            if self._drawer is None or not self._drawer.alive():
                                self._drawer = Drawer(self.root)
                            yield self._drawer
                        return
                finally:
                    self.model_busy.release()
                what = "a round"
            else:
                what = "another picture"
            if no_wait:
                raise ModelBusy(what)
            if on_wait:
                on_wait(what)
            time.sleep(0.5)

    def release_drawer(self) -> None:
        """The warm model for pictures goes (its process ends)."""
        if self._drawer is not None:
            drawer, self._drawer = self._drawer, None
            drawer.close()

    def release_model(self) -> None:
        """The model the daemon's own rounds use (keep_warm_seconds > 0) goes; the drawing process is apart."""
        if self._sampler is not None:
            self._sampler = None
            self.trim()  # glibc keeps freed model memory in its arenas: handed back, an idle daemon is small again
            try:
                import torch

                if torch.cuda.is_available():
                    from .placement import empty_host_cache

                    torch.cuda.empty_cache()
                    empty_host_cache()  # the CPU copies' pinned slabs
            except Exception:
                pass

    def trim(self, collect: bool = True) -> None:
        """What the daemon's work freed goes back to the system: after a round and when a model goes (the
        heartbeat, once a minute while nothing runs, hands back what pages and scans freed, without a collection)."""
        if collect:
            gc.collect()
        trim_heap()
        self._trimmed = time.monotonic()

    def set_starting(self, what: str | None) -> None:
        """What a round about to start is doing before it has a version (daemon status shows it)."""
        self.starting = what
        if getattr(self, "scheduler", None) is not None:
            self.heartbeat()

    def heartbeat(self) -> None:
        warm = self._sampler is not None or self._drawer is not None
        if warm and not self.round_lock.locked() and self.model_busy.acquire(blocking=False):
            try:  # never under a picture in progress
                if time.time() > max(self._sampler_used + float(self.cfg["keep_warm_seconds"]), self._warm_until):
                    self.release_drawer()
                    self.release_model()
            finally:
                self.model_busy.release()
        times = [j.next_run_time for j in map(self.scheduler.get_job, ("round", "round-threshold")) if j and j.next_run_time]
        nxt = min(times).isoformat(timespec="seconds") if times else None
        with self._beat:
            if not self._stopped:
                try:
                    self._write_status(nxt)
                except OSError:  # a full disk: the last status stays; the pause is in the log and the next beat
                    pass
        idle = not self.round_lock.locked() and not self.model_busy.locked()
        if idle and not self.stop_event.is_set():
            if time.monotonic() - self._trimmed > TRIM_EVERY_SECONDS:
                self.trim(collect=False)  # what the pages and the scans freed; never under a round or a picture
            self.maybe_renew()

    def maybe_renew(self) -> None:
        """daemon.renew_mb: grown that far past its size after its first round (anonymous memory, just trimmed),
        with nothing under way or waiting (no round here or from the CLI, no picture, warm model, held round,
        drop in its quiet period, pending scan), and able to start again as it is (the same installed code and
        [daemon] settings, a writable state), the daemon renews itself in place (run_forever's renew)."""
        renew_mb = float(self.cfg["renew_mb"])
        if not self._renewable or renew_mb <= 0 or self._settled_mb is None or self.renewing:
            return
        if not self._nothing_under_way():
            return
        now_mb = resident_mb()
        if now_mb is None or now_mb <= self._settled_mb + renew_mb:
            return
        waiting = any(self.scheduler.get_job(j) for j in ("ingest-soon", "round-threshold"))
        if waiting or self.queued_count() or time.time() - self.last_drop < float(self.cfg["quiet_seconds"]):
            return
        if self._renew_refused is not None and time.monotonic() < self._renew_refused[1]:
            return  # (looked at again later)
        if time.monotonic() - self._trimmed > 10:
            self.trim(collect=False)  # what is free goes back first: only what stays counts
            now_mb = resident_mb()
        if now_mb is None or now_mb <= self._settled_mb + renew_mb or not self._can_start_again():
            return
        if not self.round_lock.acquire(blocking=False):
            return
        if not self.model_busy.acquire(blocking=False):
            self.round_lock.release()
            return
        self.renewing = True  # before the check below: a stop from here on finds it set (no wait on these locks)
        if not self._nothing_under_way():  # checked again under the locks, which it keeps until the exec
            self.renewing = False
            self.model_busy.release()
            self.round_lock.release()
            return
        log.info("renewing in place: %.1f MB resident (anonymous), %.1f MB past its size after its first round "
                 "(daemon.renew_mb = %s); SQLite holds %s", now_mb, now_mb - self._settled_mb, self.cfg["renew_mb"],
                 _mb_words(renewal.sqlite_mb()))
        self.stop_event.set()  # run_forever stops everything, then execs

    def _nothing_under_way(self) -> bool:
        return (self.held is None and self._sampler is None and self._drawer is None and not self._stop_asked
                and not self.stop_event.is_set())

    def _can_start_again(self) -> bool:
        """Whether a new image would start as this one runs: a renewal never upgrades the daemon, applies
        settings that wait for a restart, or ends in a daemon that cannot start. Why not is logged once (and
        looked at again every 10 minutes); a restart (`dopsd daemon stop` and `start`) is the way then. A round
        of `dopsd train` puts it off a minute at a time, unsaid."""
        why = None
        if code_fingerprint() != self._code:
            why = "the installed dopsd changed since the daemon started"
        else:
            try:
                st = open_state(self.root)
                try:
                    if st.readonly:
                        why = st.readonly_reason or f"{self.root} cannot be written"
                    elif st.recipe["daemon"] != self.cfg:
                        why = "[daemon] settings changed since the daemon started"
                finally:
                    st.close()
            except UserError as e:
                why = str(e)
        if why is None and not renewal.lock_free(self.root / "round.lock"):  # a `dopsd train` in progress
            self._renew_refused = ("", time.monotonic() + 60)  # not a reason to log: the round ends
            return False
        if why is None:
            self._renew_refused = None
            return True
        if self._renew_refused is None or self._renew_refused[0] != why:
            log.info("not renewing in place (memory %s MB past its size after its first round): %s; a restart "
                     "renews it", self.cfg["renew_mb"], why)
        self._renew_refused = (why, time.monotonic() + 600)
        return False

    def _write_status(self, nxt: str | None) -> None:
        info = {"pid": os.getpid(), "started_at": getattr(self, "_started", now()), "heartbeat_at": now(), "next_round_at": nxt,
                "ui": self._ui_url(), "held": self.held["reason"][:2000] if self.held else None,
                "starting": self.starting, "sample_socket": str(self.service.path) if self.service else None}
        self._started = info["started_at"]
        data = json.dumps(info).encode()
        data += b" " * max(0, STATUS_BYTES - len(data))  # a fixed size: rewritten in place on a full disk
        try:
            atomic_write(self.root / "daemon.json", data)
        except OSError as e:
            if not is_disk_full(e):
                raise
            fd = os.open(self.root / "daemon.json", os.O_WRONLY)  # its blocks exist already (on a file system
            try:  # that writes in place: not a copy-on-write one, where this fails too and the last status stays)
                if os.pwrite(fd, data, 0) != len(data):
                    raise OSError(errno.ENOSPC, "short write", str(self.root / "daemon.json"))
                os.ftruncate(fd, len(data))  # a longer status before this one leaves nothing behind
            finally:
                os.close(fd)


def start_background(root: Path, timeout: float = 180.0) -> int:
    """Start a detached daemon process and wait until it holds the lock."""
    import subprocess

    if daemon_running(root):
        info = read_status_file(root)
        raise UserError(f"a daemon is already running for {root} (pid {info.get('pid', '?')})")
    (root / "logs").mkdir(exist_ok=True, mode=0o700)
    out = open(os.open(root / "logs" / "daemon.stdout", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "dopsd_continual.daemon", "--state", str(root)],
                            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise UserError(f"the daemon exited at start (code {proc.returncode}); see {root / 'logs' / 'daemon.stdout'}")
        if daemon_running(root) and read_status_file(root).get("pid") == proc.pid:
            return proc.pid
        time.sleep(0.2)
    raise UserError(f"the daemon did not start within {timeout:.0f}s; see {root / 'logs'}")


def stop_background(root: Path, timeout: float = 120.0) -> bool:
    if not daemon_running(root):
        return False
    pid = read_status_file(root).get("pid")
    if not pid:
        raise UserError("a daemon holds the lock but wrote no pid yet; try again in a moment")
    os.kill(pid, signal.SIGTERM)
    t = time.time()
    while time.time() - t < timeout:
        if not daemon_running(root) and _gone(pid):  # the lock is released before the process ends
            return True
        time.sleep(0.2)
    raise UserError(f"the daemon (pid {pid}) did not stop within {timeout:.0f}s")


def _gone(pid: int) -> bool:
    """The process has ended (reaped if it was ours; a zombie counts as ended)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z")
    except OSError:
        return True


SERVICE = """[Unit]
Description=dopsd-continual daemon ({root})

[Service]
ExecStart={python} -m dopsd_continual.daemon --state {root}
Restart=on-failure
KillSignal=SIGTERM
TimeoutStopSec=180

[Install]
WantedBy=default.target
"""


def torch_oom() -> type[BaseException]:
    """torch's out-of-memory error, without importing torch where no round ran."""
    import sys

    torch = sys.modules.get("torch")
    return getattr(torch, "OutOfMemoryError", MemoryError) if torch is not None else MemoryError


def service_name(root: Path) -> str:
    """One unit per state dir, named after it (systemd-escape style), so a second state never replaces the first."""
    import hashlib
    import re

    tail = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(root).name).strip("-")[:40] or "state"
    return f"dopsd-{tail}-{hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:8]}.service"


def install_service(root: Path, unit_dir: Path | None = None) -> Path:
    unit_dir = unit_dir or Path.home() / ".config" / "systemd" / "user"
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / service_name(root)
    atomic_write(path, SERVICE.format(root=root, python=sys.executable).encode(), mode=user_file_mode())
    return path


def main() -> None:
    import argparse

    from .store import state_dir

    ap = argparse.ArgumentParser(description="run the dopsd daemon in this process")
    ap.add_argument("--state", default=None)
    ap.add_argument("--foreground", action="store_true")
    a = ap.parse_args()
    renewed = renewal.renewed()
    try:
        root = state_dir(a.state)
        try:
            Daemon(root, foreground=a.foreground, rounds_apart=True).run_forever()
        except Exception as e:
            if not renewed:
                raise
            # (checked before it renewed; a disk filled since, say): the log says it, the status goes
            setup_logging(root / "logs")  # (the failed image may not have set it up yet)
            log.error("the daemon could not start again after renewing itself: %s; `dopsd daemon start` starts it", e)
            (root / "daemon.json").unlink(missing_ok=True)
            raise UserError(str(e)) from None
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
