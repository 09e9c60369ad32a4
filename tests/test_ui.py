"""The dashboard's server: pages, images by id only, and the guards on every action (Starlette's test client)."""

import json
import re

import pytest
from starlette.testclient import TestClient

from dopsd_continual.errors import UserError
from dopsd_continual.ingest import ingest_paths
from dopsd_continual.store import init_state, open_state
from dopsd_continual.toy.packs import write_pack
from dopsd_continual.web.server import Dashboard

HERE = "http://127.0.0.1:8765"


TOKEN = "t0ken-for-tests"


def client(root, login: bool = True, **kw) -> TestClient:
    """A browser on the dashboard that opened the printed address (token in the cookie) unless login=False."""
    kw.setdefault("token", TOKEN)
    c = TestClient(Dashboard(root, **kw).app, base_url=HERE, follow_redirects=False)
    if login and kw.get("token"):
        assert c.get(f"/?token={kw['token']}").status_code == 303
    return c


def page_token(c: TestClient, path: str = "/queue") -> str:
    r = c.get(path)
    assert r.status_code == 200
    return re.search(r'name="csrf" value="([0-9a-f]+)"', r.text).group(1)


def status_of(root, sid: int) -> str:
    st = open_state(root)
    try:
        return st.rows("select status from samples where id = ?", [sid])[0]["status"]
    finally:
        st.close()


def test_pages_render_and_unknown_ids_are_404(root):
    c = client(root)
    for path in ("/", "/queue", "/queue?status=queued", "/versions/v0", "/compare", "/compare?a=v0&b=v0"):
        r = c.get(path)
        assert r.status_code == 200, path
        assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "v0" in c.get("/").text and "a large red heart" in c.get("/queue").text
    for path in ("/versions/v9", "/versions/..%2F..%2Fdopsd.toml", "/compare?a=v0&b=v9", "/queue?status=nope",
                 "/img/sheet/v9", "/img/sample/999", "/img/job/abc"):
        assert c.get(path).status_code == 404, path


def test_no_path_from_a_request_reaches_the_filesystem(root):
    c = client(root)
    assert c.get("/img/sample/1").headers["content-type"] == "image/png"
    assert c.get("/static/style.css").status_code == 200
    secret = (root / "dopsd.toml").read_text()
    for path in ("/static/..%2Fdopsd.toml", "/static/../dopsd.toml", "/static/%2e%2e/%2e%2e/dopsd.toml",
                 "/img/sheet/..%2Fdopsd.toml", "/img/sheet/%2Fetc%2Fpasswd", "/img/sample/..%2F1",
                 "/img/sample/-1", "/img/job/..%2F..%2Fdopsd.sqlite", "/versions/v0/../../dopsd.toml",
                 "/" + str(root / "dopsd.toml")):
        r = c.get(path)
        assert r.status_code == 404, path
        assert secret not in r.text and "root:" not in r.text


def test_an_action_needs_the_page_token_and_this_origin_and_changes_nothing_without(root):
    c = client(root)
    token = page_token(c)
    drop = {"sample": "1", "do": "drop"}
    assert c.post("/actions/queue", data=drop).status_code == 403  # no token
    assert c.post("/actions/queue", data={**drop, "csrf": "0" * 64}).status_code == 403  # a wrong one
    assert c.post("/actions/queue", data={**drop, "csrf": token}, headers={"Origin": "http://evil.example"}).status_code == 403
    other = client(root)  # another session (a new visitor) cannot use this page's token
    other.get("/")
    assert other.post("/actions/queue", data={**drop, "csrf": token}).status_code == 403
    fresh = TestClient(c.app, base_url=HERE, follow_redirects=False)  # no session cookie at all
    fresh.get(f"/?token={TOKEN}")  # the dashboard's own token: only its session is missing
    assert fresh.post("/actions/queue", data={**drop, "csrf": token}).status_code == 403
    assert c.get("/actions/queue").status_code == 405  # actions are POSTs only
    assert status_of(root, 1) == "queued"
    r = c.post("/actions/queue", data={**drop, "csrf": token}, headers={"Origin": HERE})
    assert r.status_code == 303 and r.headers["location"] == "/queue"
    assert status_of(root, 1) == "dropped"
    # the CLI sees the same state
    from typer.testing import CliRunner

    from dopsd_continual.cli import app

    out = CliRunner().invoke(app, ["queue", "list", "--json", "--state", str(root)])
    assert {r["id"]: r["status"] for r in json.loads(out.stdout)}[1] == "dropped"


