"""Collective timeouts that apply to every process group, and NCCL's flight recorder.

Two settings (``parallel.init_timeout_s``, ``parallel.train_timeout_s``). The default group is
created with the init timeout; every other group (DeepSpeed's expert and expert-data groups,
FSDP2's mesh groups, the checkpoint manager's gloo groups) gets the backend's own default when it
is made (gloo 30 min, NCCL 10 min), so once they all exist :func:`set_every_group` puts each on the
init timeout, and after the first optimizer step on the train timeout, as torchtitan does: start-up
(op builds, a sharded build, a resume) may take long, a step may not. The one exception is the
checkpoint group that carries DCP's save and load collectives: a save's barrier waits for the
slowest rank's write, which may outlast a step's limit, so it keeps the init timeout.

On NCCL the flight recorder is switched on (unless the environment sets it already): a ring
buffer of the last collectives, dumped per rank into ``<output-dir>/nccl_trace_rank_<r>`` when a
collective times out, naming the collective and the ranks that did not join.
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Iterable

import torch.distributed as dist

FLIGHT_RECORDER_ENTRIES = 2000  # collectives kept per rank (torchtitan keeps a few thousand)


def init_timeout(cfg: Any) -> datetime.timedelta:  # noqa: ANN401 - RunConfig
    return datetime.timedelta(seconds=cfg.parallel.init_timeout_s)


def flight_recorder_env(output_dir: str) -> dict[str, str]:
    """The variables that make NCCL record its collectives and dump them on a timeout."""
    return {"TORCH_NCCL_TRACE_BUFFER_SIZE": str(FLIGHT_RECORDER_ENTRIES), "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": os.path.join(os.path.abspath(output_dir), "nccl_trace_rank_")}


def enable_flight_recorder(output_dir: str, on_gpu: bool) -> None:
    """Before the process group exists: set the flight-recorder variables the user has not set."""
    if on_gpu:
        for key, value in flight_recorder_env(output_dir).items():
            os.environ.setdefault(key, value)


def every_group() -> list[Any]:
    """Every process group this rank belongs to: the default one and all that were made since."""
    from torch.distributed.distributed_c10d import _world

    groups = [dist.group.WORLD]
    groups += [g for g in list(_world.pg_map) if g is not dist.group.WORLD]
    return groups


def set_every_group(seconds: float, keep: Iterable[Any] = ()) -> int:
    """Give every group but ``keep`` this collective timeout; returns how many were set."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    if not dist.is_initialized():
        return 0
    kept = {id(g) for g in keep if g is not None}
    n = 0
    for group in every_group():
        if id(group) in kept:
            continue
        try:
            _set_pg_timeout(datetime.timedelta(seconds=seconds), group)
            n += 1
        except (ValueError, AssertionError, RuntimeError):  # not a member, or a backend without timeouts
            pass
    return n


def pg_timeout_s(group: Any = None) -> float:  # noqa: ANN401 - for tests: the gloo timeout a group has now
    backend = (group or dist.group.WORLD)._get_backend(__import__("torch").device("cpu"))
    return backend.options._timeout.total_seconds()
