"""One run folder, one run: a fresh start (no ``--resume``) in a folder that holds a run is refused.

A second run started in the same ``--output-dir`` used to append its steps to the first run's
``metrics.jsonl`` and move ``checkpoint_latest`` back, leaving the first run's later checkpoints
for ``--resume auto`` to pick. Now the start is refused, naming what is there; ``--overwrite``
moves the old run into a sibling folder ``<output-dir>.old-<UTC time>`` (never deletes it).

What counts as a run: a ``checkpoints/`` folder with anything in it, or a ``metrics.jsonl`` with a
row. A lock file (``.lock``) or a write probe alone is not a run. Called on every rank before any
collective; only rank 0 moves anything (``move``), the others only check.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from ..config import ConfigError

METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
NOT_A_RUN = (".lock",)  # a run-folder lock (issue 16) says nothing about a previous run
NOT_A_RUN_PREFIXES = (".write_test-",)  # train._check_output_dir's probe, maybe another rank's


def run_traces(output_dir: str) -> list[str]:
    """What in ``output_dir`` shows a run was there: e.g. ['checkpoints/ (checkpoint_step_10, ...)',
    'metrics.jsonl (10 rows)']; empty when nothing does."""
    folder = Path(output_dir)
    found = []
    ckpts = folder / CHECKPOINTS
    if ckpts.is_dir():
        names = sorted(p.name for p in ckpts.iterdir())
        if names:
            shown = ", ".join(names[:3]) + (f", ... ({len(names)} entries)" if len(names) > 3 else "")
            found.append(f"{CHECKPOINTS}/ ({shown})")
    metrics = folder / METRICS
    if metrics.is_file():
        with open(metrics, encoding="utf-8", errors="replace") as f:
            rows = sum(1 for line in f if line.strip())
        if rows:
            found.append(f"{METRICS} ({rows} rows)")
    return found


def check_fresh_start(output_dir: str, resume: Optional[str], overwrite: bool, move: bool) -> Optional[Path]:
    """Refuse a fresh run in a folder that holds one, or with ``overwrite`` move the old run aside.

    Returns the folder the old run went to (``move`` True and something was moved), else None.
    With ``resume`` set the run continues what is there: nothing to check."""
    if resume:
        return None
    traces = run_traces(output_dir)
    if not traces:
        return None
    if not overwrite:
        raise ConfigError(
            f"checkpoint.output_dir {output_dir}: already holds a run ({'; '.join(traces)}); continue it with "
            f"--resume auto, start elsewhere with another --output-dir, or pass --overwrite to move the old run "
            f"to {output_dir.rstrip(os.sep)}.old-<time> (nothing is deleted)")
    if not move:
        return None
    return move_aside(output_dir)


def _aside_folder(output_dir: str) -> Path:
    dest = Path(f"{output_dir.rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    base, n = dest, 1
    while dest.exists():  # two starts within one second
        n += 1
        dest = base.with_name(f"{base.name}~{n}")
    return dest


def set_aside_later_checkpoints(output_dir: str, resumed_from: Optional[Path], step: int) -> list[str]:
    """After resuming this run at ``step`` from one of its own checkpoints named by path (``--resume
    auto`` takes the newest complete one: later ones are damaged, and stay for inspection), move the checkpoints of
    later steps (a future this run abandoned) to ``<output-dir>.old-<time>/checkpoints/``, so the
    newest checkpoint in the folder is always this run's: what ``--resume auto`` and ``moe-ckpt
    info`` take. Rank 0 only. Returns the names moved."""
    from ..checkpoint import layout

    root = layout.checkpoints_dir(output_dir)
    if resumed_from is None or Path(resumed_from).resolve().parent != root.resolve():
        return []  # resumed from another run's checkpoint: this folder's are not a branch of it
    later = [p for s, p in layout.complete_checkpoints(root) if s > step]
    if not later:
        return []
    dest = _aside_folder(output_dir) / CHECKPOINTS
    dest.mkdir(parents=True)
    for p in later:
        os.rename(p, dest / p.name)
    return [p.name for p in later]


def move_aside(output_dir: str) -> Path:
    """Move every entry of ``output_dir`` but the lock and write probes into ``<output-dir>.old-<UTC time>``."""
    src = Path(output_dir)
    dest = _aside_folder(output_dir)
    dest.mkdir(parents=True)
    for entry in sorted(src.iterdir()):
        if entry.name in NOT_A_RUN or entry.name.startswith(NOT_A_RUN_PREFIXES):
            continue
        os.rename(entry, dest / entry.name)
    return dest
