"""One round's training: a zero-initialised LoRA delta trained with D-OPSD (or SFT, the baseline).

D-OPSD step, as ../shared/METHOD.md lists it:
  1. conditions (cached per sample): student = the caption's text features; teacher = the same model's
     reference-image context (caption + instruction, the target image's latents as reference tokens);
  2. x ~ N(0, I); the model's own K-step sigmas;
  3. for each roll-out step k (no back-propagation through time):
       teacher (EMA adapter, no grad) and student (with grad) velocities at the *student's* state x;
       x0 = x - sigma_k * v; loss_k = MSE(x0_S, x0_T); backward now (the graphs are disjoint);
       x <- x + (sigma_{k+1} - sigma_k) * v_S, detached;
  4. clip grad-norm 1.0; AdamW step;
  5. teacher <- EMA of the student (both start equal: B = 0, so both are the active model at step 0).
SFT trains the same adapter with the same loop around it, with the flow-matching loss on the user's images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch.nn import functional as F

from .families import Backend
from .files import private_dirs
from .lora import Delta, from_peft, resolve_targets
from .quant import quantize_int8, restore

STUDENT, TEACHER = "student", "teacher"


# --------------------------------------------------------------------------------------- feature cache


class FeatureCache:
    """state/cache/<encoder id>/<sample sha256>.safetensors"""

    def __init__(self, root: Path, encoder_id: str):
        self.dir = Path(root) / encoder_id
        private_dirs(self.dir)
        self.hits = self.misses = 0

    def path(self, sha: str, caption: str) -> Path:
        from .store import feature_key

        return self.dir / f"{feature_key(sha, caption)}.safetensors"

    def get(self, sha: str, caption: str, compute: Callable[[], dict]) -> dict[str, torch.Tensor]:

        path = self.path(sha, caption)
        from .store import load_compact, save_compact

        if path.exists():
            try:
                self.hits += 1
                return load_compact(path)
            except Exception:
                path.unlink(missing_ok=True)  # a damaged cache entry is recomputed, never trusted
        self.misses += 1
        feats = compute()
        tmp = path.with_name(path.name + ".tmp")
        save_compact(feats, tmp)  # bf16 where that is exact (a bf16 encoder's output): half the bytes
        tmp.replace(path)
        return feats


# ------------------------------------------------------------------------------------------- adapters


def add_adapters(transformer, rank: int, alpha: float, targets: list[str], seed: int | None = None) -> list[torch.nn.Parameter]:
    """A zero-initialised `student` and an identical `teacher` LoRA in float32; returns the student's parameters.

    peft gives an adapter its base layer's dtype: under a bf16 base the LoRA, its AdamW state and the EMA
    teacher would live in bf16, where an EMA at decay 0.999 or an update at lr 2e-5 mostly rounds away.

    peft draws A from the global RNG: with `seed`, it draws from a forked, seeded one (same round, same
    adapter, whatever ran before), and the caller's RNG state is left as it was.
    """
    from peft import LoraConfig

    names = resolve_targets(transformer, targets)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, init_lora_weights=True)
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        if seed is not None:
            torch.manual_seed(seed)
        transformer.add_adapter(cfg, adapter_name=STUDENT)
        transformer.add_adapter(cfg, adapter_name=TEACHER)
    student, teacher = adapter_params(transformer, STUDENT), adapter_params(transformer, TEACHER)
    with torch.no_grad():
        for p in student + teacher:  # float32 master weights under any base dtype (autocast does the compute)
            p.data = p.data.float()
        for s, t in zip(student, teacher):
            t.copy_(s)
    use(transformer, STUDENT)
    return student


def adapter_params(model, adapter: str) -> list[torch.nn.Parameter]:
    return [p for n, p in sorted(model.named_parameters()) if f".{adapter}." in n and "lora_" in n]


def use(model, adapter: str) -> None:
    model.set_adapter(adapter)
    for n, p in model.named_parameters():
        p.requires_grad_(f".{STUDENT}." in n and "lora_" in n)


@torch.no_grad()
def ema_update(teacher: list[torch.nn.Parameter], student: list[torch.nn.Parameter], decay: float) -> None:
    for t, s in zip(teacher, student):
        t.mul_(decay).add_(s.detach(), alpha=1 - decay)


def set_checkpointing(transformer, share: bool | float) -> int:
    """Gradient checkpointing of a share of the transformer's blocks; returns how many blocks are checkpointed.

    False/0: none (fastest, most memory); True/1: every block (least memory); in between: the first
    round(share x blocks) blocks in forward order and the rest kept in memory, so a card's spare memory buys
    back recomputation. Checkpointing recomputes the same forward: loss and gradients are unchanged.
    """
    blocks = [b for _, child in transformer.named_children() if isinstance(child, torch.nn.ModuleList) for b in child]
    n = round(float(share) * len(blocks))
    if n == 0:
        transformer.disable_gradient_checkpointing()
        return 0
    chosen = {id(b) for b in blocks[:n]}

    def checkpoint_some(block, *args):
        if id(block) in chosen:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(checkpoint_some)
    return n


def remove_adapters(transformer) -> None:
    transformer.unload_lora()  # removes the peft wrappers: plain Linear layers again


# ---------------------------------------------------------------------------------------------- steps


def dopsd_loss_and_backward(backend: Backend, feats: list[dict], sigmas: list[float], noise: torch.Tensor,
                            per_step_backward: bool = True, teacher_same_as_student: bool = False) -> float:
    """Steps 2-3: the K-step roll-out with the teacher at the student's state; gradients accumulate."""
    tr = backend.transformer
    cond_s = backend.conditions(feats, teacher=False)
    cond_t = cond_s if teacher_same_as_student else backend.conditions(feats, teacher=True)
    x = noise
    k_steps = len(sigmas) - 1
    total, losses = 0.0, []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sig = torch.full((x.shape[0],), s, device=x.device)
        use(tr, TEACHER)
        with torch.no_grad():
            v_t = backend.velocity(x, sig, cond_t)
        use(tr, STUDENT)
        v_s = backend.velocity(x, sig, cond_s)
        x0_s, x0_t = x - s * v_s, x - s * v_t
        loss = F.mse_loss(x0_s, x0_t) / k_steps
        if per_step_backward:
            loss.backward()
        else:
            losses.append(loss)
        total += loss.item()
        x = (x + (s_next - s) * v_s).detach()
    if not per_step_backward:
        torch.stack(losses).sum().backward()
    return total


