"""Damage the tests inflict on checkpoint files."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def flip_bits(path: Path, offset: Optional[int] = None, mask: int = 0x01) -> int:
    """XOR the byte at ``offset`` (the middle byte when None) of ``path`` with ``mask``, in place.

    The file keeps its size, so only a checksum can see the change: the silent corruption a bad
    disk or a bad copy leaves. Returns the offset used."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    data[at] ^= mask
    path.write_bytes(bytes(data))
    return at
