"""Per-step metrics: accumulate on each rank, reduce over the world, write JSON lines on rank 0.

The logged ``loss`` is the mean cross-entropy over the whole global batch (every sequence has
the same number of targets, so the mean of per-rank means is the global mean); runs on
different world sizes are therefore comparable step by step.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass
class StepAccumulator:
    """Sums over the micro-batches of one optimizer step on one rank, kept on ``device``.

    Nothing here reads a device value back per micro-batch: the sums stay tensors until
    :meth:`reduce`, which all-reduces them on the default process group (whose backend serves
    ``device``: NCCL CUDA tensors, gloo CPU ones) and reads them back in one transfer."""

    num_experts: int
    device: torch.device
    targets: int = 0
    micro_batches: int = 0
    sums: Optional[torch.Tensor] = None  # float64 [ce, aux, correct, dropped, tokens of each expert (E)]

    def add(self, ce: torch.Tensor, aux: Optional[torch.Tensor], logits: torch.Tensor, targets: torch.Tensor,
            expert_counts: Optional[torch.Tensor], dropped: Optional[torch.Tensor]) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        parts = [ce.detach().double(), aux.detach().double() if aux is not None else zero,
                 (logits.detach().argmax(-1) == targets).sum().double(),
                 dropped.double() if dropped is not None else zero]
        counts_E = (expert_counts.detach().double() if expert_counts is not None
                    else torch.zeros(self.num_experts, dtype=torch.float64, device=self.device))
        vec = torch.cat([torch.stack([t.to(self.device) for t in parts]), counts_E.to(self.device)])
        self.sums = vec if self.sums is None else self.sums + vec
        self.targets += targets.numel()
        self.micro_batches += 1

    def reduce(self, grad_nonfinite: bool = False) -> dict[str, Any]:
        """All-reduce across ranks; every rank gets the same numbers (one small tensor, one read-back).

        ``grad_nonfinite``: this rank saw a non-finite gradient norm; the sum over ranks comes back as
        ``bad_grad_ranks`` (the non-finite guard's flag rides on this all-reduce, see ``guard``)."""
        sums = self.sums if self.sums is not None else torch.zeros(4 + self.num_experts, dtype=torch.float64,
                                                                   device=self.device)
        vec = torch.cat([sums, torch.tensor([float(grad_nonfinite), self.targets, self.micro_batches],
                                            dtype=torch.float64, device=self.device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
        values = vec.tolist()
        ce, aux, correct, dropped = values[:4]
        bad_grad_ranks, n_targets, n_micro = values[-3:]
        loss = ce / max(n_micro, 1)
        return {
            "loss": loss,
            "aux_loss": aux / max(n_micro, 1),
            "accuracy": correct / max(n_targets, 1),
            "perplexity": math.exp(min(loss, 50.0)),
            "dropped_tokens": int(dropped),
            "expert_tokens": [int(x) for x in values[4:-3]],
            "bad_grad_ranks": int(bad_grad_ranks),
        }


def json_safe(value: Any) -> Any:  # noqa: ANN401
    """A metric as strict JSON can hold it: a non-finite float becomes its name ("nan", "inf", "-inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


@dataclass
class MetricsLog:
    """Appends one JSON object per line; rank 0 only. Flushed each step so a crash loses nothing."""

    path: str
    enabled: bool = True
    history: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.enabled:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: json_safe(v) for k, v in record.items()}, allow_nan=False) + "\n")
            f.flush()

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows written after the checkpoint's step (they will be recomputed)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a half-written last line from a killed run
                if int(row.get("step", 0)) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)
