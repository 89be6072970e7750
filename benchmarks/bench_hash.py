"""Which checksum the checkpoint manifest should use: GB/s of each candidate on one file.

Not a ``benchmarks.run`` section: a one-off measurement behind the choice in
``moe_dist/checkpoint/manifest.py``. A file of ``--mib`` MiB is written and fsynced (as DCP
writes a shard), then each candidate hashes it from the page cache (as ``own_shard_entries`` does
right after the write, and ``verify_manifest`` does on a resume that follows a save), best of
``--reps``, in two ways: 8 MiB ``readinto`` a reused buffer, and the whole file ``mmap``-ed
(no copy out of the page cache). blake3 is measured only when importable (it is not a dependency).

    python -m benchmarks.bench_hash --mib 512 --reps 3
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

CHUNK = 8 << 20


def candidates() -> dict[str, Callable[[], Any]]:
    import xxhash

    out: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256, "xxh3_128": xxhash.xxh3_128,
                                         "xxh3_64": xxhash.xxh3_64}
    try:
        import blake3
    except ImportError:
        return out
    out["blake3 (1 thread)"] = blake3.blake3
    out["blake3 (all threads)"] = lambda: blake3.blake3(max_threads=blake3.blake3.AUTO)
    return out


def hash_readinto(path: Path, new: Callable[[], Any]) -> str:
    h, buf = new(), bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def hash_mmap(path: Path, new: Callable[[], Any]) -> str:
    h = new()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = memoryview(m)
        for off in range(0, len(m), CHUNK):
            h.update(view[off:off + CHUNK])
        view.release()
    return h.hexdigest()


def best_gbps(fn: Callable[[], Any], nbytes: int, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return nbytes / 1e9 / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=512, help="file size in MiB")
    p.add_argument("--reps", type=int, default=3, help="best of this many passes per candidate")
    p.add_argument("--dir", type=Path, default=None, help="where to write the file (default: a temp folder)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        path = Path(tmp) / "shard.bin"
        block = os.urandom(CHUNK)
        with open(path, "wb", buffering=0) as f:
            for _ in range(a.mib * (1 << 20) // CHUNK):
                f.write(block)
            os.fsync(f.fileno())
        nbytes = path.stat().st_size
        read_only = best_gbps(lambda: hash_readinto(path, lambda: _NoHash()), nbytes, a.reps)
        print(f"{nbytes / 2**20:.0f} MiB file, best of {a.reps}, from the page cache")
        print(f"{'read only (8 MiB readinto)':<28} {read_only:6.2f} GB/s")
        for name, new in candidates().items():
            r = best_gbps(lambda: hash_readinto(path, new), nbytes, a.reps)
            m = best_gbps(lambda: hash_mmap(path, new), nbytes, a.reps)
            print(f"{name:<28} {r:6.2f} GB/s readinto   {m:6.2f} GB/s mmap")
        from moe_dist.checkpoint.manifest import HASH, file_checksum

        ours = best_gbps(lambda: file_checksum(path), nbytes, a.reps)
        print(f"{'manifest.file_checksum':<28} {ours:6.2f} GB/s ({HASH}, 64 MiB mapped windows)")


class _NoHash:
    def update(self, _data: Any) -> None:
        pass

    def hexdigest(self) -> str:
        return ""


if __name__ == "__main__":
    main()
