"""`dopsd sample` as a user runs it, whole processes, medians of RUNS (default 5):

- plain:  a fresh `python` that loads the pipeline with diffusers' own `from_pretrained` and calls it once (the
          baseline: what any script pays);
- cold:   `dopsd sample` with no daemon running, a new prompt each time (text encoder loaded), and a prompt seen
          before (its features on disk: no text encoder);
- daemon: `dopsd sample` answered by a running daemon that keeps the model warm (its first answer, which loads
          the model, is reported apart), at version depth 0, 1, 5 and 20 (each depth's first answer merges the
          chain; the median is of the repeats);
- in-process: inside one process with the model loaded, a call that draws the picture and writes its file
          (what the daemon's answer is compared with: the floor for any process).

On the toy model on a CPU by default; `--recipe PATH` measures another (a real-size random-weight recipe from
bench/gpu_e2e.py on a GPU). Writes bench/results/sample_latency.json.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT))
PROMPT = "a large red circle in the center, blue background"


def make_chain(st, depth: int, rank: int = 4, modules: int = 6, seed: int = 0, tr=None) -> str:
    """`depth` accepted versions, each a small random delta on the last (no training): a chain to switch to.
    tr: the recipe's transformer, if loaded already (only its layers' shapes are read)."""
    import torch

    from dopsd_continual.lora import Delta, resolve_targets
    from dopsd_continual.models import load_pipeline
    from dopsd_continual.stack import write_version

    tr = tr if tr is not None else load_pipeline(st.recipe, "cpu", encoders=False).transformer
    names = resolve_targets(tr, st.recipe["train"]["targets"])[:modules]
    mods = dict(tr.named_modules())
    g = torch.Generator().manual_seed(seed)
    parent = st.active_version
    first = int(parent[1:]) + 1
    for i in range(first, first + depth):
        w = {n: (torch.randn(rank, mods[n].in_features, generator=g) * 0.05,
                 torch.randn(mods[n].out_features, rank, generator=g) * 0.05) for n in names}
        vid = f"v{i}"
        write_version(st, vid, parent, Delta(w, 1.0), {"objective": "bench"})
        st.db["versions"].insert({"id": vid, "parent": parent, "status": "accepted", "created_at": 0.0,
                                  "objective": "bench", "recipe_hash": "", "samples": "[]", "metrics": "{}",
                                  "reasons": "[]", "adapter_dir": f"adapters/{vid}"})
        parent = vid
    st.db["meta"].upsert({"key": "active_version", "value": parent}, pk="key")
    return parent


def timed(cmd: list[str], env: dict) -> tuple[float, dict]:
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr[-2000:]}")
    try:
        out = json.loads(r.stdout)
    except ValueError:
        out = {}
    return time.perf_counter() - t, out


PLAIN = """
import sys, torch
from dopsd_continual.families import family
from dopsd_continual.models import resolve_source
from dopsd_continual.recipe import load_recipe
r = load_recipe(sys.argv[1]); m = r["model"]; fam = family(r)
dev = "cuda" if torch.cuda.is_available() else "cpu"  # what a script does: the whole pipeline on the card
pipe = fam.pipeline_class().from_pretrained(resolve_source(m["source"]), dtype=getattr(torch, m["dtype"])).to(dev)
pipe.set_progress_bar_config(disable=True)
with torch.no_grad():  # the prompt as the recipe encodes it (its sequence length and layers), then one call
    emb = fam.prompt_embeds(fam.encode_prompts(pipe, [sys.argv[2]], m), dev, pipe.transformer.dtype)
    pipe(prompt_embeds=emb, num_inference_steps=m["steps"], height=m["height"], width=m["width"],
         guidance_scale=fam.guidance, generator=torch.Generator("cpu").manual_seed(0))
"""


WARM = """
import json, statistics, sys, time
from pathlib import Path
from dopsd_continual.sampling import Sampler, draw
from dopsd_continual.pictures import request, save_image
from dopsd_continual.store import open_state
st = open_state(Path(sys.argv[1])); runs = int(sys.argv[4])
sampler = Sampler(st, prompt_cache=True)
req = request(st, sys.argv[2], sys.argv[3], None, 0, 1)
times = []
for i in range(runs + 1):  # the first call warms the kernels and encodes the prompt; the rest are timed
    t = time.perf_counter()
    image, meta, _ = draw(st, req, sampler)
    save_image(image, Path(sys.argv[5]), meta)
    times.append(time.perf_counter() - t)
print(json.dumps(statistics.median(times[1:])))
"""


def main() -> None:
    from dopsd_continual.recipe import RECIPES_DIR
    from dopsd_continual.store import init_state

    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(RECIPES_DIR / "toy-shapes.toml"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sample_latency.json"))
    a = ap.parse_args()
    runs = int(os.environ.get("RUNS", "5"))
    dopsd = [sys.executable, "-m", "dopsd_continual.cli_entry"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(tmp), "HF_HUB_OFFLINE": "1"}
        state = tmp / "s"
        st = init_state(state, a.recipe, [])
        depths = {0: "v0"}
        from dopsd_continual.models import load_pipeline

        tr = load_pipeline(st.recipe, "cpu", encoders=False).transformer
        for d in (1, 5, 20):
            depths[d] = make_chain(st, d - max(k for k in depths if k < d), seed=d, tr=tr)
        del tr
        model = st.recipe["model"]
        st.close()
        sample = [*dopsd, "sample", "--json", "--state", str(state)]
        import torch

        res: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "recipe": Path(a.recipe).name,
                     "model": model["name"], "px": [model["height"], model["width"]], "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                     "runs": runs, "seconds": {}}
        s = res["seconds"]
        s["plain from_pretrained + call"] = statistics.median(
            timed([sys.executable, "-c", PLAIN, a.recipe, PROMPT], env)[0] for _ in range(runs))
        s["cold, new prompt"] = statistics.median(
            timed([*sample, f"{PROMPT} {i}", "--version", "v0", "--out", str(tmp / f"c{i}.png")], env)[0] for i in range(runs))
        s["cold, prompt seen before"] = statistics.median(
            timed([*sample, PROMPT, "--version", "v0", "--out", str(tmp / "c.png")], env)[0] for _ in range(runs))
        subprocess.run([*dopsd, "daemon", "start", "--state", str(state)], check=True, env=env, capture_output=True)
        try:
            t, out = timed([*sample, PROMPT, "--version", "v0", "--out", str(tmp / "w.png")], env)
            assert out.get("drawn_by") == "daemon", out
            s["daemon, first request (loads the model)"] = t
            for d, vid in depths.items():
                first, _ = timed([*sample, PROMPT, "--version", vid, "--out", str(tmp / "w.png")], env)
                rest = [timed([*sample, PROMPT, "--version", vid, "--out", str(tmp / "w.png")], env)[0] for _ in range(runs)]
                s[f"daemon, depth {d}: first at this version"] = first
                s[f"daemon, depth {d}"] = statistics.median(rest)
        finally:
            subprocess.run([*dopsd, "daemon", "stop", "--state", str(state)], env=env, capture_output=True)
        warm = subprocess.run([sys.executable, "-c", WARM, str(state), PROMPT, "v0", str(runs), str(tmp / "i.png")],
                              capture_output=True, text=True, env=env, check=True)
        s["in-process, model loaded: one call (draw and write the file)"] = json.loads(warm.stdout.splitlines()[-1])
        s["python -c pass"] = statistics.median(timed([sys.executable, "-c", "pass"], env)[0] for _ in range(runs))
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    for k, v in res["seconds"].items():
        print(f"{k:45s} {v:6.2f} s")


if __name__ == "__main__":
    main()
