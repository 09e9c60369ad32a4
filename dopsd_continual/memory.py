"""The memory accountant: what each phase holds on the GPU, planned before any weight loads.

Resident bytes come from the model's own module trees built on the `meta` device from its config files
(a local model folder's, the Hugging Face cache's, or the ones shipped in `dopsd_continual/configs/` for the
shipped recipes: a few KB, so a user can plan before downloading 15-30 GB). Activations are counted, not
guessed: the phase's own forward (the transformer at the sampling batch, the VAE decode, the text encoder,
one D-OPSD roll-out step with its checkpointing and backward) runs on `meta` at the shapes the phase will
use, under a dispatch mode that adds each new tensor's bytes while it lives and keeps the peak. Attention
is counted as the fused kernel that runs on the card (its output and log-sum-exp; no sequence-squared
scores). Each count is then multiplied by its phase's calibration factor, fitted once against the peaks
measured on an H200 (bench/results/gpu_activations.json, gpu_e2e.json; bench/memory_plan.py reports the
remaining error, tests/test_memory.py holds it within 15%).

The plan sizes every batch the product runs (gate and `dopsd sample` pictures per pipeline call, VAE decode,
prompt encoding) from the budget, answers `dopsd doctor --card-gb`, and lets the daemon refuse a round
that cannot fit instead of running it out of memory.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .families import family
from .files import private_dirs
from .models import hf_cached, quiet_libraries, resolve_source

GIB = 2**30
CONFIGS = Path(__file__).resolve().parent / "configs"
MAX_SAMPLE_BATCH = 32  # pictures per pipeline call, at most (beyond it a call is no faster per picture)
MAX_DECODE_BATCH = 8
MAX_ENCODE_BATCH = 8
COUNT_VERSION = 2  # part of the cache key: counts made by an older counting method are not reused
_LOCK = threading.RLock()  # counting patches attention globally and shares the meta modules: one at a time
# measured peak / counted activations, per phase (bench/memory_plan.py fits and reports them)
# (the VAE's convolutions hold more on the card than their tensors: cuDNN workspaces and upsampling copies;
# the train count runs without autocast, so peft's float32 casts of layer inputs are counted in full)
CALIBRATION = {"sample": 1.0, "decode": 1.59, "encode": 0.9, "train": 0.92, "features": 1.3}
TILE_PX = 512  # diffusers' VAE tile size (tile_sample_min_size) when a picture is decoded in tiles
HEADROOM = 0.92  # the allocator's fragmentation: plan to fill at most this share of the budget


# ------------------------------------------------------------------------------------------- counting


class LiveBytes(TorchDispatchMode):
    """Adds the bytes of every storage an op creates while it lives; `peak` is the high-water mark."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _gone(self, key: int, n: int) -> None:
        self.live -= n
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        leaves = tree_leaves(out)
        for i, t in enumerate(leaves):
            ret = returns[0] if len(returns) == 1 else (returns[i] if i < len(returns) else None)  # one list return: split
            if not isinstance(t, torch.Tensor) or (ret is not None and ret.alias_info is not None):
                continue  # a view or an in-place result shares a storage counted (or resident) already
            st = t.untyped_storage()
            key = id(st)
            if key in self._refs and self._refs[key]() is st:
                continue
            n = st.nbytes()
            self._refs[key] = weakref.ref(st, functools.partial(lambda k, m, _w: self._gone(k, m), key, n))
            self.live += n
            self.peak = max(self.peak, self.live)
        return out


