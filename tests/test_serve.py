"""`dopsd sample` drawn by the running daemon: the same file as in-process, a fallback when the daemon cannot
answer, a request during a round waits and leaves the round untouched, prompt features kept on disk."""

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import make_pair
from test_daemon import fast_recipe, wait_for

from dopsd_continual.store import init_state, open_state

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # sample_latency.make_chain: versions without training
PROMPT = "a large red circle in the center, blue background"


def _env(tmp_path):
    return {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp_path), "DOPSD_STABILITY_SECONDS": "0"}


def dopsd(tmp_path, *args, timeout=600):
    r = subprocess.run([sys.executable, "-m", "dopsd_continual.cli_entry", *map(str, args)], capture_output=True,
                       text=True, env=_env(tmp_path), timeout=timeout)
    assert r.returncode == 0 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    st = init_state(tmp / "s", None, [])
    from sample_latency import make_chain

    deep = make_chain(st, 5)
    st.close()
    dopsd(tmp, "daemon", "start", "--state", tmp / "s")
    yield tmp, deep
    dopsd(tmp, "daemon", "stop", "--state", tmp / "s")


@pytest.mark.parametrize("version", ["v0", "v5"])
def test_the_daemons_picture_is_the_in_process_one_byte_for_byte(served, version):
    tmp, _ = served
    state = tmp / "s"
    out = json.loads(dopsd(tmp, "sample", PROMPT, "--version", version, "--seed", "3", "--out", tmp / f"d-{version}.png",
                           "--json", "--state", state).stdout)
    assert out["drawn_by"] == "daemon"
    from dopsd_continual.sampling import sample

    st = open_state(state)
    sample(st, PROMPT, version, None, 3, 1, tmp / f"p-{version}.png")  # this process, its own model
    st.close()
    assert (tmp / f"d-{version}.png").read_bytes() == (tmp / f"p-{version}.png").read_bytes()
    again = json.loads(dopsd(tmp, "sample", PROMPT, "--version", version, "--seed", "3", "-n", "2", "--out",
                             tmp / f"g-{version}.jpg", "--json", "--state", state).stdout)
    assert again["drawn_by"] == "daemon" and again["n"] == 2
    log = (state / "logs" / "daemon.log").read_text()  # what the daemon drew is in its log, without the prompt
    assert f"drew for dopsd sample: {version}, 4 steps, a grid of 2, seeds 3-4, in " in log and PROMPT not in log
    st = open_state(state)
    sample(st, PROMPT, version, None, 3, 2, tmp / f"h-{version}.jpg")  # a grid, encoded as JPEG here and there
    st.close()
    assert (tmp / f"g-{version}.jpg").read_bytes() == (tmp / f"h-{version}.jpg").read_bytes()


def test_the_socket_is_the_owners_alone(served):
    tmp, _ = served
    sock = json.loads((tmp / "s" / "daemon.json").read_text())["sample_socket"]
    assert Path(sock).parent == (tmp / "s").resolve() and (os.stat(sock).st_mode & 0o777) == 0o600


def test_the_model_never_enters_the_daemons_own_process(served):
    """It lives in the daemon's drawing process, which ends when the model is released: the daemon stays small."""
    tmp, _ = served
    out = json.loads(dopsd(tmp, "sample", PROMPT, "--out", tmp / "m.png", "--json", "--state", tmp / "s").stdout)
    assert out["drawn_by"] == "daemon"
    pid = json.loads((tmp / "s" / "daemon.json").read_text())["pid"]
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" not in maps and "torch/lib" not in maps


