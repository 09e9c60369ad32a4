"""What lives on the GPU in each phase, and what each phase cost.

One table is the whole placement policy: a phase names the pipeline components it computes with, and every
other component waits in CPU memory. The weights are loaded into CPU memory once; a component crosses to
the GPU when a phase needs it and back when the next one does not.

    features   text encoder, VAE (and Z-Image's Qwen3-VL teacher encoder, for as long as it exists)
    encode     text encoder: prompt features for sampling, cached per prompt, so sampling needs no encoder
    train      transformer only (the round's features are cached tensors)
    sample     transformer and VAE (the gate, `dopsd sample`)
    idle       nothing (the daemon between rounds with keep_warm_seconds > 0)

Where the card's free memory holds every component with each phase's activations (memory.placement_plan: an
H200, a 48 GB card), `keep_all` keeps each component on the card from its first phase on: nothing moves
again. A process that draws once and exits (`one_shot`: an in-process `dopsd sample`) frees a component
leaving the card instead of copying it back to CPU memory. On a CPU-only box every phase is a no-op.
`PhaseLog` records each named step's seconds and, on a GPU, its peak allocated memory; rounds and `dopsd
sample` report them.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import torch

PHASES: dict[str, tuple[str, ...]] = {
    "features": ("text_encoder", "vae"),
    "encode": ("text_encoder",),
    "train": ("transformer",),
    "sample": ("transformer", "vae"),
    "idle": (),
}


def compute_device(device: str | torch.device | None = None) -> torch.device:
    """The device a pipeline computes on: the one asked for, else the GPU when there is one."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Placement:
    """Moves a pipeline's components so that each phase holds only what it computes with."""

    def __init__(self, pipe, device: str | torch.device, keep_all: bool = False, one_shot: bool = False):
        self.pipe, self.device = pipe, torch.device(device)
        self.keep_all, self.one_shot = keep_all, one_shot
        self.phase: str | None = None

    def components(self) -> dict[str, torch.nn.Module]:
        return {name: m for name, m in self.pipe.components.items() if isinstance(m, torch.nn.Module)}

    def on_device(self, module: torch.nn.Module) -> bool:
        p = next(module.parameters(), None)
        return p is not None and p.device.type == self.device.type

    def use(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        if self.device.type == "cpu" or phase == self.phase:
            self.phase = phase
            return
        wanted = PHASES[phase]
        parts = self.components()
        for name, module in parts.items():  # leave first, so the arrivals find the room
            if name in wanted or self.keep_all or not self.on_device(module):
                continue
            if self.one_shot:  # this process will not need it again: freed, not copied back
                setattr(self.pipe, name, None)
            else:
                module.to("cpu")
        del parts
        torch.cuda.empty_cache()
        parts = self.components()
        for name in wanted:
            if name in parts:
                parts[name].to(self.device)
        self.phase = phase


class PhaseLog:
    """{phase: {"seconds", "peak_gib"}} for named steps; peak_gib is None off the GPU."""

    def __init__(self, device: str | torch.device):
        self.cuda = torch.device(device).type == "cuda"
        self.records: dict[str, dict] = {}

    @contextmanager
    def __call__(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            rec = self.records.setdefault(name, {"seconds": 0.0, "peak_gib": None})
            rec["seconds"] += time.perf_counter() - t0
            if self.cuda:
                peak = torch.cuda.max_memory_allocated() / 2**30
                rec["peak_gib"] = max(rec["peak_gib"] or 0.0, peak)


def apply_memory_budget(budget_gib: float, device: torch.device) -> None:
    """Cap this process's GPU allocations at the recipe's budget (a 24 GB card's share on a larger one)."""
    if device.type != "cuda" or budget_gib <= 0:
        return
    # Segments that grow in place: at the out-of-memory under a 14.5 GiB cap the default allocator held 0.92
    # GiB reserved but unusable, with them 0.08 GiB (bench/results/gpu_oom_probe/, H200, 2026-11-29). The
    # user's own PYTORCH_CUDA_ALLOC_CONF wins.
    if not {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} & set(os.environ):
        import warnings

        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
        try:
            with warnings.catch_warnings():  # the older name warns that it is deprecated
                warnings.simplefilter("ignore", FutureWarning)
                setter("expandable_segments:True")
        except (AttributeError, RuntimeError):
            pass
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gib / total), index)
