"""Several training processes: what the 1-process path costs now against the code before them, and what a
2-process round's train phase costs against 1 process at the same global batch, on this machine.

1. One process, before and after: `train_delta` of training.py as it was before several processes (REV,
   read with `git show`) and of today's, on the same toy backend and features, RUNS rotations; medians,
   minima and the median of paired ratios. A control arm runs a second copy of the old code: its ratio to
   the first copy is what this machine's noise alone gives.
2. The whole round's train phase (`run_round`, gate off) at a global batch of 4: the plain 1-process path;
   the same training through the launcher with 1 process (its fixed cost: start-up, loading the transformer
   again); and 2, 4, 8 processes as far as the GPUs go (2 on a CPU, over gloo). On a CPU the processes share
   the same cores, so this measures start-up and the all-reduce, not a speed-up. On one GPU it is the
   launcher's overhead against the plain path; on several, the scaling.

Writes bench/results/processes.json. Environment: RUNS (default 5), STEPS (default 20).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchinfo import machine

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DOPSD_STABILITY_SECONDS", "0")  # the pack was just written: take it now
REV = os.environ.get("REV", "dd98e49")


def previous_training(name: str = "training_prev"):
    """The training module as it was at REV, loaded inside the package (its relative imports resolve)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{REV}:dopsd_continual/training.py"], check=True,
                         capture_output=True, text=True).stdout
    from dopsd_continual.families import klein

    sys.modules.setdefault("dopsd_continual.klein", klein)  # where REV's module imported it from
    path = Path(tempfile.mkdtemp()) / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"dopsd_continual.{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def one_process(runs: int, steps: int) -> dict:
    import torch

    from dopsd_continual import training as now
    from dopsd_continual.ingest import ingest_paths
    from dopsd_continual.sampling import Sampler, image_tensor
    from dopsd_continual.store import init_state
    from dopsd_continual.toy.packs import write_pack

    prev, control = previous_training(), previous_training("training_prev_copy")
    tmp = Path(tempfile.mkdtemp())
    write_pack("heart", tmp / "drop")
    st = init_state(tmp / "s", None, [tmp / "drop"])
    ingest_paths(st)
    sampler = Sampler(st)
    from dopsd_continual.families import family

    backend = family(st.recipe).backend(sampler.pipe, st.recipe, sampler.device)
    from dopsd_continual.ingest import sample_image
    from dopsd_continual.rounds import fit

    h, w = st.recipe["model"]["height"], st.recipe["model"]["width"]
    feats = [backend.features(s["caption"], image_tensor(fit(sample_image(st, s), w, h)))
             for s in st.rows("select * from samples")]
    train = dict(st.recipe["train"], steps=steps)
    times: dict[str, list[float]] = {"before": [], "before, a second copy": [], "now": []}
    deltas = {}
    arms = [("before", prev), ("before, a second copy", control), ("now", now)]
    for i in range(runs):
        for name, mod in arms[i % 3:] + arms[: i % 3]:  # each arm takes each place in turn
            torch.manual_seed(0)
            t = time.perf_counter()
            r = mod.train_delta(backend, feats, [], train, "dopsd")
            times[name].append(time.perf_counter() - t)
            deltas[name] = r.delta
    same = all(torch.equal(a, b) for n in deltas["now"].weights
               for a, b in zip(deltas["now"].weights[n], deltas["before"].weights[n]))
    st.close()
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return {"steps": steps, "batch": train["batch"], "runs": runs, "median_seconds": {k: round(v, 3) for k, v in med.items()},
            "min_seconds": {k: round(v, 3) for k, v in low.items()},
            "ratio_now_over_before": round(med["now"] / med["before"], 3),
            "ratio_of_minima": round(low["now"] / low["before"], 3),
            "median_of_paired_ratios": round(statistics.median(a / b for a, b in zip(times["now"], times["before"])), 3),
            "control_median_of_paired_ratios": round(statistics.median(
                a / b for a, b in zip(times["before, a second copy"], times["before"])), 3),
            "identical_delta": same}


def rounds(steps: int) -> dict:
    """A round's train phase: the plain path, the launcher with 1 process, and 2+ processes where there is room."""
    import torch

    from dopsd_continual.distributed import jobs_dir, train_in_processes
    from dopsd_continual.ingest import ingest_paths
    from dopsd_continual.recipe import RECIPES_DIR
    from dopsd_continual.rounds import run_round
    from dopsd_continual.store import init_state
    from dopsd_continual.toy.packs import write_pack
    from dopsd_continual.training import FeatureCache

    tmp = Path(tempfile.mkdtemp())
    write_pack("heart", tmp / "drop")
    base = (RECIPES_DIR / "toy-shapes.toml").read_text().replace("enabled = true", "enabled = false")
    gpus = torch.cuda.device_count()
    counts = [1] + [n for n in (2, 4, 8) if (gpus == 0 and n == 2) or 2 <= n <= gpus]
    out = {}
    for n in counts:
        batch = 4 // n if 4 % n == 0 else 1
        text = base.replace("\nbatch = 4 ", f"\nbatch = {batch} ").replace("processes = 1 ", f"processes = {n} ")
        (tmp / f"r{n}.toml").write_text(text)
        st = init_state(tmp / f"s{n}", str(tmp / f"r{n}.toml"), [tmp / "drop"])
        ingest_paths(st)
        r = run_round(st, steps=steps)
        out[f"{n} process(es), batch {batch} each"] = {
            "train_phase_seconds": round(r["metrics"]["phases"]["train"]["seconds"], 2),
            "training_loop_seconds": round(r["metrics"]["train_seconds"], 2)}
        if n == 1:  # the same round's training through the launcher with one process: its fixed cost
            samples = st.rows("select * from samples")
            cache = FeatureCache(st.cache / "features", next((st.cache / "features").iterdir()).name)
            job = {"state": str(st.root), "parent": "v0", "train": dict(st.recipe["train"], steps=steps),
                   "new": [str(cache.path(s["sha256"], s["caption"])) for s in samples], "replay": []}
            t = time.perf_counter()
            res = train_in_processes(st, jobs_dir(st) / "bench", job, 1, "cuda" if gpus else "cpu")
            out["1 process through the launcher, batch 4"] = {
                "train_phase_seconds": round(time.perf_counter() - t, 2), "training_loop_seconds": round(res.seconds, 2)}
        st.close()
    return out


def _device() -> str:
    import torch

    return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "cpu"


def main() -> None:
    runs, steps = int(os.environ.get("RUNS", "5")), int(os.environ.get("STEPS", "20"))
    res = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "previous_code": REV,
           "one_process_before_and_now": one_process(runs, steps),
           "device": _device(), "round_train_phase_global_batch_4": rounds(steps)}
    (ROOT / "bench" / "results" / "processes.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
