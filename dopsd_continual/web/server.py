"""`dopsd ui`: a small local dashboard over a state dir, served by Starlette (uvicorn), rendered on the server.

What it shows comes from the same library calls as the CLI (`stack.list_versions`, `status.status`, the
gate's reports); what it does too (`stack.rollback`, `stack.promote`, `ingest.queue_action`,
`sampling.sample`). Each request opens the state and closes it again, so the page and the CLI never
disagree and a running round's writes are seen at once.

Security, in order of the request's path through `guard`:
- it listens on 127.0.0.1 unless told otherwise and needs a token on every address, loopback included
  (another account on the box reaches 127.0.0.1 too): `?token=` once, then a cookie holding a value derived
  from it, named per port; `--no-token` is for a loopback address on a single-user machine only;
- on loopback the Host header must be `localhost` or a loopback address, parsed (no DNS rebinding);
- every action is a POST carrying the session's token (an HMAC of the session cookie); a POST whose Origin
  is not this server's is refused;
- images are served by version id or sample id looked up in the database, and assets from a table read at
  start: nothing from a request reaches the filesystem as a path, and the files behind an id are opened
  without following links, inside the state only;
- renders queue (a few per dashboard, one at a time, more refused with 429) and never keep a round from
  starting: a round waits at most for the render in progress (the render lock);
- a read-only state (a backup, another user's) can be viewed; actions that write say so (409).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import secrets
import threading
import time
import uuid
from pathlib import Path

from ..errors import UserError

HERE = Path(__file__).resolve().parent
ASSETS = {"style.css": "text/css", "ui.js": "text/javascript"}
MAX_RENDERS = 4  # renders a dashboard holds at once (one running, the rest waiting); more get 429
SQLITE_MAX_ID = 2**63 - 1
QUEUE_ROWS = 300  # the queue page shows the newest samples (`dopsd queue list` has them all)
OVERVIEW_VERSIONS = 30  # the overview lists the newest versions; /versions pages through them all
VERSIONS_PAGE = 100
KEEP_JOBS = 24  # sample and compare renders kept in memory
EVENTS_EVERY = 1.0  # seconds between the server's looks at the database for the live pages
THUMB_CACHE = "private, max-age=86400"  # a sample's thumbnail, asked for by its hash (everything else: no-store)
DISK_REPORT_SECONDS = 30.0  # the overview's disk section (a walk of the state) is this old at most


class ReadOnlyState(UserError):
    """An action that must write, on a state this process may not write (answered 409)."""


def host_name(header: str) -> str:
    """A Host header's host without its port: '[::1]:8765' -> '::1', 'localhost:8765' -> 'localhost'."""
    h = header.strip()
    if h.startswith("["):
        end = h.find("]")
        return h[1:end] if end > 0 else ""
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (IPv4, IPv6, IPv4-mapped), compared exactly: '127.x.example' is not."""
    host = host.strip().lower()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


def check_access(host: str, token: str | None, no_token: bool) -> None:
    """A token on every address; none only with no_token, on a loopback address."""
    if no_token and not is_loopback(host):
        raise UserError(f"--no-token is for a loopback address only, not {host}")
    if not token and not no_token:
        raise UserError("the dashboard needs a token (--token T, DOPSD_UI_TOKEN, or one made up by `dopsd ui`)")


def same(given: str, expected: str) -> bool:
    """A constant-time comparison that any text, non-ASCII too, survives (a 403/401, never a 500)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


