"""Integrity manifest of a checkpoint folder: size and checksum of every file, plus identity.

Written last (by rank 0, after every shard and DCP's metadata are on disk) and verified before
anything is loaded, so a truncated copy or a flipped bit stops the run with one line naming the
file, instead of a confusing unpickling error or, worse, silently wrong weights.

The checksum is XXH3-128 (``xxhash``): it catches truncation and bit flips as well as SHA-256 does
(this is corruption detection, not a defence against someone forging files), at 8-9 GB/s from the
page cache instead of SHA-256's 1.1 GB/s, so re-reading every shard no longer costs a large part of
each save and resume (``benchmarks/bench_hash.py``; figures in
``benchmarks/results/2026-11-30-checkpoint-integrity.md``). The manifest names the algorithm
(``"hash"``); a reader refuses any other, with a message, rather than guess.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

import torch
import xxhash

from .errors import CheckpointError
from .layout import MANIFEST, write_file_atomic

_CHUNK = 8 << 20
_WINDOW = 64 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY
FORMAT_VERSION = 2  # 2: XXH3-128 checksums under "checksum", the algorithm under "hash" (1: SHA-256 under "sha256")
HASH = "xxh3_128"  # the manifest's "hash" field: the algorithm of every file's "checksum"
HASH_NAME = "xxh3-128"  # how messages name it


def file_checksum(path: Path) -> str:
    """XXH3-128 of a file's bytes, hex. The file is mapped, not read: hashing straight from the page
    cache skips a copy (9 GB/s instead of 5.5 here). It is mapped 64 MiB at a time, so the pages
    it touched never add more than that to the process's resident memory. Where mapping is
    impossible (a file system without mmap) it is read in 8 MiB blocks instead."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            return _hash_mapped(f, size)
        except (OSError, ValueError):
            f.seek(0)
            return _hash_read(f)


def _hash_mapped(f: BinaryIO, size: int) -> str:
    h = xxhash.xxh3_128()
    for off in range(0, size, _WINDOW):
        with mmap.mmap(f.fileno(), min(_WINDOW, size - off), access=mmap.ACCESS_READ, offset=off) as window:
            window.madvise(mmap.MADV_SEQUENTIAL)  # read ahead when the file is not cached
            h.update(window)
    return h.hexdigest()


def _hash_read(f: BinaryIO) -> str:
    h, buf = xxhash.xxh3_128(), bytearray(_CHUNK)
    view = memoryview(buf)
    while n := f.readinto(buf):
        h.update(view[:n])
    return h.hexdigest()


@contextlib.contextmanager
def without_zip_crc32() -> Iterator[None]:
    """``torch.save`` without the CRC-32 of each zip record, for the shard writes.

    DCP writes every tensor through ``torch.save``, whose zip writer computes a CRC-32 of every
    byte: a second checksum of the same bytes the manifest covers, slower than the write itself
    (torch.save of 256 MiB: 0.6-1.1 GB/s with it, 3-4.5 GB/s without, on this machine), and one
    nothing reads back (``torch.load`` and DCP's reader do not check it). The option is
    process-wide: set for the duration of the write, then restored."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def config_hash(model_config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest()[:16]


def file_entry(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "checksum": file_checksum(path)}


def own_shard_entries(folder: Path, rank: int) -> dict[str, dict[str, Any]]:
    """Size and checksum of the shard files this rank wrote (DCP's FileSystemWriter names them
    ``__<rank in the save's group>_<n>.distcp``).

    Every rank hashes its own shards right after writing them, in parallel, instead of rank 0
    reading the whole checkpoint back: on N ranks the manifest then costs about 1/N of a full pass
    (at B200 scale, a 140 GB checkpoint is minutes for one reader). Should DCP ever name its files
    differently, nothing matches here and rank 0 hashes everything, as before: slower, still right."""
    return {p.name: file_entry(p) for p in sorted(folder.glob(f"__{rank}_*.distcp")) if p.is_file()}


def write_manifest(folder: Path, info: dict[str, Any],
                   precomputed: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Any]:
    """Write ``manifest.json`` for every file of ``folder``; ``precomputed`` entries (from
    :func:`own_shard_entries` on each rank) are used for files whose size still matches, the rest
    are hashed here."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp"):
            known = (precomputed or {}).get(p.name)
            files[p.name] = known if known is not None and known["size"] == p.stat().st_size else file_entry(p)
    manifest = {"format": "moe_dist-dcp", "format_version": FORMAT_VERSION, **info, "hash": HASH, "files": files}
    write_file_atomic(folder / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (incomplete or not a moe_dist checkpoint)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt manifest ({e})") from None
    if manifest.get("format") != "moe_dist-dcp":
        raise CheckpointError(f"{path}: not a moe_dist checkpoint manifest (format={manifest.get('format')!r})")
    if manifest.get("hash") != HASH:
        if "hash" in manifest:
            found = repr(manifest["hash"])
        elif manifest.get("format_version") == 1:
            found = "missing (a format_version 1 manifest: SHA-256, written by an older moe_dist)"
        else:
            found = "missing"
        raise CheckpointError(f"{path}: field 'hash' is {found}, expected {HASH!r}: this moe_dist checks only "
                              f"{HASH_NAME} checksums; use the moe_dist version that saved this checkpoint")
    return manifest


def verify_manifest(folder: Path, checksums: bool = True) -> dict[str, Any]:
    """Check every listed file's size (and checksum); raise CheckpointError on the first mismatch."""
    manifest = read_manifest(folder)
    for name, meta in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing; the checkpoint is incomplete")
        size = path.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{path}: size {size} bytes, manifest says {meta['size']} (truncated or "
                                  "modified copy); restore it or resume from another checkpoint")
        if checksums:
            digest = file_checksum(path)
            if digest != meta["checksum"]:
                raise CheckpointError(f"{path}: checksum ({HASH_NAME}) {digest[:12]}… differs from the manifest's "
                                      f"{meta['checksum'][:12]}… (corrupted); resume from another checkpoint "
                                      "or pass --no-verify at your own risk")
    return manifest
