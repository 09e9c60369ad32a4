"""A user's real folders and mistakes: every entry accounted for, one-line errors, read-only states.

Commands run as real processes. Where a case needs a file or a state the process cannot write or read
(an unreadable photo, a backup owned by someone else), a process running as root drops to the `nobody`
user for that command; as any other user the files' modes are changed instead.
"""

import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_image, make_pair, tree_snapshot
from PIL import Image

from dopsd_continual.recipe import RECIPES_DIR

ROOT = Path(__file__).resolve().parents[1]
ROOTED = os.geteuid() == 0
NOBODY = 65534


def _can_drop() -> bool:
    """Root can run this interpreter and checkout as `nobody` (not when they sit in a private folder)."""
    if not ROOTED or shutil.which("setpriv") is None:
        return False
    probe = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable, "-c",
             "import dopsd_continual.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(probe, capture_output=True, env=env, cwd=tempfile.gettempdir()).returncode == 0


DROPS = _can_drop()  # as root: the cases that need an unprivileged process run as `nobody`
LIMITED = DROPS or not ROOTED  # file modes bind this test's processes: unreadable and read-only cases are real
CAPTION = "a large red circle in the center, blue background"


def cli(*args, user: int | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`dopsd ARGS` in a fresh process (as `user` when given and this process is root)."""
    cmd = [sys.executable, "-m", "dopsd_continual.cli_entry", *map(str, args)]
    if user is not None and DROPS:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    e = {**os.environ, "DOPSD_STABILITY_SECONDS": "0", "PYTHONPATH": str(ROOT), "HOME": tempfile.gettempdir(), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=tempfile.gettempdir())


def no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]


def run(*args, env: dict | None = None):
    """`dopsd ARGS` in this process (typer's runner): a traceback shows as an exception other than SystemExit."""
    from typer.testing import CliRunner

    from dopsd_continual.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args], env={"DOPSD_STABILITY_SECONDS": "0", **(env or {})})
    assert r.exception is None or isinstance(r.exception, SystemExit), (args, repr(r.exception), r.output[-2000:])
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