def test_bad_version_ids_and_values_are_4xx_and_change_nothing(root):
    c = client(root)
    token = page_token(c)
    for vid in ("v9", "../v0", "", "v0' or '1'='1"):
        for action in ("rollback", "promote"):
            r = c.post(f"/actions/{action}", data={"version": vid, "csrf": token})
            assert r.status_code == 400, (action, vid)
    assert c.post("/actions/queue", data={"sample": "x", "do": "drop", "csrf": token}).status_code == 400
    assert c.post("/actions/queue", data={"sample": "1", "do": "rm -rf", "csrf": token}).status_code == 400
    assert c.post("/actions/sample", data={"version": "v0", "prompt": "", "seed": "0", "steps": "4",
                                           "csrf": token}).status_code == 400
    assert c.post("/actions/sample", data={"version": "v0", "prompt": "x", "seed": "-1", "steps": "4",
                                           "csrf": token}).status_code == 400
    assert c.post("/actions/nothing", data={"csrf": token}).status_code == 404
    st = open_state(root)
    assert st.active_version == "v0" and st.rows("select count(*) n from versions")[0]["n"] == 1
    st.close()
    assert status_of(root, 1) == "queued"


def test_a_token_everywhere_loopback_included(root):
    c = client(root)
    assert c.get("/", headers={"Host": "evil.example"}).status_code == 400  # a rebound DNS name
    with pytest.raises(UserError, match="needs a token"):
        Dashboard(root, host="0.0.0.0")
    with pytest.raises(UserError, match="needs a token"):
        Dashboard(root)  # loopback too: another account on the box reaches 127.0.0.1
    with pytest.raises(UserError, match="loopback address only"):
        Dashboard(root, host="0.0.0.0", no_token=True)
    for host, base in (("0.0.0.0", "http://192.0.2.1:8765"), ("127.0.0.1", HERE)):
        t = TestClient(Dashboard(root, host=host, token="s3cret").app, base_url=base, follow_redirects=False)
        assert t.get("/").status_code == 401
        assert t.get("/img/sample/1").status_code == 401
        assert t.get("/?token=wrong").status_code == 401
        r = t.get("/queue?token=s3cret")
        assert r.status_code == 303 and r.headers["location"] == "/queue"  # the token leaves the address bar
        cookie = r.headers["set-cookie"]
        assert "s3cret" not in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert t.get("/").status_code == 200  # the cookie carries a value derived from it now
    nt = TestClient(Dashboard(root, no_token=True).app, base_url=HERE, follow_redirects=False)
    assert nt.get("/").status_code == 200  # --no-token: loopback on a single-user machine


def test_cookies_are_named_for_the_port_and_hold_no_token(root):
    d = Dashboard(root, token="s3cret", port=8766)
    t = TestClient(d.app, base_url="http://127.0.0.1:8766", follow_redirects=False)
    r = t.get("/?token=s3cret")
    assert r.headers["set-cookie"].startswith("dopsd_token_8766=") and "s3cret" not in r.headers["set-cookie"]
    other = Dashboard(root, token="s3cret", port=8767)  # another dashboard on another port of the same host
    assert other.token_cookie != d.token_cookie and other.session_cookie != d.session_cookie


@pytest.mark.parametrize("host", ["127.evil.example", "127.0.0.1.evil.example", "localhost.evil.example",
                                  "127.0.0.1.nip.io:8765", "evil.example:8765", "0.0.0.0", "[::ffff:10.0.0.1]:8765",
                                  "2130706433", "127.1", ""])
def test_rebinding_host_forms_are_400(root, host):
    c = client(root)
    assert c.get("/", headers={"Host": host}).status_code == 400


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8765", "127.5.6.7:8765", "localhost", "localhost:8765",
                                  "[::1]", "[::1]:8765", "[::ffff:127.0.0.1]:8765", "LOCALHOST:8765"])
def test_loopback_host_forms_are_served(root, host):
    c = client(root)
    assert c.get("/", headers={"Host": host}).status_code == 200


