"""Where model weights come from, and loading them through the family's diffusers pipeline class."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

EMBEDDED = {"toy-shapes": Path(__file__).resolve().parent / "toy" / "model"}


def is_embedded(model: dict) -> bool:
    """A model shipped inside the package (`embedded:NAME`): small, on a CPU, nothing to download or plan."""
    return str(model["source"]).startswith("embedded:")


def resolve_source(source: str) -> Path | str:
    """`embedded:NAME` -> the shipped folder; a local folder -> itself; anything else -> a Hugging Face id."""
    if source.startswith("embedded:"):
        name = source.split(":", 1)[1]
        path = EMBEDDED.get(name)
        if path is None:
            raise UserError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
        if not (path / "model_index.json").exists():
            raise UserError(f"embedded model {name} is missing its weights at {path}")
        return path
    p = Path(source).expanduser()
    if p.exists():
        if not (p / "model_index.json").exists():
            raise UserError(f"model folder {p} has no model_index.json")
        return p
    if source.startswith((".", "/", "~")):
        raise UserError(f"model folder not found: {source}")
    return source  # a Hugging Face id, loaded from the local cache (HF_HUB_OFFLINE is respected)


def load_pipeline(recipe: dict, device=None, encoders: bool = True):
    """The recipe's pipeline through its diffusers class and `from_pretrained` (local files or the HF cache).

    The weights land in CPU memory in the recipe's dtype (on a CPU too); the phases of
    `placement.Placement` move each component to the GPU when it is used. On a GPU the process is capped at
    the recipe's `model.memory_budget_gib`. encoders=False leaves the text encoder and tokenizer unloaded
    (a rank of a several-process round trains on cached features).
    """
    import torch

    from .families import family
    from .placement import apply_memory_budget, compute_device

    quiet_libraries()
    model = recipe["model"]
    cls = family(recipe).pipeline_class()
    device = compute_device(device)
    dtype = getattr(torch, model["dtype"])  # on every device: a bf16 recipe runs its bf16 path on a CPU too
    source = resolve_source(model["source"])
    apply_memory_budget(float(model["memory_budget_gib"]), device)
    missing = missing_weights(recipe)
    if missing and isinstance(source, str) and not offline():
        pull(recipe)  # the first load downloads, with progress, what the recipe needs
        missing = missing_weights(recipe)
    if missing:
        raise UserError(weights_hint(recipe, missing))
    try:
        skip = {} if encoders else {"text_encoder": None, "tokenizer": None}
        pipe = cls.from_pretrained(source, dtype=dtype, **skip)
    except OSError as e:
        raise UserError(f"cannot load model {model['name']} from {source}: {str(e).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quiet_libraries() -> None:
    """Loading bars and library chatter go nowhere near the user's terminal; our own output says what matters."""
    import warnings

    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
    warnings.filterwarnings("ignore", message=".*torch_dtype.*")


# ------------------------------------------------------------------------------------------- weights


def offline() -> bool:
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_cached(repo: str, *names: str) -> Path | None:
    """The folder of a Hugging Face repository's snapshot in the local cache that holds one of `names`
    (the first found), without any network; None when it is not there."""
    try:
        from huggingface_hub import try_to_load_from_cache

        for name in names:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return Path(hit).parent
    except Exception:
        pass
    return None


def _snapshot(repo: str) -> Path | None:
    """The local snapshot folder of a Hugging Face repository in the cache, without any network."""
    return hf_cached(repo, "model_index.json", "config.json")


def files_fingerprint(model: dict, component: str) -> str | None:
    """A fingerprint of one component's files (config, weight names and sizes, the snapshot's commit), read
    without loading it: keys what was computed with it (prompt features) so that a cold process can reuse them
    before deciding to load it. None where the files cannot be found."""
    import hashlib

    try:
        where = resolve_source(model["source"])
    except UserError:
        return None
    root = where if isinstance(where, Path) else _snapshot(where)
    if root is None or not (root / component / "config.json").exists():
        return None
    folder = (root / component).resolve()
    h = hashlib.sha256((folder / "config.json").read_bytes())
    h.update(str(folder.parent.name if isinstance(where, str) else "").encode())  # a hub snapshot's commit
    for f in sorted(folder.iterdir()):
        if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def _component_missing(folder: Path) -> str | None:
    """Why a component folder cannot load: no config, no weights, or a shard its index names is absent."""
    import json

    if not folder.is_dir():
        return "missing"
    if not (folder / "config.json").exists():  # a scheduler or a tokenizer has no weights to have
        others = ("scheduler_config.json", "tokenizer_config.json", "preprocessor_config.json", "tokenizer.json")
        return None if any((folder / n).exists() for n in others) else "no config"
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return f"{index.name} unreadable"
        absent = sorted(sh for sh in shards if not (folder / sh).exists())
        if absent:
            return f"{len(absent)} of {len(shards)} weight shard(s) absent"
        return None
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return "no weights"
    return None


def missing_weights(recipe: dict) -> list[str]:
    """What of the recipe's model is not on this machine ("transformer: no weights", ...), loading nothing.
    The embedded toy model and a local folder are read where they are; a Hugging Face id in its cache."""
    import json

    model = recipe["model"]
    out = []
    sources = [("", model["source"])] + ([("teacher encoder ", model["teacher_encoder"])] if model.get("teacher_encoder") else [])
    for label, src in sources:
        local = Path(src).expanduser()
        if label and local.is_dir():  # the teacher encoder: a transformers folder (config.json, no model_index.json)
            where = local
        else:
            try:
                where = resolve_source(src)
            except UserError as e:
                out.append(f"{label or 'model'}: {e}")
                continue
        root = where if isinstance(where, Path) else _snapshot(where)
        if root is None:
            out.append(f"{label}{src}: not downloaded")
            continue
        index = root / "model_index.json"
        if index.exists():
            comps = [k for k, v in json.loads(index.read_text()).items() if isinstance(v, list) and v[0] is not None]
            out += [f"{label}{c}: {why}" for c in comps if (why := _component_missing(root / c))]
        elif (why := _component_missing(root)):
            out.append(f"{label}{src}: {why}")
    return out


def hub_ids(model: dict) -> list[str]:
    """The recipe's sources that are Hugging Face ids (not the embedded model, not a local path)."""
    return [s for s in (model["source"], model.get("teacher_encoder") or "") if s and not s.startswith(("embedded:", ".", "/", "~"))
            and not Path(s).expanduser().exists()]


def weights_hint(recipe: dict, missing: list[str]) -> str:
    """One line: what is missing and the one command that gets it."""
    model = recipe["model"]
    ids = hub_ids(model)
    fix = "`dopsd pull` downloads them" + (f" (or `hf download {ids[0]}`)" if ids else "") if ids else \
        "the local folder is incomplete: copy the missing parts into it"
    shown = "; ".join(missing[:3]) + (f"; and {len(missing) - 3} more" if len(missing) > 3 else "")
    return f"the weights of {model['name']} are not all on this machine ({shown}): {fix}"


def pull(recipe: dict) -> list[str]:
    """Download what the recipe needs from the Hugging Face Hub into its cache, with progress bars, resuming what
    an earlier try left; returns the repositories fetched. Local folders and the embedded model need nothing."""
    import os

    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import enable_progress_bars

    repos = hub_ids(recipe["model"])
    if repos and offline():
        raise UserError(f"HF_HUB_OFFLINE is set: nothing can be downloaded ({', '.join(repos)})")
    enable_progress_bars()
    os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    for repo in repos:
        try:
            snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"])
        except Exception as e:  # no network, no access (a gated model), no space: one line
            raise UserError(f"cannot download {repo}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return repos
