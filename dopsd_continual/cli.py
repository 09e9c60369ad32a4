"""The `dopsd` command line: a thin shell over library functions that the tests call directly."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape as esc  # user text (paths, captions, reasons) is never markup
from rich.table import Table

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Continual D-OPSD personalisation of step-distilled text-to-image models.")
queue_app = typer.Typer(no_args_is_help=True, help="The sample queue.")
toy_app = typer.Typer(no_args_is_help=True, help="The embedded toy-shapes world.")
app.add_typer(queue_app, name="queue")
app.add_typer(toy_app, name="toy")
# piped output is whole lines (no wrapping at 80 columns, no cut table cells); a terminal gets its own width
console = Console(width=None if sys.stdout.isatty() else 100_000)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 100_000)
SAMPLE_STATUS_HELP = "queued, training, used, dropped, set_aside"  # store.SAMPLE_STATUSES (a test holds them equal)

STATE_OPT = typer.Option(None, "--state", help="state directory (default ./state or $DOPSD_STATE)")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        sys.stdout.write(f"dopsd {version('dopsd-continual')}\n")
        raise typer.Exit()


@app.callback()
def main(_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="print the version and exit")) -> None:
    """Continual D-OPSD personalisation of step-distilled text-to-image models."""


def fail(msg: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/red] {esc(msg)}", highlight=False, soft_wrap=True)  # "[/x]" in a path is text
    raise typer.Exit(code)


def run() -> None:
    """`dopsd`: the app, with a usage error (an unknown command or option, a missing or bad argument) said in
    one line, as every other error is, rather than in a box under the command's usage."""
    try:
        code = app(standalone_mode=False, prog_name="dopsd")  # what it returns: an exit's code (a command's own value is None)
    except typer.TyperException as e:  # click's errors, as typer carries them
        if type(e).__name__ == "NoArgsIsHelpError":  # `dopsd queue`: the help, printed as it was raised
            raise SystemExit(2) from None
        ctx = getattr(e, "ctx", None)
        where = f" (`{ctx.command_path} --help` says what it takes)" if ctx is not None else ""
        err_console.print(f"[red]error:[/red] {esc(e.format_message())}{where}", highlight=False, soft_wrap=True)
        raise SystemExit(e.exit_code) from None
    except typer.Abort:  # an interrupted prompt
        err_console.print("[red]error:[/red] aborted", highlight=False)
        raise SystemExit(1) from None
    raise SystemExit(code if type(code) is int else 0)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _open(state: Path | None, writes: str | None = None):
    """The state; `writes` names the command when it must write (refused in one line on a read-only state)."""
    from .store import open_state, state_dir

    st = open_state(state_dir(state))
    if writes and st.readonly:
        st.close()
        if st.readonly_reason:
            fail(f"{st.readonly_reason}; `dopsd {writes}` needs to write: free some space (`dopsd gc` shows what the "
                 "state can give back) and run it again (listing, status, sample and export work now)")
        fail(f"state at {st.root} is read-only: `dopsd {writes}` needs to write (listing, status, sample and export work)")
    if writes:
        from .store import tighten_state

        if tighten_state(st.root):  # once: an older state was readable by other accounts
            err_console.print(f"note: {esc(str(st.root))} was readable by other accounts; it is now owner-only "
                              "(folders 0700, files 0600)", highlight=False)
    return st


# ------------------------------------------------------------------------------------------------ init


@app.command()
def init(
    recipe: str | None = typer.Option(None, "--recipe", help="recipe TOML path or shipped name (default: the toy model, toy-shapes)"),
    watch: list[Path] = typer.Option([], "--watch", help="folder to watch (repeatable)"),
    force: bool = typer.Option(False, "--force", help="switch a state with versions to another model (active becomes v0)"),
    state: Path | None = STATE_OPT,
) -> None:
    """Create the state directory (config, SQLite, blobs/)."""
    from .store import init_state, state_dir

    for w in watch:
        if not w.exists():  # a folder to drop pictures into: made for the user, in their usual mode
            w.mkdir(parents=True)
            console.print(f"created the watched folder {esc(str(w))}", highlight=False)
    st = init_state(state_dir(state), recipe, list(watch), force=force)
    console.print(f"state at [bold]{esc(str(st.root))}[/bold], recipe {esc(st.config['recipe'])}, watching {len(st.watch_dirs)} folder(s)")
    needs = _needs(st.recipe)
    st.close()
    for line in needs:
        console.print(line, highlight=False)


def _needs(recipe: dict) -> list[str]:
    """What a real recipe will need before its first round: the weights, a card, disk (planned, nothing loaded)."""
    from .models import is_embedded, missing_weights, weights_hint

    if is_embedded(recipe["model"]):
        return []

    out = []
    missing = missing_weights(recipe)
    if missing:
        out.append("needs: " + weights_hint(recipe, missing))
    try:
        from . import memory
        from .doctor import usable_gib

        acct = memory.accountant(recipe)
        gib = sum(acct.sizes.values())
        fits = [gb for gb in (16, 24, 48, 80) if acct.plan(usable_gib(gb)).fits]
        card = f"a {fits[0]} GB card or larger" if fits else "more than an 80 GB card"
        out.append(f"needs: about {gib:.0f} GiB of weights on disk and in memory, {card} (`dopsd doctor --card-gb N` "
                   "plans one)")
    except Exception as e:  # planning is advice: it never stops init
        out.append(f"needs: the weights and a CUDA card (no plan: {str(e).splitlines()[0] if str(e) else type(e).__name__})")
    return [esc(x) for x in out]


