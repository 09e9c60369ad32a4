"""Does the gate reject damaging rounds and accept good ones? Seeds x {default D-OPSD, damaging SFT}.

For each seed: a fresh state dir with the heart pack queued, one default D-OPSD round and one damaging
round (`--objective sft --lr 3e-3 --steps 150`), each from v0, through the real round + gate code. Writes
bench/results/gate_validation.json: every verdict with all its metrics, false-reject rate (default
rounds rejected) and false-accept rate (damaging rounds accepted). SEEDS (default 10) and PACK
(default heart) are environment variables. About 2 minutes a seed on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchinfo import machine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dopsd_continual.ingest import ingest_paths  # noqa: E402
from dopsd_continual.recipe import RECIPES_DIR  # noqa: E402
from dopsd_continual.rounds import run_round  # noqa: E402
from dopsd_continual.sampling import Sampler  # noqa: E402
from dopsd_continual.stack import set_active  # noqa: E402
from dopsd_continual.store import init_state  # noqa: E402
from dopsd_continual.toy.packs import write_pack  # noqa: E402

KINDS = {"default": {}, "damaging": {"objective": "sft", "lr": 3e-3, "steps": 150}}


def main() -> None:
    seeds = int(os.environ.get("SEEDS", "10"))
    offset = int(os.environ.get("SEED_OFFSET", "100"))
    pack = os.environ.get("PACK", "heart")
    out_path = Path(__file__).parent / "results" / "gate_validation.json"
    out = {"machine": machine(),
           "date": time.strftime("%Y-%m-%d"), "pack": pack, "runs": []}
    tmp = Path(tempfile.mkdtemp())
    try:
        write_pack(pack, tmp / "drop")
        sampler = None
        for seed in range(offset, offset + seeds):
            recipe = tmp / f"r{seed}.toml"
            recipe.write_text((RECIPES_DIR / "toy-shapes.toml").read_text().replace("seed = 0", f"seed = {seed}"))
            st = init_state(tmp / f"s{seed}", str(recipe), [tmp / "drop"])
            os.environ["DOPSD_STABILITY_SECONDS"] = "0"
            ingest_paths(st)
            if sampler is None:
                sampler = Sampler(st)
            sampler.state = st
            sampler.switch.current = None
            for kind, kw in KINDS.items():
                set_active(st, "v0")
                for row in list(st.db["samples"].rows):
                    st.db["samples"].update(row["id"], {"status": "queued"})
                t = time.time()
                r = run_round(st, sampler=sampler, **kw)
                out["runs"].append({"seed": seed, "kind": kind, "verdict": r["verdict"], "reasons": r["reasons"],
                                    "seconds": time.time() - t, "metrics": r["metrics"]})
                print(f"seed {seed} {kind}: {r['verdict']} {r['reasons']}", flush=True)
            st.close()
            done = out["runs"]
            d = [x for x in done if x["kind"] == "default"]
            b = [x for x in done if x["kind"] == "damaging"]
            out["false_reject_rate"] = sum(x["verdict"] == "rejected" for x in d) / len(d)
            out["false_accept_rate"] = sum(x["verdict"] == "accepted" for x in b) / len(b)
            out["seeds_done"] = seed - offset + 1
            out_path.write_text(json.dumps(out, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"false-reject {out['false_reject_rate']:.2f}, false-accept {out['false_accept_rate']:.2f}")


if __name__ == "__main__":
    main()
