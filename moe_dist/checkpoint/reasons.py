"""One line for why a checkpoint write failed, the same for a synchronous save and a background one."""

from __future__ import annotations

from torch.distributed.checkpoint.api import CheckpointException

SHORT_WRITE = "a shard file was written short (disk full, quota or file-size limit)"


def reason(e: BaseException) -> str:
    """One line for an exception: OSErrors as their strerror and file, others by type and first line.

    DCP raises a CheckpointException (a BaseException) on every rank, holding each failed rank's
    (exception, traceback); report the rank and its exception, an OSError first (full disk, ...).
    """
    if isinstance(e, CheckpointException) and e.failures:
        inner = {r: (f[0] if isinstance(f, tuple) else f) for r, f in sorted(e.failures.items())}
        rank, first = next(((r, x) for r, x in inner.items() if isinstance(x, OSError)), next(iter(inner.items())))
        return f"rank {rank}: {reason(first)}"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f" ({e.filename})" if e.filename else "")
    first_line = (str(e).strip().splitlines() or [""])[0]
    if "inline_container" in first_line and "unexpected pos" in first_line:  # torch.save's zip writer
        return f"{SHORT_WRITE} ({first_line})"
    return f"{e.__class__.__name__}: {first_line}" if first_line else e.__class__.__name__