class Dashboard:
    def __init__(self, root: Path, host: str = "127.0.0.1", token: str | None = None, no_token: bool = False,
                 port: int | None = None, warm=None):
        from jinja2 import Environment, FileSystemLoader, select_autoescape

        from ..status import local_time

        self.root = Path(root)
        self.host = host
        check_access(host, token, no_token)
        self.token = None if no_token else token
        suffix = f"_{port}" if port else ""
        self.token_cookie, self.session_cookie = f"dopsd_token{suffix}", f"dopsd_session{suffix}"  # per port
        # the per-session action tokens' key: from the dashboard's token where there is one, so that a page open
        # across a daemon's renewal (or restart) can still act; made up where there is none
        self.secret = hmac.new(self.token.encode(), b"dopsd-csrf", hashlib.sha256).digest() if self.token else secrets.token_bytes(32)
        self.cookie_value = hmac.new(self.token.encode(), b"dopsd-cookie", hashlib.sha256).hexdigest() if self.token else ""
        self.renders: list[str] = []  # job ids waiting or running, oldest first
        self.assets = {name: (HERE / "static" / name).read_bytes() for name in ASSETS}
        self.env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
        self.env.filters["size"] = size_words
        self.env.filters["local_time"] = local_time  # as `dopsd daemon status` says it
        self.jobs: dict[str, dict] = {}  # sample and compare renders: id -> {kind, status, error, png, ...}
        self.model_lock = threading.Lock()  # one model job at a time, on one loaded pipeline
        self._jobs_lock = threading.Lock()
        self._sampler = None
        self._sampler_state = None
        self._disk: tuple[float, dict] | None = None  # (when, retention.disk_report) for the overview
        self.warm = warm  # inside the daemon: its warm model, the one `dopsd sample` uses (Daemon.model_turn)
        self.closing = False  # set when the server stops: open event streams end
        self.stopping = lambda: False  # the server's "shutting down" (a signal to uvicorn), set by Server
        self.app = self._build()

    # ------------------------------------------------------------------------------------------ plumbing

    def state(self):
        from ..store import open_state

        return open_state(self.root)

    def csrf(self, session: str) -> str:
        return hmac.new(self.secret, session.encode(), hashlib.sha256).hexdigest()

    def _build(self):
        from starlette.applications import Starlette
        from starlette.routing import Route

        routes = [
            Route("/", self.overview), Route("/versions", self.versions), Route("/versions/{vid}", self.version),
            Route("/compare", self.compare),
            Route("/queue", self.queue), Route("/events", self.events), Route("/static/{name}", self.asset),
            Route("/img/sample/{sid:int}", self.sample_image), Route("/img/sheet/{vid}", self.sheet),
            Route("/img/job/{job}", self.job_image),
            Route("/actions/{action}", self.action, methods=["POST"]),
        ]
        app = Starlette(routes=routes)
        app.add_middleware(_Guard, dashboard=self)
        return app

    def render(self, request, name: str, **ctx):
        from starlette.responses import HTMLResponse

        st = ctx.get("st")
        ctx.update(csrf=request.state.csrf, readonly=bool(st and st.readonly), root=str(self.root))
        return HTMLResponse(self.env.get_template(name).render(**ctx))

    # ------------------------------------------------------------------------------------------- pages

    def overview(self, request):
        from ..retention import disk_report
        from ..stack import version_view
        from ..status import status

        st = self.state()
        try:
            versions, count = _newest_versions(st, OVERVIEW_VERSIONS)
            if not any(v["active"] for v in versions):  # rolled back past the newest: the active one is shown too
                active = version_view(st, st.active_version)
                versions += [dict(active, on_chain=True, apart=True)] if active else []
            if self._disk is None or time.monotonic() - self._disk[0] > DISK_REPORT_SECONDS:
                self._disk = (time.monotonic(), disk_report(st))  # a walk of the state: not at every live refresh
            return self.render(request, "overview.html", st=st, status=status(st), versions=versions, count=count,
                               disk=self._disk[1], page="overview")
        finally:
            st.close()

    def versions(self, request):
        """Every version, newest first, a page at a time (a history of months does not load at once)."""
        from starlette.exceptions import HTTPException

        asked = request.query_params.get("page") or "1"
        number = int(asked) if asked.isascii() and asked.isdigit() and len(asked) < 12 else 0
        if number < 1:
            raise HTTPException(404, "no such page")
        st = self.state()
        try:
            versions, count = _newest_versions(st, VERSIONS_PAGE, (number - 1) * VERSIONS_PAGE)
            if number > 1 and not versions:
                raise HTTPException(404, "no such page")
            return self.render(request, "versions.html", st=st, versions=versions, count=count, number=number,
                               pages=max(1, -(-count // VERSIONS_PAGE)), page="versions")
        finally:
            st.close()

    def version(self, request):
        from starlette.exceptions import HTTPException

        from ..checks import checks
        from ..stack import version_view

        vid = request.path_params["vid"]
        st = self.state()
        try:
            v = version_view(st, vid)
            if v is None:
                raise HTTPException(404, f"no version {vid!r}")
            report = _report(st, vid)
            rows = checks(report["metrics"], report["thresholds"]) if report else []
            samples = st.rows(f"select id, sha256, caption, status from samples where id in ({','.join('?' * len(v['samples']))})",
                              v["samples"]) if v["samples"] else []
            jobs = [dict(j, id=k) for k, j in self.jobs.items() if j.get("version") == vid]
            return self.render(request, "version.html", st=st, v=v, checks=rows,
                               samples=samples, jobs=jobs, steps=st.recipe["model"]["steps"],
                               has_sheet=(st.reports / f"{vid}.png").is_file(), page="versions")
        finally:
            st.close()

    def compare(self, request):
        from starlette.exceptions import HTTPException

        from ..stack import list_versions

        st = self.state()
        try:
            versions = list_versions(st, with_metrics=False)  # the pages show none: a long history's cost
            ids = {v["id"] for v in versions}
            a, b = request.query_params.get("a", ""), request.query_params.get("b", "")
            if (a or b) and (a not in ids or b not in ids):
                raise HTTPException(404, "no such version")
            job = self.jobs.get(_compare_key(a, b)) if a and b else None
            return self.render(request, "compare.html", st=st, versions=versions, a=a, b=b, job=job,
                               job_id=_compare_key(a, b), page="compare")
        finally:
            st.close()

    def queue(self, request):
        from starlette.exceptions import HTTPException

        from ..status import status
        from ..store import SAMPLE_STATUSES, shown_status

        wanted = request.query_params.get("status") or None
        if wanted is not None and wanted not in SAMPLE_STATUSES:
            raise HTTPException(404, f"no status {wanted!r}")
        st = self.state()
        try:
            shown = shown_status(st)  # a round that ended without a word left its samples 'training': queued
            stored = [s for s in SAMPLE_STATUSES if shown(s) == wanted]
            where, args = (f"where status in ({', '.join('?' * len(stored))})", stored) if stored else ("where 0", [])
            where, args = (where, args) if wanted else ("", [])
            total = st.rows(f"select count(*) n from samples {where}", args)[0]["n"]
            rows = st.rows(f"select id, sha256, status, caption, source_path, rejections, history from samples {where} "
                           f"order by id desc limit {QUEUE_ROWS}", args)
            for r in rows:
                r["status"] = shown(r["status"])
                r["last_event"] = (json.loads(r.pop("history") or "[]") or [{}])[-1].get("event", "")
            rejected = st.rows("select path, reason from files where outcome = 'rejected' order by path")
            return self.render(request, "queue.html", st=st, rows=rows, total=total, wanted=wanted, statuses=SAMPLE_STATUSES,
                               status=status(st), rejected=rejected, page="queue")
        finally:
            st.close()

    async def events(self, request):
        """Server-sent events: `change` whenever what the pages show has changed (checked once a second)."""
        from starlette.responses import StreamingResponse

        async def stream():
            last = None
            yield "retry: 3000\n\n"
            try:
                while not self.closing and not self.stopping() and not await request.is_disconnected():
                    now = await asyncio.to_thread(self.fingerprint)
                    if now != last:
                        if last is not None:
                            yield f"event: change\ndata: {now}\n\n"
                        last = now
                    await asyncio.sleep(EVENTS_EVERY)
            except asyncio.CancelledError:  # the server is stopping: the stream ends, quietly
                return

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    def fingerprint(self) -> str:
        from ..status import status

        st = self.state()
        try:
            daemon = {k: v for k, v in status(st).items() if k != "heartbeat_at"}  # the heartbeat alone is no news
            parts = [st.rows("select id, status from versions order by id"),
                     st.rows("select status, count(*) n from samples group by status"),
                     st.rows("select id, status, progress from rounds order by id desc limit 1"),
                     daemon, sorted((k, j["status"]) for k, j in self.jobs.items())]
            return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
        finally:
            st.close()

    # ------------------------------------------------------------------------------------------ images

    def asset(self, request):
        from starlette.exceptions import HTTPException
        from starlette.responses import Response

        name = request.path_params["name"]
        if name not in self.assets:
            raise HTTPException(404)
        return Response(self.assets[name], media_type=ASSETS[name])

    def sample_image(self, request):
        """A sample's picture, from its blob, as a PNG at most 256 px (HEIC and AVIF too). The one answer the
        browser may keep (a day, in its own cache only: `private`): a sample's picture never changes, and the
        pages ask for it by an address that names its hash (?v=), so a state made anew never shows an old one.
        A page that lists hundreds of samples is not drawn again by the server at each live refresh."""
        from PIL import Image
        from starlette.exceptions import HTTPException
        from starlette.responses import Response

        from ..ingest import sample_image

        if not 0 <= request.path_params["sid"] <= SQLITE_MAX_ID:
            raise HTTPException(404, "no such sample")
        st = self.state()
        try:
            rows = st.rows("select * from samples where id = ?", [request.path_params["sid"]])
            if not rows:
                raise HTTPException(404, "no such sample")
            try:
                im = sample_image(st, rows[0])
            except (UserError, OSError) as e:
                raise HTTPException(404, str(e)) from None
        finally:
            st.close()
        im.thumbnail((256, 256), Image.LANCZOS)
        from ..pictures import encoded

        return Response(encoded(im, "PNG", {}), media_type="image/png", headers={"Cache-Control": THUMB_CACHE})

    def sheet(self, request):
        from starlette.exceptions import HTTPException
        from starlette.responses import Response

        vid = request.path_params["vid"]
        st = self.state()
        try:
            from ..store import read_inside

            known = st.conn.execute("select 1 from versions where id = ?", [vid]).fetchone()
            try:
                if not known:
                    raise OSError("unknown version")
                data = read_inside(st.root, st.reports / f"{vid}.png")
            except OSError:
                raise HTTPException(404, "no gate sheet for that version") from None
            return Response(data, media_type="image/png")
        finally:
            st.close()

    def job_image(self, request):
        from starlette.exceptions import HTTPException
        from starlette.responses import Response

        job = self.jobs.get(request.path_params["job"])
        if not job or job["status"] != "done":
            raise HTTPException(404, "no such picture")
        return Response(job["png"], media_type="image/png")

    # ----------------------------------------------------------------------------------------- actions

    async def action(self, request):
        from starlette.exceptions import HTTPException
        from starlette.responses import RedirectResponse

        form = request.state.form  # parsed once, by the guard that checked its token
        action = request.path_params["action"]
        handlers = {"rollback": self._rollback, "promote": self._promote, "queue": self._queue,
                    "sample": self._sample, "compare": self._compare}
        if action not in handlers:
            raise HTTPException(404, f"no action {action!r}")
        try:
            target = await asyncio.to_thread(handlers[action], form)
        except ReadOnlyState as e:
            raise HTTPException(409, str(e)) from None
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        return RedirectResponse(target, status_code=303)

    def _writable(self, what: str):
        st = self.state()
        if st.readonly:
            st.close()
            raise ReadOnlyState(f"this state is read-only: {what} needs to write")
        return st

    def _known(self, st, vid: str) -> str:
        from ..stack import get_version

        return get_version(st, vid)["id"]

    def _rollback(self, form: dict) -> str:
        from ..stack import rollback

        return self._on_version(form, "rollback", rollback)

    def _promote(self, form: dict) -> str:
        from ..stack import promote

        return self._on_version(form, "promote", promote)

    def _on_version(self, form: dict, what: str, fn) -> str:
        """`dopsd versions rollback|promote V`: the same call; the page of the version that is active after it."""
        st = self._writable(what)
        try:
            vid = fn(st, self._known(st, form.get("version", "")))
        finally:
            st.close()
        return f"/versions/{vid}"

    def _queue(self, form: dict) -> str:
        from ..ingest import queue_action

        st = self._writable("the queue")
        try:
            if not form.get("sample", "").isdigit():
                raise UserError("no sample given")
            queue_action(st, int(form["sample"]), form.get("do", ""))
        finally:
            st.close()
        return "/queue"

    def _sample(self, form: dict) -> str:
        """`dopsd sample PROMPT --version V --seed S --steps N` in the background; the page shows it when done."""
        st = self.state()
        try:
            vid = self._known(st, form.get("version", ""))
            prompt = form.get("prompt", "").strip()
            if not prompt or len(prompt) > 2000:
                raise UserError("a prompt of 1-2000 characters is needed")
            seed, steps = _int(form.get("seed"), "seed", 0, 2**31 - 1), _int(form.get("steps"), "steps", 1, 1000)
        finally:
            st.close()
        job = uuid.uuid4().hex
        self._admit()
        self.jobs[job] = {"kind": "sample", "status": "waiting", "version": vid, "prompt": prompt, "seed": seed,
                          "steps": steps, "error": None}

        req = {"prompt": prompt, "version": vid, "steps": steps, "seed": seed, "n": 1}
        self._start(job, {"kind": "sample", "req": req})  # `dopsd sample`'s own request
        return f"/versions/{vid}#jobs"

    def _compare(self, form: dict) -> str:
        """Both versions on the gate's first held-out prompts and seeds: a over b, one column per prompt."""
        st = self.state()
        try:
            a, b = self._known(st, form.get("a", "")), self._known(st, form.get("b", ""))
        finally:
            st.close()
        job = _compare_key(a, b)
        if self.jobs.get(job, {}).get("status") in ("waiting", "running"):
            return f"/compare?a={a}&b={b}"
        self._admit()
        self.jobs[job] = {"kind": "compare", "status": "waiting", "a": a, "b": b, "error": None}

        self._start(job, {"kind": "compare", "a": a, "b": b})
        return f"/compare?a={a}&b={b}"

    def _admit(self) -> None:
        """Room for one more render, or 429: a dashboard holds at most MAX_RENDERS, one running at a time."""
        from starlette.exceptions import HTTPException

        with self._jobs_lock:
            self.renders = [k for k in self.renders if self.jobs.get(k, {}).get("status") in ("waiting", "running")]
            if len(self.renders) >= MAX_RENDERS:
                raise HTTPException(429, f"{MAX_RENDERS} renders are already waiting or running; try again when one is done")

    def _start(self, job: str, spec: dict) -> None:
        """A render in a thread: one at a time on one loaded pipeline, never beside a round. It waits while a
        round runs, and holds the render lock while it draws; a round takes that lock after it starts, so it
        waits at most for the render in progress. The pipeline goes back to CPU memory after each render.
        The last KEEP_JOBS finished renders are kept."""
        for old in [k for k, j in self.jobs.items() if j["status"] not in ("waiting", "running")][:-KEEP_JOBS]:
            self.jobs.pop(old, None)
        with self._jobs_lock:
            self.renders.append(job)

        def done(res: dict) -> None:
            self.jobs[job]["png"] = res["png"]
            if "prompts" in res:
                self.jobs[job]["prompts"] = res["prompts"]

        def work():

            def waiting(what):
                self.jobs[job].update(waiting_for=what)

            if self.warm is not None:  # inside the daemon: its warm model, on the same turns as `dopsd sample`
                st = self.state()
                try:
                    with self.warm.model_turn(st, waiting, stop=lambda: self.closing) as drawer:
                        self.jobs[job]["status"] = "running"
                        done(drawer(spec))
                    self.jobs[job]["status"] = "done"
                except Exception as e:  # the page says what failed; the server goes on
                    self.jobs[job].update(status="failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
                finally:
                    st.close()
                return
            from ..rounds import render_turn  # a dashboard of its own (`dopsd ui`) holds its own model
            from ..sampling import Sampler, render

            with self.model_lock:
                try:
                    if self._sampler is None:
                        self._sampler_state = self.state()
                        self._sampler = Sampler(self._sampler_state)
                    st, sampler = self._sampler_state, self._sampler
                    with render_turn(st, on_wait=waiting, stop=lambda: self.closing):
                        self.jobs[job]["status"] = "running"
                        try:
                            done(render(st, sampler, spec))
                        finally:
                            sampler.rest()
                    self.jobs[job]["status"] = "done"
                except Exception as e:  # the page says what failed; the server goes on
                    self.jobs[job].update(status="failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)

        threading.Thread(target=work, name=f"dopsd-ui-{job[:8]}", daemon=True).start()

    def close(self) -> None:
        """Stop: open event streams end, waiting renders give up."""
        self.closing = True


class _Guard:
    """Host, token, session and the per-session token of every POST; security headers on every answer."""

    def __init__(self, app, dashboard: Dashboard):
        self.app, self.d = app, dashboard

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.requests import Request
        from starlette.responses import PlainTextResponse, RedirectResponse

        request = Request(scope)
        host = host_name(request.headers.get("host") or "")
        refuse = None
        if is_loopback(self.d.host) and not is_loopback(host):
            refuse = PlainTextResponse("this dashboard answers on its loopback address only", 400)
        elif self.d.token:
            given = request.query_params.get("token")
            if given is not None and same(given, self.d.token):
                resp = RedirectResponse(request.url.path, 303)  # the token leaves the address bar
                resp.set_cookie(self.d.token_cookie, self.d.cookie_value, httponly=True, samesite="strict", path="/")
                return await _headers(resp)(scope, receive, send)
            if not same(request.cookies.get(self.d.token_cookie, ""), self.d.cookie_value):
                refuse = PlainTextResponse("a token is needed: open the address `dopsd ui` printed "
                                           "(or `dopsd daemon status` for the daemon's dashboard)", 401)
        session = request.cookies.get(self.d.session_cookie, "")
        new_session = len(session) != 32 or not (session.isascii() and session.isalnum())
        if new_session:
            session = secrets.token_hex(16)
        if refuse is None and scope["method"] not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            here = f"{scope.get('scheme', 'http')}://{request.headers.get('host', '')}"
            if origin is not None and origin != here:
                refuse = PlainTextResponse("refused: this request came from another site", 403)
            elif scope["method"] != "POST":
                refuse = PlainTextResponse("method not allowed", 405)
            else:
                body = await _read_body(receive)
                receive = _replay(body)
                form = dict(_parse_form(body, request.headers.get("content-type", "")))
                if new_session or not same(form.get("csrf", ""), self.d.csrf(session)):
                    refuse = PlainTextResponse("refused: the page's token is missing or stale; reload the page", 403)
                scope.setdefault("state", {})["form"] = form
        if refuse is not None:
            return await _headers(refuse)(scope, receive, send)
        scope.setdefault("state", {})["csrf"] = self.d.csrf(session)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                own = {k.lower() for k, _ in headers}  # an answer's own Cache-Control (a thumbnail's) stands
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items() if k.lower().encode() not in own]
                if new_session:
                    headers.append((b"set-cookie", f"{self.d.session_cookie}={session}; HttpOnly; SameSite=Strict; Path=/".encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def _headers(resp):
    resp.headers.update(SECURITY_HEADERS)
    return resp


async def _read_body(receive) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > 1_000_000:
            break
    return body


def _replay(body: bytes):
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def _parse_form(body: bytes, content_type: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    if not content_type.startswith("application/x-www-form-urlencoded"):
        return []  # the pages post plain forms only
    return parse_qsl(body.decode(errors="replace"), keep_blank_values=True)


# ------------------------------------------------------------------------------------------- helpers


def size_words(n: int) -> str:
    """Bytes as the disk table shows them: 12 B, 3.4 KB, 5.6 MB, 7.8 GB."""
    return next((f"{n / 2**e:.1f} {u}" for e, u in ((30, "GB"), (20, "MB"), (10, "KB")) if n >= 2**e), f"{n} B")


def _newest_versions(st, n: int, skip: int = 0) -> tuple[list[dict], int]:
    """A page of versions, newest first, each marked `on_chain` when it lies between v0 and the active version
    (the pages show the others set in); and how many there are. Flat rows, not a nested tree: a chain of
    hundreds of rounds renders without recursion, and what a page parses and renders stays a page (the
    chain and the count still read each version's id and parent: 2 short strings a version)."""
    from ..stack import active_chain, list_versions, version_count

    on = active_chain(st)
    rows = list_versions(st, with_metrics=False, limit=n, offset=skip)  # the pages show no gate metrics
    return [dict(v, on_chain=v["id"] in on) for v in reversed(rows)], version_count(st)


def _report(st, vid: str) -> dict | None:
    path = st.reports / f"{vid}.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _compare_key(a: str, b: str) -> str:
    return hashlib.sha256(f"compare\0{a}\0{b}".encode()).hexdigest()[:32]


def _int(value, name: str, lo: int, hi: int) -> int:
    try:
        n = int(str(value))
    except ValueError:
        raise UserError(f"{name} must be a whole number") from None
    if not lo <= n <= hi:
        raise UserError(f"{name} must be in {lo}..{hi}")
    return n


# -------------------------------------------------------------------------------------------- serving


def bind(host: str, port: int):
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(64)
    return sock


def token_for(host: str, given: str | None = None, no_token: bool = False) -> str | None:
    """The token a server needs on any address: the one given, else one made up; none only with no_token
    (loopback only, checked by Dashboard)."""
    return None if no_token else (given or secrets.token_urlsafe(24))


def url(host: str, port: int, token: str | None = None) -> str:
    if host in ("0.0.0.0", "::"):  # every address: name the machine, which a browser elsewhere can reach
        import socket

        host = socket.gethostname()
    h = f"[{host}]" if ":" in host else host
    return f"http://{h}:{port}/" + (f"?token={token}" if token else "")


class Server:
    """The dashboard on a socket, in this thread (`run`) or a background one (`start`/`stop`)."""

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 no_token: bool = False, warm=None, sock=None):
        import uvicorn

        check_access(host, token, no_token)  # a bad host or token fails before the socket is taken
        self.sock = sock if sock is not None else bind(host, port)  # sock: one already listening (a renewal's)
        self.host, self.port, self.token = host, self.sock.getsockname()[1], token
        self.dashboard = Dashboard(root, host, token, no_token, port=self.port, warm=warm)
        self.server = uvicorn.Server(uvicorn.Config(self.dashboard.app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2))
        self.dashboard.stopping = lambda: self.server.should_exit  # Ctrl-C: open event streams end within a second
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return url(self.host, self.port, self.token)

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.dashboard.close()  # Ctrl-C on `dopsd ui` too: no temporary files stay behind

    def start(self) -> Server:
        self.thread = threading.Thread(target=self.run, name="dopsd-ui", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.dashboard.close()
        self.server.should_exit = True
        if self.thread:
            self.thread.join(10)
        self.sock.close()
