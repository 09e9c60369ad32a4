"""Things a recipe names: a shipped one by its short name, or any importable one as `package.module:attribute`
(model families, gate judges)."""

from __future__ import annotations

import importlib

from .errors import UserError


def import_named(name: str, shipped: dict[str, str], what: str):
    """The object `name` stands for; one line naming `what` (the recipe key) when it cannot be found."""
    target = shipped.get(name, name)
    if ":" not in target:
        raise UserError(f"unknown {what} {name!r}; known: {', '.join(shipped)} (or package.module:attribute)")
    module, attr = target.split(":", 1)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"{what} {name!r}: cannot import it ({e})") from None
