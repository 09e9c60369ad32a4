"""`dopsd doctor`: what is missing on this box (GPU, weights, disk), and whether the recipe fits the card."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import UserError
from .models import is_embedded, resolve_source


def usable_gib(card_gb: float) -> float:
    """What a card sold as N GB leaves one process after the driver, the CUDA context and a desktop."""
    return card_gb - (1.5 if card_gb <= 16 else 2.0)


def memory_lines(recipe: dict, card_gb: float | None, device: str) -> tuple[list[str], list[str]]:
    """(the plan's lines, problems): the state's recipe on this card or on --card-gb, and with --card-gb
    every shipped recipe. Planned from config files alone: no weight loads, no download."""
    from . import memory
    from .recipe import RECIPES_DIR, load_recipe

    lines, problems = [], []
    if card_gb is not None:
        budget = usable_gib(card_gb)
        where = f"a {card_gb:g} GB card"
    elif device.startswith("cuda") and not is_embedded(recipe["model"]):
        budget = memory.budget_gib(recipe, "cuda")
        where = "this card"
    else:
        return lines, problems
    recipes = [recipe] if not is_embedded(recipe["model"]) else []
    if card_gb is not None:
        shipped = [load_recipe(p) for p in sorted(RECIPES_DIR.glob("*.toml"))]  # every shipped recipe of a real model
        recipes += [s for s in shipped if not is_embedded(s["model"]) and s["model"]["name"] != recipe["model"]["name"]]
    for i, r in enumerate(recipes):
        try:
            plan = memory.plan(r, budget)
        except Exception as e:  # doctor reports; it never fails on a plan
            lines.append(f"{r['model']['name']}: cannot plan: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            continue
        mine = i == 0 and r is recipe
        lines.append(("this state's recipe on " if mine else "on ") + f"{where}: {plan.line()}")
        if mine and not plan.fits:
            problems.append(f"{r['model']['name']} does not fit {where}: {'; '.join(plan.advice)}")
    return lines, problems


def diagnose(state: Path | None = None, card_gb: float | None = None) -> dict:
    from .recipe import load_recipe, resolve_recipe_path
    from .store import open_state, state_dir

    problems: list[str] = []
    root = state_dir(state)
    use: dict[str, int] = {}
    try:
        st = open_state(root)
        recipe = st.recipe
        from .retention import disk_use

        use = disk_use(st)
        st.close()
    except UserError as e:
        problems.append(str(e))
        recipe = load_recipe(resolve_recipe_path(None))
    model = recipe["model"]
    from .models import missing_weights, weights_hint

    try:
        source = str(resolve_source(model["source"]))
    except UserError as e:
        source = model["source"]
        problems.append(str(e))
    else:
        missing = missing_weights(recipe)  # each component present, nothing loaded
        if missing:
            problems.append(weights_hint(recipe, missing))
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
        if not is_embedded(model):
            problems.append(f"no CUDA GPU: {model['name']} needs one for training")
    from .store import readable_by_others

    warnings = []
    if root.exists() and readable_by_others(root):
        warnings.append(f"state {root} is readable by other accounts (photos, captions, LoRAs): the next command "
                        f"that writes (dopsd ingest) makes it owner-only, or `chmod -R go-rwx {root}`")
    probe = root if root.exists() else Path.cwd()
    free_gb = shutil.disk_usage(probe).free / 2**30
    if free_gb < 2:
        problems.append(f"low disk space at {probe}: {free_gb:.1f} GiB free")
    budget = recipe["retention"]["disk_budget_gb"]
    if budget and sum(use.values()) > budget * 2**30:
        warnings.append(f"the state uses {sum(use.values()) / 2**30:.1f} GB, over its {budget} GB budget: "
                        "`dopsd gc` shows what can go")
    memory, memory_problems = memory_lines(recipe, card_gb, device)
    problems += memory_problems
    from .families import family

    return {
        "ok": not problems,
        "warnings": warnings,
        "memory": memory,
        "problems": problems,
        "model": {"name": model["name"], "source": source, "pipeline": family(model["backend"]).pipeline},
        "device": device,
        "gpus": seen,
        "processes": {"recipe": n, "would_use": seen[:n] if seen else ["cpu"] * n, "note": _processes_note(n, seen)},
        "disk_free_gib": round(free_gb, 1),
        "state_disk_use_bytes": use,
    }


def _processes_note(n: int, seen: list[str]) -> str:
    if n == 1:
        spare = f"; {len(seen) - 1} more GPU(s) idle: set train.processes = {len(seen)}" if len(seen) > 1 else ""
        return f"1 (one process trains a round){spare}"
    where = f"GPUs 0-{n - 1}" if seen else "CPU processes (gloo), for tests only"
    return f"{n} data-parallel processes on {where}"
