"""Run one Python entry point as N real gloo processes, the way ``torchrun`` would, with a timeout.

Why not ``torch.testing._internal.common_distributed``: it is private API that changes between
releases. Why not ``multiprocessing``: DeepSpeed and torch.distributed keep process-global state
(accelerator choice, groups, atexit hooks), so a fresh interpreter per rank is the only clean
start, and a subprocess can be killed as a whole process group when it hangs in a collective.

Each rank gets the environment torchrun sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so the entry point calls
``dist.init_process_group("gloo")`` with no arguments. Usage::

    results = run_ranks(["-m", "tests.distributed.my_worker", "--out", str(tmp)], world_size=2, timeout=60)
    check_ranks(results)      # raises with every rank's tail of output if any rank failed

One rank failing (or the deadline passing) kills the others, so a rank stuck in a collective
whose peer died never holds the test until the suite's global timeout.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it; tiny race, fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    returncode: Optional[int]  # None: killed at the deadline or because a peer failed
    output: str                # stdout and stderr, interleaved
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class DistributedRunError(AssertionError):
    """Some rank failed or timed out; the message holds the tail of every rank's output."""


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_ranks(args: Sequence[str], world_size: int, timeout: float, env: Optional[dict[str, str]] = None,
              cwd: Optional[Path] = None, python: str = sys.executable,
              stop_on_failure: bool = True) -> list[RankResult]:
    """Start ``python *args`` once per rank and wait for all of them, at most ``timeout`` seconds.

    ``stop_on_failure``: kill the other ranks as soon as one fails (they would hang in a
    collective). Pass False where every rank is expected to fail by itself and each one's output
    is checked: otherwise a rank can be killed before it has printed its own error.

    ``env`` entries are added to (and override) this process's environment. The repository root
    is put first on ``PYTHONPATH`` so ``-m tests.distributed.x`` and ``import moe_dist`` work.
    """
    port = free_port()
    base = dict(os.environ)
    base["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [base.get("PYTHONPATH")] if p])
    base.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
                 "LOCAL_WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": base.get("OMP_NUM_THREADS", "1"),
                 "PYTHONUNBUFFERED": "1"})
    base.update(env or {})
    procs, logs, started = [], [], time.monotonic()
    for rank in range(world_size):
        rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty rank can never block
        logs.append(log)
        procs.append(subprocess.Popen([python, *args], env=rank_env, cwd=str(cwd or REPO_ROOT), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    finished: dict[int, float] = {}
    try:
        while len(finished) < world_size:
            for rank, proc in enumerate(procs):
                if rank not in finished and proc.poll() is not None:
                    finished[rank] = time.monotonic() - started
            failed = stop_on_failure and any(procs[r].returncode != 0 for r in finished)
            if failed or time.monotonic() - started > timeout:
                break
            time.sleep(0.05)
    finally:
        for proc in procs:
            _kill_group(proc)
        for proc in procs:
            proc.wait()
    results = []
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        log.seek(0)
        results.append(RankResult(rank, proc.returncode if rank in finished else None, log.read(),
                                  finished.get(rank, time.monotonic() - started)))
        log.close()
    return results


def check_ranks(results: list[RankResult], tail_lines: int = 40) -> list[RankResult]:
    """Raise :class:`DistributedRunError` unless every rank exited 0; return ``results`` otherwise."""
    if all(r.ok for r in results):
        return results
    parts = []
    for r in results:
        state = "timed out / killed" if r.returncode is None else f"exit code {r.returncode}"
        tail = "\n".join(r.output.splitlines()[-tail_lines:])
        parts.append(f"--- rank {r.rank}: {state} after {r.seconds:.1f}s ---\n{tail}")
    raise DistributedRunError(f"{sum(not r.ok for r in results)} of {len(results)} ranks failed\n" + "\n".join(parts))


def run_and_check(args: Sequence[str], world_size: int, timeout: float, **kwargs) -> list[RankResult]:
    """:func:`run_ranks` then :func:`check_ranks`."""
    return check_ranks(run_ranks(args, world_size, timeout, **kwargs))
