import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_pair
from typer.testing import CliRunner

from dopsd_continual.cli import app
from dopsd_continual.errors import UserError
from dopsd_continual.recipe import validate
from dopsd_continual.store import SCHEMA_VERSION, open_db

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_init_creates_state_with_wal_and_schema(tmp_path, watch):
    r = run("init", "--state", tmp_path / "s", "--watch", watch)
    assert r.exit_code == 0, r.output
    for d in ("blobs", "adapters", "cache", "reports", "logs"):
        assert (tmp_path / "s" / d).is_dir()
    db = open_db(tmp_path / "s" / "dopsd.sqlite")
    assert db.execute("pragma journal_mode").fetchone()[0] == "wal"
    assert db.execute("select value from meta where key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    assert db.execute("select status from versions where id='v0'").fetchone()[0] == "accepted"
    # re-running init keeps what is there
    assert run("init", "--state", tmp_path / "s").exit_code == 0
    assert str(watch) in (tmp_path / "s" / "dopsd.toml").read_text()


def test_bad_recipe_and_paths_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nlr = "fast"\n[model]\nname="x"\nbackend="flux2-klein"\nsource="y"\n')
    r = run("init", "--state", tmp_path / "s", "--recipe", bad)
    assert r.exit_code == 1 and "train.lr" in r.output and "Traceback" not in r.output
    r = run("init", "--state", tmp_path / "s", "--watch", tmp_path / "nope")  # a folder to make: made, and said
    assert r.exit_code == 0 and "created the watched folder" in r.output and (tmp_path / "nope").is_dir()
    (tmp_path / "afile").write_text("x")
    r = run("init", "--state", tmp_path / "s", "--watch", tmp_path / "afile")
    assert r.exit_code == 1 and "afile" in r.output and "not a folder" in r.output
    r = run("queue", "list", "--state", tmp_path / "missing")
    assert r.exit_code == 1 and "dopsd init" in r.output
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    r = run("init", "--state", tmp_path / "s", "--recipe", broken)
    assert r.exit_code == 1 and "not valid TOML" in r.output


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"model": {"backend": "flux2-klein", "source": "x"}}, "model.name"),
        ({"model": {"name": "a", "backend": "nope", "source": "x"}}, "model.backend"),
        ({"model": {"name": "a", "backend": "flux2-klein", "source": "x"}, "train": {"bogus": 1}}, "train.bogus"),
        ({"model": {"name": "a", "backend": "flux2-klein", "source": "x"}, "train": {"rank": 0}}, "train.rank"),
        ({"model": {"name": "a", "backend": "flux2-klein", "source": "x"}, "weird": {}}, "[weird]"),
        ({"model": {"name": "a", "backend": "flux2-klein", "source": "x"}, "train": {"gradient_checkpointing": 1.5}},
         "train.gradient_checkpointing"),
    ],
)
def test_recipe_validation_names_the_key(raw, key):
    with pytest.raises(UserError, match=key.replace("[", r"\[").replace("]", r"\]")):
        validate(raw)


def test_shipped_recipes_are_valid():
    from dopsd_continual.recipe import RECIPES_DIR, load_recipe

    for p in RECIPES_DIR.glob("*.toml"):
        load_recipe(p)


