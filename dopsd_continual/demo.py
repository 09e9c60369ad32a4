"""`dopsd demo`: the whole loop on the embedded toy model, on the CPU, in a few minutes.

init -> sample "before" -> drop a concept pack into the watched folder -> the daemon (in this process)
ingests it and runs a D-OPSD round when the threshold is met -> the gate decides -> a second pack, a
second round -> sample "after" -> a summary of versions, verdicts and where the pictures are.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

DEMO_PROMPTS = [
    "a large red heart on the left, black background",
    "a large blue heart in the center, white background",
    "a large green striped circle on the right, blue background",
    "a large purple striped square in the center, yellow background",
    "a large orange circle at the top, blue background",
    "a small white triangle on the left, purple background",
]
DEMO_RECIPE_EXTRA = """
[daemon]
interval_minutes = 60
min_new_samples = 6
quiet_seconds = 1
rescan_seconds = 3
keep_warm_seconds = 600
"""


def demo_dir(given: Path | None) -> Path:
    if given is not None:
        return Path(given).resolve()
    base = Path("dopsd-demo").resolve()
    if not base.exists() or not any(base.iterdir()):
        return base
    return Path(f"dopsd-demo-{datetime.now():%Y%m%d-%H%M%S}").resolve()


def write_demo_recipe(folder: Path) -> Path:
    from .recipe import RECIPES_DIR

    text = (RECIPES_DIR / "toy-shapes.toml").read_text()
    text = text.replace("stability_seconds = 5 ", "stability_seconds = 1 ")
    text = text.split("\n[daemon]")[0]  # the demo's own [daemon] table follows
    path = folder / "demo-recipe.toml"
    path.write_text(text + DEMO_RECIPE_EXTRA)
    return path


def run_demo(state_arg: Path | None, console: Console, packs: tuple[str, ...] = ("heart", "striped"), timeout: float = 540) -> dict:
    from .daemon import Daemon
    from .sampling import Sampler, grid, save_image, to_pil
    from .stack import list_versions
    from .store import init_state
    from .toy.packs import PACKS, write_pack

    t_start = time.time()
    root = demo_dir(state_arg)
    root.mkdir(parents=True, exist_ok=True)
    drop = root / "drop"
    drop.mkdir(exist_ok=True)
    state_root = root / "state"
    recipe = write_demo_recipe(root)
    st = init_state(state_root, str(recipe), [drop])
    console.print("[bold]dopsd demo[/bold]: continual D-OPSD on the toy-shapes model, on the CPU")
    console.print(f"state: {state_root}\nwatched folder: {drop}")

    with console.status("loading the toy model and sampling 'before' pictures"):
        sampler = Sampler(st)
        before_version = st.active_version
        before = sampler.images(DEMO_PROMPTS, list(range(len(DEMO_PROMPTS))), st.recipe["model"]["steps"], before_version)
    pictures = root / "pictures"
    pictures.mkdir(exist_ok=True)
    save_image(grid([to_pil(x) for x in before], cols=len(DEMO_PROMPTS)), pictures / "before.png",
               {"prompts": DEMO_PROMPTS, "version": before_version})
    console.print(f"before: {pictures / 'before.png'} (version {before_version})")

    verdicts: list[dict] = []
    daemon = Daemon(state_root, foreground=False, on_round=verdicts.append, install_signals=False)
    daemon._sampler = sampler  # keep the model loaded between rounds
    daemon.start()
    try:
        for name in packs:
            n_before = len(verdicts)
            paths = write_pack(name, drop / name)
            console.print(f"[bold]dropped[/bold] {len(paths)} pairs of the '{name}' pack ({PACKS[name].description}) into {drop / name}")
            t = time.time()
            with console.status(f"daemon: ingesting and training on '{name}'") as status:
                while len(verdicts) == n_before:
                    if time.time() - t_start > timeout:
                        raise TimeoutError("the demo ran out of time")
                    row = st.conn.execute("select version, progress from rounds where status='running' order by id desc limit 1").fetchone()
                    queued = st.conn.execute("select count(*) from samples where status='queued'").fetchone()[0]
                    if row:
                        status.update(f"daemon: round {row[0]} training on '{name}': {100 * (row[1] or 0):.0f}%")
                    else:
                        status.update(f"daemon: '{name}': {queued} queued, waiting for the round")
                    time.sleep(0.5)
            r = verdicts[-1]
            colour = "green" if r["verdict"] == "accepted" else "red"
            m = r["metrics"]
            console.print(
                f"round {r['version']} on '{name}' ({time.time() - t:.0f}s): [{colour}]{r['verdict']}[/{colour}]"
                f"  concept score {m.get('concept_score_parent', 0):.3f} -> {m.get('concept_score', 0):.3f},"
                f" retention {m.get('retention_parent', 0):.3f} -> {m.get('retention', 0):.3f},"
                f" sharpness ratio {m.get('sharpness_ratio', 0):.2f}"
            )
            for reason in r["reasons"]:
                console.print(f"   - {reason}")
    finally:
        daemon.shutdown()
    after_version = st.active_version
    after = sampler.images(DEMO_PROMPTS, list(range(len(DEMO_PROMPTS))), st.recipe["model"]["steps"], after_version)
    sheet = grid([to_pil(x) for x in before] + [to_pil(x) for x in after], cols=len(DEMO_PROMPTS))
    sheet = sheet.resize((sheet.width * 3, sheet.height * 3), 0)  # nearest: 64-px pictures stay readable
    save_image(sheet, pictures / "before_after.png", {"prompts": DEMO_PROMPTS, "rows": [before_version, after_version]})
    table = Table(title="versions")
    for c in ("id", "parent", "status", "active", "samples", "concept", "retention", "report"):
        table.add_column(c)
    for v in list_versions(st):
        m = v["metrics"]
        rep = state_root / "reports" / f"{v['id']}.png"
        table.add_row(v["id"], v["parent"] or "-", v["status"], "*" if v["active"] else "", str(len(v["samples"])),
                      f"{m['concept_score']:.3f}" if "concept_score" in m else "-",
                      f"{m['retention']:.3f}" if "retention" in m else "-", str(rep) if rep.exists() else "-")
    console.print(table)
    console.print(f"before/after (top: {before_version}, bottom: {after_version}): {pictures / 'before_after.png'}")
    console.print(f"prompts, left to right: {'; '.join(DEMO_PROMPTS)}")
    console.print(f"gate reports: {state_root / 'reports'}    try: dopsd sample \"{DEMO_PROMPTS[0]}\" --state {state_root}")
    console.print(f"in a browser: dopsd ui --state {state_root}   (then open the address it prints)")
    console.print(f"done in {time.time() - t_start:.0f}s")
    st.close()
    return {"state": str(state_root), "verdicts": verdicts, "active": after_version,
            "pictures": str(pictures / "before_after.png"), "seconds": time.time() - t_start}