def sft_loss_and_backward(backend: Backend, feats: list[dict], noise: torch.Tensor, sigma: torch.Tensor) -> float:
    """Plain flow matching toward the user's image: the baseline objective."""
    use(backend.transformer, STUDENT)
    x0 = torch.stack([f["latents"] for f in feats]).to(noise.device)
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))  # tokens (klein) or latent maps (Z-Image)
    xt = (1 - s) * x0 + s * noise
    v = backend.velocity(xt, sigma, backend.conditions(feats, teacher=False))
    loss = F.mse_loss(v, noise - x0)
    loss.backward()
    return loss.item()


@dataclass
class TrainResult:
    delta: Delta
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    samples_per_s: float = 0.0
    seen: list[int] = field(default_factory=list)  # indices of the new samples some step drew (trained on)


def train_delta(
    backend: Backend,
    new: list[dict],
    replay: list[dict],
    train: dict,
    objective: str,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    dist=None,
) -> TrainResult:
    """Train a new delta on top of the backend's current weights. `new`/`replay`: cached features.

    dist: an accelerate Accelerator when this is one rank of several (distributed.py): the step's global
    batch is train.batch x ranks, this rank computes its slice, and the gradients are averaged.
    """
    tr = backend.transformer
    gen = torch.Generator("cpu").manual_seed(int(train["seed"]))
    rank, alpha = int(train["rank"]), float(train["alpha"])
    student = add_adapters(tr, rank, alpha, train["targets"], seed=int(train["seed"]))
    originals: dict = {}
    losses: list[float] = []
    opt = None
    home = next(tr.parameters()).device
    int8 = train.get("base_weights", "native") == "int8"
    try:  # from here on, an error (a bad value, an interrupt) too leaves the transformer as it found it
        teacher = adapter_params(tr, TEACHER)
        set_checkpointing(tr, train.get("gradient_checkpointing", False))
        if int8:  # quantised in CPU memory: the card never holds the full-precision weights beside their codes
            tr.to("cpu")
            originals = quantize_int8(tr)  # restored below
            tr.to(home)
        opt = torch.optim.AdamW(student, lr=float(train["lr"]), betas=(0.9, 0.999), weight_decay=0.0)
        sigmas = backend.sigmas(int(train["K"]), train["schedule"])
        steps, bs = int(train["steps"]), int(train["batch"])
        amp = train.get("mixed_precision", "no") != "no" and (backend.device.type == "cuda" or tr.dtype != torch.float32)
        amp_dtype = torch.bfloat16 if train.get("mixed_precision") == "bf16" else torch.float16
        t0 = time.time()
        tr.train()
        seen: set[int] = set()
        _train_loop(backend, new, replay, train, objective, progress, should_stop, gen, opt, student, teacher, sigmas,
                    steps, bs, amp, amp_dtype, losses, dist, seen)
        delta = from_peft(tr, STUDENT, alpha / rank)  # the adapter's A and B (the base weights do not enter)
    finally:  # one way out, trained or not: the plain transformer with its exact weights
        tr.eval()
        if opt is not None:
            opt.state.clear()  # AdamW's moments leave the card before the full weights come back
        if originals:
            tr.to("cpu")  # restored in CPU memory, then back where it was
        restore(tr, originals)
        set_checkpointing(tr, False)
        remove_adapters(tr)
        if originals:
            tr.to(home)
    seconds = time.time() - t0
    world = dist.num_processes if dist is not None else 1
    return TrainResult(delta, losses, seconds, steps * bs * world / max(seconds, 1e-9), sorted(seen))