def test_odd_tokens_and_ids_get_4xx_not_500(root):
    c = client(root, login=False)
    assert c.get("/?token=%C3%A9t%C3%A9").status_code == 401  # non-ASCII token
    assert c.get("/", headers={"cookie": "dopsd_token=\u00e9t\u00e9".encode()}).status_code == 401  # raw UTF-8 bytes
    c = client(root)
    for sid in ("99999999999999999999999", "9223372036854775808", "9223372036854775807"):
        assert c.get(f"/img/sample/{sid}").status_code == 404, sid
    c.get("/queue")
    r = c.post("/actions/queue", data={"sample": "1", "do": "drop", "csrf": "\u00e9" * 64})
    assert r.status_code == 403
    odd = "\u00e9" * 32
    cookie = f"dopsd_token={c.cookies['dopsd_token']}; dopsd_session={odd}".encode()
    assert TestClient(c.app, base_url=HERE).get("/queue", headers={"cookie": cookie}).status_code == 200  # a new session
    assert status_of(root, 1) == "queued"


def test_links_planted_in_the_state_are_not_followed(root, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not yours")
    st = open_state(root)
    (st.reports / "v0.png").symlink_to(secret)  # a sheet that is a link
    blob = st.rows("select image_blob from samples where id = 1")[0]["image_blob"]
    st.close()
    c = client(root)
    assert c.get("/img/sheet/v0").status_code == 404
    (root / blob).unlink()
    (root / blob).symlink_to(secret)  # a blob that is a link
    r = c.get("/img/sample/1")
    assert r.status_code == 404 and b"not yours" not in r.content


def test_a_read_only_state_is_shown_and_not_written(root, monkeypatch):
    import dopsd_continual.store as store

    monkeypatch.setattr(store, "_readonly", lambda r: True)  # as for another user's state or a read-only mount
    c = client(root)
    r = c.get("/queue")
    assert r.status_code == 200 and "read-only" in r.text and "disabled" in r.text
    token = page_token(c)
    r = c.post("/actions/queue", data={"sample": "1", "do": "drop", "csrf": token})
    assert r.status_code == 409 and "read-only" in r.text
    monkeypatch.undo()
    assert status_of(root, 1) == "queued"


def test_the_daemon_serves_the_dashboard_when_the_recipe_says_so(tmp_path):
    import httpx
    from test_daemon import fast_recipe, wait_for

    from dopsd_continual.daemon import Daemon
    from dopsd_continual.status import status

    (tmp_path / "w").mkdir()
    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path, ui=True, ui_port=0)), [tmp_path / "w"])
    d = Daemon(st.root, install_signals=False)
    d.start()
    try:
        assert wait_for(lambda: (status(st).get("ui") or "").startswith("http://127.0.0.1:"))
        assert httpx.get(status(st)["ui"]).status_code == 401  # its token is needed, on loopback too
        token_file = st.root / "ui-token"
        assert token_file.stat().st_mode & 0o777 == 0o600
        r = httpx.get(status(st)["ui"] + "?token=" + token_file.read_text(), follow_redirects=True)
        assert r.status_code == 200 and "versions" in r.text
    finally:
        d.shutdown()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{d.ui.port}/", timeout=5)
    st.close()


