"""Start ``moe_dist/train.py`` under a real launcher (torchrun or ``accelerate launch``), in a process
group of its own, and watch its workers: what a test needs to kill the launcher and see who survives.

The workers are found as the launcher's children whose command line names train.py, while the
launcher lives (torch's agent starts each worker in a session of its own, so after a kill of the
launcher's group only their PIDs lead to them). psutil checks a PID still belongs to the process it
saw (start time), so a reused PID is never taken for a survivor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import psutil

from .harness import REPO_ROOT, free_port
from .trainrun import CPU_JSON, FAST, TRAIN

CPU_YAML = str(REPO_ROOT / "launch_configs" / "cpu.yaml")


def launcher_cmd(kind: str, world: int) -> list[str]:
    if kind == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(world),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    if kind == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_YAML,
                "--num_processes", str(world), "--main_process_port", str(free_port())]
    raise ValueError(f"launcher {kind!r}: expected torchrun or accelerate")


def launch_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TORCHDYNAMO_DISABLE="1",
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT",
                "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)
    env.update(extra or {})
    return env


class Launched:
    """One launcher process (leader of its own process group) training into ``out``."""

    def __init__(self, out: Path, *args: str, kind: str = "torchrun", world: int = 2,
                 env: Optional[dict[str, str]] = None) -> None:
        self.out, self.world = Path(out), world
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [*launcher_cmd(kind, world), TRAIN, "--deepspeed-config", CPU_JSON, *FAST, "--output-dir", str(out),
               *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=launch_env(env), stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.agent = psutil.Process(self.proc.pid)
        self.workers: dict[int, psutil.Process] = {}

    def output(self) -> str:
        if self.log.closed:
            return self.final_output
        self.log.seek(0)
        return self.log.read()

    def _scan(self) -> None:
        try:
            for child in self.agent.children():  # the agent's own children: not their short-lived forks
                try:
                    if TRAIN in child.cmdline():
                        self.workers.setdefault(child.pid, child)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
        except psutil.NoSuchProcess:
            pass

    def wait_for(self, what: str, predicate, timeout: float) -> None:  # noqa: ANN001
        """Poll ``predicate()`` (and the workers) until true; fail with the log if it is not in time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._scan()
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"launcher exited ({self.proc.returncode}) while waiting for {what}:\n"
                                     f"{self.output()[-4000:]}")
            time.sleep(0.1)
        self.kill()
        raise AssertionError(f"no {what} after {timeout:.0f}s:\n{self.output()[-4000:]}")

    def wait_rows(self, n: int, timeout: float = 300) -> None:
        """Until metrics.jsonl has ``n`` complete rows and all workers have been seen."""
        self.wait_for(f"{n} metrics rows", lambda: len(self.workers) >= self.world and rows_in(self.out) >= n,
                      timeout)

    def rank_pid(self, rank: int) -> int:
        for pid, p in self.workers.items():
            try:
                if p.environ().get("RANK") == str(rank):
                    return pid
            except psutil.NoSuchProcess:
                pass
        raise AssertionError(f"no live worker of rank {rank} among {sorted(self.workers)}")

    def alive_workers(self) -> list[int]:
        alive = []
        for pid, p in self.workers.items():
            try:
                # a zombie leader is dead only once its other threads are (they hold its files, locks)
                if p.is_running() and (p.status() != psutil.STATUS_ZOMBIE or len(os.listdir(f"/proc/{pid}/task")) > 1):
                    alive.append(pid)
            except (psutil.NoSuchProcess, FileNotFoundError):
                pass
        return alive

    def kill_group(self, grace: float = 15.0) -> tuple[float, list[int]]:
        """SIGKILL the launcher's process group; (seconds until no worker was left, survivors after ``grace``)."""
        assert len(self.workers) >= self.world, f"saw workers {sorted(self.workers)} only"
        t0 = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        while self.alive_workers() and time.monotonic() - t0 < grace:
            time.sleep(0.05)
        return time.monotonic() - t0, self.alive_workers()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"launcher still running after {timeout:.0f}s:\n{self.output()[-4000:]}") from None

    def kill(self) -> None:
        """Clean-up: the launcher's group and every worker seen (a failing test must not leave orphans)."""
        self._scan()
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        for p in self.workers.values():
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass

    def close(self) -> None:
        self.kill()
        self.final_output = self.output()  # still readable through output() afterwards
        self.log.close()


def rows_in(out: Path) -> int:
    """Complete lines of metrics.jsonl (a half-written last line does not count)."""
    try:
        text = (Path(out) / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    return text.count("\n")
