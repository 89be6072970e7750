"""Background checkpoint writes: stage a copy, let DCP write it from a thread, publish when done.

Why our own staging: ``dcp.async_save``'s default stager copies tensors by ``data_ptr`` and fails
on the ShardedTensors that hold ZeRO fragments (torch 2.13: "data_ptr ... not supported"). We copy
every local shard ourselves (training may change the live fragments the moment we return), rebuild
the ShardedTensors around the copies with the same global metadata, and hand DCP a stager that
returns them unchanged.

At most one save is in flight: starting another waits for the previous one first. DCP's own
collectives run on the checkpoint group from the writer thread, so the "is it done?" vote each
step travels on a separate control group: two threads must never share one gloo group.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata


def _placed_on_host(shard_meta: Any) -> Any:
    return dataclasses.replace(shard_meta, placement=f"rank:{shard_meta.placement.rank()}/cpu")


def _on_host(meta: Any) -> Any:
    """The same shard layout with every placement on ``cpu`` (the rank is kept), unpinned."""
    shards = [_placed_on_host(m) for m in meta.shards_metadata]
    props = dataclasses.replace(meta.tensor_properties, pin_memory=False)
    return ShardedTensorMetadata(shards, meta.size, props)


def staged_copy(state_dict: dict[str, Any], group: Any) -> dict[str, Any]:
    """A deep copy of a DCP state dict in host memory, whose tensors no longer alias training state.

    On a GPU the ZeRO fragments (fp32 masters, optimizer states) live in device memory; a copy
    there would need as much free GPU memory again as the optimizer state itself. The copy goes to
    the host instead, and the ShardedTensors are rebuilt with ``cpu`` placements."""
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if isinstance(value, dict):  # the nested {"model": ..., "optim": {"state": ...}} layout
            out[key] = staged_copy(value, group)
        elif isinstance(value, ShardedTensor):
            shards = [Shard(s.tensor.detach().to("cpu", copy=True), _placed_on_host(s.metadata))
                      for s in value.local_shards()]
            out[key] = ShardedTensor._init_from_local_shards_and_global_metadata(
                shards, _on_host(value.metadata()), process_group=group)
        elif torch.is_tensor(value):
            out[key] = value.detach().to("cpu", copy=True)
        else:
            out[key] = value
    return out


class _AlreadyStaged:
    """AsyncStager protocol: the state dict handed over is already a private copy."""

    _synchronize_after_execute = False

    @property
    def should_synchronize_after_execute(self) -> bool:
        return False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def _then(fut: Any, fn: Optional[Callable[[], Any]]) -> concurrent.futures.Future:
    """A future that completes with ``fn()``, run on the thread that completes ``fut`` (DCP's
    writer), or with ``fut``'s exception; ``fn`` None gives ``fut``'s result as is."""
    out: concurrent.futures.Future = concurrent.futures.Future()

    def done(f: Any) -> None:
        try:
            value = f.result() if hasattr(f, "result") else f.wait()
            out.set_result(fn() if fn is not None else value)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by _finish
            out.set_exception(e)

    fut.add_done_callback(done)
    return out


@dataclass
class PendingSave:
    future: Any
    step: int
    on_complete: Callable[[Optional[BaseException], Any], Any]


class AsyncCheckpointWriter:
    def __init__(self, group: Any, control_group: Any) -> None:
        self.group, self.control_group = group, control_group
        self.pending: Optional[PendingSave] = None

    def start(self, state_dict: dict[str, Any], storage_writer: Any, step: int,
              on_complete: Callable[[Optional[BaseException], Any], Any],
              after_write: Optional[Callable[[], Any]] = None) -> None:
        """Copy the state (the only blocking part), then write it in the background.

        ``after_write()`` runs on the writer thread once this rank's shards are written (hashing
        them for the manifest, off the training thread). ``on_complete(exception_or_None, its result)``
        runs on every rank when the write is over (from ``poll``/``wait``, in the training thread):
        it publishes the checkpoint or raises.
        """
        self.wait()
        staged = staged_copy(state_dict, self.group)
        fut = dcp.async_save(staged, storage_writer=storage_writer, process_group=self.group,
                             async_stager=_AlreadyStaged())
        fut = getattr(fut, "upload_completion", fut)  # AsyncSaveResponse in newer torch, Future before
        self.pending = PendingSave(_then(fut, after_write), step, on_complete)

    def _all_done(self) -> bool:
        done = torch.tensor([1 if self.pending is not None and self.pending.future.done() else 0],
                            device="cpu")  # host value on the gloo control group
        if dist.is_initialized() and self.control_group is not None:
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self.control_group)
        return bool(done.item())

    def poll(self) -> bool:
        """If every rank's write has finished, publish it (collective: all ranks call). True if published."""
        if self.pending is None or not self._all_done():
            return False
        self._finish()
        return True

    def wait(self) -> None:
        """Block until the in-flight save (if any) is written and published."""
        if self.pending is not None:
            self._finish()

    def _finish(self) -> None:
        pending, self.pending = self.pending, None
        assert pending is not None
        result, err = None, None
        try:
            result = pending.future.result()
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - a write error (disk full...) on this
            # rank; every rank hears of it. DCP's CheckpointException derives from BaseException. The
            # manager words it (the short write, the free space), as for a synchronous save.
            err = e
        pending.on_complete(err, result)