class _FusedAttention(torch.autograd.Function):
    """Attention as a flash kernel holds it: the output and a float32 log-sum-exp, nothing sequence-squared."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    if query.device.type != "meta":  # another thread's real work while a count runs: the real kernel
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                     enable_gqa=enable_gqa)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    return _FusedAttention.apply(query, key, value)


_SDPA = torch.nn.functional.scaled_dot_product_attention


def count(fn) -> int:
    """Peak bytes of the tensors that fn creates, on `meta`, with attention counted as a fused kernel."""
    with _LOCK:
        torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
        mode = LiveBytes()
        try:
            with mode:
                fn()
        finally:
            torch.nn.functional.scaled_dot_product_attention = _SDPA
        return mode.peak


# ------------------------------------------------------------------------------------- module trees


def config_root(recipe: dict) -> Path | None:
    """The folder whose component configs describe the recipe's model, without loading a weight."""
    model = recipe["model"]
    try:
        source = resolve_source(model["source"])
    except Exception:
        source = None
    if isinstance(source, Path):
        return source
    if isinstance(source, str) and (cached := hf_cached(source, "model_index.json")) is not None:
        return cached
    shipped = CONFIGS / model["name"]
    return shipped if (shipped / "model_index.json").exists() else None


def teacher_config_root(recipe: dict) -> Path | None:
    src = recipe["model"].get("teacher_encoder") or ""
    if not src:
        return None
    p = Path(src).expanduser()
    if (p / "config.json").exists():
        return p
    if (cached := hf_cached(src, "config.json")) is not None:
        return cached
    shipped = CONFIGS / f"{recipe['model']['name']}-teacher" / "teacher_encoder"
    return shipped if (shipped / "config.json").exists() else None


def meta_modules(recipe: dict, components=("transformer", "text_encoder", "vae")) -> dict[str, torch.nn.Module]:
    """The recipe's components on `meta`, in the recipe's dtype, from their config files."""
    import diffusers
    import transformers

    from .errors import UserError
    quiet_libraries()
    root = config_root(recipe)
    if root is None:
        raise UserError(f"cannot plan {recipe['model']['name']}: no config files for {recipe['model']['source']} "
                        "(a local folder, the Hugging Face cache, or a shipped recipe's model)")
    index = json.loads((root / "model_index.json").read_text())
    dtype = getattr(torch, recipe["model"]["dtype"])
    out = {}
    with torch.device("meta"):
        for name in components:
            if name not in index:
                continue
            lib, cls_name = index[name]
            if lib == "diffusers":
                cls = getattr(diffusers, cls_name)
                module = cls.from_config(cls.load_config(root / name))
            else:
                cls = getattr(transformers, cls_name)
                module = cls(transformers.AutoConfig.from_pretrained(root / name))
            out[name] = module.to(dtype).eval()
        cls_name = family(recipe).teacher_encoder
        if "teacher_encoder" in components and cls_name and (t := teacher_config_root(recipe)) is not None:
            cfg = transformers.AutoConfig.from_pretrained(t)
            out["teacher_encoder"] = getattr(transformers, cls_name)(cfg).to(dtype).eval()
    return out


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def int8_bytes(transformer: torch.nn.Module) -> int:
    """The transformer with its Linear weights in int8 and a float32 scale per output row (quant.py)."""
    total = module_bytes(transformer)
    for m in transformer.modules():
        if isinstance(m, torch.nn.Linear):
            total -= m.weight.numel() * (m.weight.element_size() - 1) - m.weight.shape[0] * 4
    return total


def lora_parameters(transformer: torch.nn.Module, train: dict) -> int:
    from .lora import resolve_targets

    modules = dict(transformer.named_modules())
    r = int(train["rank"])
    return sum(r * (modules[n].in_features + modules[n].out_features) for n in resolve_targets(transformer, train["targets"]))


# ------------------------------------------------------------------------------------------ the phases


def _tokens(recipe: dict, parts) -> tuple[int, int]:
    m = recipe["model"]
    vae = parts["vae"]
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    return m["height"] // f, m["width"] // f


def _inputs(recipe, parts, b: int, text_len: int, reference: bool = False):
    """The family's (x, cond) on `meta` for b pictures at the recipe's size."""
    return family(recipe).meta_inputs(parts["transformer"], recipe["model"], _tokens(recipe, parts), b, text_len, reference)


def _velocity(recipe, tr, x, sigma, cond):
    return family(recipe).velocity(tr, x, sigma, cond)


