"""Count device-to-host syncs: the points where the CPU waits for the accelerator.

A training step should queue kernels and never wait for them; each read of a device value on the
host (``.item()``, ``float(t)``, ``.tolist()``, a ``nonzero`` or a boolean-mask index whose output
size depends on the data) stops the CPU until the GPU has caught up. moe_dist's budget: none inside
an MoE layer without expert parallelism, one per layer forward with it (the all-to-all split
sizes), and a constant per optimizer step (the metrics read-back, the engine's gradient norm).

:class:`HostSyncCounter` counts them on any device, so the budget is tested on this CPU machine:

* every aten op that makes a host value of a tensor's data (``_local_scalar_dense``: ``item``,
  ``float``, ``int``, ``bool``) or has a data-dependent output size (``nonzero``, ``masked_select``,
  ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``), seen by a
  ``TorchDispatchMode``;
* ``Tensor.tolist``, which reads memory directly without dispatching an op, by wrapping the method.

On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` reports real syncs as warnings; the counter
records those too. ``MOE_DIST_COUNT_SYNCS=1`` makes the trainer count every optimizer step and log
``host_syncs`` (and the ops behind them) in ``metrics.jsonl``.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

COUNT_SYNCS_ENV = "MOE_DIST_COUNT_SYNCS"

# aten ops (overload packets) whose result needs the data on the host.
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "_unique", "_unique2",
             "unique_dim", "unique_consecutive", "nonzero_static"}


def count_syncs_from_env() -> bool:
    return os.environ.get(COUNT_SYNCS_ENV, "") in ("1", "true")


class _Ops(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS and name != "nonzero_static":
            self.counts[name] += 1
        elif name == "repeat_interleave" and (kwargs or {}).get("output_size") is None and len(args) > 1 \
                and torch.is_tensor(args[1]):
            self.counts["repeat_interleave"] += 1
        return func(*args, **(kwargs or {}))


class HostSyncCounter:
    """``with HostSyncCounter() as c: ...`` then ``c.total`` and ``c.counts`` (op -> count)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self._mode = _Ops(self.counts)
        self._tolist: Any = None
        self._warnings: Any = None
        self._cuda_mode: Any = None

    @property
    def total(self) -> int:
        """Syncs seen: CUDA's own report where it ran, else the ops and reads counted."""
        if "cuda_sync_warnings" in self.counts:
            return self.counts["cuda_sync_warnings"]
        return sum(self.counts.values())

    def __enter__(self) -> "HostSyncCounter":
        counts, original = self.counts, torch.Tensor.tolist

        def tolist(t: torch.Tensor) -> Any:
            counts["tolist"] += 1
            return original(t)

        self._tolist = original
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._cuda_mode = torch.cuda.get_sync_debug_mode()
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode(self._cuda_mode)
            self.counts["cuda_sync_warnings"] += sum("synchroniz" in str(w.message) for w in self._caught)
            self._warnings.__exit__(*exc)