def test_a_light_process_writes_what_the_daemon_drew_and_leaves_the_rest_to_the_full_command(served):
    """`dopsd sample` answered by the daemon loads neither the CLI's libraries nor PIL nor torch (client.py);
    its file and output are the full command's (byte for byte above); a refusal is said by the full command,
    in one line, with no second request."""
    tmp, _ = served
    state = tmp / "s"
    probe = ("import json, sys; from dopsd_continual.cli_entry import main; main(); "
             "sys.stderr.write(json.dumps(sorted(m for m in ('typer', 'rich', 'torch', 'PIL', 'numpy') if m in sys.modules)))")
    for folder in (False, True):
        out = tmp / "light" if folder else tmp / "light.png"
        if folder:
            out.mkdir()
        r = subprocess.run([sys.executable, "-c", probe, "sample", PROMPT, "--seed=4", "--json", "--out", str(out),
                            "--state", str(state)], capture_output=True, text=True, env=_env(tmp), timeout=600)
        assert r.returncode == 0 and json.loads(r.stderr.splitlines()[-1]) == [], r.stderr
        res = json.loads(r.stdout)
        assert res["drawn_by"] == "daemon" and res["seed"] == 4 and res["version"] == "v5"
        assert Path(res["path"]) == (out / "sample-v5-s4.png" if folder else out) and Path(res["path"]).exists()
    for words in ([], ["--json"], ["-n", "2"]):  # the light process's output is the full command's (asked through the daemon too)
        args = ["sample", PROMPT, "--seed", "4", "--out", str(tmp / "same.png"), *words, "--state", str(state)]
        light = dopsd(tmp, *args).stdout
        full = subprocess.run([sys.executable, "-c", "from dopsd_continual.cli import app; app()", *args],
                              capture_output=True, text=True, env=_env(tmp), timeout=600).stdout
        if "--json" in words:  # the same fields, timings apart
            light, full = ({k: (sorted(v) if k == "phases" else v) for k, v in json.loads(o).items()} for o in (light, full))
        assert light == full, (light, full)
        if words == ["-n", "2"]:
            assert light.strip().endswith("(v5, 4 steps, a grid of 2, seeds 4-5)"), light
    r = subprocess.run([sys.executable, "-m", "dopsd_continual.cli_entry", "sample", PROMPT, "--version", "v99",
                        "--state", str(state)], capture_output=True, text=True, env=_env(tmp), timeout=600)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "v99" in r.stderr and "Traceback" not in r.stderr


def test_the_light_reader_takes_what_the_full_command_takes_or_leaves_it():
    from dopsd_continual.client import parse

    a = parse(["a red circle", "--version", "v2", "--steps=8", "-n", "3", "--seed", "5", "--json", "--no-wait"])
    assert (a["prompt"], a["version"], a["steps"], a["n"], a["seed"], a["as_json"], a["no_wait"]) == (
        "a red circle", "v2", 8, 3, 5, True, True)
    for argv in (["--help"], [], ["p", "q"], ["p", "--steps", "0"], ["p", "-n", "65"], ["p", "--seed", "x"],
                 ["p", "--out"], ["p", "--frobnicate"], ["p", "-n3"], ["--", "p"], ["p", "--seed", "\u0663"],
                 ["p", "--state="], ["p", "--steps", "1_0"]):
        assert parse(argv) is None, argv