def _train_loop(backend, new, replay, train, objective, progress, should_stop, gen, opt, student, teacher, sigmas,
                steps, bs, amp, amp_dtype, losses, dist=None, seen: set | None = None) -> None:
    world, rank = (dist.num_processes, dist.process_index) if dist is not None else (1, 0)
    mine = slice(rank * bs, (rank + 1) * bs)  # every rank draws the global batch; this rank computes its slice
    for step in range(steps):
        if should_stop and should_stop():
            raise InterruptedError("round stopped")
        feats = pick_batch(new, replay, bs * world, float(train["replay_ratio"]), gen, seen)
        noise = torch.randn((len(feats), *feats[0]["latents"].shape), generator=gen)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(backend.device.type, dtype=amp_dtype, enabled=amp):
            if objective == "dopsd":
                loss = dopsd_loss_and_backward(backend, feats[mine], sigmas, noise[mine].to(backend.device))
            else:
                n = len(feats)
                u = torch.rand(n, generator=gen)
                sig = torch.tensor(sigmas[:-1])[torch.randint(len(sigmas) - 1, (n,), generator=gen)]
                sig = torch.where(torch.rand(n, generator=gen) < 0.5, sig, u)
                loss = sft_loss_and_backward(backend, feats[mine], noise[mine].to(backend.device), sig[mine].to(backend.device))
        if dist is not None:
            loss = average_gradients(dist, student, loss)
        torch.nn.utils.clip_grad_norm_(student, 1.0)
        opt.step()
        ema_update(teacher, student, float(train["ema_decay"]))
        losses.append(loss)
        if progress:
            progress(step + 1, steps, loss)


def average_gradients(dist, params: list[torch.nn.Parameter], loss: float) -> float:
    """One all-reduce per step: every parameter's gradient and the loss, flattened, averaged over the ranks."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss], device=grads[0].device)])
    flat = dist.reduce(flat, reduction="mean")
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(p).to(p.dtype)
        offset += g.numel()
    return float(flat[-1])


def pick_batch(new: list[dict], replay: list[dict], bs: int, replay_ratio: float, gen: torch.Generator,
               seen: set | None = None) -> list[dict]:
    """bs samples drawn with replacement, replay_ratio of them (in expectation) from replay; `seen` collects
    the indices of the new samples drawn."""
    out = []
    for _ in range(bs):
        from_replay = replay and float(torch.rand(1, generator=gen)) < replay_ratio
        pool = replay if from_replay else new
        i = int(torch.randint(len(pool), (1,), generator=gen))
        if not from_replay and seen is not None:
            seen.add(i)
        out.append(pool[i])
    return out


def new_per_round(train: dict, has_replay: bool) -> int:
    """How many new samples one round takes: what its steps can show each of them `views_per_sample` times
    (the rest wait for the next rounds, so a big drop is learned over several rounds)."""
    import math

    draws = int(train["steps"]) * int(train["batch"]) * int(train.get("processes", 1))
    if has_replay:
        draws = draws * (1 - float(train["replay_ratio"]))
    return max(1, math.floor(draws / max(1, int(train.get("views_per_sample", 2)))))
