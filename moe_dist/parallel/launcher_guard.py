"""Workers die with their launcher: an orphaned rank must never train on, or save, into a run folder.

torchrun (and ``accelerate launch``, which runs torchrun's agent in-process) starts every worker
in a session of its own, so a kill of the launcher's process group, the OOM killer or a
``kill -9`` of the agent leaves the workers running: some hang in a collective forever, others
keep training and saving into the folder a restarted job is using.

:func:`die_with_launcher` runs first thing in a worker. It finds the agent, the nearest ancestor
that did not get torchrun's worker environment (a wrapper shell between the agent and Python did
get it, and is skipped), then:

* direct child of the agent (the usual case): ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so the kernel
  kills the worker the moment the agent dies. The parent is checked again afterwards: an agent
  that died before the call would otherwise go unnoticed.
* a wrapper in between, or no ``prctl`` (not Linux): a daemon thread checks once a second that
  the agent (same PID *and* start time) is alive, and SIGKILLs its own process when it is not.

Either way the orphan dies by SIGKILL: no handler, no final save (that save would race the
restarted job). Nothing changes for ``torchrun --max-restarts`` (the agent lives on and starts
new workers) nor for a SIGTERM to the launcher (the agent forwards it, and waits up to 30 s for
the workers' clean save-and-exit before it exits itself). Without torchrun's environment (plain
``python``, a single-process ``accelerate launch``, the tests' harness) it does nothing: the
parent may then be a shell whose death must not kill a run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from typing import Optional

AGENT_ENV = "TORCHELASTIC_RUN_ID"  # set by torch's elastic agent for its workers, not for itself
PR_SET_PDEATHSIG = 1
POLL_S = 1.0


def _environ_of(pid: int) -> Optional[dict[str, str]]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _stat_of(pid: int) -> Optional[tuple[int, str, int]]:
    """(parent PID, state, start time in clock ticks) from /proc/<pid>/stat, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), fields[0], int(fields[19])


def find_agent(pid: Optional[int] = None) -> Optional[int]:
    """The agent's PID: walk up from ``pid``'s parent while the ancestor carries our run id.

    None when this process was not started by an elastic agent."""
    run_id = os.environ.get(AGENT_ENV)
    if run_id is None:
        return None
    parent = os.getppid() if pid is None else pid
    while parent > 1:
        env = _environ_of(parent)
        if env is None or env.get(AGENT_ENV) != run_id:
            return parent  # unreadable (not ours) or without the worker environment: the launcher
        stat = _stat_of(parent)
        if stat is None:
            return None
        parent = stat[0]
    return None


def _set_pdeathsig() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _die(agent: int) -> None:
    print(f"error (pid {os.getpid()}): launcher PID {agent} is gone; exiting without saving "
          "(an orphan's save would race the restarted job)", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _alive(pid: int, started: Optional[int]) -> bool:
    if sys.platform.startswith("linux"):
        stat = _stat_of(pid)
        return stat is not None and stat[1] not in ("Z", "X") and (started is None or stat[2] == started)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _watch(agent: int, started: Optional[int], parent: int) -> None:
    while True:
        time.sleep(POLL_S)
        if os.getppid() != parent or not _alive(agent, started):
            _die(agent)


def die_with_launcher() -> Optional[int]:
    """Tie this process's life to its elastic agent; returns the agent's PID (None: no agent)."""
    agent = find_agent()
    if agent is None:
        return None
    parent = os.getppid()
    stat = _stat_of(agent) if sys.platform.startswith("linux") else None
    if stat is None and sys.platform.startswith("linux"):
        _die(agent)  # gone between our start and now
    started = stat[2] if stat is not None else None
    pdeathsig = _set_pdeathsig()
    if os.getppid() != parent or not _alive(agent, started):
        _die(agent)  # died before the signal was armed: it would never come
    if not (pdeathsig and agent == parent):
        threading.Thread(target=_watch, args=(agent, started, parent), name="launcher-watchdog",
                         daemon=True).start()
    return agent
