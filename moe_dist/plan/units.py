"""Sizes in and out of the planner: ``'24GB'`` -> bytes for flags, bytes and counts -> short text for tables.
Torch-free; ``moe-consolidate`` reads its ``--max-shard-size`` and ``--read-budget`` with ``parse_bytes`` too."""

from __future__ import annotations

import re
from typing import Optional

from ..config import ConfigError

GiB = 2**30


def parse_bytes(text: str, what: str = "size") -> int:
    """'24GB', '1.5TiB', '512M', '4096B' -> bytes. GB and GiB both mean 2^30 (as DeepSpeed prints).

    A bare number is refused: ``--gpu-mem 24`` is far likelier 24 GB than 24 bytes, and a guess either
    way turns into a wrong plan. ``what`` names the flag in the message."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    try:
        number = float(m.group(1)) if m else None
    except ValueError:
        number = None
    if number is None:
        raise ConfigError(f"{what}: cannot read {text!r} as a size; write it with a unit, e.g. 24GB, 512MB, 2TB")
    if not m.group(2) and not m.group(3):
        guess = f"{m.group(1)}GB" if number < 10_000 else f"{m.group(1)}B"
        raise ConfigError(f"{what} {text}: a size needs a unit (B, KB, MB, GB, TB); did you mean {guess}?")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(number * scale)


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= 0.1 * scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
