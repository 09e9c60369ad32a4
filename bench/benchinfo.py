"""What every benchmark result records about where it ran."""

from __future__ import annotations

import os
import platform


def machine() -> str:
    """Host, processor and core count, as the results' "machine" field."""
    return f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