def test_a_daemon_that_goes_away_mid_request_leaves_the_cli_drawing_itself(tmp_path):
    """A daemon lock held, a socket that reads the request and closes without a word: the CLI draws the same
    picture in its own process, with no alarm."""
    import fcntl

    st = init_state(tmp_path / "s", None, [])
    st.close()
    lock = os.open(tmp_path / "s" / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    path = tmp_path / "s" / "dead.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    (tmp_path / "s" / "daemon.json").write_text(json.dumps({"pid": os.getpid(), "sample_socket": str(path)}))
    got = []

    def die():
        conn, _ = server.accept()
        got.append(conn.makefile("rb").readline())
        conn.close()

    t = threading.Thread(target=die, daemon=True)
    t.start()
    try:
        r = dopsd(tmp_path, "sample", PROMPT, "--out", tmp_path / "a.png", "--json", "--state", tmp_path / "s")
        server.settimeout(0.5)
        with pytest.raises(TimeoutError):  # no second request waits in the socket's queue
            server.accept()
    finally:
        os.close(lock)
        server.close()
    assert json.loads(got[0])["prompt"] == PROMPT  # it asked the daemon first, and once
    assert json.loads(r.stdout)["drawn_by"] == "this process" and "Traceback" not in r.stderr
    from dopsd_continual.sampling import sample

    st = open_state(tmp_path / "s")
    sample(st, PROMPT, None, None, 0, 1, tmp_path / "b.png")
    st.close()
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_a_prompt_seen_before_needs_no_text_encoder(tmp_path):
    from dopsd_continual.sampling import PromptCache, Sampler, draw, request

    st = init_state(tmp_path / "s", None, [])
    req = request(st, PROMPT, None, None, 1, 1)
    assert not PromptCache(st).has([PROMPT])
    first, _, _ = draw(st, req)
    assert PromptCache(st).has([PROMPT])
    cold = Sampler(st, encoders=False, prompt_cache=True)
    assert cold.pipe.text_encoder is None
    again = cold.images([PROMPT], [1], st.recipe["model"]["steps"], "v0")
    from dopsd_continual.sampling import to_pil

    assert to_pil(again[0]).tobytes() == first.tobytes()
    st.close()


def _round_delta(tmp_path, name: str, ask_during: bool) -> tuple[dict, list[str]]:
    """A daemon round on two pairs; with ask_during, a `dopsd sample` sent while the round runs. The round is
    held at the render lock (which it takes right after its row says running) until the request has said what
    it waits for, so the request lands inside the round on a slow machine and a fast one alike."""
    from safetensors.torch import load_file

    from dopsd_continual.rounds import render_lock

    watch = tmp_path / f"{name}-drop"
    watch.mkdir()
    state = tmp_path / name
    st = init_state(state, str(fast_recipe(tmp_path, steps=3)), [watch])
    lines, cli = [], None

    def count(sql: str) -> int:
        return st.conn.execute(sql).fetchone()[0]

    dopsd(tmp_path, "daemon", "start", "--state", state)
    try:
        with render_lock(st):
            for i in range(2):
                make_pair(watch, f"p{i}", seed=i)
            assert wait_for(lambda: count("select count(*) from rounds where status='running'"), 600)
            if ask_during:
                cli = subprocess.Popen([sys.executable, "-m", "dopsd_continual.cli_entry", "sample", PROMPT, "--out",
                                        tmp_path / f"{name}.png", "--json", "--state", state], env=_env(tmp_path),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                lines.append(cli.stderr.readline().strip())  # the daemon has said what the request waits for
                now = dopsd(tmp_path, "sample", PROMPT, "--no-wait", "--out", tmp_path / f"{name}-now.png", "--json",
                            "--state", state)  # will not wait: drawn in its own process, beside the round
                assert json.loads(now.stdout)["drawn_by"] == "this process" and "busy" in now.stderr, now.stderr
        assert wait_for(lambda: count("select count(*) from versions where id='v1' and status in ('accepted','rejected')"), 900)
        if cli is not None:
            out, err = cli.communicate(timeout=600)
            lines += err.splitlines()
            assert cli.returncode == 0 and json.loads(out)["drawn_by"] == "daemon", err
    finally:
        if cli is not None and cli.poll() is None:
            cli.kill()
        dopsd(tmp_path, "daemon", "stop", "--state", state)
        st.close()
    return load_file(str(state / "adapters" / "v1" / "delta.safetensors")), lines


def test_a_request_during_a_round_waits_for_it_and_leaves_the_round_as_it_was(tmp_path):
    plain, _ = _round_delta(tmp_path, "a", ask_during=False)
    asked, lines = _round_delta(tmp_path, "b", ask_during=True)
    assert plain.keys() == asked.keys() and all(torch.equal(plain[k], asked[k]) for k in plain)  # bit for bit
    assert lines[0] == "waiting for round v1, step 0/3", lines
    assert (tmp_path / "b.png").exists()


def test_the_socket_folder_outside_the_state_must_be_ours_alone(tmp_path):
    from dopsd_continual.serve import _own_private_dir

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(OSError, match="alone"):
        _own_private_dir(shared)
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    (tmp_path / "mine").mkdir(mode=0o700)
    with pytest.raises(OSError, match="alone"):
        _own_private_dir(tmp_path / "link")  # a planted symlink is no folder of ours
    _own_private_dir(tmp_path / "new")
    assert (os.stat(tmp_path / "new").st_mode & 0o777) == 0o700


def test_a_read_only_state_that_once_ran_a_daemon_still_samples(tmp_path):
    """A state on a read-only file system whose daemon.lock stayed behind: no daemon to ask, and no error."""
    from smalldisk import mount_tmpfs, unmount

    from dopsd_continual.serve import ask_daemon

    disk = tmp_path / "ro"
    disk.mkdir()
    if not mount_tmpfs(disk, 16):
        pytest.skip("this machine does not let the test mount a file system (needs root)")
    try:
        (disk / "daemon.lock").write_text("")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True)
        with pytest.raises(OSError):
            os.open(disk / "daemon.lock", os.O_RDWR)  # truly read-only, even for root
        assert ask_daemon(disk, {"prompt": PROMPT}) is None
    finally:
        unmount(disk)


def test_the_drawing_process_draws_the_dashboards_pictures_as_this_process_does(tmp_path):
    """The dashboard inside the daemon renders through Daemon.model_turn: a comparison sheet from the daemon's
    drawing process equals the one drawn here, and releasing the warm model ends that process."""
    from dopsd_continual.daemon import Daemon
    from dopsd_continual.sampling import Sampler, render

    st = init_state(tmp_path / "s", None, [])
    d = Daemon(st.root, install_signals=False, rounds_apart=True)
    job = {"kind": "compare", "a": "v0", "b": "v0"}
    try:
        with d.model_turn(st) as drawer:
            theirs = drawer(job)
        proc = d._drawer.proc
        assert proc.is_alive() and proc.pid != os.getpid()
        ours = render(st, Sampler(st), job)
        assert theirs["png"] == ours["png"] and theirs["prompts"] == ours["prompts"]
    finally:
        d.release_drawer()
        d.state.close()
    assert d._drawer is None and not proc.is_alive()
    st.close()
