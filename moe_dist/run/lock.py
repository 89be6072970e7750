"""One live writer per run folder: rank 0 holds ``<output-dir>/.lock`` for the whole run.

The lock is ``fcntl.flock(LOCK_EX)`` on that file, so the kernel drops it when the holder dies,
however it dies: a kill -9 never leaves a stale lock, only a stale *file*, which the next run
simply locks and overwrites. The file holds the holder's host, PID and start time (JSON), which is
what a refused run and ``moe-ckpt info`` show.

Protocol (the file is removed at a clean exit so a finished or refused run leaves nothing behind):

* acquire: open (creating) the file, ``flock(LOCK_EX | LOCK_NB)``, then check the path still names
  the inode we locked (a holder that was finishing may have unlinked it between our open and our
  lock; then lock the new file instead). A busy lock is retried for about a second: someone merely
  *looking* (``moe-ckpt info`` takes ``LOCK_SH`` for a moment) must not refuse a run.
* release: unlink the path while still holding the lock, then close.

Only rank 0 touches the file; the other ranks learn the verdict over the process group
(:func:`hold_run_folder`), so a refusal reaches every rank, on any number of nodes.

Shared filesystems: ``flock`` is only as good as the filesystem's locking. NFSv4 (and v3 with
``lockd``) forward it to the server as a whole-file POSIX lock, so it works across clients; Lustre
needs the ``flock`` mount option (``localflock`` makes it node-local, ``noflock`` makes it fail).
Where ``flock`` fails outright the run says so and stops; where it silently only locks within
one node, two runs on different nodes are not kept apart. See the README.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

LOCK_NAME = ".lock"
_BUSY_RETRIES, _BUSY_WAIT_S = 5, 0.2


class RunFolderBusy(Exception):
    """Another live process holds the run folder's lock."""


def lock_path(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / LOCK_NAME


def _read_holder(fd: int) -> dict[str, Any]:
    """The holder's JSON, or {} when it is not (yet) readable: it is written right after locking."""
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw.decode())
        return holder if isinstance(holder, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def describe_holder(holder: dict[str, Any]) -> str:
    return (f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"since {holder.get('started', '?')}")


def busy_message(output_dir: str | os.PathLike, holder: dict[str, Any]) -> str:
    return (f"{output_dir} is in use by {describe_holder(holder)}; "
            "stop that run or choose another --output-dir")


class RunLock:
    """The run folder's lock, held by this process from :meth:`acquire` to :meth:`release`."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = str(output_dir)
        self.path = lock_path(output_dir)
        self.fd: Optional[int] = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`RunFolderBusy` naming the holder (OSError: no locking there)."""
        for attempt in range(_BUSY_RETRIES):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OSError(e.errno, f"cannot lock {self.path} ({e.strerror}); the filesystem does not "
                                           "support flock (see the README on shared filesystems)") from None
                if attempt == _BUSY_RETRIES - 1:
                    raise RunFolderBusy(busy_message(self.output_dir, holder)) from None
                time.sleep(_BUSY_WAIT_S)
                continue
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # unlinked by a holder that was finishing: lock the file now at the path
                os.close(fd)
                continue
            self.fd = fd
            self._write_holder()
            return
        raise RunFolderBusy(busy_message(self.output_dir, {}))  # the path kept changing under us

    def _write_holder(self) -> None:
        assert self.fd is not None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        data = (json.dumps(holder) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:  # not a newer run's file (ours was removed)
                os.unlink(self.path)  # while still locked: see the module docstring
        except FileNotFoundError:
            pass
        os.close(self.fd)  # drops the lock
        self.fd = None


def run_status(output_dir: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The live holder of a run folder (its JSON), or None when no process holds the lock.

    Looks without disturbing: a shared lock taken and dropped at once (a starting run retries
    for a second before it calls the folder busy)."""
    path = lock_path(output_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return _read_holder(fd) or {"pid": "?", "host": "?", "started": "?"}
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def hold_run_folder(output_dir: str, rank: int) -> Optional[RunLock]:
    """Rank 0 takes the folder's lock; every rank returns, or raises the same RunFolderBusy.

    Needs the process group when the world has more than one rank (the verdict is broadcast).
    Returns the lock on rank 0 (release it at exit), None elsewhere."""
    import torch.distributed as dist

    lock, verdict = None, None
    if rank == 0:
        lock = RunLock(output_dir)
        try:
            lock.acquire()
        except RunFolderBusy as e:
            lock, verdict = None, str(e)
        except OSError as e:
            lock, verdict = None, f"{e.strerror or e}"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [verdict]
        dist.broadcast_object_list(box, src=0)
        verdict = box[0]
    if verdict is not None:
        raise RunFolderBusy(verdict)
    return lock
