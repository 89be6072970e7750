"""The progress watchdog: a rank that stops making progress says where, and the job ends within minutes.

The training thread marks its progress with :meth:`Watchdog.beat` (a phase name and a clock read:
two attribute writes, a few per step). A daemon thread checks the clock once a second. When a phase
has lasted longer than its limit (``parallel.train_timeout_s``; ``parallel.init_timeout_s`` before
the first step is done and for phases that may be long: a save, a validation pass) it writes
``<output-dir>/hang-<rank>.txt`` (the phase, how long, every peer's last heartbeat, then every
thread's stack from ``faulthandler``), prints one ``error:`` line naming the stalled phase and the
ranks that stopped answering, and ends the process with ``exit_codes.HUNG``. The launcher then
stops the other ranks, and ``--resume auto`` continues from the newest checkpoint.

Which ranks stopped answering: a second thread writes this rank's heartbeat (time, step, phase)
to the process group's key-value store every second (less often past 200 ranks, so the store sees
at most 200 writes a second). A rank stopped by SIGSTOP, or wedged in C++
with the GIL held, stops writing; a rank merely waiting in a collective keeps writing. Store reads
when firing are bounded (the store's host may be the stalled one), so the watchdog itself never hangs.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import sys
import threading
import time
from typing import Any, Optional

from .. import exit_codes

POLL_S = 1.0
# After the first step collectives give up at this multiple of the train timeout: the watchdog, which
# reports the phase, every peer's heartbeat and the stacks, fires first at 1x; a collective's own timeout
# is the backstop. Either way the run ends within 2x. (With both at 1x they raced: a gloo timeout won on
# this CPU and its report lacked the peers' heartbeats.)
COLLECTIVE_BACKSTOP = 1.5
STALE_BEATS = 5  # a heartbeat older than this many intervals means that rank stopped answering
HEARTBEATS_PER_S = 200  # at most, over all ranks, on the one store: 1 s apart up to 200 ranks, then wider
STORE_WAIT_S = 3.0
_KEY = "moe_dist/heartbeat/"
_active: Optional["Watchdog"] = None


def active() -> Optional["Watchdog"]:
    return _active


class Watchdog:
    def __init__(self, output_dir: str, rank: int, world: int, train_limit_s: float, long_limit_s: float,
                 store: Any = None) -> None:  # noqa: ANN401 - a c10d Store
        self.output_dir, self.rank, self.world, self.store = output_dir, rank, world, store
        self.train_limit_s, self.long_limit_s = train_limit_s, long_limit_s
        self.phase, self.step, self.long, self.since = "start-up", 0, True, time.monotonic()
        self.training = False  # until the first step is done every phase has the long limit
        self.keep_groups: tuple = ()
        self.heartbeat_s = max(POLL_S, world / HEARTBEATS_PER_S)
        self._stop = threading.Event()
        self._fired = threading.Lock()
        self._store_lock = threading.Lock()  # the heartbeat and a read never use the one store client at once

    # -------------------------------------------------------------- the training thread
    def beat(self, phase: str, step: int, long: bool = False) -> None:
        """Progress: entering ``phase`` of ``step`` (as logged: 1 is the first) now; ``long``: a phase that may
        take the init timeout."""
        self.phase, self.step, self.long, self.since = phase, step, long, time.monotonic()

    def after_step(self) -> None:
        """After the first step: every group but ``keep_groups`` (the checkpoint's) on the train timeout."""
        if not self.training:
            from ..parallel.timeouts import set_every_group

            set_every_group(self.train_limit_s * COLLECTIVE_BACKSTOP, keep=self.keep_groups)
            self.training = True

    def start(self) -> "Watchdog":
        global _active
        _active = self
        for target in (self._watch, self._heartbeat):
            threading.Thread(target=target, name=f"moe_dist-{target.__name__[1:]}", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop the threads; :func:`active` still returns it, for a collective timeout on the way out."""
        self._stop.set()

    # -------------------------------------------------------------- the threads
    def limit_s(self) -> float:
        return self.train_limit_s if self.training and not self.long else self.long_limit_s

    def _watch(self) -> None:
        while not self._stop.wait(POLL_S):
            stalled = time.monotonic() - self.since
            if stalled > self.limit_s():
                self.fire(f"no progress for {stalled:.0f} s")

    def _heartbeat(self) -> None:
        # The first beat at once: a rank that stalls within its first interval must still have a key (a read
        # of a key never written waits out the store's timeout, and the peer then reads as unreadable).
        while self.store is not None and self._beat() and not self._stop.wait(self.heartbeat_s):
            pass

    def _beat(self) -> bool:
        """Write this rank's heartbeat; False once the store's host has gone (the watchdog reports the stall)."""
        try:
            with self._store_lock:
                self.store.set(f"{_KEY}{self.rank}", f"{time.time():.3f} {self.step} {self.phase}")
            return True
        except Exception:  # noqa: BLE001 - any store failure ends the heartbeats
            return False

    def _peers(self) -> dict[int, Optional[tuple[float, str]]]:
        """{rank: (seconds since its last heartbeat, "step N: phase")}; None where none could be read in time."""
        found: dict[int, Optional[tuple[float, str]]] = {r: None for r in range(self.world) if r != self.rank}

        def parse(r: int, raw: bytes) -> None:
            stamp, step, phase = raw.decode().split(" ", 2)
            found[r] = (time.time() - float(stamp), f"step {step}: {phase}")

        def read() -> None:
            with self._store_lock:
                read_locked()

        def read_locked() -> None:
            ranks = list(found)
            try:  # one round trip where the store can (TCPStore), else one per rank
                for r, raw in zip(ranks, self.store.multi_get([f"{_KEY}{r}" for r in ranks])):
                    parse(r, raw)
                return
            except Exception:  # noqa: BLE001 - a key never written fails the whole multi_get
                pass
            for r in ranks:
                try:
                    parse(r, self.store.get(f"{_KEY}{r}"))
                except Exception:  # noqa: BLE001 - never written, or the store is unreachable
                    pass

        if self.store is not None:
            try:  # a key never written would block a read for the store's whole timeout; we are exiting
                self.store.set_timeout(datetime.timedelta(seconds=STORE_WAIT_S))
            except Exception:  # noqa: BLE001 - a store without settable timeout: the join below still bounds it
                pass
            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            reader.join(STORE_WAIT_S)
        return found

    def fire(self, why: str, exc: Optional[BaseException] = None) -> None:
        """Write the hang file, print the one line, exit HUNG (from any thread; once). ``exc``: the timed-out
        collective's exception, whose traceback shows where the training thread waited."""
        if not self._fired.acquire(blocking=False):
            return
        self._stop.set()  # no more heartbeats from this rank
        peers = self._peers()
        silent = [r for r, p in peers.items() if p is None or p[0] > STALE_BEATS * self.heartbeat_s]
        where = f"step {self.step}: {self.phase}" if self.step else self.phase
        path = os.path.join(self.output_dir, f"hang-{self.rank}.txt")
        try:
            with open(path, "w", encoding="utf-8") as f:
                f.write(f"rank {self.rank} of {self.world}: {why} in phase '{where}' (limit {self.limit_s():g} s)\n")
                for r, p in sorted(peers.items()):
                    f.write(f"rank {r}: " + (f"last heartbeat {p[0]:.1f} s ago, in {p[1]}\n" if p else
                                             "no heartbeat readable\n"))
                if exc is not None:
                    import traceback

                    f.write("\nwhere the training thread waited:\n" + "".join(traceback.format_exception(exc)))
                f.write("\nstacks of every thread of this rank:\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:
            path = f"(not written: {e.strerror})"
        shown = ", ".join(map(str, silent[:16])) + (f" and {len(silent) - 16} more" if len(silent) > 16 else "")
        who = f"ranks that stopped answering: {shown}" if silent else "every other rank still answers (waiting too)"
        print(f"error: rank {self.rank} hung: {why} in phase '{where}' (parallel.train_timeout_s="
              f"{self.train_limit_s:g}); {who}; stacks in {path}; rerun with --resume auto (exit code "
              f"{exit_codes.HUNG})", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(exit_codes.HUNG)


def arm(cfg: Any, rt: Any, trainer: Any, keep_groups: tuple = ()) -> Watchdog:  # noqa: ANN401
    """Every group on the init timeout now, the watchdog started and handed to ``trainer``; call the
    returned watchdog's :meth:`Watchdog.after_step` after each step (it switches to the train timeout
    after the first)."""
    import torch.distributed as dist

    from ..parallel.timeouts import set_every_group

    p = cfg.parallel
    set_every_group(p.init_timeout_s)  # DeepSpeed's and FSDP2's groups, ours: made with the backend's default
    store = dist.distributed_c10d._get_default_store() if dist.is_initialized() and rt.world_size > 1 else None
    watch = Watchdog(cfg.checkpoint.output_dir, rt.rank, rt.world_size, p.train_timeout_s, p.init_timeout_s, store)
    watch.keep_groups = keep_groups
    trainer.watch = watch
    return watch.start()


def is_collective_timeout(e: BaseException) -> bool:
    """A collective gave up waiting (gloo's or NCCL's timeout): the same hang, seen from inside the call."""
    text = str(e)
    return isinstance(e, RuntimeError) and ("Timed out" in text or "timed out" in text or "Timeout" in text)
