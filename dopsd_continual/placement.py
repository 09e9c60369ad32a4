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

A component that leaves the card keeps a CPU copy from then on (made the first time it leaves, so a process
whose components never leave, an H200's or a training rank's, keeps none): page-locked (pinned) where, after
it, half the machine's memory is still available (PIN_SHARE), cut from 256 MiB slabs so that the pinned
allocator's power-of-two rounding costs nothing. From pinned memory a component crosses to the card
asynchronously and about 3.6x as fast (klein-4B's transformer and VAE on an H200: 0.59 s against 2.1 s,
bench/results/gpu_activations.json). A tensor the card has not changed since it arrived (its storage and
its version counter as they were: true of every weight but a float32 base's merged version) leaves by
taking its copy back, with no copy at all; a changed one is copied back into its own copy; one made on the
card (a version's chain term, an adapter) is copied to plain CPU memory and kept nowhere. `park` moves
everything off the card, keep_all's components too (sampling.Sampler.rest, between pictures).
`PhaseLog` records each named step's seconds and, on a GPU, its peak allocated memory; rounds and `dopsd
sample` report them.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path

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


PIN_SHARE = 0.5  # CPU copies are pinned only where, after them, this share of the machine's memory is still available
SLAB_BYTES = 1 << 28  # pinned copies are cut from slabs of 256 MiB (a power of two: nothing lost to rounding)


class Placement:
    """Moves a pipeline's components so that each phase holds only what it computes with."""

    def __init__(self, pipe, device: str | torch.device, keep_all: bool = False, one_shot: bool = False,
                 pin: bool | None = None):
        self.pipe, self.device = pipe, torch.device(device)
        self.keep_all, self.one_shot = keep_all, one_shot
        self.phase: str | None = None
        self.pin = self.device.type == "cuda" if pin is None else pin
        self.host: dict[str, dict[str, torch.Tensor]] = {}  # component -> its kept CPU copies, by tensor name
        self.arrived: dict[str, dict[str, tuple[int, int]]] = {}  # -> (storage, version) of each as it arrived

    @property
    def pinned_bytes(self) -> int:
        """Page-locked bytes the kept copies hold (their slabs, as the pinned allocator rounds them)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for kept in self.host.values() for t in kept.values() if self.pin and t.is_pinned()}
        return sum(_rounded(n) for n in storages.values())

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
            if name not in parts:
                continue
            kept = self.host.get(name, {})
            coming = [key for key, _, t in _tensors(parts[name]) if key in kept and t.device.type == "cpu"]
            parts[name].to(self.device, non_blocking=self.pin)
            if coming:  # as each arrives (one already on the card keeps what it was when it came)
                now = {key: t for key, _, t in _tensors(parts[name])}
                self.arrived.setdefault(name, {}).update({key: _fingerprint(now[key]) for key in coming})
        self.phase = phase

    def park(self) -> None:
        """Every component off the card onto its CPU copy, keep_all's too (the card free for another process
        between pictures, sampling.Sampler.rest); the next phase brings back what it computes with."""
        if self.device.type != "cpu":
            self._clear(lambda name: True)
        self.phase = "idle"

    def _clear(self, leaves) -> None:
        parts = self.components()
        for gone in set(self.host) - set(parts):  # a component released (Z-Image's teacher encoder): its copies too
            del self.host[gone]
            self.arrived.pop(gone, None)
        try:
            for name, module in parts.items():
                if not leaves(name) or not self.on_device(module):
                    continue
                if self.one_shot:  # this process will not need it again: freed, not copied back
                    setattr(self.pipe, name, None)
                else:
                    self._leave(name, module)
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize()  # the copies back are complete before anything reads them
                torch.cuda.empty_cache()

    def _leave(self, name: str, module: torch.nn.Module) -> None:
        """Back to CPU memory, onto the copy it kept (made now, the first time it leaves)."""
        first = name not in self.host
        kept = self.host.setdefault(name, {})
        arrived = self.arrived.pop(name, {})
        entries = _tensors(module)
        if first:
            views = self._copies([t for _, _, t in entries if t.device.type != "cpu"])
        for key, owners, t in entries:
            if t.device.type == "cpu":
                continue
            grad = t.grad if isinstance(t, torch.nn.Parameter) else None
            host = kept.get(key)
            if first and (host := next(views)) is not None:
                kept[key] = self._copy_back(host, t)
            elif host is None or host.shape != t.shape or host.dtype != t.dtype:  # made on the card: not kept
                host = self._copy_back(torch.empty(t.shape, dtype=t.dtype), t)
            elif arrived.get(key) != _fingerprint(t):  # changed on the card (a merged version): into its copy
                self._copy_back(host, t)
            _rebind(owners, host)
            for owner, (_, slot) in owners:
                if grad is not None:  # as Module.to does: the gradient goes along (copied once, shared by ties)
                    grad = grad if grad.device.type == "cpu" else self._copy_back(torch.empty(grad.shape, dtype=grad.dtype), grad)
                    owner._parameters[slot].grad = grad

    def _copy_back(self, host: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return host.copy_(t.detach(), non_blocking=self.pin and host.is_pinned())

    def _copies(self, tensors: list[torch.Tensor]):
        """A CPU tensor shaped like each of these, in turn: views into pinned slabs while there is room."""
        slab, used = None, SLAB_BYTES
        for t in tensors:
            size = t.numel() * t.element_size()
            if size > SLAB_BYTES:  # a tensor bigger than a slab has a buffer of its own
                buf = self._buffer(size)
                yield None if buf is None else buf[:size].view(t.dtype).view(t.shape)
                continue
            if used + size > SLAB_BYTES:
                slab, used = self._buffer(SLAB_BYTES), 0
            yield None if slab is None else slab[used:used + size].view(t.dtype).view(t.shape)
            used += (size + 511) // 512 * 512  # every view aligned for any dtype

    def _buffer(self, size: int) -> torch.Tensor | None:
        """size pinned bytes, or None where the machine has no room for them (that tensor is then copied back
        to plain memory each time it leaves, and kept nowhere while on the card, as before copies were kept)."""
        if not (self.pin and _pin_room(size)):
            return None
        try:
            return _pinned_buffer(size)
        except RuntimeError:  # page-locking refused (a memory limit)
            return None


def _pinned_buffer(size: int) -> torch.Tensor:
    return torch.empty(size, dtype=torch.uint8, pin_memory=True)


def _fingerprint(t: torch.Tensor) -> tuple[int, int]:
    """What tells a tensor the card changed (another storage, or written in place) from one it did not."""
    return t.data_ptr(), t._version


def _rounded(size: int) -> int:
    """The bytes the pinned allocator takes for size (a power of two, as ATen's CachingHostAllocator rounds)."""
    return 1 << max(0, size - 1).bit_length()


def _pin_room(size: int) -> bool:
    """Whether size more page-locked bytes leave PIN_SHARE of the machine's memory available (read now, so
    that two processes pinning at once both see it)."""
    try:
        info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in open("/proc/meminfo") if ln.split()[1:2]}
        total = info["MemTotal"]
        try:  # a container's limit, where there is one
            limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
            total = min(total, int(limit)) if limit.isdigit() else total
        except OSError:
            pass
        return info["MemAvailable"] - size >= PIN_SHARE * total
    except (OSError, KeyError, ValueError):
        return False


def empty_host_cache() -> None:
    """Unlock the pinned memory that dropped copies left in torch's host allocator (a reloaded model)."""
    fn = getattr(torch._C, "_host_emptyCache", None)
    if fn is not None and torch.cuda.is_available():
        fn()


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


def _rebind(owners: list, t: torch.Tensor) -> None:
    """Every owner's slot onto t (Module.to's way: the same Parameter object where the types allow, so an
    optimiser's reference stays good)."""
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