@pytest.fixture
def shared(tmp_path_factory) -> Path:
    """A folder every user can enter (pytest's own temp folders are private to their owner)."""
    d = Path(tempfile.mkdtemp(prefix="dopsd-robust-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def hand_to(path: Path, user: int) -> None:
    """Give a tree to `user` (when root) so that user's process can write it."""
    if ROOTED:
        for p in [path, *path.rglob("*")]:
            os.lchown(p, user, user)


def unreadable(path: Path) -> None:
    """A file or folder the ingesting process cannot read: owned by root, mode 000 (root drops to nobody)."""
    path.chmod(0o000)


# ------------------------------------------------------------------------------------ the bad folder


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def build_bad_folder(d: Path, outside: Path) -> dict[str, str]:
    """At least 25 kinds of realistic bad input and mistakes; returns {relative path: expected outcome}.

    Outcomes: queued, duplicates, updated, ignored, rejected, silent (hidden, system, partial downloads).
    A caption paired with an image is accounted for by its image's entry.
    """
    exp: dict[str, str] = {}

    def pair(stem, ext=".png", caption=CAPTION, sub=None, **kw):
        folder = d / sub if sub else d
        make_pair(folder, stem, caption, ext=ext, **kw)
        rel = f"{sub}/{stem}{ext}" if sub else f"{stem}{ext}"
        return rel

    exp[pair("good")] = "queued"                                                 # 1 a plain pair
    exp[pair("phone", ".JPG", sub="2024/holiday")] = "queued"                    # 2 upper-case extension, nested
    make_image(d / "nocaption.png", seed=3)
    exp["nocaption.png"] = "rejected"                                            # 3 image without caption
    (d / "orphan.txt").write_text("a caption whose image was deleted")
    exp["orphan.txt"] = "ignored"                                                # 4 caption without image
    (d / "empty.png").write_bytes(b"")
    (d / "empty.txt").write_text(CAPTION)
    exp["empty.png"] = "rejected"                                                # 5 zero bytes
    full = png_bytes(Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    (d / "truncated.png").write_bytes(full[: len(full) // 2])
    (d / "truncated.txt").write_text(CAPTION)
    exp["truncated.png"] = "rejected"                                            # 6 cut-off download
    (d / "notes.png").write_text("this is not an image")
    (d / "notes.txt").write_text(CAPTION)
    exp["notes.png"] = "rejected"                                                # 7 text named .png
    make_image(d / "mislabelled.png", fmt="JPEG", seed=7)
    (d / "mislabelled.txt").write_text(CAPTION)
    exp["mislabelled.png"] = "rejected"                                          # 8 JPEG named .png
    make_image(d / "latin1.png", seed=8)
    (d / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    exp["latin1.png"] = "rejected"                                               # 9 caption not UTF-8
    exp[pair("blank", caption="   \n")] = "rejected"                             # 10 empty caption
    exp[pair("essay", caption="word " * 2000)] = "rejected"                      # 11 caption too long
    exp[pair("icon", size=(16, 16))] = "rejected"                                # 12 below min_side
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    frames[0].save(d / "anim.webp", save_all=True, append_images=frames[1:], duration=100)
    (d / "anim.txt").write_text(CAPTION)
    exp["anim.webp"] = "queued"                                                  # 13 animated: first frame
    Image.fromarray((np.full((64, 64), 200)).astype(np.uint16)).save(d / "dark16.png")
    (d / "dark16.txt").write_text(CAPTION)
    exp["dark16.png"] = "queued"                                                 # 14 dark 16-bit PNG
    im = Image.fromarray(np.random.default_rng(15).integers(0, 255, (40, 80, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(d / "rotated.jpg", exif=exif.tobytes())
    (d / "rotated.txt").write_text(CAPTION)
    exp["rotated.jpg"] = "queued"                                                # 15 EXIF-rotated phone photo
    make_image(d / "twin.png", seed=16)
    make_image(d / "twin.jpg", seed=17, fmt="JPEG")
    (d / "twin.txt").write_text(CAPTION)
    exp["twin.png"] = exp["twin.jpg"] = "rejected"                               # 16 two images, one caption
    make_image(d / "meta" / "m1.png", seed=18)
    make_image(d / "meta" / "m2.png", seed=19)
    (d / "meta" / "metadata.jsonl").write_text(
        json.dumps({"file_name": "m1.png", "text": CAPTION}) + "\n" + "{not json\n"
        + json.dumps({"file_name": "gone.png", "text": CAPTION}) + "\n")
    exp["meta/m1.png"] = "queued"                                                # 17 metadata.jsonl caption
    exp["meta/m2.png"] = "rejected"                                              # 18 ... an image it misses
    exp["meta/metadata.jsonl"] = "rejected+ignored"                              # 19 a bad line, a missing file
    for name in (".hidden.png", "._good.png", ".DS_Store", "Thumbs.db", "x.png.part", "y.crdownload", "~lock.png"):
        (d / name).write_bytes(b"junk")
        exp[name] = "silent"                                                     # 20 hidden, system, partial
    make_pair(d / "__MACOSX", "resource")
    exp["__MACOSX"] = "silent"                                                   # 21 macOS archive leftovers
    (d / "self.png").symlink_to("self.png")
    exp["self.png"] = "ignored"                                                  # 22 a link that loops
    (d / "again").symlink_to(".")
    exp["again"] = "ignored"                                                     # 23 a folder link back up
    make_pair(outside, "private")
    (d / "away.png").symlink_to(outside / "private.png")
    (d / "awaydir").symlink_to(outside)
    exp["away.png"] = exp["awaydir"] = "ignored"                                 # 24 links leaving the folder
    (d / "dangling.png").symlink_to(d / "deleted.png")
    exp["dangling.png"] = "ignored"                                              # 25 broken link
    os.mkfifo(d / "pipe.png")
    exp["pipe.png"] = "ignored"                                                  # 26 a named pipe
    shutil.copy(d / "good.png", d / "good copy.png")
    (d / "good copy.txt").write_text(CAPTION)
    exp["good copy.png"] = "duplicates"                                          # 27 the same photo twice
    shutil.copy(d / "good.png", d / "2024" / "good-recaptioned.png")
    (d / "2024" / "good-recaptioned.txt").write_text("a large red circle, now with a better caption")
    exp["2024/good-recaptioned.png"] = "duplicates"                              # 28 same photo, other caption
    (d / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (d / "IMG_0001.txt").write_text(CAPTION)
    exp["IMG_0001.HEIC"] = "rejected"                                            # 29 a cut-off HEIC
    make_image(d / "scan.tiff", fmt="TIFF")
    (d / "scan.txt").write_text(CAPTION)
    exp["scan.tiff"] = "ignored"                                                 # 36 unsupported, with caption
    exp[pair("cmyk", ".jpg", mode="CMYK", fmt="JPEG")] = "queued"                # 30 CMYK JPEG
    exp[pair("été ☀ 2024", seed=31)] = "queued"                                  # 31 non-ASCII name
    Image.new("1", (8000, 8000)).save(d / "huge.png")
    (d / "huge.txt").write_text(CAPTION)
    exp["huge.png"] = "rejected"                                                 # 32 over max_pixels
    exp[pair("locked", seed=33)] = "rejected" if LIMITED else "queued"
    unreadable(d / "locked.png")                                                 # 33 unreadable file
    (d / "private").mkdir()
    make_pair(d / "private", "inside", seed=34)
    unreadable(d / "private")
    if LIMITED:
        exp["private"] = "rejected"                                              # 34 unreadable folder
    else:  # root that cannot drop privileges reads everything
        exp["private/inside.png"] = "queued"
    (d / "2024" / "holiday" / "link-to-good.png").symlink_to(d / "good.png")
    (d / "2024" / "holiday" / "link-to-good.txt").write_text(CAPTION)
    exp["2024/holiday/link-to-good.png"] = "duplicates"                          # 35 a link inside: followed
    return exp


def outcomes(report: dict, root: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for kind, rows in report.items():
        for r in rows:
            path = r["path"].rsplit(":", 1)[0] if ".jsonl:" in r["path"] else r["path"]  # metadata.jsonl:LINE
            rel = os.path.relpath(path, root)
            out.setdefault(rel, set()).add(kind)
    return out


def check_accounted(report: dict, d: Path, exp: dict[str, str]) -> None:
    got = outcomes(report, d)
    for rel, want in exp.items():
        if want == "silent":
            assert rel not in got, (rel, got.get(rel))
        else:
            assert got.get(rel) == set(want.split("+")), (rel, got.get(rel), [r for k in report.values() for r in k
                                                                              if rel in r["path"]])
    unexpected = set(got) - set(exp)
    assert not unexpected, {u: got[u] for u in unexpected}


def test_a_bad_folder_is_ingested_with_every_entry_accounted_for(shared):
    d, outside, state = shared / "photos", shared / "elsewhere", shared / "state"
    d.mkdir()
    exp = build_bad_folder(d, outside)
    r = cli("init", "--watch", d, "--state", state)
    assert r.returncode == 0, r.stderr
    hand_to(state, NOBODY)
    before = tree_snapshot(outside)
    r = cli("ingest", "--json", "--state", state, user=NOBODY)
    no_traceback(r)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    check_accounted(report, d, exp)
    reasons = {os.path.relpath(x["path"], d): x["reason"] for k in ("rejected", "ignored") for x in report[k]}
    assert reasons["self.png"] == "broken or looping symlink"
    assert "inside the watched folder" in reasons["again"]
    assert "not a regular file" in reasons["pipe.png"]
    assert "metadata.jsonl names 'gone.png'" in json.dumps(report["ignored"])
    if LIMITED:
        assert reasons["locked.png"].startswith("unreadable") and reasons["private"].startswith("unreadable folder")
    assert tree_snapshot(outside) == before
    # what was queued reads back as the user sees it
    st = sqlite3.connect(state / "dopsd.sqlite")
    rows = {Path(p).name: (w, h) for p, w, h in st.execute("select source_path, width, height from samples")}
    st.close()
    assert rows["rotated.jpg"] == (40, 80)  # the size after EXIF orientation (stored 80x40)
    from dopsd_continual.ingest import load_rgb_bytes

    dark = np.asarray(load_rgb_bytes((d / "dark16.png").read_bytes()))
    assert dark.max() <= 1  # 200/65535 of white: a dark photo stays dark
    # a second scan changes nothing and says the same
    again = json.loads(cli("ingest", "--json", "--state", state, user=NOBODY).stdout)
    assert not again["queued"] and not again["updated"]


def test_the_daemon_takes_the_bad_folder_and_status_shows_its_problems(shared):
    d, outside, state = shared / "photos", shared / "elsewhere", shared / "state"
    d.mkdir()
    exp = build_bad_folder(d, outside)
    recipe = shared / "r.toml"
    recipe.write_text((RECIPES_DIR / "toy-shapes.toml").read_text().split("\n[daemon]")[0]
                      + "\n[daemon]\nmin_new_samples = 1000\nrescan_seconds = 1\n")
    assert cli("init", "--recipe", recipe, "--watch", d, "--state", state).returncode == 0
    hand_to(state, NOBODY)
    cmd = [sys.executable, "-m", "dopsd_continual.daemon", "--state", str(state)]
    if DROPS:
        cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
    env = {**os.environ, "DOPSD_STABILITY_SECONDS": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=shared)
    try:
        deadline = time.time() + 600  # waits on the database, generously: a loaded machine is slow, not wrong
        scans: set[float] = set()
        while time.time() < deadline and proc.poll() is None and len(scans) < 2:
            c = sqlite3.connect(f"{(state / 'dopsd.sqlite').as_uri()}?mode=ro", uri=True)
            row = c.execute("select value from meta where key='last_scan'").fetchone() if "meta" in {
                t for (t,) in c.execute("select name from sqlite_master")} else None
            c.close()
            if row:  # a second scan after the first: the daemon keeps scanning past the bad entries
                scans.add(json.loads(row[0])["at"])
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate(timeout=5)
        status = cli("daemon", "status", "--json", "--state", state)
        no_traceback(status)
        s = json.loads(status.stdout)
        assert s["running"] and s["last_scan"]["rejected_files"] > 0
        c = sqlite3.connect(f"{(state / 'dopsd.sqlite').as_uri()}?mode=ro", uri=True)
        files = {os.path.relpath(p, d): o for p, o in c.execute("select path, outcome from files")}
        c.close()
        for rel, want in exp.items():
            if want in ("queued", "duplicates", "rejected") and rel not in ("private", "meta/metadata.jsonl"):
                assert files.get(rel) == {"duplicates": "duplicate"}.get(want, want), (rel, files.get(rel))
        human = cli("daemon", "status", "--state", state)
        assert "last scan:" in human.stdout and "rejected" in human.stdout and "{'" not in human.stdout  # no Python dict
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    log = (state / "logs" / "daemon.log").read_text()
    assert "Traceback" not in log


# ------------------------------------------------------------------------------------------- config


def _state(tmp_path: Path, watch: Path | None = None) -> Path:
    args = ["init", "--state", tmp_path / "s"] + (["--watch", watch] if watch else [])
    assert run(*args).returncode == 0
    return tmp_path / "s"


@pytest.mark.parametrize("text, words", [
    ('recipe = "toy-shapes"\nwatch = "/some/folder"\n', "watch must be a list"),
    ('recipe = "toy-shapes"\nwatch = 3\n', "watch must be a list"),
    ('recipe = "toy-shapes"\nwatch = [1]\n', "watch must be a list"),
    ('recipe = 7\n', "recipe must be a string"),
    ('recipe = "toy-shapes"\nwach = []\n', "unknown key 'wach'"),
    ('recipe = "no-such-recipe"\n', "recipe not found: no-such-recipe"),
    ('recipe = "toy-shapes\n', "is not valid TOML"),
])
def test_config_problems_are_one_line_errors_naming_the_key(tmp_path, text, words):
    root = _state(tmp_path)
    (root / "dopsd.toml").write_text(text)
    r = run("versions", "list", "--state", root)
    no_traceback(r)
    assert r.returncode == 1 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_config_recipe_by_name_relative_watch_and_encoding(tmp_path, watch):
    root = _state(tmp_path)
    make_pair(watch, "a")
    rel = os.path.relpath(watch, root)
    (root / "dopsd.toml").write_text(f'recipe = "toy-shapes"\nwatch = ["{rel}"]\n')  # as init --recipe NAME takes it
    r = run("ingest", "--json", "--state", root)
    assert r.returncode == 0 and len(json.loads(r.stdout)["queued"]) == 1, r.stderr
    (root / "dopsd.toml").write_bytes('recipe = "toy-shapes" # caf\xe9\n'.encode("latin-1"))
    r = run("versions", "list", "--state", root)
    no_traceback(r)
    assert r.returncode == 1 and "not UTF-8" in r.stderr


def test_bad_environment_and_corrupt_database_are_one_line_errors(tmp_path, watch):
    root = _state(tmp_path, watch)
    make_pair(watch, "a")
    r = run("ingest", "--state", root, env={"DOPSD_STABILITY_SECONDS": "abc"})
    no_traceback(r)
    assert r.returncode == 1 and "DOPSD_STABILITY_SECONDS must be a number" in r.stderr
    r = run("versions", "list", "--state", tmp_path / "nowhere", env={"DOPSD_STATE": str(tmp_path / "x")})
    assert r.returncode == 1 and "no state at" in r.stderr
    (root / "dopsd.sqlite").write_bytes(b"this is not a database" * 100)
    for f in ("dopsd.sqlite-wal", "dopsd.sqlite-shm"):
        (root / f).unlink(missing_ok=True)
    for args in (["versions", "list"], ["daemon", "status"], ["ingest"]):
        r = run(*args, "--state", root)
        no_traceback(r)
        assert r.returncode == 1 and "restore it from a backup" in r.stderr, (args, r.stderr)


# ----------------------------------------------------------------------------------- read-only state


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A state with v1 trained (2 steps, no gate) on the heart pack, made once; tests use copies."""
    from dopsd_continual.ingest import ingest_paths
    from dopsd_continual.rounds import run_round
    from dopsd_continual.store import init_state
    from dopsd_continual.toy.packs import write_pack

    base = Path(tempfile.mkdtemp(prefix="dopsd-trained-"))
    base.chmod(0o755)
    write_pack("heart", base / "drop")
    recipe = base / "r.toml"
    recipe.write_text((RECIPES_DIR / "toy-shapes.toml").read_text().replace("\nenabled = true", "\nenabled = false"))
    st = init_state(base / "s", str(recipe), [base / "drop"])
    ingest_paths(st)
    assert run_round(st, steps=2)["verdict"] == "accepted"
    st.close()
    yield base / "s"
    shutil.rmtree(base, ignore_errors=True)


def _trained_state(shared: Path, trained: Path) -> Path:
    shutil.copytree(trained, shared / "s", symlinks=True)
    return shared / "s"


def test_a_read_only_state_lists_samples_and_exports_and_refuses_writes_in_one_line(shared, trained):
    if not LIMITED:
        pytest.skip("running as root in a folder `nobody` cannot enter: no process here is bound by file modes")
    root = _trained_state(shared, trained)
    for p in [root, *root.rglob("*")]:  # a backup others may read but nobody may write
        p.chmod((p.stat().st_mode | 0o444 | (0o111 if p.is_dir() else 0)) & ~0o222)
    out = shared / "out"
    out.mkdir()
    hand_to(out, NOBODY)
    before = tree_snapshot(root)
    as_reader = dict(user=NOBODY)
    for args in (["versions", "list", "--json"], ["versions", "show", "v1"], ["daemon", "status", "--json"],
                 ["queue", "list", "--json"], ["doctor", "--json"], ["versions", "diff", "v0", "v1"]):
        r = cli(*args, "--state", root, **as_reader)
        no_traceback(r)
        assert r.returncode == 0, (args, r.stderr)
    assert [v["id"] for v in json.loads(cli("versions", "list", "--json", "--state", root, **as_reader).stdout)] == ["v0", "v1"]
    r = cli("sample", "a heart", "--out", out / "h.png", "--state", root, **as_reader)
    assert r.returncode == 0 and (out / "h.png").stat().st_size > 0, r.stderr
    r = cli("versions", "export", "v1", "--out", out / "lora", "--state", root, **as_reader)
    assert r.returncode == 0 and (out / "lora" / "pytorch_lora_weights.safetensors").exists(), r.stderr
    for args in (["ingest"], ["train"], ["versions", "rollback"], ["queue", "drop", "1"], ["daemon", "start"],
                 ["init", "--watch", out]):
        r = cli(*args, "--state", root, **as_reader)
        no_traceback(r)
        assert r.returncode == 1 and "read-only" in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert tree_snapshot(root) == before


# ------------------------------------------------------------------------------------ command matrix


def test_a_usage_error_is_one_line_that_says_where_the_help_is(tmp_path):
    """The real `dopsd` entry point (typer's runner would not go through it): an unknown command or option, a
    missing or malformed argument: one `error:` line, exit 2, no box; a group alone still shows its help."""
    def dopsd(*args):
        return subprocess.run([sys.executable, "-m", "dopsd_continual.cli_entry", *args], capture_output=True, text=True,
                              timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})

    for args, says in ((["queue", "lisst"], "Did you mean 'list'"), (["train", "--bogus"], "--bogus"),
                       (["config", "set"], "Missing argument 'key'"), (["train", "--steps", "abc"], "'--steps'")):
        r = dopsd(*args)
        assert r.returncode == 2 and not r.stdout, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, (args, r.stderr)
        assert f"`dopsd {' '.join(a for a in args if a in ('queue', 'config', 'set', 'train'))} --help`" in r.stderr
    r = dopsd("queue")
    assert r.returncode == 2 and "list" in r.stdout + r.stderr and "error:" not in r.stderr
    r = dopsd("versions", "list", "--state", str(tmp_path / "none"))  # the project's own errors: as before
    assert r.returncode == 1 and r.stderr.startswith("error: no state at")
    assert dopsd("--help").returncode == 0


def test_every_command_meets_bad_paths_numbers_and_state_without_a_traceback(shared, trained):
    root = _trained_state(shared, trained)
    a_file = shared / "file.txt"
    a_file.write_text("x")
    a_dir = shared / "adir"
    a_dir.mkdir()
    empty_state = shared / "empty"
    assert run("init", "--state", empty_state).returncode == 0
    every = (["versions", "list"], ["versions", "show", "v1"], ["queue", "list"], ["daemon", "status"], ["daemon", "stop"],
             ["daemon", "install-service", "--unit-dir", a_dir])
    failing_on_empty = (["versions", "rollback"], ["versions", "promote", "v9"], ["versions", "squash"],
                        ["versions", "diff", "v0", "v7"], ["versions", "export", "v1", "--out", a_dir / "e"],
                        ["queue", "retry", "99"], ["queue", "drop", "99"], ["ingest"], ["train"],
                        ["sample", "x", "--version", "v3"], ["eval"])
    cases = [[*args, "--state", s] for s in (a_file, shared / "missing") for args in every + failing_on_empty]
    cases += [[*args, "--state", empty_state] for args in failing_on_empty]
    for args in (["sample", "x", "--steps", "-3"], ["sample", "x", "--steps", "0"], ["sample", "x", "-n", "0"],
                 ["sample", "x", "-n", "10000"], ["sample", "x", "--seed", "-1"], ["sample", "x", "--version", "v42"],
                 ["sample", "x", "--out", a_file.with_suffix(".gif")], ["sample", "x", "--out", shared / "no" / "x.png"],
                 ["train", "--steps", "0"], ["train", "--steps", "-1"], ["train", "--lr", "-1"], ["train", "--lr", "nan"],
                 ["train", "--objective", "magic"], ["versions", "squash", "--rank", "0"],
                 ["versions", "export", "v1", "--out", a_file], ["versions", "export", "v1", "--format", "ckpt", "--out", a_dir],
                 ["versions", "export", "v0", "--out", a_dir], ["versions", "show", "nope"], ["versions", "rollback", "v0x"],
                 ["queue", "list", "--status", "rejected"], ["queue", "retry", "abc"], ["ingest", shared / "gone"],
                 ["init", "--recipe", "no-such"], ["init", "--watch", a_file],
                 ["eval", "v0"]):
        cases.append([*args, "--state", root])
    cases += [["toy", "pack", "nope", "--out", a_dir], ["toy", "pack", "heart"]]
    for args in cases:
        r = run(*args)
        no_traceback(r)
        assert r.returncode in (1, 2), (args, r.returncode, r.stdout[-500:], r.stderr[-500:])
        if r.returncode == 1:
            assert r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not list(shared.glob(".*.tmp-*"))  # nothing half-written
    # the numbers that used to slip through: --steps 0 is refused, not silently the native 4
    r = run("sample", "x", "--steps", "0", "--state", root)
    assert r.returncode == 2 and "--steps" in r.stderr


def test_sample_out_names_a_folder_or_a_format_by_its_suffix(shared, trained):
    root = _trained_state(shared, trained)
    (shared / "pics").mkdir()
    r = run("sample", "a heart", "--out", shared / "pics", "--json", "--state", root)
    assert r.returncode == 0, r.stderr
    assert Path(json.loads(r.stdout)["path"]).parent == shared / "pics"
    for name, fmt in (("x.jpg", "JPEG"), ("x.webp", "WEBP"), ("x.PNG", "PNG")):
        r = run("sample", "a heart", "--out", shared / name, "--state", root)
        assert r.returncode == 0, r.stderr
        with Image.open(shared / name) as im:
            assert im.format == fmt
    with Image.open(shared / "x.jpg") as im:
        assert json.loads(im.info["comment"])["prompt"] == "a heart"


# ----------------------------------------------------------------------------------------- guard rails


def test_reinit_onto_another_model_needs_force_and_keeps_the_versions(shared, trained):
    root = _trained_state(shared, trained)
    other = shared / "other.toml"
    other.write_text((RECIPES_DIR / "toy-shapes.toml").read_text().replace('source = "embedded:toy-shapes"', 'source = "elsewhere/model"', 1))
    assert 'source = "elsewhere/model"' in other.read_text()
    r = run("init", "--recipe", other, "--state", root)
    no_traceback(r)
    assert r.returncode == 1 and "--force" in r.stderr and "1 version(s)" in r.stderr
    r = run("init", "--recipe", other, "--force", "--state", root)
    assert r.returncode == 0, r.stderr
    listed = json.loads(run("versions", "list", "--json", "--state", root).stdout)
    assert [v["id"] for v in listed] == ["v0", "v1"] and [v["active"] for v in listed] == [True, False]
    r = run("versions", "promote", "v1", "--state", root)
    assert r.returncode == 1 and "was trained on toy-shapes" in r.stderr


def test_a_corrupt_active_version_names_the_rollback(shared, trained):
    root = _trained_state(shared, trained)
    delta = root / "adapters" / "v1" / "delta.safetensors"
    delta.write_bytes(delta.read_bytes()[:100])
    r = run("sample", "a heart", "--out", shared / "x.png", "--state", root)
    no_traceback(r)
    assert r.returncode == 1 and "`dopsd versions rollback v0`" in r.stderr, r.stderr
    assert run("versions", "rollback", "v0", "--state", root).returncode == 0
    assert run("sample", "a heart", "--out", shared / "x.png", "--state", root).returncode == 0


def test_doctor_exit_status_daemon_warning_and_output_for_pipes(tmp_path, watch):
    root = _state(tmp_path)
    (root / "dopsd.toml").write_text('recipe = "flux2-klein-4b"\n')
    r = run("doctor", "--state", root)
    assert r.returncode == 1 and "not ok" in r.stdout  # no weights and no GPU here
    root2 = _state(tmp_path / "b")
    r = run("daemon", "start", "--state", root2)
    try:
        assert r.returncode == 0 and "no watched folder" in r.stderr, r.stderr
    finally:
        run("daemon", "stop", "--state", root2)
    # piped tables keep whole cells
    long = "a very long caption that a terminal of 80 columns would have cut into pieces " * 3
    make_pair(watch, "a", long.strip())
    root3 = _state(tmp_path / "c", watch)
    run("ingest", "--state", root3)
    r = run("queue", "list", "--state", root3)
    assert long.strip()[:60] in r.stdout
    assert all(len(line) < 1000 for line in r.stdout.splitlines())
    assert str(watch / "a.png") in r.stdout  # the path whole, on one line


def test_train_with_nothing_queued_is_one_line_without_a_progress_bar(tmp_path):
    root = _state(tmp_path)
    r = run("train", "--state", root)
    assert r.returncode == 1 and "no queued samples" in r.stderr
    assert r.stdout == ""


def test_queue_list_help_names_the_real_statuses():
    from dopsd_continual.cli import SAMPLE_STATUS_HELP
    from dopsd_continual.store import SAMPLE_STATUSES

    assert SAMPLE_STATUS_HELP == ", ".join(SAMPLE_STATUSES)


def test_brackets_in_paths_captions_and_errors_are_text_not_markup(tmp_path):
    """Rich reads "[/x]" as a closing tag: every path, caption and reason we print is escaped."""
    root = tmp_path / "[/x] [red]"
    drop = root / "drop [bold]"
    drop.mkdir(parents=True)
    (drop / "a.png").write_bytes(b"not a png")
    (drop / "a.txt").write_text("a [/b] caption [red]x")
    from conftest import make_pair

    make_pair(drop, "good", "my [/i] mug [red]")
    r = run("init", "--state", root / "s", "--watch", drop)
    assert r.returncode == 0 and str(root / "s") in r.stdout
    r = run("ingest", "--state", root / "s")
    assert r.returncode == 0 and str(drop / "a.png") in r.stdout.replace("\n", "")
    r = run("queue", "list", "--state", root / "s")
    assert r.returncode == 0 and "my [/i] mug [red]" in r.stdout
    r = run("versions", "show", "v9", "--state", root / "s")
    assert r.returncode == 1 and r.stderr.strip() == "error: no version 'v9' (see `dopsd versions list`)"
    r = run("train", "--state", root / "nope")
    assert r.returncode == 1 and str(root / "nope") in r.stderr
