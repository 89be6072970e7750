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
    """Sums over the micro-batches of one optimizer step on one rank.

    ``device`` is the engine's device: :meth:`reduce` all-reduces on the default process group,
    whose backend serves that device (NCCL: CUDA tensors, gloo: CPU tensors)."""

    num_experts: int
    device: torch.device
    ce_sum: float = 0.0
    aux_sum: float = 0.0
    correct: int = 0
    targets: int = 0
    micro_batches: int = 0
    dropped: int = 0
    tokens_per_expert: Optional[torch.Tensor] = None

    def add(self, ce: torch.Tensor, aux: Optional[torch.Tensor], logits: torch.Tensor, targets: torch.Tensor,
            expert_counts: Optional[torch.Tensor], dropped: int) -> None:
        self.ce_sum += float(ce.detach())
        self.aux_sum += float(aux.detach()) if aux is not None else 0.0
        self.correct += int((logits.detach().argmax(-1) == targets).sum())
        self.targets += targets.numel()
        self.micro_batches += 1
        self.dropped += int(dropped)
        if expert_counts is not None:
            c = expert_counts.detach().to(device=self.device, dtype=torch.float64)
            self.tokens_per_expert = c if self.tokens_per_expert is None else self.tokens_per_expert + c

    def reduce(self) -> dict[str, Any]:
        """All-reduce across ranks; every rank gets the same numbers (cheap: one small tensor)."""
        counts_E = self.tokens_per_expert if self.tokens_per_expert is not None else torch.zeros(
            self.num_experts, dtype=torch.float64, device=self.device)
        vec = torch.cat([torch.tensor([self.ce_sum, self.aux_sum, self.correct, self.targets, self.micro_batches,
                                       self.dropped], dtype=torch.float64, device=self.device), counts_E])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
        ce, aux, correct, n_targets, n_micro, dropped = vec[:6].tolist()
        loss = ce / max(n_micro, 1)
        return {
            "loss": loss,
            "aux_loss": aux / max(n_micro, 1),
            "accuracy": correct / max(n_targets, 1),
            "perplexity": math.exp(min(loss, 50.0)),
            "dropped_tokens": int(dropped),
            "expert_tokens": [int(x) for x in vec[6:].tolist()],
        }


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
            f.write(json.dumps(record) + "\n")
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
