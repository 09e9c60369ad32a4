"""Where model weights come from and which diffusers pipeline class loads them."""

from __future__ import annotations

from pathlib import Path

from .errors import UserError

EMBEDDED = {"toy-shapes": Path(__file__).resolve().parent / "toy" / "model"}
PIPELINES = {"flux2-klein": "Flux2KleinPipeline", "z-image-turbo": "ZImagePipeline"}


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


def pipeline_class(backend: str):
    import diffusers

    if backend not in PIPELINES:
        raise UserError(f"unknown backend {backend!r}; known: {', '.join(PIPELINES)}")
    return getattr(diffusers, PIPELINES[backend])


def load_pipeline(recipe: dict, device=None, encoders: bool = True):
    """The recipe's pipeline through its diffusers class and `from_pretrained` (local files or the HF cache).

    The weights land in CPU memory in the recipe's dtype (on a CPU too); the phases of
    `placement.Placement` move each component to the GPU when it is used. On a GPU the process is capped at
    the recipe's `model.memory_budget_gib`. encoders=False leaves the text encoder and tokenizer unloaded
    (a rank of a several-process round trains on cached features).
    """
    import torch

    from .placement import apply_memory_budget, compute_device

    quiet_libraries()
    model = recipe["model"]
    cls = pipeline_class(model["backend"])
    device = compute_device(device)
    dtype = getattr(torch, model["dtype"])  # on every device: a bf16 recipe runs its bf16 path on a CPU too
    source = resolve_source(model["source"])
    apply_memory_budget(float(model["memory_budget_gib"]), device)
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
