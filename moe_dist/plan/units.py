"""Sizes in and out of the planner: ``'24GB'`` -> bytes for flags, bytes and counts -> short text for tables.
Torch-free; ``moe-consolidate`` reads its ``--max-shard-size`` and ``--read-budget`` with ``parse_bytes`` too."""

from __future__ import annotations

import re
from typing import Optional

from ..config import ConfigError

GiB = 2**30


def parse_bytes(text: str) -> int:
    """'24GB', '1.5TiB', '512M', '1e9' -> bytes. GB and GiB both mean 2^30 (as DeepSpeed prints)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not m:
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 24GB, 180GB, 2TB")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= 0.1 * scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
