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

Where components do come and go (a 16 or 24 GB card), each keeps its CPU copy while it is on the card, in
pinned (page-locked) memory while the pinned total stays within PIN_SHARE of the machine's memory: a pinned
copy crosses to the card about twice as fast as pageable memory, asynchronously, and a component whose
weights the card never changes (every one but the transformer: text encoders, the VAE) leaves by taking its
CPU copy back, with no copy at all. The transformer's weights do change there (a version merged in, a round's
adapters, the chain's terms), so it is copied back into its pinned copy when it leaves.
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


WRITTEN = ("transformer",)  # the components whose weights a process changes on the card
PIN_SHARE = 0.5  # of the machine's memory, at most, page-locked for CPU copies


class Placement:
    """Moves a pipeline's components so that each phase holds only what it computes with."""

    def __init__(self, pipe, device: str | torch.device, keep_all: bool = False, one_shot: bool = False):
        self.pipe, self.device = pipe, torch.device(device)
        self.keep_all, self.one_shot = keep_all, one_shot
        self.phase: str | None = None
        self.host: dict[str, dict[str, torch.Tensor]] = {}  # component -> its tensors' CPU copies, by name
        self.pin = self.device.type == "cuda"
        self.pinned_bytes = 0

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
        self._clear(lambda name: name not in wanted and not self.keep_all)  # first, so the arrivals find the room
        parts = self.components()
        for name in wanted:
            if name in parts:
                self._arrive(name, parts[name])
        self.phase = phase

    def park(self) -> None:
        """Every component off the card onto its CPU copy, keep_all's too (the card free for another process
        between pictures, sampling.Sampler.rest); the next phase brings back what it computes with."""
        if self.device.type != "cpu":
            self._clear(lambda name: True)
        self.phase = "idle"

    def _clear(self, leaves) -> None:
        left = False
        for name, module in self.components().items():
            if not leaves(name) or not self.on_device(module):
                continue
            if self.one_shot:  # this process will not need it again: freed, not copied back
                setattr(self.pipe, name, None)
                self.host.pop(name, None)
            else:
                self._leave(name, module)
                left = True
        if left and self.device.type == "cuda":
            torch.cuda.synchronize()  # the copies back are complete before anything reads them
        torch.cuda.empty_cache()

    def _arrive(self, name: str, module: torch.nn.Module) -> None:
        """To the card; a component that will leave again keeps its CPU copy (pinned where there is room)."""
        if not (self.keep_all or self.one_shot):
            kept = self.host.setdefault(name, {})
            for key, owners, t in _tensors(module):
                if t.device.type == "cpu" and key not in kept:
                    kept[key] = self._pinned(t)
                    _rebind(owners, kept[key])  # the pageable original is freed here, tensor by tensor
        module.to(self.device, non_blocking=self.pin)

    def _leave(self, name: str, module: torch.nn.Module) -> None:
        """Back to CPU memory: onto the copy it kept (written back first where the card may have changed it)."""
        kept = self.host.setdefault(name, {})
        seen = set()
        for key, owners, t in _tensors(module):
            seen.add(key)
            if t.device.type == "cpu":
                continue
            host = kept.get(key)
            if host is None or host.shape != t.shape or host.dtype != t.dtype:  # made on the card (an adapter)
                if host is not None:
                    self._unpin(host)
                host = kept[key] = self._pinned(torch.empty(t.shape, dtype=t.dtype), fresh=True)
                self._copy_back(host, t)
            elif name in WRITTEN:
                self._copy_back(host, t)
            grad = t.grad if isinstance(t, torch.nn.Parameter) else None
            for owner, slot in _rebind(owners, host):
                if grad is not None:  # as Module.to does: the gradient goes along (copied once, shared by ties)
                    grad = grad if grad.device.type == "cpu" else self._copy_back(torch.empty(grad.shape, dtype=grad.dtype), grad)
                    owner._parameters[slot[1]].grad = grad
        for key in set(kept) - seen:  # gone on the card (an adapter removed)
            self._unpin(kept.pop(key))

    def _copy_back(self, host: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return host.copy_(t.detach(), non_blocking=self.pin and host.is_pinned())

    def _pinned(self, t: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        size = t.numel() * t.element_size()
        if not self.pin or self.pinned_bytes + size > PIN_SHARE * _machine_bytes():
            return t
        self.pinned_bytes += size
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True) if fresh else t.detach().pin_memory()

    def _unpin(self, t: torch.Tensor) -> None:
        if t.is_pinned():
            self.pinned_bytes -= t.numel() * t.element_size()


def _tensors(module: torch.nn.Module) -> list[tuple[str, list, torch.Tensor]]:
    """(name, [(owning module, ('param' or 'buffer', key))], tensor) for every parameter and buffer of a module,
    each once: a tensor tied between modules (a shared embedding) is one entry with all its owners."""
    found: dict[int, tuple[str, list, torch.Tensor]] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for kind, table in (("param", sub._parameters), ("buffer", sub._buffers)):
            for key, t in table.items():
                if t is not None:
                    entry = found.setdefault(id(t), (f"{prefix}.{key}" if prefix else key, [], t))
                    if (sub, (kind, key)) not in entry[1]:
                        entry[1].append((sub, (kind, key)))
    return list(found.values())


def _rebind(owners: list, t: torch.Tensor) -> list:
    """Every owner's slot onto t (Module.to's way: the same Parameter object where the types allow, so an
    optimiser's reference stays good); the owners, for what follows."""
    made = None
    for owner, (kind, key) in owners:
        if kind == "buffer":
            owner._buffers[key] = t
            continue
        param = owner._parameters[key]
        if made is not None:
            owner._parameters[key] = made
        elif torch._has_compatible_shallow_copy_type(param, t):
            param.data = t
        else:
            owner._parameters[key] = made = torch.nn.Parameter(t, requires_grad=param.requires_grad)
    return owners


def _machine_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


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