def sample_bytes(recipe: dict, parts: dict, b: int, reference: bool = False) -> int:
    """One few-step pipeline call of b pictures: the transformer's forward and the call's latents (with
    reference: klein's reference-image path, the gate's teacher pictures, one at a time)."""
    tr = parts["transformer"]

    def run():
        with torch.no_grad():
            x, cond = _inputs(recipe, parts, b, text_len(recipe), reference)
            v = _velocity(recipe, tr, x, torch.empty(b, device="meta"), cond)
            x = x + v  # the Euler update: a new latent while the old one lives
            del v

    return count(run)


def decode_bytes(recipe: dict, parts: dict, b: int, tile_px: int | None = None) -> int:
    """The VAE decode of b latents at the model's size (or of one tile of tile_px, as tiled decoding runs)."""
    vae = parts["vae"]
    lh, lw = _tokens(recipe, parts)
    if tile_px:
        f = recipe["model"]["height"] // lh
        lh = lw = tile_px // f

    def run():
        with torch.no_grad():
            lat = torch.empty(b, vae.config.latent_channels, lh, lw, device="meta", dtype=vae.dtype)
            vae.decode(lat, return_dict=False)

    return count(run)


def vae_encode_bytes(recipe: dict, parts: dict) -> int:
    """The features phase's VAE encode of one training picture at the model's size."""
    vae, m = parts["vae"], recipe["model"]

    def run():
        with torch.no_grad():
            vae.encode(torch.empty(1, 3, m["height"], m["width"], device="meta", dtype=vae.dtype))

    return count(run)


def encode_bytes(recipe: dict, parts: dict, b: int, n: int | None = None) -> int:
    """The text encoder over b prompts of n tokens (default: max_sequence_length), every hidden state kept."""
    te = parts["text_encoder"]
    n = n or recipe["model"]["max_sequence_length"]

    def run():
        with torch.no_grad():
            ids = torch.zeros(b, n, dtype=torch.long, device="meta")
            te(input_ids=ids, output_hidden_states=True)

    return count(run)


def train_bytes(recipe: dict, parts: dict, train: dict | None = None) -> int:
    """One D-OPSD roll-out step as a round runs it: the teacher's reference-conditioned forward (no grad),
    then the student's forward and backward through the recipe's checkpointing, float32 adapters."""
    from .training import STUDENT, TEACHER, add_adapters, remove_adapters, set_checkpointing, use

    train = train or recipe["train"]
    tr = parts["transformer"]
    b = int(train["batch"])
    with torch.device("meta"):
        add_adapters(tr, int(train["rank"]), float(train["alpha"]), train["targets"])
    set_checkpointing(tr, train.get("gradient_checkpointing", False))
    tr.train()
    try:
        def run():
            x, cond_s = _inputs(recipe, parts, b, text_len(recipe))
            _, cond_t = _inputs(recipe, parts, b, teacher_text_len(recipe), reference=True)
            sig = torch.empty(b, device="meta")
            use(tr, TEACHER)
            with torch.no_grad():
                v_t = _velocity(recipe, tr, x, sig, cond_t)
            use(tr, STUDENT)
            v_s = _velocity(recipe, tr, x, sig, cond_s)
            loss = torch.nn.functional.mse_loss(x - v_s, x - v_t)
            loss.backward()

        return count(run)
    finally:
        tr.eval()
        set_checkpointing(tr, False)
        remove_adapters(tr)


def text_len(recipe: dict) -> int:
    """Text tokens the transformer sees per prompt, by the recipe's family."""
    return family(recipe).text_len(recipe["model"])


def teacher_text_len(recipe: dict) -> int:
    return family(recipe).teacher_text_len(recipe["model"])


# ---------------------------------------------------------------------------------------------- plans


