"""`dopsd doctor`: what is missing on this box (GPU, weights, disk)."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import UserError
from .models import PIPELINES, resolve_source


def diagnose(state: Path | None = None) -> dict:
    from .recipe import load_recipe, resolve_recipe_path
    from .store import open_state, state_dir

    problems: list[str] = []
    root = state_dir(state)
    try:
        st = open_state(root)
        recipe = st.recipe
        st.close()
    except UserError as e:
        problems.append(str(e))
        recipe = load_recipe(resolve_recipe_path(None))
    model = recipe["model"]
    try:
        source = str(resolve_source(model["source"]))
    except UserError as e:
        source = model["source"]
        problems.append(str(e))
    from .distributed import check_processes, gpus

    seen = gpus()
    n = int(recipe["train"]["processes"])
    if seen:
        device = f"cuda ({seen[0]})" if len(seen) == 1 else f"{len(seen)} GPUs: " + ", ".join(
            f"{i}: {name}" for i, name in enumerate(seen))
        try:
            check_processes(n, "cuda")
        except UserError as e:
            problems.append(str(e))
    else:
        device = "cpu"
        if model["name"] != "toy-shapes":
            problems.append(f"no CUDA GPU: {model['name']} needs one for training")
    probe = root if root.exists() else Path.cwd()
    free_gb = shutil.disk_usage(probe).free / 2**30
    if free_gb < 2:
        problems.append(f"low disk space at {probe}: {free_gb:.1f} GiB free")
    return {
        "ok": not problems,
        "problems": problems,
        "model": {"name": model["name"], "source": source, "pipeline": PIPELINES[model["backend"]]},
        "device": device,
        "gpus": seen,
        "processes": {"recipe": n, "would_use": seen[:n] if seen else ["cpu"] * n, "note": _processes_note(n, seen)},
        "disk_free_gib": round(free_gb, 1),
    }


def _processes_note(n: int, seen: list[str]) -> str:
    if n == 1:
        spare = f"; {len(seen) - 1} more GPU(s) idle: set train.processes = {len(seen)}" if len(seen) > 1 else ""
        return f"1 (one process trains a round){spare}"
    where = f"GPUs 0-{n - 1}" if seen else "CPU processes (gloo), for tests only"
    return f"{n} data-parallel processes on {where}"
