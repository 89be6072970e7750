"""Warn about stale JIT-build locks before DeepSpeed loads its C++ ops.

DeepSpeed builds some ops on first use (on CPU: the shared-memory comm op at start-up, CPU Adam for
optimizer offload) through ``torch.utils.cpp_extension``, which guards each build folder with a
``lock`` file. A process killed mid-build (Ctrl-C twice, kill -9, a job-time limit) leaves that file
behind, and every later process waits on it forever with no message. We cannot tell a stale lock
from a build in progress for sure, so we only warn, naming the file and what to do.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

STALE_AFTER_S = 600.0  # a cold CPU Adam build takes ~2 min on 2 cores; ten is well past any real one


def extensions_root() -> Path:
    """Where torch puts JIT builds: $TORCH_EXTENSIONS_DIR, else its default cache folder."""
    explicit = os.environ.get("TORCH_EXTENSIONS_DIR")
    if explicit:
        return Path(explicit)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def stale_build_locks(root: Path | None = None, max_age_s: float = STALE_AFTER_S,
                      now: float | None = None) -> list[tuple[Path, float]]:
    """Lock files under ``root`` older than ``max_age_s``, with their ages in seconds.

    Both layouts torch uses are covered: ``<root>/<op>/lock`` (TORCH_EXTENSIONS_DIR set) and
    ``<root>/py311_cpu/<op>/lock`` (default cache)."""
    root = extensions_root() if root is None else root
    now = time.time() if now is None else now
    found = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = now - lock.stat().st_mtime
        except OSError:
            continue  # released while we looked
        if age > max_age_s:
            found.append((lock, age))
    return sorted(found)


def warn_stale_build_locks(log=None) -> list[tuple[Path, float]]:
    """Print one actionable line per stale lock (to ``log`` or stderr); returns what it found."""
    found = stale_build_locks()
    for lock, age in found:
        msg = (f"{lock} is {age / 60:.0f} min old. It is the build lock of a DeepSpeed/torch JIT op "
               f"whose build was probably killed; DeepSpeed will wait on it forever. If no other process is "
               f"building that op, delete the file (rm {lock}) and start again.")
        (log or (lambda m: print(f"warning: {m}", file=sys.stderr, flush=True)))(msg)
    return found
