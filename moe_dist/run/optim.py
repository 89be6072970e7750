"""Which optimizer trains which parameter, and the learning-rate schedule.

Muon (orthogonalised momentum) suits 2-D hidden weight matrices: attention projections,
expert matrices and, as in the seed model, the router. AdamW takes the rest: embeddings,
an untied output head, norms. DeepSpeed builds the optimizer from its config (its ``Muon``
type splits groups by the ``use_muon`` tag we set here), so this module only tags and
groups parameters, and sets each group's LR every optimizer step.

The schedule is counted in optimizer steps, never micro-batches (a bug of the seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ..config import TrainConfig

NO_MUON_KEYWORDS = ("embed", "lm_head")


def adamw_kernel(device: torch.device) -> dict[str, bool]:
    """How ``torch.optim.AdamW`` should run its update on ``device``: ``fused`` on the CPU, ``foreach``
    elsewhere.

    torch's default on the CPU is its single-tensor path, which makes five temporaries the size of
    each parameter every step: on ZeRO's one flat 101M-element partition of the ``100m`` preset that
    was 2.4 s of a 5.7 s step, against 0.05 s fused (measured, one thread). On CUDA, DeepSpeed runs
    its own FusedAdam and FSDP2 keeps torch's ``foreach`` default: fused also wants its ``step``
    counters on the device, which the FSDP2 checkpoint path keeps on the host and which no GPU here
    could test.
    """
    return {"fused": True} if device.type == "cpu" else {"foreach": True}


def layer_ndim(param: torch.Tensor) -> int:
    """The parameter's number of dimensions as a layer: a parameter ZeRO-3 partitioned as it was made
    (``parallel/materialize.py``) holds a flat, often empty, partition and records its shape in
    ``ds_shape`` (DeepSpeed's ``_layer_shape`` reads it the same way)."""
    shape = getattr(param, "ds_shape", None)
    return len(shape) if shape is not None else param.ndim


def uses_muon(name: str, param: torch.Tensor) -> bool:
    """Muon for 2-D matrices except embeddings and the output head (the router included, as in the seed).

    This is DeepSpeed's own rule (``deepspeed.set_optimizer_flags`` re-tags every parameter by it
    when the config's optimizer is Muon), restated here so that grouping, the memory planner and
    the tests agree with what DeepSpeed will do.
    """
    return layer_ndim(param) >= 2 and not any(k in name.lower() for k in NO_MUON_KEYWORDS)


def tag_parameters(model: nn.Module) -> None:
    """Set ``param.use_muon`` on every parameter (DeepSpeed's Muon requires the tag on all), and
    ``param.is_expert_group`` on the stacked expert matrices: DeepSpeed's Muon (``muon_update``)
    then orthogonalises each expert's matrix on its own, as for one 2-D parameter per expert."""
    from ..model import stacked_experts

    stacked = stacked_experts(model)
    for name, p in model.named_parameters():
        p.use_muon = uses_muon(name, p)
        p.is_expert_group = name in stacked


def param_groups(model: nn.Module, weight_decay: float, decay_on: str = "matrices") -> list[dict[str, Any]]:
    """Two groups: decayed and undecayed parameters (``train.weight_decay_on``).

    'matrices': every 2-D parameter decays (Muon's and the embedding), vectors (norm gains) do not;
    'adamw': AdamW's parameters decay (embedding, norms), Muon's do not (the seed trainer's split).
    Every trainable parameter lands in exactly one group. DeepSpeed then splits each group
    into its Muon and Adam halves (and, with expert parallelism, expert and non-expert).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = layer_ndim(p) >= 2 if decay_on == "matrices" else not uses_muon(name, p)
        (decay if decays else no_decay).append(p)
    groups = [{"params": decay, "name": "decay", "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "name": "no_decay", "weight_decay": 0.0})
    return groups


@dataclass
class LRSchedule:
    """Linear warmup then cosine decay to ``min_lr_ratio``, as a function of the optimizer step.

    Stateless by design: the factor at step s depends only on s and the config, so a resumed
    run with a new ``muon_lr``/``adamw_lr``/``max_steps`` simply applies the new values from
    the resumed step on. ``state_dict`` records the values for the checkpoint's record.
    """

    warmup_steps: int
    max_steps: int
    min_lr_ratio: float
    muon_lr: float
    adamw_lr: float
    warmup_from_zero: bool = False

    @classmethod
    def from_config(cls, t: TrainConfig) -> "LRSchedule":
        return cls(t.warmup_steps, t.max_steps, t.min_lr_ratio, t.muon_lr, t.adamw_lr, t.warmup_from_zero)

    def factor(self, step: int) -> float:
        """LR multiplier for optimizer step ``step`` (0-based: the step about to be taken)."""
        if self.warmup_steps > 0 and step < self.warmup_steps:
            return (step + (0 if self.warmup_from_zero else 1)) / self.warmup_steps
        span = max(1, self.max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def lrs(self, step: int) -> dict[str, float]:
        f = self.factor(step)
        return {"muon": self.muon_lr * f, "adamw": self.adamw_lr * f}

    def apply(self, param_groups_: Iterable[dict[str, Any]], step: int, all_adamw: bool = False) -> dict[str, float]:
        """Set ``lr`` on each optimizer param group for ``step``; returns the LRs set."""
        lrs = self.lrs(step)
        for g in param_groups_:
            g["lr"] = lrs["muon"] if (g.get("use_muon", False) and not all_adamw) else lrs["adamw"]
        return lrs

    def state_dict(self) -> dict[str, Any]:
        return {"warmup_steps": self.warmup_steps, "max_steps": self.max_steps, "min_lr_ratio": self.min_lr_ratio,
                "muon_lr": self.muon_lr, "adamw_lr": self.adamw_lr, "warmup_from_zero": self.warmup_from_zero}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the requested config wins (continuing with new LRs is a feature)."""
        del state
