"""Model families: everything the generic round, sampler, gate and memory accountant need of a model.

A recipe's `model.backend` names its family: a shipped one (`flux2-klein`, `z-image-turbo`) or, for a family
that lives outside the package, `"package.module:attribute"` (an instance of `Family`, or a subclass).
The contract is `base.Family` (and the training backend it makes, `base.Backend`); docs/families.md is the
short guide to adding one.
"""

from __future__ import annotations

import functools

from ..errors import UserError

SHIPPED = {"flux2-klein": "dopsd_continual.families.klein:FAMILY",
           "z-image-turbo": "dopsd_continual.families.zimage:FAMILY"}

__all__ = ["SHIPPED", "Backend", "Family", "family", "known", "param_fingerprint"]


def __getattr__(name: str):  # the contract loads torch: only when asked for (recipe validation needs `known` alone)
    if name in ("Backend", "Family", "param_fingerprint"):
        from . import base

        return getattr(base, name)
    raise AttributeError(name)


def known(name: str) -> bool:
    """A shipped family's name, or a `module:attribute` path (checked when the family is first used)."""
    return name in SHIPPED or (":" in name and all(name.split(":", 1)))


@functools.lru_cache(maxsize=16)
def _load(name: str):
    from ..named import import_named
    from .base import Family

    obj = import_named(name, SHIPPED, "model.backend")
    obj = obj() if isinstance(obj, type) else obj
    if not isinstance(obj, Family):
        raise UserError(f"model.backend {name!r} is not a dopsd_continual.families.Family")
    return obj


def family(recipe_or_name: dict | str):
    """The family of a recipe (or of a `model.backend` value)."""
    if isinstance(recipe_or_name, dict):
        recipe_or_name = recipe_or_name["model"]["backend"]
    return _load(recipe_or_name)
