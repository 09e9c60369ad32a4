"""How much of the world a toy VAE can show: reconstruct renders of the 200 held-out captions and score
the reconstructions with the ground-truth scorer (and PSNR), for the shipped VAE and any VAE trained by
`python -m dopsd_continual.toy.train --stage vae --workdir DIR [--vae-down 4]`.

    python bench/toy_vae_probe.py runs/toy_v8
Prints one JSON object per VAE, the shipped one first, and writes them all to
bench/results/toy_vae_probe.json (machine and date included). A generator built on a VAE cannot score higher
than that VAE's own reconstructions on shape, pattern or sharpness.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from benchinfo import machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopsd_continual.families import klein  # noqa: E402
from dopsd_continual.models import resolve_source  # noqa: E402
from dopsd_continual.toy import model as toy_model  # noqa: E402
from dopsd_continual.toy.scorer import load_classifier, score_images  # noqa: E402
from dopsd_continual.toy.world import held_out_captions, parse_caption, randomise, render_scenes  # noqa: E402


def probe(pipe, clf, label: str) -> dict:
    caps = held_out_captions()
    rng = np.random.default_rng(0)
    truth = render_scenes([randomise(parse_caption(c), rng) for c in caps])
    with torch.no_grad():
        tok, grid = klein.encode_images(pipe, truth)
        rec = klein.decode(pipe, tok, grid).clamp(0, 1)
    mse = float((rec - truth).pow(2).mean())
    sc = score_images(clf, rec, caps).mean()
    return {"vae": label, "tokens": f"{grid[0]}x{grid[1]}", "psnr_db": round(10 * np.log10(1 / mse), 2),
            **{k: round(v, 3) for k, v in sc.items()}}


def main() -> None:
    from diffusers import Flux2KleinPipeline

    from dopsd_continual.toy.train import load_state

    torch.set_num_threads(2)
    src = Path(resolve_source("embedded:toy-shapes"))
    pipe = Flux2KleinPipeline.from_pretrained(src)
    pipe.vae.float().eval()
    clf = load_classifier(src)
    rows = [probe(pipe, clf, "shipped")]
    print(json.dumps(rows[-1]), flush=True)
    from safetensors import safe_open

    for work in sys.argv[1:]:
        path = Path(work) / "vae.safetensors"
        with safe_open(str(path), "pt") as f:
            down = 8 if any(k.startswith("encoder.down_blocks.3.") for k in f.keys()) else 4
        pipe.vae = toy_model.build_vae(down).eval()
        load_state(path, pipe.vae)
        rows.append(probe(pipe, clf, work))
        print(json.dumps(rows[-1]), flush=True)
    out = {"machine": machine(),
           "date": time.strftime("%Y-%m-%d"), "held_out_captions": len(held_out_captions()), "rows": rows}
    (Path(__file__).parent / "results" / "toy_vae_probe.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