def test_ingest_json_queue_list_retry_drop(tmp_path, watch):
    run("init", "--state", tmp_path / "s", "--watch", watch)
    make_pair(watch, "a")
    (watch / "b.png").write_bytes(b"")
    (watch / "b.txt").write_text("x")
    r = run("ingest", "--state", tmp_path / "s", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert set(out) >= {"queued", "duplicates", "ignored", "rejected"}
    assert out["rejected"][0]["reason"].startswith("empty file") and out["rejected"][0]["path"].endswith("b.png")
    rows = json.loads(run("queue", "list", "--state", tmp_path / "s", "--json").stdout)
    assert [set(r) >= {"id", "status", "sha256", "caption", "source_path"} for r in rows] == [True]
    sid = rows[0]["id"]
    assert run("queue", "drop", sid, "--state", tmp_path / "s").exit_code == 0
    assert json.loads(run("queue", "list", "--status", "queued", "--state", tmp_path / "s", "--json").stdout) == []
    assert run("queue", "retry", sid, "--state", tmp_path / "s").exit_code == 0
    assert len(json.loads(run("queue", "list", "--status", "queued", "--state", tmp_path / "s", "--json").stdout)) == 1
    assert run("queue", "drop", 999, "--state", tmp_path / "s").exit_code == 1
    assert run("queue", "list", "--status", "nope", "--state", tmp_path / "s").exit_code == 1


def test_ingest_given_paths_and_missing_path(tmp_path, watch):
    run("init", "--state", tmp_path / "s")
    make_pair(watch, "a")
    r = run("ingest", watch, tmp_path / "gone", "--state", tmp_path / "s", "--json")
    out = json.loads(r.stdout)
    assert len(out["queued"]) == 1  # the rest is still taken
    assert out["rejected"] == [{"path": str(tmp_path / "gone"), "reason": "path does not exist"}]
    assert r.exit_code == 1  # and the missing path is an error, not a quiet success


@pytest.mark.parametrize("args", [["versions", "list"], ["versions", "show", "v0"], ["versions", "diff", "v0", "v0"],
                                  ["queue", "list"], ["daemon", "status"], ["--help"], ["--version"]])
def test_commands_that_read_the_database_import_no_model_library(tmp_path, args):
    """`versions list` and the like answer at once: torch, diffusers and transformers are never imported, nor
    sqlite-utils (it imports numpy; reads go through the plain connection). bench/cli_latency.py times them."""
    run("init", "--state", tmp_path / "s")
    code = ("import sys\nfrom dopsd_continual.cli import app\n"
            f"sys.argv = ['dopsd'] + {args!r} + ([] if sys.argv[1:] == ['-'] else ['--state', {str(tmp_path / 's')!r}])\n"
            "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'sqlite_utils', 'numpy') if m in sys.modules),"
            " file=sys.stderr)\n")
    extra = ["-"] if args[0].startswith("--") else []
    r = subprocess.run([sys.executable, "-c", code, *extra], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "[]", r.stderr
    if args == ["--version"]:
        assert r.stdout.startswith("dopsd ")


def test_queue_retry_and_drop_take_several_ids_a_status_or_all(tmp_path):
    from conftest import make_pair

    from dopsd_continual.ingest import ingest_paths
    from dopsd_continual.store import init_state

    drop = tmp_path / "drop"
    for i in range(5):
        make_pair(drop, f"p{i}", seed=i)
    st = init_state(tmp_path / "s", None, [drop])
    ingest_paths(st)
    st.close()
    s = tmp_path / "s"

    def statuses():
        return [row["status"] for row in json.loads(run("queue", "list", "--json", "--state", s).output)]

    assert run("queue", "drop", "1", "2", "3", "--state", s).exit_code == 0
    assert sorted(statuses()) == ["dropped"] * 3 + ["queued"] * 2
    assert run("queue", "retry", "--status", "dropped", "--state", s).exit_code == 0
    assert statuses() == ["queued"] * 5
    assert run("queue", "drop", "--all", "--state", s).exit_code == 0 and statuses() == ["dropped"] * 5
    r = run("queue", "retry", "1", "99", "--state", s)  # one unknown id: nothing changes, one line
    assert r.exit_code == 1 and "99" in r.output and statuses() == ["dropped"] * 5
    r = run("queue", "retry", "--state", s)
    assert r.exit_code == 1 and "--status S, or --all" in r.output


def test_words_flags_show_no_value_and_user_text_is_not_markup(tmp_path):
    for args in (["--help"], ["init", "--help"], ["versions", "show", "--help"]):
        r = run(*args)
        assert r.exit_code == 0 and "<bool>" not in r.output, r.output
    assert "<path>" in run("init", "--help").output  # an option that takes a value still says what
    assert "my [trigger] logo" in run("toy", "pack", "--list").output  # not eaten as rich markup


def test_versions_show_reads_as_a_page_and_json_keeps_the_record(tmp_path):
    import re

    run("init", "--state", tmp_path / "s")
    r = run("versions", "show", "v0", "--state", tmp_path / "s")
    assert r.exit_code == 0 and r.output.startswith("v0 (active): accepted, parent -, created ")
    assert re.search(r"created \d{4}-\d\d-\d\d \d\d:\d\d:\d\d,", r.output) and "{" not in r.output
    v = json.loads(run("versions", "show", "v0", "--json", "--state", tmp_path / "s").stdout)
    assert v["id"] == "v0" and isinstance(v["created_at"], float) and re.fullmatch(r"[\d-]+ [\d:]+", v["created"])


def test_config_set_get_unset_are_checked_like_the_recipe_and_the_state_reads_them(tmp_path):
    from dopsd_continual.store import open_state

    s = tmp_path / "s"
    run("init", "--state", s)
    r = run("config", "set", "daemon.quiet_seconds", "10", "--state", s)
    assert r.exit_code == 0 and "daemon.quiet_seconds = 10 (was 120)" in r.output
    assert "[daemon]" not in r.output  # no daemon runs: none to restart
    r = run("config", "set", "daemon.cron", "[red]bad[/red]", "--state", s)
    assert r.exit_code == 1 and "refused, nothing written: daemon.cron '[red]bad[/red]'" in r.output, r.output
    assert "config unset" not in r.output and "dopsd.toml" not in r.output  # a refused value is nowhere to unset
    assert "already queued keep theirs" in run("config", "set", "ingest.default_caption", "a photo", "--state", s).output
    assert run("config", "unset", "ingest.default_caption", "--state", s).exit_code == 0
    assert run("config", "set", "daemon.cron", "0 3 * * *", "--state", s).exit_code == 0  # text stays text
    assert run("config", "set", "gate.seeds", "[0, 1, 2]", "--state", s).exit_code == 0
    for words in (["set", "ingest.trigger_word", "[bold]ohwx[/x]"], ["get", "ingest.trigger_word"], ["get"],
                  ["unset", "ingest.trigger_word"]):  # a value in brackets is shown as written, never read as markup
        r = run("config", *words, "--state", s)
        assert r.exit_code == 0 and ("[bold]ohwx[/x]" in r.output or words[0] == "unset"), r.output
    assert "(recipe [retention])" in run("gc", "--state", s).output
    st = open_state(s)
    assert (st.recipe["daemon"]["quiet_seconds"], st.recipe["daemon"]["cron"], st.recipe["gate"]["seeds"]) == (10, "0 3 * * *", [0, 1, 2])
    st.close()
    before = (s / "dopsd.toml").read_text()
    for args, words in ((["daemon.quiet_seconds", "soon"], "daemon.quiet_seconds must be"),
                        (["model.source", "other/model"], "dopsd init --recipe"),
                        (["gate.nope", "1"], "unknown setting 'gate.nope'"),
                        (["train.steps", "0"], "train.steps must be >= 1")):
        r = run("config", "set", *args, "--state", s)
        assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output
    assert (s / "dopsd.toml").read_text() == before  # a refused value writes nothing
    assert json.loads(run("config", "get", "daemon.cron", "--json", "--state", s).stdout) == {
        "key": "daemon.cron", "value": "0 3 * * *", "from": "settings"}
    assert run("config", "unset", "daemon.cron", "--state", s).exit_code == 0
    assert json.loads(run("config", "get", "--json", "--state", s).stdout) == {"daemon.quiet_seconds": 10, "gate.seeds": [0, 1, 2]}
    assert "(the recipe)" in run("config", "get", "daemon.cron", "--state", s).output
    assert run("init", "--state", s).exit_code == 0  # init again keeps the settings
    assert "daemon.quiet_seconds" in (s / "dopsd.toml").read_text()


def test_what_config_writes_reads_back_and_what_it_cannot_hold_is_refused(tmp_path):
    import math
    import tomllib

    from dopsd_continual.store import toml_value

    for v in ["cat 🐱", "a\x7fb", "tab\there", 'q"uote', "back\\slash", -1e-05, 3, [0, 1], True, float("inf")]:
        back = tomllib.loads(f"v = {toml_value(v)}")["v"]
        assert back == v or (isinstance(v, float) and math.isinf(v) and math.isinf(back))
    with pytest.raises(UserError, match="not UTF-8"):
        toml_value("\udcff")
    s = tmp_path / "s"
    run("init", "--state", s)
    assert run("config", "set", "ingest.default_caption", "cat 🐱", "--state", s).exit_code == 0
    assert run("config", "set", "gate.min_concept_gain", "-0.5", "--state", s).exit_code == 0  # a negative value
    assert run("versions", "list", "--state", s).exit_code == 0  # the state still opens
    for args, words in ((["daemon.cron", "garbage"], "not a crontab line"), (["gate.max_drift", "inf"], "finite"),
                        (["daemon.interval_minutes", "0"], "must be > 0")):
        r = run("config", "set", *args, "--state", s)
        assert r.exit_code == 1 and words in r.output, r.output
    r = run("config", "unset", "gate.nope", "--state", s)
    assert r.exit_code == 1 and "not set for this state" in r.output
    with open(s / "dopsd.toml", "a") as f:  # a setting written by hand as a table, and a bad value
        f.write("\n[settings.daemon]\nquiet_seconds = -5\n")
    r = run("versions", "list", "--state", s)
    assert r.exit_code == 1 and "daemon.quiet_seconds must be >= 0" in r.output and "config unset" in r.output
    assert run("config", "unset", "daemon.quiet_seconds", "--state", s).exit_code == 0  # the way back
    assert run("versions", "list", "--state", s).exit_code == 0


def test_neighbour_prompts_leave_the_concept_out_and_never_pick_the_caption_itself():
    from dopsd_continual.gate import neighbour_prompts

    pool = ["a large red circle on the left, black background", "a small blue square on the right, white background",
            "a large red heart on the left, black background"]
    assert neighbour_prompts(["a large red heart on the left, black background"], pool[:2]) == [pool[0]]
    assert neighbour_prompts(["a large red heart on the left, black background"], pool) == [pool[0]]  # not itself
    assert neighbour_prompts(["my zxq logo, black background", "zxq on the left"], pool[:2], "zxq") == [pool[0]]
    assert neighbour_prompts([], pool) == []


def test_times_read_local_to_the_second_with_how_far_off():
    from datetime import UTC, datetime, timedelta

    from dopsd_continual.status import local_time

    soon = (datetime.now(UTC) + timedelta(minutes=12)).isoformat(timespec="seconds")
    assert local_time(soon).endswith("(in 12 min)") or local_time(soon).endswith("(in 11 min)")
    later = (datetime.now(UTC) + timedelta(hours=23)).isoformat(timespec="seconds")
    assert local_time(later).endswith("h)") and "." not in local_time(later).split(" (")[0]


def test_the_default_picture_name_never_replaces_a_file_and_an_empty_prompt_is_refused(tmp_path, monkeypatch):
    from dopsd_continual.pictures import output_path

    monkeypatch.chdir(tmp_path)
    assert output_path(None, "v3", 0) == Path("sample-v3-s0.png")
    Path("sample-v3-s0.png").write_bytes(b"a picture the user keeps")
    Path("sample-v3-s0-2.png").symlink_to("nowhere")  # a dangling link is a name taken too
    assert output_path(None, "v3", 0) == Path("sample-v3-s0-3.png")
    (tmp_path / "pics").mkdir()
    assert output_path(tmp_path / "pics", "v3", 0) == tmp_path / "pics" / "sample-v3-s0.png"
    assert output_path(tmp_path / "mine.png", "v3", 0) == tmp_path / "mine.png"  # named by the user: theirs to replace
    for missing in ("nodir", "nodir/"):  # a folder meant: said as such, not as a wrong suffix
        with pytest.raises(UserError, match="no such folder"):
            output_path(Path(missing), "v3", 0)
    with pytest.raises(UserError, match="must end in"):
        output_path(tmp_path / "mine.gif", "v3", 0)
    run("init", "--state", tmp_path / "s")
    for prompt in ("", "   "):
        r = run("sample", prompt, "--state", tmp_path / "s")
        assert r.exit_code == 1 and "the prompt is empty" in r.output and r.output.count("\n") == 1, r.output
    assert Path("sample-v3-s0.png").read_bytes() == b"a picture the user keeps"