@dataclass
class Plan:
    """GiB per phase (resident + activations), the batch each phase runs at, and the verdict for a budget."""

    model: str
    budget_gib: float
    resident_gib: dict[str, float] = field(default_factory=dict)
    activation_gib: dict[str, float] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)
    per_item_gib: dict[str, float] = field(default_factory=dict)
    advice: list[str] = field(default_factory=list)
    keep_all: bool = False  # planned with every component resident at once (Accountant.plan)

    @property
    def phases(self) -> dict[str, float]:
        return {p: self.resident_gib[p] + self.activation_gib.get(p, 0.0) for p in self.resident_gib}

    @property
    def peak_gib(self) -> float:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    @property
    def fits(self) -> bool:
        """Within the budget less the allocator's fragmentation headroom (what the batches are sized to)."""
        return self.budget_gib <= 0 or self.peak_gib <= self.budget_gib * HEADROOM

    def line(self) -> str:
        where = f"{self.budget_gib:g} GiB" if self.budget_gib > 0 else "an uncapped card"
        head = (f"{self.model} {'fits' if self.fits else 'does not fit'} {where}: peak {self.peak_gib:.1f} GiB in "
                f"{self.peak_phase}")
        if self.fits:
            return head + f" (gate {self.batches.get('sample', 1)} pictures a call)"
        return head + (f"; {self.advice[0]}" if self.advice else "")

    def to_dict(self) -> dict:
        return {"model": self.model, "budget_gib": self.budget_gib, "fits": self.fits, "peak_gib": self.peak_gib,
                "peak_phase": self.peak_phase, "phases": self.phases, "resident_gib": self.resident_gib,
                "activation_gib": self.activation_gib, "batches": self.batches, "per_item_gib": self.per_item_gib,
                "advice": self.advice, "keep_all": self.keep_all}