def test_a_round_run_by_the_cli_shows_its_progress_and_a_dead_one_does_not(tmp_path):
    import signal
    import subprocess
    import sys

    from test_daemon import fast_recipe, wait_for

    from dopsd_continual.status import status

    write_pack("heart", tmp_path / "drop")
    st = init_state(tmp_path / "s", str(fast_recipe(tmp_path, steps=2000)), [tmp_path / "drop"])
    ingest_paths(st)
    proc = subprocess.Popen([sys.executable, "-m", "dopsd_continual.cli_entry", "train", "--json", "--state", str(st.root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: (status(st)["round"] or {}).get("progress", 0) > 0 or proc.poll() is not None)
        assert proc.poll() is None, proc.stderr.read()
        assert status(st)["running"] is False  # no daemon: the round is the CLI's
        assert "<progress" in client(st.root).get("/").text
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert status(st)["round"] is None  # its row still says running; its process is gone
    st.close()


def test_the_overview_shows_the_states_disk_use_by_kind_and_what_the_policy_gives_back(root):
    from dopsd_continual.store import feature_key, set_settings

    st = open_state(root)
    row = next(st.db["samples"].rows)
    st.db["samples"].update(row["id"], {"status": "dropped"})
    st.conn.commit()
    feats = root / "cache" / "features" / "enc"
    feats.mkdir(parents=True)
    (feats / f"{feature_key(row['sha256'], row['caption'])}.safetensors").write_bytes(b"x" * (3 << 20))
    st.close()
    set_settings(root, {"retention.disk_budget_gb": 2})
    html = client(root).get("/").text
    assert "<" not in html[html.index("<title>") + 7 : html.index("</title>")]  # the section is on the page, not in its title
    html = html[html.index("<main"):]
    disk = html[html.index('<section id="disk">'):]
    disk = disk[: disk.index("</section>")]
    assert "of a 2 GB budget" in disk and "free on its file system" in disk
    cells = dict(re.findall(r"<tr><td>([^<]+)</td><td class=\"num\">([^<]+)</td>", disk))
    assert cells["features"] == "3.0 MB" and cells["originals"].endswith(" KB") and cells["database"]
    assert '<td>features</td><td class="num">3.0 MB</td><td class="num">3.0 MB (1)</td>' in disk
    assert "3.0 MB can go under the retention policy" in disk


def test_a_long_history_renders_flat_a_page_at_a_time(tmp_path):
    """Hundreds of rounds (a chain 400 deep, and a branch rejected off it): the overview lists the newest
    versions without recursion and names how many there are; /versions pages through them all; versions off
    the way from v0 to the active one are set in."""
    st = init_state(tmp_path / "s", None, [])
    rows = [{"id": f"v{i}", "parent": f"v{i - 1}", "status": "accepted", "created_at": float(i), "objective": "opsd",
             "recipe_hash": "", "samples": "[]", "metrics": "{}", "reasons": "[]", "adapter_dir": f"adapters/v{i}"}
            for i in range(1, 401)]
    rows.append(dict(rows[-1], id="v401", parent="v399", status="rejected", reasons='["worse on held-out prompts"]'))
    st.db["versions"].insert_all(rows)
    st.db["meta"].upsert({"key": "active_version", "value": "v400"}, pk="key")
    st.close()
    c = client(tmp_path / "s")
    r = c.get("/")
    assert r.status_code == 200
    shown = re.findall(r'data-version="(v\d+)"', r.text)
    assert shown == [f"v{i}" for i in range(401, 371, -1)]  # the newest 30, newest first
    assert "the newest 30 of 402" in r.text and 'href="/versions"' in r.text
    assert re.search(r'<li class="branch">\s*<a href="/versions/v401"', r.text)  # the rejected branch, set in
    assert re.search(r'<li class="chain">\s*<a href="/versions/v400"', r.text)
    seen = []
    for n in range(1, 6):
        page = c.get(f"/versions?page={n}")
        assert page.status_code == 200, n
        seen += re.findall(r'data-version="(v\d+)"', page.text)
        assert f"page {n} of 5" in page.text
    assert seen == [f"v{i}" for i in range(401, -1, -1)]  # every version once, newest first, v0 last
    for bad in ("6", "0", "-1", "x", "１", "9" * 40):
        assert c.get(f"/versions?page={bad}").status_code == 404, bad
    assert 'parent <a href="/versions/v0">v0</a>' in c.get("/versions/v1").text
    assert c.get("/versions?page=").status_code == 200  # an empty page number is the first page
    st = open_state(tmp_path / "s")
    st.db["meta"].upsert({"key": "active_version", "value": "v12"}, pk="key")  # rolled back past the newest 30
    st.close()
    r = c.get("/")
    assert re.findall(r'data-version="(v\d+)"', r.text)[-1] == "v12" and re.findall(r'data-active="(v\d+)"', r.text) == ["v12"]
    assert "the newest 30 of 402, and the active one" in r.text
    assert re.search(r'<li class="branch">\s*<a href="/versions/v400"', r.text)  # off the chain to v12 now


def test_a_samples_thumbnail_alone_may_be_kept_by_the_browser_and_is_asked_for_by_its_hash(root):
    """The queue's pictures are not drawn again at every live refresh: a thumbnail is `private, max-age` (the
    browser's own cache, never a shared one) under an address naming the picture's hash; pages, sheets and
    refusals stay no-store."""
    c = client(root)
    st = open_state(root)
    sha = st.rows("select sha256 from samples where id = 1")[0]["sha256"]
    st.close()
    assert f'src="/img/sample/1?v={sha[:16]}"' in c.get("/queue").text
    r = c.get(f"/img/sample/1?v={sha[:16]}")
    assert r.status_code == 200 and r.headers.get_list("cache-control") == ["private, max-age=86400"]
    for path in ("/", "/queue", "/versions", "/img/sample/999", "/static/style.css"):
        assert c.get(path).headers.get_list("cache-control") == ["no-store"], path
    assert client(root, login=False).get("/img/sample/1").headers.get_list("cache-control") == ["no-store"]  # refused
