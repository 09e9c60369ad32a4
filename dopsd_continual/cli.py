"""The `dopsd` command line: a thin shell over library functions that the tests call directly."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Continual D-OPSD personalisation of step-distilled text-to-image models.")
queue_app = typer.Typer(no_args_is_help=True, help="The sample queue.")
toy_app = typer.Typer(no_args_is_help=True, help="The embedded toy-shapes world.")
app.add_typer(queue_app, name="queue")
app.add_typer(toy_app, name="toy")
console = Console()
err_console = Console(stderr=True)

STATE_OPT = typer.Option(None, "--state", help="state directory (default ./state or $DOPSD_STATE)")


def fail(msg: str, code: int = 1) -> None:
    err_console.print(f"[red]error:[/red] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _open(state: Optional[Path]):
    from .store import open_state, state_dir

    return open_state(state_dir(state))


# ------------------------------------------------------------------------------------------------ init


@app.command()
def init(
    recipe: Optional[str] = typer.Option(None, "--recipe", help="recipe TOML path or shipped name"),
    watch: list[Path] = typer.Option([], "--watch", help="folder to watch (repeatable)"),
    state: Optional[Path] = STATE_OPT,
) -> None:
    """Create the state directory (config, SQLite, blobs/)."""
    from .store import init_state, state_dir

    st = init_state(state_dir(state), recipe, list(watch))
    console.print(f"state at [bold]{st.root}[/bold], recipe {st.config['recipe']}, watching {len(st.watch_dirs)} folder(s)")
    st.close()


# ---------------------------------------------------------------------------------------------- ingest


@app.command()
def ingest(
    paths: list[Path] = typer.Argument(None, help="files or folders (default: the watched folders)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    state: Optional[Path] = STATE_OPT,
) -> None:
    """One scan now: queue new pairs, report duplicates, ignored and rejected files."""
    from .ingest import ingest_paths

    st = _open(state)
    if not paths and not st.watch_dirs:
        fail("nothing to scan: give PATHs or add watched folders with `dopsd init --watch DIR`")
    report = ingest_paths(st, list(paths) if paths else None)
    st.close()
    if as_json:
        emit_json(report.to_json())
        return
    t = Table(title="ingest")
    t.add_column("outcome")
    t.add_column("count", justify="right")
    for k, v in report.to_json().items():
        t.add_row(k, str(len(v)))
    console.print(t)
    for r in report.rejected:
        console.print(f"[yellow]rejected[/yellow] {r['path']}: {r['reason']}", highlight=False)
    for r in report.ignored:
        console.print(f"[dim]ignored[/dim] {r['path']}: {r['reason']}", highlight=False)


# ----------------------------------------------------------------------------------------------- queue


@queue_app.command("list")
def queue_list(
    status: Optional[str] = typer.Option(None, "--status", help="queued, used, rejected, dropped, set_aside"),
    as_json: bool = typer.Option(False, "--json"),
    state: Optional[Path] = STATE_OPT,
) -> None:
    """List samples (all statuses by default)."""
    from .store import SAMPLE_STATUSES

    if status is not None and status not in SAMPLE_STATUSES:
        fail(f"unknown status {status!r}; one of {', '.join(SAMPLE_STATUSES)}")
    st = _open(state)
    where, args = ("status = ?", [status]) if status else (None, None)
    rows = [
        {"id": r["id"], "status": r["status"], "sha256": r["sha256"], "caption": r["caption"],
         "source_path": r["source_path"], "rounds": json.loads(r["rounds"])}
        for r in st.db["samples"].rows_where(where, args, order_by="id")
    ]
    st.close()
    if as_json:
        emit_json(rows)
        return
    t = Table(title=f"{len(rows)} sample(s)")
    for c in ("id", "status", "caption", "source"):
        t.add_column(c)
    for r in rows:
        t.add_row(str(r["id"]), r["status"], r["caption"][:60], r["source_path"])
    console.print(t)


def _set_status(state: Optional[Path], sample_id: int, status: str, event: str) -> None:
    from .ingest import _history
    from .store import now

    st = _open(state)
    try:
        row = st.db["samples"].get(sample_id)
    except Exception:
        st.close()
        fail(f"no sample with id {sample_id}")
    st.db["samples"].update(sample_id, {"status": status, "updated_at": now(), "history": _history(row["history"], {"event": event})})
    st.close()
    console.print(f"sample {sample_id}: {status}")


@queue_app.command("retry")
def queue_retry(sample_id: int, state: Optional[Path] = STATE_OPT) -> None:
    """Put a sample back in the queue."""
    _set_status(state, sample_id, "queued", "retry")


@queue_app.command("drop")
def queue_drop(sample_id: int, state: Optional[Path] = STATE_OPT) -> None:
    """Take a sample out of training (its blob and record stay)."""
    _set_status(state, sample_id, "dropped", "dropped by user")


# ------------------------------------------------------------------------------------------------- toy


@toy_app.command("pack")
def toy_pack(
    name: Optional[str] = typer.Argument(None, help="pack name"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder to write the pairs into"),
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
                console.print(f"[bold]{r['name']}[/bold] ({r['pairs']} pairs): {r['description']}")
        return
    if name not in PACKS:
        fail(f"unknown pack {name!r}; known: {', '.join(PACKS)}")
    if out is None:
        fail("give --out DIR")
    paths = write_pack(name, out)
    if as_json:
        emit_json({"pack": name, "images": [str(p) for p in paths]})
    else:
        console.print(f"wrote {len(paths)} pairs to {out}")


# ---------------------------------------------------------------------------------------------- doctor


@app.command()
def doctor(as_json: bool = typer.Option(False, "--json"), state: Optional[Path] = STATE_OPT) -> None:
    """What is missing on this box (GPU, weights, disk)."""
    from .doctor import diagnose

    report = diagnose(state)
    if as_json:
        emit_json(report)
        return
    console.print(f"model: {report['model']['name']} from {report['model']['source']} ({report['model']['pipeline']})")
    console.print(f"device: {report['device']}")
    for p in report["problems"]:
        console.print(f"[yellow]problem:[/yellow] {p}")
    console.print("[green]ok[/green]" if report["ok"] else "[red]not ok[/red]")


def main() -> None:
    try:
        app()
    except UserError as e:
        fail(str(e))


def _wrap_user_errors() -> None:
    """Every command: a UserError is one line on stderr and exit 1, never a traceback."""
    import functools

    for group in (app, queue_app, toy_app):
        for cmd in group.registered_commands:
            cb = cmd.callback

            @functools.wraps(cb)
            def wrapped(*a, __cb=cb, **k):
                try:
                    return __cb(*a, **k)
                except UserError as e:
                    fail(str(e))

            cmd.callback = wrapped


_wrap_user_errors()
