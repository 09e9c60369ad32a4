"""Run one `dopsd` command with CUDA's allocation history on; at an out-of-memory, write what was live.

    python bench/oom_probe.py train --json --state S      (the same arguments as `dopsd`)

At the first CUDA out-of-memory the allocator's observer writes $OOM_OUT/oom-<pid>.txt: the allocation that
failed (its Python stack), the live blocks grouped by the innermost frame of this package and of diffusers or
peft that made them, and the allocator's reserved-but-free bytes. bench/gpu_e2e.py runs its commands through
this file when E2E_ENTRY=bench/oom_probe.py.
"""

from __future__ import annotations

import collections
import os
import runpy
import sys
import traceback
from pathlib import Path

import torch

OUT = Path(os.environ.get("OOM_OUT", "/tmp"))
GIB = 2**30


def where(frames: list[dict]) -> str:
    ours = next((f for f in frames if "dopsd_continual" in f["filename"]), None)
    lib = next((f for f in frames if any(k in f["filename"] for k in ("diffusers", "peft", "transformers"))), None)
    fmt = lambda f: f"{Path(f['filename']).name}:{f['line']} {f['name']}" if f else "-"  # noqa: E731
    return f"{fmt(ours)} <- {fmt(lib)}"


def summarise(snap: dict, alloc: int, path: Path) -> None:
    live, free_reserved, reserved = collections.Counter(), 0, 0
    counts = collections.Counter()
    for seg in snap["segments"]:
        reserved += seg["total_size"]
        for b in seg["blocks"]:
            if b["state"] == "active_allocated":
                key = where(b.get("frames", []))
                live[key] += b["size"]
                counts[key] += 1
            else:
                free_reserved += b["size"]
    lines = [f"failed allocation: {alloc / GIB:.3f} GiB", f"reserved: {reserved / GIB:.3f} GiB",
             f"live: {sum(live.values()) / GIB:.3f} GiB", f"reserved but free: {free_reserved / GIB:.3f} GiB",
             "", "live by origin (GiB, blocks):"]
    lines += [f"{v / GIB:9.3f} {counts[k]:6d}  {k}" for k, v in live.most_common(60)]
    lines += ["", "stack of the failed allocation:", *traceback.format_stack()]
    path.write_text("\n".join(lines))


def main() -> None:
    if torch.cuda.is_available():
        torch.cuda.memory._record_memory_history(max_entries=50000, stacks="python")
        done = []

        def observer(device, alloc, device_alloc, device_free):
            if not done:
                done.append(1)
                OUT.mkdir(parents=True, exist_ok=True)
                path = OUT / f"oom-{os.getpid()}.txt"
                try:
                    summarise(torch.cuda.memory._snapshot(), alloc, path)
                except Exception:
                    path.write_text(traceback.format_exc())

        torch._C._cuda_attach_out_of_memory_observer(observer)
    sys.argv = ["dopsd", *sys.argv[1:]]
    runpy.run_module("dopsd_continual.cli_entry", run_name="__main__")


if __name__ == "__main__":
    main()