class Accountant:
    """Counts a recipe's phases once (a few seconds of `meta` work) and plans them for any budget."""

    def __init__(self, recipe: dict, cache_dir: Path | None = None):
        self.recipe = recipe
        self.family = family(recipe)
        self._parts: dict | None = None
        self._file = self._cache_file(cache_dir)
        saved = {}
        if self._file is not None and self._file.exists():
            try:
                saved = json.loads(self._file.read_text())
            except (OSError, ValueError):
                saved = {}
        self._counts: dict[str, float] = saved.get("counts", {})
        self.sizes: dict[str, float] = saved.get("sizes") or {}
        if not self.sizes:  # counted once; a plan read from the cache builds no module and writes nothing
            self.sizes = {k: module_bytes(m) / GIB for k, m in self.parts.items()}
            self._save()

    @property
    def parts(self) -> dict[str, torch.nn.Module]:
        """The module trees on `meta`, built on first need (a plan read from the cache needs none)."""
        if self._parts is None:
            self._parts = meta_modules(self.recipe, ("transformer", "text_encoder", "vae", "teacher_encoder"))
        return self._parts

    def _cache_file(self, cache_dir: Path | None) -> Path | None:
        """Counts are kept per model config, settings and library versions: a second plan costs milliseconds."""
        import hashlib
        import os

        root = config_root(self.recipe)
        if root is None:
            return None
        h = hashlib.sha256()
        for f in sorted(root.glob("*/config.json")) + [root / "model_index.json"]:
            h.update(f.read_bytes() if f.exists() else b"")
        if (t := teacher_config_root(self.recipe)) is not None:
            h.update((t / "config.json").read_bytes())
        m = self.recipe["model"]
        import diffusers
        import transformers

        h.update(json.dumps([m["dtype"], m["height"], m["width"], m["max_sequence_length"], m["teacher_max_pixels"],
                             CALIBRATION, COUNT_VERSION, torch.__version__, diffusers.__version__,
                             transformers.__version__]).encode())
        base = cache_dir or Path(os.environ.get("DOPSD_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                                 / "dopsd-continual") / "memory"
        return base / f"{m['name']}-{h.hexdigest()[:16]}.json"

    def _save(self) -> None:
        if self._file is None:
            return
        try:
            from .store import atomic_write

            private_dirs(self._file.parent)
            atomic_write(self._file, json.dumps({"sizes": self.sizes, "counts": self._counts}).encode())
        except OSError:
            pass  # an unwritable cache only costs the next plan its seconds

    def _count(self, key, fn, unit: float = GIB) -> float:
        """fn() / unit (GiB for bytes), counted once and kept in the cache."""
        k = json.dumps(key)
        with _LOCK:
            if k not in self._counts:
                self._counts[k] = fn() / unit
                self._save()
            return self._counts[k]

    def lora_params(self, train: dict) -> float:
        """LoRA parameters of one adapter at the recipe's targets and rank."""
        return self._count(("lora", train["rank"], train["targets"]),
                           lambda: lora_parameters(self.parts["transformer"], train), unit=1)

    def linear(self, phase: str, fn) -> tuple[float, float]:
        """(fixed, per item) GiB of a phase's activations, from counts at one and two items, calibrated."""
        one, two = self._count((phase, 1), lambda: fn(1)), self._count((phase, 2), lambda: fn(2))
        c = CALIBRATION[phase]
        per = max(two - one, 0.0) * c
        return max(one * c - per, 0.0), per

    def chain_term_gib(self) -> float:
        """A version's chain applied unmerged (stack.WeightSwitcher on a non-float32 base), at its largest:
        factors of CHAIN_RANK_FACTOR x the rounds' rank over every touched layer, in the model's dtype."""
        from .stack import CHAIN_RANK_FACTOR

        if self.recipe["model"]["dtype"] == "float32":
            return 0.0
        lora = self.lora_params(self.recipe["train"])
        return lora * CHAIN_RANK_FACTOR * torch.finfo(getattr(torch, self.recipe["model"]["dtype"])).bits / 8 / GIB

    def features_gib(self) -> float:
        """The features phase's activations: the larger of one VAE encode and one (teacher) text encoding."""
        r = self.recipe
        vae = self._count(("vae_encode", 1), lambda: vae_encode_bytes(r, self.parts))
        text = self._count(("teacher_encode", 1), lambda: encode_bytes(r, self.parts, 1, max(teacher_text_len(r), r["model"]["max_sequence_length"])))
        return max(vae, text) * CALIBRATION["features"]

    def train_gib(self, train: dict) -> tuple[float, float]:
        """(resident, activations) of the train phase under these training settings."""
        key = ("train", json.dumps({k: train[k] for k in ("batch", "rank", "alpha", "targets", "gradient_checkpointing")},
                                   sort_keys=True))
        act = self._count(key, lambda: train_bytes(self.recipe, self.parts, train)) * CALIBRATION["train"]
        int8 = self._count(("int8",), lambda: int8_bytes(self.parts["transformer"]))
        lora = self.lora_params(train)
        # an int8 base (quantised in CPU memory, training.train_delta) dequantises one layer at a time
        widest = self._count(("widest_linear",), lambda: max(
            m.weight.numel() * m.weight.element_size() for m in self.parts["transformer"].modules()
            if isinstance(m, torch.nn.Linear)))
        base = int8 + widest if train.get("base_weights") == "int8" else self.sizes["transformer"]
        return base + lora * 4 * 5 / GIB, act  # adapters: student + teacher + grad + AdamW's two moments, float32

    def plan(self, budget_gib: float | None = None, keep_all: bool = False) -> Plan:
        """keep_all: every component of every phase on the card at once (placement.Placement's keep_all: nothing
        moves between phases), each phase's activations beside all of them."""
        with _LOCK:
            return self._plan(budget_gib, keep_all)

    def _plan(self, budget_gib: float | None, keep_all: bool = False) -> Plan:
        r = self.recipe
        budget = float(r["model"]["memory_budget_gib"] if budget_gib is None else budget_gib)
        usable = budget * HEADROOM if budget > 0 else math.inf
        s = self.sizes
        p = Plan(r["model"]["name"], budget)
        p.keep_all = keep_all
        chain = self.chain_term_gib()

        def others(*held: str) -> float:
            """When all stay: the resident components a phase does not compute with (the transformer with the
            version's chain term)."""
            if not keep_all:
                return 0.0
            return sum(s[k] for k in ("transformer", "vae", "text_encoder") if k not in held) + (
                chain if "transformer" not in held else 0.0)

        # sampling: transformer + VAE resident (+ a version's unmerged chain term on a bf16 base); the
        # transformer's call and the decode run one after the other
        sample_res = s["transformer"] + s["vae"] + chain + others("transformer", "vae")
        sf, sp = self.linear("sample", lambda b: sample_bytes(r, self.parts, b))
        df, dp = self.linear("decode", lambda b: decode_bytes(r, self.parts, b))
        ef, ep = self.linear("encode", lambda b: encode_bytes(r, self.parts, b))
        p.per_item_gib = {"sample": sp, "decode": dp, "encode": ep}
        p.batches["sample"] = _fit_batch(usable - sample_res - sf, sp, MAX_SAMPLE_BATCH)
        p.batches["decode"] = _fit_batch(usable - sample_res - df, dp, MAX_DECODE_BATCH)
        encode_res = s["text_encoder"] + others("text_encoder")
        p.batches["encode"] = _fit_batch(usable - encode_res - ef, ep, MAX_ENCODE_BATCH)
        decode_act = df + dp * max(1, p.batches["decode"])
        if p.batches["decode"] == 0:  # one picture does not fit: the VAE decodes it in tiles
            tiled = self._count(("decode_tile", 1), lambda: decode_bytes(r, self.parts, 1, TILE_PX)) * CALIBRATION["decode"]
            if sample_res + tiled <= usable:
                decode_act, p.batches["decode_tiled"] = tiled, 1
        sample_act = max(sf + sp * max(1, p.batches["sample"]), decode_act)
        if self.family.reference_path:  # the gate's teacher pictures: one at a time, with reference tokens
            sample_act = max(sample_act, self._count(("reference", 1), lambda: sample_bytes(r, self.parts, 1, True))
                             * CALIBRATION["sample"])
        p.resident_gib["sample"], p.activation_gib["sample"] = sample_res, sample_act
        p.resident_gib["encode"], p.activation_gib["encode"] = encode_res, ef + ep * max(1, p.batches["encode"])
        # features: the text encoder and the VAE (and a teacher encoder, Z-Image's: its vision tower and the same
        # language model)
        feat_res = s["text_encoder"] + s["vae"]
        if "teacher_encoder" in s:
            shared = s["text_encoder"] if self.family.teacher_shares_text_encoder else 0.0
            feat_res += s["teacher_encoder"] - shared  # one copy of a shared language model
        p.resident_gib["features"] = feat_res + others("text_encoder", "vae")
        p.activation_gib["features"] = self.features_gib()
        res, act = self.train_gib(r["train"])
        p.resident_gib["train"], p.activation_gib["train"] = res + chain + others("transformer"), act  # on its parent
        if not p.fits:
            p.advice = self.advice(p, budget)
        return p

    def advice(self, p: Plan, budget: float) -> list[str]:
        """What to change so that the recipe fits: each suggestion checked against the plan."""
        out = []
        phases = p.phases
        usable = budget * HEADROOM
        if phases["train"] > usable:
            t = dict(self.recipe["train"])
            for change in ({"gradient_checkpointing": True}, {"gradient_checkpointing": True, "base_weights": "int8"}):
                change = {k: v for k, v in change.items() if t.get(k) != v}
                if not change:
                    continue
                res, act = self.train_gib({**t, **change})
                res += self.chain_term_gib()
                if res + act <= usable:
                    out.append("set " + ", ".join(f"train.{k} = {json.dumps(v)}" for k, v in change.items())
                               + f" (train {res + act:.1f} GiB)")
                    break
            else:
                res, act = self.train_gib({**t, "gradient_checkpointing": True, "base_weights": "int8"})
                res += self.chain_term_gib()
                out.append(f"the train phase needs {res + act:.1f} GiB even with every block checkpointed and an "
                           "int8 base: a larger card")
        if p.batches["sample"] == 0 or (p.batches["decode"] == 0 and not p.batches.get("decode_tiled")):
            out.append(f"sampling needs {p.resident_gib['sample'] + p.per_item_gib['sample']:.1f} GiB for one picture: "
                       "a lower model.height/width or a larger card")
        if phases["features"] > usable or phases["encode"] > usable:
            out.append(f"the text encoder's phases need {max(phases['features'], phases['encode']):.1f} GiB: "
                       f"{self.family.encoder_advice}a larger card")
        return out or [f"needs {p.peak_gib:.1f} GiB in {p.peak_phase}"]


def _fit_batch(room_gib: float, per_gib: float, most: int) -> int:
    if room_gib == math.inf:
        return most
    if room_gib < per_gib:
        return 0
    return int(min(most, room_gib // per_gib)) if per_gib > 0 else most


@functools.lru_cache(maxsize=8)
def _accountant(recipe_json: str) -> Accountant:
    return Accountant(json.loads(recipe_json))


def accountant(recipe: dict) -> Accountant:
    """One Accountant per recipe in this process (counting takes seconds; plans are instant)."""
    return _accountant(json.dumps(recipe, sort_keys=True, default=str))


def plan(recipe: dict, budget_gib: float | None = None, keep_all: bool = False) -> Plan:
    return accountant(recipe).plan(budget_gib, keep_all)


def budget_gib(recipe: dict, device) -> float:
    """The GPU memory this process may plan with: the recipe's cap, else the whole card."""
    cap = float(recipe["model"]["memory_budget_gib"])
    device = torch.device(device)
    if device.type != "cuda":
        return cap
    index = _index(device)
    free, _ = torch.cuda.mem_get_info(index)  # after the CUDA context, a desktop and other processes
    mine = torch.cuda.memory_reserved(index)  # what this process holds already is its to plan with
    room = (free + mine) / GIB
    return min(cap, room) if cap > 0 else room


def device_plan(recipe: dict, device, keep_all: bool = False) -> Plan | None:
    """The plan for this process's card (None off a GPU: host memory is not planned)."""
    if torch.device(device).type != "cuda":
        return None
    return plan(recipe, budget_gib(recipe, device), keep_all)


def placement_plan(recipe: dict, device) -> Plan | None:
    """What a process on this card runs with: every component kept on the card at once where the free memory
    holds them all with each phase's activations (nothing moves between phases: an H200, a 48 GB card), else
    the phase table's plan (placement.PHASES: each phase holds only what it computes with)."""
    everything = device_plan(recipe, device, keep_all=True)
    if everything is not None and everything.fits and everything.batches["sample"] >= 1:
        return everything
    return device_plan(recipe, device)


def room_beside(recipe: dict, device) -> bool:
    """Whether a model kept warm for pictures may stay on the card between them: only where a round of this
    recipe started beside it (`dopsd train`, another state's daemon) would plan exactly as on a card of its own
    (at the recipe's cap, else the whole card), in what is free with the warm model there (this process's
    cached activations handed back first). Otherwise it waits in CPU memory (placement.Placement.park)."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    index = _index(device)
    torch.cuda.empty_cache()  # what the last picture's activations left cached is not the model's to keep
    free, total = torch.cuda.mem_get_info(index)
    cap = float(recipe["model"]["memory_budget_gib"])
    alone = plan(recipe, cap if cap > 0 else total / GIB)
    return alone.peak_gib <= free / GIB * HEADROOM


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def check_fits(recipe: dict, device) -> Plan | None:
    """Refuse, before anything loads, a round that the card cannot hold (one line: what and what to change)."""
    import logging

    from .errors import DoesNotFit

    try:
        p = device_plan(recipe, device)
    except Exception as e:  # the round still runs; only the early refusal is lost
        logging.getLogger("dopsd").warning("memory plan unavailable (%s): the round is not checked", str(e).splitlines()[0])
        return None
    if p is not None and not p.fits:
        raise DoesNotFit(p.line())
    return p
