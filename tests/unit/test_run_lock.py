"""The run-folder lock and the launcher guard, with real processes but no training.

A holder is a separate Python process (flock locks belong to open files, so two RunLock objects in
one test process would not exclude each other the way two runs do). Kills are real SIGKILLs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_dist.parallel.launcher_guard import AGENT_ENV, find_agent
from moe_dist.run.lock import LOCK_NAME, RunFolderBusy, RunLock, run_status

REPO = Path(__file__).resolve().parents[2]

HOLD = """
import sys, time
from moe_dist.run.lock import RunLock
lock = RunLock(sys.argv[1]); lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop(AGENT_ENV, None)
    return env


@pytest.fixture
def holder(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env=_env())
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_held_folder_is_refused_naming_the_holder(tmp_path, holder):
    with pytest.raises(RunFolderBusy) as e:
        RunLock(tmp_path).acquire()
    saved = json.loads((tmp_path / LOCK_NAME).read_text())
    assert saved["pid"] == holder.pid and saved["host"] == socket.gethostname()
    assert str(e.value) == (f"{tmp_path} is in use by PID {holder.pid} on host {socket.gethostname()} since "
                            f"{saved['started']}; stop that run or choose another --output-dir")
    assert run_status(tmp_path) == saved
    with pytest.raises(RunFolderBusy):  # looking did not take the lock away from its holder
        RunLock(tmp_path).acquire()


def test_kill_9_leaves_a_file_but_no_lock(tmp_path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == holder.pid  # the stale file is there
    assert run_status(tmp_path) is None
    lock = RunLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    assert run_status(tmp_path) is None


def test_release_then_acquire_in_turn(tmp_path):
    for _ in range(3):  # the unlink at release never strands the next holder on a removed file
        lock = RunLock(tmp_path)
        lock.acquire()
        assert run_status(tmp_path)["pid"] == os.getpid()
        lock.release()


# --------------------------------------------------------------------------- the launcher guard
AGENT = """
import os, subprocess, sys
env = dict(os.environ)
env[{env!r}] = "run-1"
child = subprocess.Popen(sys.argv[1:], env=env, start_new_session=True)
print(child.pid, flush=True)
child.wait()
"""

WORKER = """
import os, sys, time
from moe_dist.parallel.launcher_guard import die_with_launcher
print(die_with_launcher(), os.getppid(), flush=True)
time.sleep(600)
"""


def _start_agent(*cmd: str) -> tuple[subprocess.Popen, int]:
    """A stand-in agent: gives its child the worker environment and a session of its own (as torch's does)."""
    agent = subprocess.Popen([sys.executable, "-c", AGENT.format(env=AGENT_ENV), *cmd], stdout=subprocess.PIPE,
                             text=True, env=_env())
    return agent, int(agent.stdout.readline())


def _gone_within(pid: int, seconds: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return time.monotonic() - t0
        except FileNotFoundError:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} still alive {seconds}s after its agent died")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl")
@pytest.mark.parametrize("through_shell", [False, True], ids=["direct_child", "via_shell"])
def test_worker_dies_with_its_agent(tmp_path, through_shell):
    """Direct child: PR_SET_PDEATHSIG. Behind a wrapper shell (whose death would be the wrong
    trigger): the agent is found past the shell, and the watchdog thread notices it is gone."""
    import psutil

    out = tmp_path / "worker.out"
    worker = [sys.executable, "-c", WORKER]
    # exec: Python replaces the shell (a direct child); "; :" keeps the shell alive as the parent
    script = f'"$@" > {out}; :' if through_shell else f'exec "$@" > {out}'
    agent, child = _start_agent("sh", "-c", script, "sh", *worker)
    try:
        deadline = time.monotonic() + 60
        while (not out.exists() or not out.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        found, parent = (int(x) for x in out.read_text().split())
        assert found == agent.pid  # the agent, never the shell in between
        assert (parent == agent.pid) != through_shell
        worker_pid = psutil.Process(child).children()[0].pid if through_shell else child
        agent.kill()
        agent.wait()
        seconds = _gone_within(worker_pid, 5.0)
    finally:
        agent.kill()
        agent.wait()
        try:
            os.killpg(child, signal.SIGKILL)  # the session (and group) the stand-in agent started
        except ProcessLookupError:
            pass
    print(f"{'via shell' if through_shell else 'direct'}: worker gone {seconds:.2f}s after its agent")


def test_no_agent_no_guard(monkeypatch):
    monkeypatch.delenv(AGENT_ENV, raising=False)
    assert find_agent() is None  # plain python, the harness: a parent shell's death must not kill a run
