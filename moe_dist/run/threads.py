"""CPU threads of a plain one-process run (``moe-train`` / ``python moe_dist/train.py``, no launcher).

torchrun and ``accelerate launch`` set ``OMP_NUM_THREADS=1`` per rank; a plain run gets torch's
default of one thread per core, and on a shared or small machine threads that wait for a busy core
cost more than they bring (a 2-core machine with another job on it ran 4 tiny steps in 36 s at
torch's default against 17 s with one thread). So a plain run takes the cores it may use
(``sched_getaffinity``) less the ones already busy (the 1-minute load average), at least one, and
says so in one line. ``OMP_NUM_THREADS`` set by the user always wins; runs under a launcher are left
alone. Torch-free: it runs before torch is imported, so the value reaches OpenMP and MKL too.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

LAUNCHER_VARS = ("LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def choose_threads(env: Mapping[str, str], cores: int, load: float) -> Optional[int]:
    """Threads for this process, or None to leave the count alone (set by the user, or a launcher's rank)."""
    if env.get("OMP_NUM_THREADS") or any(v in env for v in LAUNCHER_VARS):
        return None
    return max(1, min(cores, cores - int(round(load))))


def set_plain_run_threads(env: Optional[dict] = None) -> Optional[str]:
    """Set ``OMP_NUM_THREADS`` (and torch's count, when torch is loaded) for a plain run; the line to show."""
    env = os.environ if env is None else env
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    n = choose_threads(env, cores, load)
    if n is None:
        return None
    env["OMP_NUM_THREADS"] = str(n)
    import sys

    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return (f"threads: {n} CPU thread{'s' if n > 1 else ''} for torch ({cores} cores usable, load {load:.1f}); "
            "set OMP_NUM_THREADS to choose")