@app.command()
def pull(state: Path | None = STATE_OPT) -> None:
    """Download the recipe's model (and teacher encoder) into the Hugging Face cache, with progress; resumes."""
    from .models import missing_weights, weights_hint
    from .models import pull as fetch

    st = _open(state)
    recipe = st.recipe
    st.close()
    if not missing_weights(recipe):
        console.print(f"{esc(recipe['model']['name'])}: every component is on this machine", highlight=False)
        return
    repos = fetch(recipe)
    missing = missing_weights(recipe)
    if missing:
        fail(weights_hint(recipe, missing))
    console.print(f"downloaded {', '.join(repos) or 'nothing'}; {esc(recipe['model']['name'])} is complete", highlight=False)


# ---------------------------------------------------------------------------------------------- ingest


@app.command()
def ingest(
    paths: list[Path] = typer.Argument(None, help="files or folders (default: the watched folders)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    state: Path | None = STATE_OPT,
) -> None:
    """One scan now: queue new pairs, report duplicates, ignored and rejected files."""
    from .ingest import MISSING_PATH, ingest_paths

    st = _open(state, writes="ingest")
    if not paths and not st.watch_dirs:
        st.close()
        fail("nothing to scan: give PATHs or add watched folders with `dopsd init --watch DIR`")
    report = ingest_paths(st, list(paths) if paths else None)
    st.close()
    missing = [r["path"] for r in report.rejected if r["reason"] == MISSING_PATH]
    if as_json:
        emit_json(report.to_json())
        if missing:
            raise typer.Exit(1)
        return
    t = Table(title="ingest")
    t.add_column("outcome")
    t.add_column("count", justify="right")
    for k, v in report.to_json().items():
        t.add_row(k, str(len(v)))
    console.print(t)
    earlier = sum(r["outcome"] == "rejected" for r in report.unchanged)
    if earlier:
        console.print(f"{earlier} file(s) rejected earlier are still there unchanged (`dopsd ingest --json` lists them "
                      "under unchanged, with the reason)", highlight=False)
    for r in report.rejected:
        console.print(f"[yellow]rejected[/yellow] {esc(r['path'])}: {esc(r['reason'])}", highlight=False)
    for r in report.ignored:
        console.print(f"[dim]ignored[/dim] {esc(r['path'])}: {esc(r['reason'])}", highlight=False)
    if missing:
        fail(f"{len(missing)} path(s) do not exist: {', '.join(missing)}")


# ----------------------------------------------------------------------------------------------- queue


@queue_app.command("list")
def queue_list(
    status: str | None = typer.Option(None, "--status", help=SAMPLE_STATUS_HELP),
    as_json: bool = typer.Option(False, "--json"),
    state: Path | None = STATE_OPT,
) -> None:
    """List samples (all statuses by default)."""
    from .store import SAMPLE_STATUSES

    if status is not None and status not in SAMPLE_STATUSES:
        fail(f"unknown status {status!r}; one of {', '.join(SAMPLE_STATUSES)}")
    from .store import shown_status

    st = _open(state)
    shown = shown_status(st)  # what a round that ended without a word left 'training' is: queued
    rows = [
        {"id": r["id"], "status": shown(r["status"]), "sha256": r["sha256"], "caption": r["caption"],
         "source_path": r["source_path"], "rounds": json.loads(r["rounds"])}
        for r in st.rows("select * from samples order by id")
    ]
    rows = [r for r in rows if status is None or r["status"] == status]
    st.close()
    if as_json:
        emit_json(rows)
        return
    t = Table(title=f"{len(rows)} sample(s)")
    for c in ("id", "status", "caption", "source"):
        t.add_column(c)
    for r in rows:
        t.add_row(str(r["id"]), r["status"], esc(r["caption"][:60]), esc(r["source_path"]))
    console.print(t)


def _queue_action(state: Path | None, ids: list[int], status: str | None, every: bool, action: str) -> None:
    """`queue retry|drop`: the ids given, or every sample with --status S, or --all; one transaction."""
    from .ingest import queue_action
    from .store import SAMPLE_STATUSES

    if status is not None and status not in SAMPLE_STATUSES:
        fail(f"unknown status {status!r}; one of {', '.join(SAMPLE_STATUSES)}")
    if bool(ids) + (status is not None) + every != 1:
        fail(f"`queue {action}` takes sample ids, or --status S, or --all (one of them)")
    st = _open(state, writes=f"queue {action}")
    try:
        if not ids:
            where, args = ("where status = ?", [status]) if status else ("", [])
            ids = [r[0] for r in st.conn.execute(f"select id from samples {where} order by id", args)]
        with st.conn:
            st.conn.execute("BEGIN IMMEDIATE")
            done = [(i, queue_action(st, i, action)) for i in ids]
    finally:
        st.close()
    if len(done) <= 20:
        for i, new in done:
            console.print(f"sample {i}: {new}")
    else:
        console.print(f"{len(done)} samples: {done[0][1]}")


IDS = typer.Argument(None, help="sample ids (or --status S, or --all)")
FOR_STATUS = typer.Option(None, "--status", help="every sample with this status: " + SAMPLE_STATUS_HELP)


@queue_app.command("retry")
def queue_retry(ids: list[int] = IDS, status: str | None = FOR_STATUS,
                every: bool = typer.Option(False, "--all", help="every sample"), state: Path | None = STATE_OPT) -> None:
    """Put samples back in the queue (`queue retry --status set_aside` brings back what the gate set aside)."""
    _queue_action(state, ids or [], status, every, "retry")


@queue_app.command("drop")
def queue_drop(ids: list[int] = IDS, status: str | None = FOR_STATUS,
               every: bool = typer.Option(False, "--all", help="every sample"), state: Path | None = STATE_OPT) -> None:
    """Take samples out of training (their blobs and records stay)."""
    _queue_action(state, ids or [], status, every, "drop")


# ------------------------------------------------------------------------------------------------- toy


@toy_app.command("pack")
def toy_pack(
    name: str | None = typer.Argument(None, help="pack name"),
    out: Path | None = typer.Option(None, "--out", help="folder to write the pairs into"),
    list_: bool = typer.Option(False, "--list", help="list the packs"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Write a concept pack (image + caption pairs the toy model never saw) into a folder."""
    from .toy.packs import PACKS, write_pack

    if list_ or name is None:
        rows = [{"name": p.name, "description": p.description, "pairs": len(p.train)} for p in PACKS.values()]
        if as_json:
            emit_json(rows)
        else:
            for r in rows:
                console.print(f"[bold]{r['name']}[/bold] ({r['pairs']} pairs): {esc(r['description'])}", highlight=False)
        return
    if name not in PACKS:
        fail(f"unknown pack {name!r}; known: {', '.join(PACKS)}")
    if out is None:
        fail("give --out DIR")
    paths = write_pack(name, out)
    if as_json:
        emit_json({"pack": name, "images": [str(p) for p in paths]})
    else:
        console.print(f"wrote {len(paths)} pairs to {esc(str(out))}")


# ----------------------------------------------------------------------------------------------- train


@app.command()
def train(
    objective: str | None = typer.Option(None, "--objective", help="dopsd (default) or sft"),
    steps: int | None = typer.Option(None, "--steps", min=1, help="optimiser steps (recipe train.steps)"),
    lr: float | None = typer.Option(None, "--lr", help="learning rate (recipe train.lr)"),
    as_json: bool = typer.Option(False, "--json"),
    wait: bool = typer.Option(False, "--wait", help="wait for a running round instead of exiting"),
    processes: int | None = typer.Option(None, "--processes", min=1, max=64,
                                         help="data-parallel training processes, one per GPU (recipe train.processes)"),
    state: Path | None = STATE_OPT,
) -> None:
    """One round now on the queued samples, then the gate."""
    import math
    import time as _t

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from .rounds import run_round

    if lr is not None and not (math.isfinite(lr) and lr > 0):
        fail(f"--lr must be a positive number, got {lr}")
    if objective is not None and objective not in ("dopsd", "sft"):
        fail(f"--objective must be dopsd or sft, got {objective!r}")
    st = _open(state, writes="train")
    if as_json:
        try:
            result = run_round(st, objective, steps, lr, wait_for_lock=wait, processes=processes)
        except KeyboardInterrupt:
            _stopped()
        finally:
            st.close()
        emit_json({k: result[k] for k in ("version", "verdict", "reasons", "metrics", "parent", "samples", "active")})
        return
    # the bar appears with the first step, so an error before training (no queued samples) is the only output
    bar = Progress(TextColumn("[bold]round[/bold]"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[rate]:.1f} samples/s"),
                   TimeRemainingColumn(), console=console)
    task = None
    t0 = _t.time()
    batch = st.recipe["train"]["batch"] * (processes or st.recipe["train"]["processes"])  # the global batch

    def progress(step, total, loss):
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("train", total=total, loss=0.0, rate=0.0)
        bar.update(task, completed=step, total=total, loss=loss, rate=step * batch / max(_t.time() - t0, 1e-9))

    try:
        result = run_round(st, objective, steps, lr, progress=progress, wait_for_lock=wait, processes=processes)
    except KeyboardInterrupt:
        if task is not None:
            bar.stop()
            task = None
        _stopped()
    finally:
        if task is not None:
            bar.stop()
        st.close()
    colour = "green" if result["verdict"] == "accepted" else "red"
    console.print(f"[{colour}]{result['verdict']}[/{colour}] {result['version']} (parent {result['parent']}); active is {result['active']}")
    for r in result["reasons"]:
        console.print(f"  - {esc(r)}")


def _stopped() -> None:
    """Ctrl-C on `dopsd train`: one line, exit 130 (the round already ended interrupted, its samples queued)."""
    err_console.print("stopped: the round ended as interrupted and its samples are queued again "
                      "(`dopsd train` starts a new one)", highlight=False)
    raise typer.Exit(130)


# -------------------------------------------------------------------------------------------- versions

versions_app = typer.Typer(no_args_is_help=True, help="The versioned LoRA stack.")
app.add_typer(versions_app, name="versions")


@versions_app.command("list")
def versions_list(as_json: bool = typer.Option(False, "--json"), state: Path | None = STATE_OPT) -> None:
    """Every version, with status and the active flag."""
    from .stack import list_versions

    st = _open(state)
    rows = list_versions(st)
    st.close()
    if as_json:
        emit_json(rows)
        return
    t = Table(title="versions")
    for c in ("id", "parent", "status", "active", "objective", "samples", "retention", "concept"):
        t.add_column(c)
    for r in rows:
        m = r["metrics"]
        t.add_row(r["id"], r["parent"] or "-", r["status"], "*" if r["active"] else "", r["objective"] or "-",
                  str(len(r["samples"])), _fmt(m.get("retention")), _fmt(m.get("concept_score")))
    console.print(t)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "-"


def when(ts: float | None) -> str:
    """A stored time (epoch seconds) as the user reads it: local, to the second."""
    from datetime import datetime

    return "-" if ts is None else datetime.fromtimestamp(float(ts)).strftime("%Y-%m-%d %H:%M:%S")


@versions_app.command("show")
def versions_show(version: str, as_json: bool = typer.Option(False, "--json"), state: Path | None = STATE_OPT) -> None:
    """One version: parent, status, when, samples, reasons, the gate's checks, its adapter."""
    from .checks import checks
    from .stack import get_version

    st = _open(state)
    v = get_version(st, version)
    manifest = st.adapters / version / "manifest.json"
    v["manifest"] = json.loads(manifest.read_text()) if manifest.exists() else None
    for k in ("metrics", "reasons", "samples"):
        v[k] = json.loads(v[k] or "null")
    v["active"] = st.active_version == version
    v["created"] = when(v["created_at"])
    report = st.reports / f"{version}.json"
    try:  # judged against the thresholds of its day, as its report keeps them
        gate = json.loads(report.read_text())["thresholds"]
    except (OSError, ValueError, KeyError):
        gate = st.recipe["gate"]
    st.close()
    if as_json:
        emit_json(v)
        return
    say = lambda text: console.print(text, highlight=False)  # noqa: E731
    say(f"{v['id']}{' (active)' if v['active'] else ''}: {v['status']}, parent {v['parent'] or '-'}, "
        f"created {v['created']}, objective {v['objective'] or '-'}")
    say(f"samples: {len(v['samples'] or [])}" + (f" ({', '.join(map(str, v['samples'][:12]))}"
                                                  f"{', ...' if len(v['samples']) > 12 else ''})" if v["samples"] else ""))
    for r in v["reasons"] or []:
        say(f"  - {esc(str(r))}")
    m = v["metrics"] or {}
    rows = checks(m, gate) if m else []
    if rows:
        t = Table(title="the gate's checks")
        for c in ("check", "value", "limit", ""):
            t.add_column(c)
        for c in rows:
            t.add_row(c["metric"], f"{c['value']:.3f}", f"{c['limit']} {c['threshold']}", "ok" if c["passed"] else "failed")
        console.print(t)
    for k in ("train_seconds", "gate_seconds"):
        if isinstance(m.get(k), (int, float)):
            say(f"{k.replace('_', ' ')}: {m[k]:.0f} s")
    man = v["manifest"]
    if man:
        say(f"adapter: rank {man.get('rank')}, scale {man.get('scale')}, {len(man.get('targets', []))} layers"
            + (f", squashed from {', '.join(man['squash_of'])}" if man.get("squash_of") else ""))


@versions_app.command("rollback")
def versions_rollback(version: str | None = typer.Argument(None), as_json: bool = typer.Option(False, "--json"),
                      state: Path | None = STATE_OPT) -> None:
    """Move the active pointer (default: to the active version's parent). Deletes nothing."""
    from .stack import rollback

    st = _open(state, writes="versions rollback")
    active = rollback(st, version)
    st.close()
    emit_json({"active": active}) if as_json else console.print(f"active: {active}")


@versions_app.command("promote")
def versions_promote(version: str, as_json: bool = typer.Option(False, "--json"), state: Path | None = STATE_OPT) -> None:
    """Make a version active (a rejected one too: the user overrides the gate)."""
    from .stack import promote

    st = _open(state, writes="versions promote")
    active = promote(st, version)
    st.close()
    emit_json({"active": active}) if as_json else console.print(f"active: {active}")


@versions_app.command("squash")
def versions_squash(version: str | None = typer.Argument(None), rank: int | None = typer.Option(None, "--rank", min=1),
                    as_json: bool = typer.Option(False, "--json"), state: Path | None = STATE_OPT) -> None:
    """Fold a chain into one adapter (exact by concatenation; --rank truncates by SVD and reports the error)."""
    from .stack import squash_version

    st = _open(state, writes="versions squash")
    out = squash_version(st, version, rank)
    st.close()
    if as_json:
        emit_json(out)
        return
    error = ", exact" if not out["relative_error"] else f", relative error {out['relative_error']:.2e}"
    console.print(f"{out['version']}: {out['of']}'s chain folded into one adapter of rank {out['rank']}{error}; "
                  f"it is a new version beside {out['of']}, `dopsd versions promote {out['version']}` makes it active",
                  highlight=False)


@versions_app.command("export")
def versions_export(version: str, fmt: str = typer.Option("diffusers", "--format"), out: Path = typer.Option(..., "--out"),
                    state: Path | None = STATE_OPT) -> None:
    """Write a version's adapter (the chain, squashed) as diffusers or ComfyUI LoRA files."""
    from .stack import export_version

    if fmt not in ("diffusers", "comfyui"):
        fail(f"unknown export format {fmt!r}: diffusers or comfyui")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file: give a folder (it is created if missing)")

    st = _open(state)
    path = export_version(st, version, fmt, out)
    st.close()
    console.print(f"wrote {esc(str(path))}")


@versions_app.command("diff")
def versions_diff(a: str, b: str, state: Path | None = STATE_OPT) -> None:
    """What changed between two versions: samples and metrics."""
    from .stack import diff_versions

    st = _open(state)
    out = diff_versions(st, a, b)
    st.close()
    emit_json(out)


# ---------------------------------------------------------------------------------------------- sample


@app.command()
def sample(
    prompt: str,
    version: str | None = typer.Option(None, "--version", help="default: the active version"),
    steps: int | None = typer.Option(None, "--steps", min=1, max=1000, help="default: the model's native step count"),
    seed: int = typer.Option(0, "--seed", min=0),
    n: int = typer.Option(1, "-n", min=1, max=64, help="images (a grid, seeds seed..seed+n-1)"),
    out: Path | None = typer.Option(None, "--out", help="file (.png, .jpg, .webp; replaced if it exists) or an existing "
                                     "folder; default sample-<version>-s<seed>.png here, never replacing a file (-2, -3 added)"),
    as_json: bool = typer.Option(False, "--json"),
    no_wait: bool = typer.Option(False, "--no-wait", help="during a round, draw here at once instead of waiting for it"),
    state: Path | None = STATE_OPT,
) -> None:
    """Sample from any version (merged weights; PNG text chunks carry prompt, seed, steps, version, model).
    A running daemon draws it with the model it keeps warm; without one, this process loads the model."""
    from .pictures import output_path, request, save_image, wrote_words
    from .serve import ask_daemon

    st = _open(state)
    req = request(st, prompt, version, steps, seed, n)
    path = output_path(out, req["version"], seed)
    got = ask_daemon(st.root, {**req, "no_wait": no_wait},
                     on_wait=lambda what: err_console.print(f"waiting for {esc(what)}", highlight=False))
    if got is not None and got[0] != "busy":
        (image, meta, phases), by = got, "daemon"
    else:
        from .sampling import draw

        if got is not None:
            err_console.print(f"the daemon's model is busy ({esc(got[1])}): drawing here", highlight=False)
        (image, meta, phases), by = draw(st, req), "this process"
    save_image(image, path, meta)  # the same file whoever drew it
    res = {"path": str(path), **req, "phases": phases, "drawn_by": by}
    st.close()
    emit_json(res) if as_json else console.print(esc(wrote_words(res)))


@app.command("eval")
def eval_cmd(version: str | None = typer.Argument(None), as_json: bool = typer.Option(False, "--json"),
             state: Path | None = STATE_OPT) -> None:
    """Run the gate's metrics for a version against its parent."""
    from .gate import Gate
    from .sampling import Sampler
    from .stack import get_version

    st = _open(state)
    vid = version or st.active_version
    v = get_version(st, vid)
    if v["parent"] is None:
        st.close()
        fail(f"{vid} is the base model: it has no parent to compare with")
    gate = Gate(st, Sampler(st))
    samples = [dict(st.db["samples"].get(i)) for i in json.loads(v["samples"] or "[]")]
    from .rounds import gate_samples

    metrics = gate.metrics(vid, v["parent"], gate_samples(st, samples))
    reasons = gate.verdict(metrics)
    st.close()
    out = {"version": vid, "parent": v["parent"], "verdict": "rejected" if reasons else "accepted", "reasons": reasons, "metrics": metrics}
    if as_json:
        emit_json(out)
    else:
        for k, val in metrics.items():
            console.print(f"{k}: {_fmt(val)}")
        console.print(f"would be [bold]{out['verdict']}[/bold]" + "".join(f"\n  - {esc(r)}" for r in reasons))


# ---------------------------------------------------------------------------------------------- daemon

config_app = typer.Typer(no_args_is_help=True, help="The state's own settings over its recipe (the daemon's timings, the gate's thresholds, ...).")
app.add_typer(config_app, name="config")


def _shown(v) -> str:
    return json.dumps(v, ensure_ascii=False)


PATH_SETTINGS = {"gate.prompts", "gate.clip_model", "gate.dino_model", "model.teacher_encoder"}


def _setting_value(key: str, text: str, cwd: Path):
    """VALUE as TOML reads it (10, 2.5, true, [0, 1], "text"); bare text where the key takes a string. A
    path that exists is kept absolute: the daemon does not run where the command was typed."""
    import tomllib

    from .recipe import SCHEMA

    section, _, name = key.partition(".")
    types = SCHEMA.get(section, {}).get(name, (str, None))[0]
    types = types if isinstance(types, tuple) else (types,)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    value = text if str in types and not isinstance(value, types) else value
    if key in PATH_SETTINGS and isinstance(value, str) and value and (cwd / Path(value).expanduser()).exists():
        value = str((cwd / Path(value).expanduser()).resolve())
    return value


@config_app.command("set", context_settings={"ignore_unknown_options": True})  # `set gate.x -0.5` is a value
def config_set(key: str = typer.Argument(..., help="section.key, e.g. daemon.quiet_seconds"),
               value: str = typer.Argument(..., help="10, 2.5, true, [0, 1] or text"),
               state: Path | None = STATE_OPT) -> None:
    """Set one recipe key for this state, checked like the recipe before anything is written."""
    from .store import open_state, set_settings, state_dir

    root = state_dir(state)
    try:
        before = open_state(root)
        old = before.recipe.get(key.partition(".")[0], {}).get(key.partition(".")[2])
        before.close()
    except UserError:  # a state that does not open now (a bad setting): the new value may be the fix
        old = None
    recipe = set_settings(root, {key: _setting_value(key, value, Path.cwd())})
    section, _, name = key.partition(".")
    console.print(f"{key} = {_shown(recipe[section][name])} (was {_shown(old)})", highlight=False, markup=False)
    if section == "daemon":
        from .status import daemon_running

        if daemon_running(root):
            console.print("the running daemon reads [daemon] at its start: `dopsd daemon stop` then `dopsd daemon start`",
                          highlight=False, markup=False)
    elif section == "ingest":
        console.print("pairs taken from now on use it (those already queued keep theirs)", highlight=False)
    else:
        console.print("the next round uses it", highlight=False)


@config_app.command("unset")
def config_unset(key: str, state: Path | None = STATE_OPT) -> None:
    """Back to the recipe's value."""
    from .store import set_settings, state_dir, state_settings

    settings = state_settings(state_dir(state))  # read without the recipe: a setting that breaks it can go
    if key not in settings:
        fail(f"{key} is not set for this state" + (f" (set: {', '.join(sorted(settings))})" if settings else ""))
    recipe = set_settings(state_dir(state), {}, remove=(key,))
    section, _, name = key.partition(".")
    console.print(f"{key} = {_shown(recipe.get(section, {}).get(name))} (the recipe's)", highlight=False, markup=False)


@config_app.command("get")
def config_get(key: str | None = typer.Argument(None, help="section.key; without it, every setting of this state"),
               as_json: bool = typer.Option(False, "--json"), state: Path | None = STATE_OPT) -> None:
    """A key's value in effect, and whether the state's settings or the recipe give it."""
    st = _open(state)
    settings, recipe = st.config.get("settings", {}), st.recipe
    st.close()
    if key is None:
        if as_json:
            emit_json(settings)
        elif not settings:
            console.print("no settings: the recipe's values hold (`dopsd config set KEY VALUE`)", highlight=False)
        for k, v in sorted(settings.items()) if not as_json else ():
            console.print(f"{k} = {_shown(v)}", highlight=False, markup=False)
        return
    section, _, name = key.partition(".")
    if name not in recipe.get(section, {}):
        fail(f"unknown setting {key!r} (a recipe key as section.key, e.g. daemon.quiet_seconds)")
    value = recipe[section][name]
    if as_json:
        emit_json({"key": key, "value": value, "from": "settings" if key in settings else "recipe"})
    else:
        console.print(f"{key} = {_shown(value)} ({'this state' if key in settings else 'the recipe'})", highlight=False, markup=False)


daemon_app = typer.Typer(no_args_is_help=True, help="The background daemon: watch folders, schedule rounds.")
app.add_typer(daemon_app, name="daemon")


@daemon_app.command("start")
def daemon_start(foreground: bool = typer.Option(False, "--foreground", help="run in this terminal"),
                 state: Path | None = STATE_OPT) -> None:
    """Start the daemon (detached unless --foreground)."""
    from .daemon import Daemon, start_background
    from .store import state_dir

    root = state_dir(state)
    st = _open(state, writes="daemon start")  # a clear error if the state dir is missing or read-only
    if not st.watch_dirs:
        err_console.print("[yellow]warning:[/yellow] no watched folder: the daemon only runs scheduled rounds on "
                          "what is queued (`dopsd init --watch DIR` adds one)", highlight=False, soft_wrap=True)
    st.close()
    if foreground:
        Daemon(root, foreground=True, rounds_apart=True).run_forever()
        return
    pid = start_background(root)
    console.print(f"daemon running (pid {pid}); logs in {esc(str(root / 'logs'))}")


@daemon_app.command("stop")
def daemon_stop(state: Path | None = STATE_OPT) -> None:
    """Stop the daemon (SIGTERM; a running round is abandoned safely, its samples go back to the queue)."""
    from .daemon import stop_background
    from .store import state_dir

    _open(state).close()  # a clear error if there is no state there
    stopped = stop_background(state_dir(state))
    console.print("daemon stopped" if stopped else "no daemon is running")


@daemon_app.command("status")
def daemon_status(as_json: bool = typer.Option(False, "--json"), state: Path | None = STATE_OPT) -> None:
    """Running or not, active version, queue counts, the round in progress, the next round."""
    from .status import local_time, status

    st = _open(state)
    s = status(st)
    st.close()
    if as_json:
        emit_json(s)
        return
    console.print(f"running: {'yes' if s['running'] else 'no'}" + (f" (pid {s['pid']})" if s["pid"] else ""), highlight=False)
    queue = ", ".join(f"{v} {k}" for k, v in sorted(s["queue"].items())) or "empty"
    console.print(f"active version: {s['active_version']}; queue: {queue}", highlight=False)
    if s["round"] and s["round"].get("starting"):
        console.print(f"round starting: {s['round']['starting']}", highlight=False)
    elif s["round"]:
        console.print(f"round {s['round']['id']}: {100 * (s['round']['progress'] or 0):.0f}%")
    if s["next_round_at"]:
        when = local_time(s["next_round_at"])
        console.print(f"next round: {when}" if s["queue"].get("queued") else
                      f"next round: when pairs are queued (the schedule looks next at {when})", highlight=False)
    if s.get("held"):
        console.print(esc(s["held"]), highlight=False)
    if s.get("set_aside"):
        a = s["set_aside"]
        console.print(f"{a['count']} sample(s) set aside by the gate: " + esc("; ".join(a["reasons"])) + f". {a['hint']}",
                      highlight=False)
    if s.get("ui"):
        token = _ui_token(st.root)
        console.print(f"dashboard: {s['ui']}" + (f"?token={token}" if token else ""), highlight=False)
    scan = s.get("last_scan")
    if scan:
        console.print(f"last scan: {scan['queued']} queued, {scan['duplicates']} duplicates, {scan['pending']} pending, "
                      f"{scan['ignored']} ignored, {scan.get('unchanged', 0)} unchanged; "
                      f"{scan.get('rejected_files', scan['rejected'])} file(s) rejected", highlight=False)
        for p in scan["problems"]:
            console.print(f"  {p['outcome']} {esc(p['path'])}: {esc(p['reason'])}", highlight=False)


@daemon_app.command("retry")
def daemon_retry(state: Path | None = STATE_OPT) -> None:
    """Let the daemon try again a round it holds (after a failure you have fixed)."""
    from .store import now

    st = _open(state, writes="daemon retry")
    try:
        st.db["meta"].upsert({"key": "retry_requested", "value": str(now())}, pk="key")
    finally:
        st.close()
    console.print("the daemon tries the round again at its next chance (its schedule, a rescan or a drop)")


def _ui_token(root: Path) -> str | None:
    """The daemon's dashboard token (ui-token, 0600): what its owner needs to open it; None for anyone else."""
    try:
        return (root / "ui-token").read_text().strip() or None
    except OSError:
        return None


@daemon_app.command("install-service")
def daemon_install_service(unit_dir: Path | None = typer.Option(None, "--unit-dir", help="default ~/.config/systemd/user"),
                           state: Path | None = STATE_OPT) -> None:
    """Write a systemd user unit for this state dir and print how to enable it."""
    from .daemon import install_service
    from .store import state_dir

    _open(state).close()
    path = install_service(state_dir(state), unit_dir)
    console.print(f"wrote {esc(str(path))}\nenable it with:\n  systemctl --user daemon-reload\n  systemctl --user enable --now {path.name}\n"
                  "  loginctl enable-linger $USER   # keep it running when you log out")


# ------------------------------------------------------------------------------------------------ demo


@app.command()
def demo(state: Path | None = typer.Option(None, "--state", help="folder for the demo (default ./dopsd-demo)")) -> None:
    """The whole loop on the embedded toy model, on the CPU: ingest, daemon rounds, gate, before/after."""
    from .demo import run_demo

    run_demo(state, console)


# -------------------------------------------------------------------------------------------------- ui


@app.command()
def ui(
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on; not loopback needs a token"),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="0: any free port"),
    token: str | None = typer.Option(None, "--token", envvar="DOPSD_UI_TOKEN",
                                     help="the dashboard's token (made up and printed when not given)"),
    no_token: bool = typer.Option(False, "--no-token", help="no token, on a loopback address only: safe only where "
                                  "no other account can run programs (docs/security.md)"),
    state: Path | None = STATE_OPT,
) -> None:
    """A local web dashboard: versions, gate reports, queue, daemon; rollback, promote, sample."""
    from .web.server import Server, token_for

    if no_token and token:
        fail("--no-token and a token (--token or DOPSD_UI_TOKEN) together: choose one")
    st = _open(state)
    root = st.root
    st.close()
    server = Server(root, host, port, token_for(host, token, no_token), no_token=no_token)
    console.print(f"dashboard for {esc(str(root))} at {server.url}  (Ctrl-C stops it)", highlight=False)
    from .daemon import limit_arenas

    limit_arenas()  # a page server that may run for weeks, as the daemon does
    server.run()


# ---------------------------------------------------------------------------------------------- doctor


@app.command()
def gc(yes: bool = typer.Option(False, "--yes", help="remove them (without it, only say what would go)"),
       as_json: bool = typer.Option(False, "--json"), state: Path | None = STATE_OPT) -> None:
    """What the state holds by kind, and what its retention policy gives back (a dry run; --yes removes it)."""
    from .retention import collect, disk_use, plan, summary
    from .rounds import round_lock

    st = _open(state)
    freed = 0
    try:
        use = disk_use(st)
        if yes and st.readonly_reason:  # a full disk opened the state read-only: first what needs no record in the
            # database (room for the writable open), then the rest
            first = [i for i in plan(st) if not i.get("version")]
            freed = collect(st, first)
            st.close()
            st = _open(state, writes="gc --yes")
        elif yes:
            st.close()
            st = _open(state, writes="gc --yes")
        if yes:
            with round_lock(st, wait=False):  # never under a running round's files
                items = plan(st)
                freed += collect(st, items)
        else:
            items = plan(st)
        budget = st.recipe["retention"]["disk_budget_gb"]
    finally:
        st.close()
    kinds = summary(items)
    if as_json:
        emit_json({"dry_run": not yes, "use_bytes": use, "budget_gb": budget, "prunable": kinds, "freed_bytes": freed,
                   "items": [{**i, "path": str(i["path"])} for i in items]})
        return
    t = Table(title=f"state disk use: {sum(use.values()) / 2**20:.1f} MB" + (f" of a {budget} GB budget" if budget else ""))
    for c in ("kind", "MB", "can go", "MB that can go"):
        t.add_column(c, justify="right" if c != "kind" else "left")
    for k, b in use.items():
        g = kinds.get(k, {"files": 0, "bytes": 0})
        t.add_row(k, f"{b / 2**20:.1f}", str(g["files"]) if g["files"] else "", f"{g['bytes'] / 2**20:.1f}" if g["files"] else "")
    console.print(t)
    total = sum(k["bytes"] for k in kinds.values())
    if yes:
        console.print(f"freed {freed / 2**20:.1f} MB ({len(items)} item(s))", highlight=False)
    elif items:
        console.print(f"{total / 2**20:.1f} MB can go ({len(items)} item(s)); `dopsd gc --yes` removes them. Kept for "
                      "ever: your originals, every accepted version and its chain, the reports", highlight=False)
    else:
        console.print("nothing to give back under the retention policy (recipe [retention])", highlight=False, markup=False)


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json"),
           card_gb: float | None = typer.Option(None, "--card-gb", min=4, help="plan for a card of this many GB "
                                                "(16, 24, 48...) instead of this box's, for every shipped recipe"),
           state: Path | None = STATE_OPT) -> None:
    """What is missing on this box (GPU, weights, disk), and whether the recipe fits the card."""
    from .doctor import diagnose

    report = diagnose(state, card_gb)
    if as_json:
        emit_json(report)
        if not report["ok"]:
            raise typer.Exit(1)
        return
    console.print(f"model: {report['model']['name']} from {esc(report['model']['source'])} ({report['model']['pipeline']})")
    console.print(f"device: {report['device']}")
    console.print(f"processes: {report['processes']['note']}")
    use = report["state_disk_use_bytes"]
    if use:
        console.print(f"state disk use: {sum(use.values()) / 2**20:.1f} MB (" + ", ".join(
            f"{k} {v / 2**20:.1f}" for k, v in use.items()) + f"); {report['disk_free_gib']} GiB free", highlight=False)
    for line in report["memory"]:
        console.print(f"memory: {esc(line)}", highlight=False)
    for w in report["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {esc(w)}")
    for p in report["problems"]:
        console.print(f"[yellow]problem:[/yellow] {esc(p)}")
    console.print("[green]ok[/green]" if report["ok"] else "[red]not ok[/red]")
    if not report["ok"]:
        raise typer.Exit(1)


class _PlainFlags:
    """A flag's help shows no `<bool>` value to give (typer's rich help would)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


def _plain_flags() -> None:
    from typer.core import TyperCommand, TyperGroup

    command = type("Command", (_PlainFlags, TyperCommand), {})
    group = type("Group", (_PlainFlags, TyperGroup), {})
    for typer_app in [app] + [g.typer_instance for g in app.registered_groups]:
        if typer_app.info.cls in (None, TyperGroup) or not isinstance(typer_app.info.cls, type):
            typer_app.info.cls = group
        for cmd in typer_app.registered_commands:
            if cmd.cls in (None, TyperCommand) or not isinstance(cmd.cls, type):
                cmd.cls = command


def _wrap_user_errors() -> None:
    """Every command: a UserError is one line on stderr and exit 1, never a traceback."""
    import functools

    for group in [app] + [g.typer_instance for g in app.registered_groups]:
        for cmd in group.registered_commands:
            cb = cmd.callback

            @functools.wraps(cb)
            def wrapped(*a, __cb=cb, **k):
                try:
                    return __cb(*a, **k)
                except UserError as e:
                    fail(str(e))
                except Exception as e:
                    from .store import disk_words, is_disk_full, state_dir

                    if is_disk_full(e):  # one line, wherever it ran out: the file, the space left
                        fail(f"{disk_words(e, state_dir(k.get('state')))}: nothing was lost; free some space "
                             "(`dopsd gc` shows what the state can give back) and run it again")
                    if isinstance(e, OSError):  # the machine's answer about a path (permissions, a read-only mount)
                        fail(f"{e.filename}: {e.strerror or e}" if e.filename else f"{e.strerror or e}")
                    if isinstance(e, sqlite3.OperationalError) and "readonly" in str(e):
                        fail(f"the state is read-only: this command needs to write ({e})")
                    if type(e).__name__ != "OutOfMemoryError":  # torch's, without importing torch here
                        raise
                    fail(f"out of GPU memory: {str(e).splitlines()[0]} (model.memory_budget_gib in the recipe caps "
                         "this process; train.gradient_checkpointing = true or train.base_weights = \"int8\" need less)")

            cmd.callback = wrapped


_wrap_user_errors()
_plain_flags()
