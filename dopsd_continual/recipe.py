"""Recipes: TOML files that say which model to tune and how. Validated on load; errors name the key."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Any

from .errors import UserError

BASE_WEIGHTS = ("native", "int8")  # how a round stores the frozen base weights (quant.py); here so config reads need no torch
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_RECIPE = "toy-shapes"

# key -> (type(s), default). A default of REQUIRED means the recipe must set it.
REQUIRED = object()
SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], Any]]] = {
    "model": {
        "name": (str, REQUIRED),
        "backend": (str, REQUIRED),
        "source": (str, REQUIRED),
        "steps": (int, 4),
        "height": (int, 1024),
        "width": (int, 1024),
        "max_sequence_length": (int, 512),
        "text_encoder_out_layers": (list, [9, 18, 27]),
        "teacher_instruction": (str, "Make the main subject, background and overall composition consistent with the reference image."),
        "teacher_instruction_position": (str, "after"),  # the teacher's text: caption + instruction (the authors') or before
        "teacher_encoder": (str, ""),
        "dtype": (str, "float32"),
        "memory_budget_gib": ((int, float), 0),
        "teacher_min_pixels": (int, 512 * 512),
        "teacher_max_pixels": (int, 768 * 768),
    },
    "ingest": {
        "trigger_word": (str, ""),
        "stability_seconds": ((int, float), 5),
        "max_pixels": (int, 40_000_000),
        "min_side": (int, 32),
        "max_caption_chars": (int, 4000),
        "default_caption": (str, ""),
    },
    "train": {
        "objective": (str, "dopsd"),
        "rank": (int, 8),
        "alpha": ((int, float), 8),
        "targets": (list, ["to_q", "to_k", "to_v", "to_out.0"]),
        "lr": ((int, float), 1e-4),
        "steps": (int, 200),
        "K": (int, 4),
        "schedule": ((str, list), "pipeline"),
        "batch": (int, 1),
        "replay_ratio": ((int, float), 0.25),
        "replay_pool": (int, 64),  # samples replayed at most (stack.replay_pool); 0: every one on the chain
        "views_per_sample": (int, 2),  # a round takes the new samples its steps can draw this many times each
        "ema_decay": ((int, float), 0.9999),
        "mixed_precision": (str, "no"),
        "gradient_checkpointing": ((bool, int, float), False),
        "base_weights": (str, "native"),
        "seed": (int, 0),
        "processes": (int, 1),
    },
    "gate": {
        "enabled": (bool, True),
        "prompts": ((str, list), "default"),
        "seeds": (list, [0, 1]),
        "max_retention_drop": ((int, float), 0.05),
        "min_sharpness_ratio": ((int, float), 0.85),
        "max_drift": ((int, float), 0.12),
        "max_colour_shift": ((int, float), 0.08),
        "min_seed_diversity_ratio": ((int, float), 0.75),
        "max_few_step_gap_ratio": ((int, float), 1.5),
        "min_concept_gain": ((int, float), -1.0),
        "max_concept_gap_ratio": ((int, float), 0.9),
        "max_neighbour_drift": ((int, float), 1.0),
        "max_neighbour_retention_drop": ((int, float), 1.0),
        "judges": (list, []),  # judges.py: "toy-truth", "clip", "dino", or package.module:attribute
        "clip_model": (str, ""),
        "dino_model": (str, ""),
        "max_clip_drop": ((int, float), 0.02),
        "max_rejections_per_sample": (int, 3),
    },
    "retention": {  # what the state gives back (dopsd_continual/retention.py, `dopsd gc`)
        "rejected_days": ((int, float), 7),
        "gate_days": ((int, float), 1),
        "quarantine_days": ((int, float), 7),
        "disk_budget_gb": ((int, float), 0),
        "after_each_round": (bool, True),
    },
    "daemon": {
        "interval_minutes": ((int, float), 60),
        "cron": (str, ""),
        "min_new_samples": (int, 4),
        "quiet_seconds": ((int, float), 120),
        "rescan_seconds": ((int, float), 300),
        "polling": (bool, False),
        "keep_warm_seconds": ((int, float), 0),
        "sample_warm_seconds": ((int, float), 600),  # the model stays loaded this long after a `dopsd sample`
        "renew_mb": ((int, float), 16),  # renew in place (same pid and lock) when grown this far past its first round
        "ui": (bool, False),
        "ui_host": (str, "127.0.0.1"),
        "ui_port": (int, 8765),
    },
}
CHOICES = {
    ("train", "objective"): {"dopsd", "sft"},
    ("train", "mixed_precision"): {"no", "bf16", "fp16"},
    ("model", "dtype"): {"float32", "bfloat16", "float16"},
    ("train", "base_weights"): set(BASE_WEIGHTS),
    ("model", "teacher_instruction_position"): {"after", "before"},
}


def resolve_recipe_path(name_or_path: str | Path | None) -> Path:
    if name_or_path is None:
        return RECIPES_DIR / f"{DEFAULT_RECIPE}.toml"
    p = Path(name_or_path)
    if p.exists():
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.toml"
    if shipped.exists():
        return shipped
    raise UserError(f"recipe not found: {name_or_path}")


def load_recipe(path: Path) -> dict[str, Any]:
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"recipe not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"recipe {path} is not valid TOML: {e}") from None
    return validate(raw, str(path))


def validate(raw: dict[str, Any], where: str = "recipe") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section in raw:
        if section not in SCHEMA:
            raise UserError(f"{where}: unknown section [{section}]")
    for section, keys in SCHEMA.items():
        given = raw.get(section, {})
        if not isinstance(given, dict):
            raise UserError(f"{where}: [{section}] must be a table")
        for k in given:
            if k not in keys:
                raise UserError(f"{where}: unknown key {section}.{k}")
        sec = {}
        for k, (types, default) in keys.items():
            if k in given:
                v = given[k]
                if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
                    raise UserError(f"{where}: {section}.{k} must be {_tname(types)}, got {v!r}")
                if not isinstance(v, types):
                    raise UserError(f"{where}: {section}.{k} must be {_tname(types)}, got {v!r}")
                choices = CHOICES.get((section, k))
                if choices and v not in choices:
                    raise UserError(f"{where}: {section}.{k} must be one of {sorted(choices)}, got {v!r}")
                sec[k] = v
            elif default is REQUIRED:
                raise UserError(f"{where}: missing key {section}.{k}")
            else:
                sec[k] = copy.deepcopy(default)
        out[section] = sec
    from .families import SHIPPED, known

    if not known(out["model"]["backend"]):
        raise UserError(f"{where}: model.backend must be one of {sorted(SHIPPED)} or a family's "
                        f"package.module:attribute, got {out['model']['backend']!r}")
    from .checks import JUDGES

    for j in out["gate"]["judges"]:
        if not isinstance(j, str) or (j not in JUDGES and ":" not in j):
            raise UserError(f"{where}: gate.judges: {j!r} is not a judge; known: {sorted(JUDGES)} or package.module:attribute")
    for j, key in (("clip", "clip_model"), ("dino", "dino_model")):
        if j in out["gate"]["judges"] and not out["gate"][key]:
            raise UserError(f"{where}: gate.judges lists {j!r}: set gate.{key} to a local folder of its weights")
    for k in ("rank", "steps", "K", "batch", "processes", "views_per_sample"):
        if out["train"][k] < 1:
            raise UserError(f"{where}: train.{k} must be >= 1")
    if out["train"]["replay_pool"] < 0:
        raise UserError(f"{where}: train.replay_pool must be >= 0 (0: no limit)")
    if not 0 <= out["train"]["replay_ratio"] < 1:
        raise UserError(f"{where}: train.replay_ratio must be in [0, 1)")
    if not 0 <= out["train"]["ema_decay"] <= 1:
        raise UserError(f"{where}: train.ema_decay must be in [0, 1]")
    gc = out["train"]["gradient_checkpointing"]
    if not isinstance(gc, bool) and not 0 <= gc <= 1:
        raise UserError(f"{where}: train.gradient_checkpointing must be true/false or a share of blocks in [0, 1]")
    if out["model"]["memory_budget_gib"] < 0:
        raise UserError(f"{where}: model.memory_budget_gib must be >= 0 (0: the whole card)")
    if not 0 < out["model"]["teacher_min_pixels"] <= out["model"]["teacher_max_pixels"]:
        raise UserError(f"{where}: model.teacher_min_pixels must be > 0 and <= model.teacher_max_pixels")
    if out["ingest"]["stability_seconds"] < 0:
        raise UserError(f"{where}: ingest.stability_seconds must be >= 0")
    _check_daemon(out["daemon"], where)
    for k, v in out["retention"].items():
        if not isinstance(v, bool) and v < 0:
            raise UserError(f"{where}: retention.{k} must be >= 0, got {v!r}")
    for section, keys in out.items():
        for k, v in keys.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{where}: {section}.{k} must be a finite number, got {v!r}")
    return out


def _check_daemon(d: dict[str, Any], where: str) -> None:
    for k in ("interval_minutes", "rescan_seconds"):
        if not d[k] > 0:
            raise UserError(f"{where}: daemon.{k} must be > 0, got {d[k]!r}")
    for k in ("quiet_seconds", "keep_warm_seconds", "sample_warm_seconds", "renew_mb"):
        if d[k] < 0:
            raise UserError(f"{where}: daemon.{k} must be >= 0, got {d[k]!r}")
    if d["min_new_samples"] < 1:
        raise UserError(f"{where}: daemon.min_new_samples must be >= 1, got {d['min_new_samples']!r}")
    if not 0 <= d["ui_port"] < 65536:
        raise UserError(f"{where}: daemon.ui_port must be a port number (0-65535; 0: any free one), got {d['ui_port']!r}")
    if d["cron"].strip():
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(d["cron"])
        except ValueError as e:
            raise UserError(f"{where}: daemon.cron {d['cron']!r} is not a crontab line (minute hour day month "
                            f"weekday): {e}") from None


def _tname(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", list: "a list", bool: "true/false"}[t] for t in types)


def teacher_text(caption: str, model: dict) -> str:
    """The teacher's text: the caption, then the instruction, as the authors build it (f"{caption} {instruction}");
    `teacher_instruction_position = "before"` puts it first (the toy model was trained with a prefix)."""
    instr = model["teacher_instruction"]
    parts = (instr, caption) if model.get("teacher_instruction_position") == "before" else (caption, instr)
    return " ".join(p for p in parts if p)


def recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
